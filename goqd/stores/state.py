"""A store's state file: what must outlive the process but is not the ledger's business.

Two things live here, one file per store (``<state-dir>/stores/<store>.state``):

* the store's rate-limit buckets (``goqd.malls.ratelimit.Limiters``), written before
  every call goes out and again when it is answered, so a process started after a
  SIGKILL knows what the killed one spent at the mall;
* the adapter's own records (``goqd.malls.adapterstate.AdapterState``): which order
  versions it has already read, so a restart does not read them again.

The file is an append-only log of records (CRC-checked key/value puts and deletes),
rewritten without its dead records when it grows. Writes go to the kernel with one
``write`` each and are never fsynced: a SIGKILL loses nothing the kernel has, and a
power loss (which could lose the latest records) is recognised by the boot id kept in
the file, after which every bucket starts empty (the adapter's records are only ever a
shortcut, so old ones are harmless). A record cut short or damaged ends the reading
there and, since a later bucket record may be missing, also starts every bucket empty.

Nothing here may stop the store: a file that cannot be read is set aside and started
afresh, and a write that fails is logged once (the store runs on, in memory) and tried
again with the next record. While writes fail, the file on disk is cut short so that a
process started from it does not believe its bucket records, and a rewrite that fails
leaves no partial copy behind.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from collections.abc import Iterator
from typing import Final

import msgspec
import structlog

from goqd.malls.ratelimit import BucketState, Limiters
from goqd.wallclock import WallClock

log = structlog.get_logger("goqd.state")

MAGIC: Final = b"GOQD-STATE-1\n"
# crc32 of what follows it, key length, value length (``_DELETED`` for a delete).
_HEADER: Final = struct.Struct(">IHI")
_DELETED: Final = 0xFFFFFFFF
MAX_KEY: Final = 1024
MAX_VALUE: Final = 1 << 20
# A file larger than this is no state goqd wrote; it is set aside unread.
MAX_FILE: Final = 256 << 20
# Rewritten without dead records once it is this large and mostly dead.
COMPACT_AT: Final = 1 << 20

_BOOT_KEY: Final = "boot"
_LIMIT: Final = "limit/"
_ADAPTER: Final = "adapter/"
_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    """This boot's id (Linux); empty where the system has none."""
    try:
        with open(_BOOT_ID_PATH, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _record(key: str, value: bytes | None) -> bytes:
    k = key.encode()
    body = struct.pack(">HI", len(k), _DELETED if value is None else len(value)) + k
    if value is not None:
        body += value
    return struct.pack(">I", zlib.crc32(body)) + body


def _read(blob: bytes) -> tuple[dict[str, bytes], bool]:
    """The records of ``blob`` and whether every byte of it was a whole, sound record."""
    data: dict[str, bytes] = {}
    if not blob.startswith(MAGIC):
        return data, not blob
    at = len(MAGIC)
    while at < len(blob):
        if at + _HEADER.size > len(blob):
            return data, False
        crc, klen, vlen = _HEADER.unpack_from(blob, at)
        size = 0 if vlen == _DELETED else vlen
        end = at + _HEADER.size + klen + size
        if klen > MAX_KEY or size > MAX_VALUE or end > len(blob):
            return data, False
        if zlib.crc32(blob[at + 4 : end]) != crc:
            return data, False
        start = at + _HEADER.size
        try:
            key = blob[start : start + klen].decode()
        except UnicodeDecodeError:
            return data, False
        if vlen == _DELETED:
            data.pop(key, None)
        else:
            data[key] = blob[start + klen : end]
        at = end
    return data, True


class StoreState:
    """One store's state file, open for appending. Use ``open_store_state``."""

    def __init__(self, path: str, data: dict[str, bytes], *, trusted: bool) -> None:
        self.path = path
        self._data = data
        # Whether the bucket records can be believed complete (see the module docstring).
        self.trusted = trusted
        self._size = 0  # bytes in the file
        self._live = 0  # bytes its live records would take
        self._failing = False
        self._whole = False  # the file on disk ends with a whole record

    # -- file ----------------------------------------------------------------------------

    def _rewrite(self) -> None:
        """Write the live records to a new file and put it in place of the old one."""
        blob = bytearray(MAGIC)
        for key, value in self._data.items():
            blob += _record(key, value)
        tmp = self.path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError:
            # On a full disk a partial copy would hold space the ledger needs.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._size = self._live = len(blob)
        self._whole = True

    def _append(self, key: str, value: bytes | None) -> None:
        """Add one record to the file. No descriptor is kept open between records: a
        store restarted by its supervisor goes on with the same object, and a daemon run
        inside a test process leaves nothing open behind."""
        record = _record(key, value)
        try:
            if not self._whole or (self._size > COMPACT_AT and self._size > 2 * self._live):
                self._rewrite()
            else:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                try:
                    # One write of a few hundred bytes: whole in the kernel or not at all.
                    written = os.write(fd, record)
                finally:
                    os.close(fd)
                self._size += written
                if written != len(record):
                    raise OSError(f"short write ({written} of {len(record)} bytes)")
        except OSError as exc:
            # The next record rewrites the whole file: nothing is built on a bad tail.
            self._whole = False
            if not self._failing:
                log.error("state_write_failed", path=self.path, error=str(exc))
                self._distrust_file()
            self._failing = True
            return
        if self._failing:
            log.info("state_write_recovered", path=self.path)
            self._failing = False

    def _distrust_file(self) -> None:
        """The file lacks a record this process made, perhaps a bucket's newest: cut its
        last byte (which needs no free space), so that a process started from it reads a
        torn record and believes no bucket record. Rewritten whole once writes work."""
        with contextlib.suppress(OSError):
            size = os.stat(self.path).st_size
            if size > len(MAGIC):
                os.truncate(self.path, size - 1)

    # -- records -------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        return self._data.get(key)

    def put(self, key: str, value: bytes) -> None:
        if len(key.encode()) > MAX_KEY or len(value) > MAX_VALUE:
            # Kept nowhere rather than failing the call that made it: a record is only
            # ever a shortcut or a bound, and an older one of this key would be stale.
            log.warning("state_record_too_large", path=self.path, key=key[:80])
            self.delete(key)
            return
        old = self._data.get(key)
        if old == value:
            return
        self._data[key] = bytes(value)
        self._live += len(_record(key, value)) - (0 if old is None else len(_record(key, old)))
        self._append(key, value)

    def delete(self, key: str) -> None:
        old = self._data.pop(key, None)
        if old is None:
            return
        self._live -= len(_record(key, old))
        self._append(key, None)

    def keys(self, prefix: str = "") -> Iterator[str]:
        return (k for k in list(self._data) if k.startswith(prefix))

    # -- views ---------------------------------------------------------------------------

    def limiters(self, clock: WallClock) -> Limiters:
        """The store's rate buckets, each starting where the last process left it."""
        saved: dict[str, BucketState] = {}
        trusted = self.trusted
        for key in self.keys(_LIMIT):
            raw = self._data[key]
            try:
                saved[key[len(_LIMIT) :]] = msgspec.json.decode(raw, type=BucketState)
            except msgspec.DecodeError:
                # Maybe the newest record of that bucket: nothing about it can be trusted.
                trusted = False
        encode = msgspec.json.encode

        def save(name: str, state: BucketState) -> None:
            self.put(_LIMIT + name, encode(state))

        return Limiters(clock=clock, saved=saved, trusted=trusted, save=save)

    def adapter(self) -> AdapterView:
        return AdapterView(self, _ADAPTER)


class AdapterView:
    """The adapter's records of a ``StoreState`` (an ``AdapterState``)."""

    def __init__(self, state: StoreState, prefix: str) -> None:
        self._state = state
        self._prefix = prefix

    def get(self, key: str) -> bytes | None:
        return self._state.get(self._prefix + key)

    def put(self, key: str, value: bytes) -> None:
        self._state.put(self._prefix + key, value)

    def delete(self, key: str) -> None:
        self._state.delete(self._prefix + key)

    def keys(self) -> list[str]:
        return [k[len(self._prefix) :] for k in self._state.keys(self._prefix)]


def state_path(state_dir: str, store: str) -> str:
    return os.path.join(state_dir, "stores", f"{store}.state")


def open_store_state(state_dir: str, store: str) -> StoreState:
    """Read the store's state file (blocking: call it from a thread) and open it anew.

    The file is always rewritten here, so what follows is appended to whole records
    only. A file that cannot be read is renamed ``*.unreadable`` and logged; the store
    starts with no records and every bucket empty.
    """
    path = state_path(state_dir, store)
    with contextlib.suppress(OSError):  # reading and writing below say what is wrong
        os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
    here = boot_id()
    try:
        with open(path, "rb") as f:
            blob = f.read(MAX_FILE + 1)
    except FileNotFoundError:
        # Never run here before: no call was ever made, every bucket may start full.
        state = StoreState(path, {_BOOT_KEY: here.encode()}, trusted=True)
    except OSError as exc:
        log.error("state_unreadable", path=path, error=str(exc))
        _set_aside(path)
        state = StoreState(path, {_BOOT_KEY: here.encode()}, trusted=False)
    else:
        data, whole = _read(blob) if len(blob) <= MAX_FILE else ({}, False)
        same_boot = data.get(_BOOT_KEY) == here.encode()
        if not whole:
            log.warning("state_damaged", path=path, kept=len(data))
            if not data:
                _set_aside(path)
        data[_BOOT_KEY] = here.encode()
        state = StoreState(path, data, trusted=whole and same_boot)
    try:
        state._rewrite()
    except OSError as exc:
        # The store runs on; every record tries the file again (``_append``).
        log.error("state_write_failed", path=path, error=str(exc))
        state._distrust_file()
        state._failing = True
    return state


def _set_aside(path: str) -> None:
    """Keep an unreadable file for whoever wants to look, out of the way."""
    with contextlib.suppress(OSError):
        os.replace(path, path + ".unreadable")
