"""What an adapter keeps between polls and across restarts: a small key-value store.

An adapter is a pure client and never opens a file or a database itself. What it needs
so that a restart does not repeat work (which order versions it has already read) it
keeps in the ``AdapterState`` its ``StoreContext`` carries: the store actor backs it with
the store's state file (``goqd.stores.state``); tests and operator sessions get
``MemoryState``. Values are bytes the adapter encodes; one it can no longer decode (an
older format) is its own to drop. Writes are synchronous and cheap; keep values small.
"""

from __future__ import annotations

from typing import Protocol


class AdapterState(Protocol):
    """One store's adapter state. Keys are short printable strings."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None: ...

    def delete(self, key: str) -> None: ...

    def keys(self) -> list[str]: ...


class MemoryState:
    """An ``AdapterState`` that lasts as long as the process."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self._data.get(key)

    def put(self, key: str, value: bytes) -> None:
        self._data[key] = bytes(value)

    def delete(self, key: str) -> None:
        self._data.pop(key, None)

    def keys(self) -> list[str]:
        return list(self._data)
