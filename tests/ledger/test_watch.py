"""The sale watch (docs/design.md §4): a mall's own counter shows a sale before its order API
does (Amazon ~2 minutes later, every mall until the next poll). goqd reads the counters
of low-stock listings, holds back the units a counter lost without a booked order from
every store, and releases the hold when the order is booked — or, if no order ever
explains it, after the next poll, reporting it."""

from __future__ import annotations

import random
from typing import Any

import pytest
import structlog
import trio

from goqd import messages as m
from goqd.errors import MallUnavailable
from goqd.ledger import LedgerClient, queries
from goqd.malls import rakuten
from tests.helpers import checker, rig

# Fixtures ``ledger`` and ``now`` (tests/conftest.py): test_ledger's catalogue.
from tests.helpers.ledger import FakeNow, drain, line, see, total

clock = rig.mock_wall_clock


async def seen(
    client: LedgerClient,
    quantity: int,
    *,
    key: str = "r1-A",
    store: str = "r1",
    at: float = 0.0,
    explained_before: float = 0.0,
) -> int:
    done = await client.ask(
        m.StockSeen(
            store=store,
            counts=(m.SeenCount(listing_key=key, quantity=quantity),),
            read_started=at,
            hold_expiry=1800.0,
            explained_before=explained_before,
        ),
        m.Done,
    )
    return done.changed


async def seen_at(client: LedgerClient, now: FakeNow, t: float, quantity: int, **kw: Any) -> int:
    """A reading taken at ``t`` and handed to the ledger then."""
    now.t = t
    return await seen(client, quantity, at=t, **kw)


async def held(client: LedgerClient, sku: str = "A") -> int:
    return (await client.ask(m.GetHistory(sku=sku, limit=0), m.History)).held


async def values(client: LedgerClient, store: str) -> dict[str, int]:
    return {i.listing_key: i.quantity for i in await drain(client, store)}


# ---------------------------------------------------------------- ledger rules


async def test_a_counter_that_fell_holds_the_units_back_from_every_store(
    ledger: LedgerClient, now: FakeNow
) -> None:
    assert await seen_at(ledger, now, 10, 10) == 0  # the first reading is the baseline
    assert await seen_at(ledger, now, 20, 8) == 1
    assert await total(ledger, "A") == 10  # nothing is booked: the total is the truth
    assert await held(ledger) == 2
    for store in ("r1", "r2", "r3"):
        assert await values(ledger, store) == {f"{store}-A": 8}
    history = await ledger.ask(m.GetHistory(sku="A", limit=1), m.History)
    assert history.movements[0].cause == "hold"
    assert history.movements[0].delta == 0 and history.movements[0].held_after == 2


async def test_the_booked_order_releases_its_hold_and_the_count_stays(
    ledger: LedgerClient, now: FakeNow
) -> None:
    await seen_at(ledger, now, 10, 10)
    await seen_at(ledger, now, 20, 8)
    for store in ("r1", "r2", "r3"):
        await drain(ledger, store)
    now.t = 200
    await see(ledger, line(qty=2, at=150))
    assert (await total(ledger, "A"), await held(ledger)) == (8, 0)
    assert await values(ledger, "r2") == {"r2-A": 8}  # the same count, not 8 + 2


async def test_a_sale_booked_before_the_watch_saw_it_is_not_held_as_well(
    ledger: LedgerClient, now: FakeNow
) -> None:
    await seen_at(ledger, now, 10, 10)
    now.t = 20
    await see(ledger, line(qty=2, at=15))
    assert await seen_at(ledger, now, 30, 8) == 0
    assert await held(ledger) == 0


async def test_a_sale_booked_before_the_first_reading_is_not_held(
    ledger: LedgerClient, now: FakeNow
) -> None:
    # Never read: goqd knows only the 10 the mall last accepted. The sale is booked and
    # the push of 9 is queued but not sent when the watch first reads the 9.
    now.t = 20
    await see(ledger, line(qty=1, at=15))
    assert await seen_at(ledger, now, 30, 9) == 0
    assert await held(ledger) == 0


async def test_a_reading_older_than_a_booking_of_its_listing_is_ignored(
    ledger: LedgerClient, now: FakeNow
) -> None:
    await seen_at(ledger, now, 10, 10)
    now.t = 50
    await see(ledger, line(qty=1, at=45))
    # Read at 40 (before the booking at 50), answered after it: it may predate the sale.
    assert await seen(ledger, 7, at=40) == 0
    assert await held(ledger) == 0


async def test_a_counter_at_a_sent_unacknowledged_push_is_not_taken_for_a_sale(
    ledger: LedgerClient, now: FakeNow
) -> None:
    await seen_at(ledger, now, 10, 10)
    now.t = 20
    await see(ledger, line(key="r2-A", qty=3, at=15), store="r2")  # r1-A: 7 queued
    batch = await ledger.ask(m.TakePushes(store="r1", limit=10), m.PushBatch)
    assert [(i.listing_key, i.quantity) for i in batch.items] == [("r1-A", 7)]
    now.t = 30
    # The push of 7 reached the mall, but its answer was lost (a timeout after apply).
    assert await seen(ledger, 7, at=30) == 0
    assert await held(ledger) == 0


async def test_a_sale_is_seen_while_a_push_waits_unsent(ledger: LedgerClient, now: FakeNow) -> None:
    await seen_at(ledger, now, 10, 10)
    now.t = 20
    await see(ledger, line(key="r2-A", qty=3, at=15), store="r2")  # r1-A: 7 queued, unsent
    now.t = 30
    # r1 still shows 10 less its own sale of 1: the queued 7 cannot have landed.
    assert await seen(ledger, 9, at=30) == 1
    assert await held(ledger) == 1
    assert await values(ledger, "r3") == {"r3-A": 6}


async def test_a_hold_no_poll_explains_is_released_and_reported(
    ledger: LedgerClient, now: FakeNow
) -> None:
    await seen_at(ledger, now, 10, 10)
    await seen_at(ledger, now, 20, 7)  # an edit at the mall, not a sale
    for store in ("r1", "r2", "r3"):
        await drain(ledger, store)
    now.t = 100
    # A poll that began after the counter fell (so covers the sale) booked nothing.
    assert await seen(ledger, 7, at=100, explained_before=90) == 1
    assert await held(ledger) == 0
    assert await values(ledger, "r1") == {"r1-A": 10}  # goqd's count goes back out
    errors = await ledger.ask(m.ListErrors(store="r1"), m.ErrorList)
    assert [e.code for e in errors.errors] == ["count_fell_without_order"]
    assert "r1-A" in errors.errors[0].message


def hms(clock_time: str) -> float:
    """Seconds of the day: readings and bookings at the times of a real run."""
    h, mi, s = (int(x) for x in clock_time.split(":"))
    return float(h * 3600 + mi * 60 + s)


async def _codes(ledger: LedgerClient, store: str = "r1") -> list[str]:
    return [e.code for e in (await ledger.ask(m.ListErrors(store=store), m.ErrorList)).errors]


async def test_a_unit_held_for_a_second_sale_is_as_old_as_that_sale(
    ledger: LedgerClient, now: FakeNow
) -> None:
    """The sequence of a SIGKILL soak (Amazon, run 2): a hold at 07:03:01, a second sale
    at 07:03:14, the first sale booked by a poll that began 07:03:08. The unit still held
    is the second sale's: it stays held at 07:03:22 (no poll could have returned its
    order yet) until its order is booked at 07:03:29, and nothing is reported."""
    await seen_at(ledger, now, hms("07:02:50"), 10)  # the baseline
    assert await seen_at(ledger, now, hms("07:03:01"), 9) == 1  # first sale: 1 held
    assert await seen_at(ledger, now, hms("07:03:14"), 8) == 1  # second sale: 2 held
    assert await held(ledger) == 2
    now.t = hms("07:03:16")
    await see(ledger, line(order="first", qty=1, at=hms("07:03:00")))
    assert (await total(ledger, "A"), await held(ledger)) == (9, 1)
    # The poll that booked it began at 07:03:08: sales before 07:03:03 are all booked.
    covered = hms("07:03:08") - 5.0
    assert await seen_at(ledger, now, hms("07:03:22"), 8, explained_before=covered) == 0
    assert await held(ledger) == 1
    assert await values(ledger, "r2") == {"r2-A": 8}  # not 9: the unit is still held
    assert await _codes(ledger) == []
    now.t = hms("07:03:29")
    await see(ledger, line(order="second", qty=1, at=hms("07:03:13")))
    assert (await total(ledger, "A"), await held(ledger)) == (8, 0)
    assert await values(ledger, "r2") == {"r2-A": 8}
    assert await _codes(ledger) == []


async def test_only_the_hold_layers_no_poll_explained_are_released(
    ledger: LedgerClient, now: FakeNow
) -> None:
    await seen_at(ledger, now, 10, 10)
    await seen_at(ledger, now, 20, 9)  # an edit at the mall: no order will come
    await seen_at(ledger, now, 40, 8)  # a sale
    assert await held(ledger) == 2
    # A poll covering everything before 30 booked nothing: the fall at 20 is released
    # and reported; the one at 40 is not due.
    assert await seen(ledger, 8, at=60, explained_before=30) == 1
    assert await held(ledger) == 1
    errors = (await ledger.ask(m.ListErrors(store="r1"), m.ErrorList)).errors
    assert [e.code for e in errors] == ["count_fell_without_order"]
    assert "fell by 1 " in errors[0].message
    now.t = 70
    await see(ledger, line(qty=1, at=39))
    assert (await total(ledger, "A"), await held(ledger)) == (9, 0)
    assert await values(ledger, "r3") == {"r3-A": 9}


async def test_a_counter_above_goqds_count_is_pushed_again(
    ledger: LedgerClient, now: FakeNow
) -> None:
    await seen_at(ledger, now, 10, 10)
    await seen_at(ledger, now, 20, 12)  # a push the mall acknowledged but did not apply
    assert await values(ledger, "r1") == {"r1-A": 10}
    assert await held(ledger) == 0


async def test_the_watch_list_is_holds_then_recent_sellers_then_the_rest_in_turn(
    ledger: LedgerClient, now: FakeNow
) -> None:
    async def watch(below: int, limit: int = 10, after: str = "") -> m.WatchList:
        return await ledger.ask(
            m.GetWatchList(store="r2", below=below, limit=limit, after=after), m.WatchList
        )

    async def keys(below: int, limit: int = 10) -> tuple[str, ...]:
        return (await watch(below, limit)).listing_keys

    for sku in ("C", "D"):  # two more products, 3 units each, never sold
        await ledger.call(m.UpsertProduct(sku=sku, total=3, store="r1"))
        for store in ("r1", "r2"):
            await ledger.call(m.UpsertListing(store=store, listing_key=f"{store}-{sku}", sku=sku))
    # Nothing sold yet: low-stock listings (at most 5 units) in key order.
    assert await keys(5) == ("r2-B", "r2-C", "r2-D")
    assert await keys(10) == ("r2-A", "r2-B", "r2-C", "r2-D")
    # A round of 2 goes on where the last one stopped, then starts over.
    first = await watch(5, limit=2)
    assert first.listing_keys == ("r2-B", "r2-C") and first.next_after == "r2-C"
    second = await watch(5, limit=2, after=first.next_after)
    assert second.listing_keys == ("r2-D",) and second.next_after == ""
    now.t = 5
    await see(ledger, line(key="r1-D", qty=1, at=5))  # D: 2 left
    now.t = 6
    await see(ledger, line(order="o2", key="r1-A", qty=1, at=6))  # A: 9 left
    # Recent sellers come first (newest first), for half the round.
    assert await keys(10, limit=4) == ("r2-A", "r2-D", "r2-B", "r2-C")
    assert await keys(10, limit=2) == ("r2-A", "r2-B")
    assert await keys(1, limit=4) == ("r2-A", "r2-D")  # recent sellers at any stock
    await seen_at(ledger, now, 10, 9, key="r2-A", store="r2")
    await seen_at(ledger, now, 20, 7, key="r2-A", store="r2")
    assert (await keys(2))[0] == "r2-A"  # held: watched whatever its stock
    await ledger.call(m.SetStock(sku="B", quantity=0, reason="sold out"))
    assert "r2-B" not in await keys(10)  # at 0 the mall cannot sell it: not read


async def test_recent_means_among_the_latest_movements(
    ledger: LedgerClient, now: FakeNow, monkeypatch: pytest.MonkeyPatch
) -> None:
    import goqd.ledger.watch as watch

    await see(ledger, line(key="r1-A", qty=1, at=5))
    await see(ledger, line(order="o2", key="r1-B", qty=1, at=6))
    reply = await ledger.ask(m.GetWatchList(store="r2", below=0, limit=10), m.WatchList)
    assert reply.listing_keys == ("r2-B", "r2-A")
    monkeypatch.setattr(watch, "WATCH_RECENT_MOVES", 1)  # only B's sale is recent now
    reply = await ledger.ask(m.GetWatchList(store="r2", below=0, limit=10), m.WatchList)
    assert reply.listing_keys == ("r2-B",)


async def test_unlinking_a_listing_releases_its_hold(ledger: LedgerClient, now: FakeNow) -> None:
    await seen_at(ledger, now, 10, 10)
    await seen_at(ledger, now, 20, 6)
    assert await held(ledger) == 4
    await ledger.call(m.Unlink(store="r1", listing_key="r1-A"))
    assert await held(ledger) == 0
    assert await values(ledger, "r2") == {"r2-A": 10}


# ---------------------------------------------------------------- end to end


def _ledger_held(run: rig.Running, sku: str) -> tuple[int, int]:
    product = next(p for p in queries.read(run.ledger_path, queries.products) if p.sku == sku)
    return product.total, product.held


def _booked(run: rig.Running, store: str) -> int:
    return len(queries.read(run.ledger_path, queries.order_lines, store))


AMAZON_AND_RAKUTEN = (("am", "amazon"), ("ra", "rakuten"))


def test_an_amazon_sale_reaches_rakuten_long_before_amazon_shows_the_order() -> None:
    async def body(run: rig.Running) -> float:
        market = run.fleet.market(random.Random(5))
        placed_at = clock()
        assert market.place("am", "MUG-WHT", 2, placed_at) is not None
        await rig.wait_for(
            lambda: run.fleet.stock("ra", "MUG-WHT") == 1, timeout=60, what="ra shows 1"
        )
        reached = clock() - placed_at
        assert _booked(run, "am") == 0  # Amazon's order API has not shown it yet
        assert _ledger_held(run, "MUG-WHT") == (3, 2)
        await rig.wait_for(
            lambda: _ledger_held(run, "MUG-WHT") == (1, 0), timeout=600, what="booking"
        )
        assert _booked(run, "am") == 1
        ra_key = run.fleet.keys["ra"]["MUG-WHT"]
        after_drop = list(run.fleet.sims["ra"].listings[ra_key].set_history)
        assert after_drop[-1] == 1 and 3 not in after_drop[after_drop.index(1) :]
        report = checker.check(
            run.fleet.sims, run.ledger_path, initial=run.fleet.initial, keys=run.fleet.keys
        )
        assert report.ok, report.summary()
        return reached

    reached = rig.run_dst(body, seed=21, stores=AMAZON_AND_RAKUTEN)
    assert reached <= 10 + 5  # one watch interval plus the push


def test_without_the_watch_rakuten_keeps_selling_until_amazon_shows_the_order() -> None:
    async def body(run: rig.Running) -> None:
        market = run.fleet.market(random.Random(5))
        placed_at = clock()
        assert market.place("am", "MUG-WHT", 2, placed_at) is not None
        while _booked(run, "am") == 0:
            # Until Amazon's order API shows the order, Rakuten offers all 3 units.
            assert run.fleet.stock("ra", "MUG-WHT") == 3
            assert clock() - placed_at < 600, "never booked"
            await trio.sleep(1)
        assert clock() - placed_at >= 120  # Amazon's documented order delay
        await rig.wait_for(
            lambda: run.fleet.stock("ra", "MUG-WHT") == 1, timeout=30, what="ra shows 1"
        )

    rig.run_dst(body, seed=21, stores=AMAZON_AND_RAKUTEN, watch_interval="0s")


def test_an_edit_at_the_mall_is_held_only_until_the_next_poll_then_reported() -> None:
    async def body(run: rig.Running) -> None:
        ra = run.fleet.sims["ra"]
        key = run.fleet.keys["ra"]["MUG-WHT"]
        ra.listings[key].quantity = 1  # someone lowered it in RMS by hand: not a sale
        await rig.wait_for(
            lambda: _ledger_held(run, "MUG-WHT") == (3, 2), timeout=30, what="the hold"
        )
        await rig.wait_for(
            lambda: _ledger_held(run, "MUG-WHT") == (3, 0), timeout=200, what="the release"
        )
        codes = [
            (e.code, e.listing_key) for e in queries.read(run.ledger_path, queries.errors, "ra")
        ]
        assert ("count_fell_without_order", key) in codes
        await rig.wait_for(
            lambda: run.fleet.stock("ra", "MUG-WHT") == 3 and run.fleet.stock("rb", "MUG-WHT") == 3,
            timeout=60,
            what="goqd's count back at both malls",
        )

    rig.run_dst(body, seed=22)


def test_a_failed_read_before_a_push_is_recorded_and_shown_and_the_push_goes_ahead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failing = False
    real_read = rakuten.RakutenAdapter.read_stock

    async def read_stock(self: Any, keys: Any) -> dict[str, int | None]:
        if failing:
            raise MallUnavailable("503 Service Unavailable", mall="rakuten", store="ra")
        return await real_read(self, keys)

    monkeypatch.setattr(rakuten.RakutenAdapter, "read_stock", read_stock)

    async def body(run: rig.Running) -> None:
        nonlocal failing
        failing = True
        assert run.fleet.market(random.Random(9)).place("rb", "MUG-WHT", 1, clock()) is not None
        run.poll_all()
        # The read before ra's push failed; the push went ahead all the same.
        await rig.wait_for(
            lambda: run.fleet.stock("ra", "MUG-WHT") == 2, timeout=120, what="ra shows 2"
        )
        errors = [(e.code, e.message) for e in queries.read(run.ledger_path, queries.errors, "ra")]
        assert [code for code, _ in errors] == ["mall_unavailable"]
        assert errors[0][1].startswith("read_before_push: ")
        samples = checker.metric_samples(run.metrics_text())
        assert any(
            n == "goqd_mall_requests_total" and ("outcome", "unavailable") in lab and v >= 1
            for (n, lab), v in samples.items()
        )

    # The watch's own reads would fail too: an hour's interval keeps them out of this.
    with structlog.testing.capture_logs() as logs:
        rig.run_dst(body, seed=23, watch_interval="1h")
    degraded = [
        e
        for e in logs
        if e["event"] == "store_state_changed" and e["store"] == "ra" and e["new"] == "degraded"
    ]
    assert degraded and degraded[0]["message"].startswith("read_before_push: ")
