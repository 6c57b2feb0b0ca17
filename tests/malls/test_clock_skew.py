"""A mall whose clock disagrees with goqd's (issue 20, item 1).

goqd measures each mall's clock from the ``Date`` of its responses (one place, the
store's transport: ``goqd.malls.transport``), searches orders by the mall's clock, never
commits a cursor later than the mall's time, reports a skew above the store's limit as a
level-8 ``clock_skew`` error with a metric, and releases no held unit as unexplained while
the clock is off or polls fail. The scenarios run every mall's simulator with its clock
seconds, minutes and nine hours off, in-process under a MockClock (``tests.helpers.rig``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from goqd.errors import LEVEL_TEMPORARY, MallAuthError, MallUnavailable
from goqd.ledger import queries
from goqd.malls.base import StoreContext
from goqd.malls.clock import MallClock, describe_skew, parse_http_date
from goqd.malls.transport import mall_transport, open_mall_client
from goqd.malls.yahoo import YahooAdapter
from goqd.secret import Secret
from goqd.sim.http import Request, Response
from goqd.sim.market import Market, Placed
from goqd.sim.yahoo import SimYahoo
from tests.helpers import checker, rig

clock = rig.mock_wall_clock
HOUR = 3600.0
EVERY_MALL = (
    ("ra", "rakuten"),
    ("ya", "yahoo"),
    ("au", "aupay"),
    ("sh", "shopify"),
    ("am", "amazon"),
)


# ---------------------------------------------------------------- the clock itself


def test_a_date_bounds_the_offset_and_agreeing_dates_narrow_it() -> None:
    mall = MallClock()
    assert mall.skew() is None and mall.floor(100.0) == 100.0 == mall.ceil(100.0)
    # The mall's clock is 9 h 0.4 s ahead; its Date has whole seconds. At 999.95 (the
    # middle of the request) it showed 1000.35 + 9 h, and dated the answer 1000 + 9 h.
    truth = 9 * HOUR + 0.4
    mall.observe(1000.0 + 9 * HOUR, sent=999.7, received=1000.2)
    low, high = mall.floor(0.0), mall.ceil(0.0)
    assert low <= truth < high
    # At 1004.4 it showed 1004.8 + 9 h: dated 1004 + 9 h, another fraction truncated.
    mall.observe(1004.0 + 9 * HOUR, sent=1004.4, received=1004.4)
    assert low <= mall.floor(0.0) <= truth < mall.ceil(0.0) <= high
    assert mall.ceil(0.0) - mall.floor(0.0) < high - low  # together they pin it closer
    skew = mall.skew()
    assert skew is not None and abs(skew - 9 * HOUR) < 1.0
    assert describe_skew(skew) == "9h00m00s ahead of"
    assert describe_skew(-250.4) == "4m10s behind"


@pytest.mark.parametrize(
    "value",
    [None, "", "yesterday", "Sun, 06 Nov 1994 08:49:37", "9" * 80, "Mon, 32 Feb 2026 25:61:61 GMT"],
)
def test_an_unreadable_date_is_no_sample(value: str | None) -> None:
    mall = MallClock()
    mall.observe_date(value, sent=1.0, received=2.0)
    # A date without a zone is UTC (RFC 9110); everything else is ignored.
    assert mall.known == (value == "Sun, 06 Nov 1994 08:49:37")


def test_a_cursor_is_never_later_than_the_mall_clock_when_the_search_ran() -> None:
    mall = MallClock()
    mall.observe(5000.0, sent=5000.0, received=5000.0)  # the clocks agree
    began = 5060.0
    window = mall.window(began, 4990.0, overlap=600.0, initial_lookback=86400.0)
    assert not window.reset and window.end >= began and window.start <= 4990.0 - 600.0
    # During the fetch the mall's clock jumps back nine hours: orders placed from now
    # on are stamped nine hours earlier than the window's end.
    mall.observe(5061.0 - 9 * HOUR, sent=5061.0, received=5061.0)
    cursor = mall.cursor_after(began, window.end)
    assert cursor <= 5061.0 - 9 * HOUR
    # The next poll searches from before the jump's first orders.
    after = mall.window(5120.0, cursor, overlap=600.0, initial_lookback=86400.0)
    assert after.start <= 5061.0 - 9 * HOUR


def test_a_cursor_from_a_clock_that_ran_ahead_is_not_trusted() -> None:
    mall = MallClock()
    mall.observe(5000.0, sent=5000.0, received=5000.0)
    # Written while goqd's clock (or a misread zone) put the mall nine hours ahead.
    future = 5000.0 + 9 * HOUR
    window = mall.window(5010.0, future, overlap=600.0, initial_lookback=86400.0)
    assert window.reset and window.start <= 5010.0 - 86400.0 + 1
    # An ordinary cursor a poll ago is used as it is.
    ok = mall.window(5010.0, 4950.0, overlap=600.0, initial_lookback=86400.0)
    assert not ok.reset and 4950.0 - 600.0 - 3 <= ok.start <= 4950.0 - 600.0


async def test_the_transport_reads_every_date_and_a_retry_after_date_by_the_mall_clock() -> None:
    mall_now = 1_790_000_000.0 + 9 * HOUR

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Date": formatdate(mall_now, usegmt=True)}
        if request.url.path == "/busy":
            # "Come back in 30 s", as a date on the mall's (nine hours ahead) clock.
            headers["Retry-After"] = formatdate(mall_now + 30, usegmt=True)
            return httpx.Response(429, headers=headers)
        return httpx.Response(200, headers=headers)

    mall = MallClock()
    wire = mall_transport(
        transport=httpx.MockTransport(handler),
        clock=lambda: 1_790_000_000.0,
        mall_clock=mall,
    )
    async with open_mall_client(wire, timeout=5.0) as http:
        await http.get("http://mall.invalid/ok")
        skew = mall.skew()
        assert skew is not None and abs(skew - 9 * HOUR) <= 1.0
        busy = await http.get("http://mall.invalid/busy")
    assert busy.headers["retry-after"] == "30"  # not 0 (or nine hours, capped)


# ---------------------------------------------------------------- every mall, skewed


def _booked(run: rig.Running, placed: list[Placed]) -> bool:
    rows = queries.read(run.ledger_path, queries.order_lines)
    booked = {(r.store, r.order_id, r.line_id): r.booked_qty for r in rows}
    return all(
        booked.get((p.store, p.order.order_id, line.line_id)) == line.quantity
        for p in placed
        for line in p.order.lines
    )


def _errors(run: rig.Running, code: str) -> list[tuple[Any, ...]]:
    return [
        (e.store, e.level, e.message)
        for e in queries.read(run.ledger_path, queries.errors)
        if e.code == code
    ]


def _line_rows(run: rig.Running) -> int:
    return len(queries.read(run.ledger_path, queries.order_lines))


async def _sell_round(run: rig.Running, market: Market, placed: list[Placed]) -> None:
    """One order at every store, 20 s apart; then, on every store in turn, an attempt to
    buy the units of the scarce mug: goqd must have taken the first sale off the others."""
    for store in run.fleet.sims:
        got = market.place(store, "TEA-SEN", 1, clock())
        assert got is not None
        placed.append(got)
        await trio.sleep(20)
    for store in run.fleet.sims:
        got = market.place(store, "MUG-WHT", 1, clock())
        if got is not None:
            placed.append(got)
        await trio.sleep(45)


def _skew_scenario(skew: float, *, from_start: bool) -> Callable[[rig.Running], Any]:
    async def body(run: rig.Running) -> None:
        market = run.fleet.market(random.Random(20))
        placed: list[Placed] = []
        if not from_start:
            for sim in run.fleet.sims.values():
                sim.clock_offset = skew  # every mall's clock jumps
        await _sell_round(run, market, placed)
        await rig.wait_for(
            lambda: _booked(run, placed), timeout=900, every=5, what="orders placed while skewed"
        )
        skewed = {store for store, _, _ in _errors(run, "clock_skew")}
        if abs(skew) > 60:
            assert skewed == set(run.fleet.sims)
            for store, handle in run.daemon.handles.items():
                assert (handle.state, handle.error_level) == ("degraded", 8), store
                assert "clock skew" in handle.message and store in handle.message
                measured = handle.mall_clock.skew()
                assert measured is not None and abs(measured - skew) < 2.0
            gauge = checker.metric_samples(run.metrics_text())
            for store in run.fleet.sims:
                value = gauge[("goqd_mall_clock_skew_seconds", (("store", store),))]
                assert abs(value - skew) < 2.0
        else:
            assert not skewed
        # The clocks agree again: orders go on being booked, the stores recover.
        for sim in run.fleet.sims.values():
            sim.clock_offset = 0.0
        await _sell_round(run, market, placed)
        await rig.wait_for(lambda: _booked(run, placed), timeout=900, every=5, what="later orders")
        await rig.wait_for(
            lambda: rig.converged(run.fleet, run.ledger_path),
            timeout=900,
            every=5,
            what="convergence",
        )
        await rig.wait_for(
            lambda: all(h.state == "running" for h in run.daemon.handles.values()),
            timeout=300,
            every=5,
            what="every store running again",
        )
        # Booked exactly once: one ledger row per mall line, at the mall's quantity
        # (converged), and the checker's invariants over the whole run.
        mall_lines = sum(len(o.lines) for s in run.fleet.sims.values() for o in s.orders.values())
        assert _line_rows(run) == mall_lines
        assert market.oversold_units == 0
        assert not _errors(run, "count_fell_without_order")
        report = checker.check(
            run.fleet.sims, run.ledger_path, initial=run.fleet.initial, keys=run.fleet.keys
        )
        assert report.ok, report.summary()

    return body


@pytest.mark.parametrize(
    "skew",
    [7.0, -250.0, 9 * HOUR, -9 * HOUR],
    ids=["7s-ahead", "4m10s-behind", "9h-ahead", "9h-behind"],
)
def test_orders_placed_while_every_mall_clock_jumps_are_booked_once_and_nothing_oversells(
    skew: float,
) -> None:
    rig.run_dst(_skew_scenario(skew, from_start=False), seed=31, stores=EVERY_MALL)


@pytest.mark.parametrize("skew", [9 * HOUR, -9 * HOUR], ids=["9h-ahead", "9h-behind"])
def test_a_host_clock_wrong_from_the_start_loses_no_order(skew: float) -> None:
    # goqd's clock nine hours off every mall's from the first request: the same, seen
    # from goqd, as every mall's clock off by the opposite amount.
    options = {mall: {"clock_offset": skew} for _, mall in EVERY_MALL}
    rig.run_dst(
        _skew_scenario(skew, from_start=True), seed=32, stores=EVERY_MALL, sim_options=options
    )


# ---------------------------------------------------------------- holds while untrusted


def _held(run: rig.Running, sku: str) -> int:
    products = queries.read(run.ledger_path, queries.products)
    return next(p.held for p in products if p.sku == sku)


def test_no_hold_is_released_as_unexplained_while_the_mall_clock_is_off() -> None:
    async def body(run: rig.Running) -> None:
        ra = run.fleet.sims["ra"]
        key = run.fleet.keys["ra"]["MUG-WHT"]
        ra.clock_offset = -9 * HOUR
        await rig.wait_for(
            lambda: run.daemon.handles["ra"].error_level == LEVEL_TEMPORARY,
            timeout=60,
            what="the skew",
        )
        ra.listings[key].quantity = 1  # lowered by hand in RMS: the watch holds 2
        await rig.wait_for(lambda: _held(run, "MUG-WHT") == 2, timeout=60, what="the hold")
        # Five polls and more than the hold expiry go by: nothing is released, since
        # with a clock off goqd cannot tell an unseen sale from an edit.
        await trio.sleep(35 * 60)
        assert _held(run, "MUG-WHT") == 2
        assert not _errors(run, "count_fell_without_order")
        ra.clock_offset = 0.0
        await rig.wait_for(
            lambda: _held(run, "MUG-WHT") == 0, timeout=300, what="the release once trusted"
        )
        assert [e[0] for e in _errors(run, "count_fell_without_order")] == ["ra"]

    rig.run_dst(body, seed=33)


def test_no_hold_is_released_as_unexplained_while_polls_fail() -> None:
    async def body(run: rig.Running) -> None:
        ra = run.fleet.sims["ra"]
        key = run.fleet.keys["ra"]["MUG-WHT"]
        failing = True
        handle = ra.handle

        async def order_api_down(request: Request, api: str) -> Response:
            if failing and "/order/" in request.path:
                return Response(503, b"Service Unavailable", content_type="text/plain")
            return await handle(request, api)

        ra.handle = order_api_down  # type: ignore[method-assign]
        ra.listings[key].quantity = 1
        await rig.wait_for(lambda: _held(run, "MUG-WHT") == 2, timeout=60, what="the hold")
        run.poll_all()
        await trio.sleep(35 * 60)  # past the 30-minute hold expiry, every poll failing
        assert _held(run, "MUG-WHT") == 2
        assert not _errors(run, "count_fell_without_order")
        # Watch reads and pushes go through, but a store whose orders go unseen is not
        # "running".
        assert run.daemon.handles["ra"].state == "degraded"
        failing = False
        await rig.wait_for(
            lambda: _held(run, "MUG-WHT") == 0, timeout=600, what="the release once trusted"
        )

    rig.run_dst(body, seed=34)


# ---------------------------------------------------------------- Yahoo's signatures


def _yahoo(sim: SimYahoo, mall: MallClock) -> tuple[YahooAdapter, httpx.AsyncClient]:
    router = rig.SimRouter({"ya.sim.invalid": sim.app})
    wire = mall_transport(
        transport=router,
        clock=clock,
        mall_clock=mall,
    )
    http = open_mall_client(wire, timeout=10.0)
    ctx = StoreContext(
        store="ya",
        mall="yahoo",
        base_url="http://ya.sim.invalid",
        credentials={k: Secret(v) for k, v in sim.credentials().items()},
        http=http,
        clock=clock,
        urls={"token": "http://ya.sim.invalid/yconnect/v2/token"},
        mall_clock=mall,
    )
    return YahooAdapter(ctx), http


@pytest.mark.parametrize("skew", [9 * HOUR, -9 * HOUR], ids=["ahead", "behind"])
async def test_yahoo_signs_with_its_own_clock_and_a_clock_jump_costs_one_refusal_at_most(
    autojump_clock: trio.testing.MockClock, skew: float
) -> None:
    sim = SimYahoo(shop_id="ya-shop", clock=clock)
    sim.add_item("A-1", quantity=5)
    mall = MallClock()
    adapter, http = _yahoo(sim, mall)
    async with http:
        await adapter.check_credentials()
        sim.clock_offset = skew  # Yahoo's clock jumps (or goqd's, the other way)
        # The first signature carries the time goqd knew: refused, unless a token refresh
        # (its access token expired by Yahoo's new clock) measured the jump first. The
        # refusal's Date measures Yahoo's clock, and the call signed again goes through.
        assert await adapter.read_stock(["A-1"]) == {"A-1": 5}
        assert await adapter.read_stock(["A-1"]) == {"A-1": 5}
    assert sim.bad_signatures == (1 if skew < 0 else 0)
    assert sim.signatures_verified == 3
    measured = mall.skew()
    assert measured is not None and abs(measured - skew) < 2.0


async def test_a_signature_refused_while_the_clock_is_off_is_clock_skew_not_level_9(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sim = SimYahoo(shop_id="ya-shop", clock=clock, clock_offset=9 * HOUR)
    # Yahoo takes no signature from this store at all now (as a key it no longer knows).
    sim.public_key_version = "no-such-version"
    adapter, http = _yahoo(sim, MallClock())
    async with http:
        with pytest.raises(MallUnavailable) as skewed:
            await adapter.read_stock(["A-1"])
    error = skewed.value
    assert not isinstance(error, MallAuthError) and error.level == LEVEL_TEMPORARY
    assert error.code == "clock_skew"
    assert "clock skew" in str(error) and "9h00m" in str(error) and "ahead of" in str(error)
    # The same refusal with the clocks agreeing is what it says: a rejected key.
    sim.clock_offset = 0.0
    adapter, http = _yahoo(sim, MallClock())
    async with http:
        with pytest.raises(MallAuthError):
            await adapter.read_stock(["A-1"])


async def test_yahoo_keeps_no_order_read_in_the_second_it_changed_by_yahoos_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # goqd's clock an hour ahead of Yahoo's: by goqd's clock every answer looks long
    # settled, and one read in the second of a change would hide a later change in it.
    sim = SimYahoo(shop_id="ya-shop", clock=clock, clock_offset=-HOUR)
    sim.add_item("A-1", quantity=10)
    order = sim.place_order([("A-1", 3)])
    assert order is not None
    adapter, http = _yahoo(sim, MallClock())
    async with http:
        first = await adapter.fetch_orders(None)
        assert [ln.quantity for ln in first.lines] == [3]
        stamp = order.updated_at
        sim.edit_quantity(order.order_id, order.lines[0].line_id, 1)
        order.updated_at = stamp  # the same whole second: orderList shows no change
        await trio.sleep(60)
        second = await adapter.fetch_orders(first.cursor)
    assert [ln.quantity for ln in second.lines] == [1]


def test_parse_http_date_reads_the_three_forms_rfc_9110_allows() -> None:
    for text in (
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
    ):
        assert parse_http_date(text) == 784111777.0, text
