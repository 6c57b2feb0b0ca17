"""queries.open_read_only beside a ledger another connection writes: what it reads."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from goqd import messages as m
from goqd.ledger import Ledger, open_db, queries


def _closed_ledger(path: Path) -> None:
    """Product A at 7, and the file closed: no -wal left beside it."""
    ledger = Ledger(open_db(str(path)), now=lambda: 1_000.0)
    ledger.apply_batch([m.UpsertProduct(sku="A", name="tea", total=7, store="s1")])
    ledger.conn.close()
    assert not os.path.exists(f"{path}-wal")


def test_every_read_in_the_block_sees_one_commit(tmp_path: Path) -> None:
    # A checker compares a total with the movements that make it: read statement by
    # statement beside a daemon that commits between them, the two disagreed.
    path = tmp_path / "goqd.db"
    _closed_ledger(path)
    live = Ledger(open_db(str(path)), now=lambda: 2_000.0)
    try:
        with queries.open_read_only(str(path)) as conn:
            totals = queries.totals(conn)
            live.apply_batch([m.SetStock(sku="A", quantity=9)])
            moved = sum(mv.delta for mv in queries.movements(conn, "A"))
        assert totals == {"A": 7} and moved == 7
        with queries.open_read_only(str(path)) as conn:
            assert queries.totals(conn) == {"A": 9}
    finally:
        live.conn.close()


def test_a_daemon_that_opens_the_file_as_it_is_read_is_read_through_its_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With no -wal beside it the file is opened immutable, which never looks at a WAL:
    # a daemon starting in that moment commits where such a reader cannot see.
    path = tmp_path / "goqd.db"
    _closed_ledger(path)
    writers: list[Ledger] = []
    real_open_db = queries.open_db

    def open_then_daemon_starts(*args: object, **kwargs: object) -> sqlite3.Connection:
        conn = real_open_db(*args, **kwargs)  # type: ignore[arg-type]
        if not writers:
            writers.append(Ledger(open_db(str(path)), now=lambda: 2_000.0))
            writers[0].apply_batch([m.SetStock(sku="A", quantity=4)])
        return conn

    monkeypatch.setattr(queries, "open_db", open_then_daemon_starts)
    try:
        with queries.open_read_only(str(path)) as conn:
            assert queries.totals(conn) == {"A": 4}
            assert [mv.cause for mv in queries.movements(conn, "A")] == ["import", "set"]
    finally:
        for writer in writers:
            writer.conn.close()


def _posix_locks(path: Path) -> list[str]:
    inode = os.stat(path).st_ino
    with open("/proc/locks", encoding="ascii") as f:
        return [line for line in f if f":{inode} " in line]


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="reads Linux's lock table")
def test_a_read_beside_a_writer_in_this_process_leaves_the_writers_locks(tmp_path: Path) -> None:
    # Closing any descriptor of a file drops every POSIX lock the process holds on it:
    # a reader that opened the ledger itself (to read its header, to check it could
    # write it) took the writer's shared lock away, and another process could then
    # checkpoint or delete the WAL under the writer.
    path = tmp_path / "goqd.db"
    _closed_ledger(path)
    live = Ledger(open_db(str(path)), now=lambda: 2_000.0)
    try:
        live.conn.execute("BEGIN")
        live.conn.execute("SELECT count(*) FROM products").fetchone()
        held = _posix_locks(path)
        assert held
        with queries.open_read_only(str(path)) as conn:
            assert queries.totals(conn) == {"A": 7}
        assert _posix_locks(path) == held
        live.conn.execute("COMMIT")
    finally:
        live.conn.close()
