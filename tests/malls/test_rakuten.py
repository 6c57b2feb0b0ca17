"""楽天市場 adapter against the simulated RMS over loopback, and edge cases through
httpx.MockTransport with real-shaped bodies from tests/fixtures/rakuten/."""

from __future__ import annotations

import base64
import functools
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import httpx
import pytest
import trio

from goqd.errors import (
    LEVEL_CREDENTIAL,
    ConfigError,
    MallAuthError,
    MallProtocolError,
    MallRateLimited,
    MallUnavailable,
)
from goqd.malls import rakuten
from goqd.malls.base import OrderPage, StoreContext
from goqd.malls.rakuten import RakutenAdapter, format_jst
from goqd.messages import OrderLine, PushItem
from goqd.secret import Secret
from goqd.sim.rakuten import BULK_GET, BULK_UPSERT, GET_ORDER, SEARCH_ORDER, SimRakuten
from tests.helpers import paths
from tests.helpers.malls import ServedMall, start_mall

FIXTURES = paths.FIXTURES / "rakuten"
BASE = 1_790_000_000.0  # 2026-09-21 23:13:20 JST
SHOP = "123456"


# Every test runs on the autojump clock, so a deadlock jumps straight to this deadline.
BOUND_S = 400 * 86400.0

F = TypeVar("F", bound=Callable[..., Awaitable[None]])


def bounded(test: F) -> F:
    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> None:
        with trio.fail_after(BOUND_S):
            await test(*args, **kwargs)

    return cast(F, run)


def wall() -> float:
    return BASE + trio.current_time()


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


class Env(ServedMall[SimRakuten]):
    def adapter(self, creds: dict[str, str] | None = None, **options: Any) -> RakutenAdapter:
        ctx = self.context(store="r1", credentials=creds or None, **options)
        adapter = rakuten.SPEC.open_adapter(ctx)
        assert isinstance(adapter, RakutenAdapter)
        return adapter

    def calls(self, api: str) -> list[int]:
        return [r.status for r in self.sim.requests if r.api == api]


async def start_env(
    nursery: trio.Nursery, *, listings: int = 5, http_timeout: float = 10.0, **sim_options: Any
) -> Env:
    sim = SimRakuten(shop_id=SHOP, clock=wall, **sim_options)
    for i in range(listings):
        sim.add_listing(f"item{i}/v{i}", link_code=f"SKU-{i}", name=f"商品{i}", quantity=50)
    served = await start_mall(nursery, sim, http_timeout=http_timeout)
    return Env(served.sim, served.url, served.http)


@pytest.fixture
async def env(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> Env:
    return await start_env(nursery)


def by_order(page: OrderPage) -> dict[str, list[OrderLine]]:
    out: dict[str, list[OrderLine]] = {}
    for line in page.lines:
        out.setdefault(line.order_id, []).append(line)
    return out


def push(key: str, quantity: int, version: int = 1) -> PushItem:
    return PushItem(listing_key=key, sku=key, quantity=quantity, version=version)


# --------------------------------------------------------------------------------------
# Auth
# --------------------------------------------------------------------------------------


@bounded
async def test_esa_header_is_plain_base64_of_secret_colon_key(autojump_clock: Any) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=fixture("search_order_zero.json"))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        adapter = mock_adapter(http, secret="SP123456_abc", key="SL123456_xyz")
        await adapter.check_credentials()
    expected = "ESA " + base64.b64encode(b"SP123456_abc:SL123456_xyz").decode()
    assert seen[0].headers["authorization"] == expected
    assert seen[0].url.path == "/es/2.0/order/searchOrder/"
    body = json.loads(seen[0].content)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+0900", body["startDatetime"])


@bounded
async def test_sim_accepts_the_adapters_credentials(env: Env, autojump_clock: Any) -> None:
    await env.adapter().check_credentials()
    assert env.calls(SEARCH_ORDER) == [200]


@bounded
async def test_wrong_license_key_is_auth_error_without_leaking_it(
    env: Env, autojump_clock: Any
) -> None:
    creds = {**env.sim.credentials(), "license_key": "SL123456_wrongwrongwrong"}
    with pytest.raises(MallAuthError) as info:
        await env.adapter(creds).check_credentials()
    assert info.value.code == "GA0001"
    assert info.value.level == LEVEL_CREDENTIAL
    assert "wrongwrong" not in str(info.value)
    assert env.sim.service_secret not in str(info.value)


@bounded
async def test_expired_key_is_auth_error_and_a_newly_issued_key_works(
    env: Env, autojump_clock: Any
) -> None:
    old = env.adapter()
    env.sim.expire_credentials()
    with pytest.raises(MallAuthError):
        await old.fetch_orders(None)
    fresh = env.sim.issue_credentials()
    await env.adapter(fresh).check_credentials()
    assert env.calls(SEARCH_ORDER)[-1] == 200


@bounded
async def test_expired_credential_fault_is_auth_error_on_every_api(
    env: Env, autojump_clock: Any
) -> None:
    adapter = env.adapter()
    env.sim.faults.expired_credential = True
    for call in (
        adapter.check_credentials(),
        adapter.push_stock([push("item1/v1", 3)]),
        adapter.read_stock(["item1/v1"]),
        adapter.credential_expiry(),
    ):
        with pytest.raises(MallAuthError):
            await call
    assert env.sim.stock("item1/v1") == 50


@bounded
async def test_key_stops_working_at_its_expiry_date_which_the_adapter_reads(
    env: Env, autojump_clock: Any
) -> None:
    key = env.sim.credentials()["license_key"]
    expires = int(wall()) + 3600
    env.sim.set_key_expiry(key, expires)
    adapter = env.adapter()
    assert await adapter.credential_expiry() == expires
    await trio.sleep(3601)
    with pytest.raises(MallAuthError):
        await adapter.check_credentials()


@bounded
async def test_function_not_enabled_is_auth_error_naming_es04_01(
    env: Env, autojump_clock: Any
) -> None:
    env.sim.disabled_functions.add(BULK_UPSERT)
    with pytest.raises(MallAuthError) as info:
        await env.adapter().push_stock([push("item1/v1", 3)])
    assert info.value.code == "ES04-01"
    assert "利用機能編集" in str(info.value)


@pytest.mark.parametrize(
    ("status", "name", "code"),
    [
        (401, "gateway_401_ga0001.json", "GA0001"),
        (401, "gateway_401_es01_01.json", "ES01-01"),
        (200, "gateway_es04_01.json", "ES04-01"),  # one project saw ES04-01 with HTTP 200
    ],
)
@bounded
async def test_gateway_auth_shapes_are_auth_errors(
    autojump_clock: Any, status: int, name: str, code: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=fixture(name))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(MallAuthError) as info:
            await mock_adapter(http).fetch_orders(None)
    assert info.value.code == code


# --------------------------------------------------------------------------------------
# Orders
# --------------------------------------------------------------------------------------


@bounded
async def test_fetch_orders_follows_every_page(env: Env, autojump_clock: Any) -> None:
    placed = [env.sim.place_order([(f"item{i % 5}/v{i % 5}", 1)]) for i in range(7)]
    page = await env.adapter(page_size=3).fetch_orders(None)
    assert sorted(by_order(page)) == sorted(o.order_id for o in placed if o)
    assert page.orders_seen == 7
    # three pages of new orders, then one (empty) search for edits and cancellations
    assert env.calls(SEARCH_ORDER) == [200] * 4
    line = page.lines[0]
    assert line.status == "100" and not line.cancelled
    assert line.link_code == "SKU-0" and line.listing_key == "item0/v0"


@bounded
async def test_get_order_reads_at_most_100_orders_per_call(env: Env, autojump_clock: Any) -> None:
    env.sim.listings["item0/v0"].quantity = 1000
    for _ in range(150):
        env.sim.place_order([("item0/v0", 1)])
    page = await env.adapter().fetch_orders(None)
    assert len(by_order(page)) == 150
    assert env.calls(GET_ORDER) == [200, 200]


@bounded
async def test_order_numbers_have_rakutens_format(env: Env, autojump_clock: Any) -> None:
    order = env.sim.place_order([("item1/v1", 1)])
    assert order is not None
    assert re.fullmatch(r"123456-20260921-\d{8}", order.order_id)


@bounded
async def test_cancellation_is_seen_next_poll_as_terminal_and_newer(
    env: Env, autojump_clock: Any
) -> None:
    adapter = env.adapter()
    order = env.sim.place_order([("item1/v1", 2), ("item2/v2", 1)])
    assert order is not None and env.sim.stock("item1/v1") == 48
    first = await adapter.fetch_orders(None)
    await trio.sleep(30)
    env.sim.cancel_order(order.order_id)
    assert env.sim.stock("item1/v1") == 50  # Rakuten restores its own stock at 900
    second = await adapter.fetch_orders(first.cursor)
    before, after = by_order(first)[order.order_id], by_order(second)[order.order_id]
    assert [ln.line_id for ln in after] == [ln.line_id for ln in before]
    assert all(ln.cancelled and ln.terminal and ln.status == "900" for ln in after)
    assert all(a.updated_at > b.updated_at for a, b in zip(after, before, strict=True))


@bounded
async def test_status_flow_is_observed_with_growing_updated_at(
    env: Env, autojump_clock: Any
) -> None:
    adapter = env.adapter()
    order = env.sim.place_order([("item1/v1", 1)])
    assert order is not None
    cursor, stamps, statuses = None, [], []
    for _ in range(3):
        page = await adapter.fetch_orders(cursor)
        (line,) = by_order(page)[order.order_id]
        cursor = page.cursor
        stamps.append(line.updated_at)
        statuses.append(line.status)
        await trio.sleep(20)
        env.sim.advance(order.order_id)
    assert statuses == ["100", "300", "500"]
    assert stamps == sorted(stamps) and len(set(stamps)) == 3


@bounded
async def test_quantity_edit_of_an_older_order_is_found_by_the_change_search(
    env: Env, autojump_clock: Any
) -> None:
    adapter = env.adapter()
    order = env.sim.place_order([("item1/v1", 3), ("item2/v2", 1)])
    assert order is not None
    first = await adapter.fetch_orders(None)
    await trio.sleep(2 * 3600)
    settled = await adapter.fetch_orders(first.cursor)
    await trio.sleep(60)
    # now the order date is far behind cursor - overlap: only the change search could see it
    quiet = await adapter.fetch_orders(settled.cursor)
    assert order.order_id not in by_order(quiet)
    env.sim.edit_quantity(order.order_id, order.lines[0].line_id, 1)
    assert env.sim.stock("item1/v1") == 49
    edited = await adapter.fetch_orders(quiet.cursor)
    lines = {ln.line_id: ln for ln in by_order(edited)[order.order_id]}
    changed = lines[order.lines[0].line_id]
    assert changed.quantity == 1 and changed.status == "400" and not changed.cancelled
    assert changed.updated_at > by_order(first)[order.order_id][0].updated_at


@bounded
async def test_confirmed_change_returns_the_order_to_its_status_with_newer_time(
    env: Env, autojump_clock: Any
) -> None:
    adapter = env.adapter()
    order = env.sim.place_order([("item1/v1", 3)])
    assert order is not None
    env.sim.advance(order.order_id)
    await trio.sleep(30)
    env.sim.edit_quantity(order.order_id, order.lines[0].line_id, 5)
    assert env.sim.stock("item1/v1") == 45
    edited = await adapter.fetch_orders(None)
    await trio.sleep(30)
    env.sim.confirm_change(order.order_id)
    confirmed = await adapter.fetch_orders(edited.cursor)
    (before,) = by_order(edited)[order.order_id]
    (after,) = by_order(confirmed)[order.order_id]
    assert (before.status, before.quantity) == ("400", 5)
    assert (after.status, after.quantity) == ("300", 5)
    assert after.updated_at > before.updated_at


@bounded
async def test_line_deleted_by_an_edit_is_cancelled_but_not_terminal(
    env: Env, autojump_clock: Any
) -> None:
    adapter = env.adapter()
    order = env.sim.place_order([("item1/v1", 2), ("item2/v2", 1)])
    assert order is not None
    env.sim.edit_quantity(order.order_id, order.lines[1].line_id, 0)
    assert env.sim.stock("item2/v2") == 50
    page = await adapter.fetch_orders(None)
    lines = {ln.line_id: ln for ln in by_order(page)[order.order_id]}
    assert lines[order.lines[1].line_id].cancelled
    assert not lines[order.lines[1].line_id].terminal
    assert not lines[order.lines[0].line_id].cancelled


@bounded
async def test_orders_awaiting_cancel_800_are_not_returned_until_900(
    env: Env, autojump_clock: Any
) -> None:
    adapter = env.adapter()
    order = env.sim.place_order([("item1/v1", 1)])
    assert order is not None
    first = await adapter.fetch_orders(None)
    env.sim.request_cancel(order.order_id)
    await trio.sleep(10)
    pending = await adapter.fetch_orders(first.cursor)
    assert order.order_id not in by_order(pending)
    env.sim.cancel_order(order.order_id)
    await trio.sleep(10)
    final = await adapter.fetch_orders(pending.cursor)
    assert by_order(final)[order.order_id][0].terminal


@bounded
async def test_cancelled_order_is_not_reread_once_its_poll_was_committed(
    env: Env, autojump_clock: Any
) -> None:
    adapter = env.adapter()
    order = env.sim.place_order([("item1/v1", 1)])
    assert order is not None
    env.sim.cancel_order(order.order_id)
    await trio.sleep(3600)
    seen = await adapter.fetch_orders(None)
    assert by_order(seen)[order.order_id][0].terminal
    # The ledger did not commit (the caller passes the old cursor again): read it again.
    again = await adapter.fetch_orders(None)
    assert order.order_id in by_order(again)
    reads = len(env.calls(GET_ORDER))
    # Committed: the next poll finds it in the change search but skips getOrder.
    committed = await adapter.fetch_orders(again.cursor)
    assert order.order_id not in by_order(committed)
    assert len(env.calls(GET_ORDER)) == reads
    # A restarted adapter has no memory: it reads the order once more. (It shares the
    # shop's rate limit with the old one, so it starts a second later.)
    await trio.sleep(1)
    restarted = await env.adapter().fetch_orders(committed.cursor)
    assert order.order_id in by_order(restarted)


@bounded
async def test_cursor_overlap_returns_recent_lines_again(env: Env, autojump_clock: Any) -> None:
    adapter = env.adapter()
    order = env.sim.place_order([("item1/v1", 1)])
    assert order is not None
    first = await adapter.fetch_orders(None)
    await trio.sleep(60)
    second = await adapter.fetch_orders(first.cursor)
    assert by_order(second)[order.order_id] == by_order(first)[order.order_id]
    assert second.cursor > first.cursor


@bounded
async def test_a_cursor_this_adapter_did_not_write_restarts_from_the_lookback(
    env: Env, autojump_clock: Any
) -> None:
    order = env.sim.place_order([("item1/v1", 1)])
    assert order is not None
    await trio.sleep(3600)
    page = await env.adapter().fetch_orders("2026-09-21T14:13:20Z-not-ours")
    assert order.order_id in by_order(page)


@bounded
async def test_long_first_lookback_is_searched_in_63_day_windows(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    env = await start_env(nursery, key_lifetime_days=400)
    early = env.sim.place_order([("item1/v1", 1)])
    await trio.sleep(80 * 86400)
    late = env.sim.place_order([("item2/v2", 1)])
    page = await env.adapter(initial_lookback_s=100 * 86400, change_lookback_days=0).fetch_orders(
        None
    )
    assert early is not None and late is not None
    assert set(by_order(page)) == {early.order_id, late.order_id}
    assert env.calls(SEARCH_ORDER) == [200, 200]  # 100 days = two windows, both accepted


@bounded
async def test_search_hitting_the_result_cap_is_split(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    env = await start_env(nursery, search_result_cap=4)
    placed = []
    for _ in range(10):
        placed.append(env.sim.place_order([("item1/v1", 1)]))
        await trio.sleep(60)
    adapter = env.adapter(search_result_cap=4, change_lookback_days=0)
    page = await adapter.fetch_orders(None)
    assert set(by_order(page)) == {o.order_id for o in placed if o}


# --------------------------------------------------------------------------------------
# Stock
# --------------------------------------------------------------------------------------


@bounded
async def test_push_of_more_than_400_items_is_split_and_applied(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    env = await start_env(nursery, listings=450)
    items = [push(f"item{i}/v{i}", 7, version=i) for i in range(450)]
    outcomes = await env.adapter().push_stock(items)
    assert [o.accepted for o in outcomes] == [True] * 450
    assert [o.version for o in outcomes] == list(range(450))
    assert env.calls(BULK_UPSERT) == [204, 204]
    assert {env.sim.stock(f"item{i}/v{i}") for i in range(450)} == {7}


@bounded
async def test_refused_listing_never_blocks_the_others(env: Env, autojump_clock: Any) -> None:
    env.sim.refusals["item2/v2"] = ("IE1101", "予約商品の在庫は更新できません。", "variantId")
    outcomes = await env.adapter().push_stock(
        [push("item1/v1", 11), push("item2/v2", 12), push("item3/v3", 100000), push("item4/v4", 14)]
    )
    assert [(o.listing_key, o.accepted, o.code) for o in outcomes] == [
        ("item1/v1", True, ""),
        ("item2/v2", False, "IE1101"),
        ("item3/v3", False, "IE0003"),
        ("item4/v4", True, ""),
    ]
    assert env.sim.stock("item1/v1") == 11 and env.sim.stock("item4/v4") == 14
    assert env.sim.stock("item2/v2") == 50 and env.sim.stock("item3/v3") == 50
    # whole request refused once, then the rest resent; 100000 never left goqd
    assert env.calls(BULK_UPSERT) == [400, 204]


@bounded
async def test_unknown_listing_is_accepted_orphaned_and_invisible(
    env: Env, autojump_clock: Any
) -> None:
    adapter = env.adapter()
    (outcome,) = await adapter.push_stock([push("ghost/nope", 5)])
    assert outcome.accepted  # Rakuten says 204 and stores it where nobody sees it
    assert env.sim.orphaned_stock("ghost/nope") == 5
    counts = await adapter.read_stock(["ghost/nope", "item1/v1", "not-a-key"])
    assert counts == {"item1/v1": 50}


@bounded
async def test_silent_noop_is_visible_only_by_reading_back(env: Env, autojump_clock: Any) -> None:
    adapter = env.adapter()
    env.sim.faults.silent_noop = True
    (outcome,) = await adapter.push_stock([push("item1/v1", 3)])
    assert outcome.accepted
    assert await adapter.read_stock(["item1/v1"]) == {"item1/v1": 50}


@bounded
async def test_read_stock_matches_keys_whatever_the_manage_number_case(
    env: Env, autojump_clock: Any
) -> None:
    counts = await env.adapter().read_stock(["ITEM1/v1", "item2/v2", "item2/V2"])
    assert counts == {"ITEM1/v1": 50, "item2/v2": 50}  # variantId is case-sensitive


@bounded
async def test_timeout_after_apply_is_unavailable_but_the_stock_moved(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    env = await start_env(nursery, http_timeout=5.0)
    env.sim.faults.timeout_after_apply = True
    with pytest.raises(MallUnavailable):
        await env.adapter().push_stock([push("item1/v1", 9)])
    assert env.sim.stock("item1/v1") == 9


# --------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------


@bounded
async def test_server_error_is_unavailable(env: Env, autojump_clock: Any) -> None:
    env.sim.faults.error_rate = 1.0
    with pytest.raises(MallUnavailable) as info:
        await env.adapter().fetch_orders(None)
    assert not isinstance(info.value, MallRateLimited)


@bounded
async def test_maintenance_is_unavailable(env: Env, autojump_clock: Any) -> None:
    env.sim.faults.maintenance = True
    with pytest.raises(MallUnavailable) as info:
        await env.adapter().read_stock(["item1/v1"])
    assert info.value.code == "ES03-01"


@bounded
async def test_throttle_is_rate_limited_and_the_adapter_backs_off(
    env: Env, autojump_clock: Any
) -> None:
    adapter = env.adapter()
    env.sim.faults.throttle_rate = 1.0
    env.sim.faults.retry_after = 7
    with pytest.raises(MallRateLimited) as info:
        await adapter.push_stock([push("item1/v1", 3)])
    assert info.value.retry_after == 7
    env.sim.faults.throttle_rate = 0.0
    start = trio.current_time()
    await adapter.push_stock([push("item1/v1", 3)])
    assert trio.current_time() - start >= 7
    assert env.sim.stock("item1/v1") == 3


@bounded
async def test_html_answer_to_a_stock_push_is_a_protocol_error(
    env: Env, autojump_clock: Any
) -> None:
    env.sim.faults.malformed = "html"
    with pytest.raises(MallProtocolError):
        await env.adapter().push_stock([push("item1/v1", 3)])


@bounded
async def test_malformed_order_detail_is_a_protocol_error(autojump_clock: Any) -> None:
    detail = json.loads(fixture("get_order_v7.json"))
    detail["OrderModelList"][0]["PackageModelList"][0]["ItemModelList"][0]["units"] = "2"

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("searchOrder/"):
            return httpx.Response(200, content=fixture("search_order_page1.json"))
        return httpx.Response(200, json=detail)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(MallProtocolError):
            await mock_adapter(http).fetch_orders(None)


# --------------------------------------------------------------------------------------
# Listings and expiry
# --------------------------------------------------------------------------------------


@bounded
async def test_iter_listings_pages_through_every_item_with_quantities(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    env = await start_env(nursery, listings=230)
    env.sim.listings["item7/v7"].quantity = 3
    env.sim.listings["item8/v8"].link_code = ""  # no システム連携用SKU番号
    env.sim.add_listing("digital/dl", link_code="DL", quantity=None)
    listings = [x async for x in env.adapter().iter_listings()]
    got = {x.listing_key: x for x in listings}
    assert len(listings) == 231 == len(got)
    assert got["item7/v7"].quantity == 3 and got["item7/v7"].link_code == "SKU-7"
    assert got["item8/v8"].link_code == "v8"  # falls back to variantId
    assert got["digital/dl"].quantity is None  # unlimitedInventoryFlag
    assert got["item1/v1"].name == "商品1"
    assert len(env.calls("items.search")) == 4  # 3 pages of 100 + the end-marker page


@pytest.mark.parametrize(
    ("link_field", "expected"),
    [
        ("merchantDefinedSkuId", {"tshirt/red-s": "TS-RED-S", "tshirt/blue-m": "blue-m"}),
        ("variantId", {"tshirt/red-s": "red-s", "tshirt/blue-m": "blue-m"}),
        (
            "manageNumber+variantId",
            {"tshirt/red-s": "tshirtred-s", "tshirt/blue-m": "tshirtblue-m"},
        ),
    ],
)
@bounded
async def test_link_field_option_chooses_the_link_code(
    autojump_clock: Any, link_field: str, expected: dict[str, str]
) -> None:
    marks: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/es/2.0/items/search":
            marks.append(request.url.params["cursorMark"])
            name = "items_search.json" if len(marks) == 1 else "items_search_end.json"
            return httpx.Response(200, content=fixture(name))
        return httpx.Response(200, content=fixture("bulk_get.json"))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        adapter = mock_adapter(http, link_field=link_field)
        listings = {x.listing_key: x async for x in adapter.iter_listings()}
    assert {k: listings[k].link_code for k in expected} == expected
    assert listings["tshirt/red-s"].quantity == 12
    assert listings["tshirt/blue-m"].quantity == 0  # no inventory record [I]
    assert listings["download/wall-1"].quantity is None
    assert "test-50000" not in {k.partition("/")[0] for k in listings}  # deleted item
    assert marks == ["*", "AoE/dHNoaXJ0"]


@bounded
async def test_unknown_link_field_is_a_config_error(autojump_clock: Any) -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(ConfigError):
            mock_adapter(http, link_field="janCode")


@bounded
async def test_credential_expiry_reads_jst_without_offset(autojump_clock: Any) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=fixture("expiry_date.json"))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        expiry = await mock_adapter(http, key="SL1_k").credential_expiry()
    assert expiry == 1_795_877_999.0  # 2026-11-28T23:59:59+09:00
    assert seen[0].url.params["licenseKey"] == "SL1_k"


@bounded
async def test_expiry_call_failure_never_carries_the_key(autojump_clock: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot reach {request.url}", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(MallUnavailable) as info:
            await mock_adapter(http, key="SL1_topsecret").credential_expiry()
    assert "topsecret" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


# --------------------------------------------------------------------------------------
# Rate limits
# --------------------------------------------------------------------------------------


@bounded
async def test_adapter_stays_within_every_rms_rate_limit(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    env = await start_env(nursery, listings=2000)
    env.sim.listings["item0/v0"].quantity = 1000
    for _ in range(250):
        env.sim.place_order([("item0/v0", 1)])
    adapter = env.adapter(page_size=50)
    await adapter.fetch_orders(None)
    await adapter.push_stock([push(f"item{i}/v{i}", 1) for i in range(2000)])
    await adapter.read_stock([f"item{i}/v{i}" for i in range(2000)] * 3)
    assert env.sim.throttled_requests == 0
    assert all(s in (200, 204) for s in (r.status for r in env.sim.requests))
    limits = {SEARCH_ORDER: 1, GET_ORDER: 1, BULK_UPSERT: 1, BULK_GET: 5}
    for api, limit in limits.items():
        times = [r.at for r in env.sim.requests if r.api == api]
        busiest = max(sum(1 for t in times if start <= t < start + 1) for start in times)
        assert busiest <= limit, api
    assert len(env.calls(BULK_UPSERT)) == 5 and len(env.calls(BULK_GET)) == 6
    assert len(env.calls(SEARCH_ORDER)) == 6 and len(env.calls(GET_ORDER)) == 3


@bounded
async def test_sim_throttles_requests_over_its_rate(env: Env, autojump_clock: Any) -> None:
    adapter = env.adapter()
    auth = {"Authorization": adapter._auth_header()}
    body = {
        "inventories": [
            {"manageNumber": "item1", "variantId": "v1", "mode": "ABSOLUTE", "quantity": 1}
        ]
    }
    url = env.url + "/es/2.0/inventories/bulk-upsert"
    first = await env.http.post(url, json=body, headers=auth)
    second = await env.http.post(url, json=body, headers=auth)
    assert (first.status_code, second.status_code) == (204, 429)
    assert "retry-after" in second.headers
    assert env.sim.throttled_requests == 1


# --------------------------------------------------------------------------------------
# The simulator's request validation (RMS error shapes)
# --------------------------------------------------------------------------------------


async def _raw(env: Env, path: str, body: Any) -> httpx.Response:
    headers = {"Authorization": env.adapter()._auth_header()}
    return await env.http.post(env.url + path, json=body, headers=headers)


def _search_body(start: str, end: str) -> dict[str, Any]:
    return {
        "dateType": 1,
        "startDatetime": start,
        "endDatetime": end,
        "PaginationRequestModel": {"requestRecordsAmount": 30, "requestPage": 1},
    }


@bounded
async def test_sim_rejects_search_dates_not_in_plus_0900_form(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    env = await start_env(nursery, enforce_rate_limits=False)
    now = wall()
    for start in (
        format_jst(now - 60).replace("+0900", "+09:00"),
        format_jst(now - 60).replace("+0900", "Z"),
        format_jst(now - 60)[:-5],
    ):
        reply = await _raw(env, "/es/2.0/order/searchOrder/", _search_body(start, format_jst(now)))
        assert reply.status_code == 400
        body = reply.json()
        assert body["orderNumberList"] is None
        assert body["MessageModelList"][0]["messageCode"] == "ORDER_EXT_API_SEARCH_ORDER_ERROR_011"


@bounded
async def test_sim_rejects_windows_over_63_days_and_bad_paging(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    env = await start_env(nursery, enforce_rate_limits=False)
    now = wall()
    ok = await _raw(
        env,
        "/es/2.0/order/searchOrder/",
        _search_body(format_jst(now - 63 * 86400), format_jst(now)),
    )
    assert ok.status_code == 200
    assert ok.json()["MessageModelList"][0]["messageCode"].endswith("INFO_102")
    long = await _raw(
        env,
        "/es/2.0/order/searchOrder/",
        _search_body(format_jst(now - 64 * 86400), format_jst(now)),
    )
    assert long.status_code == 400
    big_page = _search_body(format_jst(now - 60), format_jst(now))
    big_page["PaginationRequestModel"]["requestRecordsAmount"] = 1001
    assert (await _raw(env, "/es/2.0/order/searchOrder/", big_page)).status_code == 400


@bounded
async def test_sim_get_order_enforces_100_numbers_and_version_7(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    env = await start_env(nursery, enforce_rate_limits=False)
    order = env.sim.place_order([("item1/v1", 1)])
    assert order is not None
    path = "/es/2.0/order/getOrder/"
    too_many = await _raw(env, path, {"orderNumberList": [order.order_id] * 101, "version": 7})
    old = await _raw(env, path, {"orderNumberList": [order.order_id], "version": 6})
    good = await _raw(env, path, {"orderNumberList": [order.order_id, "123456-x"], "version": 7})
    assert too_many.status_code == 400 and old.status_code == 400
    assert old.json()["MessageModelList"][0]["messageType"] == "ERROR"
    assert good.status_code == 200
    model = good.json()["OrderModelList"][0]
    assert model["orderDatetime"].endswith("+0900")
    item = model["PackageModelList"][0]["ItemModelList"][0]
    assert item["SkuModelList"][0] == {
        "variantId": "v1",
        "merchantDefinedSkuId": "SKU-1",
        "skuInfo": None,
    }
    assert good.json()["MessageModelList"][1]["messageType"] == "WARNING"


@bounded
async def test_sim_bulk_upsert_rejects_more_than_400_items(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    env = await start_env(nursery, enforce_rate_limits=False)
    rows = [{"manageNumber": "item1", "variantId": "v1", "mode": "ABSOLUTE", "quantity": 1}] * 401
    reply = await _raw(env, "/es/2.0/inventories/bulk-upsert", {"inventories": rows})
    assert reply.status_code == 400
    assert reply.json()["errors"][0]["code"] == "IE0105"
    assert env.sim.stock("item1/v1") == 50


# --------------------------------------------------------------------------------------
# MockTransport edge cases with fixture bodies
# --------------------------------------------------------------------------------------


def mock_adapter(
    http: httpx.AsyncClient, *, secret: str = "SP1_s", key: str = "SL1_k", **options: Any
) -> RakutenAdapter:
    ctx = StoreContext(
        store="r9",
        mall="rakuten",
        base_url="https://api.rms.example",
        credentials={"service_secret": Secret(secret), "license_key": Secret(key)},
        http=http,
        clock=wall,
        options=options,
    )
    return RakutenAdapter(ctx)


def order_handler(detail: bytes) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("searchOrder/"):
            body = json.loads(request.content)
            if body.get("orderProgressList") == [400, 900]:
                return httpx.Response(200, content=fixture("search_order_zero.json"))
            return httpx.Response(200, content=fixture("search_order_page1.json"))
        assert json.loads(request.content)["version"] == 7
        return httpx.Response(200, content=detail)

    return handler


@bounded
async def test_every_package_and_line_of_an_order_is_mapped(autojump_clock: Any) -> None:
    transport = httpx.MockTransport(order_handler(fixture("get_order_v7.json")))
    async with httpx.AsyncClient(transport=transport) as http:
        page = await mock_adapter(http).fetch_orders(None)
    lines = {ln.line_id: ln for ln in page.lines}
    # 800 キャンセル確定待ち is in neither status set: its line is not returned
    assert set(lines) == {"100000001", "100000002", "100000003", "100000004"}
    red, blue, mug, old = (lines[k] for k in sorted(lines))
    assert (red.listing_key, red.link_code, red.quantity) == ("tshirt/red-s", "TS-RED-S", 2)
    assert blue.cancelled and not blue.terminal and blue.quantity == 1  # deleteItemFlag=1
    assert (mug.listing_key, mug.link_code) == ("mug/mug-white", "mug-white")
    assert (old.listing_key, old.link_code) == ("old-item/old-item-1a", "old-item-1a")
    # updated_at is the latest datetime, here the 変更申請 of ChangeReasonModelList
    assert {ln.updated_at for ln in page.lines} == {1_789_950_600.0}
    assert {ln.status for ln in page.lines} == {"400"}


@bounded
async def test_bulk_upsert_refusals_by_property_path_are_per_listing(autojump_clock: Any) -> None:
    sent: list[list[str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        rows = json.loads(request.content)["inventories"]
        assert {r["mode"] for r in rows} == {"ABSOLUTE"}
        sent.append([r["variantId"] for r in rows])
        if len(sent) == 1:
            return httpx.Response(400, content=fixture("bulk_upsert_errors.json"))
        return httpx.Response(204)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        outcomes = await mock_adapter(http).push_stock(
            [push("a/v0", 1), push("b/v1", 2), push("c/v2", 3), push("d/v3", 4)]
        )
    assert sent == [["v0", "v1", "v2", "v3"], ["v0", "v3"]]
    assert [(o.accepted, o.code) for o in outcomes] == [
        (True, ""),
        (False, "IE0004"),
        (False, "IE1101"),
        (True, ""),
    ]


@bounded
async def test_bulk_upsert_error_naming_no_item_is_a_protocol_error(autojump_clock: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, content=fixture("bulk_upsert_error_unindexed.json"))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(MallProtocolError) as info:
            await mock_adapter(http).push_stock([push("a/v0", 1)])
    assert info.value.code == "IE0002"


@bounded
async def test_search_validation_error_is_a_protocol_error_with_rakutens_code(
    autojump_clock: Any,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, content=fixture("search_order_error_011.json"))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(MallProtocolError) as info:
            await mock_adapter(http).fetch_orders(None)
    assert info.value.code == "ORDER_EXT_API_SEARCH_ORDER_ERROR_011"


@pytest.mark.parametrize(
    "exc",
    [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("x")],
)
@bounded
async def test_transport_failures_are_unavailable(autojump_clock: Any, exc: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(MallUnavailable):
            await mock_adapter(http).read_stock(["a/b"])


@bounded
async def test_retry_after_as_http_date_is_understood(autojump_clock: Any) -> None:
    when = "Mon, 21 Sep 2026 14:18:20 GMT"  # BASE is 2026-09-21T14:13:20Z

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": when}, json={})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(MallRateLimited) as info:
            await mock_adapter(http).read_stock(["a/b"])
    assert info.value.retry_after == pytest.approx(300.0)


@bounded
async def test_oversized_response_is_refused(autojump_clock: Any) -> None:
    huge = b'{"inventories":[' + b" " * (17 * 1024 * 1024) + b"]}"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=huge)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(MallProtocolError):
            await mock_adapter(http).read_stock(["a/b"])


def test_spec_declares_rakutens_limits_and_statuses() -> None:
    spec = rakuten.SPEC
    assert (spec.limits.push_batch, spec.limits.read_batch) == (400, 1000)
    assert spec.credential_fields == ("service_secret", "license_key")
    assert "800" not in spec.default_live_statuses + spec.default_cancel_statuses
    assert spec.default_cancel_statuses == ("900",)
