"""Benchmark: `goqctl listings` filters, the diff's reads and `reflect --differing` on a
ledger with one store of N listings (100,000 by default).

    .venv/bin/python -m tests.bench_listings_scale [--listings N] [--plans]

Prints the time of each operation (and, with ``--plans``, SQLite's query plans). This is
a benchmark: it prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import msgspec

from goqd import messages as m
from goqd.ledger import Ledger, open_db

STORE = "big"


def build(path: str, n: int) -> Ledger:
    """One store of ``n`` listings, each linked to its own product, except: every 1000th
    unlinked with a parked order line, every 5000th ambiguous; every 10th has a push
    pending."""
    conn = open_db(path, synchronous="off")
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO products (sku, name, total, first_store, created_at, code_fold) "
        "VALUES (?, ?, ?, ?, 0, ?)",
        ((f"SKU-{i:06d}", f"商品 {i} Tシャツ", i % 50, STORE, f"sku-{i:06d}") for i in range(n)),
    )

    def state(i: int) -> str:
        return "unlinked" if i % 1000 == 7 else "ambiguous" if i % 5000 == 3 else "linked"

    conn.executemany(
        "INSERT INTO listings (store, listing_key, link_code, name, sku, link_state, "
        "last_pushed_qty) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            (
                STORE,
                f"item-{i:06d}",
                f"SKU-{i:06d}",
                f"商品 {i} Tシャツ",
                None if state(i) == "unlinked" else f"SKU-{i:06d}",
                state(i),
                i % 50,
            )
            for i in range(n)
        ),
    )
    conn.executemany(
        "INSERT INTO parked_lines VALUES (?, ?, ?, ?, x'', 'unknown_listing', 0)",
        ((STORE, f"o{i}", "1", f"item-{i:06d}") for i in range(n) if i % 1000 == 7),
    )
    conn.executemany(
        "INSERT INTO outbox (store, listing_key, sku, quantity, version) VALUES (?, ?, ?, ?, 1)",
        (
            (STORE, f"item-{i:06d}", f"SKU-{i:06d}", i % 50)
            for i in range(n)
            if i % 10 == 0 and state(i) == "linked"
        ),
    )
    conn.execute("COMMIT")
    return Ledger(conn, now=time.time)


def timed(label: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    print(f"{label:<58} {1000 * (time.perf_counter() - start):9.1f} ms")
    return result


def ask(ledger: Ledger, msg: m.LedgerRequest) -> Any:
    reply = ledger.apply_batch([msg]).replies[0]
    if isinstance(reply, Exception):
        raise reply
    return reply


def page_all(ledger: Ledger, **kw: Any) -> int:
    after, rows = "", 0
    while True:
        page = ask(ledger, m.ListListings(store=STORE, after=after, limit=5000, **kw))
        rows += len(page.listings)
        if len(page.listings) < 5000:
            return rows
        after = page.listings[-1].listing_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listings", type=int, default=100_000)
    parser.add_argument("--plans", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        ledger = timed(
            f"build {args.listings} listings",
            lambda: build(os.path.join(tmp, "l.db"), args.listings),
        )
        for label, kw in (
            ("every listing, 5000 a page", {}),
            ("--state linked, every page", {"state": "linked"}),
            ("--state ambiguous", {"state": "ambiguous"}),
            ("--state parked", {"state": "parked"}),
            ("--search Tシャツ (every listing matches), every page", {"search": "Tシャツ"}),
            ("--search nothing-matches", {"search": "nothing-matches"}),
        ):
            rows = timed(label, lambda kw=kw: page_all(ledger, **kw))
            print(f"{'':<58} {rows:>9} rows")
        timed(
            "one diff page: 100 linked listings",
            lambda: ask(ledger, m.ListListings(store=STORE, limit=100, state="linked")),
        )
        keys = tuple(f"item-{i:06d}" for i in range(100))
        timed(
            "one diff re-read: 100 listings by key",
            lambda: ask(ledger, m.ListListings(store=STORE, keys=keys, limit=100)),
        )
        few = keys[:3]
        ask(ledger, m.DiffFound(store=STORE, listing_keys=few, checked=args.listings))
        timed(
            "reflect --differing of a diff of 3",
            lambda: ask(ledger, m.ReflectDiffering(store=STORE)),
        )
        every = tuple(f"item-{i:06d}" for i in range(args.listings))
        timed(
            f"DiffFound with {len(every)} listings 差異",
            lambda: ask(ledger, m.DiffFound(store=STORE, listing_keys=every, checked=len(every))),
        )
        done = timed(
            "reflect --differing of all of them",
            lambda: ask(ledger, m.ReflectDiffering(store=STORE)),
        )
        print(f"{'':<58} {done.changed:>9} queued")
        if args.plans:
            for msg in (
                m.ListListings(store=STORE, state="ambiguous"),
                m.ListListings(store=STORE, state="parked"),
                m.ListListings(store=STORE, search="x"),
                m.ListListings(store=STORE, keys=keys, limit=100),
                m.ReflectDiffering(store=STORE),
            ):
                explain(ledger, msg)


def explain(ledger: Ledger, msg: m.LedgerRequest) -> None:
    """SQLite's plan for every statement ``msg`` runs that reads a table."""
    seen: list[str] = []
    ledger.conn.set_trace_callback(seen.append)
    try:
        ask(ledger, msg)
    finally:
        ledger.conn.set_trace_callback(None)
    print(f"\n{type(msg).__name__} {msgspec.json.encode(msg).decode()[:100]}")
    for sql in seen:
        if sql.lstrip().upper().startswith(("SELECT", "INSERT")):
            print("  " + " ".join(sql.split())[:160])
            for row in ledger.conn.execute("EXPLAIN QUERY PLAN " + sql):
                print("      " + row[3])


if __name__ == "__main__":
    main()
