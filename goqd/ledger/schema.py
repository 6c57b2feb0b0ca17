"""The ledger file: its schema, its migrations, and opening it.

Opening refuses, before anything is written, a file that is not a readable goqd ledger,
one from a newer schema, and one this process could read but not write. It must never
replace or truncate an existing file it cannot read: a corrupt ledger or one from a newer
schema raises and the daemon refuses to start.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Literal
from urllib.parse import quote

from goqd.errors import LEVEL_TEMPORARY, LedgerCorrupt, LedgerError, LedgerTooNew
from goqd.linking import fold

SCHEMA_VERSION = 8
APPLICATION_ID = 0x676F7164  # "goqd": marks the file as ours
WAL_AUTOCHECKPOINT_PAGES = 10_000
# The header byte SQLite sets to 2 in a file in WAL mode (the "file format read version"),
# and how much of the header is read to see it.
_WAL_HEADER_OFFSET = 18
_HEADER_BYTES = 100

Synchronous = Literal["full", "normal", "extra", "off"]

MIGRATIONS: list[str] = [
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
    # version 3: the sale watch (goqd.ledger.watch). ``held``: units held back from every
    # store because a mall's own counter fell without an order goqd has booked; a product's
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
    # version 5: staged stock imports (``goqd.ledger.stock_imports``). A large stock CSV is
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
    # (``goqd.ledger.watch.stock_seen``). ``held`` stays their sum and ``held_since`` the oldest
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
    f"""
    ALTER TABLE errors ADD COLUMN mall_code TEXT NOT NULL DEFAULT '';
    ALTER TABLE errors ADD COLUMN cleared_by TEXT NOT NULL DEFAULT '';
    ALTER TABLE products ADD COLUMN count_known INTEGER NOT NULL DEFAULT 1;
    CREATE INDEX errors_open_by_level ON errors (level, id) WHERE cleared_at IS NULL;
    CREATE INDEX errors_by_store ON errors (store, level, id);
    INSERT INTO errors (store, level, code, message, listing_key, first_seen, last_seen)
        SELECT store, {LEVEL_TEMPORARY}, 'listing_not_linked',
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


def open_db(
    path: str,
    *,
    synchronous: Synchronous = "full",
    check: bool = True,
    read_only: bool = False,
    check_access: bool = True,
) -> sqlite3.Connection:
    """Open (or create) the ledger at ``path`` and bring its schema up to date.

    Raises ``LedgerCorrupt`` for a file that is not a readable goqd ledger,
    ``LedgerTooNew`` for a newer schema, and ``LedgerError`` for a ledger this process
    could read but not write (the file, its directory or the mount is read-only): SQLite
    would open such a file read-only without a word, and every booking would fail after
    READY. An existing file is never recreated.

    ``read_only`` (``goqd check-config``): the same refusals for an existing file, but
    nothing is written: no migration, and no -wal/-shm is left beside a file that had
    none. Without ``check_access`` (a reader, ``queries.open_read_only``) it does not
    check that this process could write the ledger, and opens no file of it outside
    SQLite while a -wal says a writer has it open, maybe in this process: closing any
    descriptor of the file drops every POSIX lock this process holds on it, the
    writer's included, and another process could then checkpoint under it.
    """
    memory = path == ":memory:"
    exists = not memory and os.path.exists(path) and os.path.getsize(path) > 0
    if memory:
        header = b""
    elif check_access or not read_only:  # a writer always checks
        header = _check_access(path, exists=exists)
    else:
        header = _read_header(path) if exists and not os.path.exists(path + "-wal") else b""
    # An empty header was not read: SQLite's own first read refuses a file not its own.
    if header and header[:16] != b"SQLite format 3\x00":
        raise LedgerCorrupt(f"{path}: not an SQLite database; refusing to touch it")
    if read_only and not exists:
        raise LedgerError(f"{path}: there is no ledger here yet")
    try:
        if read_only:
            mode = "mode=ro" if _has_journal(path, header) else "immutable=1"
            uri = f"file:{quote(os.path.abspath(path))}?{mode}"
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


def _has_journal(path: str, header: bytes) -> bool:
    """True when a reader must go through a journal beside ``path`` to see all of it.

    Otherwise the file is complete on its own and is read with ``immutable=1``: SQLite
    then creates no -wal and -shm it could not remove. A file in WAL mode is read
    through its -wal; a -journal beside it is no journal of it (a leftover, or a file
    someone made), and reading it with ``mode=ro`` made SQLite create a -wal and a -shm
    beside a ledger that had none. A rollback journal counts only for a file not in WAL
    mode.
    """
    if os.path.exists(path + "-wal"):
        return True
    wal_mode = len(header) > _WAL_HEADER_OFFSET and header[_WAL_HEADER_OFFSET] == 2
    return not wal_mode and os.path.exists(path + "-journal")


def _read_header(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(_HEADER_BYTES)
    except IsADirectoryError:
        raise LedgerCorrupt(f"{path}: a directory, not a ledger file") from None
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read the ledger: {exc.strerror or exc}") from None


def _check_access(path: str, *, exists: bool) -> bytes:
    """Refuse, before SQLite sees it, a ledger this process cannot write; return the
    first ``_HEADER_BYTES`` bytes of an existing file.

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
            return f.read(_HEADER_BYTES)
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
                for statement in _split_sql(MIGRATIONS[target - 1]):
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
