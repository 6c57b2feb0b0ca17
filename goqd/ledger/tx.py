"""The state one batch of ledger requests shares: the connection and what it changed.

``Tx`` is what every function of the ledger's modules takes. It lives as long as the
``Ledger`` and is reset by ``Ledger.apply_batch`` for each batch; its counters are
rolled back with a request that is refused.
"""

from __future__ import annotations

import sqlite3

from goqd.wallclock import WallClock


class Tx:
    """The connection, the clock, and what the batch in progress has changed.

    ``version``: the outbox version last handed out (kept in ``meta`` at commit);
    ``dirty``: SKUs whose total changed, queued for their listings at commit;
    ``woken``: stores whose outbox changed, woken after the commit;
    ``oversold`` and ``lines``: the batch's counts for the metrics;
    ``parked_stores``: the stores with parked lines (most of the time none, and booking
    skips the per-line parked lookup then).
    """

    def __init__(self, conn: sqlite3.Connection, now: WallClock) -> None:
        self.conn = conn
        self.now = now
        self.version = read_meta(conn, "version")
        self.parked_stores: set[str] = {
            r[0] for r in conn.execute("SELECT DISTINCT store FROM parked_lines")
        }
        self.dirty: set[str] = set()
        self.woken: set[str] = set()
        self.oversold = 0
        self.lines = 0


def read_meta(conn: sqlite3.Connection, key: str) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else 0


def set_meta(conn: sqlite3.Connection, key: str, value: int) -> None:
    conn.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))


def bump_meta(conn: sqlite3.Connection, key: str, by: int) -> None:
    if by:
        conn.execute("UPDATE meta SET value = value + ? WHERE key = ?", (by, key))
