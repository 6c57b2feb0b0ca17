"""The ledger's SQLite file: schema, migrations, and every statement goqd runs on it.

Everything here is synchronous and runs on the ledger actor's one worker thread, inside
one transaction per batch (``Ledger.apply_batch``). Nothing else opens the file for
writing. The rules it enforces are DESIGN.md §4:

* an order line is ``(store, order_id, line_id)``; its ``booked_qty`` moves to the
  observed target (``qty`` live, ``0`` cancelled) and total stock moves by the
  difference, so duplicates are no-ops and edits/cancellations are corrections;
* an observation older (by the mall's update time) than the booked one changes
  nothing; a terminal cancellation is never undone;
* the store cursor commits with its lines;
* every change of a SKU's total writes, in the same transaction, one outbox row per
  linked listing (newer versions overwrite unpushed older ones);
* lines for unknown, unlinked or ambiguous listings are parked, then booked on link.

It must never replace or truncate an existing file it cannot read: a corrupt ledger or
one from a newer schema raises and the daemon refuses to start.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import msgspec

from goqd import messages as m
from goqd.crashpoints import crashpoint
from goqd.errors import (
    GoqdError,
    LedgerCorrupt,
    LedgerError,
    LedgerTooNew,
    UnknownSku,
)
from goqd.linking import Rule, fold, normalize

SCHEMA_VERSION = 3
APPLICATION_ID = 0x676F7164  # "goqd": marks the file as ours
MAX_LINE_QUANTITY = 100_000  # a line above this is a data error, not an order
MULTIPLE_LINKS = "multiple_links"  # 複数の商品が紐づいています
REJECT_RETRY_S = 300.0  # a listing the mall refused is retried after this, or on change
WAL_AUTOCHECKPOINT_PAGES = 10_000
# A base-store sale counts as "before the import" only if the mall's time for it is this
# much older than the product's creation: mall clocks have whole seconds and skew, and
# booking a sale twice undersells, while missing one oversells.
BEFORE_IMPORT_MARGIN_S = 300.0
# The sale watch reads first the listings of products sold within this many of the
# latest movements (and any holding units).
WATCH_RECENT_MOVES = 5000
WATCH_SCAN = 2000  # listings the watch's rotation looks at per round, at most
STALE_RETRY_S = 2.0  # a stale compare-and-set is retried after the store's next poll

Synchronous = Literal["full", "normal", "extra", "off"]
Now = Callable[[], float]

_MIGRATIONS: list[str] = [
    # version 1
    """
    CREATE TABLE products (
        sku TEXT PRIMARY KEY,
        name TEXT NOT NULL DEFAULT '',
        total INTEGER NOT NULL,
        first_store TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE listings (
        store TEXT NOT NULL,
        listing_key TEXT NOT NULL,
        link_code TEXT NOT NULL DEFAULT '',
        name TEXT NOT NULL DEFAULT '',
        sku TEXT,
        link_state TEXT NOT NULL DEFAULT 'unlinked'
            CHECK (link_state IN ('linked', 'unlinked', 'ambiguous')),
        attrs BLOB,
        last_pushed_qty INTEGER,
        last_pushed_version INTEGER,
        last_seen_qty INTEGER,
        PRIMARY KEY (store, listing_key)
    ) WITHOUT ROWID;
    CREATE INDEX listings_by_sku ON listings (sku) WHERE sku IS NOT NULL;
    CREATE INDEX listings_by_code ON listings (store, link_code);
    CREATE TABLE order_lines (
        store TEXT NOT NULL,
        order_id TEXT NOT NULL,
        line_id TEXT NOT NULL,
        listing_key TEXT NOT NULL,
        sku TEXT NOT NULL,
        booked_qty INTEGER NOT NULL,
        mall_updated_at REAL NOT NULL,
        terminal INTEGER NOT NULL DEFAULT 0,
        status TEXT NOT NULL DEFAULT '',
        first_seen REAL NOT NULL,
        PRIMARY KEY (store, order_id, line_id)
    ) WITHOUT ROWID;
    CREATE TABLE movements (
        id INTEGER PRIMARY KEY,
        sku TEXT NOT NULL,
        delta INTEGER NOT NULL,
        total_after INTEGER NOT NULL,
        cause TEXT NOT NULL,
        store TEXT NOT NULL DEFAULT '',
        order_id TEXT NOT NULL DEFAULT '',
        line_id TEXT NOT NULL DEFAULT '',
        reason TEXT NOT NULL DEFAULT '',
        oversold INTEGER NOT NULL DEFAULT 0,
        at REAL NOT NULL
    );
    CREATE INDEX movements_by_sku ON movements (sku, id);
    CREATE TABLE outbox (
        store TEXT NOT NULL,
        listing_key TEXT NOT NULL,
        sku TEXT NOT NULL,
        quantity INTEGER NOT NULL,
        version INTEGER NOT NULL,
        not_before REAL NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (store, listing_key)
    ) WITHOUT ROWID;
    CREATE INDEX outbox_by_store ON outbox (store, version);
    CREATE TABLE parked_lines (
        store TEXT NOT NULL,
        order_id TEXT NOT NULL,
        line_id TEXT NOT NULL,
        listing_key TEXT NOT NULL,
        line BLOB NOT NULL,
        reason TEXT NOT NULL,
        parked_at REAL NOT NULL,
        PRIMARY KEY (store, order_id, line_id)
    ) WITHOUT ROWID;
    CREATE INDEX parked_by_listing ON parked_lines (store, listing_key);
    CREATE TABLE errors (
        id INTEGER PRIMARY KEY,
        store TEXT NOT NULL,
        level INTEGER NOT NULL,
        code TEXT NOT NULL,
        message TEXT NOT NULL,
        listing_key TEXT NOT NULL DEFAULT '',
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL,
        count INTEGER NOT NULL DEFAULT 1,
        cleared_at REAL
    );
    CREATE UNIQUE INDEX errors_open ON errors (store, code, listing_key)
        WHERE cleared_at IS NULL;
    CREATE TABLE cursors (
        store TEXT PRIMARY KEY,
        cursor TEXT,
        updated_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE requests (
        request_id TEXT PRIMARY KEY,
        reply BLOB NOT NULL,
        at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO meta VALUES ('version', 0), ('oversold_units', 0), ('duplicates', 0);
    """,
    # version 2: products findable by their folded code (link conditions, goqd.linking)
    """
    ALTER TABLE products ADD COLUMN code_fold TEXT NOT NULL DEFAULT '';
    UPDATE products SET code_fold = goqd_fold(sku);
    CREATE INDEX products_by_fold ON products (code_fold);
    """,
    # version 3: the sale watch (DESIGN §4). ``held``: units held back from every store
    # because a mall's own counter fell without an order goqd has booked; a product's
    # pushed count is max(0, total - held). ``watch_qty``: what goqd expects that
    # mall's counter to show; ``watch_at``: when a push or a booking last moved it.
    # ``outbox.sent_min``: the lowest count handed to the store for this listing and not
    # yet acknowledged (it may have landed; a counter there is no sign of a sale).
    """
    ALTER TABLE products ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE listings ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE listings ADD COLUMN held_since REAL;
    ALTER TABLE listings ADD COLUMN watch_qty INTEGER;
    ALTER TABLE listings ADD COLUMN watch_at REAL NOT NULL DEFAULT 0;
    ALTER TABLE movements ADD COLUMN held_after INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE outbox ADD COLUMN sent_min INTEGER;
    CREATE INDEX listings_holding ON listings (store) WHERE held > 0;
    """,
]

_attrs_encoder = msgspec.msgpack.Encoder()
_attrs_decoder = msgspec.msgpack.Decoder(m.ListingAttrs)
_line_decoder = msgspec.msgpack.Decoder(m.OrderLine)
_reply_decoder: msgspec.msgpack.Decoder[m.LedgerReply] = msgspec.msgpack.Decoder(m.LedgerReply)
_EMPTY_ATTRS = m.ListingAttrs()


def _encode_attrs(attrs: m.ListingAttrs) -> bytes:
    return _attrs_encoder.encode(attrs)


def _decode_attrs(blob: bytes | None) -> m.ListingAttrs:
    return _attrs_decoder.decode(blob) if blob else _EMPTY_ATTRS


def open_db(
    path: str, *, synchronous: Synchronous = "full", check: bool = True
) -> sqlite3.Connection:
    """Open (or create) the ledger at ``path`` and bring its schema up to date.

    Raises ``LedgerCorrupt`` for a file that is not a readable goqd ledger and
    ``LedgerTooNew`` for a newer schema. An existing file is never recreated.
    """
    exists = path != ":memory:" and os.path.exists(path) and os.path.getsize(path) > 0
    if exists:
        try:
            with open(path, "rb") as f:
                header = f.read(16)
        except OSError as exc:
            raise LedgerCorrupt(f"{path}: cannot read the ledger: {exc.strerror}") from exc
        if header != b"SQLite format 3\x00":
            raise LedgerCorrupt(f"{path}: not an SQLite database; refusing to touch it")
    try:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction a batch.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise LedgerCorrupt(f"{path}: cannot open the ledger: {exc}") from exc
    try:
        _configure(conn, path, synchronous, exists=exists, check=check)
    except BaseException:
        conn.close()
        raise
    return conn


def _configure(
    conn: sqlite3.Connection, path: str, synchronous: Synchronous, *, exists: bool, check: bool
) -> None:
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise LedgerCorrupt(f"{path}: unreadable ledger: {exc}") from exc
    if exists and tables and app_id != APPLICATION_ID:
        raise LedgerCorrupt(f"{path}: an SQLite file, but not a goqd ledger; refusing to touch it")
    if version > SCHEMA_VERSION:
        raise LedgerTooNew(
            f"{path}: written by a newer goqd (schema {version}; this goqd knows up to "
            f"{SCHEMA_VERSION}); upgrade goqd or restore a backup"
        )
    if check and exists:
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:  # a torn b-tree page raises instead
            raise LedgerCorrupt(f"{path}: integrity check failed: {exc}") from exc
        if result != "ok":
            raise LedgerCorrupt(f"{path}: integrity check failed: {result}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("PRAGMA cache_size=-65536")  # 64 MiB page cache
    # Checkpoint every 10,000 pages (~40 MiB of WAL), not SQLite's 1,000: each checkpoint
    # is a burst of random writes and fsyncs on the booking path. Measured with
    # `goqd bench ledger`: ~8k -> ~10k lines/s. The WAL is truncated back to 64 MiB after.
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    conn.execute("PRAGMA journal_size_limit=67108864")
    conn.create_function("goqd_fold", 1, fold, deterministic=True)
    for target in range(version + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split_sql(_MIGRATIONS[target - 1]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={target}")
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


@dataclass
class BatchResult:
    """What one transaction did: a reply (or refusal) per message, stores to wake."""

    replies: list[m.LedgerReply | GoqdError]
    woken: set[str] = field(default_factory=set)
    lines: int = 0
    oversold: int = 0


class Ledger:
    """The ledger's operations over one connection. Not thread-safe: one caller."""

    def __init__(self, conn: sqlite3.Connection, *, now: Now) -> None:
        self.conn = conn
        self.now = now
        self._version = self._meta("version")
        # Most of the time nothing is parked; skip the per-line parked lookup then.
        self._parked_stores = {
            r[0] for r in conn.execute("SELECT DISTINCT store FROM parked_lines")
        }
        self._dirty: set[str] = set()
        self._woken: set[str] = set()
        self._batch_oversold = 0
        self._batch_lines = 0

    # ---------------------------------------------------------------- batch machinery

    def apply_batch(self, msgs: Sequence[m.LedgerRequest]) -> BatchResult:
        """Apply every message in one transaction; one reply or refusal per message.

        A refusal (a ``GoqdError``) rolls back that message only (a savepoint each), so
        one bad request never costs the others. Anything else aborts the transaction.
        """
        replies: list[m.LedgerReply | GoqdError] = []
        self._woken = set()
        self._batch_oversold = 0
        self._batch_lines = 0
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for msg in msgs:
                conn.execute("SAVEPOINT msg")
                version_before = self._version
                oversold_before = self._batch_oversold
                try:
                    reply = self._apply(msg)
                    conn.execute("RELEASE msg")
                except GoqdError as exc:
                    conn.execute("ROLLBACK TO msg")
                    conn.execute("RELEASE msg")
                    # Keep ``_dirty``: flushing a SKU whose change was rolled back just
                    # queues its (correct) current count once more.
                    self._version = version_before
                    self._batch_oversold = oversold_before
                    replies.append(exc)
                    continue
                replies.append(reply)
            self._flush_dirty()
            self._set_meta("version", self._version)
            crashpoint("ledger.in_transaction")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._version = self._meta("version")
            self._dirty.clear()
            raise
        crashpoint("ledger.after_commit")
        return BatchResult(replies, self._woken, self._batch_lines, self._batch_oversold)

    def _apply(self, msg: m.LedgerRequest) -> m.LedgerReply:
        match msg:
            case m.OrderLinesSeen():
                return self.book_lines(msg)
            case m.GetCursor():
                return m.Cursor(store=msg.store, cursor=self.cursor(msg.store))
            case m.TakePushes():
                return self.take_pushes(msg.store, msg.limit, peek=msg.peek)
            case m.PushesDone():
                return self.pushes_done(msg)
            case m.GetWatchList():
                return self.watch_list(msg)
            case m.StockSeen():
                return self.stock_seen(msg)
            case m.Ping():
                self.conn.execute("SELECT 1").fetchone()
                return m.Pong()
            case m.GetHistory():
                return self.history(msg.sku, msg.limit)
            case m.ListErrors():
                return self.list_errors(msg)
            case m.ListProducts():
                return self.list_products(msg)
            case m.ListListings():
                return self.list_listings(msg)
            case m.GetLedgerStatus():
                return self.status()
            case m.GetStoreStats():
                return self.store_stats()
            case m.RecordError():
                return self.record_error(msg)
            case m.ImportListings():
                return self.import_listings(msg)
            case m.AutoLink():
                return self.auto_link(msg.store, msg.rules)
            case _:
                return self._idempotent(msg)

    def _idempotent(self, msg: m.LedgerRequest) -> m.LedgerReply:
        """Operator requests: the same ``request_id`` twice is applied once, same reply."""
        request_id = cast(str, getattr(msg, "request_id", ""))
        if request_id:
            row = self.conn.execute(
                "SELECT reply FROM requests WHERE request_id = ?", (request_id,)
            ).fetchone()
            if row is not None:
                return _reply_decoder.decode(row[0])
        reply = self._operator(msg)
        if request_id:
            self.conn.execute(
                "INSERT INTO requests VALUES (?, ?, ?)",
                (request_id, msgspec.msgpack.encode(reply), self.now()),
            )
        return reply

    def _operator(self, msg: m.LedgerRequest) -> m.LedgerReply:
        match msg:
            case m.SetStock():
                return self.set_stock(msg.sku, msg.quantity, msg.reason)
            case m.AdjustStock():
                return self.adjust_stock(msg.sku, msg.delta, msg.reason)
            case m.UpsertProduct():
                return self.upsert_product(msg)
            case m.UpsertListing():
                return self.upsert_listing(msg)
            case m.SetListingAttrs():
                return self.set_listing_attrs(msg)
            case m.Link():
                return self.link(msg.store, msg.listing_key, msg.sku)
            case m.Unlink():
                return self.unlink(msg.store, msg.listing_key)
            case m.DeleteProduct():
                return self.delete_product(msg.sku)
            case m.ClearErrors():
                return self.clear_errors(msg)
            case m.QueuePushes():
                return self.queue_pushes(msg.store, msg.listing_keys, strict=msg.strict)
            case m.SetStocks():
                return self.set_stocks(msg)
        raise LedgerError(f"unknown ledger request {type(msg).__name__}")

    # ---------------------------------------------------------------- meta, cursor

    def _meta(self, key: str) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self.conn.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))

    def _bump_meta(self, key: str, by: int) -> None:
        if by:
            self.conn.execute("UPDATE meta SET value = value + ? WHERE key = ?", (by, key))

    def cursor(self, store: str) -> str | None:
        row = self.conn.execute("SELECT cursor FROM cursors WHERE store = ?", (store,)).fetchone()
        return cast(str | None, row[0]) if row else None

    # ---------------------------------------------------------------- booking

    def book_lines(self, msg: m.OrderLinesSeen) -> m.OrderLinesBooked:
        store = msg.store
        bad_orders = {
            line.order_id: line
            for line in msg.lines
            if line.quantity < 0
            or line.quantity > MAX_LINE_QUANTITY
            or (line.quantity == 0 and not line.cancelled)
        }
        rejected: list[m.RejectedLine] = []
        for order_id, line in bad_orders.items():
            reason = (
                f"order {order_id} line {line.line_id}: quantity {line.quantity} is not a "
                f"plausible order quantity (1..{MAX_LINE_QUANTITY}); the order was not booked"
            )
            rejected.append(m.RejectedLine(order_id=order_id, line_id=line.line_id, reason=reason))
            self.record_error(
                m.RecordError(
                    store=store,
                    level=8,
                    code="bad_order_line",
                    message=reason,
                    listing_key=line.listing_key,
                )
            )
        counts = {"booked": 0, "duplicates": 0, "stale": 0, "parked": 0, "before_import": 0}
        oversold_before = self._batch_oversold
        for line in msg.lines:
            if line.order_id in bad_orders:
                continue
            outcome = self._book_one(store, line)
            counts[outcome] += 1
        self._batch_lines += len(msg.lines)
        self._bump_meta("duplicates", counts["duplicates"])
        if msg.cursor is not None:
            self.conn.execute(
                "INSERT INTO cursors VALUES (?, ?, ?) ON CONFLICT(store) DO UPDATE "
                "SET cursor = excluded.cursor, updated_at = excluded.updated_at",
                (store, msg.cursor, self.now()),
            )
        return m.OrderLinesBooked(
            booked=counts["booked"],
            duplicates=counts["duplicates"],
            stale=counts["stale"],
            parked=counts["parked"],
            before_import=counts["before_import"],
            rejected=tuple(rejected),
            oversold_units=self._batch_oversold - oversold_before,
        )

    def _book_one(self, store: str, line: m.OrderLine) -> str:
        conn = self.conn
        row = conn.execute(
            "SELECT sku, booked_qty, mall_updated_at, terminal, status FROM order_lines "
            "WHERE store = ? AND order_id = ? AND line_id = ?",
            (store, line.order_id, line.line_id),
        ).fetchone()
        target = 0 if line.cancelled else line.quantity
        if row is not None:
            sku, booked, seen_at, terminal, status = row
            if terminal or line.updated_at < seen_at:
                # A terminal cancellation is final; an older copy says nothing new.
                return "duplicates" if terminal and line.cancelled else "stale"
            delta = target - booked
            if delta == 0:
                if line.updated_at != seen_at or line.status != status or line.terminal:
                    conn.execute(
                        "UPDATE order_lines SET mall_updated_at = ?, status = ?, terminal = ? "
                        "WHERE store = ? AND order_id = ? AND line_id = ?",
                        (
                            line.updated_at,
                            line.status,
                            int(line.terminal),
                            store,
                            line.order_id,
                            line.line_id,
                        ),
                    )
                return "duplicates"
            conn.execute(
                "UPDATE order_lines SET booked_qty = ?, mall_updated_at = ?, status = ?, "
                "terminal = ? WHERE store = ? AND order_id = ? AND line_id = ?",
                (
                    target,
                    line.updated_at,
                    line.status,
                    int(line.terminal),
                    store,
                    line.order_id,
                    line.line_id,
                ),
            )
            cause = "cancel" if target == 0 else "correction"
            if delta > 0:
                watch = conn.execute(
                    "SELECT held, watch_qty FROM listings WHERE store = ? AND listing_key = ?",
                    (store, line.listing_key),
                ).fetchone()
                if watch is not None:
                    self._sale_booked(store, line.listing_key, sku, delta, *watch)
            self._move(
                sku, -delta, cause, store=store, order_id=line.order_id, line_id=line.line_id
            )
            return "booked"
        parked = (
            conn.execute(
                "SELECT line FROM parked_lines WHERE store = ? AND order_id = ? AND line_id = ?",
                (store, line.order_id, line.line_id),
            ).fetchone()
            if store in self._parked_stores
            else None
        )
        if parked is not None:
            old = _line_decoder.decode(parked[0])
            if line.updated_at >= old.updated_at and not old.terminal:
                conn.execute(
                    "UPDATE parked_lines SET line = ? WHERE store = ? AND order_id = ? "
                    "AND line_id = ?",
                    (msgspec.msgpack.encode(line), store, line.order_id, line.line_id),
                )
            return "parked"
        listing = conn.execute(
            "SELECT l.sku, l.link_state, p.created_at, p.first_store, l.held, l.watch_qty "
            "FROM listings l LEFT JOIN products p ON p.sku = l.sku "
            "WHERE l.store = ? AND l.listing_key = ?",
            (store, line.listing_key),
        ).fetchone()
        if listing is None or listing[1] != "linked":
            if listing is None:
                # Register it so the operator sees it in `goqctl listings` and can link it.
                conn.execute(
                    "INSERT INTO listings (store, listing_key, link_code, name) "
                    "VALUES (?, ?, ?, ?)",
                    (store, line.listing_key, line.link_code, ""),
                )
            reason = "unknown_listing" if listing is None else f"{listing[1]}_listing"
            self._parked_stores.add(store)
            conn.execute(
                "INSERT INTO parked_lines VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    store,
                    line.order_id,
                    line.line_id,
                    line.listing_key,
                    msgspec.msgpack.encode(line),
                    reason,
                    self.now(),
                ),
            )
            return "parked"
        sku = listing[0]
        conn.execute(
            "INSERT INTO order_lines VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                store,
                line.order_id,
                line.line_id,
                line.listing_key,
                sku,
                target,
                line.updated_at,
                int(line.terminal),
                line.status,
                self.now(),
            ),
        )
        if target == 0:
            return "booked"  # first seen cancelled: recorded, books nothing
        if line.updated_at < listing[2] - BEFORE_IMPORT_MARGIN_S and store == listing[3]:
            # A sale in the store the product was imported from, older than the import:
            # the imported count already reflects it (a first poll looks back a day).
            # Record the line so later changes (a cancel) correct it, but do not take the
            # units off a second time. Older sales in *other* stores are booked: nothing
            # says the imported count knew them, and booking errs on the side of not
            # overselling.
            return "before_import"
        self._sale_booked(store, line.listing_key, sku, target, listing[4], listing[5])
        self._move(sku, -target, "order", store=store, order_id=line.order_id, line_id=line.line_id)
        return "booked"

    def _move(
        self,
        sku: str,
        delta: int,
        cause: str,
        *,
        store: str = "",
        order_id: str = "",
        line_id: str = "",
        reason: str = "",
    ) -> tuple[int, int]:
        """Change a SKU's total by ``delta``, record the movement, queue the pushes."""
        row = self.conn.execute(
            "UPDATE products SET total = total + ? WHERE sku = ? RETURNING total, held",
            (delta, sku),
        ).fetchone()
        if row is None:
            raise UnknownSku(f"unknown SKU {sku!r}")
        after = int(row[0])
        held = int(row[1])
        before = after - delta
        oversold = 0
        if cause in ("order", "correction") and delta < 0:
            oversold = max(0, -after) - max(0, -before)
        if oversold:
            self._batch_oversold += oversold
            self._bump_meta("oversold_units", oversold)
        cur = self.conn.execute(
            "INSERT INTO movements (sku, delta, total_after, cause, store, order_id, line_id, "
            "reason, oversold, at, held_after) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                sku,
                delta,
                after,
                cause,
                store,
                order_id,
                line_id,
                reason,
                oversold,
                self.now(),
                held,
            ),
        )
        self._dirty.add(sku)
        return after, int(cur.lastrowid or 0)

    def _flush_dirty(self) -> None:
        """Write one outbox row per linked listing of every SKU changed in this batch.

        Once per transaction, in one statement: a burst of orders for one SKU costs one
        row per listing, and every row written by one batch shares one version (a
        listing gets at most one row per batch, so versions still only grow per listing).
        """
        if not self._dirty:
            return
        self._version += 1
        rows = self.conn.execute(
            "INSERT INTO outbox (store, listing_key, sku, quantity, version, not_before, "
            "attempts) SELECT l.store, l.listing_key, l.sku, max(0, p.total - p.held), ?, 0, 0 "
            "FROM json_each(?) j JOIN listings l ON l.sku = j.value "
            "JOIN products p ON p.sku = l.sku WHERE l.link_state = 'linked' "
            "ON CONFLICT (store, listing_key) DO UPDATE SET quantity = excluded.quantity, "
            "version = excluded.version, sku = excluded.sku, not_before = 0, attempts = 0 "
            "RETURNING store",
            (self._version, msgspec.json.encode(sorted(self._dirty)).decode()),
        ).fetchall()
        self._woken.update(r[0] for r in rows)
        self._dirty.clear()

    def _queue_listing(self, store: str, listing_key: str) -> None:
        """Queue a push of the current total to one listing (after link / attr change)."""
        self._version += 1
        rows = self.conn.execute(
            "INSERT INTO outbox (store, listing_key, sku, quantity, version, not_before, attempts) "
            "SELECT l.store, l.listing_key, l.sku, max(0, p.total - p.held), ?, 0, 0 "
            "FROM listings l JOIN products p ON p.sku = l.sku "
            "WHERE l.store = ? AND l.listing_key = ? AND l.link_state = 'linked' "
            "ON CONFLICT (store, listing_key) DO UPDATE SET quantity = excluded.quantity, "
            "version = excluded.version, sku = excluded.sku, not_before = 0, attempts = 0 "
            "RETURNING store",
            (self._version, store, listing_key),
        ).fetchall()
        self._woken.update(r[0] for r in rows)

    # ---------------------------------------------------------------- outbox

    def take_pushes(self, store: str, limit: int, *, peek: bool = False) -> m.PushBatch:
        rows = self.conn.execute(
            "SELECT o.listing_key, o.sku, o.quantity, o.version, l.attrs, l.last_pushed_qty "
            "FROM outbox o JOIN listings l ON l.store = o.store AND l.listing_key = o.listing_key "
            "WHERE o.store = ? AND o.not_before <= ? ORDER BY o.version LIMIT ?",
            (store, self.now(), limit),
        ).fetchall()
        pending = self.conn.execute(
            "SELECT count(*) FROM outbox WHERE store = ?", (store,)
        ).fetchone()[0]
        if rows and not peek:
            self.conn.execute(
                "UPDATE outbox SET sent_min = min(coalesce(sent_min, quantity), quantity) "
                "WHERE store = ? AND listing_key IN (SELECT value FROM json_each(?))",
                (store, msgspec.json.encode([r[0] for r in rows]).decode()),
            )
        items = tuple(
            m.PushItem(
                listing_key=key,
                sku=sku,
                quantity=qty,
                version=version,
                attrs=_decode_attrs(attrs),
                previous_quantity=last,
            )
            for key, sku, qty, version, attrs, last in rows
        )
        return m.PushBatch(store=store, items=items, pending=int(pending))

    def pushes_done(self, msg: m.PushesDone) -> m.Done:
        conn = self.conn
        changed = 0
        now = self.now()
        for out in msg.outcomes:
            if out.accepted:
                cur = conn.execute(
                    "DELETE FROM outbox WHERE store = ? AND listing_key = ? AND version = ?",
                    (msg.store, out.listing_key, out.version),
                )
                changed += cur.rowcount
                conn.execute(
                    "UPDATE listings SET last_pushed_qty = coalesce(?, last_pushed_qty), "
                    # Only listings the watch reads keep an expectation.
                    "last_pushed_version = ?, watch_qty = CASE WHEN watch_qty IS NULL "
                    "THEN NULL ELSE coalesce(?, watch_qty) END, "
                    "watch_at = ? WHERE store = ? AND listing_key = ? "
                    "AND (last_pushed_version IS NULL OR last_pushed_version < ?)",
                    (
                        out.quantity,
                        out.version,
                        out.quantity,
                        now,
                        msg.store,
                        out.listing_key,
                        out.version,
                    ),
                )
            elif out.code == m.STALE:
                # Not an error: retry soon, comparing against what the mall now shows.
                conn.execute(
                    "UPDATE outbox SET not_before = ?, attempts = attempts + 1 "
                    "WHERE store = ? AND listing_key = ? AND version = ?",
                    (now + STALE_RETRY_S, msg.store, out.listing_key, out.version),
                )
                conn.execute(
                    "UPDATE listings SET last_pushed_qty = ?, last_seen_qty = ?, "
                    "watch_qty = CASE WHEN watch_qty IS NULL THEN NULL "
                    "ELSE coalesce(?, watch_qty) END, watch_at = ? "
                    "WHERE store = ? AND listing_key = ?",
                    (out.quantity, out.quantity, out.quantity, now, msg.store, out.listing_key),
                )
            else:
                conn.execute(
                    "UPDATE outbox SET not_before = ?, attempts = attempts + 1 "
                    "WHERE store = ? AND listing_key = ? AND version = ?",
                    (now + REJECT_RETRY_S, msg.store, out.listing_key, out.version),
                )
                self.record_error(
                    m.RecordError(
                        store=msg.store,
                        level=8,
                        code=out.code or "listing_rejected",
                        message=out.message or "the mall refused this listing's stock update",
                        listing_key=out.listing_key,
                    )
                )
        return m.Done(changed=changed)

    # ---------------------------------------------------------------- sale watch

    def watch_list(self, msg: m.GetWatchList) -> m.WatchList:
        """Listings of a store worth reading: every one holding units; then, for half
        of what is left, those of products among the last ``WATCH_RECENT_MOVES``
        movements' sales, the most recently sold first (what sold lately sells again,
        and a mall's read budget should go where the sales are); then the store's
        listings with at most ``below`` units in key order from ``after``, so each of
        those is read in its turn.

        Products at 0 (after holds) are skipped: the mall shows 0 and cannot sell them.
        The recent sales are a rowid range of ``movements`` and the rotation looks at
        most ``WATCH_SCAN`` listings a round: at 500,000 products a round costs about
        what its answer costs, and booking pays nothing for it.
        """
        # INDEXED BY: without statistics SQLite prefers the primary key's store prefix,
        # a scan of every listing of the store (50,000 at Next Engine's size) to find none.
        held = [
            r[0]
            for r in self.conn.execute(
                "SELECT listing_key FROM listings INDEXED BY listings_holding "
                "WHERE store = ? AND held > 0 LIMIT ?",
                (msg.store, msg.limit),
            )
        ]
        chosen = dict.fromkeys(held)
        self._recent_sellers(msg.store, (msg.limit - len(held) + 1) // 2, chosen)
        window = self.conn.execute(
            "SELECT x.listing_key, p.total - p.held, p.total FROM (SELECT listing_key, sku "
            "FROM listings WHERE store = ? AND listing_key > ? AND link_state = 'linked' "
            "ORDER BY listing_key LIMIT ?) x JOIN products p ON p.sku = x.sku "
            "ORDER BY x.listing_key",
            (msg.store, msg.after, WATCH_SCAN),
        ).fetchall()
        next_after = window[-1][0] if len(window) == WATCH_SCAN else ""
        last = msg.after
        for key, shown, total in window:
            if len(chosen) >= msg.limit:
                next_after = last  # the round is full: go on from here next time
                break
            if shown > 0 and total <= msg.below:
                chosen.setdefault(key)
            last = key
        return m.WatchList(store=msg.store, listing_keys=tuple(chosen), next_after=next_after)

    def _recent_sellers(self, store: str, want: int, chosen: dict[str, None]) -> None:
        """Add to ``chosen`` up to ``want`` of ``store``'s listings whose products the
        latest ``WATCH_RECENT_MOVES`` movements sold, the most recently sold first.

        Walks the movements newest first (by rowid, no sort) and stops when it has
        enough, so a round costs about what it returns. A GROUP BY over the whole range
        took ~20 ms whatever was asked, at 500,000 products during a burst, with 50
        stores asking ten times a second between them; this stops after ~5 ms for 50.
        """
        if want <= 0:
            return
        top = self.conn.execute("SELECT coalesce(max(id), 0) FROM movements").fetchone()[0]
        found = 0
        for (key,) in self.conn.execute(
            "SELECT l.listing_key FROM movements mv "
            "CROSS JOIN listings l ON l.sku = mv.sku AND l.store = ? "
            "JOIN products p ON p.sku = mv.sku "
            "WHERE mv.id > ? AND mv.cause IN ('order', 'correction', 'hold') "
            "AND l.link_state = 'linked' AND l.held = 0 AND p.total - p.held > 0 "
            "ORDER BY mv.id DESC",
            (store, top - WATCH_RECENT_MOVES),
        ):
            if key not in chosen:
                chosen[key] = None
                found += 1
                if found >= want:
                    return

    def stock_seen(self, msg: m.StockSeen) -> m.Done:
        """Compare the mall's counters with what goqd expects them to show.

        A counter below the expectation lost units to sales goqd has not booked: hold
        them back (every store is pushed ``total - held``); one above it gave units
        back (a cancellation at the mall) and releases what it can. A listing that a
        push or a booking moved after the read began is skipped: the reading predates
        it. A hold that a later poll did not explain with an order, or older than
        ``hold_expiry``, is released and reported: the counter fell for another reason
        (an edit at the mall, an increase the mall acknowledged but did not apply).
        """
        conn = self.conn
        now = self.now()
        changed = 0
        for seen in msg.counts:
            row = conn.execute(
                "SELECT l.sku, l.link_state, l.held, l.last_pushed_qty, "
                "l.watch_at, o.sent_min, o.version IS NOT NULL, l.watch_qty "
                "FROM listings l LEFT JOIN outbox o ON o.store = l.store "
                "AND o.listing_key = l.listing_key WHERE l.store = ? AND l.listing_key = ?",
                (msg.store, seen.listing_key),
            ).fetchone()
            if row is None or row[1] != "linked" or row[4] > msg.read_started:
                continue
            # Expected: the last reading as bookings and pushes moved it since. A listing
            # read for the first time is expected at the last count the mall accepted,
            # unless a push is queued for it: then a booking came after that count
            # (and is not in it), so this reading is only the starting point.
            sku, _, held, pushed, _, sent, queued, last_seen = row
            expected = last_seen if last_seen is not None else None if queued else pushed
            if expected is not None and sent is not None:
                # A push sent but not acknowledged may have landed (a timeout after the
                # mall applied it, a crash mid-push): a counter at or above that count is
                # no sign of a sale. Missing a sale here is safe; inventing one is not.
                # (A row still unsent cannot have landed: it does not count.)
                expected = min(expected, sent)
            new_held = held
            if expected is not None:
                new_held = max(0, held + expected - seen.quantity)
                if seen.quantity - expected > held and not queued:
                    # More than goqd wants shown and no hold explains it (a lost or
                    # late write, an edit at the mall): push goqd's count again.
                    self._queue_listing(msg.store, seen.listing_key)
            if seen.quantity == last_seen and new_held == held:
                continue  # the usual case: nothing moved, nothing to write
            conn.execute(
                "UPDATE listings SET watch_qty = ?, held = ?, held_since = CASE "
                "WHEN ? = 0 THEN NULL ELSE coalesce(held_since, ?) END "
                "WHERE store = ? AND listing_key = ?",
                (seen.quantity, new_held, new_held, now, msg.store, seen.listing_key),
            )
            if new_held != held:
                conn.execute(
                    "UPDATE products SET held = held + ? WHERE sku = ?", (new_held - held, sku)
                )
                verb = "fell" if new_held > held else "rose"
                self._move(
                    sku,
                    0,
                    "hold",
                    store=msg.store,
                    reason=f"{seen.listing_key}: the mall's count {verb} to {seen.quantity} "
                    f"without a booked order; {new_held} held",
                )
                changed += 1
        expired = conn.execute(
            "SELECT listing_key, held FROM listings INDEXED BY listings_holding "
            "WHERE store = ? AND held > 0 "
            "AND held_since < ?",
            (msg.store, max(now - msg.hold_expiry, msg.explained_before)),
        ).fetchall()
        for key, held in expired:
            self._release_hold(msg.store, key)
            changed += 1
            self.record_error(
                m.RecordError(
                    store=msg.store,
                    level=8,
                    code="count_fell_without_order",
                    message=(
                        f"listing {key}: the mall's count fell by {held} but no order "
                        "explains it (edited at the mall, or an update the mall did not "
                        "apply); goqd's count is pushed again"
                    ),
                    listing_key=key,
                )
            )
        return m.Done(changed=changed)

    def _sale_booked(
        self, store: str, listing_key: str, sku: str, sold: int, held: int, expected: int | None
    ) -> None:
        """A booked sale explains held units of its listing first; the rest is a sale
        the watch has not seen yet, so its expected counter drops with it. (A listing the
        watch never read has no expectation to move: see ``stock_seen``.) ``held`` and
        ``expected`` are the listing's ``held`` and ``watch_qty``, as the caller read them."""
        if held == 0 and expected is None:
            return  # the watch does not know this listing: nothing to write
        use = min(held, sold)
        self.conn.execute(
            "UPDATE listings SET held = ?, held_since = CASE WHEN ? = 0 THEN NULL "
            "ELSE held_since END, watch_qty = ?, watch_at = ? "
            "WHERE store = ? AND listing_key = ?",
            (
                held - use,
                held - use,
                None if expected is None else expected - (sold - use),
                self.now(),
                store,
                listing_key,
            ),
        )
        if use:
            self.conn.execute("UPDATE products SET held = held - ? WHERE sku = ?", (use, sku))

    def _release_hold(self, store: str, listing_key: str) -> None:
        row = self.conn.execute(
            "SELECT sku, held FROM listings WHERE store = ? AND listing_key = ?",
            (store, listing_key),
        ).fetchone()
        if row is None or not row[1]:
            return
        self.conn.execute(
            "UPDATE listings SET held = 0, held_since = NULL WHERE store = ? AND listing_key = ?",
            (store, listing_key),
        )
        self.conn.execute("UPDATE products SET held = held - ? WHERE sku = ?", (row[1], row[0]))
        self._move(row[0], 0, "hold", store=store, reason=f"{listing_key}: {row[1]} released")

    # ---------------------------------------------------------------- operator stock

    def _total(self, sku: str) -> int:
        row = self.conn.execute("SELECT total FROM products WHERE sku = ?", (sku,)).fetchone()
        if row is None:
            raise UnknownSku(f"unknown SKU {sku!r}: see `goqctl products`")
        return int(row[0])

    def set_stock(self, sku: str, quantity: int, reason: str) -> m.StockChanged:
        if quantity < 0:
            raise LedgerError(f"stock for {sku!r} cannot be set below 0 (got {quantity})")
        delta = quantity - self._total(sku)
        after, mid = self._move(sku, delta, "set", reason=reason)
        return m.StockChanged(sku=sku, total=after, delta=delta, movement_id=mid)

    def adjust_stock(self, sku: str, delta: int, reason: str) -> m.StockChanged:
        self._total(sku)
        after, mid = self._move(sku, delta, "adjust", reason=reason)
        return m.StockChanged(sku=sku, total=after, delta=delta, movement_id=mid)

    def history(self, sku: str, limit: int) -> m.History:
        total = self._total(sku)
        held = int(
            self.conn.execute("SELECT held FROM products WHERE sku = ?", (sku,)).fetchone()[0]
        )
        rows = self.conn.execute(
            "SELECT id, sku, delta, total_after, cause, store, order_id, line_id, reason, "
            "oversold, at, held_after FROM movements WHERE sku = ? ORDER BY id DESC LIMIT ?",
            (sku, limit),
        ).fetchall()
        movements = tuple(
            m.Movement(
                id=r[0],
                sku=r[1],
                delta=r[2],
                total_after=r[3],
                cause=r[4],
                store=r[5],
                order_id=r[6],
                line_id=r[7],
                reason=r[8],
                oversold=r[9],
                at=r[10],
                held_after=r[11],
            )
            for r in rows
        )
        return m.History(sku=sku, total=total, held=held, movements=movements)

    # ---------------------------------------------------------------- catalogue

    def upsert_product(self, msg: m.UpsertProduct) -> m.Done:
        row = self.conn.execute("SELECT name FROM products WHERE sku = ?", (msg.sku,)).fetchone()
        if row is not None:
            if msg.name and msg.name != row[0]:
                self.conn.execute("UPDATE products SET name = ? WHERE sku = ?", (msg.name, msg.sku))
                return m.Done(changed=1)
            return m.Done(changed=0)
        total = msg.total or 0
        if total < 0:
            raise LedgerError(f"initial stock for {msg.sku!r} cannot be negative")
        self.conn.execute(
            "INSERT INTO products (sku, name, total, first_store, created_at, code_fold) "
            "VALUES (?, ?, 0, ?, ?, ?)",
            (msg.sku, msg.name, msg.store, self.now(), fold(msg.sku)),
        )
        self._move(msg.sku, total, "import", store=msg.store)
        released = self._release_for_sku(msg.sku)
        return m.Done(changed=1, released=released)

    def upsert_listing(self, msg: m.UpsertListing) -> m.Done:
        conn = self.conn
        row = conn.execute(
            "SELECT sku, link_state, attrs FROM listings WHERE store = ? AND listing_key = ?",
            (msg.store, msg.listing_key),
        ).fetchone()
        attrs_blob = _encode_attrs(msg.attrs) if msg.attrs is not None else None
        if row is None:
            conn.execute(
                "INSERT INTO listings (store, listing_key, link_code, name, attrs, last_seen_qty) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    msg.store,
                    msg.listing_key,
                    msg.link_code,
                    msg.name,
                    attrs_blob,
                    msg.seen_quantity,
                ),
            )
        else:
            conn.execute(
                "UPDATE listings SET link_code = CASE WHEN ? = '' THEN link_code ELSE ? END, "
                "name = CASE WHEN ? = '' THEN name ELSE ? END, attrs = coalesce(?, attrs), "
                "last_seen_qty = coalesce(?, last_seen_qty) WHERE store = ? AND listing_key = ?",
                (
                    msg.link_code,
                    msg.link_code,
                    msg.name,
                    msg.name,
                    attrs_blob,
                    msg.seen_quantity,
                    msg.store,
                    msg.listing_key,
                ),
            )
        released = 0
        if msg.sku is not None and (row is None or row[0] != msg.sku):
            done = self.link(msg.store, msg.listing_key, msg.sku)
            released = done.released
        elif (
            row is not None
            and row[1] == "linked"
            and attrs_blob is not None
            and attrs_blob != row[2]
        ):
            # Mall attributes go out with the next push; queue one so they do.
            self._queue_listing(msg.store, msg.listing_key)
        return m.Done(changed=1, released=released)

    def set_listing_attrs(self, msg: m.SetListingAttrs) -> m.Done:
        row = self.conn.execute(
            "SELECT attrs FROM listings WHERE store = ? AND listing_key = ?",
            (msg.store, msg.listing_key),
        ).fetchone()
        if row is None:
            raise LedgerError(f"no listing {msg.listing_key!r} in store {msg.store!r}")
        attrs = _decode_attrs(row[0])
        changes: dict[str, Any] = {}
        if msg.allow_overdraft is not None:
            changes["allow_overdraft"] = msg.allow_overdraft
        if msg.lead_time_days is not None:
            if not 0 <= msg.lead_time_days <= 365:
                raise LedgerError("lead time must be between 0 and 365 days")
            changes["lead_time_days"] = msg.lead_time_days
        if msg.restock_date is not None:
            changes["restock_date"] = msg.restock_date or None
        new = msgspec.structs.replace(attrs, **changes)
        self.conn.execute(
            "UPDATE listings SET attrs = ? WHERE store = ? AND listing_key = ?",
            (_encode_attrs(new), msg.store, msg.listing_key),
        )
        self._queue_listing(msg.store, msg.listing_key)
        return m.Done(changed=1)

    def link(self, store: str, listing_key: str, sku: str) -> m.Done:
        conn = self.conn
        self._total(sku)
        row = conn.execute(
            "SELECT sku FROM listings WHERE store = ? AND listing_key = ?", (store, listing_key)
        ).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO listings (store, listing_key, link_code) VALUES (?, ?, ?)",
                (store, listing_key, sku),
            )
        old_sku = row[0] if row is not None else None
        conn.execute(
            "UPDATE listings SET sku = ?, link_state = 'linked' "
            "WHERE store = ? AND listing_key = ?",
            (sku, store, listing_key),
        )
        released = self._resolve_links(store, sku)
        if old_sku is not None and old_sku != sku:
            released += self._resolve_links(store, old_sku)
        return m.Done(changed=1, released=released)

    def unlink(self, store: str, listing_key: str) -> m.Done:
        row = self.conn.execute(
            "SELECT sku FROM listings WHERE store = ? AND listing_key = ?", (store, listing_key)
        ).fetchone()
        if row is None:
            raise LedgerError(f"no listing {listing_key!r} in store {store!r}")
        self._release_hold(store, listing_key)
        self.conn.execute(
            "UPDATE listings SET sku = NULL, link_state = 'unlinked', watch_qty = NULL "
            "WHERE store = ? AND listing_key = ?",
            (store, listing_key),
        )
        self.conn.execute(
            "DELETE FROM outbox WHERE store = ? AND listing_key = ?", (store, listing_key)
        )
        released = self._resolve_links(store, row[0]) if row[0] is not None else 0
        return m.Done(changed=1, released=released)

    def _resolve_links(self, store: str, sku: str) -> int:
        """Apply the one-listing-per-product-per-store rule for ``sku`` in ``store``.

        Several listings of one product in one store are ambiguous (複数の商品が紐づいて
        います): all of them are marked so, an error names them, and their orders park.
        When one remains, it is linked again, its error cleared, its parked lines booked
        and its count queued for a push.
        """
        conn = self.conn
        keys = [
            r[0]
            for r in conn.execute(
                "SELECT listing_key FROM listings WHERE store = ? AND sku = ? ORDER BY listing_key",
                (store, sku),
            )
        ]
        now = self.now()
        if len(keys) > 1:
            conn.execute(
                "UPDATE listings SET link_state = 'ambiguous' WHERE store = ? AND sku = ?",
                (store, sku),
            )
            conn.execute("DELETE FROM outbox WHERE store = ? AND sku = ?", (store, sku))
            for key in keys:
                self.record_error(
                    m.RecordError(
                        store=store,
                        level=8,
                        code=MULTIPLE_LINKS,
                        listing_key=key,
                        message=(
                            f"複数の商品が紐づいています: product {sku!r} has {len(keys)} listings "
                            f"in store {store!r} ({', '.join(keys)}); unlink the wrong ones with "
                            f"`goqctl unlink {store} LISTING`; orders for them are parked"
                        ),
                    )
                )
            return 0
        released = 0
        for key in keys:
            state = conn.execute(
                "SELECT link_state FROM listings WHERE store = ? AND listing_key = ?", (store, key)
            ).fetchone()[0]
            if state == "ambiguous":
                conn.execute(
                    "UPDATE listings SET link_state = 'linked' WHERE store = ? AND listing_key = ?",
                    (store, key),
                )
            conn.execute(
                "UPDATE errors SET cleared_at = ? WHERE store = ? AND code = ? AND "
                "listing_key = ? AND cleared_at IS NULL",
                (now, store, MULTIPLE_LINKS, key),
            )
            released += self._release_parked(store, key)
            self._queue_listing(store, key)
        # Listings that were ambiguous with this one but now point elsewhere.
        # Per open error row (few), a primary-key lookup: never a scan of the store's
        # listings, which made a 100,000-listing import quadratic.
        conn.execute(
            "UPDATE errors SET cleared_at = ? WHERE store = ? AND code = ? AND cleared_at IS NULL "
            "AND EXISTS (SELECT 1 FROM listings l WHERE l.store = errors.store "
            "AND l.listing_key = errors.listing_key "
            "AND (l.sku IS NULL OR l.link_state = 'linked'))",
            (now, store, MULTIPLE_LINKS),
        )
        return released

    def _release_parked(self, store: str, listing_key: str) -> int:
        rows = self.conn.execute(
            "SELECT line FROM parked_lines WHERE store = ? AND listing_key = ?",
            (store, listing_key),
        ).fetchall()
        if not rows:
            return 0
        self.conn.execute(
            "DELETE FROM parked_lines WHERE store = ? AND listing_key = ?", (store, listing_key)
        )
        for (blob,) in rows:
            self._book_one(store, _line_decoder.decode(blob))
        return len(rows)

    def _release_for_sku(self, sku: str) -> int:
        released = 0
        rows = self.conn.execute(
            "SELECT store, listing_key FROM listings WHERE sku = ? AND link_state = 'linked'",
            (sku,),
        ).fetchall()
        for store, key in rows:
            released += self._release_parked(store, key)
        return released

    def delete_product(self, sku: str) -> m.Done:
        """Stop syncing ``sku``: unlink its listings. Nothing is deleted at any mall."""
        self._total(sku)
        listings = self.conn.execute(
            "SELECT store, listing_key FROM listings WHERE sku = ?", (sku,)
        ).fetchall()
        for store, key in listings:
            self.unlink(store, key)
        self.conn.execute("DELETE FROM products WHERE sku = ?", (sku,))
        return m.Done(
            changed=1 + len(listings), detail="listings unlinked; nothing deleted at malls"
        )

    # ---------------------------------------------------------------- import and links

    def _candidates(self, code: str, rules: Sequence[str]) -> list[str]:
        """Products whose SKU matches ``code`` under the store's link condition."""
        if not code:
            return []
        rs = cast(Sequence[Rule], rules)
        want = normalize(code, rs)
        return [
            sku
            for (sku,) in self.conn.execute(
                "SELECT sku FROM products WHERE code_fold = ? ORDER BY sku", (fold(code),)
            )
            if normalize(sku, rs) == want
        ]

    def _link_by_code(
        self, store: str, key: str, code: str, rules: Sequence[str], report: dict[str, Any]
    ) -> None:
        candidates = self._candidates(code, rules)
        if len(candidates) == 1:
            done = self.link(store, key, candidates[0])
            report["linked"] += 1
            report["released"] += done.released
            state = self.conn.execute(
                "SELECT link_state FROM listings WHERE store = ? AND listing_key = ?",
                (store, key),
            ).fetchone()[0]
            if state == "ambiguous":
                report["ambiguous"] += 1
                report["problems"].append(
                    f"{store}/{key}: product {candidates[0]} has another listing in this store"
                )
        elif not candidates:
            report["unlinked"] += 1
        else:
            report["ambiguous"] += 1
            problem = (
                f"複数の商品が紐づいています: listing {key!r} in store {store!r} matches "
                f"{len(candidates)} products ({', '.join(candidates)}); link it by hand with "
                f"`goqctl link {store} {key} SKU`"
            )
            report["problems"].append(problem)
            self.record_error(
                m.RecordError(
                    store=store, level=8, code=MULTIPLE_LINKS, listing_key=key, message=problem
                )
            )

    def import_listings(self, msg: m.ImportListings) -> m.LinkReport:
        conn = self.conn
        report = _new_report()
        for listing in msg.listings:
            report["seen"] += 1
            row = conn.execute(
                "SELECT sku, link_state, attrs, name, link_code FROM listings "
                "WHERE store = ? AND listing_key = ?",
                (msg.store, listing.listing_key),
            ).fetchone()
            attrs = listing.attrs
            if row is None:
                report["new_listings"] += 1
                if msg.default_lead_time is not None and attrs.lead_time_days is None:
                    attrs = msgspec.structs.replace(attrs, lead_time_days=msg.default_lead_time)
            else:
                old = _decode_attrs(row[2])
                # A lead time set in goqd survives re-import (the mall's may be absent).
                if attrs.lead_time_days is None and old.lead_time_days is not None:
                    attrs = msgspec.structs.replace(attrs, lead_time_days=old.lead_time_days)
                if (
                    _encode_attrs(attrs) != (row[2] or _encode_attrs(_EMPTY_ATTRS))
                    or listing.name != row[3]
                    or listing.link_code != row[4]
                ):
                    report["updated"] += 1
            self.upsert_listing(
                m.UpsertListing(
                    store=msg.store,
                    listing_key=listing.listing_key,
                    link_code=listing.link_code,
                    name=listing.name,
                    attrs=attrs,
                    seen_quantity=listing.quantity,
                )
            )
            if row is not None and row[0] is not None:
                continue  # re-import never relinks: `goqctl unlink` / `link` do that
            if msg.base and not self._candidates(listing.link_code, msg.rules):
                if not listing.link_code:
                    report["unlinked"] += 1
                    continue
                self.upsert_product(
                    m.UpsertProduct(
                        sku=listing.link_code,
                        name=listing.name,
                        total=max(0, listing.quantity or 0),
                        store=msg.store,
                    )
                )
                report["created"] += 1
            self._link_by_code(msg.store, listing.listing_key, listing.link_code, msg.rules, report)
        return _link_report(msg.store, report)

    def auto_link(self, store: str, rules: Sequence[str]) -> m.LinkReport:
        report = _new_report()
        rows = self.conn.execute(
            "SELECT listing_key, link_code FROM listings WHERE store = ? AND sku IS NULL "
            "ORDER BY listing_key",
            (store,),
        ).fetchall()
        for key, code in rows:
            report["seen"] += 1
            self._link_by_code(store, key, code, rules, report)
        return _link_report(store, report)

    def queue_pushes(self, store: str, keys: Sequence[str], *, strict: bool = True) -> m.Done:
        if not keys:
            keys = [
                r[0]
                for r in self.conn.execute(
                    "SELECT listing_key FROM listings WHERE store = ? AND link_state = 'linked'",
                    (store,),
                )
            ]
        queued = 0
        for key in keys:
            state = self.conn.execute(
                "SELECT link_state FROM listings WHERE store = ? AND listing_key = ?",
                (store, key),
            ).fetchone()
            if not strict and (state is None or state[0] != "linked"):
                continue
            if state is None:
                raise LedgerError(f"no listing {key!r} in store {store!r}")
            if state[0] != "linked":
                raise LedgerError(
                    f"listing {key!r} in store {store!r} is {state[0]}: link it first"
                )
            self._queue_listing(store, key)
            queued += 1
        return m.Done(changed=queued, detail=f"{queued} listing(s) queued for a push")

    def set_stocks(self, msg: m.SetStocks) -> m.Done:
        for sku, n in msg.items:
            if msg.mode == "set":
                self.set_stock(sku, n, msg.reason)
            else:
                self.adjust_stock(sku, n, msg.reason)
        return m.Done(changed=len(msg.items))

    # ---------------------------------------------------------------- errors

    def record_error(self, msg: m.RecordError) -> m.Done:
        now = self.now()
        cur = self.conn.execute(
            "UPDATE errors SET last_seen = ?, count = count + 1, message = ?, level = ? "
            "WHERE store = ? AND code = ? AND listing_key = ? AND cleared_at IS NULL",
            (now, msg.message, msg.level, msg.store, msg.code, msg.listing_key),
        )
        if cur.rowcount == 0:
            self.conn.execute(
                "INSERT INTO errors (store, level, code, message, listing_key, first_seen, "
                "last_seen) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (msg.store, msg.level, msg.code, msg.message, msg.listing_key, now, now),
            )
            return m.Done(changed=1)
        return m.Done(changed=0)

    def clear_errors(self, msg: m.ClearErrors) -> m.Done:
        now = self.now()
        changed = 0
        if msg.ids:
            for error_id in msg.ids:
                changed += self.conn.execute(
                    "UPDATE errors SET cleared_at = ? WHERE id = ? AND cleared_at IS NULL",
                    (now, error_id),
                ).rowcount
        elif msg.store:
            sql = "UPDATE errors SET cleared_at = ? WHERE store = ? AND cleared_at IS NULL"
            args: tuple[Any, ...] = (now, msg.store)
            if msg.level is not None:
                sql += " AND level = ?"
                args += (msg.level,)
            changed = self.conn.execute(sql, args).rowcount
        else:
            raise LedgerError("say which errors to clear: ids or a store")
        return m.Done(changed=changed)

    def list_errors(self, msg: m.ListErrors) -> m.ErrorList:
        sql = (
            "SELECT id, store, level, code, message, listing_key, first_seen, last_seen, count, "
            "cleared_at FROM errors WHERE 1=1"
        )
        args: list[Any] = []
        if msg.store:
            sql += " AND store = ?"
            args.append(msg.store)
        if not msg.include_cleared:
            sql += " AND cleared_at IS NULL"
        sql += " ORDER BY level DESC, last_seen DESC LIMIT ?"
        args.append(msg.limit)
        return m.ErrorList(
            errors=tuple(
                m.ErrorRecord(
                    id=r[0],
                    store=r[1],
                    level=r[2],
                    code=r[3],
                    message=r[4],
                    listing_key=r[5],
                    first_seen=r[6],
                    last_seen=r[7],
                    count=r[8],
                    cleared_at=r[9],
                )
                for r in self.conn.execute(sql, args)
            )
        )

    # ---------------------------------------------------------------- reads

    def list_products(self, msg: m.ListProducts) -> m.ProductList:
        rows = self.conn.execute(
            "SELECT p.sku, p.name, p.total, p.first_store, "
            "(SELECT count(*) FROM listings l WHERE l.sku = p.sku), p.held "
            "FROM products p WHERE p.sku > ? ORDER BY p.sku LIMIT ?",
            (msg.after, msg.limit),
        ).fetchall()
        return m.ProductList(
            products=tuple(
                m.ProductRecord(
                    sku=r[0], name=r[1], total=r[2], first_store=r[3], listings=r[4], held=r[5]
                )
                for r in rows
            )
        )

    def list_listings(self, msg: m.ListListings) -> m.ListingList:
        rows = self.conn.execute(
            "SELECT l.store, l.listing_key, l.link_code, l.name, l.sku, l.link_state, l.attrs, "
            "l.last_pushed_qty, l.last_pushed_version, l.last_seen_qty, o.version, l.held "
            "FROM listings l LEFT JOIN outbox o ON o.store = l.store AND "
            "o.listing_key = l.listing_key WHERE l.store = ? AND l.listing_key > ? "
            "ORDER BY l.listing_key LIMIT ?",
            (msg.store, msg.after, msg.limit),
        ).fetchall()
        return m.ListingList(listings=tuple(_listing_record(r) for r in rows))

    def store_stats(self) -> m.StoreStats:
        """Per-store outbox, parked lines and open errors: small tables, cheap to read."""
        conn = self.conn
        per_store: dict[str, dict[str, Any]] = {}

        def bucket(store: str) -> dict[str, Any]:
            return per_store.setdefault(
                store, {"cursor": None, "outbox": 0, "parked": 0, "by_level": {}, "held": 0}
            )

        for store, cur in conn.execute("SELECT store, cursor FROM cursors"):
            bucket(store)["cursor"] = cur
        for store, n in conn.execute("SELECT store, count(*) FROM outbox GROUP BY store"):
            bucket(store)["outbox"] = n
        for store, n in conn.execute("SELECT store, count(*) FROM parked_lines GROUP BY store"):
            bucket(store)["parked"] = n
        for store, n in conn.execute(
            # The partial index, not a scan of every listing (2.5 million at scale).
            "SELECT store, sum(held) FROM listings INDEXED BY listings_holding "
            "WHERE held > 0 GROUP BY store"
        ):
            bucket(store)["held"] = n
        for store, level, n in conn.execute(
            "SELECT store, level, count(*) FROM errors WHERE cleared_at IS NULL "
            "GROUP BY store, level"
        ):
            bucket(store)["by_level"][level] = n
        return m.StoreStats(
            stores=tuple(
                m.StoreLedgerStatus(
                    store=s,
                    cursor=v["cursor"],
                    outbox=v["outbox"],
                    parked=v["parked"],
                    open_errors=sum(v["by_level"].values()),
                    max_error_level=max(v["by_level"], default=0),
                    open_errors_by_level=v["by_level"],
                    held=v["held"],
                )
                for s, v in sorted(per_store.items())
            ),
            oversold_units=self._meta("oversold_units"),
        )

    def status(self) -> m.LedgerStatus:
        conn = self.conn

        def count(sql: str) -> int:
            return int(conn.execute(sql).fetchone()[0])

        stats = self.store_stats()
        return m.LedgerStatus(
            products=count("SELECT count(*) FROM products"),
            listings=count("SELECT count(*) FROM listings"),
            order_lines=count("SELECT count(*) FROM order_lines"),
            movements=count("SELECT coalesce(max(id), 0) FROM movements"),
            outbox=sum(x.outbox for x in stats.stores),
            parked=sum(x.parked for x in stats.stores),
            oversold_units=stats.oversold_units,
            duplicates=self._meta("duplicates"),
            stores=stats.stores,
        )


def _new_report() -> dict[str, Any]:
    counts: dict[str, Any] = dict.fromkeys(
        (
            "seen",
            "created",
            "new_listings",
            "updated",
            "linked",
            "unlinked",
            "ambiguous",
            "released",
        ),
        0,
    )
    counts["problems"] = []
    return counts


def _link_report(store: str, report: dict[str, Any]) -> m.LinkReport:
    return m.LinkReport(store=store, **{**report, "problems": tuple(report["problems"][:100])})


def _listing_record(r: Sequence[Any]) -> m.ListingRecord:
    return m.ListingRecord(
        store=r[0],
        listing_key=r[1],
        link_code=r[2],
        name=r[3],
        sku=r[4],
        link_state=r[5],
        attrs=_decode_attrs(r[6]),
        last_pushed_quantity=r[7],
        last_pushed_version=r[8],
        last_seen_quantity=r[9],
        pending_version=r[10],
        held=r[11],
    )
