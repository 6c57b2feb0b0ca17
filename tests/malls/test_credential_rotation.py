"""A refresh token Yahoo rotates is kept where a restart reads it, 0600, like a renewed key.

The daemon scenarios run the real daemon (``run_daemon``: real SQLite ledger, store
actors) against the Yahoo simulator served over loopback, with the simulator rotating
the refresh token at every refresh and refusing the old one. The adapter scenario and
the writer run on the real file system.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import trio

from goqd import messages as m
from goqd.app import Daemon, run_daemon
from goqd.config import Config, credential_path, load_credentials, write_credential_file
from goqd.errors import LEVEL_TEMPORARY
from goqd.logs import redact
from goqd.malls.base import StoreContext
from goqd.malls.yahoo import YahooAdapter
from goqd.secret import Secret
from goqd.sim.http import serve_sim
from goqd.sim.yahoo import TOKEN_PATH, SimYahoo
from goqd.stores.credentials import CredentialKeeper
from tests.helpers.rig import loopback_config, serve_store

STORE = "ya"
BOUND_S = 60.0


@pytest.fixture
def tmp(sock_dir: str) -> str:
    return sock_dir


def _rotating_sim() -> SimYahoo:
    return SimYahoo(shop_id="ystore", clock=time.time, rotate_refresh_token=True, key_bits=1024)


@asynccontextmanager
async def _daemon(config: Config) -> AsyncIterator[Daemon]:
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(run_daemon, config)
        yield daemon
        nursery.cancel_scope.cancel()


async def _polled(daemon: Daemon, at_least: int) -> None:
    handle = daemon.handles[STORE]
    while handle.polls < at_least:
        await trio.sleep(0.02)


async def _poll_with_a_fresh_access_token(daemon: Daemon, sim: SimYahoo) -> None:
    """One more poll, for which the adapter must refresh (so the sim rotates again)."""
    handle = daemon.handles[STORE]
    before = handle.polls
    sim.revoke_access_tokens()
    handle.request_poll()
    await _polled(daemon, before + 1)


def _renewed_file(config: Config) -> str:
    return os.path.join(config.daemon.credentials_dir, f"{STORE}.json")


def _read(path: str) -> dict[str, str]:
    with open(path, encoding="utf-8") as f:
        data: dict[str, str] = json.load(f)
    return data


async def _errors(daemon: Daemon, *, cleared: bool = False) -> list[m.ErrorRecord]:
    reply = await daemon.ledger.ask(
        m.ListErrors(store=STORE, include_cleared=cleared, code="credential_not_saved"),
        m.ErrorList,
    )
    return list(reply.errors)


async def _token_grant(url: str, creds: dict[str, str], refresh_token: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5.0) as http:
        return await http.post(
            url + TOKEN_PATH,
            data={
                "grant_type": "refresh_token",
                "client_id": creds["client_id"],
                "client_secret": creds["client_secret"],
                "refresh_token": refresh_token,
            },
        )


async def test_a_rotated_refresh_token_is_stored_0600_with_the_other_fields_and_a_restart_uses_it(
    tmp: str,
) -> None:
    sim = _rotating_sim()
    original = sim.credentials()
    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as sims:
            store = await serve_store(sims, tmp, STORE, sim, poll_interval="1h")
            config = loopback_config(tmp, [store])
            async with _daemon(config) as daemon:
                await _polled(daemon, 1)  # its first refresh rotated the token
            path = _renewed_file(config)
            saved = _read(path)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            rotated = sim.credentials()["refresh_token"]
            assert rotated != original["refresh_token"]
            assert saved["refresh_token"] == rotated
            issued = datetime.fromisoformat(saved["refresh_token_issued_at"]).timestamp()
            assert abs(issued - time.time()) < 60
            # Every other field exactly as the operator wrote it, none added or lost.
            untouched = {"refresh_token", "refresh_token_issued_at"}
            assert saved.keys() == original.keys()
            assert {k: v for k, v in saved.items() if k not in untouched} == {
                k: v for k, v in original.items() if k not in untouched
            }
            # A restart reads that copy, and the token it replaced is dead at the mall.
            assert credential_path(config, store) == path
            assert load_credentials(config, store)["refresh_token"] == Secret(rotated)
            old = await _token_grant(store.base_url, original, original["refresh_token"])
            assert old.status_code == 400 and old.json()["error"] == "invalid_grant"

            refreshes = sim.token_refreshes
            async with _daemon(config) as daemon:
                await _polled(daemon, 1)
                handle = daemon.handles[STORE]
                assert (handle.state, handle.error_level) == ("running", 0)
                assert sim.token_refreshes == refreshes + 1  # with the stored token
                errors = await daemon.ledger.ask(m.ListErrors(store=STORE), m.ErrorList)
                assert errors.errors == ()
            assert _read(path)["refresh_token"] == sim.credentials()["refresh_token"]
            sims.cancel_scope.cancel()


async def test_a_credential_that_cannot_be_written_is_a_level_8_error_and_the_store_polls_on(
    tmp: str,
) -> None:
    sim = _rotating_sim()
    issued = [sim.credentials()["refresh_token"]]
    with trio.fail_after(BOUND_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as sims:
            store = await serve_store(sims, tmp, STORE, sim, poll_interval="1h")
            config = loopback_config(tmp, [store])
            # A file where the credentials directory goes: every write fails (ENOTDIR
            # or EEXIST), as on a read-only mount, whoever goqd runs as.
            os.makedirs(config.daemon.state_dir)
            blocker = config.daemon.credentials_dir
            Path(blocker).write_text("not a directory")
            async with _daemon(config) as daemon:
                handle = daemon.handles[STORE]
                await _polled(daemon, 1)
                issued.append(sim.credentials()["refresh_token"])
                while not await _errors(daemon):
                    await trio.sleep(0.02)
                [error] = await _errors(daemon)
                assert error.level == LEVEL_TEMPORARY
                assert _renewed_file(config) in error.message
                # The store runs on, with the rotated token it holds in memory.
                await _poll_with_a_fresh_access_token(daemon, sim)
                issued.append(sim.credentials()["refresh_token"])
                assert sim.token_refreshes == 2
                assert (handle.state, handle.error_level) == ("running", 0)
                assert (await _errors(daemon))[0].count == 2

                # The directory is fixed: the next rotation is written and the error ends.
                os.unlink(blocker)
                await _poll_with_a_fresh_access_token(daemon, sim)
                issued.append(sim.credentials()["refresh_token"])
                assert _read(_renewed_file(config))["refresh_token"] == issued[-1]
                assert await _errors(daemon) == []
                [ended] = await _errors(daemon, cleared=True)
                assert ended.cleared_by == "healed"
                messages = [error.message, ended.message]
            sims.cancel_scope.cancel()

    failed = [e for e in logs if e["event"] == "credential_save_failed"]
    assert len(failed) == 2 and all(e["store"] == STORE for e in failed)
    assert [e["log_level"] for e in failed] == ["warning", "warning"]
    assert any(e["event"] == "credential_saved" for e in logs)
    assert len(set(issued)) == 4
    secrets = [*issued, sim.client_secret]
    for text in (repr(logs), *messages):
        leaked = [s for s in secrets if s in text]
        assert not leaked, leaked
    # Should a rotated token reach a log line by some other path, the redactor masks it.
    masked = redact(None, "info", {"event": "x", "detail": f"token {issued[-1]}"})
    assert issued[-1] not in repr(masked)


async def test_key_set_stores_the_token_the_mall_rotated_while_testing_it(tmp: str) -> None:
    from goqd.control import protocol as p
    from goqd.control.client import call

    sim = _rotating_sim()
    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as sims:
            store = await serve_store(sims, tmp, STORE, sim, poll_interval="1h")
            config = loopback_config(tmp, [store])
            async with _daemon(config) as daemon:
                await _polled(daemon, 1)
                fresh = sim.issue_credentials()  # the operator re-authorised goqd
                await call(config.daemon.control_socket, p.KeySet(store=STORE, credentials=fresh))
                # The key test refreshed with it, and Yahoo rotated it: that one is kept.
                current = sim.credentials()["refresh_token"]
                assert current != fresh["refresh_token"]
                assert _read(_renewed_file(config))["refresh_token"] == current
                # The store's new session refreshes with it (the one supplied is dead).
                await _poll_with_a_fresh_access_token(daemon, sim)
                handle = daemon.handles[STORE]
                assert (handle.state, handle.error_level) == ("running", 0)
                now_held = sim.credentials()["refresh_token"]
                assert _read(_renewed_file(config))["refresh_token"] == now_held
            sims.cancel_scope.cancel()


class _Owner:
    def __init__(self, credentials: dict[str, Secret]) -> None:
        self.name = STORE
        self.credentials = credentials


async def test_two_adapters_of_a_store_refreshing_at_once_both_work_and_the_newest_token_is_kept(
    tmp: str,
) -> None:
    """The store's own adapter and an operator's (a diff) share the credential: the one
    whose refresh token the other had just rotated away takes the new one and goes on.

    Real time (about 3 s of the shared token bucket's pacing): under an autojump clock
    the worker thread that writes the file looks like idleness, and the clock would
    jump past the test's deadline while it runs.
    """
    sim = _rotating_sim()
    sim.add_item("A-1", quantity=3)
    shared = {k: Secret(v) for k, v in sim.credentials().items()}
    keeper = CredentialKeeper(_Owner(shared), directory=tmp, ledger=None)
    buckets: dict[str, Any] = {}
    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            url: str = await nursery.start(serve_sim, sim.app)
            async with httpx.AsyncClient(timeout=5.0) as http:
                adapters = [
                    YahooAdapter(
                        StoreContext(
                            store=STORE,
                            mall="yahoo",
                            base_url=url,
                            credentials=shared,
                            http=http,
                            clock=time.time,
                            rate_buckets=buckets,
                            save_credentials=keeper.save,
                        )
                    )
                    for _ in range(2)
                ]
                counts: list[dict[str, int | None]] = []

                async def read(adapter: YahooAdapter) -> None:
                    counts.append(await adapter.read_stock(["A-1"]))

                async with trio.open_nursery() as both:
                    for adapter in adapters:
                        both.start_soon(read, adapter)
            nursery.cancel_scope.cancel()
    assert counts == [{"A-1": 3}, {"A-1": 3}]
    assert sim.token_refreshes == 2
    latest = sim.credentials()["refresh_token"]
    assert shared["refresh_token"] == Secret(latest)
    assert keeper.saves == 2
    path = os.path.join(tmp, f"{STORE}.json")
    assert _read(path)["refresh_token"] == latest
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp) == [f"{STORE}.json"]  # no temporary file left


def test_writers_racing_never_leave_a_torn_or_partial_file(tmp: str) -> None:
    """Eight threads write different credentials at once while a reader reads the file
    back: every read is one whole credential, and the last file is one of them."""
    versions = [{"refresh_token": f"rt-{n:04d}-" + "x" * 40_000, "n": str(n)} for n in range(8)]
    path = os.path.join(tmp, f"{STORE}.json")
    write_credential_file(tmp, STORE, versions[0])
    stop = threading.Event()
    seen: list[str] = []
    problems: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(_read(path)["n"])
            except (OSError, ValueError) as exc:
                problems.append(exc)

    def writer(version: dict[str, str]) -> None:
        try:
            for _ in range(15):
                write_credential_file(tmp, STORE, version)
        except OSError as exc:
            problems.append(exc)

    watching = threading.Thread(target=reader)
    watching.start()
    writers = [threading.Thread(target=writer, args=(v,)) for v in versions]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    watching.join()
    assert problems == []
    assert seen and set(seen) <= {v["n"] for v in versions}
    final = _read(path)
    assert final == versions[int(final["n"])]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp) == [f"{STORE}.json"]


async def test_a_save_is_written_though_its_session_is_restarted_while_it_waits(
    tmp: str,
) -> None:
    """A reload (or `goqctl key set`) holds the store's credential lock and restarts the
    session whose refresh just rotated the token: the rotated token is written anyway,
    or the next start would read one the mall no longer takes."""
    from trio.testing import wait_all_tasks_blocked

    creds = {"refresh_token": Secret("rt-old")}
    keeper = CredentialKeeper(_Owner(creds), directory=tmp, ledger=None)
    creds["refresh_token"] = Secret("rt-rotated")
    session = trio.CancelScope()

    async def run_session() -> None:
        with session:
            await keeper.save(creds)

    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            await keeper.lock.acquire()  # the reload
            nursery.start_soon(run_session)
            await wait_all_tasks_blocked()
            session.cancel()  # the reload restarts the store's session
            await wait_all_tasks_blocked()
            keeper.lock.release()
    assert keeper.saves == 1
    assert _read(os.path.join(tmp, f"{STORE}.json")) == {"refresh_token": "rt-rotated"}
    assert keeper.on_disk == creds
