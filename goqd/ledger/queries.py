"""Reading the ledger: every read of its tables that anything outside the ledger makes.

The daemon's read requests (``goqctl history``, ``errors``, ``listings``, ``status``...)
are answered from here by the ledger actor, on its connection; tests, tools and
benchmarks read through the same functions, so none of them writes SQL against the
schema. Given a path, ``open_read_only`` opens a connection that cannot write (nor
leave a -wal or -shm beside a ledger that had none). Nothing here writes.
"""

from __future__ import annotations

import os
import shlex
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Concatenate, NamedTuple, ParamSpec, TypeVar, cast

import msgspec

from goqd import messages as m
from goqd.errors import LedgerError, UnknownSku
from goqd.ledger.rows import (
    IMPORT_COLUMNS,
    StockImport,
    decode_attrs,
    decode_line,
    fetch_all,
    json_list,
)
from goqd.ledger.schema import open_db
from goqd.ledger.tx import read_meta

S = TypeVar("S", bound=msgspec.Struct)
R = TypeVar("R")
P = ParamSpec("P")

MULTIPLE_LINKS = "multiple_links"  # 複数の商品が紐づいています
NOT_LINKED = "listing_not_linked"  # 連携できない商品: order lines parked for the listing
# `goqctl listings --state`: the link states, and "parked" (listings with parked lines).
LISTING_STATES = ("", "linked", "unlinked", "ambiguous", "parked")
_ERROR_COLUMNS = (
    "id, store, level, code, message, listing_key, first_seen, last_seen, count, "
    "cleared_at, cleared_by, mall_code"
)
_MOVEMENT_COLUMNS = (
    "id, sku, delta, total_after, cause, store, order_id, line_id, reason, oversold, at, held_after"
)


@contextmanager
def open_read_only(path: str, *, check: bool = False) -> Iterator[sqlite3.Connection]:
    """A connection to the ledger at ``path`` that cannot write it; closed on exit.

    Every read in the block sees one snapshot: beside a running daemon, what it had
    committed when the first read began (read statement by statement, a total and the
    movements that make it could come from two different commits).
    ``check`` runs SQLite's quick integrity check first (``LedgerCorrupt`` if it fails).
    """
    wal_before = os.path.exists(path + "-wal")
    conn = _snapshot(path, check)
    # Without a -wal the file is read as immutable, which sees no WAL at all: a daemon
    # that opened it since (its first read creates the -wal) may have committed there.
    # Read through its WAL instead.
    if not wal_before and os.path.exists(path + "-wal"):
        conn.close()
        conn = _snapshot(path, check=False)
    try:
        yield conn
    finally:
        conn.close()


def _snapshot(path: str, check: bool) -> sqlite3.Connection:
    """A read-only connection with its read transaction begun."""
    conn = open_db(path, read_only=True, check=check, check_access=False)
    try:
        conn.execute("PRAGMA query_only=1")
        conn.execute("BEGIN")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except BaseException:
        conn.close()
        raise
    return conn


def read(
    path: str,
    query: Callable[Concatenate[sqlite3.Connection, P], R],
    *args: P.args,
    **kwargs: P.kwargs,
) -> R:
    """``query`` (one of this module's functions) on the ledger at ``path``, read-only:
    ``read(path, order_lines, "ra")``."""
    with open_read_only(path) as conn:
        return query(conn, *args, **kwargs)


def _structs(
    conn: sqlite3.Connection, struct: type[S], sql: str, args: Iterable[Any] = ()
) -> list[S]:
    """The rows of ``sql`` as ``struct``, each column given to the field of its name."""
    cur = conn.execute(sql, tuple(args))
    names = [d[0] for d in cur.description]
    return [struct(**dict(zip(names, row, strict=True))) for row in cur]


# ------------------------------------------------------------------ the ledger's answers


def cursor(conn: sqlite3.Connection, store: str) -> str | None:
    """The store's order cursor, as its last booking left it."""
    row = conn.execute("SELECT cursor FROM cursors WHERE store = ?", (store,)).fetchone()
    return cast(str | None, row[0]) if row else None


def history(conn: sqlite3.Connection, sku: str, limit: int) -> m.History:
    """A product's count and its latest ``limit`` movements, newest first."""
    row = conn.execute("SELECT total, held FROM products WHERE sku = ?", (sku,)).fetchone()
    if row is None:
        raise UnknownSku(f"unknown SKU {sku!r}: see `goqctl products`")
    movements = _structs(
        conn,
        m.Movement,
        f"SELECT {_MOVEMENT_COLUMNS} FROM movements WHERE sku = ? ORDER BY id DESC LIMIT ?",
        (sku, limit),
    )
    total, held = row
    return m.History(sku=sku, total=int(total), held=int(held), movements=tuple(movements))


def listings_of(conn: sqlite3.Connection, store: str, sku: str) -> list[str]:
    """The keys of ``sku``'s listings in ``store``, in key order."""
    return [
        r[0]
        for r in conn.execute(
            "SELECT listing_key FROM listings WHERE store = ? AND sku = ? ORDER BY listing_key",
            (store, sku),
        )
    ]


def park_reason(state: str, sku: str | None, others: Sequence[str]) -> str:
    """Why a listing's order lines are parked, for the operator."""
    if state == "ambiguous":
        return (
            f"its product {sku!r} has {len(others)} listings in this store "
            f"({', '.join(others)}: 複数の商品が紐づいています)"
        )
    return "the listing is not linked to a product"


def park_action(store: str, listing_key: str, state: str, others: Sequence[str]) -> str:
    """The command(s) that get a parked line of this listing booked."""
    s = shlex.quote(store)
    if state == "ambiguous":
        return f"goqctl unlink {s} LISTING (the wrong one of {', '.join(others)})"
    return f"goqctl import {s} (links by the link condition), or goqctl link {s} " + (
        f"{shlex.quote(listing_key)} SKU"
    )


def list_errors(conn: sqlite3.Connection, msg: m.ListErrors) -> m.ErrorList:
    """Errors, highest level first, then newest (by id) first; filtered by store,
    level and code (goqd's or the mall's own) and paged by ``after``, the last id of
    the previous page: ``(level, id)`` is a stable order, whatever recurs meanwhile."""
    sql = f"SELECT {_ERROR_COLUMNS} FROM errors WHERE 1=1"
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
        last = conn.execute("SELECT level FROM errors WHERE id = ?", (msg.after,)).fetchone()
        if last is None:
            raise LedgerError(f"no error {msg.after}: page on from an id the list showed")
        sql += " AND (level < ? OR (level = ? AND id < ?))"
        args += [last[0], last[0], msg.after]
    sql += " ORDER BY level DESC, id DESC LIMIT ?"
    args.append(msg.limit)
    return m.ErrorList(errors=tuple(_structs(conn, m.ErrorRecord, sql, args)))


def list_parked(conn: sqlite3.Connection, msg: m.ListParked) -> m.ParkedList:
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
    rows = conn.execute(
        "SELECT pl.store, pl.order_id, pl.line_id, pl.listing_key, pl.line, pl.parked_at, "
        "l.sku, l.link_state, l.link_code FROM parked_lines pl LEFT JOIN listings l "
        f"ON l.store = pl.store AND l.listing_key = pl.listing_key {where} "
        "ORDER BY pl.store, pl.order_id, pl.line_id LIMIT ?",
        [*args, msg.limit],
    ).fetchall()
    others: dict[tuple[str, str], list[str]] = {}
    lines = []
    for store, order_id, line_id, key, blob, parked_at, sku, state, code in rows:
        line = decode_line(blob)
        # A linked listing's lines are booked when it links; one seen here lost its
        # product (deleted) since, and its SKU means nothing now.
        state = "ambiguous" if state == "ambiguous" else "unlinked"
        if state == "ambiguous":
            keys = others.setdefault((store, sku), listings_of(conn, store, sku))
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
                action=park_action(store, key, state, keys),
            )
        )
    (total,) = conn.execute(count_sql, count_args).fetchone()
    return m.ParkedList(lines=tuple(lines), total=total)


def list_products(conn: sqlite3.Connection, msg: m.ListProducts) -> m.ProductList:
    rows = conn.execute(
        "SELECT p.sku, p.name, p.total, p.first_store, "
        "(SELECT count(*) FROM listings l WHERE l.sku = p.sku), p.held, p.count_known "
        "FROM products p WHERE p.sku > ? ORDER BY p.sku LIMIT ?",
        (msg.after, msg.limit),
    ).fetchall()
    return m.ProductList(
        products=tuple(
            m.ProductRecord(
                sku=sku,
                name=name,
                total=total,
                first_store=first_store,
                listings=n_listings,
                held=held,
                count_known=bool(known),
            )
            for sku, name, total, first_store, n_listings, held, known in rows
        )
    )


def count_listings(conn: sqlite3.Connection, msg: m.CountListings) -> m.ListingCount:
    (count,) = conn.execute(
        "SELECT count(*) FROM listings INDEXED BY listings_by_state "
        "WHERE store = ? AND link_state = ?",
        (msg.store, msg.state),
    ).fetchone()
    return m.ListingCount(count=count)


def list_listings(conn: sqlite3.Connection, msg: m.ListListings) -> m.ListingList:
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
        args.append(json_list(msg.keys))
    if msg.search:
        pattern = "%" + _like_escape(msg.search) + "%"
        like = "LIKE ? ESCAPE '\\'"
        where.append(
            f"(l.listing_key {like} OR l.link_code {like} OR l.sku {like} OR l.name {like})"
        )
        args += [pattern] * 4
    rows = fetch_all(
        conn,
        _ListingLine,
        "SELECT l.store, l.listing_key, l.link_code, l.name, l.sku, l.link_state, l.attrs, "
        "l.last_pushed_qty, l.last_pushed_version, l.last_seen_qty, o.version, l.held, "
        "o.quantity, o.sent_min IS NOT NULL, p.total, p.held, p.count_known, "
        "(SELECT count(*) FROM parked_lines x WHERE x.store = l.store "
        "AND x.listing_key = l.listing_key) "
        f"FROM {source} LEFT JOIN outbox o ON o.store = l.store AND "
        "o.listing_key = l.listing_key LEFT JOIN products p ON p.sku = l.sku "
        f"WHERE {' AND '.join(where)} ORDER BY l.listing_key LIMIT ?",
        [*args, msg.limit],
    )
    return m.ListingList(listings=tuple(_listing_record(r) for r in rows))


def store_stats(conn: sqlite3.Connection) -> m.StoreStats:
    """Per-store outbox, parked lines and open errors: small tables, cheap to read."""
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
        "SELECT store, level, count(*) FROM errors WHERE cleared_at IS NULL GROUP BY store, level"
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
        oversold_units=read_meta(conn, "oversold_units"),
    )


def status(conn: sqlite3.Connection) -> m.LedgerStatus:

    def count(sql: str) -> int:
        return int(conn.execute(sql).fetchone()[0])

    stats = store_stats(conn)
    return m.LedgerStatus(
        products=count("SELECT count(*) FROM products"),
        listings=count("SELECT count(*) FROM listings"),
        order_lines=count("SELECT count(*) FROM order_lines"),
        movements=count("SELECT coalesce(max(id), 0) FROM movements"),
        outbox=sum(x.outbox for x in stats.stores),
        parked=sum(x.parked for x in stats.stores),
        oversold_units=stats.oversold_units,
        duplicates=read_meta(conn, "duplicates"),
        stores=stats.stores,
    )


class _ListingLine(NamedTuple):
    """One row of ``list_listings``: a listing, its pending push and its product."""

    store: str
    listing_key: str
    link_code: str
    name: str
    sku: str | None
    link_state: str
    attrs: bytes | None
    last_pushed_qty: int | None
    last_pushed_version: int | None
    last_seen_qty: int | None
    pending_version: int | None
    held: int
    pending_quantity: int | None
    pending_sent: int | None
    product_total: int | None
    product_held: int | None
    count_known: int | None
    parked: int


def _listing_record(r: _ListingLine) -> m.ListingRecord:
    return m.ListingRecord(
        store=r.store,
        listing_key=r.listing_key,
        link_code=r.link_code,
        name=r.name,
        sku=r.sku,
        link_state=cast(Any, r.link_state),
        attrs=decode_attrs(r.attrs),
        last_pushed_quantity=r.last_pushed_qty,
        last_pushed_version=r.last_pushed_version,
        last_seen_quantity=r.last_seen_qty,
        pending_version=r.pending_version,
        held=r.held,
        pending_quantity=r.pending_quantity,
        pending_sent=bool(r.pending_sent) and r.pending_quantity is not None,
        product_total=r.product_total,
        product_held=r.product_held or 0,
        count_known=r.count_known is None or bool(r.count_known),
        parked=r.parked,
    )


def _like_escape(text: str) -> str:
    """``text`` as a LIKE pattern that matches it literally (``ESCAPE '\\'``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# ------------------------------------------------------------------ tables, for checks
#
# What tests, the reliability checker and the benchmarks read to check the ledger
# against the malls: whole tables (or one store's rows) as named rows.


class Product(NamedTuple):
    sku: str
    name: str
    total: int
    held: int
    count_known: bool
    first_store: str
    created_at: float


class OrderLineRecord(NamedTuple):
    store: str
    order_id: str
    line_id: str
    listing_key: str
    sku: str
    booked_qty: int
    mall_updated_at: float
    terminal: bool
    status: str
    first_seen: float


class ParkedLine(NamedTuple):
    store: str
    order_id: str
    line_id: str
    listing_key: str
    reason: str
    parked_at: float
    line: m.OrderLine


class Listing(NamedTuple):
    store: str
    listing_key: str
    sku: str | None
    link_state: str
    link_code: str
    name: str
    last_pushed_qty: int | None
    last_seen_qty: int | None
    held: int
    watch_qty: int | None


class Push(NamedTuple):
    """An outbox row: a count waiting to be pushed (or not yet acknowledged)."""

    store: str
    listing_key: str
    sku: str
    quantity: int
    version: int
    not_before: float
    attempts: int
    sent_min: int | None


def _rows(
    conn: sqlite3.Connection, row: Callable[..., R], select: str, store: str | None, order: str
) -> list[R]:
    """``select`` (of one store) in ``order``, each row as ``row``."""
    if store is None:
        return fetch_all(conn, row, f"{select} ORDER BY {order}")
    return fetch_all(conn, row, f"{select} WHERE store = ? ORDER BY {order}", (store,))


def products(conn: sqlite3.Connection) -> list[Product]:
    """Every product, by SKU."""
    return [
        Product(sku, name, total, held, bool(known), first, created)
        for sku, name, total, held, known, first, created in conn.execute(
            "SELECT sku, name, total, held, count_known, first_store, created_at "
            "FROM products ORDER BY sku"
        )
    ]


def totals(conn: sqlite3.Connection) -> dict[str, int]:
    """Every product's total, by SKU."""
    return {p.sku: p.total for p in products(conn)}


def order_lines(conn: sqlite3.Connection, store: str | None = None) -> list[OrderLineRecord]:
    """The booked order lines (of one store), in key order."""
    found = _rows(
        conn,
        OrderLineRecord,
        "SELECT store, order_id, line_id, listing_key, sku, booked_qty, mall_updated_at, "
        "terminal, status, first_seen FROM order_lines",
        store,
        "store, order_id, line_id",
    )
    return [r._replace(terminal=bool(r.terminal)) for r in found]


def movements(conn: sqlite3.Connection, sku: str | None = None) -> list[m.Movement]:
    """Every movement (of one SKU), oldest first."""
    where, args = ("", ()) if sku is None else (" WHERE sku = ?", (sku,))
    sql = f"SELECT {_MOVEMENT_COLUMNS} FROM movements{where} ORDER BY id"
    return _structs(conn, m.Movement, sql, args)


def parked_lines(conn: sqlite3.Connection, store: str | None = None) -> list[ParkedLine]:
    """The parked order lines (of one store), in key order."""
    found = _rows(
        conn,
        ParkedLine,
        "SELECT store, order_id, line_id, listing_key, reason, parked_at, line FROM parked_lines",
        store,
        "store, order_id, line_id",
    )
    # Read as the blob it is stored as, then decoded.
    return [r._replace(line=decode_line(cast(bytes, r.line))) for r in found]


def listings(conn: sqlite3.Connection, store: str | None = None) -> list[Listing]:
    """Every listing (of one store), in key order."""
    select = (
        "SELECT store, listing_key, sku, link_state, link_code, name, last_pushed_qty, "
        "last_seen_qty, held, watch_qty FROM listings"
    )
    return _rows(conn, Listing, select, store, "store, listing_key")


def outbox(conn: sqlite3.Connection, store: str | None = None) -> list[Push]:
    """The outbox (of one store), in key order."""
    select = (
        "SELECT store, listing_key, sku, quantity, version, not_before, attempts, sent_min "
        "FROM outbox"
    )
    return _rows(conn, Push, select, store, "store, listing_key")


def errors(
    conn: sqlite3.Connection, store: str | None = None, *, open_only: bool = False
) -> list[m.ErrorRecord]:
    """Every error (of one store; only the open ones), oldest first."""
    where = ["1=1"]
    args: list[Any] = []
    if store is not None:
        where.append("store = ?")
        args.append(store)
    if open_only:
        where.append("cleared_at IS NULL")
    sql = f"SELECT {_ERROR_COLUMNS} FROM errors WHERE {' AND '.join(where)} ORDER BY id"
    return _structs(conn, m.ErrorRecord, sql, args)


def cursors(conn: sqlite3.Connection) -> dict[str, str | None]:
    """Every store's order cursor."""
    return {store: value for store, value in conn.execute("SELECT store, cursor FROM cursors")}


def counter(conn: sqlite3.Connection, name: str) -> int:
    """One of the ledger's counters: ``duplicates`` (order lines seen again) or
    ``oversold_units``; 0 for a name it does not keep."""
    return read_meta(conn, name)


def stock_imports(conn: sqlite3.Connection) -> list[StockImport]:
    """Every staged stock import, oldest first (``StockImport.job()`` as the reply)."""
    return fetch_all(conn, StockImport, f"SELECT {IMPORT_COLUMNS} FROM stock_imports ORDER BY id")


def staged_rows(conn: sqlite3.Connection) -> int:
    """Rows of stock imports still staged (not yet applied, or not yet purged)."""
    return int(conn.execute("SELECT count(*) FROM stock_import_rows").fetchone()[0])


# ------------------------------------------------------------------ the file itself

TABLES = (
    "products",
    "listings",
    "order_lines",
    "movements",
    "outbox",
    "parked_lines",
    "errors",
    "cursors",
    "requests",
    "meta",
    "stock_imports",
    "stock_import_rows",
    "diff_runs",
    "diff_listings",
)


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version the file is at (``schema.SCHEMA_VERSION`` once migrated)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def schema_names(conn: sqlite3.Connection) -> set[str]:
    """The names of the file's tables and indexes."""
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}


def table(conn: sqlite3.Connection, name: str) -> list[tuple[Any, ...]]:
    """Every row of one of ``TABLES``, every column, in key order: what a migration
    must leave as it was."""
    if name not in TABLES:
        raise LedgerError(f"no table {name!r} in the ledger: one of {', '.join(TABLES)}")
    return [tuple(r) for r in conn.execute(f"SELECT * FROM {name} ORDER BY 1, 2")]
