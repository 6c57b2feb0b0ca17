"""What an adapter keeps between polls and across restarts: a small key-value store.

An adapter is a pure client and never opens a file or a database itself. What it needs
so that a restart does not repeat work (which order versions it has already read) it
keeps in the ``AdapterState`` its ``StoreContext`` carries: the store actor backs it with
the store's state file (``goqd.stores.state``); tests and operator sessions get
``MemoryState``. Values are bytes the adapter encodes; one it can no longer decode (an
older format) is its own to drop. Writes are synchronous and cheap; keep values small.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Generic, Protocol, TypeVar

import msgspec

V = TypeVar("V")


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


class SeenOrders(Generic[V]):
    """What an adapter read of each order at the version it read it (Yahoo's orderInfo
    answers, Amazon's order items), kept in ``state`` as ``<prefix><order id>``.

    ``put`` writes at once, so a poll that fails later (a 429 on the next order) or a
    process killed after it does not read the order again. ``keep_only`` is called with a
    completed poll's window: no order outside it can come back unchanged, so the state
    holds one window's orders at most. A record that no longer decodes (another version
    wrote it) is dropped, and the order read again.
    """

    def __init__(self, state: AdapterState, prefix: str, kind: type[V]) -> None:
        self._state = state
        self._prefix = prefix
        self._entries: dict[str, V] = {}
        names = state.keys()  # a list: the loop may delete
        for key in names:
            raw = state.get(key) if key.startswith(prefix) else None
            if raw is None:
                continue
            try:
                self._entries[key.removeprefix(prefix)] = msgspec.json.decode(raw, type=kind)
            except msgspec.DecodeError:
                state.delete(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def get(self, order_id: str) -> V | None:
        return self._entries.get(order_id)

    def put(self, order_id: str, entry: V) -> None:
        self._entries[order_id] = entry
        self._state.put(self._prefix + order_id, msgspec.json.encode(entry))

    def forget(self, order_id: str) -> None:
        if self._entries.pop(order_id, None) is not None:
            self._state.delete(self._prefix + order_id)

    def keep_only(self, order_ids: Collection[str]) -> None:
        for order_id in self._entries.keys() - set(order_ids):
            self.forget(order_id)
