"""The ledger's transactions: one per batch, and which module applies each request.

Everything here is synchronous and runs on the ledger actor's one worker thread, inside
one transaction per batch (``Ledger.apply_batch``). Nothing else opens the file for
writing. What each request does lives in the module of its concern: ``booking`` (order
lines), ``outbox`` (pushes), ``watch`` (the sale watch), ``stock`` and
``stock_imports`` (counts), ``catalogue`` (products, listings, links, import),
``error_rows``, ``diffs``; reads are ``queries``; the file itself is ``schema``.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import msgspec

from goqd import messages as m
from goqd.crashpoints import crashpoint
from goqd.errors import GoqdError, LedgerError, LedgerRequestFailed
from goqd.ledger import (
    booking,
    catalogue,
    diffs,
    error_rows,
    outbox,
    queries,
    stock,
    stock_imports,
    watch,
)
from goqd.ledger.tx import Tx, read_meta, set_meta
from goqd.wallclock import WallClock

__all__ = [
    "BatchResult",
    "Ledger",
    "request_digest",
]

_reply_decoder: msgspec.msgpack.Decoder[m.LedgerReply] = msgspec.msgpack.Decoder(m.LedgerReply)
# Deterministic: a dict inside a request encodes the same whatever its insertion order.
_digest_encoder = msgspec.msgpack.Encoder(order="deterministic")

# SQLite primary result codes that mean the database, the disk or the lock failed, not
# the request being applied: the whole batch is rolled back and every caller retries.
# Any other error while applying one request (a constraint, a value SQLite cannot bind,
# a bug) refuses that request alone.
_BATCH_FAILURES = frozenset(
    {
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_ABORT,
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_INTERRUPT,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOTADB,
        sqlite3.SQLITE_NOLFS,
    }
)


def request_digest(msg: m.LedgerRequest) -> bytes:
    """A stable digest of what an operator request asks for, its ``request_id`` left out.

    Stored with the id: a retry (same id, same content) gets the stored reply, while the
    same id with other content is refused. The digest is taken over the request's kind
    (its class name in snake case, so ``SetStock`` and ``AdjustStock`` with the same
    fields differ) and every field in definition order, defaults included. It does not
    follow the socket's spelling: a retry sent across an upgrade that renamed a tag or
    left defaults off the wire must still be answered, not refused as another request
    and then applied twice under a new id. Renaming a class or a field changes it.
    """
    pairs: list[tuple[str, object]] = [("type", _snake(type(msg).__name__))]
    pairs += [(f, "" if f == "request_id" else getattr(msg, f)) for f in msg.__struct_fields__]
    # A msgpack map written by hand: an encoded dict would have its keys sorted, and the
    # digests stored so far were taken over the fields in definition order.
    n = len(pairs)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")
    body = b"".join(_digest_encoder.encode(k) + _digest_encoder.encode(v) for k, v in pairs)
    return hashlib.sha256(head + body).digest()


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _fails_batch(exc: Exception, conn: sqlite3.Connection) -> bool:
    """True when ``exc``, raised while applying one request, means the batch is lost."""
    if not conn.in_transaction:
        # SQLite rolled the whole transaction back itself: the earlier requests are gone.
        return True
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        # Raised without an SQLite result code: binding, API misuse, a closed connection.
        return isinstance(exc, sqlite3.OperationalError | sqlite3.InternalError)
    return (code & 0xFF) in _BATCH_FAILURES


def _refusal(msg: m.LedgerRequest, exc: Exception) -> LedgerRequestFailed:
    """The answer to a request that failed with something other than a refusal."""
    detail = f"{type(exc).__name__}: {exc}"
    if len(detail) > 200:  # a KeyError may quote a huge key; the log has it all
        detail = detail[:199] + "…"
    return LedgerRequestFailed(
        f"the ledger could not apply {type(msg).__name__} ({detail}); nothing of it was "
        "applied (logged as ledger_request_failed)"
    )


@dataclass
class BatchResult:
    """What one transaction did: a reply (or refusal) per message, stores to wake."""

    replies: list[m.LedgerReply | GoqdError]
    woken: set[str] = field(default_factory=set)
    lines: int = 0
    oversold: int = 0
    # Requests refused because applying them raised something other than a refusal: their
    # index in the batch and the exception, for the actor to log with its traceback.
    failures: list[tuple[int, Exception]] = field(default_factory=list)


class Ledger:
    """The ledger's transactions over one connection. Not thread-safe: one caller."""

    def __init__(self, conn: sqlite3.Connection, *, now: WallClock) -> None:
        self.conn = conn
        self.now = now
        self.tx = Tx(conn, now)

    def apply_batch(self, msgs: Sequence[m.LedgerRequest]) -> BatchResult:
        """Apply every message in one transaction; one reply or refusal per message.

        A refusal (a ``GoqdError``) rolls back that message only (a savepoint each), so
        one bad request never costs the others. So does any other exception raised while
        applying one message (a value SQLite cannot bind, a constraint, a bug): that
        message is answered with a ``LedgerError`` naming its type and listed in
        ``failures``. Only a failure of the database itself (disk full, I/O error, see
        ``_BATCH_FAILURES``) aborts the transaction and raises.
        """
        replies: list[m.LedgerReply | GoqdError] = []
        failures: list[tuple[int, Exception]] = []
        tx = self.tx
        tx.woken = set()
        tx.oversold = 0
        tx.lines = 0
        conn = self.conn
        if conn.in_transaction:
            # Left open by a batch whose ROLLBACK failed too (the disk gone): nothing of it
            # was acknowledged. Dropped here, or every later batch would fail at BEGIN.
            conn.execute("ROLLBACK")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for index, msg in enumerate(msgs):
                conn.execute("SAVEPOINT msg")
                version_before, oversold_before, lines_before = tx.version, tx.oversold, tx.lines
                try:
                    reply = self._apply(msg)
                    conn.execute("RELEASE msg")
                # Broad on purpose: this is the boundary that keeps one request's failure
                # from costing the rest of the batch (and the ledger) anything.
                except Exception as exc:
                    if not isinstance(exc, GoqdError) and _fails_batch(exc, conn):
                        raise
                    conn.execute("ROLLBACK TO msg")
                    conn.execute("RELEASE msg")
                    # Keep ``dirty``: flushing a SKU whose change was rolled back just
                    # queues its (correct) current count once more.
                    tx.version, tx.oversold, tx.lines = (
                        version_before,
                        oversold_before,
                        lines_before,
                    )
                    if isinstance(exc, GoqdError):
                        replies.append(exc)
                    else:
                        replies.append(_refusal(msg, exc))
                        failures.append((index, exc))
                    continue
                replies.append(reply)
            outbox.flush_dirty(tx)
            set_meta(conn, "version", tx.version)
            crashpoint("ledger.in_transaction")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            tx.version = read_meta(conn, "version")
            tx.dirty.clear()
            raise
        crashpoint("ledger.after_commit")
        return BatchResult(replies, tx.woken, tx.lines, tx.oversold, failures)

    def _apply(self, msg: m.LedgerRequest) -> m.LedgerReply:
        """Apply one request: the store actors' and the reads here, the operator's in
        ``_idempotent``."""
        tx, conn = self.tx, self.conn
        match msg:
            case m.OrderLinesSeen():
                return booking.book_lines(tx, msg)
            case m.GetCursor():
                return m.Cursor(store=msg.store, cursor=queries.cursor(conn, msg.store))
            case m.TakePushes():
                return outbox.take_pushes(tx, msg.store, msg.limit, peek=msg.peek)
            case m.PushesDone():
                return outbox.pushes_done(tx, msg)
            case m.GetWatchList():
                return watch.watch_list(tx, msg)
            case m.StockSeen():
                return watch.stock_seen(tx, msg)
            case m.Ping():
                conn.execute("SELECT 1").fetchone()
                return m.Pong()
            case m.RecordError():
                return error_rows.record_error(tx, msg)
            case m.ResolveErrors():
                return error_rows.resolve_errors(tx, msg)
            case m.ImportListings():
                return catalogue.import_listings(tx, msg)
            case m.AutoLink():
                return catalogue.auto_link(tx, msg.store, msg.rules)
            case m.DiffFound():
                return diffs.diff_found(tx, msg)
            case m.StockImportStep():
                return stock_imports.stock_import(tx, msg)
        read = self._read(msg)
        return read if read is not None else self._idempotent(msg)

    def _read(self, msg: m.LedgerRequest) -> m.LedgerReply | None:
        """The answer to a read request; None for any other request."""
        conn = self.conn
        match msg:
            case m.GetHistory():
                return queries.history(conn, msg.sku, msg.limit)
            case m.ListErrors():
                return queries.list_errors(conn, msg)
            case m.ListProducts():
                return queries.list_products(conn, msg)
            case m.ListListings():
                return queries.list_listings(conn, msg)
            case m.CountListings():
                return queries.count_listings(conn, msg)
            case m.GetLedgerStatus():
                return queries.status(conn)
            case m.GetStoreStats():
                return queries.store_stats(conn)
            case m.ListParked():
                return queries.list_parked(conn, msg)
        return None

    def _idempotent(self, msg: m.LedgerRequest) -> m.LedgerReply:
        """Operator requests: the same ``request_id`` twice is applied once, same reply.

        The id is bound to what the request asked for: the same id with different
        content is refused and nothing is applied (a client reusing an id by mistake
        must not be told "done" about a request that never happened).
        """
        request_id = cast(str, getattr(msg, "request_id", ""))
        if not request_id:
            return self._operator(msg)
        digest = request_digest(msg)
        row = self.conn.execute(
            "SELECT reply, digest FROM requests WHERE request_id = ?", (request_id,)
        ).fetchone()
        if row is not None:
            stored_reply, stored_digest = row
            # A row from before digests were stored (NULL) answers by id alone, as then.
            if stored_digest is not None and stored_digest != digest:
                raise LedgerError(
                    f"request id {request_id!r} was already used for a different request; "
                    "nothing was applied: send this request with a new id"
                )
            return _reply_decoder.decode(stored_reply)
        reply = self._operator(msg)
        self.conn.execute(
            "INSERT INTO requests (request_id, reply, at, digest) VALUES (?, ?, ?, ?)",
            (request_id, msgspec.msgpack.encode(reply), self.now(), digest),
        )
        return reply

    def _operator(self, msg: m.LedgerRequest) -> m.LedgerReply:
        tx = self.tx
        match msg:
            case m.SetStock():
                return stock.set_stock(tx, msg.sku, msg.quantity, msg.reason)
            case m.AdjustStock():
                return stock.adjust_stock(tx, msg.sku, msg.delta, msg.reason)
            case m.SetStocks():
                return stock.set_stocks(tx, msg)
            case m.UpsertProduct():
                return catalogue.upsert_product(tx, msg)
            case m.UpsertListing():
                return catalogue.upsert_listing(tx, msg)
            case m.SetListingAttrs():
                return catalogue.set_listing_attrs(tx, msg)
            case m.Link():
                return catalogue.link(tx, msg.store, msg.listing_key, msg.sku)
            case m.Unlink():
                return catalogue.unlink(tx, msg.store, msg.listing_key)
            case m.DeleteProduct():
                return catalogue.delete_product(tx, msg.sku)
            case m.AddProduct():
                return catalogue.add_product(tx, msg)
            case m.ClearErrors():
                return error_rows.clear_errors(tx, msg)
            case m.QueuePushes():
                return outbox.queue_pushes(tx, msg.store, msg.listing_keys, strict=msg.strict)
            case m.ReflectDiffering():
                return diffs.reflect_differing(tx, msg.store)
        raise LedgerError(f"unknown ledger request {type(msg).__name__}")
