"""Keeping a store's credential on disk when its mall renews part of it at run time.

Yahoo may answer an access-token refresh with a new refresh token and stop taking the
old one. An adapter hands such fields to ``goqd.malls.base.replace_credentials``, which
changes the store's credential in memory and calls ``StoreContext.save_credentials``:
``CredentialKeeper.save`` here. It writes the whole credential where a renewed key goes
(``<state-dir>/credentials/<store>.json``, 0600, atomically, by the writer
``goqctl key set`` uses), which a restart reads before the configured file.

This module must never log or format a credential value, and a failed write must never
stop the store: it is reported (a warning and a level-8 ``credential_not_saved`` error)
and the store goes on with the values in memory.

The keeper also remembers what the store's credential file holds as far as goqd knows
(``on_disk``: read at start or at a reload, or written here), so that a reload applies a
file only if someone else changed it. Memory is ahead of the file while a renewed value
is being written, and for good after a write failed: a reload must not hand the store
the file's older refresh token, which the mall has stopped taking.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Mapping
from typing import Protocol

import structlog
import trio

from goqd import messages as m
from goqd.config import running_user, write_credential_file
from goqd.errors import LEVEL_TEMPORARY, LedgerError
from goqd.ledger import LedgerClient
from goqd.secret import Secret

log = structlog.get_logger("goqd.store")

NOT_SAVED = "credential_not_saved"
# How long a save may wait for the credential lock (a reload or `goqctl key set` holds
# it) and write, once the session that asked for it is cancelled.
SAVE_GRACE_S = 10.0


class _Owner(Protocol):
    """The store whose credential is kept (``goqd.stores.actor.StoreHandle``)."""

    name: str
    credentials: dict[str, Secret]


class CredentialKeeper:
    """Writes one store's credential when its mall renewed a field of it.

    Resource handling: owns ``lock``, which serialises every write of the store's
    credential file; ``goqctl key set`` holds it too while it stores a new credential and
    hands it to the store, so a save from the session it replaces never lands after
    (over) it. Writes run in a worker thread, never on the event loop. Borrows the
    ledger client to record and resolve ``credential_not_saved``.

    Error handling: an ``OSError`` of the write (read-only file system, disk full, the
    directory missing or not a directory) is logged as a warning naming the path and the
    reason, recorded as a level-8 ``credential_not_saved`` error for the store, and not
    raised. The next write that succeeds resolves that error. A ledger that cannot take
    the record is left out; the warning stands. ``directory`` None keeps nothing on disk
    (a store actor run on its own, in a test).
    """

    def __init__(
        self, owner: _Owner, *, directory: str | None, ledger: LedgerClient | None
    ) -> None:
        self.owner = owner
        self.directory = directory
        self.ledger = ledger
        self.lock = trio.Lock()
        # What the credential file holds as far as goqd knows: what the store started
        # with, then what a reload read or this keeper wrote (see the module docstring).
        self.on_disk: dict[str, Secret] = dict(owner.credentials)
        self.saves = 0  # written to disk
        self.failures = 0  # writes that failed
        # A ``credential_not_saved`` may be open: recorded here, or by an earlier run.
        self._resolve_due = True

    async def save(self, credentials: Mapping[str, Secret]) -> None:
        """Write ``credentials`` (every field) as the store's credential file.

        The wait for the lock and the write are shielded, for at most ``SAVE_GRACE_S``:
        the session that asked may be cancelled meanwhile (a reload or ``goqctl key set``
        restarts it, goqd stops), and a rotated refresh token not written then is lost to
        the next start.
        """
        store = self.owner.name
        path = os.path.join(self.directory or "", f"{store}.json")
        written: dict[str, Secret] | None = None
        failure: OSError | None = None
        with trio.move_on_after(SAVE_GRACE_S, shield=True):
            async with self.lock:
                if credentials is not self.owner.credentials:
                    # A session whose credential was replaced since (``goqctl key set``, a
                    # reload): what replaced it is newer and is the one to keep.
                    log.info("credential_save_skipped", store=store, reason="credential replaced")
                    return
                if self.directory is None:
                    return
                # Taken under the lock: of two saves in a row, the later writes the later
                # values, whatever order their threads would finish in.
                taken = dict(credentials)
                data = {name: value.reveal() for name, value in taken.items()}
                try:
                    await trio.to_thread.run_sync(
                        write_credential_file, self.directory, store, data
                    )
                except OSError as exc:
                    failure = exc
                else:
                    written = self.on_disk = taken
        if written is None:
            self.failures += 1
            late = TimeoutError(errno.ETIMEDOUT, f"not written within {SAVE_GRACE_S:g} s")
            await self._failed(path, failure or late)
            return
        self.saves += 1
        log.info("credential_saved", store=store, path=path)
        if self._resolve_due:
            self._resolve_due = False
            await self._tell(m.ResolveErrors(store=store, codes=(NOT_SAVED,)))

    async def _failed(self, path: str, exc: OSError) -> None:
        store = self.owner.name
        self._resolve_due = True
        reason = exc.strerror or type(exc).__name__
        log.warning(
            "credential_save_failed",
            store=store,
            path=path,
            error=reason,
            errno=errno.errorcode.get(exc.errno or 0, ""),
        )
        await self._tell(
            m.RecordError(
                store=store,
                level=LEVEL_TEMPORARY,
                code="credential_not_saved",
                message=(
                    f"the credential the mall renewed could not be written to {path}: "
                    f"{reason}. The store goes on with it, but a restart would read the "
                    "old one, which the mall may refuse: make that directory writable "
                    f"for user {running_user()}; goqd writes it at the mall's next renewal"
                ),
            )
        )

    async def _tell(self, msg: m.LedgerRequest) -> None:
        if self.ledger is None:
            return
        with contextlib.suppress(LedgerError):
            await self.ledger.call(msg)
