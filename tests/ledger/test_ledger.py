"""The ledger's booking rules, outbox, parking, operator requests and refusals."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import trio

from goqd import messages as m
from goqd.errors import LedgerCorrupt, LedgerTooNew, UnknownSku
from goqd.ledger import SCHEMA_VERSION, LedgerClient, open_db
from tests.helpers.ledger import (
    FakeNow,
    drain,
    line,
    see,
    total,
)


async def test_an_order_line_lowers_total_and_queues_a_push_to_every_linked_store(
    ledger: LedgerClient,
) -> None:
    result = await see(ledger, line(qty=2))
    assert result.booked == 1
    assert await total(ledger, "A") == 8
    for store in ("r1", "r2", "r3"):
        items = await drain(ledger, store)
        assert [(i.listing_key, i.quantity) for i in items] == [(f"{store}-A", 8)]


async def test_the_same_line_twice_is_booked_once(ledger: LedgerClient) -> None:
    await see(ledger, line(qty=2))
    again = await see(ledger, line(qty=2))
    assert again.booked == 0 and again.duplicates == 1
    assert await total(ledger, "A") == 8
    status = await ledger.ask(m.GetLedgerStatus(), m.LedgerStatus)
    assert status.duplicates == 1


async def test_quantity_edit_is_corrected_by_the_difference(ledger: LedgerClient) -> None:
    await see(ledger, line(qty=3, at=100))
    await see(ledger, line(qty=1, at=200))
    assert await total(ledger, "A") == 9
    history = await ledger.ask(m.GetHistory(sku="A"), m.History)
    assert [mv.cause for mv in history.movements][:2] == ["correction", "order"]


async def test_cancellation_restores_and_a_stale_live_copy_never_undoes_it(
    ledger: LedgerClient,
) -> None:
    await see(ledger, line(qty=2, at=100))
    await see(ledger, line(qty=2, at=200, cancelled=True, terminal=True))
    assert await total(ledger, "A") == 10
    # A copy from an overlapping window, older and newer in time, both live.
    stale = await see(ledger, line(qty=2, at=150))
    later = await see(ledger, line(qty=2, at=300))
    assert stale.stale == 1 and later.stale == 1
    assert await total(ledger, "A") == 10


async def test_an_older_observation_changes_nothing(ledger: LedgerClient) -> None:
    await see(ledger, line(qty=1, at=200))
    result = await see(ledger, line(qty=5, at=100))
    assert result.stale == 1
    assert await total(ledger, "A") == 9


async def test_an_order_first_seen_cancelled_books_nothing(ledger: LedgerClient) -> None:
    result = await see(ledger, line(qty=4, cancelled=True, terminal=True))
    assert result.booked == 1
    assert await total(ledger, "A") == 10
    assert await drain(ledger, "r2") == []


async def test_absurd_quantities_are_rejected_naming_the_order_and_change_nothing(
    ledger: LedgerClient,
) -> None:
    result = await see(
        ledger,
        line(order="bad", qty=-3),
        line(order="huge", qty=10_000_000),
        line(order="zero", qty=0),
        line(order="ok", qty=1),
    )
    assert {r.order_id for r in result.rejected} == {"bad", "huge", "zero"}
    assert all(r.order_id in r.reason for r in result.rejected)
    assert result.booked == 1
    assert await total(ledger, "A") == 9
    errors = await ledger.ask(m.ListErrors(store="r1"), m.ErrorList)
    assert {e.code for e in errors.errors} == {"bad_order_line"}


async def test_the_cursor_commits_with_the_lines(ledger: LedgerClient) -> None:
    await see(ledger, line(), cursor="2026-11-27T10:00:00+0900")
    cursor = await ledger.ask(m.GetCursor(store="r1"), m.Cursor)
    assert cursor.cursor == "2026-11-27T10:00:00+0900"


async def test_oversold_units_are_recorded_and_zero_is_pushed(ledger: LedgerClient) -> None:
    result = await see(ledger, line(key="r1-B", qty=7))
    assert result.oversold_units == 2
    assert await total(ledger, "B") == -2
    items = await drain(ledger, "r2")
    assert [(i.listing_key, i.quantity) for i in items] == [("r2-B", 0)]
    history = await ledger.ask(m.GetHistory(sku="B"), m.History)
    assert history.movements[0].oversold == 2
    status = await ledger.ask(m.GetLedgerStatus(), m.LedgerStatus)
    assert status.oversold_units == 2


async def test_bursts_coalesce_into_one_row_per_listing_with_the_newest_version(
    ledger: LedgerClient,
) -> None:
    for n in range(5):
        await see(ledger, line(order=f"o{n}", qty=1))
    batch = await ledger.ask(m.TakePushes(store="r2", limit=100), m.PushBatch)
    assert len(batch.items) == 1
    assert batch.items[0].quantity == 5


async def test_an_outbox_row_is_deleted_only_for_the_version_the_mall_accepted(
    ledger: LedgerClient,
) -> None:
    await see(ledger, line(order="o1", qty=1))
    first = (await ledger.ask(m.TakePushes(store="r2", limit=10), m.PushBatch)).items[0]
    await see(ledger, line(order="o2", qty=1))  # newer version while the push is in flight
    await ledger.call(
        m.PushesDone(
            store="r2",
            outcomes=(
                m.PushOutcome(
                    listing_key=first.listing_key, version=first.version, accepted=True, quantity=9
                ),
            ),
        )
    )
    pending = (await ledger.ask(m.TakePushes(store="r2", limit=10), m.PushBatch)).items
    assert len(pending) == 1 and pending[0].quantity == 8 and pending[0].version > first.version


async def test_a_rejected_listing_is_recorded_and_does_not_hold_back_the_rest(
    ledger: LedgerClient, now: FakeNow
) -> None:
    await see(ledger, line(key="r1-A", qty=1), line(order="o2", key="r1-B", qty=1))
    batch = await ledger.ask(m.TakePushes(store="r2", limit=10), m.PushBatch)
    outcomes = tuple(
        m.PushOutcome(
            listing_key=i.listing_key,
            version=i.version,
            accepted=i.listing_key != "r2-A",
            code="IE0003",
            message="quantity out of range",
            quantity=i.quantity,
        )
        for i in batch.items
    )
    await ledger.call(m.PushesDone(store="r2", outcomes=outcomes))
    assert (await ledger.ask(m.TakePushes(store="r2", limit=10), m.PushBatch)).items == ()
    errors = (await ledger.ask(m.ListErrors(store="r2"), m.ErrorList)).errors
    # goqd's documented code, the mall's own beside it.
    assert [(e.listing_key, e.code, e.mall_code) for e in errors] == [
        ("r2-A", "listing_rejected", "IE0003")
    ]
    now.t += 301  # retried after the back-off
    retry = (await ledger.ask(m.TakePushes(store="r2", limit=10), m.PushBatch)).items
    assert [i.listing_key for i in retry] == ["r2-A"]


async def test_lines_for_unknown_listings_are_parked_then_booked_when_linked(
    ledger: LedgerClient,
) -> None:
    result = await see(ledger, line(key="r1-NEW", qty=2))
    assert result.parked == 1
    assert await total(ledger, "A") == 10
    listings = (await ledger.ask(m.ListListings(store="r1"), m.ListingList)).listings
    assert any(lst.listing_key == "r1-NEW" and lst.link_state == "unlinked" for lst in listings)
    # Seen again while parked: still parked, not booked twice later.
    assert (await see(ledger, line(key="r1-NEW", qty=2))).parked == 1
    await ledger.call(m.UpsertProduct(sku="NEW", total=6))
    done = await ledger.ask(m.Link(store="r1", listing_key="r1-NEW", sku="NEW"), m.Done)
    assert done.released == 1
    assert await total(ledger, "NEW") == 4
    assert (await see(ledger, line(key="r1-NEW", qty=2))).duplicates == 1


async def test_two_listings_of_one_product_in_a_store_are_ambiguous_until_unlinked(
    ledger: LedgerClient,
) -> None:
    await ledger.call(m.UpsertListing(store="r2", listing_key="r2-A2", sku="A"))
    errors = (await ledger.ask(m.ListErrors(store="r2"), m.ErrorList)).errors
    assert {e.listing_key for e in errors if e.code == "multiple_links"} == {"r2-A", "r2-A2"}
    assert all("複数の商品が紐づいています" in e.message for e in errors)
    parked = await see(ledger, line(key="r2-A", qty=3), store="r2")
    assert parked.parked == 1
    assert await total(ledger, "A") == 10
    done = await ledger.ask(m.Unlink(store="r2", listing_key="r2-A2"), m.Done)
    assert done.released == 1
    assert await total(ledger, "A") == 7
    open_errors = (await ledger.ask(m.ListErrors(store="r2"), m.ErrorList)).errors
    assert [e for e in open_errors if e.code == "multiple_links"] == []


async def test_operator_request_applied_once_per_request_id(ledger: LedgerClient) -> None:
    first = await ledger.ask(m.AdjustStock(sku="A", delta=5, request_id="req-1"), m.StockChanged)
    second = await ledger.ask(m.AdjustStock(sku="A", delta=5, request_id="req-1"), m.StockChanged)
    assert first == second
    assert await total(ledger, "A") == 15
    changed = await ledger.ask(m.SetStock(sku="A", quantity=3, request_id="req-2"), m.StockChanged)
    assert changed.delta == -12 and await total(ledger, "A") == 3


async def test_history_lists_every_movement_with_its_cause(ledger: LedgerClient) -> None:
    await see(ledger, line(qty=2, at=1))
    await see(ledger, line(qty=2, at=2, cancelled=True, terminal=True))
    await ledger.call(m.AdjustStock(sku="A", delta=-1, reason="damaged"))
    await ledger.call(m.SetStock(sku="A", quantity=20, reason="stocktake"))
    history = await ledger.ask(m.GetHistory(sku="A"), m.History)
    causes = [mv.cause for mv in reversed(history.movements)]
    assert causes == ["import", "order", "cancel", "adjust", "set"]
    assert sum(mv.delta for mv in history.movements) == history.total == 20


async def test_unknown_sku_is_refused_without_touching_other_requests(ledger: LedgerClient) -> None:
    with pytest.raises(UnknownSku):
        await ledger.call(m.AdjustStock(sku="NOPE", delta=1))
    assert await total(ledger, "A") == 10


async def test_group_commit_answers_every_concurrent_caller(ledger: LedgerClient) -> None:
    results: list[m.OrderLinesBooked] = []

    async def one(n: int) -> None:
        results.append(await see(ledger, line(order=f"c{n}", qty=1)))

    async with trio.open_nursery() as nursery:
        for n in range(50):
            nursery.start_soon(one, n)
    assert len(results) == 50 and sum(r.booked for r in results) == 50
    assert await total(ledger, "A") == -40


async def test_errors_are_counted_and_cleared(ledger: LedgerClient) -> None:
    for _ in range(3):
        await ledger.call(m.RecordError(store="r1", level=9, code="mall_auth", message="expired"))
    errors = (await ledger.ask(m.ListErrors(store="r1"), m.ErrorList)).errors
    assert len(errors) == 1 and errors[0].count == 3 and errors[0].level == 9
    cleared = await ledger.ask(m.ClearErrors(store="r1", level=9), m.Done)
    assert cleared.changed == 1
    assert (await ledger.ask(m.ListErrors(store="r1"), m.ErrorList)).errors == ()
    # Neither ids nor a store would clear every store's errors: the request is refused
    # where it is built (and decoded off the socket), before it reaches the ledger.
    with pytest.raises(ValueError, match="needs error ids or a store"):
        m.ClearErrors()


async def test_listing_attrs_change_queues_a_push_carrying_them(ledger: LedgerClient) -> None:
    await ledger.call(
        m.SetListingAttrs(
            store="r2", listing_key="r2-A", lead_time_days=3, restock_date="2026-12-24"
        )
    )
    items = await drain(ledger, "r2")
    assert len(items) == 1
    assert items[0].attrs.lead_time_days == 3 and items[0].attrs.restock_date == "2026-12-24"


async def test_delete_product_unlinks_and_stops_syncing(ledger: LedgerClient) -> None:
    await ledger.call(m.DeleteProduct(sku="B"))
    products = (await ledger.ask(m.ListProducts(), m.ProductList)).products
    assert [p.sku for p in products] == ["A"]
    parked = await see(ledger, line(key="r1-B", qty=1))
    assert parked.parked == 1


# ------------------------------------------------------------------ opening the file


def test_a_file_that_is_not_sqlite_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "goqd.db"
    path.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(LedgerCorrupt, match="not an SQLite database"):
        open_db(str(path))
    assert path.read_bytes().startswith(b"this is not a database")


def test_another_applications_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerCorrupt, match="not a goqd ledger"):
        open_db(str(path))


def test_a_ledger_from_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "goqd.db")
    open_db(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(LedgerTooNew, match="newer goqd"):
        open_db(path)


def test_a_damaged_ledger_fails_its_integrity_check(tmp_path: Path) -> None:
    path = str(tmp_path / "goqd.db")
    conn = open_db(path)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO movements (sku, delta, total_after, cause, at) VALUES (?, 1, 1, 'adjust', 0)",
        [(f"sku{n:06d}",) for n in range(20000)],
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # scribble over pages in the middle of the file
        f.seek(size // 2)
        f.write(b"\xff" * 65536)
    with pytest.raises(LedgerCorrupt):
        conn = open_db(path)
        # Some damage only shows when the pages are read.
        conn.execute("SELECT sum(delta), max(sku) FROM movements").fetchone()
    assert os.path.getsize(path) == size


def test_reopening_keeps_everything(tmp_path: Path) -> None:
    from goqd.ledger import queries
    from goqd.ledger.db import Ledger

    path = str(tmp_path / "goqd.db")
    ledger = Ledger(open_db(path), now=lambda: 1.0)
    ledger.apply_batch([m.UpsertProduct(sku="A", total=4)])
    ledger.conn.close()
    again = Ledger(open_db(path), now=lambda: 2.0)
    assert queries.history(again.conn, "A", 10).total == 4


async def test_orders_older_than_the_product_are_recorded_but_not_taken_off_again(
    ledger: LedgerClient, now: FakeNow
) -> None:
    now.t = 1000.0
    await ledger.call(m.UpsertProduct(sku="NEW", total=5, store="r1"))
    await ledger.call(m.UpsertListing(store="r1", listing_key="r1-NEW", sku="NEW"))
    await ledger.call(m.UpsertListing(store="r2", listing_key="r2-NEW", sku="NEW"))
    # A first poll looks back a day: this sale happened before the import, whose count (5)
    # already reflects it.
    old = await see(ledger, line(order="old", key="r1-NEW", qty=2, at=500.0))
    assert old.before_import == 1 and old.booked == 0
    assert await total(ledger, "NEW") == 5
    fresh = await see(ledger, line(order="new", key="r1-NEW", qty=1, at=1500.0))
    assert fresh.booked == 1 and await total(ledger, "NEW") == 4
    # Its cancellation after the import is real: the units come back.
    await see(ledger, line(order="old", key="r1-NEW", qty=2, at=1600.0, cancelled=True))
    assert await total(ledger, "NEW") == 6
    # An old sale in another store is booked: the imported count did not know it.
    other = await see(ledger, line(order="o2", key="r2-NEW", qty=1, at=500.0), store="r2")
    assert other.booked == 1 and await total(ledger, "NEW") == 5


async def test_a_first_push_compares_with_the_count_goqd_last_saw_at_the_mall(
    ledger: LedgerClient,
) -> None:
    async def previous(store: str) -> int | None:
        [item] = (await ledger.ask(m.TakePushes(store=store, limit=10), m.PushBatch)).items
        return item.previous_quantity

    # Never pushed, never read: nothing to compare with.
    await ledger.call(m.UpsertListing(store="r5", listing_key="r5-A", sku="A"))
    assert await previous("r5") is None
    # Never pushed: the count the import read there, so a sale made at that mall since
    # is not overwritten blind (the compare-and-set finds it stale).
    await ledger.call(m.UpsertListing(store="r4", listing_key="r4-A", sku="A", seen_quantity=7))
    assert await previous("r4") == 7
    # The sale watch read the counter since: that is newer than the import's reading.
    await ledger.call(
        m.StockSeen(
            store="r4",
            counts=(m.SeenCount(listing_key="r4-A", quantity=6),),
            read_started=0.0,
            hold_expiry=1800.0,
            explained_before=0.0,
        )
    )
    assert await previous("r4") == 6
    # Once the mall took a count from goqd, that count.
    await drain(ledger, "r4")
    await ledger.call(m.QueuePushes(store="r4", listing_keys=("r4-A",)))
    assert await previous("r4") == 10
