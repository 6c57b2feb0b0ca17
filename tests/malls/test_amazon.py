"""Amazon SP-API adapter against the simulator (loopback) and canned bodies (MockTransport).

Every request the adapter sends to the simulator and every answer the simulator gives
are checked against Amazon's official models (``tests/spapi_models.py``), so the wire
format proven here is the real one, not one the adapter and the simulator merely share.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from goqd.errors import (
    LEVEL_CREDENTIAL,
    ConfigError,
    MallAuthError,
    MallError,
    MallProtocolError,
    MallRateLimited,
    MallUnavailable,
)
from goqd.malls import amazon
from goqd.malls.amazon import JST, AmazonAdapter, format_iso
from goqd.messages import ListingAttrs, PushItem
from goqd.sim.amazon import USAGE_PLANS, SimAmazon
from tests import spapi_models
from tests.helpers import paths
from tests.helpers.malls import serve_mall, store_context

FIXTURES = paths.FIXTURES / "amazon"
EPOCH = 1_717_200_000.0  # 2024-06-01 00:00 UTC
SELLER = "A2SELLERJP0001"
MP = amazon.MARKETPLACE_JP
DAY = 86400.0

# Vendored in tests/fixtures/spapi: a checkout without them is broken, not a reason to
# test less.
_LOADED = spapi_models.load()
assert _LOADED is not None, "SP-API models missing from tests/fixtures/spapi"
SPAPI: spapi_models.SpApi = _LOADED


def wall() -> float:
    return EPOCH + trio.current_time()


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def make_adapter(
    url: str,
    creds: dict[str, str],
    http: httpx.AsyncClient,
    urls: dict[str, str] | None = None,
    live: tuple[str, ...] = (),
    **options: Any,
) -> AmazonAdapter:
    ctx = store_context(
        "amazon",
        url,
        http,
        wall,
        creds,
        store="amz",
        urls=urls,
        live_statuses=live,
        options=options,
    )
    return AmazonAdapter(ctx)


@asynccontextmanager
async def open_sim(
    *, sim_kw: dict[str, Any] | None = None, **options: Any
) -> AsyncIterator[tuple[SimAmazon, AmazonAdapter, str, httpx.AsyncClient]]:
    sim = SimAmazon(shop_id=SELLER, clock=wall, **(sim_kw or {}))
    async with serve_mall(sim, http_timeout=5.0) as shop:
        # LWA lives on its own host in production; ctx.urls["lwa"] points there.
        adapter = make_adapter(shop.url, sim.credentials(), shop.http, {"lwa": shop.url}, **options)
        yield sim, adapter, shop.url, shop.http


def push(
    key: str, qty: int, version: int = 1, lead: int | None = None, restock: str | None = None
) -> PushItem:
    return PushItem(
        listing_key=key,
        sku=key,
        quantity=qty,
        version=version,
        attrs=ListingAttrs(lead_time_days=lead, restock_date=restock),
    )


def statuses(sim: SimAmazon, api: str) -> list[int]:
    return [r.status for r in sim.requests if r.api == api]


def assert_model_valid(sim: SimAmazon) -> None:
    """Every request and response the simulator saw validates against Amazon's models."""
    errors = [e for x in sim.exchanges for e in SPAPI.exchange_errors(x)]
    assert errors == []


def assert_within_plan(times: list[float], rate: float, burst: float) -> None:
    """No stretch of requests exceeded the usage plan (burst plus rate per second)."""
    times = sorted(times)
    for i in range(len(times)):
        for j in range(i, len(times)):
            allowed = burst + rate * (times[j] - times[i]) + 1e-6
            assert j - i + 1 <= allowed, (i, j, times[j] - times[i])


# --------------------------------------------------------------------------------------
# Official models: the simulator and the adapter speak the real wire format
# --------------------------------------------------------------------------------------


async def test_every_request_and_response_validates_against_the_official_models(
    autojump_clock: trio.testing.MockClock,
) -> None:
    assert SPAPI is not None
    async with open_sim(page_size=2, sim_kw={"items_page_size": 1}) as (sim, adapter, _, _):
        for sku in ("A-1", "B-2", "C 3", "D-4"):
            sim.add_item(sku, quantity=10, lead_time_days=2, restock_date="2024-07-01")
        sim.add_item("FBA-1", quantity=40, fba=True)
        sim.add_item("E,5", quantity=3)  # a comma: read with getListingsItem
        sim.place_order([("A-1", 1), ("B-2", 2)])
        shipped = sim.place_order([("C 3", 1)])
        assert shipped is not None
        sim.set_status(shipped.order_id, "Unshipped")
        sim.set_status(shipped.order_id, "Shipped")
        cancelled = sim.place_order([("D-4", 1)])
        assert cancelled is not None
        sim.cancel_order(cancelled.order_id)
        await trio.sleep(130)
        await adapter.check_credentials()
        page = await adapter.fetch_orders(None)
        assert len(page.lines) == 4
        outcomes = await adapter.push_stock(
            [push("A-1", 5, lead=3, restock="2024-08-01"), push("NO-SUCH", 1), push("C 3", 0)]
        )
        assert [o.accepted for o in outcomes] == [True, False, True]
        assert await adapter.read_stock(["A-1", "NO-SUCH", "FBA-1", "E,5", "NO,SUCH"]) == {
            "A-1": 5,
            "E,5": 3,
        }
        listings = [x async for x in adapter.iter_listings()]
        assert {x.listing_key for x in listings} == {"A-1", "B-2", "C 3", "D-4", "E,5"}

        operations = {x.operation for x in sim.exchanges}
        assert operations == {
            "getOrders",
            "getOrderItems",
            "getListingsItem",
            "patchListingsItem",
            "searchListingsItems",
        }
        assert any(x.status == 404 for x in sim.exchanges)  # getListingsItem NO,SUCH
        # read_stock searched by SKU, so the model check below covers identifiers too.
        (by_sku,) = [x for x in sim.exchanges if "identifiers" in x.query]
        assert by_sku.operation == "searchListingsItems"
        assert by_sku.query["identifiers"] == ["A-1,NO-SUCH,FBA-1"]
        assert by_sku.query["identifiersType"] == ["SKU"]
        read_one = [x.path for x in sim.exchanges if x.operation == "getListingsItem"]
        assert read_one == [f"/listings/2021-08-01/items/{SELLER}/{k}" for k in ("E,5", "NO,SUCH")]
        assert_model_valid(sim)
        for record in sim.patches:
            assert SPAPI.listings.definition_errors("ListingsItemPatchRequest", record.body) == []


async def test_the_model_check_catches_a_wrong_field_parameter_or_body(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The validation above could fail: a misspelt field, an undeclared or mistyped
    parameter and a patch without productType are all reported."""
    assert SPAPI is not None
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=3)
        sim.place_order([("A-1", 1)])
        await trio.sleep(130)
        await adapter.fetch_orders(None)
        (exchange,) = [x for x in sim.exchanges if x.operation == "getOrders"]
        assert SPAPI.exchange_errors(exchange) == []

        body = json.loads(exchange.response)
        order = body["payload"]["Orders"][0]
        order["LastUpdatedDate"] = order.pop("LastUpdateDate")
        errors = SPAPI.orders.response_errors("getOrders", 200, body)
        assert any("LastUpdateDate" in e for e in errors)
        assert any("LastUpdatedDate" in e for e in errors)

        query = {**exchange.query, "MaxResultsPerPage": ["lots"], "Since": ["yesterday"]}
        errors = SPAPI.orders.request_errors("getOrders", query=query)
        assert any("MaxResultsPerPage" in e for e in errors)
        assert any("Since" in e for e in errors)
        assert SPAPI.orders.request_errors("getOrders", query={}) != []

        # searchListingsItems by SKU: at most 20 identifiers, identifiersType from the enum.
        seller = {"sellerId": SELLER}
        by_sku = {
            "marketplaceIds": [MP],
            "identifiers": [",".join(f"S-{i}" for i in range(20))],
            "identifiersType": ["SKU"],
        }
        search = "searchListingsItems"
        assert SPAPI.listings.request_errors(search, query=by_sku, path_params=seller) == []
        too_many = {**by_sku, "identifiers": [",".join(f"S-{i}" for i in range(21))]}
        errors = SPAPI.listings.request_errors(search, query=too_many, path_params=seller)
        assert any("identifiers" in e for e in errors)
        lower = {**by_sku, "identifiersType": ["sku"]}
        errors = SPAPI.listings.request_errors(search, query=lower, path_params=seller)
        assert any("identifiersType" in e for e in errors)

        patch = {"patches": [{"op": "replace", "path": "/attributes/fulfillment_availability"}]}
        assert SPAPI.listings.definition_errors("ListingsItemPatchRequest", patch) != []
        bad_op = {"productType": "PRODUCT", "patches": [{"op": "set", "path": "/x"}]}
        assert SPAPI.listings.definition_errors("ListingsItemPatchRequest", bad_op) != []


FIXTURE_SCHEMAS = {
    "get_orders_page1.json": ("orders", "GetOrdersResponse"),
    "get_orders_page2.json": ("orders", "GetOrdersResponse"),
    "get_order_items.json": ("orders", "GetOrderItemsResponse"),
    "get_order_items_canceled.json": ("orders", "GetOrderItemsResponse"),
    "patch_accepted.json": ("listings", "ListingsItemSubmissionResponse"),
    "patch_invalid.json": ("listings", "ListingsItemSubmissionResponse"),
    "get_listings_item.json": ("listings", "Item"),
    "get_listings_item_fba.json": ("listings", "Item"),
    "search_listings_items.json": ("listings", "ItemSearchResults"),
    "search_listings_items_identifiers.json": ("listings", "ItemSearchResults"),
    "error_unauthorized.json": ("listings", "ErrorList"),
    "error_quota_exceeded.json": ("listings", "ErrorList"),
    "error_invalid_input.json": ("orders", "GetOrdersResponse"),
    "error_not_found.json": ("listings", "ErrorList"),
}


@pytest.mark.parametrize("name", sorted(FIXTURE_SCHEMAS))
def test_canned_fixtures_are_real_shaped(name: str) -> None:
    assert SPAPI is not None
    model_name, definition = FIXTURE_SCHEMAS[name]
    model = SPAPI.orders if model_name == "orders" else SPAPI.listings
    assert model.definition_errors(definition, fixture(name)) == []


def test_every_fixture_is_checked_against_a_model() -> None:
    on_disk = {p.name for p in FIXTURES.glob("*.json") if not p.name.startswith("lwa_")}
    assert on_disk == set(FIXTURE_SCHEMAS)


# --------------------------------------------------------------------------------------
# Auth (loopback)
# --------------------------------------------------------------------------------------


async def test_access_token_goes_out_as_x_amz_access_token_and_is_reused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, url, http):
        sim.add_item("A-1", quantity=5)
        assert await adapter.read_stock(["A-1"]) == {"A-1": 5}
        assert await adapter.read_stock(["A-1"]) == {"A-1": 5}
        assert sim.token_refreshes == 1
        assert statuses(sim, "searchListingsItems") == [200, 200]
        # Without the header the same call is refused the way Amazon refuses it.
        first = sim.exchanges[0]
        assert first.operation == "searchListingsItems"
        bare = await http.get(f"{url}{first.path}", params=first.query)
        assert bare.status_code == 403
        assert bare.json()["errors"][0]["code"] == "Unauthorized"


async def test_access_token_renewed_before_its_hour_ends_without_a_403(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=5)
        await adapter.read_stock(["A-1"])
        await trio.sleep(3550)
        await adapter.read_stock(["A-1"])
        assert statuses(sim, "searchListingsItems") == [200, 200]
        assert sim.token_refreshes == 2


async def test_expired_access_token_is_refreshed_once_and_the_call_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=5)
        await adapter.read_stock(["A-1"])
        sim.expire_access_tokens()
        assert await adapter.read_stock(["A-1"]) == {"A-1": 5}
        assert statuses(sim, "searchListingsItems") == [200, 403, 200]
        assert sim.token_refreshes == 2


async def test_revoked_authorization_is_auth_error_with_invalid_grant(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=5)
        await adapter.read_stock(["A-1"])
        sim.expire_credentials()
        with pytest.raises(MallAuthError) as info:
            await adapter.read_stock(["A-1"])
        assert info.value.code == "invalid_grant"
        assert info.value.level == LEVEL_CREDENTIAL
        assert statuses(sim, "searchListingsItems") == [200, 403]


async def test_wrong_client_secret_is_auth_error(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim() as (sim, _, url, http):
        creds = {**sim.credentials(), "client_secret": "amzn1.oa2-cs.v1.wrong"}
        adapter = make_adapter(url, creds, http, {"lwa": url})
        with pytest.raises(MallAuthError) as info:
            await adapter.check_credentials()
        assert info.value.code == "invalid_client"
        assert "wrong" not in str(info.value)


async def test_403_with_a_freshly_minted_token_is_auth_error_without_a_second_refresh(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, _, url, http):
        sim.add_item("A-1", quantity=5)
        creds = {**sim.credentials(), "seller_id": "A0SOMEONEELSE"}
        adapter = make_adapter(url, creds, http, {"lwa": url})
        with pytest.raises(MallAuthError) as info:
            await adapter.read_stock(["A-1"])
        assert info.value.code == "Unauthorized"
        assert sim.token_refreshes == 1
        assert statuses(sim, "searchListingsItems") == [403]


async def test_newly_issued_credentials_work_after_expiry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, url, http):
        sim.expire_credentials()
        with pytest.raises(MallAuthError):
            await adapter.check_credentials()
        renewed = make_adapter(url, sim.issue_credentials(), http, {"lwa": url})
        await renewed.check_credentials()
        assert statuses(sim, "searchListingsItems") == [200]
        assert statuses(sim, "getOrders") == [200]


async def test_credential_expiry_is_a_year_after_authorization(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, url, http):
        assert sim.credentials()["authorized_at"] == "2024-06-01"
        authorized = datetime(2024, 6, 1, tzinfo=JST).timestamp()
        assert await adapter.credential_expiry() == authorized + 365 * DAY
        creds = {k: v for k, v in sim.credentials().items() if k != "authorized_at"}
        assert await make_adapter(url, creds, http).credential_expiry() is None


# --------------------------------------------------------------------------------------
# Orders (loopback)
# --------------------------------------------------------------------------------------


async def test_orders_are_read_across_pages_with_only_the_token_on_later_pages(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim(page_size=3) as (sim, adapter, _, _):
        placed = []
        for i in range(7):
            sim.add_item(f"S-{i}", quantity=10)
            order = sim.place_order([(f"S-{i}", i + 1)])
            assert order is not None
            placed.append(order)
        await trio.sleep(130)
        now = wall()
        page = await adapter.fetch_orders(None)

        assert page.orders_seen == 7
        assert page.cursor == format_iso(now - 125)
        by_order = {line.order_id: line for line in page.lines}
        assert set(by_order) == {o.order_id for o in placed}
        for i, order in enumerate(placed):
            line = by_order[order.order_id]
            assert line.line_id == order.lines[0].line_id
            assert (line.listing_key, line.link_code) == (f"S-{i}", f"S-{i}")
            assert line.quantity == i + 1
            assert (line.status, line.cancelled, line.terminal) == ("Pending", False, False)
            assert line.updated_at == math.floor(order.updated_at)

        gets = [x for x in sim.exchanges if x.operation == "getOrders"]
        assert len(gets) == 3
        first = gets[0].query
        assert first["LastUpdatedAfter"] == [format_iso(now - 125 - DAY)]
        assert first["LastUpdatedBefore"] == [format_iso(now - 125)]
        assert first["FulfillmentChannels"] == ["MFN"]
        assert first["MaxResultsPerPage"] == ["3"]
        assert set(first["OrderStatuses"][0].split(",")) == set(amazon.LIVE_STATUSES) | {"Canceled"}
        for later in gets[1:]:
            assert set(later.query) == {"MarketplaceIds", "NextToken"}
        assert_model_valid(sim)


async def test_order_items_are_read_across_pages(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim(sim_kw={"items_page_size": 2}) as (sim, adapter, _, _):
        skus = [f"K-{i}" for i in range(5)]
        for sku in skus:
            sim.add_item(sku, quantity=3)
        order = sim.place_order([(sku, 1) for sku in skus])
        assert order is not None
        await trio.sleep(130)
        page = await adapter.fetch_orders(None)
        assert sorted(line.listing_key for line in page.lines) == skus
        assert len({line.line_id for line in page.lines}) == 5
        assert statuses(sim, "getOrderItems") == [200, 200, 200]


async def test_sim_hides_an_order_for_two_minutes_even_from_a_window_ending_now(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The simulator's data lag on its own: window ends allowed up to now."""
    sim_kw = {"min_before_s": 0.0}
    async with open_sim(sim_kw=sim_kw, lag_s=0) as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=3)
        sim.place_order([("A-1", 1)])
        await trio.sleep(60)
        early = await adapter.fetch_orders(None)
        assert early.lines == ()
        await trio.sleep(70)
        later = await adapter.fetch_orders(early.cursor)
        assert [line.listing_key for line in later.lines] == ["A-1"]


async def test_window_ending_less_than_two_minutes_ago_is_refused_by_the_sim(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim(lag_s=60) as (sim, adapter, _, _):
        with pytest.raises(MallProtocolError) as info:
            await adapter.fetch_orders(None)
        assert info.value.code == "InvalidInput"
        assert statuses(sim, "getOrders") == [400]


async def test_default_window_ends_two_minutes_ago_and_the_sim_accepts_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        page = await adapter.fetch_orders(None)
        await trio.sleep(30)
        await adapter.fetch_orders(page.cursor)
        assert statuses(sim, "getOrders") == [200, 200]
        second = sim.exchanges[1].query
        # The default overlap is a minute (see the module docstring of goqd.malls.amazon).
        assert second["LastUpdatedAfter"] == [format_iso(EPOCH - 125 - 60)]
        assert second["LastUpdatedBefore"] == [format_iso(EPOCH + 30 - 125)]


async def test_cancellation_is_seen_after_the_lag_with_cancelled_terminal_and_newer_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=5)
        order = sim.place_order([("A-1", 2)])
        assert order is not None and sim.stock("A-1") == 3
        await trio.sleep(130)
        first = await adapter.fetch_orders(None)
        (booked,) = first.lines
        assert (booked.status, booked.cancelled, booked.quantity) == ("Pending", False, 2)

        sim.set_status(order.order_id, "Unshipped")
        await trio.sleep(10)
        sim.cancel_order(order.order_id)
        assert sim.stock("A-1") == 5
        await trio.sleep(60)
        stale = await adapter.fetch_orders(first.cursor)
        # Amazon still shows the order as it was two minutes ago.
        assert [line.status for line in stale.lines] == ["Pending"]

        await trio.sleep(130)
        seen = await adapter.fetch_orders(stale.cursor)
        (line,) = seen.lines
        assert (line.status, line.cancelled, line.terminal) == ("Canceled", True, True)
        assert line.line_id == booked.line_id
        assert line.updated_at > booked.updated_at
        assert_model_valid(sim)


async def test_overlap_returns_lines_again_without_reading_unchanged_items_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=5)
        order = sim.place_order([("A-1", 1)])
        assert order is not None
        await trio.sleep(130)
        first = await adapter.fetch_orders(None)
        await trio.sleep(60)
        again = await adapter.fetch_orders(first.cursor)
        assert again.lines == first.lines
        assert statuses(sim, "getOrderItems") == [200]

        sim.set_status(order.order_id, "Unshipped")
        await trio.sleep(130)
        moved = await adapter.fetch_orders(again.cursor)
        assert [line.status for line in moved.lines] == ["Unshipped"]
        assert statuses(sim, "getOrderItems") == [200, 200]


async def test_order_updated_before_the_overlap_window_is_not_read_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim(overlap_s=600) as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=5)
        sim.place_order([("A-1", 1)])
        await trio.sleep(130)
        first = await adapter.fetch_orders(None)
        assert len(first.lines) == 1
        await trio.sleep(800)
        inside = await adapter.fetch_orders(first.cursor)  # still within the overlap
        assert len(inside.lines) == 1
        await trio.sleep(60)
        later = await adapter.fetch_orders(inside.cursor)
        assert later.lines == ()


async def test_fba_orders_are_not_asked_for_and_leave_mfn_stock_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("M-1", quantity=5)
        sim.add_item("F-1", quantity=50, fba=True)
        sim.place_fba_order([("F-1", 2)])
        sim.place_order([("M-1", 1)])
        assert (sim.stock("F-1"), sim.stock("M-1")) == (50, 4)
        await trio.sleep(130)
        page = await adapter.fetch_orders(None)
        assert [line.listing_key for line in page.lines] == ["M-1"]


async def test_store_status_override_leaves_other_statuses_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, _, url, http):
        adapter = make_adapter(url, sim.credentials(), http, {"lwa": url}, live=("Unshipped",))
        sim.add_item("A-1", quantity=5)
        pending = sim.place_order([("A-1", 1)])
        unshipped = sim.place_order([("A-1", 1)])
        assert pending is not None and unshipped is not None
        sim.set_status(unshipped.order_id, "Unshipped")
        await trio.sleep(130)
        page = await adapter.fetch_orders(None)
        assert [line.order_id for line in page.lines] == [unshipped.order_id]


# --------------------------------------------------------------------------------------
# Stock (loopback)
# --------------------------------------------------------------------------------------


async def test_push_sends_quantity_lead_time_and_restock_date_and_the_sim_applies_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        keys = [f"P-{i:02d}" for i in range(25)]
        for key in keys:
            sim.add_item(key, quantity=0)
        outcomes = await adapter.push_stock(
            [push(k, i, version=i + 1, lead=3, restock="2024-07-01") for i, k in enumerate(keys)]
        )
        assert [(o.listing_key, o.version, o.accepted) for o in outcomes] == [
            (k, i + 1, True) for i, k in enumerate(keys)
        ]
        assert [sim.stock(k) for k in keys] == list(range(25))
        assert {sim.lead_time(k) for k in keys} == {3}
        assert {sim.restock_date(k) for k in keys} == {"2024-07-01"}
        entry = sim.patches[0].body["patches"][0]["value"][0]
        assert entry == {
            "fulfillment_channel_code": "DEFAULT",
            "quantity": 0,
            "lead_time_to_ship_max_days": 3,
            "restock_date": "2024-07-01",
        }
        # One call per listing, inside the 5-per-second usage plan with 10 % to spare
        # once the burst of 5 is spent.
        patch_times = [r.at for r in sim.requests if r.api == "patchListingsItem"]
        assert len(patch_times) == 25
        rate, burst = USAGE_PLANS["patchListingsItem"]
        assert_within_plan(patch_times, rate, burst)
        assert_within_plan(patch_times, rate * 0.9, burst)
        assert patch_times[-1] - patch_times[0] >= (25 - 5) / (rate * 0.9) - 1e-6
        assert sim.throttled_requests == 0


async def test_a_push_without_lead_time_clears_it_at_amazon(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Why the lead time goes out with every push: replace drops what it leaves out."""
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=1, lead_time_days=5)
        await adapter.push_stock([push("A-1", 4)])
        assert (sim.stock("A-1"), sim.lead_time("A-1")) == (4, None)
        await adapter.push_stock([push("A-1", 4, lead=5)])
        assert sim.lead_time("A-1") == 5


async def test_refused_listing_leaves_the_others_applied(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=1)
        sim.add_item("B-2", quantity=1)
        outcomes = await adapter.push_stock(
            [push("A-1", 7), push("NO-SUCH", 3), push("B-2", 8, lead=45), push("B-2", 9)]
        )
        assert [o.accepted for o in outcomes] == [True, False, False, True]
        assert outcomes[1].code == "NOT_FOUND"
        assert "NO-SUCH" in outcomes[1].message
        assert outcomes[2].code == "invalid_value"  # refused before spending a call
        assert (sim.stock("A-1"), sim.stock("B-2")) == (7, 9)
        assert [p.status for p in sim.patches] == ["ACCEPTED", "INVALID", "ACCEPTED"]


async def test_sim_answers_a_camel_case_attribute_path_with_invalid(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, _, url, http):
        sim.add_item("A-1", quantity=1)
        # A camelCase attribute path, as a buggy client would send it [V: jlevers#861].
        token = (await http.post(f"{url}/auth/o2/token", data=_lwa_form(sim))).json()
        reply = await http.patch(
            f"{url}/listings/2021-08-01/items/{SELLER}/A-1",
            params={"marketplaceIds": MP},
            headers={"x-amz-access-token": token["access_token"]},
            json={
                "productType": "PRODUCT",
                "patches": [
                    {"op": "replace", "path": "/attributes/fulfillmentAvailability", "value": []}
                ],
            },
        )
        assert reply.status_code == 200
        assert reply.json()["status"] == "INVALID"
        assert reply.json()["issues"][0]["code"] == "90000900"
        assert sim.stock("A-1") == 1


async def test_accepted_patch_applies_later_and_read_stock_shows_when(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim(sim_kw={"apply_delay_s": 300}) as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=1)
        (outcome,) = await adapter.push_stock([push("A-1", 7)])
        assert outcome.accepted
        assert await adapter.read_stock(["A-1"]) == {"A-1": 1}
        await trio.sleep(301)
        assert await adapter.read_stock(["A-1"]) == {"A-1": 7}


async def test_silently_ignored_patch_shows_up_in_read_stock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=1)
        sim.faults.silent_noop = True
        (outcome,) = await adapter.push_stock([push("A-1", 9)])
        assert outcome.accepted
        assert await adapter.read_stock(["A-1"]) == {"A-1": 1}


async def test_push_that_times_out_after_amazon_applied_it_is_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=1)
        sim.faults.timeout_after_apply = True
        with pytest.raises(MallUnavailable):
            await adapter.push_stock([push("A-1", 9)])
        assert sim.stock("A-1") == 9


async def test_read_stock_leaves_out_unknown_and_fba_listings(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=4)
        sim.add_item("Z-0", quantity=0)
        sim.add_item("F-1", quantity=40, fba=True)
        got = await adapter.read_stock(["A-1", "Z-0", "F-1", "NO-SUCH"])
        assert got == {"A-1": 4, "Z-0": 0}
        # One search for all four: the unknown SKU is simply not among the results.
        assert statuses(sim, "searchListingsItems") == [200]
        assert statuses(sim, "getListingsItem") == []
        (search,) = sim.exchanges
        assert search.query["identifiers"] == ["A-1,Z-0,F-1,NO-SUCH"]
        assert search.query["identifiersType"] == ["SKU"]
        assert search.query["includedData"] == ["fulfillmentAvailability"]

        # A SKU with a comma cannot be named in the comma-delimited identifiers: it is
        # read with getListingsItem, an unknown one answered 404, an FBA one left out.
        sim.add_item("Z,9", quantity=9)
        sim.add_item("F,2", quantity=20, fba=True)
        got = await adapter.read_stock(["A-1", "Z,9", "NO,SUCH", "F,2", "NO-SUCH"])
        assert got == {"A-1": 4, "Z,9": 9}
        assert statuses(sim, "searchListingsItems") == [200, 200]
        assert statuses(sim, "getListingsItem") == [200, 404, 200]
        assert sim.exchanges[1].query["identifiers"] == ["A-1,NO-SUCH"]
        one_by_one = [x.path.rsplit("/", 1)[1] for x in list(sim.exchanges)[2:]]
        assert one_by_one == ["Z,9", "NO,SUCH", "F,2"]
        assert_model_valid(sim)


@pytest.mark.parametrize("n", [20, 21, 45, 200])
async def test_read_stock_asks_for_at_most_20_skus_a_search_and_reads_them_all(
    autojump_clock: trio.testing.MockClock, n: int
) -> None:
    """The sale watch reads up to 200 listings a round: ceil(n / 20) searches, not n
    getListingsItem calls, and no listing lost between them."""
    async with open_sim() as (sim, adapter, _, _):
        keys = [f"W-{i:03d}" for i in range(n)]
        for i, key in enumerate(keys):
            sim.add_item(key, quantity=i)
        # A key named twice is asked for once.
        got = await adapter.read_stock([*keys, keys[0]])
        assert got == {key: i for i, key in enumerate(keys)}
        searches = [x for x in sim.exchanges if x.operation == "searchListingsItems"]
        assert len(searches) == math.ceil(n / 20)
        asked = [x.query["identifiers"][0].split(",") for x in searches]
        assert all(len(chunk) <= 20 for chunk in asked)
        assert [k for chunk in asked for k in chunk] == keys
        assert {x.query["pageSize"][0] for x in searches} == {"20"}
        assert statuses(sim, "getListingsItem") == []
        times = [r.at for r in sim.requests if r.api == "searchListingsItems"]
        assert_within_plan(times, *USAGE_PLANS["searchListingsItems"])
        assert sim.throttled_requests == 0
        assert_model_valid(sim)


# --------------------------------------------------------------------------------------
# Listings (loopback)
# --------------------------------------------------------------------------------------


async def test_iter_listings_pages_through_everything_and_skips_fba(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        for i in range(45):
            sim.add_item(f"L-{i:02d}", quantity=i, name=f"商品{i}")
        sim.add_item("L-07", quantity=7, name="帽子", lead_time_days=4, restock_date="2024-09-30")
        sim.add_item("FBA-1", quantity=9, fba=True)
        listings = [x async for x in adapter.iter_listings()]
        assert [x.listing_key for x in listings] == [f"L-{i:02d}" for i in range(45)]
        assert statuses(sim, "searchListingsItems") == [200, 200, 200]
        by_key = {x.listing_key: x for x in listings}
        hat = by_key["L-07"]
        assert (hat.name, hat.quantity, hat.link_code) == ("帽子", 7, "L-07")
        assert hat.attrs == ListingAttrs(lead_time_days=4, restock_date="2024-09-30")
        assert by_key["L-08"].attrs == ListingAttrs()
        assert_model_valid(sim)


async def test_iter_listings_can_link_by_asin(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim(link_field="asin") as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=1, asin="B0TESTASIN")
        (listing,) = [x async for x in adapter.iter_listings()]
        assert (listing.listing_key, listing.link_code) == ("A-1", "B0TESTASIN")


# --------------------------------------------------------------------------------------
# The simulator's own rules (raw HTTP, so nothing in the adapter hides a mistake)
# --------------------------------------------------------------------------------------

_BEFORE = format_iso(EPOCH - 300)
_AFTER = format_iso(EPOCH - 3600)


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ({}, "no MarketplaceIds"),
        ({"MarketplaceIds": MP}, "neither CreatedAfter nor LastUpdatedAfter"),
        (
            {"MarketplaceIds": MP, "CreatedAfter": _AFTER, "LastUpdatedAfter": _AFTER},
            "both CreatedAfter and LastUpdatedAfter",
        ),
        (
            {"MarketplaceIds": MP, "LastUpdatedAfter": _AFTER, "CreatedBefore": _BEFORE},
            "Created* with LastUpdated*",
        ),
        (
            {
                "MarketplaceIds": MP,
                "LastUpdatedAfter": _AFTER,
                "LastUpdatedBefore": format_iso(EPOCH - 60),
            },
            "window ends less than two minutes ago",
        ),
        (
            {"MarketplaceIds": MP, "LastUpdatedAfter": _BEFORE, "LastUpdatedBefore": _AFTER},
            "Before earlier than After",
        ),
        (
            {"MarketplaceIds": MP, "LastUpdatedAfter": _AFTER, "MaxResultsPerPage": "101"},
            "page > 100",
        ),
        (
            {"MarketplaceIds": MP, "LastUpdatedAfter": _AFTER, "OrderStatuses": "Shiped"},
            "bad status",
        ),
        ({"MarketplaceIds": "ATVPDKIKX0DER", "LastUpdatedAfter": _AFTER}, "US marketplace"),
        ({"MarketplaceIds": MP, "LastUpdatedAfter": "yesterday"}, "not ISO 8601"),
        ({"MarketplaceIds": MP, "NextToken": "bm90IGEgdG9rZW4="}, "unknown NextToken"),
    ],
)
async def test_sim_refuses_get_orders_queries_amazon_refuses(
    autojump_clock: trio.testing.MockClock, query: dict[str, str], why: str
) -> None:
    async with open_sim() as (sim, _, url, http):
        token = (await http.post(f"{url}/auth/o2/token", data=_lwa_form(sim))).json()
        reply = await http.get(
            f"{url}/orders/v0/orders",
            params=query,
            headers={"x-amz-access-token": token["access_token"]},
        )
        assert reply.status_code == 400, why
        assert reply.json()["errors"][0]["code"] == "InvalidInput"


async def test_sim_refuses_filters_beside_a_next_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, _, url, http):
        sim.add_item("A-1", quantity=5)
        sim.place_order([("A-1", 1)])
        sim.place_order([("A-1", 1)])
        await trio.sleep(130)
        headers = {
            "x-amz-access-token": (
                await http.post(f"{url}/auth/o2/token", data=_lwa_form(sim))
            ).json()["access_token"]
        }
        query = {"MarketplaceIds": MP, "LastUpdatedAfter": _AFTER, "MaxResultsPerPage": "1"}
        first = await http.get(f"{url}/orders/v0/orders", params=query, headers=headers)
        token = first.json()["payload"]["NextToken"]
        mixed = await http.get(
            f"{url}/orders/v0/orders", params={**query, "NextToken": token}, headers=headers
        )
        assert mixed.status_code == 400
        alone = await http.get(
            f"{url}/orders/v0/orders",
            params={"MarketplaceIds": MP, "NextToken": token},
            headers=headers,
        )
        assert alone.status_code == 200
        assert len(alone.json()["payload"]["Orders"]) == 1


# --------------------------------------------------------------------------------------
# Rate limits and faults (loopback)
# --------------------------------------------------------------------------------------


async def test_order_item_reads_stay_inside_the_usage_plan(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=100)
        for _ in range(40):
            sim.place_order([("A-1", 1)])
        await trio.sleep(130)
        page = await adapter.fetch_orders(None)
        assert len(page.lines) == 40
        times = [r.at for r in sim.requests if r.api == "getOrderItems"]
        assert len(times) == 40
        # 30 at once, then one every two seconds plus the 10 % margin.
        rate, burst = USAGE_PLANS["getOrderItems"]
        assert times[-1] - times[0] >= (40 - 30) / (rate * 0.9) - 1e-6
        assert_within_plan(times, rate, burst)
        assert_within_plan(times, rate * 0.9, burst)
        assert sim.throttled_requests == 0


async def test_429_from_amazon_is_rate_limited_and_blocks_the_bucket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, url, http):
        # Another client of the same seller (a second app session) used up the burst.
        other = make_adapter(url, sim.credentials(), http, {"lwa": url})
        for _ in range(20):
            await other.fetch_orders(None)
        with pytest.raises(MallRateLimited) as info:
            await adapter.fetch_orders(None)
        assert info.value.retry_after == 60  # the plan grants one call a minute
        assert info.value.code == "QuotaExceeded"
        assert sim.throttled_requests == 1
        before = trio.current_time()
        await adapter.fetch_orders(None)
        assert trio.current_time() - before >= 60
        assert sim.throttled_requests == 1


async def test_a_throttle_part_way_through_a_push_batch_keeps_what_amazon_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, url, http):
        keys = [f"P-{k}" for k in "ABCDEF"]
        for key in keys:
            sim.add_item(key, quantity=1)
        # Another session of the same seller spent two of the plan's five patches.
        other = make_adapter(url, sim.credentials(), http, {"lwa": url})
        await other.push_stock([push("P-A", 5), push("P-B", 5)])
        with pytest.raises(MallRateLimited) as info:
            await adapter.push_stock([push(key, 9) for key in keys])
        # The three patches Amazon accepted before the 429 come back with the error,
        # so the store reports them instead of sending them again.
        assert [o.listing_key for o in info.value.done] == keys[:3]
        assert all(o.accepted for o in info.value.done)
        assert [sim.stock(key) for key in keys] == [9, 9, 9, 1, 1, 1]
        assert statuses(sim, "patchListingsItem") == [200] * 5 + [429]


async def test_throttle_fault_with_retry_after_header_is_honoured(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim(sim_kw={"retry_after_header": True}) as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=1)
        sim.faults.throttle_rate = 1.0
        sim.faults.retry_after = 7
        with pytest.raises(MallRateLimited) as info:
            await adapter.read_stock(["A-1"])
        assert info.value.retry_after == 7
        assert sim.forced_throttles == 1


@pytest.mark.parametrize("fault", ["error_rate", "maintenance"])
async def test_server_errors_and_maintenance_are_unavailable(
    autojump_clock: trio.testing.MockClock, fault: str
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=1)
        if fault == "error_rate":
            sim.faults.error_rate = 1.0
        else:
            sim.faults.maintenance = True
        calls: list[Callable[[], Any]] = [
            lambda: adapter.fetch_orders(None),
            lambda: adapter.push_stock([push("A-1", 2)]),
            lambda: adapter.read_stock(["A-1"]),
        ]
        for call in calls:
            with pytest.raises(MallUnavailable) as info:
                await call()
            assert not isinstance(info.value, MallRateLimited)
        assert sim.stock("A-1") == 1


# --------------------------------------------------------------------------------------
# Canned bodies (MockTransport)
# --------------------------------------------------------------------------------------


Reply = tuple[int, Any] | tuple[int, Any, dict[str, str]] | Exception


class Canned:
    """A fake SP-API host and LWA host: canned replies per (method, path), in order
    (the last one repeats), and every request kept."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.routes: dict[tuple[str, str], list[Reply]] = {
            ("POST", "/auth/o2/token"): [(200, fixture("lwa_token.json"))]
        }

    def on(self, method: str, path: str, *replies: Reply) -> None:
        self.routes[(method, path)] = list(replies)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        queue = self.routes[(request.method, request.url.path)]
        reply = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(reply, Exception):
            raise reply
        status, body, *rest = reply
        headers = rest[0] if rest else {}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.Response(status, content=content, headers=headers)

    def sent(self, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path == path]


CREDS = {
    "client_id": "amzn1.application-oa2-client.0123",
    "client_secret": "amzn1.oa2-cs.v1.SECRET-SECRET",
    "refresh_token": "Atzr|REFRESH-REFRESH",
    "seller_id": SELLER,
}
ITEM_PATH = f"/listings/2021-08-01/items/{SELLER}/TSHIRT-RED-M"
SEARCH_PATH = f"/listings/2021-08-01/items/{SELLER}"


@asynccontextmanager
async def canned(**options: Any) -> AsyncIterator[tuple[Canned, AmazonAdapter]]:
    fake = Canned()
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as http:
        yield (
            fake,
            make_adapter(
                "https://sellingpartnerapi-fe.amazon.com",
                CREDS,
                http,
                {"lwa": "https://api.amazon.com"},
                **options,
            ),
        )


def _lwa_form(sim: SimAmazon) -> dict[str, str]:
    creds = sim.credentials()
    return {
        "grant_type": "refresh_token",
        "refresh_token": creds["refresh_token"],
        "client_id": creds["client_id"],
        "client_secret": creds["client_secret"],
    }


def _no_secret(error: BaseException) -> None:
    text = repr(error) + str(error)
    for name in ("client_secret", "refresh_token"):
        assert CREDS[name] not in text
    assert "Atza|" not in text


async def test_canned_orders_skip_afn_keep_lines_without_sku_and_cancel_terminally(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with canned(overlap_s=600) as (fake, adapter):
        fake.on(
            "GET",
            "/orders/v0/orders",
            (200, fixture("get_orders_page1.json")),
            (200, fixture("get_orders_page2.json")),
        )
        fake.on(
            "GET",
            "/orders/v0/orders/503-1234567-1234567/orderItems",
            (200, fixture("get_order_items.json")),
        )
        fake.on(
            "GET",
            "/orders/v0/orders/503-2222222-3333333/orderItems",
            (200, fixture("get_order_items_canceled.json")),
        )
        page = await adapter.fetch_orders("2024-06-01T00:00:00Z")

        lines = {(line.order_id, line.line_id): line for line in page.lines}
        assert set(lines) == {
            ("503-1234567-1234567", "68828574383266"),
            ("503-1234567-1234567", "79039765272157"),
            ("503-2222222-3333333", "11112222333344"),
        }
        red = lines[("503-1234567-1234567", "68828574383266")]
        assert (red.listing_key, red.link_code, red.quantity) == ("TSHIRT-RED-M", "TSHIRT-RED-M", 2)
        assert red.updated_at == datetime.fromisoformat("2024-05-31T23:50:02+00:00").timestamp()
        no_sku = lines[("503-1234567-1234567", "79039765272157")]
        assert (no_sku.listing_key, no_sku.link_code) == ("asin:B0ZYXWVU98", "")
        gone = lines[("503-2222222-3333333", "11112222333344")]
        assert (gone.cancelled, gone.terminal, gone.status) == (True, True, "Canceled")
        # The AFN order's items are never read.
        assert not fake.sent("/orders/v0/orders/503-7654321-7654321/orderItems")

        first, second = fake.sent("/orders/v0/orders")
        assert first.url.params["LastUpdatedAfter"] == "2024-05-31T23:50:00Z"
        assert first.url.params["LastUpdatedBefore"] == format_iso(wall() - 125)
        assert set(second.url.params) == {"MarketplaceIds", "NextToken"}
        token = fixture("get_orders_page1.json")["payload"]["NextToken"]
        assert second.url.params["NextToken"] == token  # "+", "/" and "=" survive
        assert second.headers["x-amz-access-token"] == "Atza|IwEBIFixtureAccessToken"


async def test_canned_lwa_request_is_the_refresh_token_grant(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with canned() as (fake, adapter):
        fake.on("GET", SEARCH_PATH, (200, fixture("search_listings_items_identifiers.json")))
        assert await adapter.read_stock(["TSHIRT-RED-M"]) == {"TSHIRT-RED-M": 7}
        (lwa,) = fake.sent("/auth/o2/token")
        assert lwa.url.host == "api.amazon.com"
        form = dict(httpx.QueryParams(lwa.content.decode()))
        assert form == {
            "grant_type": "refresh_token",
            "refresh_token": CREDS["refresh_token"],
            "client_id": CREDS["client_id"],
            "client_secret": CREDS["client_secret"],
        }


@pytest.mark.parametrize(
    ("name", "status", "code"),
    [
        ("lwa_invalid_grant.json", 400, "invalid_grant"),
        ("lwa_invalid_client.json", 401, "invalid_client"),
    ],
)
async def test_canned_lwa_refusal_is_auth_error_without_secrets(
    autojump_clock: trio.testing.MockClock, name: str, status: int, code: str
) -> None:
    async with canned() as (fake, adapter):
        fake.on("POST", "/auth/o2/token", (status, fixture(name)))
        with pytest.raises(MallAuthError) as info:
            await adapter.read_stock(["TSHIRT-RED-M"])
        assert info.value.code == code
        assert (info.value.mall, info.value.store) == ("amazon", "amz")
        _no_secret(info.value)


async def test_canned_403_after_refresh_is_auth_error_after_exactly_one_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with canned() as (fake, adapter):
        fake.on(
            "GET",
            SEARCH_PATH,
            (200, fixture("search_listings_items_identifiers.json")),
            (403, fixture("error_unauthorized.json")),
        )
        assert await adapter.read_stock(["TSHIRT-RED-M"]) == {"TSHIRT-RED-M": 7}
        with pytest.raises(MallAuthError) as info:
            await adapter.read_stock(["TSHIRT-RED-M"])
        assert info.value.code == "Unauthorized"
        assert "expired" in str(info.value)
        assert len(fake.sent(SEARCH_PATH)) == 3  # ok, 403, 403 after the refresh
        assert len(fake.sent("/auth/o2/token")) == 2
        _no_secret(info.value)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (httpx.ConnectError("refused"), MallUnavailable),
        (httpx.ReadTimeout("slow"), MallUnavailable),
        (httpx.RemoteProtocolError("cut"), MallUnavailable),
    ],
)
async def test_canned_transport_errors_are_unavailable(
    autojump_clock: trio.testing.MockClock, error: Exception, kind: type[MallError]
) -> None:
    async with canned() as (fake, adapter):
        fake.on("GET", SEARCH_PATH, error)
        with pytest.raises(kind):
            await adapter.read_stock(["TSHIRT-RED-M"])
        fake.on("POST", "/auth/o2/token", error)
        with pytest.raises(kind):
            await adapter.check_credentials()


@pytest.mark.parametrize(
    ("reply", "kind", "code"),
    [
        (
            (503, {"errors": [{"code": "ServiceUnavailable", "message": "Try again."}]}),
            MallUnavailable,
            "ServiceUnavailable",
        ),
        ((500, b"<html>oops</html>"), MallUnavailable, ""),
        ((400, fixture("error_invalid_input.json")), MallProtocolError, "InvalidInput"),
        ((200, b"<!DOCTYPE html><html></html>"), MallProtocolError, ""),
        ((200, {"payload": {"NextToken": "x"}}), MallProtocolError, ""),
        ((200, b'{"payload": {"Orders": ['), MallProtocolError, ""),
        ((429, fixture("error_quota_exceeded.json"), {"Retry-After": "7"}), MallRateLimited, ""),
    ],
)
async def test_canned_get_orders_status_mapping(
    autojump_clock: trio.testing.MockClock, reply: Reply, kind: type[MallError], code: str
) -> None:
    async with canned() as (fake, adapter):
        fake.on("GET", "/orders/v0/orders", reply)
        with pytest.raises(MallError) as info:
            await adapter.fetch_orders(None)
        assert type(info.value) is kind
        if code:
            assert info.value.code == code
        if kind is MallRateLimited:
            assert isinstance(info.value, MallRateLimited)
            assert info.value.retry_after == 7


async def test_canned_oversized_response_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    async with canned() as (fake, adapter):
        fake.on("GET", SEARCH_PATH, (200, b" " * (16 * 1024 * 1024 + 1)))
        with pytest.raises(MallProtocolError, match="16 MiB"):
            await adapter.read_stock(["TSHIRT-RED-M"])


async def test_canned_patch_invalid_and_400_are_per_listing_refusals(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with canned() as (fake, adapter):
        fake.on(
            "PATCH",
            ITEM_PATH,
            (200, fixture("patch_invalid.json")),
            (400, fixture("error_invalid_input.json")),
            (200, fixture("patch_accepted.json")),
        )
        outcomes = await adapter.push_stock(
            [push("TSHIRT-RED-M", 1), push("TSHIRT-RED-M", 2), push("TSHIRT-RED-M", 3)]
        )
        assert [(o.accepted, o.code) for o in outcomes] == [
            (False, "99022"),
            (False, "InvalidInput"),
            (True, ""),
        ]
        assert "does not have enough values" in outcomes[0].message
        sent = fake.sent(ITEM_PATH)
        assert [r.url.params["marketplaceIds"] for r in sent] == [MP] * 3
        body = json.loads(sent[2].content)
        assert body["productType"] == "PRODUCT"
        assert body["patches"][0]["value"] == [
            {"fulfillment_channel_code": "DEFAULT", "quantity": 3}
        ]


async def test_canned_listing_search_skips_fba_and_takes_lead_time_and_restock_date(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with canned() as (fake, adapter):
        fake.on("GET", SEARCH_PATH, (200, fixture("search_listings_items.json")))
        (listing,) = [x async for x in adapter.iter_listings()]
        assert (listing.listing_key, listing.name, listing.quantity) == (
            "TSHIRT-RED-M",
            "Tシャツ 赤 M",
            7,
        )
        assert listing.attrs == ListingAttrs(lead_time_days=3, restock_date="2024-07-01")
        (sent,) = fake.requests[1:]
        assert sent.url.params["includedData"] == "summaries,attributes,fulfillmentAvailability"
        assert sent.url.params["pageSize"] == "20"


async def test_canned_read_stock_leaves_out_fba_and_unknown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with canned() as (fake, adapter):
        fake.on("GET", SEARCH_PATH, (200, fixture("search_listings_items_identifiers.json")))
        # SKUs with a comma go to getListingsItem, one call each.
        fake.on("GET", f"{SEARCH_PATH}/TSHIRT,RED,M", (200, fixture("get_listings_item.json")))
        fake.on("GET", f"{SEARCH_PATH}/FBA,ONLY", (200, fixture("get_listings_item_fba.json")))
        fake.on("GET", f"{SEARCH_PATH}/NO,SUCH", (404, fixture("error_not_found.json")))
        keys = ["TSHIRT-RED-M", "TSHIRT,RED,M", "FBA-ONLY", "FBA,ONLY", "NO-SUCH", "NO,SUCH"]
        got = await adapter.read_stock(keys)
        assert got == {"TSHIRT-RED-M": 7, "TSHIRT,RED,M": 5}
        (search,) = fake.sent(SEARCH_PATH)
        assert dict(search.url.params) == {
            "marketplaceIds": MP,
            "includedData": "fulfillmentAvailability",
            "identifiers": "TSHIRT-RED-M,FBA-ONLY,NO-SUCH",
            "identifiersType": "SKU",
            "pageSize": "20",
        }
        for key in ("TSHIRT,RED,M", "FBA,ONLY", "NO,SUCH"):
            (one,) = fake.sent(f"{SEARCH_PATH}/{key}")
            assert dict(one.url.params) == {
                "marketplaceIds": MP,
                "includedData": "fulfillmentAvailability",
            }
        # An item in the answer that was not asked for is not a count of this read.
        assert await adapter.read_stock(["FBA-ONLY", "NO-SUCH"]) == {}


async def test_sku_is_percent_encoded_in_the_path(autojump_clock: trio.testing.MockClock) -> None:
    sku = "赤 #1,2"  # the comma sends read_stock to getListingsItem
    path = f"{SEARCH_PATH}/{sku}"
    async with canned() as (fake, adapter):
        fake.on("GET", path, (200, {**fixture("get_listings_item.json"), "sku": sku}))
        fake.on("PATCH", path, (200, {**fixture("patch_accepted.json"), "sku": sku}))
        assert await adapter.read_stock([sku]) == {sku: 5}
        (outcome,) = await adapter.push_stock([push(sku, 4)])
        assert outcome.accepted
        sent = fake.sent(path)
        assert [r.method for r in sent] == ["GET", "PATCH"]
        for request in sent:
            assert request.url.raw_path.startswith(f"{SEARCH_PATH}/%E8%B5%A4%20%231%2C2?".encode())


async def test_skus_are_percent_encoded_in_the_identifiers_query(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Unencoded, a "#" would end the URL and "&", "=" or "+" would split or change the
    parameter."""
    counts = {"赤 #1": 1, "A&B=C+D": 2, "50%": 3}
    body = {
        "numberOfResults": len(counts),
        "items": [
            {
                "sku": sku,
                "fulfillmentAvailability": [{"fulfillmentChannelCode": "DEFAULT", "quantity": n}],
            }
            for sku, n in counts.items()
        ],
    }
    async with canned() as (fake, adapter):
        fake.on("GET", SEARCH_PATH, (200, body))
        assert await adapter.read_stock(list(counts)) == counts
        (sent,) = fake.sent(SEARCH_PATH)
        assert sent.url.params["identifiers"] == "赤 #1,A&B=C+D,50%"
        assert sent.url.params["identifiersType"] == "SKU"
        assert b"#" not in sent.url.raw_path


@pytest.mark.parametrize(
    "options",
    [{"link_field": "title"}, {"lag_s": -1}, {"page_size": 101}, {"overlap_s": "600"}],
)
async def test_bad_options_are_config_errors(options: dict[str, Any]) -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(ConfigError):
            make_adapter("https://x", CREDS, http, **options)


async def test_missing_credential_and_unknown_status_are_config_errors() -> None:
    async with httpx.AsyncClient() as http:
        without = {k: v for k, v in CREDS.items() if k != "refresh_token"}
        with pytest.raises(ConfigError, match="refresh_token"):
            make_adapter("https://x", without, http)
        with pytest.raises(ConfigError, match="Shiped"):
            make_adapter("https://x", CREDS, http, live=("Shiped",))


def test_spec_names_the_credentials_and_limits() -> None:
    spec = amazon.SPEC
    assert spec.credential_fields == ("client_id", "client_secret", "refresh_token", "seller_id")
    assert spec.default_cancel_statuses == ("Canceled",)
    assert "Unfulfillable" not in spec.default_live_statuses
    assert spec.limits.min_poll_interval >= 1 / 0.0167
