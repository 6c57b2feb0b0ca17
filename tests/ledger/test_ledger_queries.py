"""goqd.ledger.queries: the read-only way into the ledger for everything outside it."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from goqd import messages as m
from goqd.errors import LEVEL_TEMPORARY
from goqd.ledger import queries
from goqd.ledger.db import Ledger
from goqd.ledger.schema import open_db


def _side_files(path: Path) -> list[str]:
    return [s for s in ("-wal", "-shm", "-journal") if os.path.exists(f"{path}{s}")]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _seeded(path: Path) -> None:
    """A closed ledger: product A (10) linked in stores s1 and s2, one order booked in
    s1, one line parked in s2, one error open in s2."""
    ledger = Ledger(open_db(str(path)), now=lambda: 1_000.0)
    replies = ledger.apply_batch(
        [
            m.UpsertProduct(sku="A", name="tea", total=10, store="s1"),
            m.UpsertListing(store="s1", listing_key="k1", sku="A"),
            m.UpsertListing(store="s2", listing_key="k2", sku="A"),
            m.OrderLinesSeen(
                store="s1",
                cursor="c-1",
                lines=(
                    m.OrderLine(
                        order_id="o1", line_id="1", listing_key="k1", quantity=3, updated_at=2e3
                    ),
                ),
            ),
            m.OrderLinesSeen(
                store="s2",
                lines=(
                    m.OrderLine(
                        order_id="o2", line_id="1", listing_key="nobody", quantity=1, updated_at=2e3
                    ),
                ),
            ),
        ]
    ).replies
    assert not [r for r in replies if isinstance(r, Exception)], replies
    ledger.conn.close()


def test_the_tables_read_as_named_rows_of_what_the_ledger_did(tmp_path: Path) -> None:
    path = tmp_path / "goqd.db"
    _seeded(path)
    with queries.open_read_only(str(path)) as conn:
        assert queries.totals(conn) == {"A": 7}
        [product] = queries.products(conn)
        assert (product.sku, product.name, product.count_known, product.first_store) == (
            "A",
            "tea",
            True,
            "s1",
        )
        [booked] = queries.order_lines(conn)
        assert (booked.store, booked.order_id, booked.sku, booked.booked_qty) == (
            "s1",
            "o1",
            "A",
            3,
        )
        assert queries.order_lines(conn, "s2") == []
        assert [(mv.cause, mv.delta, mv.total_after) for mv in queries.movements(conn, "A")] == [
            ("import", 10, 10),
            ("order", -3, 7),
        ]
        [parked] = queries.parked_lines(conn)
        assert (parked.store, parked.listing_key, parked.reason) == (
            "s2",
            "nobody",
            "unknown_listing",
        )
        assert parked.line.quantity == 1  # the line as the mall showed it, decoded
        assert {(x.store, x.listing_key, x.link_state) for x in queries.listings(conn)} == {
            ("s1", "k1", "linked"),
            ("s2", "k2", "linked"),
            ("s2", "nobody", "unlinked"),
        }
        assert {(p.store, p.listing_key, p.quantity) for p in queries.outbox(conn)} == {
            ("s1", "k1", 7),
            ("s2", "k2", 7),
        }
        [error] = queries.errors(conn, "s2", open_only=True)
        assert (error.code, error.level, error.listing_key) == (
            "listing_not_linked",
            LEVEL_TEMPORARY,
            "nobody",
        )
        assert queries.cursors(conn) == {"s1": "c-1"}
        assert queries.counter(conn, "duplicates") == 0
        assert queries.stock_imports(conn) == [] and queries.staged_rows(conn) == 0


def test_reading_by_path_writes_nothing_and_leaves_no_journal_files(tmp_path: Path) -> None:
    path = tmp_path / "goqd.db"
    _seeded(path)
    before = _digest(path)
    assert _side_files(path) == []
    with queries.open_read_only(str(path), check=True) as conn:
        assert queries.totals(conn) == {"A": 7}
        with pytest.raises(sqlite3.OperationalError):
            conn.execute("DELETE FROM products")
    assert _side_files(path) == [] and _digest(path) == before


def test_a_stray_journal_file_does_not_make_a_read_create_a_wal_and_shm(tmp_path: Path) -> None:
    # A -journal beside a ledger in WAL mode is no journal of it (SQLite never writes
    # one in WAL mode). Reading through it with mode=ro made SQLite create a -wal and
    # a -shm beside a ledger that had none.
    path = tmp_path / "goqd.db"
    _seeded(path)
    Path(f"{path}-journal").touch()
    before = _digest(path)
    open_db(str(path), read_only=True).close()
    with queries.open_read_only(str(path)) as conn:
        assert queries.totals(conn) == {"A": 7}
    assert _side_files(path) == ["-journal"] and _digest(path) == before


def test_a_read_beside_the_running_ledger_sees_what_it_committed(tmp_path: Path) -> None:
    path = tmp_path / "goqd.db"
    _seeded(path)
    live = Ledger(open_db(str(path)), now=lambda: 3_000.0)
    try:
        live.apply_batch([m.SetStock(sku="A", quantity=4)])  # in the WAL, not checkpointed
        with queries.open_read_only(str(path)) as conn:
            assert queries.totals(conn) == {"A": 4}
            assert queries.history(conn, "A", 1).movements[0].cause == "set"
        live.apply_batch([m.SetStock(sku="A", quantity=5)])  # the writer carries on
    finally:
        live.conn.close()
