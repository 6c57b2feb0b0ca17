"""``goqd bench ledger``: booking throughput through the ledger actor, against the same
transactions written straight with sqlite3 ``executemany`` in the same run.

Both sides use FULL durability (WAL, synchronous=FULL), a catalogue of ``skus``
products each linked in 3 stores, and the same order lines: the raw side is the floor
of what SQLite can do for those rows; the actor side adds the booking rules, the
per-line lookups, the movement history, outbox coalescing and the thread hop.

This is a benchmark: it prints figures; it asserts nothing.
"""

from __future__ import annotations

import os
import resource
import sqlite3
import tempfile
import time
from typing import Any

import msgspec
import trio

from goqd import messages as m
from goqd.ledger import open_ledger, queries
from goqd.ledger.schema import WAL_AUTOCHECKPOINT_PAGES, open_db

STORES = ("s1", "s2", "s3")


def seed_catalogue(path: str, skus: int) -> None:
    """Bulk-load ``skus`` products, each linked in every store (bypasses the actor)."""
    conn = open_db(path)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO products (sku, total, first_store, created_at, code_fold) "
        "VALUES (?, 1000000, 's1', 0, ?)",
        ((f"sku{n}", f"sku{n}") for n in range(skus)),
    )
    conn.executemany(
        "INSERT INTO listings (store, listing_key, link_code, sku, link_state) "
        "VALUES (?, ?, ?, ?, 'linked')",
        ((s, f"{s}-{n}", f"sku{n}", f"sku{n}") for n in range(skus) for s in STORES),
    )
    conn.execute("COMMIT")
    conn.close()


def _lines(total: int, skus: int, per_msg: int) -> list[list[m.OrderLine]]:
    msgs: list[list[m.OrderLine]] = []
    for start in range(0, total, per_msg):
        msgs.append(
            [
                m.OrderLine(
                    order_id=f"o{n}",
                    line_id="1",
                    listing_key=f"s1-{(n * 7919) % skus}",
                    quantity=1 + n % 3,
                    updated_at=float(n),
                )
                for n in range(start, min(total, start + per_msg))
            ]
        )
    return msgs


async def _actor_run(path: str, msgs: list[list[m.OrderLine]], senders: int) -> float:
    async with open_ledger(path, check=False) as ledger:
        queue = list(enumerate(msgs))

        async def sender() -> None:
            while queue:
                i, lines = queue.pop()
                await ledger.call(m.OrderLinesSeen(store="s1", lines=tuple(lines), cursor=str(i)))

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(senders):
                nursery.start_soon(sender)
        return time.perf_counter() - start


def _raw_run(path: str, msgs: list[list[m.OrderLine]], skus: int, group: int) -> float:
    """The same rows, written with executemany, ``group`` messages per transaction."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    # The ledger's own settings, so both sides pay for the same checkpoints.
    conn.execute("PRAGMA cache_size=-65536")
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    conn.execute("PRAGMA journal_size_limit=67108864")
    version = 0
    start = time.perf_counter()
    for g in range(0, len(msgs), group):
        conn.execute("BEGIN IMMEDIATE")
        for i, lines in enumerate(msgs[g : g + group], start=g):
            conn.executemany(
                "INSERT INTO order_lines VALUES (?, ?, ?, ?, ?, ?, ?, 0, '', 0)",
                [
                    (
                        "s1",
                        ln.order_id,
                        ln.line_id,
                        ln.listing_key,
                        "sku" + ln.listing_key.split("-")[1],
                        ln.quantity,
                        ln.updated_at,
                    )
                    for ln in lines
                ],
            )
            conn.executemany(
                "UPDATE products SET total = total - ? WHERE sku = ?",
                [(ln.quantity, "sku" + ln.listing_key.split("-")[1]) for ln in lines],
            )
            conn.executemany(
                "INSERT INTO movements (sku, delta, total_after, cause, store, order_id, "
                "line_id, at) VALUES (?, ?, 0, 'order', 's1', ?, ?, 0)",
                [
                    ("sku" + ln.listing_key.split("-")[1], -ln.quantity, ln.order_id, ln.line_id)
                    for ln in lines
                ],
            )
            rows: list[tuple[Any, ...]] = []
            for ln in lines:
                version += 1
                sku = "sku" + ln.listing_key.split("-")[1]
                rows.extend((s, f"{s}-{sku[3:]}", sku, 0, version) for s in STORES)
            conn.executemany(
                "INSERT INTO outbox (store, listing_key, sku, quantity, version) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (store, listing_key) DO UPDATE SET "
                "quantity = excluded.quantity, version = excluded.version",
                rows,
            )
            conn.execute(
                "INSERT INTO cursors VALUES ('s1', ?, 0) ON CONFLICT(store) DO UPDATE "
                "SET cursor = excluded.cursor",
                (str(i),),
            )
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def bench_ledger(
    *,
    skus: int = 100_000,
    lines: int = 100_000,
    per_msg: int = 100,
    senders: int = 8,
    directory: str | None = None,
) -> dict[str, Any]:
    """Run both sides on fresh files in ``directory`` (default: a temp dir)."""
    msgs = _lines(lines, skus, per_msg)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        actor_db = os.path.join(tmp, "actor.db")
        raw_db = os.path.join(tmp, "raw.db")
        t0 = time.perf_counter()
        seed_catalogue(actor_db, skus)
        seed_catalogue(raw_db, skus)
        seed_s = (time.perf_counter() - t0) / 2
        actor_s = trio.run(_actor_run, actor_db, msgs, senders)
        # The actor's transactions held on average `senders` messages (group commit);
        # the raw side writes the same number of messages per transaction.
        raw_s = _raw_run(raw_db, msgs, skus, senders)
        # Read back as goqd reads a ledger, which refuses a file not marked as one.
        with queries.open_read_only(actor_db) as conn:
            booked = len(queries.order_lines(conn))
    if booked != lines:
        raise RuntimeError(f"benchmark booked {booked} of {lines} lines")
    return {
        "skus": skus,
        "stores_per_sku": len(STORES),
        "lines": lines,
        "lines_per_message": per_msg,
        "senders": senders,
        "synchronous": "FULL",
        "catalogue_seed_s": round(seed_s, 3),
        "actor_s": round(actor_s, 3),
        "raw_s": round(raw_s, 3),
        "actor_lines_per_s": round(lines / actor_s),
        "raw_lines_per_s": round(lines / raw_s),
        "actor_over_raw": round(raw_s / actor_s, 3),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def format_result(result: dict[str, Any], *, as_json: bool) -> str:
    if as_json:
        return msgspec.json.encode(result).decode()
    width = max(len(k) for k in result)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in result.items())
