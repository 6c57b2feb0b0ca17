"""au PAY マーケット: the adapter against the simulator over loopback, and edge cases
through httpx.MockTransport with real-shaped bodies from tests/fixtures/aupay/."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import pytest
import trio

from goqd.errors import (
    LEVEL_CREDENTIAL,
    ConfigError,
    MallAuthError,
    MallError,
    MallProtocolError,
    MallRateLimited,
    MallUnavailable,
)
from goqd.malls.aupay import SPEC, AupayAdapter
from goqd.malls.base import StoreContext
from goqd.messages import ListingAttrs, MallListing, OrderLine, PushItem
from goqd.sim.aupay import SimAupay
from goqd.sim.http import serve_sim
from tests.helpers import paths
from tests.helpers.malls import serve_mall, store_context

FIXTURES = paths.FIXTURES / "aupay"
BASE = 1_767_225_600.0  # 2026-01-01 09:00 JST
SHOP = "12345678"
DAY = 86400.0


class Clock:
    """The wall clock shared by the simulator and the adapter; ``offset`` moves it."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return BASE + trio.current_time() + self.offset


def make_ctx(
    url: str,
    http: httpx.AsyncClient,
    clock: Callable[[], float],
    credentials: dict[str, str],
    **options: Any,
) -> StoreContext:
    return store_context("aupay", url, http, clock, credentials, store="au1", options=options)


@asynccontextmanager
async def open_store(
    sim: SimAupay, clock: Clock, *, credentials: dict[str, str] | None = None, **options: Any
) -> AsyncIterator[AupayAdapter]:
    async with serve_mall(sim) as shop:
        creds = credentials if credentials is not None else sim.credentials()
        yield AupayAdapter(make_ctx(shop.url, shop.http, clock, creds, **options))


def new_sim(clock: Clock, **kwargs: Any) -> SimAupay:
    sim = SimAupay(shop_id=SHOP, clock=clock, **kwargs)
    sim.add_item("TOWEL-01", 10, name="今治タオル")
    sim.add_choice_item(
        "TSHIRT-01", [("-red", "-s", 3), ("-red", "-m", 4), ("-blue", "-", 5)], name="Tシャツ"
    )
    return sim


def api_calls(sim: SimAupay, api: str) -> int:
    return sum(1 for r in sim.requests if r.api == api)


def by_line(lines: tuple[OrderLine, ...]) -> dict[str, OrderLine]:
    return {line.line_id: line for line in lines}


# --------------------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------------------


async def test_bearer_key_is_accepted_and_expiry_is_issue_date_plus_90_days(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = Clock()
    sim = new_sim(clock)
    async with open_store(sim, clock) as adapter:
        await adapter.check_credentials()
        assert sim.requests[-1].status == 200
        expiry = await adapter.credential_expiry()
    # Issued 2026-01-01 (JST): valid until 2026-04-01 00:00 JST.
    assert expiry == BASE - 9 * 3600 + 90 * DAY
    assert SPEC.credential_fields == ("api_key", "shop_id")


async def test_wrong_revoked_and_aged_keys_raise_auth_error_without_the_key(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = Clock()
    sim = new_sim(clock)
    good = sim.credentials()
    wrong = {**good, "api_key": "f" * 64}
    async with open_store(sim, clock, credentials=wrong) as adapter:
        with pytest.raises(MallAuthError) as excinfo:
            await adapter.check_credentials()
    assert excinfo.value.level == LEVEL_CREDENTIAL
    assert "PME0106" in str(excinfo.value)
    assert "f" * 64 not in str(excinfo.value)

    async with open_store(sim, clock, credentials=good) as adapter:
        await adapter.check_credentials()
        sim.expire_credentials()  # the operator's key was revoked
        with pytest.raises(MallAuthError) as excinfo:
            await adapter.fetch_orders(None)
        assert good["api_key"] not in str(excinfo.value)
        assert SHOP not in str(excinfo.value)

    renewed = sim.issue_credentials()
    async with open_store(sim, clock, credentials=renewed) as adapter:
        await adapter.check_credentials()
        clock.offset = 91 * DAY  # the 90-day lifetime runs out on the mall's clock
        with pytest.raises(MallAuthError):
            await adapter.check_credentials()


async def test_expired_credential_fault_and_wrong_shop_are_auth_errors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = Clock()
    sim = new_sim(clock)
    async with open_store(sim, clock, credentials={**sim.credentials(), "shop_id": "999"}) as a:
        with pytest.raises(MallAuthError):
            await a.check_credentials()
    sim.faults.expired_credential = True
    async with open_store(sim, clock) as adapter:
        with pytest.raises(MallAuthError):
            await adapter.push_stock(
                [PushItem(listing_key="TOWEL-01", sku="T", quantity=1, version=1)]
            )
    assert sim.stock("TOWEL-01") == 10


# --------------------------------------------------------------------------------------
# Orders
# --------------------------------------------------------------------------------------


async def test_orders_are_fetched_across_pages(autojump_clock: trio.testing.MockClock) -> None:
    clock = Clock()
    sim = new_sim(clock)
    sim.listings["TSHIRT-01/-red-m"].quantity = 100
    for _ in range(7):
        assert sim.place_order([("TOWEL-01", 1), ("TSHIRT-01/-red-m", 1)]) is not None
        await trio.sleep(60)
    async with open_store(sim, clock, page_size=3) as adapter:
        page = await adapter.fetch_orders(None)
    assert api_calls(sim, "searchTradeInfoListProc") == 3  # 3 + 3 + 1
    assert page.orders_seen == 7
    assert len(page.lines) == 14
    assert {line.listing_key for line in page.lines} == {"TOWEL-01", "TSHIRT-01/-red-m"}
    assert all(line.quantity == 1 and not line.cancelled for line in page.lines)
    assert len({(line.order_id, line.line_id) for line in page.lines}) == 14


async def test_status_change_and_cancellation_are_seen_next_poll_with_newer_updated_at(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = Clock()
    sim = new_sim(clock)
    order = sim.place_order([("TOWEL-01", 2)])
    assert order is not None
    line_id = order.lines[0].line_id
    async with open_store(sim, clock) as adapter:
        first = by_line((await adapter.fetch_orders(None)).lines)[line_id]
        assert (first.status, first.cancelled, first.quantity) == ("新規受付", False, 2)

        await trio.sleep(30)
        sim.advance(order.order_id)
        page = await adapter.fetch_orders(None)
        shipped = by_line(page.lines)[line_id]
        assert shipped.status == "発送待ち" and not shipped.cancelled
        assert shipped.updated_at > first.updated_at

        await trio.sleep(30)
        sim.cancel_order(order.order_id)
        cancelled = by_line((await adapter.fetch_orders(page.cursor)).lines)[line_id]
    assert sim.stock("TOWEL-01") == 10  # the mall put its stock back
    assert cancelled.status == "キャンセル"
    assert cancelled.cancelled and cancelled.terminal
    assert cancelled.updated_at > shipped.updated_at


async def test_line_cancel_cancels_only_that_line(autojump_clock: trio.testing.MockClock) -> None:
    clock = Clock()
    sim = new_sim(clock)
    order = sim.place_order([("TOWEL-01", 1), ("TSHIRT-01/-red-s", 2)])
    assert order is not None
    towel, shirt = (line.line_id for line in order.lines)
    async with open_store(sim, clock) as adapter:
        before = by_line((await adapter.fetch_orders(None)).lines)
        sim.cancel_line(order.order_id, shirt)
        after = by_line((await adapter.fetch_orders(None)).lines)
    assert sim.stock("TSHIRT-01/-red-s") == 3
    assert after[shirt].cancelled and not after[shirt].terminal
    assert after[shirt].updated_at > before[shirt].updated_at
    assert not after[towel].cancelled and after[towel].quantity == 1


async def test_review_rejection_cancels_while_fraud_review_decrements_and_pending_cancel_is_skipped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = Clock()
    sim = new_sim(clock)
    rejected, reviewed, pending = (sim.place_order([("TOWEL-01", 1)]) for _ in range(3))
    assert rejected and reviewed and pending
    sim.reject_order(rejected.order_id)
    sim.set_status(reviewed.order_id, "不正取引審査中")
    sim.set_status(pending.order_id, "キャンセル受付中")
    async with open_store(sim, clock) as adapter:
        lines = {line.order_id: line for line in (await adapter.fetch_orders(None)).lines}
    assert lines[rejected.order_id].cancelled and lines[rejected.order_id].terminal
    assert not lines[reviewed.order_id].cancelled
    assert pending.order_id not in lines  # keeps whatever was booked


async def test_store_status_override_is_honoured(autojump_clock: trio.testing.MockClock) -> None:
    clock = Clock()
    sim = new_sim(clock)
    order = sim.place_order([("TOWEL-01", 1)])
    assert order is not None
    sim.set_status(order.order_id, "同梱待ち")  # a shop-defined status
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_sim, sim.app)
        async with httpx.AsyncClient(timeout=10.0) as http:
            ctx = make_ctx(url, http, clock, sim.credentials())
            plain = AupayAdapter(ctx)
            custom = AupayAdapter(msgspec.structs.replace(ctx, live_statuses=("同梱待ち",)))
            assert (await plain.fetch_orders(None)).lines == ()
            assert len((await custom.fetch_orders(None)).lines) == 1
        nursery.cancel_scope.cancel()


async def test_overlapping_poll_returns_unchanged_lines_again_with_the_same_updated_at(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = Clock()
    sim = new_sim(clock)
    sim.place_order([("TOWEL-01", 1)])
    async with open_store(sim, clock) as adapter:
        first = await adapter.fetch_orders(None)
        await trio.sleep(180)
        again = await adapter.fetch_orders(first.cursor)
    assert again.lines == first.lines  # the ledger dedupes; same stamp, no spurious change
    assert msgspec.json.decode(again.cursor)["end"] > msgspec.json.decode(first.cursor)["end"]


async def test_first_poll_looks_back_the_initial_window_and_never_before_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = Clock()
    sim = new_sim(clock)
    old = sim.place_order([("TOWEL-01", 1)])
    await trio.sleep(2 * DAY)
    recent = sim.place_order([("TOWEL-01", 1)])
    assert old and recent
    async with open_store(sim, clock) as adapter:
        first = await adapter.fetch_orders(None)
        assert {line.order_id for line in first.lines} == {recent.order_id}
        # The old order changes: it is within the 14-day change window but predates goqd.
        sim.cancel_order(old.order_id)
        await trio.sleep(600)
        later = await adapter.fetch_orders(first.cursor)
    assert {line.order_id for line in later.lines} == {recent.order_id}


async def test_updated_at_never_goes_backwards_across_a_restart_and_a_clock_step_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = Clock()
    sim = new_sim(clock)
    order = sim.place_order([("TOWEL-01", 1)])
    assert order is not None
    async with open_store(sim, clock) as adapter:
        first = await adapter.fetch_orders(None)
    clock.offset = -3600.0  # NTP stepped the wall clock back an hour
    sim.cancel_order(order.order_id)
    async with open_store(sim, clock) as restarted:  # a fresh adapter: no memory but the cursor
        later = await restarted.fetch_orders(first.cursor)
    (line,) = later.lines
    assert line.cancelled
    assert line.updated_at >= first.lines[0].updated_at


# --------------------------------------------------------------------------------------
# Stock pushes
# --------------------------------------------------------------------------------------


async def test_push_over_the_batch_limit_splits_calls_and_changes_the_mall(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = Clock()
    sim = SimAupay(shop_id=SHOP, clock=clock)
    for n in range(450):
        sim.add_item(f"ITEM{n:04d}", 0)
    items = [
        PushItem(listing_key=f"ITEM{n:04d}", sku=f"S{n}", quantity=n % 7, version=n)
        for n in range(450)
    ]
    async with open_store(sim, clock) as adapter:
        assert adapter.limits.push_batch == 200
        outcomes = await adapter.push_stock(items)
    assert sim.update_calls == 3  # 200 + 200 + 50
    assert all(o.accepted for o in outcomes)
    assert [o.version for o in outcomes] == list(range(450))
    assert all(sim.stock(f"ITEM{n:04d}") == n % 7 for n in range(450))


async def test_choice_stock_push_sets_each_choice_with_imported_or_looked_up_codes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = Clock()
    sim = new_sim(clock)
    imported = ListingAttrs(extra={"item_code": "TSHIRT-01", "choice_h": "-red", "choice_v": "-s"})
    items = [
        PushItem(listing_key="TSHIRT-01/-red-s", sku="TS", quantity=11, version=1, attrs=imported),
        # Registered from an order line, never imported: the codes are looked up.
        PushItem(listing_key="TSHIRT-01/-blue", sku="TB", quantity=12, version=2),
        PushItem(listing_key="TOWEL-01", sku="T", quantity=13, version=3),
    ]
    async with open_store(sim, clock) as adapter:
        outcomes = await adapter.push_stock(items)
    assert [o.accepted for o in outcomes] == [True, True, True]
    assert sim.stock("TSHIRT-01/-red-s") == 11
    assert sim.stock("TSHIRT-01/-blue") == 12
    assert sim.stock("TSHIRT-01/-red-m") == 4  # untouched
    assert sim.stock("TOWEL-01") == 13
    assert sim.update_calls == 1  # both choices went in one stockUpdateItem


async def test_refused_items_leave_the_others_applied(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = Clock()
    sim = new_sim(clock)
    sim.add_item("MUG-01", 1)
    red = ListingAttrs(extra={"choice_h": "-red", "choice_v": "-m"})
    gone = ListingAttrs(extra={"choice_h": "-green", "choice_v": "-l"})  # deleted at the mall
    items = [
        PushItem(listing_key="TOWEL-01", sku="T", quantity=5, version=1),
        PushItem(listing_key="NO-SUCH-ITEM", sku="X", quantity=5, version=2),
        PushItem(listing_key="MUG-01", sku="M", quantity=100_000, version=3),  # over the max
        PushItem(listing_key="TSHIRT-01/-red-m", sku="TM", quantity=8, version=4, attrs=red),
        PushItem(listing_key="TSHIRT-01/-green-l", sku="TG", quantity=8, version=5, attrs=gone),
    ]
    async with open_store(sim, clock) as adapter:
        outcomes = {o.listing_key: o for o in await adapter.push_stock(items)}
    assert outcomes["TOWEL-01"].accepted and sim.stock("TOWEL-01") == 5
    assert not outcomes["NO-SUCH-ITEM"].accepted
    assert outcomes["NO-SUCH-ITEM"].code == "PME0203"
    assert "存在しません" in outcomes["NO-SUCH-ITEM"].message
    assert not outcomes["MUG-01"].accepted and sim.stock("MUG-01") == 1
    # The mall refused the T-shirt item for one choice; the other choice was resent alone.
    assert outcomes["TSHIRT-01/-red-m"].accepted and sim.stock("TSHIRT-01/-red-m") == 8
    assert not outcomes["TSHIRT-01/-green-l"].accepted
    assert outcomes["TSHIRT-01/-green-l"].code == "PME0204"


async def test_oversize_batch_is_refused_whole_by_the_mall_and_raised(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = Clock()
    sim = SimAupay(shop_id=SHOP, clock=clock)
    for n in range(201):
        sim.add_item(f"ITEM{n:04d}", 0)
    items = [
        PushItem(listing_key=f"ITEM{n:04d}", sku="S", quantity=1, version=n) for n in range(201)
    ]
    async with open_store(sim, clock, push_batch=500) as adapter:
        with pytest.raises(MallUnavailable, match="PME0301"):
            await adapter.push_stock(items)
    assert sim.stock("ITEM0000") == 0  # nothing of an oversize request is applied


async def test_choice_item_without_choices_is_skipped_on_import(
    autojump_clock: trio.testing.MockClock,
) -> None:
    body = fixture("search_stocks.xml").replace(
        b"<itemCode>TOWEL-01</itemCode>\n      <stockSegment>1</stockSegment>",
        b"<itemCode>TOWEL-01</itemCode>\n      <stockSegment>2</stockSegment>",
    )
    assert b"<stockSegment>2</stockSegment>\n      <stockCount>12" in body
    async with mock_store(lambda request: xml(body), fetch_names=False) as adapter:
        keys = [x.listing_key async for x in adapter.iter_listings()]
    assert "TOWEL-01" not in keys and "CANDLE-01/-wt" in keys


async def test_choice_unknown_to_the_mall_is_refused_without_a_push(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = Clock()
    sim = new_sim(clock)
    async with open_store(sim, clock) as adapter:
        (outcome,) = await adapter.push_stock(
            [PushItem(listing_key="TSHIRT-01/-pink", sku="P", quantity=1, version=9)]
        )
    assert not outcome.accepted and outcome.code == "choice_unknown"
    assert sim.update_calls == 0


async def test_push_that_times_out_after_the_mall_applied_it_is_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = Clock()
    sim = new_sim(clock)
    sim.faults.timeout_after_apply = True
    async with open_store(sim, clock) as adapter:
        with pytest.raises(MallUnavailable):
            await adapter.push_stock(
                [PushItem(listing_key="TOWEL-01", sku="T", quantity=3, version=1)]
            )
    assert sim.stock("TOWEL-01") == 3  # why the ledger must resend absolute counts


# --------------------------------------------------------------------------------------
# Reads and import
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("read_single_max", [3, 0])  # per-item searches, then one full walk
async def test_read_stock_returns_known_keys_only(
    autojump_clock: trio.testing.MockClock, read_single_max: int
) -> None:
    clock = Clock()
    sim = new_sim(clock)
    sim.add_item("TOWEL-01X", 99)  # a partial-match neighbour of TOWEL-01
    keys = ["TOWEL-01", "TSHIRT-01/-red-s", "TSHIRT-01/-blue", "TSHIRT-01/-nope", "GONE"]
    async with open_store(sim, clock, read_single_max=read_single_max, stock_page_size=2) as a:
        counts = await a.read_stock(keys)
    assert counts == {"TOWEL-01": 10, "TSHIRT-01/-red-s": 3, "TSHIRT-01/-blue": 5}


async def test_iter_listings_gives_names_counts_and_choice_codes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = Clock()
    sim = new_sim(clock)
    async with open_store(sim, clock, stock_page_size=1, items_page_size=1) as adapter:
        listings = {listing.listing_key: listing async for listing in adapter.iter_listings()}
    assert set(listings) == {"TOWEL-01", "TSHIRT-01/-red-s", "TSHIRT-01/-red-m", "TSHIRT-01/-blue"}
    towel = listings["TOWEL-01"]
    assert (towel.name, towel.quantity, towel.link_code) == ("今治タオル", 10, "TOWEL-01")
    blue = listings["TSHIRT-01/-blue"]
    assert blue.quantity == 5 and blue.name.startswith("Tシャツ")
    assert blue.attrs.extra == {"item_code": "TSHIRT-01", "choice_h": "-blue", "choice_v": "-"}


@pytest.mark.parametrize(
    ("link_field", "expected"),
    [
        ("listing_key", "TSHIRT-01/-red-s"),
        ("concat", "TSHIRT-01-red-s"),
        ("item_code", "TSHIRT-01"),
    ],
)
async def test_link_field_option_sets_the_link_code_on_listings_and_order_lines(
    autojump_clock: trio.testing.MockClock, link_field: str, expected: str
) -> None:
    clock = Clock()
    sim = new_sim(clock)
    sim.place_order([("TSHIRT-01/-red-s", 1)])
    async with open_store(sim, clock, link_field=link_field, fetch_names=False) as adapter:
        listing = [x async for x in adapter.iter_listings() if x.listing_key == "TSHIRT-01/-red-s"]
        (line,) = (await adapter.fetch_orders(None)).lines
    assert listing[0].link_code == expected
    assert line.link_code == expected
    assert api_calls(sim, "searchItemInfos") == 0


def test_unknown_link_field_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="link_field"):
        AupayAdapter(
            make_ctx("http://127.0.0.1:1", httpx.AsyncClient(), lambda: BASE, {}, link_field="x")
        )


# --------------------------------------------------------------------------------------
# Faults and rate limits (simulator)
# --------------------------------------------------------------------------------------


async def test_server_errors_and_maintenance_are_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = Clock()
    sim = new_sim(clock)
    async with open_store(sim, clock) as adapter:
        sim.faults.error_rate = 1.0
        with pytest.raises(MallUnavailable) as excinfo:
            await adapter.fetch_orders(None)
        assert not isinstance(excinfo.value, MallRateLimited)
        sim.faults.error_rate = 0.0
        sim.faults.maintenance = True
        with pytest.raises(MallUnavailable, match="PME9001"):
            await adapter.read_stock(["TOWEL-01"])


async def test_throttle_is_rate_limited_with_retry_after_and_the_adapter_backs_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = Clock()
    sim = new_sim(clock)
    sim.faults.throttle_rate = 1.0
    sim.faults.retry_after = 7.0
    async with open_store(sim, clock) as adapter:
        with pytest.raises(MallRateLimited) as excinfo:
            await adapter.check_credentials()
        assert excinfo.value.retry_after == 7.0
        sim.faults.throttle_rate = 0.0
        before = trio.current_time()
        await adapter.check_credentials()
    assert trio.current_time() - before >= 7.0  # the bucket was blocked for Retry-After


async def test_requests_keep_to_one_per_second_per_api(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = Clock()
    sim = new_sim(clock, rate_burst=1.0)  # the strictest mall: no slack at all
    for _ in range(5):
        sim.place_order([("TOWEL-01", 1)])
    async with (
        open_store(sim, clock, page_size=1, read_single_max=5) as adapter,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(adapter.fetch_orders, None)  # 6 pages
        nursery.start_soon(adapter.read_stock, ["TOWEL-01", "TSHIRT-01/-red-s"])
        for n in range(4):
            item = PushItem(listing_key="TOWEL-01", sku="T", quantity=n, version=n)
            nursery.start_soon(adapter.push_stock, [item])
    assert sim.throttled_requests == 0
    for api in ("searchTradeInfoListProc", "searchStocks", "updateStock"):
        times = [r.at for r in sim.requests if r.api == api]
        assert len(times) >= 2
        # The mall's one per second, spaced 10 % wider (RATE_MARGIN).
        assert all(b - a >= 1 / 0.9 - 1e-6 for a, b in itertools.pairwise(times)), api


# --------------------------------------------------------------------------------------
# MockTransport: real-shaped bodies and edge cases
# --------------------------------------------------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


@asynccontextmanager
async def mock_store(handler: Handler, **options: Any) -> AsyncIterator[AupayAdapter]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        creds = {"api_key": "k" * 64, "shop_id": SHOP, "issued_at": "2026-01-01"}
        yield AupayAdapter(
            make_ctx("https://api.manager.wowma.jp", http, Clock(), creds, **options)
        )


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def xml(body: bytes, status: int = 200, **headers: str) -> httpx.Response:
    return httpx.Response(
        status, content=body, headers={"content-type": "application/xml; charset=utf-8", **headers}
    )


async def test_real_shaped_orders_map_to_lines_by_status(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return xml(fixture("orders_page.xml"))

    async with mock_store(handler) as adapter:
        page = await adapter.fetch_orders(str(BASE - 3600))
    request = seen[0]
    assert request.url.path == "/wmshopapi/searchTradeInfoListProc"
    assert request.headers["authorization"] == "Bearer " + "k" * 64
    assert request.url.params["shopId"] == SHOP
    assert request.url.params["dateType"] == "0"
    assert request.url.params["startCount"] == "1"
    lines = by_line(page.lines)
    assert set(lines) == {"91000001", "91000002", "91000003", "91000005", "91000006"}
    assert lines["91000001"].listing_key == "TOWEL-01"
    assert lines["91000002"].listing_key == "CANDLE-01/-wt" and lines["91000002"].quantity == 2
    assert lines["91000003"].listing_key == "TOWEL-01"  # "-" means no choice
    assert lines["91000003"].cancelled and lines["91000003"].terminal
    assert lines["91000005"].cancelled and not lines["91000005"].terminal  # itemCancelStatus
    assert not lines["91000006"].cancelled and lines["91000006"].status == "発送待ち"
    assert len(seen) == 1  # 4 < page size: no second page


async def test_real_shaped_stock_and_item_search_import_choices(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        name = request.url.path.rpartition("/")[2]
        return xml(fixture("search_stocks.xml" if name == "searchStocks" else "search_items.xml"))

    async with mock_store(handler) as adapter:
        listings: list[MallListing] = [x async for x in adapter.iter_listings()]
        counts = await adapter.read_stock(["CANDLE-01/-wt", "TSHIRT-01/-red-m", "TOWEL-01"])
    keys = [x.listing_key for x in listings]
    assert keys == [
        "TOWEL-01",
        "CANDLE-01/-wt",
        "CANDLE-01/-lv",
        "TSHIRT-01/-red-s",
        "TSHIRT-01/-red-m",
    ]
    assert listings[1].name == "アロマキャンドル 金木犀"
    assert listings[1].attrs.extra["choice_v"] == "-"
    assert listings[4].name == "Tシャツ レッド/M"
    assert counts == {"CANDLE-01/-wt": 4, "TSHIRT-01/-red-m": 7, "TOWEL-01": 12}


async def test_update_with_status_1_and_item_errors_is_judged_per_item(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        assert request.headers["content-type"].startswith("application/xml")
        return xml(fixture("update_stock_partial.xml"))

    items = [
        PushItem(listing_key="TOWEL-01", sku="T", quantity=4, version=7),
        PushItem(listing_key="GONE-99", sku="G", quantity=-2, version=8),
    ]
    async with mock_store(handler) as adapter:
        towel, gone = await adapter.push_stock(items)
    assert towel.accepted and towel.version == 7
    assert not gone.accepted and gone.code == "PME0203"
    assert b"<stockSegment>1</stockSegment><stockCount>4</stockCount>" in bodies[0]
    assert b"<stockCount>0</stockCount>" in bodies[0]  # never a negative count
    assert bodies[0].startswith(b"<?xml") and b"<shopId>12345678</shopId>" in bodies[0]


@pytest.mark.parametrize(
    "response",
    [
        xml(fixture("error_auth.xml")),  # HTTP 200 with the mall's error result
        xml(fixture("error_auth.xml"), status=401),
        httpx.Response(403, text="Forbidden"),  # unregistered source IP at the front door
    ],
)
async def test_auth_failures_in_any_shape_are_auth_errors(
    autojump_clock: trio.testing.MockClock, response: httpx.Response
) -> None:
    async with mock_store(lambda request: response) as adapter:
        with pytest.raises(MallAuthError) as excinfo:
            await adapter.check_credentials()
    assert "k" * 64 not in str(excinfo.value)


async def test_429_with_retry_after_is_rate_limited(autojump_clock: trio.testing.MockClock) -> None:
    async with mock_store(lambda request: xml(b"", 429, **{"retry-after": "12"})) as adapter:
        with pytest.raises(MallRateLimited) as excinfo:
            await adapter.check_credentials()
    assert excinfo.value.retry_after == 12.0


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("read timed out"),
        httpx.RemoteProtocolError("peer closed connection"),
    ],
)
async def test_transport_failures_are_unavailable(
    autojump_clock: trio.testing.MockClock, error: httpx.HTTPError
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    async with mock_store(handler) as adapter:
        with pytest.raises(MallUnavailable):
            await adapter.fetch_orders(None)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (xml(b"x" * 5000), MallProtocolError),  # over max_body_bytes
        (xml(b"<!DOCTYPE r [<!ENTITY a 'aaaa'>]><response>&a;</response>"), MallProtocolError),
        (xml(b"<result><status>0</status></result>"), MallProtocolError),  # wrong root
        (xml(b"<response><result><status>0</status></result></response>"), None),
        (
            xml(
                fixture("error_auth.xml")
                .replace(b"PME0106", b"PME0999")
                .replace(
                    "認証に失敗しました。APIキーの有効期限と接続元IPアドレスを確認してください。".encode(),
                    "システムエラーが発生しました。".encode(),
                )
            ),
            MallUnavailable,
        ),
        (xml(b"<response/>", status=400), MallProtocolError),
    ],
)
async def test_odd_bodies_map_to_goqd_errors(
    autojump_clock: trio.testing.MockClock,
    response: httpx.Response,
    expected: type[MallError] | None,
) -> None:
    async with mock_store(lambda request: response, max_body_bytes=4096) as adapter:
        if expected is None:
            assert await adapter.read_stock(["TOWEL-01"]) == {}
            return
        with pytest.raises(expected):
            await adapter.read_stock(["TOWEL-01"])


async def test_credential_expiry_is_unknown_without_an_issue_date() -> None:
    async with httpx.AsyncClient() as http:
        adapter = AupayAdapter(make_ctx("http://x", http, lambda: BASE, {"api_key": "k"}))
        assert await adapter.credential_expiry() is None
