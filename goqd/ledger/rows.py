"""How the ledger's rows and blobs read and write: codecs and named row types.

A statement that reads several columns reads them into one of these types, so the
code that uses them says ``listing.link_state``, not ``listing[1]``. Nothing here
touches the database by itself.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, NamedTuple, TypeVar

import msgspec

from goqd import messages as m

R = TypeVar("R")

_attrs_encoder = msgspec.msgpack.Encoder()
_attrs_decoder = msgspec.msgpack.Decoder(m.ListingAttrs)
_line_decoder = msgspec.msgpack.Decoder(m.OrderLine)
_done_decoder = msgspec.msgpack.Decoder(m.Done)
EMPTY_ATTRS = m.ListingAttrs()


def encode_attrs(attrs: m.ListingAttrs) -> bytes:
    return _attrs_encoder.encode(attrs)


def decode_attrs(blob: bytes | None) -> m.ListingAttrs:
    return _attrs_decoder.decode(blob) if blob else EMPTY_ATTRS


def encode_line(line: m.OrderLine) -> bytes:
    return msgspec.msgpack.encode(line)


def decode_line(blob: bytes) -> m.OrderLine:
    return _line_decoder.decode(blob)


def json_list(items: Iterable[Any]) -> str:
    """``items`` as a JSON array, the one way a list goes into a statement
    (``json_each(?)``)."""
    return msgspec.json.encode(list(items)).decode()


def fetch_one(
    conn: sqlite3.Connection, row: Callable[..., R], sql: str, args: Sequence[Any] = ()
) -> R | None:
    """The first row of ``sql`` as ``row`` (a NamedTuple), or None."""
    found = conn.execute(sql, args).fetchone()
    return None if found is None else row(*found)


def fetch_all(
    conn: sqlite3.Connection, row: Callable[..., R], sql: str, args: Sequence[Any] = ()
) -> list[R]:
    """Every row of ``sql`` as ``row`` (a NamedTuple)."""
    return [row(*found) for found in conn.execute(sql, args)]


class ListingToBook(NamedTuple):
    """A listing named by an order line, and the product it is linked to."""

    sku: str | None
    link_state: str
    created_at: float | None  # the product's
    first_store: str | None  # the product's
    held: int
    watch_qty: int | None


class WatchedListing(NamedTuple):
    """What the sale watch compares a reading of a listing's counter with."""

    sku: str | None
    link_state: str
    held: int
    last_pushed_qty: int | None
    watch_at: float
    sent_min: int | None  # of its outbox row
    queued: int  # 1 when a push is queued for it
    watch_qty: int | None
    hold_layers: str | None
    held_since: float | None


class Hold(NamedTuple):
    """A listing's held units, as ``watch.hold_layers`` reads them."""

    sku: str  # units are held only for a listing linked to a product
    held: int
    hold_layers: str | None
    held_since: float | None


class KnownListing(NamedTuple):
    """What an import compares a listing it reads again with."""

    sku: str | None
    link_state: str
    attrs: bytes | None
    name: str
    link_code: str


IMPORT_COLUMNS = "id, state, request_id, digest, staged, applied, skipped, reply, mode, reason"


class StockImport(NamedTuple):
    """A staged stock import (the ``stock_imports`` table, ``IMPORT_COLUMNS``)."""

    id: int
    state: Literal["staging", "applying", "done", "discarded"]
    request_id: str
    digest: bytes
    staged: int
    applied: int
    skipped: int
    reply: bytes | None
    mode: str
    reason: str

    def job(self) -> m.StockImportJob:
        return m.StockImportJob(
            import_id=self.id,
            state=self.state,
            request_id=self.request_id,
            digest=self.digest,
            staged=self.staged,
            applied=self.applied,
            skipped=self.skipped,
            result=_done_decoder.decode(self.reply) if self.reply is not None else None,
        )
