"""The last diff of each store, and pushing what it found (``goqctl reflect --differing``).

A finished diff replaces the store's last one: when it ran, what it counted, and the
listings it found 差異. Kept in the ledger so a reflect after a restart still knows.
"""

from __future__ import annotations

import datetime
import shlex

from goqd import messages as m
from goqd.errors import LedgerError
from goqd.ledger.outbox import queue_sql
from goqd.ledger.rows import json_list
from goqd.ledger.tx import Tx

# CROSS JOIN: the diff's listings drive the loop. Left to itself SQLite walks every
# listing of the store and looks each up in the diff (80 ms at 100,000 listings, for a
# diff of three).
_QUEUE_DIFFERING = queue_sql(
    "diff_listings d CROSS JOIN listings l ON l.store = d.store "
    "AND l.listing_key = d.listing_key JOIN products p ON p.sku = l.sku",
    "d.store = ?",
    returning="listing_key",
)


def diff_found(tx: Tx, msg: m.DiffFound) -> m.Done:
    """Keep what a finished diff of a store found, in place of its last one."""
    conn = tx.conn
    conn.execute("DELETE FROM diff_listings WHERE store = ?", (msg.store,))
    conn.execute(
        "INSERT OR IGNORE INTO diff_listings (store, listing_key) "
        "SELECT ?, value FROM json_each(?)",
        (msg.store, json_list(msg.listing_keys)),
    )
    (differing,) = conn.execute(
        "SELECT count(*) FROM diff_listings WHERE store = ?", (msg.store,)
    ).fetchone()
    conn.execute(
        "INSERT INTO diff_runs (store, at, checked, differing) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (store) DO UPDATE SET at = excluded.at, checked = excluded.checked, "
        "differing = excluded.differing",
        (msg.store, tx.now(), msg.checked, differing),
    )
    return m.Done(changed=differing)


def reflect_differing(tx: Tx, store: str) -> m.Done:
    """反映 the listings the last diff of ``store`` found 差異, in one statement.

    A listing that has come to agree since gets the count it already shows, which
    changes nothing at the mall: re-reading every one first would cost a mall read
    per listing and still race with the next sale. Listings no longer linked (or
    whose product has no count) are left out and counted.
    """
    run = tx.conn.execute(
        "SELECT at, differing FROM diff_runs WHERE store = ?", (store,)
    ).fetchone()
    if run is None:
        raise LedgerError(
            f"store {store!r} has no diff yet: run `goqctl diff {shlex.quote(store)}` "
            "first; reflect --differing pushes the listings it found"
        )
    at, differing = run
    tx.version += 1
    queued = len(tx.conn.execute(_QUEUE_DIFFERING, (tx.version, store)).fetchall())
    if queued:
        tx.woken.add(store)
    detail = (
        f"{queued} listing(s) queued for a push: the {differing} listing(s) the diff of "
        f"{store} at {_local_time(at)} found 差異"
    )
    if differing - queued:
        detail += f"; {differing - queued} left out: no longer linked, or no count set"
    if differing:
        detail += " (one that agrees by now is sent the count it already shows)"
    return m.Done(changed=queued, detail=detail)


def _local_time(ts: float) -> str:
    try:
        return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    except (ValueError, OverflowError, OSError):
        return f"{ts:.0f}"  # a clock no calendar has (a test's fake one): the number then
