"""The ledger's SQLite file: schema, migrations, and every statement goqd runs on it.

Everything here is synchronous and runs on the ledger actor's one worker thread, inside
one transaction per batch (``Ledger.apply_batch``). Nothing else opens the file for
writing. The rules it enforces are docs/design.md §4:

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

import datetime
import hashlib
import os
import shlex
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import msgspec

from goqd import limits
from goqd import messages as m
from goqd.crashpoints import crashpoint
from goqd.csvio import duplicate_sku
from goqd.errors import (
    CountUnknown,
    GoqdError,
    InputError,
    LedgerCorrupt,
    LedgerError,
    LedgerRequestFailed,
    LedgerTooNew,
    UnknownListing,
    UnknownSku,
)
from goqd.linking import Rule, fold, normalize

SCHEMA_VERSION = 8
APPLICATION_ID = 0x676F7164  # "goqd": marks the file as ours
MAX_LINE_QUANTITY = 100_000  # a line above this is a data error, not an order
MULTIPLE_LINKS = "multiple_links"  # 複数の商品が紐づいています
NOT_LINKED = "listing_not_linked"  # 連携できない商品: order lines parked for the listing
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
# `goqctl listings --state`: the link states, and "parked" (listings with parked lines).
LISTING_STATES = ("", "linked", "unlinked", "ambiguous", "parked")

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
    # version 3: the sale watch (docs/design.md §4). ``held``: units held back from every store
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
    # version 4: what each operator request asked for (``request_digest``), so an id
    # reused for a different request is refused instead of answered with the old reply.
    # Rows written before have none and keep answering by id alone.
    """
    ALTER TABLE requests ADD COLUMN digest BLOB;
    """,
    # version 5: staged stock imports (``Ledger.stock_import``). A large stock CSV is
    # staged in chunks, sealed, then applied a chunk a transaction; applied rows are
    # deleted in the transaction that applies them, so what is left is what is to do.
    """
    CREATE TABLE stock_imports (
        id INTEGER PRIMARY KEY,
        request_id TEXT NOT NULL DEFAULT '',
        digest BLOB NOT NULL,
        mode TEXT NOT NULL CHECK (mode IN ('set', 'adjust')),
        reason TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL CHECK (state IN ('staging', 'applying', 'done', 'discarded')),
        staged INTEGER NOT NULL DEFAULT 0,
        applied INTEGER NOT NULL DEFAULT 0,
        skipped INTEGER NOT NULL DEFAULT 0,
        reply BLOB,
        created_at REAL NOT NULL,
        finished_at REAL
    );
    CREATE UNIQUE INDEX stock_imports_by_request ON stock_imports (request_id)
        WHERE request_id != '' AND state != 'discarded';
    CREATE TABLE stock_import_rows (
        import_id INTEGER NOT NULL,
        line INTEGER NOT NULL,
        sku TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (import_id, line)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX stock_import_rows_by_sku ON stock_import_rows (import_id, sku);
    """,
    # version 6: a listing's hold kept as layers, ``[[since, units], ...]`` oldest first,
    # so units held for a later sale are as old as that sale and not as the first hold
    # (``Ledger.stock_seen``). ``held`` stays their sum and ``held_since`` the oldest
    # layer's time. A hold from before has no layers and reads as one layer.
    """
    ALTER TABLE listings ADD COLUMN hold_layers TEXT;
    """,
    # version 7: errors an operator can work with, and counts goqd does not know.
    # ``errors.mall_code``: the mall's own code beside goqd's; ``errors.cleared_by``:
    # operator, healed (the store recovered) or resolved (the cause was fixed). Two
    # indexes page through errors: the open ones by level (``goqctl errors``), and a
    # store's by level, history included. ``products.count_known``:
    # 0 for a product created without a count (unlimited at its mall): nothing is pushed
    # for it until one is set. Lines parked before this version get their
    # listing_not_linked error here, so none stays invisible.
    """
    ALTER TABLE errors ADD COLUMN mall_code TEXT NOT NULL DEFAULT '';
    ALTER TABLE errors ADD COLUMN cleared_by TEXT NOT NULL DEFAULT '';
    ALTER TABLE products ADD COLUMN count_known INTEGER NOT NULL DEFAULT 1;
    CREATE INDEX errors_open_by_level ON errors (level, id) WHERE cleared_at IS NULL;
    CREATE INDEX errors_by_store ON errors (store, level, id);
    INSERT INTO errors (store, level, code, message, listing_key, first_seen, last_seen)
        SELECT store, 8, 'listing_not_linked',
            '連携できない商品: ' || count(*) || ' order line(s) of listing ' || listing_key
            || ' in store ' || store || ' are parked: the listing is not linked to one '
            || 'product, so these sales lower no other store. See `goqctl parked --store '
            || store || '`',
            listing_key, min(parked_at), max(parked_at)
        FROM parked_lines GROUP BY store, listing_key;
    """,
    # version 8: the last diff of each store (``goqctl diff``), so `goqctl reflect STORE
    # --differing` pushes what it found, across restarts: ``diff_runs`` when it finished
    # and what it counted, ``diff_listings`` the listings it found 差異. The index
    # pages a store's listings by link state (`goqctl listings --state`, the diff's
    # linked listings) without reading every listing of the store.
    """
    CREATE TABLE diff_runs (
        store TEXT PRIMARY KEY,
        at REAL NOT NULL,
        checked INTEGER NOT NULL,
        differing INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE diff_listings (
        store TEXT NOT NULL,
        listing_key TEXT NOT NULL,
        PRIMARY KEY (store, listing_key)
    ) WITHOUT ROWID;
    CREATE INDEX listings_by_state ON listings (store, link_state, listing_key);
    """,
]

_attrs_encoder = msgspec.msgpack.Encoder()
_attrs_decoder = msgspec.msgpack.Decoder(m.ListingAttrs)
_line_decoder = msgspec.msgpack.Decoder(m.OrderLine)
_reply_decoder: msgspec.msgpack.Decoder[m.LedgerReply] = msgspec.msgpack.Decoder(m.LedgerReply)
_EMPTY_ATTRS = m.ListingAttrs()
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


def _encode_attrs(attrs: m.ListingAttrs) -> bytes:
    return _attrs_encoder.encode(attrs)


def _decode_attrs(blob: bytes | None) -> m.ListingAttrs:
    return _attrs_decoder.decode(blob) if blob else _EMPTY_ATTRS


def request_digest(msg: m.LedgerRequest) -> bytes:
    """A stable digest of what an operator request asks for, its ``request_id`` left out.

    Stored with the id: a retry (same id, same content) gets the stored reply, while the
    same id with other content is refused. The encoding includes the message's tag, so
    ``SetStock`` and ``AdjustStock`` with the same fields differ.
    """
    blank = msgspec.structs.replace(msg, request_id="")
    return hashlib.sha256(_digest_encoder.encode(blank)).digest()


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


def open_db(
    path: str, *, synchronous: Synchronous = "full", check: bool = True, read_only: bool = False
) -> sqlite3.Connection:
    """Open (or create) the ledger at ``path`` and bring its schema up to date.

    Raises ``LedgerCorrupt`` for a file that is not a readable goqd ledger,
    ``LedgerTooNew`` for a newer schema, and ``LedgerError`` for a ledger this process
    could read but not write (the file, its directory or the mount is read-only): SQLite
    would open such a file read-only without a word, and every booking would fail after
    READY. An existing file is never recreated.

    ``read_only`` (``goqd check-config``): the same refusals for an existing file, but
    nothing is written: no migration, and no -wal/-shm is left beside a file that had
    none.
    """
    memory = path == ":memory:"
    exists = not memory and os.path.exists(path) and os.path.getsize(path) > 0
    header = b"" if memory else _check_access(path, exists=exists)
    if exists and header != b"SQLite format 3\x00":
        raise LedgerCorrupt(f"{path}: not an SQLite database; refusing to touch it")
    if read_only and not exists:
        raise LedgerError(f"{path}: there is no ledger here yet")
    try:
        if read_only:
            # immutable=1 when there is no -wal or -journal: the file is then complete on
            # its own, and SQLite reads it without creating a -wal and -shm it could not
            # remove. With them, mode=ro reads through the journal as the daemon would.
            journal = any(os.path.exists(path + s) for s in ("-wal", "-journal"))
            from urllib.parse import quote

            uri = f"file:{quote(os.path.abspath(path))}?{'mode=ro' if journal else 'immutable=1'}"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        else:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction a batch.
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise LedgerCorrupt(f"{path}: cannot open the ledger: {exc}") from exc
    try:
        _configure(conn, path, synchronous, exists=exists, check=check, read_only=read_only)
        if not (memory or read_only):
            _probe_write(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _check_access(path: str, *, exists: bool) -> bytes:
    """Refuse, before SQLite sees it, a ledger this process cannot write; return the
    first 16 bytes of an existing file.

    SQLite needs the file and its directory (for -wal, -shm and -journal) writable. The
    checks write for real (``os.access`` lets root pass where a read-only mount or an
    immutable file stops it).
    """
    from goqd.config import probe_writable_dir, running_user  # config imports no ledger

    directory = os.path.dirname(os.path.abspath(path))
    try:
        probe_writable_dir(directory)
    except OSError as exc:
        raise LedgerError(
            f"{path}: cannot write in {directory}: {exc.strerror or exc}; SQLite keeps the "
            f"ledger's journal (-wal, -shm) there: let user {running_user()} write in it"
        ) from None
    if not exists:
        return b""
    fix = f"it must be owned by user {running_user()}, mode 0600, on a writable file system"
    for side in (path + "-wal", path + "-shm"):
        if os.path.exists(side) and not os.access(side, os.R_OK | os.W_OK):
            raise LedgerError(f"{side}: goqd cannot write this journal file of its ledger; {fix}")
    try:
        # Opened for writing (never created or truncated): this is the write check.
        with open(path, "r+b") as f:
            return f.read(16)
    except IsADirectoryError:
        raise LedgerCorrupt(f"{path}: a directory, not a ledger file") from None
    except OSError as exc:
        raise LedgerError(
            f"{path}: cannot open the ledger for writing: {exc.strerror or exc}; {fix}"
        ) from None


def _probe_write(conn: sqlite3.Connection, path: str) -> None:
    """A write rolled back at once: SQLite opens a file it may not write read-only,
    silently, and the checks before it cannot see every reason (an immutable -shm)."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(f"PRAGMA user_version={version}")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            raise LedgerError(
                f"{path}: another process holds the ledger's write lock; is another goqd "
                f"running on this file?"
            ) from exc
        raise LedgerError(f"{path}: SQLite cannot write the ledger: {exc}") from exc


def _configure(
    conn: sqlite3.Connection,
    path: str,
    synchronous: Synchronous,
    *,
    exists: bool,
    check: bool,
    read_only: bool = False,
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
    if read_only:
        return
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
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _split_sql(_MIGRATIONS[target - 1]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={target}")
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:  # a start-up refusal in one line, not a traceback
            raise LedgerError(
                f"{path}: could not migrate the ledger to schema {target}: {exc}"
            ) from exc


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


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
        one bad request never costs the others. So does any other exception raised while
        applying one message (a value SQLite cannot bind, a constraint, a bug): that
        message is answered with a ``LedgerError`` naming its type and listed in
        ``failures``. Only a failure of the database itself (disk full, I/O error, see
        ``_BATCH_FAILURES``) aborts the transaction and raises.
        """
        replies: list[m.LedgerReply | GoqdError] = []
        failures: list[tuple[int, Exception]] = []
        self._woken = set()
        self._batch_oversold = 0
        self._batch_lines = 0
        conn = self.conn
        if conn.in_transaction:
            # Left open by a batch whose ROLLBACK failed too (the disk gone): nothing of it
            # was acknowledged. Dropped here, or every later batch would fail at BEGIN.
            conn.execute("ROLLBACK")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for index, msg in enumerate(msgs):
                conn.execute("SAVEPOINT msg")
                version_before = self._version
                oversold_before = self._batch_oversold
                lines_before = self._batch_lines
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
                    # Keep ``_dirty``: flushing a SKU whose change was rolled back just
                    # queues its (correct) current count once more.
                    self._version = version_before
                    self._batch_oversold = oversold_before
                    self._batch_lines = lines_before
                    if isinstance(exc, GoqdError):
                        replies.append(exc)
                    else:
                        replies.append(_refusal(msg, exc))
                        failures.append((index, exc))
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
        return BatchResult(replies, self._woken, self._batch_lines, self._batch_oversold, failures)

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
            case m.CountListings():
                return self.count_listings(msg)
            case m.GetLedgerStatus():
                return self.status()
            case m.GetStoreStats():
                return self.store_stats()
            case m.RecordError():
                return self.record_error(msg)
            case m.ResolveErrors():
                return self.resolve_errors(msg)
            case m.ListParked():
                return self.list_parked(msg)
            case m.ImportListings():
                return self.import_listings(msg)
            case m.AutoLink():
                return self.auto_link(msg.store, msg.rules)
            case m.DiffFound():
                return self.diff_found(msg)
            case m.StockImportStep():
                return self.stock_import(msg)
            case _:
                return self._idempotent(msg)

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
            # A row from before digests were stored (NULL) answers by id alone, as then.
            if row[1] is not None and row[1] != digest:
                raise LedgerError(
                    f"request id {request_id!r} was already used for a different request; "
                    "nothing was applied: send this request with a new id"
                )
            return _reply_decoder.decode(row[0])
        reply = self._operator(msg)
        self.conn.execute(
            "INSERT INTO requests (request_id, reply, at, digest) VALUES (?, ?, ?, ?)",
            (request_id, msgspec.msgpack.encode(reply), self.now(), digest),
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
            case m.AddProduct():
                return self.add_product(msg)
            case m.ClearErrors():
                return self.clear_errors(msg)
            case m.QueuePushes():
                return self.queue_pushes(msg.store, msg.listing_keys, strict=msg.strict)
            case m.ReflectDiffering():
                return self.reflect_differing(msg.store)
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
            # A parked sale lowers no other store: it must be seen (an error per listing).
            self._parked_error(store, line.listing_key)
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
            # First seen cancelled: books nothing. But the mall counted the sale and has
            # now put the units back, and a push since the sale may have overwritten
            # the counter that had them off: goqd's count goes out again.
            self._queue_listing(store, line.listing_key)
            return "booked"
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
            "UPDATE products SET total = total + ? WHERE sku = ? RETURNING total, held, "
            "count_known",
            (delta, sku),
        ).fetchone()
        if row is None:
            raise UnknownSku(f"unknown SKU {sku!r}")
        after = int(row[0])
        held = int(row[1])
        before = after - delta
        oversold = 0
        # A product without a known count has no stock to sell below: its total only
        # keeps the movements until `goqctl stock set` gives the count.
        if cause in ("order", "correction") and delta < 0 and row[2]:
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
            # Unknown count (unlimited at its mall): pushing 0 would show it sold out.
            "AND p.count_known = 1 "
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
            "AND p.count_known = 1 "
            "ON CONFLICT (store, listing_key) DO UPDATE SET quantity = excluded.quantity, "
            "version = excluded.version, sku = excluded.sku, not_before = 0, attempts = 0 "
            "RETURNING store",
            (self._version, store, listing_key),
        ).fetchall()
        self._woken.update(r[0] for r in rows)

    # ---------------------------------------------------------------- outbox

    def take_pushes(self, store: str, limit: int, *, peek: bool = False) -> m.PushBatch:
        # ``previous_quantity`` (compare-and-set malls): the count the mall last accepted
        # from goqd or, before any push, the count goqd last saw there (the watch's
        # expectation, else the import's reading). Without one a first push went blind
        # and could erase a sale made before it; a guess that is off only costs a stale
        # answer, a read and a retry.
        rows = self.conn.execute(
            "SELECT o.listing_key, o.sku, o.quantity, o.version, l.attrs, "
            "coalesce(l.last_pushed_qty, l.watch_qty, l.last_seen_qty) "
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
        accepted = [o.listing_key for o in msg.outcomes if o.accepted]
        if accepted:
            # The mall took these listings' counts: an earlier refusal of them is over.
            conn.execute(
                "UPDATE errors SET cleared_at = ?, cleared_by = 'resolved' WHERE store = ? "
                "AND code = 'listing_rejected' AND cleared_at IS NULL AND listing_key IN "
                "(SELECT value FROM json_each(?))",
                (now, msg.store, msgspec.json.encode(accepted).decode()),
            )
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
                mall_code = out.code if out.code != "listing_rejected" else ""
                message = out.message or "the mall refused this listing's stock update"
                if mall_code and mall_code not in message:
                    message = f"{mall_code}: {message}"  # read in a log or a mail, too
                self.record_error(
                    m.RecordError(
                        store=msg.store,
                        level=8,
                        code="listing_rejected",
                        message=message,
                        listing_key=out.listing_key,
                        mall_code=mall_code,
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

        Each fall is held as a layer of its own, as old as the reading that found it
        (``_hold_layers``): a booked sale explains the oldest layer first and only the
        layers no poll explained are released. One age for the whole hold let units held
        for a second sale inherit the first sale's age and be released as unexplained
        before any poll could have returned their order.
        """
        conn = self.conn
        now = self.now()
        changed = 0
        for seen in msg.counts:
            row = conn.execute(
                "SELECT l.sku, l.link_state, l.held, l.last_pushed_qty, "
                "l.watch_at, o.sent_min, o.version IS NOT NULL, l.watch_qty, "
                "l.hold_layers, l.held_since "
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
            sku, _, held, pushed, _, sent, queued, last_seen, raw_layers, since = row
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
            layers = self._hold_layers(raw_layers, held, since)
            if new_held > held:
                layers.append((now, new_held - held))
            elif new_held < held:
                # Units came back (a cancellation at the mall) and which sale's they were
                # is unknown: off the oldest layers, so what stays held stays longest.
                layers = self._explain_oldest(layers, held - new_held)
            conn.execute(
                "UPDATE listings SET watch_qty = ?, held = ?, held_since = ?, hold_layers = ? "
                "WHERE store = ? AND listing_key = ?",
                (
                    seen.quantity,
                    new_held,
                    *self._layer_columns(layers),
                    msg.store,
                    seen.listing_key,
                ),
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
        # ``held_since`` is the oldest layer's time: the listings with a layer due.
        due = max(now - msg.hold_expiry, msg.explained_before)
        expired = conn.execute(
            "SELECT listing_key FROM listings INDEXED BY listings_holding "
            "WHERE store = ? AND held > 0 AND held_since < ?",
            (msg.store, due),
        ).fetchall()
        for (key,) in expired:
            released = self._release_hold(msg.store, key, before=due)
            if not released:
                continue
            changed += 1
            self.record_error(
                m.RecordError(
                    store=msg.store,
                    level=8,
                    code="count_fell_without_order",
                    message=(
                        f"listing {key}: the mall's count fell by {released} but no order "
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
        """A booked sale explains held units of its listing first, the oldest layer first
        (orders come in the order they were placed); the rest is a sale the watch has not
        seen yet, so its expected counter drops with it. (A listing the watch never read
        has no expectation to move: see ``stock_seen``.) ``held`` and ``expected`` are the
        listing's ``held`` and ``watch_qty``, as the caller read them."""
        if held == 0 and expected is None:
            return  # the watch does not know this listing: nothing to write
        use = min(held, sold)
        watch_qty = None if expected is None else expected - (sold - use)
        if not use:
            self.conn.execute(
                "UPDATE listings SET watch_qty = ?, watch_at = ? "
                "WHERE store = ? AND listing_key = ?",
                (watch_qty, self.now(), store, listing_key),
            )
            return
        raw, since = self.conn.execute(
            "SELECT hold_layers, held_since FROM listings WHERE store = ? AND listing_key = ?",
            (store, listing_key),
        ).fetchone()
        layers = self._explain_oldest(self._hold_layers(raw, held, since), use)
        self.conn.execute(
            "UPDATE listings SET held = ?, held_since = ?, hold_layers = ?, watch_qty = ?, "
            "watch_at = ? WHERE store = ? AND listing_key = ?",
            (
                held - use,
                *self._layer_columns(layers),
                watch_qty,
                self.now(),
                store,
                listing_key,
            ),
        )
        self.conn.execute("UPDATE products SET held = held - ? WHERE sku = ?", (use, sku))

    def _release_hold(self, store: str, listing_key: str, *, before: float | None = None) -> int:
        """Release the listing's hold layers older than ``before`` (all of them if None);
        returns the units released."""
        row = self.conn.execute(
            "SELECT sku, held, hold_layers, held_since FROM listings "
            "WHERE store = ? AND listing_key = ?",
            (store, listing_key),
        ).fetchone()
        if row is None or not row[1]:
            return 0
        sku, held, raw, since = row
        layers = self._hold_layers(raw, held, since)
        keep = [] if before is None else [x for x in layers if x[0] >= before]
        released = int(held) - sum(units for _, units in keep)
        if not released:
            return 0
        self.conn.execute(
            "UPDATE listings SET held = ?, held_since = ?, hold_layers = ? "
            "WHERE store = ? AND listing_key = ?",
            (held - released, *self._layer_columns(keep), store, listing_key),
        )
        self.conn.execute("UPDATE products SET held = held - ? WHERE sku = ?", (released, sku))
        self._move(sku, 0, "hold", store=store, reason=f"{listing_key}: {released} released")
        return released

    @staticmethod
    def _hold_layers(raw: str | None, held: int, since: float | None) -> list[tuple[float, int]]:
        """A listing's hold as ``(since, units)`` layers, oldest first, summing to ``held``.

        A hold written before layers existed has none: it reads as one layer as old as
        its ``held_since``, which is what it was.
        """
        if held <= 0:
            return []
        if raw is not None:
            layers = msgspec.json.decode(raw, type=list[tuple[float, int]])
            if sum(units for _, units in layers) == held:
                return layers
        return [(since if since is not None else 0.0, held)]

    @staticmethod
    def _explain_oldest(layers: list[tuple[float, int]], units: int) -> list[tuple[float, int]]:
        """``layers`` less ``units`` units, taken off the oldest layers first."""
        left: list[tuple[float, int]] = []
        for since, held in layers:
            use = min(units, held)
            units -= use
            if held > use:
                left.append((since, held - use))
        return left

    @staticmethod
    def _layer_columns(layers: list[tuple[float, int]]) -> tuple[float | None, str | None]:
        """``held_since`` and ``hold_layers`` for ``layers``: both NULL when nothing is held."""
        if not layers:
            return None, None
        return layers[0][0], msgspec.json.encode(layers).decode()

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
        # A count given by the operator is known from now on: its pushes go out (a move
        # of 0 still marks the SKU, so every linked listing is queued).
        self.conn.execute(
            "UPDATE products SET count_known = 1 WHERE sku = ? AND count_known = 0", (sku,)
        )
        after, mid = self._move(sku, delta, "set", reason=reason)
        return m.StockChanged(sku=sku, total=after, delta=delta, movement_id=mid)

    def adjust_stock(self, sku: str, delta: int, reason: str) -> m.StockChanged:
        self._total(sku)
        if not self._count_known(sku):
            raise CountUnknown(
                f"{sku!r} has no known count to adjust (it was imported without one: "
                f"unlimited or untracked at its mall); set it: `goqctl stock set {sku} N`"
            )
        after, mid = self._move(sku, delta, "adjust", reason=reason)
        return m.StockChanged(sku=sku, total=after, delta=delta, movement_id=mid)

    def _count_known(self, sku: str) -> bool:
        row = self.conn.execute("SELECT count_known FROM products WHERE sku = ?", (sku,)).fetchone()
        return row is not None and bool(row[0])

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
        total = (msg.total or 0) if msg.count_known else 0
        if total < 0:
            raise LedgerError(f"initial stock for {msg.sku!r} cannot be negative")
        self.conn.execute(
            "INSERT INTO products (sku, name, total, first_store, created_at, code_fold, "
            "count_known) VALUES (?, ?, 0, ?, ?, ?, ?)",
            (msg.sku, msg.name, msg.store, self.now(), fold(msg.sku), int(msg.count_known)),
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
        warnings: tuple[str, ...] = ()
        if msg.sku is not None and (row is None or row[0] != msg.sku):
            done = self.link(msg.store, msg.listing_key, msg.sku)
            released, warnings = done.released, done.warnings
        elif (
            row is not None
            and row[1] == "linked"
            and attrs_blob is not None
            and attrs_blob != row[2]
        ):
            # Mall attributes go out with the next push; queue one so they do.
            self._queue_listing(msg.store, msg.listing_key)
        return m.Done(changed=1, released=released, warnings=warnings)

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
        """Link a listing goqd has seen (imported, or named by a polled order) to a product.

        A listing nobody has shown is refused, never created: a mistyped key would
        otherwise become a second listing of the product, make both ambiguous and park
        their orders.
        """
        conn = self.conn
        row = conn.execute(
            "SELECT sku FROM listings WHERE store = ? AND listing_key = ?", (store, listing_key)
        ).fetchone()
        if row is None:
            raise UnknownListing(
                f"no listing {listing_key!r} in store {store!r}: goqd links only listings "
                f"an import or the mall has shown; run `goqctl import {store}` first "
                f"(see `goqctl listings {store}`)"
            )
        self._total(sku)
        old_sku = row[0]
        conn.execute(
            "UPDATE listings SET sku = ?, link_state = 'linked' "
            "WHERE store = ? AND listing_key = ?",
            (sku, store, listing_key),
        )
        released = self._resolve_links(store, sku)
        if old_sku is not None and old_sku != sku:
            released += self._resolve_links(store, old_sku)
        return m.Done(
            changed=1, released=released, warnings=self._ambiguity_warnings(store, listing_key)
        )

    def _ambiguity_warnings(self, store: str, listing_key: str) -> tuple[str, ...]:
        """What to tell the operator when a link left ``listing_key`` ambiguous."""
        row = self.conn.execute(
            "SELECT sku, link_state FROM listings WHERE store = ? AND listing_key = ?",
            (store, listing_key),
        ).fetchone()
        if row is None or row[1] != "ambiguous":
            return ()
        keys = self._listings_of(store, row[0])
        other = next(k for k in keys if k != listing_key)
        return (
            f"複数の商品が紐づいています: product {row[0]!r} now has {len(keys)} listings in "
            f"store {store!r} ({', '.join(keys)}): orders for them are parked and none of "
            f"them is pushed until one is left. Unlink the wrong one: "
            f"`goqctl unlink {shlex.quote(store)} {shlex.quote(other)}` (or "
            f"`goqctl unlink {shlex.quote(store)} {shlex.quote(listing_key)}`), then check "
            f"差異商品: `goqctl diff {shlex.quote(store)}`",
        )

    def _listings_of(self, store: str, sku: str) -> list[str]:
        return [
            r[0]
            for r in self.conn.execute(
                "SELECT listing_key FROM listings WHERE store = ? AND sku = ? ORDER BY listing_key",
                (store, sku),
            )
        ]

    def unlink(self, store: str, listing_key: str) -> m.Done:
        row = self.conn.execute(
            "SELECT sku FROM listings WHERE store = ? AND listing_key = ?", (store, listing_key)
        ).fetchone()
        if row is None:
            raise UnknownListing(
                f"no listing {listing_key!r} in store {store!r}; see `goqctl listings {store}`"
            )
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
        if store in self._parked_stores:
            self._parked_error(store, listing_key, bump=False)
        return m.Done(changed=1, released=released)

    def _resolve_links(self, store: str, sku: str) -> int:
        """Apply the one-listing-per-product-per-store rule for ``sku`` in ``store``.

        Several listings of one product in one store are ambiguous (複数の商品が紐づいて
        います): all of them are marked so, an error names them, and their orders park.
        When one remains, it is linked again, its error cleared, its parked lines booked
        and its count queued for a push.
        """
        conn = self.conn
        keys = self._listings_of(store, sku)
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
                if store in self._parked_stores:
                    self._parked_error(store, key, bump=False)
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
                "UPDATE errors SET cleared_at = ?, cleared_by = 'resolved' WHERE store = ? "
                "AND code = ? AND listing_key = ? AND cleared_at IS NULL",
                (now, store, MULTIPLE_LINKS, key),
            )
            released += self._release_parked(store, key)
            self._queue_listing(store, key)
        # Listings that were ambiguous with this one but now point elsewhere.
        # Per open error row (few), a primary-key lookup: never a scan of the store's
        # listings, which made a 100,000-listing import quadratic.
        conn.execute(
            "UPDATE errors SET cleared_at = ?, cleared_by = 'resolved' WHERE store = ? "
            "AND code = ? AND cleared_at IS NULL "
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
        # Booked (a line that parked again has refreshed the error instead): the listing's
        # error is resolved, kept in history.
        if not self.conn.execute(
            "SELECT 1 FROM parked_lines WHERE store = ? AND listing_key = ? LIMIT 1",
            (store, listing_key),
        ).fetchone():
            self.conn.execute(
                "UPDATE errors SET cleared_at = ?, cleared_by = 'resolved' WHERE store = ? "
                "AND code = ? AND listing_key = ? AND cleared_at IS NULL",
                (self.now(), store, NOT_LINKED, listing_key),
            )
        return len(rows)

    def _parked_error(self, store: str, listing_key: str, *, bump: bool = True) -> None:
        """Record (``bump``) or just reword the listing_not_linked error of a listing with
        parked lines: how many, why, and the command that gets them booked."""
        conn = self.conn
        (n,) = conn.execute(
            "SELECT count(*) FROM parked_lines WHERE store = ? AND listing_key = ?",
            (store, listing_key),
        ).fetchone()
        if not n:
            return
        row = conn.execute(
            "SELECT sku, link_state FROM listings WHERE store = ? AND listing_key = ?",
            (store, listing_key),
        ).fetchone()
        sku, state = row if row is not None else (None, "unlinked")
        others = self._listings_of(store, sku) if state == "ambiguous" and sku else []
        message = (
            f"連携できない商品: {n} order line(s) of listing {listing_key!r} in store "
            f"{store!r} are parked: {_park_reason(state, sku, others)}, so these sales lower "
            f"no other store. To book them: {_park_action(store, listing_key, state, others)}"
            f" (list them: goqctl parked --store {shlex.quote(store)})"
        )
        if bump:
            self.record_error(
                m.RecordError(
                    store=store,
                    level=8,
                    code=NOT_LINKED,
                    message=message,
                    listing_key=listing_key,
                )
            )
        else:
            conn.execute(
                "UPDATE errors SET message = ? WHERE store = ? AND code = ? AND listing_key = ? "
                "AND cleared_at IS NULL",
                (message, store, NOT_LINKED, listing_key),
            )

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
            # As GoQSystem's 在庫連携 does (在庫連携へ未登録の商品のみ…置き換わります): a
            # listing new to goqd (never imported: no attributes yet, even if an order
            # named it) takes the store's default lead time instead of the mall's; a
            # lead time goqd already knows is never changed by an import. Either way the
            # mall gets goqd's value with the next push.
            old = _decode_attrs(row[2]) if row is not None else _EMPTY_ATTRS
            if row is None or row[2] is None:
                if msg.default_lead_time is not None:
                    attrs = msgspec.structs.replace(attrs, lead_time_days=msg.default_lead_time)
            elif old.lead_time_days is not None:
                attrs = msgspec.structs.replace(attrs, lead_time_days=old.lead_time_days)
            if row is not None and (
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
            if (msg.base or msg.create_products) and not self._candidates(
                listing.link_code, msg.rules
            ):
                if not msg.base and (problem := _sku_problem(listing.link_code)):
                    # Said, not skipped in silence: the operator asked for every listing.
                    report["unlinked"] += 1
                    report["problems"].append(
                        f"{msg.store}/{listing.listing_key}: no product created: its link "
                        f"code {problem}; link it by hand: goqctl link "
                        f"{shlex.quote(msg.store)} {shlex.quote(listing.listing_key)} SKU"
                    )
                    continue
                if not listing.link_code:
                    report["unlinked"] += 1
                    continue
                known = listing.quantity is not None
                self.upsert_product(
                    m.UpsertProduct(
                        sku=listing.link_code,
                        name=listing.name,
                        total=max(0, listing.quantity or 0),
                        store=msg.store,
                        count_known=known,
                    )
                )
                report["created"] += 1
                if not known:
                    # Unlimited (or untracked) at the base mall: 0 pushed everywhere would
                    # show it sold out at every mall. Out of sync until given a count.
                    report["count_unknown"] += 1
                    report["problems"].append(
                        f"{msg.store}/{listing.listing_key}: product {listing.link_code} was "
                        "created without a count (unlimited or not tracked at the mall); "
                        "nothing is pushed for it until you set one: "
                        f"goqctl stock set {shlex.quote(listing.link_code)} N"
                    )
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

    def add_product(self, msg: m.AddProduct) -> m.ProductAdded:
        """`goqctl product add`: a product no store's import made, at the operator's count.

        An existing SKU is refused and nothing changes. Then each store's unlinked
        listings whose code matches the SKU under that store's rules are linked as an
        import links them (``_link_by_code``: one that matches another product too, or a
        second listing of it in one store, is ambiguous and said so), which books their
        parked lines and queues their pushes. One request: all of it or none.
        """
        sku = msg.sku
        if problem := _sku_problem(sku):
            raise LedgerError(f"SKU {sku!r} cannot be used: it {problem}; nothing was changed")
        if not 0 <= msg.quantity <= limits.MAX_QUANTITY:
            raise LedgerError(
                f"quantity {msg.quantity} for {sku!r} is out of range "
                f"(0 to {limits.MAX_QUANTITY}); nothing was changed"
            )
        row = self.conn.execute(
            "SELECT total, count_known FROM products WHERE sku = ?", (sku,)
        ).fetchone()
        if row is not None:
            count = str(row[0]) if row[1] else "unknown"
            raise LedgerError(
                f"product {sku!r} already exists (total {count}); nothing was changed. "
                f"To change its count: goqctl stock set {shlex.quote(sku)} N"
            )
        # No first store: the operator's count is nobody's mall count, so no store's
        # earlier sales are taken as already in it.
        self.conn.execute(
            "INSERT INTO products (sku, name, total, first_store, created_at, code_fold, "
            "count_known) VALUES (?, ?, 0, '', ?, ?, 1)",
            (sku, msg.name, self.now(), fold(sku)),
        )
        self._move(sku, msg.quantity, "set", reason="goqctl product add")
        report = _new_report()
        for store, rules in msg.stores:
            for key, code in self._unlinked_matching(store, sku, rules):
                self._link_by_code(store, key, code, rules, report)
        linked: list[tuple[str, str]] = []
        ambiguous: list[tuple[str, str]] = []
        for store, key, state in self.conn.execute(
            "SELECT store, listing_key, link_state FROM listings WHERE sku = ? "
            "ORDER BY store, listing_key",
            (sku,),
        ):
            (linked if state == "linked" else ambiguous).append((store, key))
        return m.ProductAdded(
            sku=sku,
            name=msg.name,
            total=self._total(sku),  # parked sales the new links booked are off it
            linked=tuple(linked[:100]),
            ambiguous=tuple(ambiguous[:100]),
            released=report["released"],
            problems=tuple(report["problems"][:100]),
        )

    def _unlinked_matching(
        self, store: str, sku: str, rules: Sequence[str]
    ) -> list[tuple[str, str]]:
        """``(listing_key, link_code)`` of the unlinked listings of ``store`` whose code
        matches ``sku`` under ``rules``. Exact codes read the (store, link_code) index; a
        store with rules has its unlinked listings folded, as no index holds that.

        INDEXED BY: for ``ORDER BY listing_key`` SQLite otherwise walks the primary key,
        every listing of the store (linked or not) for one code."""
        if not rules:
            return self.conn.execute(
                "SELECT listing_key, link_code FROM listings INDEXED BY listings_by_code "
                "WHERE store = ? AND link_code = ? AND sku IS NULL ORDER BY listing_key",
                (store, sku),
            ).fetchall()
        rs = cast(Sequence[Rule], rules)
        want = normalize(sku, rs)
        rows = self.conn.execute(
            "SELECT listing_key, link_code FROM listings INDEXED BY listings_by_state "
            "WHERE store = ? AND link_state = 'unlinked' AND link_code != '' "
            "AND goqd_fold(link_code) = ? ORDER BY listing_key",
            (store, fold(sku)),
        ).fetchall()
        return [(key, code) for key, code in rows if normalize(code, rs) == want]

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

    def diff_found(self, msg: m.DiffFound) -> m.Done:
        """Keep what a finished diff of a store found, in place of its last one."""
        conn = self.conn
        conn.execute("DELETE FROM diff_listings WHERE store = ?", (msg.store,))
        conn.execute(
            "INSERT OR IGNORE INTO diff_listings (store, listing_key) "
            "SELECT ?, value FROM json_each(?)",
            (msg.store, msgspec.json.encode(msg.listing_keys).decode()),
        )
        (differing,) = conn.execute(
            "SELECT count(*) FROM diff_listings WHERE store = ?", (msg.store,)
        ).fetchone()
        conn.execute(
            "INSERT INTO diff_runs (store, at, checked, differing) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (store) DO UPDATE SET at = excluded.at, checked = excluded.checked, "
            "differing = excluded.differing",
            (msg.store, self.now(), msg.checked, differing),
        )
        return m.Done(changed=differing)

    def reflect_differing(self, store: str) -> m.Done:
        """反映 the listings the last diff of ``store`` found 差異, in one statement.

        A listing that has come to agree since gets the count it already shows, which
        changes nothing at the mall: re-reading every one first would cost a mall read
        per listing and still race with the next sale. Listings no longer linked (or
        whose product has no count) are left out and counted.
        """
        run = self.conn.execute(
            "SELECT at, differing FROM diff_runs WHERE store = ?", (store,)
        ).fetchone()
        if run is None:
            raise LedgerError(
                f"store {store!r} has no diff yet: run `goqctl diff {shlex.quote(store)}` "
                "first; reflect --differing pushes the listings it found"
            )
        at, differing = run
        self._version += 1
        rows = self.conn.execute(
            "INSERT INTO outbox (store, listing_key, sku, quantity, version, not_before, "
            "attempts) SELECT l.store, l.listing_key, l.sku, max(0, p.total - p.held), ?, 0, 0 "
            # CROSS JOIN: the diff's listings drive the loop. Left to itself SQLite walks
            # every listing of the store and looks each up in the diff (80 ms at 100,000
            # listings, for a diff of three).
            "FROM diff_listings d CROSS JOIN listings l ON l.store = d.store "
            "AND l.listing_key = d.listing_key JOIN products p ON p.sku = l.sku "
            "WHERE d.store = ? AND l.link_state = 'linked' AND p.count_known = 1 "
            "ON CONFLICT (store, listing_key) DO UPDATE SET quantity = excluded.quantity, "
            "version = excluded.version, sku = excluded.sku, not_before = 0, attempts = 0 "
            "RETURNING listing_key",
            (self._version, store),
        ).fetchall()
        queued = len(rows)
        if queued:
            self._woken.add(store)
        when = _local_time(at)
        detail = (
            f"{queued} listing(s) queued for a push: the {differing} listing(s) the diff of "
            f"{store} at {when} found 差異"
        )
        if differing - queued:
            detail += f"; {differing - queued} left out: no longer linked, or no count set"
        if differing:
            detail += " (one that agrees by now is sent the count it already shows)"
        return m.Done(changed=queued, detail=detail)

    def set_stocks(self, msg: m.SetStocks) -> m.Done:
        for sku, n in msg.items:
            if msg.mode == "set":
                self.set_stock(sku, n, msg.reason)
            else:
                self.adjust_stock(sku, n, msg.reason)
        return m.Done(changed=len(msg.items))

    # ---------------------------------------------------------------- staged stock imports

    def stock_import(self, msg: m.StockImportStep) -> m.LedgerReply:
        """One step of a staged stock import (``messages.StockImportStep``).

        Not deduplicated by ``_idempotent``: the import row itself carries the request
        id, and every step is safe to repeat (a chunk applied is deleted from staging in
        its own transaction, so it is never applied again).
        """
        match msg:
            case m.BeginStockImport():
                return self._begin_stock_import(msg)
            case m.StageStockRows():
                return self._stage_stock_rows(msg)
            case m.SealStockImport():
                return self._seal_stock_import(msg)
            case m.ApplyStockImport():
                return self._apply_stock_import(msg)
            case m.DiscardStockImport():
                return self._discard_stock_import(msg)
            case m.ListStockImports():
                rows = self.conn.execute(
                    f"SELECT {_IMPORT_COLUMNS} FROM stock_imports i "
                    "WHERE state IN ('staging', 'applying') OR (state = 'discarded' AND "
                    "EXISTS (SELECT 1 FROM stock_import_rows r WHERE r.import_id = i.id)) "
                    "ORDER BY id"
                ).fetchall()
                return m.StockImportList(imports=tuple(_import_job(r) for r in rows))
        raise LedgerError(f"unknown stock import step {type(msg).__name__}")

    def _import_row(self, import_id: int) -> tuple[Any, ...]:
        row = self.conn.execute(
            f"SELECT {_IMPORT_COLUMNS} FROM stock_imports WHERE id = ?", (import_id,)
        ).fetchone()
        if row is None:
            raise LedgerError(f"no stock import {import_id}")
        return cast(tuple[Any, ...], row)

    def _begin_stock_import(self, msg: m.BeginStockImport) -> m.StockImportJob:
        conn = self.conn
        if msg.request_id:
            row = conn.execute(
                f"SELECT {_IMPORT_COLUMNS} FROM stock_imports "
                "WHERE request_id = ? AND state != 'discarded'",
                (msg.request_id,),
            ).fetchone()
            if row is not None:
                if row[3] != msg.digest:
                    raise LedgerError(
                        f"request id {msg.request_id!r} was already used for a different "
                        "stock CSV; nothing was applied: send this file with a new id"
                    )
                if row[1] != "staging":
                    return _import_job(row)
                # Left half-staged by a daemon that stopped: its rows may be incomplete,
                # so it is dropped (its rows are purged later, a chunk at a time) and the
                # file is staged again from the top.
                conn.execute(
                    "UPDATE stock_imports SET state = 'discarded', finished_at = ? WHERE id = ?",
                    (self.now(), row[0]),
                )
        (import_id,) = conn.execute(
            "INSERT INTO stock_imports (request_id, digest, mode, reason, state, created_at) "
            "VALUES (?, ?, ?, ?, 'staging', ?) RETURNING id",
            (msg.request_id, msg.digest, msg.mode, msg.reason, self.now()),
        ).fetchone()
        return m.StockImportJob(
            import_id=import_id, state="staging", request_id=msg.request_id, digest=msg.digest
        )

    def _stage_stock_rows(self, msg: m.StageStockRows) -> m.Done:
        conn = self.conn
        row = self._import_row(msg.import_id)
        if row[1] != "staging":
            raise LedgerError(f"stock import {msg.import_id} is {row[1]}, no longer staging")
        rows = msg.rows
        if not rows:
            return m.Done()
        (missing,) = conn.execute(
            "SELECT min(j.key) FROM json_each(?) j LEFT JOIN products p ON p.sku = j.value "
            "WHERE p.sku IS NULL",
            (msgspec.json.encode([r[1] for r in rows]).decode(),),
        ).fetchone()
        if missing is not None:
            line, sku, _ = rows[missing]
            raise InputError(
                f"{msg.where}: line {line}: sku {sku!r} is not a product goqd has "
                "(see `goqctl products`)"
            )
        if row[8] == "adjust":
            (unknown,) = conn.execute(
                "SELECT min(j.key) FROM json_each(?) j JOIN products p ON p.sku = j.value "
                "WHERE p.count_known = 0",
                (msgspec.json.encode([r[1] for r in rows]).decode(),),
            ).fetchone()
            if unknown is not None:
                line, sku, _ = rows[unknown]
                raise InputError(
                    f"{msg.where}: line {line}: sku {sku!r} has no known count to adjust "
                    "(imported without one); set it with a sku,quantity CSV or "
                    f"`goqctl stock set {sku} N`"
                )
        try:
            conn.executemany(
                "INSERT INTO stock_import_rows (import_id, line, sku, n) VALUES (?, ?, ?, ?)",
                ((msg.import_id, line, sku, n) for line, sku, n in rows),
            )
        except sqlite3.IntegrityError:
            # The unique index found a SKU twice; name the first repeat and its first
            # line (the rows before it in this chunk are in, the savepoint drops them).
            for line, sku, _ in rows:
                (first,) = conn.execute(
                    "SELECT min(line) FROM stock_import_rows WHERE import_id = ? AND sku = ?",
                    (msg.import_id, sku),
                ).fetchone()
                if first is not None and first < line:
                    raise duplicate_sku(msg.where, line, sku, first) from None
            raise
        conn.execute(
            "UPDATE stock_imports SET staged = staged + ? WHERE id = ?",
            (len(rows), msg.import_id),
        )
        return m.Done(changed=len(rows))

    def _seal_stock_import(self, msg: m.SealStockImport) -> m.StockImportJob:
        row = self._import_row(msg.import_id)
        if row[1] == "discarded":
            raise LedgerError(f"stock import {msg.import_id} was discarded; nothing was applied")
        if row[1] == "staging":
            if row[4] != msg.rows:
                raise LedgerError(
                    f"stock import {msg.import_id}: {row[4]} rows staged but {msg.rows} "
                    "read; nothing was applied"
                )
            self.conn.execute(
                "UPDATE stock_imports SET state = 'applying' WHERE id = ?", (msg.import_id,)
            )
            row = self._import_row(msg.import_id)
        return _import_job(row)

    def _apply_stock_import(self, msg: m.ApplyStockImport) -> m.StockImportJob:
        conn = self.conn
        row = self._import_row(msg.import_id)
        if row[1] == "done":
            return _import_job(row)
        if row[1] != "applying":
            # Answered, not refused: the caller tells this lasting state from a failed
            # transaction, which it retries.
            return _import_job(row)
        mode, reason = row[8], row[9]
        limit = max(1, msg.limit)
        rows = conn.execute(
            "SELECT line, sku, n FROM stock_import_rows WHERE import_id = ? ORDER BY line LIMIT ?",
            (msg.import_id, limit),
        ).fetchall()
        applied = skipped = 0
        for _line, sku, n in rows:
            try:
                if mode == "set":
                    self.set_stock(sku, n, reason)
                else:
                    self.adjust_stock(sku, n, reason)
            except (UnknownSku, CountUnknown):
                # Deleted (`goqctl delete`) after its row was staged, or deleted and
                # imported again without a count: nothing to set or adjust.
                skipped += 1
                continue
            applied += 1
        if rows:
            conn.execute(
                "DELETE FROM stock_import_rows WHERE import_id = ? AND line <= ?",
                (msg.import_id, rows[-1][0]),
            )
        conn.execute(
            "UPDATE stock_imports SET applied = applied + ?, skipped = skipped + ? WHERE id = ?",
            (applied, skipped, msg.import_id),
        )
        if len(rows) < limit:  # nothing left: the import is done
            total, skipped_total = row[5] + applied, row[6] + skipped
            detail = ""
            if skipped_total:
                detail = (
                    f"{total} stock count(s) imported; {skipped_total} row(s) skipped: "
                    "their product was deleted while the import ran"
                )
            conn.execute(
                "UPDATE stock_imports SET state = 'done', reply = ?, finished_at = ? WHERE id = ?",
                (
                    msgspec.msgpack.encode(m.Done(changed=total, detail=detail)),
                    self.now(),
                    msg.import_id,
                ),
            )
        crashpoint("stock_import.chunk_applied")
        return _import_job(self._import_row(msg.import_id))

    def _discard_stock_import(self, msg: m.DiscardStockImport) -> m.Done:
        row = self._import_row(msg.import_id)
        if row[1] in ("applying", "done"):
            raise LedgerError(
                f"stock import {msg.import_id} is sealed: it is applied, never discarded"
            )
        if row[1] == "staging":
            self.conn.execute(
                "UPDATE stock_imports SET state = 'discarded', finished_at = ? WHERE id = ?",
                (self.now(), msg.import_id),
            )
        cur = self.conn.execute(
            "DELETE FROM stock_import_rows WHERE import_id = ?1 AND line IN "
            "(SELECT line FROM stock_import_rows WHERE import_id = ?1 ORDER BY line LIMIT ?2)",
            (msg.import_id, max(1, msg.limit)),
        )
        return m.Done(changed=cur.rowcount)

    # ---------------------------------------------------------------- errors

    def record_error(self, msg: m.RecordError) -> m.Done:
        """Open an error, or bump the open one of the same store, code and listing (its
        count, last time, message and mall code follow the latest occurrence)."""
        now = self.now()
        cur = self.conn.execute(
            "UPDATE errors SET last_seen = ?, count = count + 1, message = ?, level = ?, "
            "mall_code = ? WHERE store = ? AND code = ? AND listing_key = ? "
            "AND cleared_at IS NULL",
            (now, msg.message, msg.level, msg.mall_code, msg.store, msg.code, msg.listing_key),
        )
        if cur.rowcount == 0:
            self.conn.execute(
                "INSERT INTO errors (store, level, code, message, listing_key, first_seen, "
                "last_seen, mall_code) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    msg.store,
                    msg.level,
                    msg.code,
                    msg.message,
                    msg.listing_key,
                    now,
                    now,
                    msg.mall_code,
                ),
            )
            return m.Done(changed=1)
        return m.Done(changed=0)

    def resolve_errors(self, msg: m.ResolveErrors) -> m.Done:
        """Mark open errors whose cause went away by itself resolved (``cleared_by``
        "healed"), kept in history. Never level 9: a credential needs the operator."""
        sql = (
            "UPDATE errors SET cleared_at = ?, cleared_by = 'healed' WHERE store = ? "
            "AND listing_key = ? AND cleared_at IS NULL AND level < 9"
        )
        args: list[Any] = [self.now(), msg.store, msg.listing_key]
        if msg.codes:
            sql += " AND code IN (SELECT value FROM json_each(?))"
            args.append(msgspec.json.encode(msg.codes).decode())
        if msg.before is not None:
            sql += " AND last_seen <= ?"
            args.append(msg.before)
        return m.Done(changed=self.conn.execute(sql, args).rowcount)

    def clear_errors(self, msg: m.ClearErrors) -> m.Done:
        now = self.now()
        changed = 0
        if msg.ids:
            for error_id in msg.ids:
                changed += self.conn.execute(
                    "UPDATE errors SET cleared_at = ?, cleared_by = 'operator' "
                    "WHERE id = ? AND cleared_at IS NULL",
                    (now, error_id),
                ).rowcount
        elif msg.store:
            sql = (
                "UPDATE errors SET cleared_at = ?, cleared_by = 'operator' "
                "WHERE store = ? AND cleared_at IS NULL"
            )
            args: tuple[Any, ...] = (now, msg.store)
            if msg.level is not None:
                sql += " AND level = ?"
                args += (msg.level,)
            changed = self.conn.execute(sql, args).rowcount
        else:
            raise LedgerError("say which errors to clear: ids or a store")
        return m.Done(changed=changed)

    def list_errors(self, msg: m.ListErrors) -> m.ErrorList:
        """Errors, highest level first, then newest (by id) first; filtered by store,
        level and code (goqd's or the mall's own) and paged by ``after``, the last id of
        the previous page: ``(level, id)`` is a stable order, whatever recurs meanwhile."""
        sql = (
            "SELECT id, store, level, code, message, listing_key, first_seen, last_seen, count, "
            "cleared_at, cleared_by, mall_code FROM errors WHERE 1=1"
        )
        args: list[Any] = []
        if msg.store:
            sql += " AND store = ?"
            args.append(msg.store)
        if msg.level is not None:
            sql += " AND level = ?"
            args.append(msg.level)
        if msg.code:
            sql += " AND (code = ? OR mall_code = ?)"
            args += [msg.code, msg.code]
        if not msg.include_cleared:
            sql += " AND cleared_at IS NULL"
        if msg.after:
            last = self.conn.execute(
                "SELECT level FROM errors WHERE id = ?", (msg.after,)
            ).fetchone()
            if last is None:
                raise LedgerError(f"no error {msg.after}: page on from an id the list showed")
            sql += " AND (level < ? OR (level = ? AND id < ?))"
            args += [last[0], last[0], msg.after]
        sql += " ORDER BY level DESC, id DESC LIMIT ?"
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
                    cleared_by=r[10],
                    mall_code=r[11],
                )
                for r in self.conn.execute(sql, args)
            )
        )

    def list_parked(self, msg: m.ListParked) -> m.ParkedList:
        """Parked lines in key order from ``after``, each with its listing's state now
        and the command that gets it booked."""
        where = "WHERE (pl.store, pl.order_id, pl.line_id) > (?, ?, ?)"
        args: list[Any] = list(msg.after)
        count_sql = "SELECT count(*) FROM parked_lines"
        count_args: list[Any] = []
        if msg.store:
            where += " AND pl.store = ?"
            args.append(msg.store)
            count_sql += " WHERE store = ?"
            count_args.append(msg.store)
        rows = self.conn.execute(
            "SELECT pl.store, pl.order_id, pl.line_id, pl.listing_key, pl.line, pl.parked_at, "
            "l.sku, l.link_state, l.link_code FROM parked_lines pl LEFT JOIN listings l "
            f"ON l.store = pl.store AND l.listing_key = pl.listing_key {where} "
            "ORDER BY pl.store, pl.order_id, pl.line_id LIMIT ?",
            [*args, msg.limit],
        ).fetchall()
        others: dict[tuple[str, str], list[str]] = {}
        lines = []
        for store, order_id, line_id, key, blob, parked_at, sku, state, code in rows:
            line = _line_decoder.decode(blob)
            # A linked listing's lines are booked when it links; one seen here lost its
            # product (deleted) since, and its SKU means nothing now.
            state = "ambiguous" if state == "ambiguous" else "unlinked"
            if state == "ambiguous":
                keys = others.setdefault((store, sku), self._listings_of(store, sku))
            else:
                sku, keys = None, []
            lines.append(
                m.ParkedRecord(
                    store=store,
                    order_id=order_id,
                    line_id=line_id,
                    listing_key=key,
                    link_code=code or line.link_code,
                    quantity=line.quantity,
                    cancelled=line.cancelled,
                    link_state=state,
                    sku=sku,
                    parked_at=parked_at,
                    action=_park_action(store, key, state, keys),
                )
            )
        (total,) = self.conn.execute(count_sql, count_args).fetchone()
        return m.ParkedList(lines=tuple(lines), total=total)

    # ---------------------------------------------------------------- reads

    def list_products(self, msg: m.ListProducts) -> m.ProductList:
        rows = self.conn.execute(
            "SELECT p.sku, p.name, p.total, p.first_store, "
            "(SELECT count(*) FROM listings l WHERE l.sku = p.sku), p.held, p.count_known "
            "FROM products p WHERE p.sku > ? ORDER BY p.sku LIMIT ?",
            (msg.after, msg.limit),
        ).fetchall()
        return m.ProductList(
            products=tuple(
                m.ProductRecord(
                    sku=r[0],
                    name=r[1],
                    total=r[2],
                    first_store=r[3],
                    listings=r[4],
                    held=r[5],
                    count_known=bool(r[6]),
                )
                for r in rows
            )
        )

    def count_listings(self, msg: m.CountListings) -> m.ListingCount:
        (count,) = self.conn.execute(
            "SELECT count(*) FROM listings INDEXED BY listings_by_state "
            "WHERE store = ? AND link_state = ?",
            (msg.store, msg.state),
        ).fetchone()
        return m.ListingCount(count=count)

    def list_listings(self, msg: m.ListListings) -> m.ListingList:
        """A store's listings in key order, each with its pending push, its product's
        count and its parked lines (the filters: ``messages.ListListings``).

        Every filter applies before ``LIMIT``, so a page shorter than asked is the last.
        A link state reads its own range of ``listings_by_state``; ``parked`` walks the
        store's parked listings (``parked_by_listing``), sorting those after ``after``
        (parked listings are an error state, few). ``search`` is a
        substring test no index can serve: it reads the store's listings from ``after``
        on until the page is full, so paging through all of them reads each listing
        once (measured: tests/bench_listings_scale.py).
        """
        if msg.state not in LISTING_STATES:
            raise LedgerError(
                f"unknown listing state {msg.state!r}: one of {', '.join(LISTING_STATES[1:])}"
            )
        args: list[Any] = []
        if msg.state == "parked":
            # The parked listings first, in key order: a store with 100,000 listings and
            # three of them parked reads three, not the whole store.
            source = (
                "(SELECT DISTINCT listing_key AS k FROM parked_lines WHERE store = ? "
                "AND listing_key > ? ORDER BY listing_key) pk "
                "CROSS JOIN listings l ON l.store = ? AND l.listing_key = pk.k"
            )
            args += [msg.store, msg.after, msg.store]
            where = ["1"]
        else:
            source = "listings l"
            where = ["l.store = ?"]
            args.append(msg.store)
            if msg.state:
                # INDEXED BY: without statistics SQLite walks the primary key's store
                # prefix instead, every listing of the store to find a few ambiguous ones.
                source = "listings l INDEXED BY listings_by_state"
                where.append("l.link_state = ?")
                args.append(msg.state)
            if not msg.keys:
                where.append("l.listing_key > ?")
                args.append(msg.after)
        if msg.keys:
            where.append("l.listing_key IN (SELECT value FROM json_each(?))")
            args.append(msgspec.json.encode(msg.keys).decode())
        if msg.search:
            pattern = "%" + _like_escape(msg.search) + "%"
            like = "LIKE ? ESCAPE '\\'"
            where.append(
                f"(l.listing_key {like} OR l.link_code {like} OR l.sku {like} OR l.name {like})"
            )
            args += [pattern] * 4
        rows = self.conn.execute(
            "SELECT l.store, l.listing_key, l.link_code, l.name, l.sku, l.link_state, l.attrs, "
            "l.last_pushed_qty, l.last_pushed_version, l.last_seen_qty, o.version, l.held, "
            "o.quantity, o.sent_min IS NOT NULL, p.total, p.held, p.count_known, "
            "(SELECT count(*) FROM parked_lines x WHERE x.store = l.store "
            "AND x.listing_key = l.listing_key) "
            f"FROM {source} LEFT JOIN outbox o ON o.store = l.store AND "
            "o.listing_key = l.listing_key LEFT JOIN products p ON p.sku = l.sku "
            f"WHERE {' AND '.join(where)} ORDER BY l.listing_key LIMIT ?",
            [*args, msg.limit],
        ).fetchall()
        return m.ListingList(listings=tuple(_listing_record(r) for r in rows))

    def store_stats(self) -> m.StoreStats:
        """Per-store outbox, parked lines and open errors: small tables, cheap to read."""
        conn = self.conn
        per_store: dict[str, dict[str, Any]] = {}

        def bucket(store: str) -> dict[str, Any]:
            return per_store.setdefault(
                store,
                {
                    "cursor": None,
                    "outbox": 0,
                    "parked": 0,
                    "by_level": {},
                    "held": 0,
                    NOT_LINKED: 0,
                    MULTIPLE_LINKS: 0,
                },
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
        for store, code, n in conn.execute(
            # The open-errors index (store, code, listing_key): no scan of the history.
            "SELECT store, code, count(*) FROM errors WHERE cleared_at IS NULL "
            "AND code IN (?, ?) GROUP BY store, code",
            (NOT_LINKED, MULTIPLE_LINKS),
        ):
            bucket(store)[code] = n
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
                    parked_listings=v[NOT_LINKED],
                    ambiguous_listings=v[MULTIPLE_LINKS],
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


def _sku_problem(code: str) -> str | None:
    """Why ``code`` cannot be a product's SKU, by the rules a CSV's sku column follows
    (``goqd.csvio``): ``None`` when it can."""
    if not code:
        return "is empty"
    if len(code) > limits.MAX_SKU:
        return f"is {len(code)} characters long; a SKU has at most {limits.MAX_SKU}"
    if "\x00" in code:
        return "contains a NUL character"
    return None


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
            "count_unknown",
        ),
        0,
    )
    counts["problems"] = []
    return counts


def _link_report(store: str, report: dict[str, Any]) -> m.LinkReport:
    return m.LinkReport(store=store, **{**report, "problems": tuple(report["problems"][:100])})


def _park_reason(state: str, sku: str | None, others: Sequence[str]) -> str:
    if state == "ambiguous":
        return (
            f"its product {sku!r} has {len(others)} listings in this store "
            f"({', '.join(others)}: 複数の商品が紐づいています)"
        )
    return "the listing is not linked to a product"


def _park_action(store: str, listing_key: str, state: str, others: Sequence[str]) -> str:
    """The command(s) that get a parked line of this listing booked."""
    s = shlex.quote(store)
    if state == "ambiguous":
        return f"goqctl unlink {s} LISTING (the wrong one of {', '.join(others)})"
    return f"goqctl import {s} (links by the link condition), or goqctl link {s} " + (
        f"{shlex.quote(listing_key)} SKU"
    )


_IMPORT_COLUMNS = "id, state, request_id, digest, staged, applied, skipped, reply, mode, reason"
_done_decoder = msgspec.msgpack.Decoder(m.Done)


def _import_job(r: Sequence[Any]) -> m.StockImportJob:
    return m.StockImportJob(
        import_id=r[0],
        state=r[1],
        request_id=r[2],
        digest=r[3],
        staged=r[4],
        applied=r[5],
        skipped=r[6],
        result=_done_decoder.decode(r[7]) if r[7] is not None else None,
    )


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
        pending_quantity=r[12],
        pending_sent=bool(r[13]) and r[12] is not None,
        product_total=r[14],
        product_held=r[15] or 0,
        count_known=r[16] is None or bool(r[16]),
        parked=r[17],
    )


def _local_time(ts: float) -> str:
    try:
        return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    except (ValueError, OverflowError, OSError):
        return f"{ts:.0f}"  # a clock no calendar has (a test's fake one): the number then


def _like_escape(text: str) -> str:
    """``text`` as a LIKE pattern that matches it literally (``ESCAPE '\\'``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
