"""Shopify adapter against the simulated shop (loopback hypercorn) and, for the edge
cases of the wire, against httpx.MockTransport with real-shaped fixtures.

Every async test takes ``autojump_clock`` (pytest-trio only uses a clock that is a
test argument), so the cost bucket, token expiry and timeouts run without real waiting.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
from trio.testing import MockClock

from goqd.errors import (
    LEVEL_CREDENTIAL,
    ConfigError,
    MallAuthError,
    MallProtocolError,
    MallRateLimited,
    MallUnavailable,
)
from goqd.malls.base import StoreContext
from goqd.malls.shopify import (
    API_VERSION,
    M_SET_QUANTITIES,
    SPEC,
    CostBucket,
    ShopifyAdapter,
    _ThrottleStatus,
    idempotency_key,
    parse_webhook_topic,
    sign_webhook,
    verify_webhook,
    webhook_event_id,
    webhook_shop_domain,
)
from goqd.messages import ListingAttrs, PushItem
from goqd.secret import Secret
from goqd.sim.http import App, Request, Response, serve_sim
from goqd.sim.shopify import SimShopify
from tests.helpers import paths
from tests.helpers.malls import serve_mall, store_context

FIXTURES = paths.FIXTURES / "shopify"
T0 = 1_777_000_000.0  # 2026-04-24, a wall clock the sim and the adapter share
STORE = "tokyo-shopify"


def wall() -> float:
    return T0 + trio.current_time()


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def make_sim(**kw: Any) -> SimShopify:
    return SimShopify(shop_id="tokyo", clock=wall, **kw)


@dataclass
class Shop:
    adapter: ShopifyAdapter
    http: httpx.AsyncClient
    url: str


@asynccontextmanager
async def open_shop(
    sim: SimShopify,
    *,
    creds: dict[str, str] | None = None,
    http_timeout: float = 10.0,
    live_statuses: tuple[str, ...] = (),
    **options: Any,
) -> AsyncIterator[Shop]:
    async with serve_mall(sim, http_timeout=http_timeout) as shop:
        credentials = creds or sim.credentials()
        ctx = store_context(
            "shopify",
            shop.url,
            shop.http,
            wall,
            credentials,
            store=STORE,
            live_statuses=live_statuses,
            options=options,
        )
        yield Shop(ShopifyAdapter(ctx), shop.http, shop.url)


@asynccontextmanager
async def mock_adapter(
    handler: Callable[[httpx.Request], httpx.Response], **options: Any
) -> AsyncIterator[ShopifyAdapter]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        ctx = store_context(
            "shopify",
            "https://tokyo.myshopify.com",
            http,
            wall,
            {"access_token": "shpat_do_not_leak", "webhook_secret": "whsec"},
            store=STORE,
            options={"default_location_id": "gid://shopify/Location/1", **options},
        )
        yield ShopifyAdapter(ctx)


def calls(sim: SimShopify, api: str) -> int:
    return sum(1 for r in sim.requests if r.api == api)


def push(
    key: str, qty: int, version: int = 1, previous: int | None = None, location: str | None = None
) -> PushItem:
    extra = {"location_id": location} if location else {}
    return PushItem(
        listing_key=key,
        sku=key,
        quantity=qty,
        version=version,
        previous_quantity=previous,
        attrs=ListingAttrs(extra=extra),
    )


# --------------------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------------------


async def test_check_credentials_sends_token_header_to_pinned_path(
    autojump_clock: MockClock,
) -> None:
    sim = make_sim()
    with trio.fail_after(60):
        async with open_shop(sim) as shop:
            await shop.adapter.check_credentials()
    assert [(r.path, r.api, r.status) for r in sim.requests] == [
        (f"/admin/api/{API_VERSION}/graphql.json", "GoqdPing", 200)
    ]
    assert SPEC.credential_fields == ("access_token", "webhook_secret")


async def test_wrong_token_is_auth_error_that_never_shows_the_token(
    autojump_clock: MockClock,
) -> None:
    sim = make_sim()
    bad = {"access_token": "shpat_wrong_and_secret", "webhook_secret": "x"}
    with trio.fail_after(60):
        async with open_shop(sim, creds=bad) as shop:
            with pytest.raises(MallAuthError) as info:
                await shop.adapter.check_credentials()
    assert "Invalid API key or access token" in str(info.value)
    assert "shpat_wrong_and_secret" not in str(info.value)
    assert info.value.level == LEVEL_CREDENTIAL and info.value.store == STORE


async def test_expired_credentials_are_auth_error_until_a_new_key_is_issued(
    autojump_clock: MockClock,
) -> None:
    sim = make_sim()
    old = sim.credentials()
    with trio.fail_after(60):
        async with open_shop(sim, creds=old) as shop:
            await shop.adapter.check_credentials()
            sim.expire_credentials()
            with pytest.raises(MallAuthError):
                await shop.adapter.check_credentials()
        new = sim.issue_credentials()
        assert new["access_token"] != old["access_token"]
        async with open_shop(sim, creds=new) as shop:
            await shop.adapter.check_credentials()
            sim.faults.expired_credential = True
            with pytest.raises(MallAuthError):
                await shop.adapter.check_credentials()


async def test_expiring_token_reports_expiry_and_stops_working_after_it(
    autojump_clock: MockClock,
) -> None:
    sim = make_sim(token_ttl=3600)
    with trio.fail_after(7200):
        async with open_shop(sim) as shop:
            expiry = await shop.adapter.credential_expiry()
            assert expiry is not None and abs(expiry - (wall() + 3600)) <= 1
            await shop.adapter.check_credentials()
            await trio.sleep(3601)
            with pytest.raises(MallAuthError):
                await shop.adapter.check_credentials()


async def test_credential_expiry_is_none_without_expires_at(autojump_clock: MockClock) -> None:
    sim = make_sim()
    with trio.fail_after(60):
        async with open_shop(sim) as shop:
            assert await shop.adapter.credential_expiry() is None


async def test_bad_options_are_config_errors_naming_the_option() -> None:
    async with httpx.AsyncClient() as http:
        for options, path in (
            ({"link_field": "title"}, "options.link_field"),
            ({"default_location_id": "1234"}, "options.default_location_id"),
            ({"orders_page": 0}, "options.orders_page"),
            ({"cost_rate": "fast"}, "options.cost_rate"),
        ):
            ctx = StoreContext(
                store=STORE,
                mall="shopify",
                base_url="https://x.myshopify.com",
                credentials={},
                http=http,
                clock=wall,
                options=options,
            )
            with pytest.raises(ConfigError) as info:
                ShopifyAdapter(ctx)
            assert info.value.path == path


# --------------------------------------------------------------------------------------
# Orders
# --------------------------------------------------------------------------------------


async def test_orders_follow_every_page_and_every_line_page(autojump_clock: MockClock) -> None:
    sim = make_sim()
    keys = [sim.add_variant(f"SKU-{i}", 1000).listing_key for i in range(20)]
    for n in range(60):
        sim.place_order([(keys[n % 20], 1 + n % 3)])
    big = sim.place_order([(k, 1) for k in keys[:13]])  # more lines than one page holds
    assert big is not None
    with trio.fail_after(600):
        await trio.sleep(5)
        async with open_shop(sim) as shop:
            page = await shop.adapter.fetch_orders(None)
    assert page.orders_seen == 61
    assert len(page.lines) == 60 + 13
    assert calls(sim, "GoqdOrders") == 3  # 25 + 25 + 11 orders
    assert calls(sim, "GoqdOrderLineItems") == 1
    big_lines = [ln for ln in page.lines if ln.order_id == big.order_id]
    assert {ln.listing_key for ln in big_lines} == set(keys[:13])
    first = next(ln for ln in page.lines if ln.order_id != big.order_id)
    assert first.listing_key.startswith("gid://shopify/InventoryItem/")
    assert first.line_id.startswith("gid://shopify/LineItem/")
    assert first.link_code.startswith("SKU-") and not first.cancelled
    assert first.status == "open"
    assert sim.throttled_requests == 0


async def test_cancellation_is_seen_on_next_poll_as_terminal_and_newer(
    autojump_clock: MockClock,
) -> None:
    sim = make_sim()
    key = sim.add_variant("MUG", 10).listing_key
    order = sim.place_order([(key, 2)])
    assert order is not None and sim.stock(key) == 8
    with trio.fail_after(600):
        await trio.sleep(5)
        async with open_shop(sim) as shop:
            first = await shop.adapter.fetch_orders(None)
            await trio.sleep(30)
            sim.cancel_order(order.order_id)
            await trio.sleep(5)
            second = await shop.adapter.fetch_orders(first.cursor)
    (before,) = first.lines
    (after,) = second.lines
    assert (before.cancelled, before.terminal, before.quantity) == (False, False, 2)
    assert (after.cancelled, after.terminal, after.status) == (True, True, "cancelled")
    assert after.line_id == before.line_id
    assert after.updated_at > before.updated_at
    assert sim.stock(key) == 10  # Shopify put its own stock back


async def test_line_edited_to_zero_is_cancelled_but_not_terminal_and_close_stays_live(
    autojump_clock: MockClock,
) -> None:
    sim = make_sim()
    a = sim.add_variant("A", 10).listing_key
    b = sim.add_variant("B", 10).listing_key
    order = sim.place_order([(a, 3), (b, 1)])
    assert order is not None
    line_a, line_b = order.lines
    with trio.fail_after(600):
        await trio.sleep(5)
        sim.edit_quantity(order.order_id, line_a.line_id, 1)
        sim.edit_quantity(order.order_id, line_b.line_id, 0)
        sim.advance(order.order_id)  # closed (archived): still a sale
        await trio.sleep(5)
        async with open_shop(sim) as shop:
            page = await shop.adapter.fetch_orders(None)
        by_line = {ln.line_id: ln for ln in page.lines}
        got_a, got_b = by_line[line_a.line_id], by_line[line_b.line_id]
        assert (got_a.quantity, got_a.cancelled, got_a.status) == (1, False, "closed")
        assert (got_b.cancelled, got_b.terminal, got_b.quantity) == (True, False, 1)
        # A store that counts only open orders leaves closed ones out entirely.
        async with open_shop(sim, live_statuses=("open",)) as shop:
            assert (await shop.adapter.fetch_orders(None)).lines == ()


async def test_cursor_overlap_returns_recent_lines_again(autojump_clock: MockClock) -> None:
    sim = make_sim()
    key = sim.add_variant("A", 10).listing_key
    sim.place_order([(key, 1)])
    with trio.fail_after(3600):
        await trio.sleep(5)
        async with open_shop(sim, overlap_s=600) as shop:
            first = await shop.adapter.fetch_orders(None)
            await trio.sleep(120)  # inside the overlap
            again = await shop.adapter.fetch_orders(first.cursor)
            await trio.sleep(1200)
            # This window starts 600 s before the previous cursor, so it still holds it.
            third = await shop.adapter.fetch_orders(again.cursor)
            await trio.sleep(5)
            # This one starts 600 s before a cursor 1325 s after the order: beyond it.
            later = await shop.adapter.fetch_orders(third.cursor)
    assert len(first.lines) == 1
    assert again.lines == first.lines == third.lines
    assert later.lines == ()
    assert first.cursor < again.cursor < third.cursor < later.cursor


async def test_first_poll_looks_back_initial_lookback_only(autojump_clock: MockClock) -> None:
    sim = make_sim()
    key = sim.add_variant("A", 10).listing_key
    old = sim.place_order([(key, 1)])
    with trio.fail_after(600):
        await trio.sleep(500)
        recent = sim.place_order([(key, 1)])
        await trio.sleep(5)
        async with open_shop(sim, initial_lookback_s=300) as shop:
            page = await shop.adapter.fetch_orders(None)
    assert old is not None and recent is not None
    assert [ln.order_id for ln in page.lines] == [recent.order_id]


# --------------------------------------------------------------------------------------
# Stock pushes
# --------------------------------------------------------------------------------------


async def test_push_over_batch_size_splits_calls_and_sets_counts(autojump_clock: MockClock) -> None:
    sim = make_sim()
    keys = [sim.add_variant(f"S{i}", 5).listing_key for i in range(250)]
    items = [push(k, 40 + i % 7, version=i + 1, previous=5) for i, k in enumerate(keys)]
    with trio.fail_after(600):
        async with open_shop(sim) as shop:
            outcomes = await shop.adapter.push_stock(items)
    assert calls(sim, "GoqdSetQuantities") == 3  # 100 + 100 + 50
    assert all(o.accepted for o in outcomes)
    assert [(o.listing_key, o.version) for o in outcomes] == [
        (it.listing_key, it.version) for it in items
    ]
    assert [sim.stock(k) for k in keys] == [it.quantity for it in items]


async def test_stale_change_from_quantity_refuses_only_that_listing(
    autojump_clock: MockClock,
) -> None:
    sim = make_sim()
    keys = [sim.add_variant(f"S{i}", 5).listing_key for i in range(3)]
    sim.place_order([(keys[1], 1)])  # a sale goqd has not booked: Shopify shows 4
    items = [push(k, 7, version=10 + i, previous=5) for i, k in enumerate(keys)]
    with trio.fail_after(600):
        async with open_shop(sim) as shop:
            outcomes = await shop.adapter.push_stock(items)
    assert [o.accepted for o in outcomes] == [True, False, True]
    assert outcomes[1].code == "stale" and outcomes[1].version == 11
    assert "CHANGE_FROM_QUANTITY_STALE" in outcomes[1].message
    # The whole first request was refused (Shopify applies nothing on a user error),
    # so the other two went again in a second call.
    assert calls(sim, "GoqdSetQuantities") == 2
    assert [sim.stock(k) for k in keys] == [7, 4, 7]


async def test_shop_that_applies_the_rest_needs_no_resend(autojump_clock: MockClock) -> None:
    sim = make_sim(atomic_set=False)
    keys = [sim.add_variant(f"S{i}", 5).listing_key for i in range(3)]
    items = [push(keys[0], 1), push("gid://shopify/InventoryItem/999999", 2), push(keys[2], 3)]
    with trio.fail_after(600):
        async with open_shop(sim) as shop:
            outcomes = await shop.adapter.push_stock(items)
    assert [o.accepted for o in outcomes] == [True, False, True]
    assert calls(sim, "GoqdSetQuantities") == 1
    assert [sim.stock(keys[0]), sim.stock(keys[2])] == [1, 3]


async def test_unknown_inventory_item_is_refused_naming_the_field(
    autojump_clock: MockClock,
) -> None:
    sim = make_sim()
    good = sim.add_variant("G", 5).listing_key
    items = [push("gid://shopify/InventoryItem/424242", 3), push(good, 9)]
    with trio.fail_after(600):
        async with open_shop(sim) as shop:
            bad_out, good_out = await shop.adapter.push_stock(items)
    assert not bad_out.accepted and bad_out.code == "INVALID_INVENTORY_ITEM"
    assert "input.quantities.0.inventoryItemId" in bad_out.message
    assert good_out.accepted and sim.stock(good) == 9


async def test_previous_quantity_none_skips_the_compare_and_set(autojump_clock: MockClock) -> None:
    sim = make_sim()
    key = sim.add_variant("A", 5).listing_key
    sim.place_order([(key, 2)])
    with trio.fail_after(600):
        async with open_shop(sim) as shop:
            (out,) = await shop.adapter.push_stock([push(key, 11, previous=None)])
    assert out.accepted and sim.stock(key) == 11


async def test_push_goes_to_the_location_resolved_at_import(autojump_clock: MockClock) -> None:
    sim = make_sim()
    key = sim.add_variant("A", 5).listing_key
    warehouse = sim.add_location("Warehouse")
    sim.set_level(key, warehouse, 2)
    with trio.fail_after(600):
        async with open_shop(sim) as shop:
            (out,) = await shop.adapter.push_stock([push(key, 8, previous=2, location=warehouse)])
            (primary,) = await shop.adapter.push_stock([push(key, 6, version=2, previous=5)])
    assert out.accepted and primary.accepted
    assert sim.level(key, warehouse) == 8 and sim.stock(key) == 6
    assert calls(sim, "GoqdPing") == 1  # the primary location, asked once


async def test_retry_after_timeout_is_an_idempotent_replay_applied_once(
    autojump_clock: MockClock,
) -> None:
    sim = make_sim()
    key = sim.add_variant("A", 5).listing_key
    item = push(key, 3, version=7, previous=5)
    with trio.fail_after(7200):
        location = sim.primary_location
        async with open_shop(sim, http_timeout=5.0, default_location_id=location) as shop:
            sim.faults.timeout_after_apply = True
            with pytest.raises(MallUnavailable):
                await shop.adapter.push_stock([item])
            sim.faults.timeout_after_apply = False
            assert sim.stock(key) == 3  # it was applied before the client gave up
            sim.place_order([(key, 1)])  # Shopify sells one: 2 left
            (out,) = await shop.adapter.push_stock([item])
    # The retry carried the same key and input: Shopify answered with the first result
    # instead of a stale compare-and-set, and did not set 3 over the sale.
    assert out.accepted
    assert sim.idempotent_replays == 1 and sim.applied_mutations == 1
    assert sim.stock(key) == 2
    assert sim.listings[key].set_history == [3]


def test_idempotency_key_is_stable_for_a_retry_and_changes_with_the_input() -> None:
    base = {"name": "available", "quantities": [{"inventoryItemId": "a", "quantity": 1}]}
    same = json.loads(json.dumps(base))
    other = {"name": "available", "quantities": [{"inventoryItemId": "a", "quantity": 2}]}
    assert idempotency_key("s", base) == idempotency_key("s", same)
    assert idempotency_key("s", base) != idempotency_key("s", other)
    assert idempotency_key("s", base) != idempotency_key("t", base)
    assert idempotency_key("s", base) != idempotency_key("s", base, attempt=1)


async def test_sim_refuses_mutation_without_idempotency_key_and_key_reuse(
    autojump_clock: MockClock,
) -> None:
    sim = make_sim()
    key = sim.add_variant("A", 5).listing_key
    token = sim.credentials()["access_token"]
    input_: dict[str, Any] = {
        "name": "available",
        "reason": "correction",
        "quantities": [
            {
                "inventoryItemId": key,
                "locationId": sim.primary_location,
                "quantity": 1,
                "changeFromQuantity": None,
            }
        ],
    }
    no_directive = M_SET_QUANTITIES.replace(" @idempotent(key: $idempotencyKey)", "")
    with trio.fail_after(600):
        async with open_shop(sim) as shop:
            url = f"{shop.url}/admin/api/{API_VERSION}/graphql.json"

            async def post(query: str, variables: dict[str, Any]) -> Any:
                resp = await shop.http.post(
                    url,
                    headers={"X-Shopify-Access-Token": token},
                    json={
                        "query": query,
                        "variables": variables,
                        "operationName": "GoqdSetQuantities",
                    },
                )
                return resp.json()

            missing = await post(no_directive, {"input": input_})
            first = await post(M_SET_QUANTITIES, {"input": input_, "idempotencyKey": "k1"})
            changed = dict(input_, quantities=[dict(input_["quantities"][0], quantity=2)])
            reused = await post(M_SET_QUANTITIES, {"input": changed, "idempotencyKey": "k1"})
    assert missing["errors"][0]["extensions"]["code"] == "IDEMPOTENCY_KEY_REQUIRED"
    assert first["data"]["inventorySetQuantities"]["userErrors"] == []
    assert reused["data"]["inventorySetQuantities"]["userErrors"][0]["code"] == (
        "IDEMPOTENCY_KEY_PARAMETER_MISMATCH"
    )
    assert sim.stock(key) == 1


async def test_previous_attempt_failed_retries_under_a_new_key(autojump_clock: MockClock) -> None:
    keys_seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        keys_seen.append(body["variables"]["idempotencyKey"])
        if len(keys_seen) == 1:
            errors = [
                {
                    "code": "IDEMPOTENCY_PREVIOUS_ATTEMPT_FAILED",
                    "field": None,
                    "message": "A previous request with this idempotency key failed.",
                }
            ]
            payload = {"inventoryAdjustmentGroup": None, "userErrors": errors}
            return httpx.Response(200, json={"data": {"inventorySetQuantities": payload}})
        return httpx.Response(200, content=fixture("set_quantities_ok.json"))

    with trio.fail_after(60):
        async with mock_adapter(handler) as adapter:
            (out,) = await adapter.push_stock([push("gid://shopify/InventoryItem/1", 8)])
    assert out.accepted
    assert len(keys_seen) == 2 and keys_seen[0] != keys_seen[1]


async def test_stale_fixture_refuses_that_index_and_resends_the_rest(
    autojump_clock: MockClock,
) -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        name = "set_quantities_stale.json" if len(bodies) == 1 else "set_quantities_ok.json"
        return httpx.Response(200, content=fixture(name))

    items = [push(f"gid://shopify/InventoryItem/{n}", 5, version=n, previous=4) for n in (1, 2, 3)]
    with trio.fail_after(60):
        async with mock_adapter(handler) as adapter:
            outcomes = await adapter.push_stock(items)
    assert [o.accepted for o in outcomes] == [True, False, True]
    assert outcomes[1].code == "stale"
    first, second = (b["variables"] for b in bodies)
    assert first["input"]["name"] == "available" and first["input"]["reason"] == "correction"
    assert [q["changeFromQuantity"] for q in first["input"]["quantities"]] == [4, 4, 4]
    assert [q["inventoryItemId"] for q in second["input"]["quantities"]] == [
        "gid://shopify/InventoryItem/1",
        "gid://shopify/InventoryItem/3",
    ]
    assert first["idempotencyKey"] != second["idempotencyKey"]
    assert bodies[0]["operationName"] == "GoqdSetQuantities"
    assert "@idempotent(key: $idempotencyKey)" in bodies[0]["query"]


# --------------------------------------------------------------------------------------
# Reads and import
# --------------------------------------------------------------------------------------


async def test_read_stock_reports_counts_unlimited_and_leaves_unknown_out(
    autojump_clock: MockClock,
) -> None:
    sim = make_sim()
    tracked = sim.add_variant("T", 7).listing_key
    untracked = sim.add_variant("U", None).listing_key
    keys = [tracked, untracked, "gid://shopify/InventoryItem/31337", "not-a-gid"]
    with trio.fail_after(600):
        async with open_shop(sim) as shop:
            got = await shop.adapter.read_stock(keys)
    assert got == {tracked: 7, untracked: None}


async def test_read_stock_batches_by_read_batch(autojump_clock: MockClock) -> None:
    sim = make_sim()
    keys = [sim.add_variant(f"S{i}", i).listing_key for i in range(230)]
    with trio.fail_after(600):
        async with open_shop(sim, default_location_id=sim.primary_location) as shop:
            got = await shop.adapter.read_stock(keys)
    assert got == {k: i for i, k in enumerate(keys)}
    assert calls(sim, "GoqdInventoryLevels") == 3


async def test_iter_listings_pages_with_sku_or_barcode_and_location(
    autojump_clock: MockClock,
) -> None:
    sim = make_sim()
    for i in range(150):
        sim.add_variant(f"SKU-{i}", i, barcode=f"49000000{i:05d}")
    with trio.fail_after(600):
        async with open_shop(sim) as shop:
            listings = [x async for x in shop.adapter.iter_listings()]
        async with open_shop(sim, link_field="barcode") as shop:
            by_barcode = [x async for x in shop.adapter.iter_listings()]
    assert len(listings) == 150 and calls(sim, "GoqdVariants") == 4
    first = listings[0]
    assert first.link_code == "SKU-0" and first.quantity == 0
    assert first.listing_key in sim.listings
    assert first.attrs.extra["location_id"] == sim.primary_location
    assert first.attrs.extra["variant_id"].startswith("gid://shopify/ProductVariant/")
    assert listings[149].quantity == 149
    assert by_barcode[3].link_code == "4900000000003"


# --------------------------------------------------------------------------------------
# Throttling and failures
# --------------------------------------------------------------------------------------


async def test_cost_budget_is_respected_so_the_shop_never_throttles(
    autojump_clock: MockClock,
) -> None:
    sim = make_sim()
    keys = [sim.add_variant(f"S{i}", 1).listing_key for i in range(100)]
    with trio.fail_after(3600):
        async with open_shop(sim, default_location_id=sim.primary_location) as shop:
            start = trio.current_time()

            async def reader() -> None:
                for _ in range(5):
                    await shop.adapter.read_stock(keys)  # 300 points each

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(reader)
            elapsed = trio.current_time() - start
    assert sim.throttled_requests == 0
    assert calls(sim, "GoqdInventoryLevels") == 20
    # 6000 points through a 1000-point bucket refilled at 100/s take >= 50 s ...
    assert elapsed >= 50 - 0.01
    # ... and no window at the shop saw more than the bucket plus the refill.
    log = sim.cost_log
    for i in range(len(log)):
        for j in range(i, len(log)):
            spent = sum(c for _, c in log[i : j + 1])
            assert spent <= 1000 + 100 * (log[j][0] - log[i][0]) + 1e-6


async def test_over_budget_burst_is_throttled_with_retry_after_from_status(
    autojump_clock: MockClock,
) -> None:
    sim = make_sim()
    keys = [sim.add_variant(f"S{i}", 1).listing_key for i in range(100)]
    outcomes: list[MallRateLimited | None] = []
    # A local bucket that believes in 100000 points lets four 300-point reads go out at
    # once; the shop's 1000-point bucket admits three and throttles the fourth.
    with trio.fail_after(600):
        async with open_shop(
            sim, cost_bucket=100000, cost_rate=100000, default_location_id=sim.primary_location
        ) as shop:

            async def reader() -> None:
                try:
                    await shop.adapter.read_stock(keys)
                except MallRateLimited as exc:
                    outcomes.append(exc)
                else:
                    outcomes.append(None)

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(reader)
            start = trio.current_time()
            await shop.adapter.read_stock(keys[:1])  # waits out the back-off first
            waited = trio.current_time() - start
    (limited,) = [o for o in outcomes if o is not None]
    # (300 requested - 100 left) / 100 points per second
    assert limited.retry_after == pytest.approx(2.0, abs=0.01)
    assert waited >= 2.0 - 0.01
    assert sim.throttled_requests == 1 and len(outcomes) == 4


async def test_forced_throttle_fault_is_rate_limited(autojump_clock: MockClock) -> None:
    sim = make_sim()
    sim.faults.throttle_rate = 1.0
    with trio.fail_after(600):
        async with open_shop(sim) as shop:
            for call in (shop.adapter.check_credentials, lambda: shop.adapter.fetch_orders(None)):
                with pytest.raises(MallRateLimited) as info:
                    await call()
                assert info.value.retry_after is not None and info.value.retry_after > 0
    assert sim.forced_throttles == 2


async def test_throttled_fixture_retry_after_comes_from_throttle_status(
    autojump_clock: MockClock,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=fixture("throttled.json"))

    with trio.fail_after(60):
        async with mock_adapter(handler) as adapter:
            with pytest.raises(MallRateLimited) as info:
                await adapter.fetch_orders(None)
    # (752 requested - 118 available) / 50 points per second
    assert info.value.retry_after == pytest.approx(12.68)
    assert info.value.code == "throttled"


async def test_http_429_uses_retry_after_header(autojump_clock: MockClock) -> None:
    sim = make_sim(throttle_http_status=429)
    sim.faults.throttle_rate = 1.0
    sim.faults.retry_after = 4.0
    with trio.fail_after(600):
        async with open_shop(sim) as shop:
            with pytest.raises(MallRateLimited) as info:
                await shop.adapter.check_credentials()
    assert info.value.retry_after == 4.0


async def test_5xx_maintenance_and_transport_failures_are_unavailable(
    autojump_clock: MockClock,
) -> None:
    sim = make_sim()
    with trio.fail_after(600):
        async with open_shop(sim) as shop:
            sim.faults.error_rate = 1.0
            with pytest.raises(MallUnavailable) as five:
                await shop.adapter.fetch_orders(None)
            sim.faults.error_rate = 0.0
            sim.faults.maintenance = True
            with pytest.raises(MallUnavailable) as maint:
                await shop.adapter.push_stock([push("gid://shopify/InventoryItem/1", 1)])
    assert "500" in str(five.value) and "503" in str(maint.value)
    assert not isinstance(five.value, MallRateLimited)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with trio.fail_after(60):
        async with mock_adapter(refuse) as adapter:
            with pytest.raises(MallUnavailable):
                await adapter.read_stock(["gid://shopify/InventoryItem/1"])


async def test_query_over_the_single_query_cost_limit_is_a_protocol_error(
    autojump_clock: MockClock,
) -> None:
    sim = make_sim()
    with trio.fail_after(600):
        async with open_shop(sim, orders_page=100, order_lines_first=250) as shop:
            with pytest.raises(MallProtocolError) as info:
                await shop.adapter.fetch_orders(None)
    assert "MAX_COST_EXCEEDED" in str(info.value)


async def test_401_fixture_and_access_denied_are_auth_errors(autojump_clock: MockClock) -> None:
    def unauthorized(request: httpx.Request) -> httpx.Response:
        assert request.headers["x-shopify-access-token"] == "shpat_do_not_leak"
        realm = 'Basic Realm="Shopify API Authentication"'
        return httpx.Response(
            401, content=fixture("unauthorized.json"), headers={"www-authenticate": realm}
        )

    def denied(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=fixture("access_denied.json"))

    with trio.fail_after(60):
        async with mock_adapter(unauthorized) as adapter:
            with pytest.raises(MallAuthError) as info:
                await adapter.check_credentials()
        async with mock_adapter(denied) as adapter:
            with pytest.raises(MallAuthError) as denied_info:
                await adapter.fetch_orders(None)
    assert "unrecognized login" in str(info.value)
    assert "shpat_do_not_leak" not in str(info.value)
    assert "read_orders" in str(denied_info.value)


async def test_oversized_body_is_a_protocol_error(autojump_clock: MockClock) -> None:
    def huge(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b" " * (16 * 1024 * 1024 + 1))

    with trio.fail_after(60):
        async with mock_adapter(huge) as adapter:
            with pytest.raises(MallProtocolError):
                await adapter.check_credentials()


async def test_orders_fixture_maps_current_quantity_removals_and_custom_lines(
    autojump_clock: MockClock,
) -> None:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, content=fixture("orders_page.json"))

    # The wall clock at 2026-05-01T03:30Z, after the fixture's orders: a cursor later than
    # the mall's clock would not be trusted (goqd.malls.clock).
    await trio.sleep(1_777_606_200 - wall())
    with trio.fail_after(60):
        async with mock_adapter(handler) as adapter:
            page = await adapter.fetch_orders("2026-05-01T03:00:00Z")
    edited, removed, cancelled = page.lines  # the custom line (no variant) is left out
    assert (edited.quantity, edited.cancelled, edited.link_code) == (2, False, "TSHIRT-RED-M")
    assert edited.listing_key == "gid://shopify/InventoryItem/46714324353335"
    assert (removed.quantity, removed.cancelled, removed.terminal) == (1, True, False)
    assert (cancelled.cancelled, cancelled.terminal, cancelled.status) == (True, True, "cancelled")
    assert edited.updated_at == 1777605164.0  # 2026-05-01T03:12:44Z
    query = sent[0]["variables"]["query"]
    assert query.startswith("updated_at:>'2026-05-01T02:50:00Z' AND updated_at:<='")
    assert sent[0]["operationName"] == "GoqdOrders"


# --------------------------------------------------------------------------------------
# Webhooks
# --------------------------------------------------------------------------------------


def test_verify_webhook_accepts_shopify_signature_and_refuses_tampering() -> None:
    body = fixture("webhook_orders_create.json")
    secret = Secret("hush-client-secret")
    good = sign_webhook(secret, body)
    assert verify_webhook(secret, body, good)
    assert verify_webhook(secret, body, f" {good}\n")
    assert not verify_webhook(secret, body.replace(b'"quantity":3', b'"quantity":1'), good)
    assert not verify_webhook(Secret("another-secret"), body, good)
    assert not verify_webhook(secret, body, "")
    assert not verify_webhook(secret, body, "ｂａｄ")


def test_webhook_headers_give_topic_event_id_and_shop() -> None:
    headers = {
        "X-Shopify-Topic": "orders/cancelled",
        "x-shopify-event-id": "e-1",
        "X-Shopify-Webhook-Id": "w-1",
        "X-Shopify-Shop-Domain": "Tokyo.myshopify.com",
    }
    assert parse_webhook_topic(headers) == "orders/cancelled"
    assert webhook_event_id(headers) == "e-1"
    assert webhook_event_id({"X-Shopify-Webhook-Id": "w-2"}) == "w-2"
    assert webhook_shop_domain(headers) == "tokyo.myshopify.com"
    assert parse_webhook_topic({}) == ""


async def test_sim_sends_signed_order_webhooks_and_keeps_failed_ones(
    autojump_clock: MockClock,
) -> None:
    received: list[Request] = []
    answer = [200]

    async def receiver(request: Request) -> Response:
        received.append(request)
        return Response(answer[0], b"")

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            hook_url = await nursery.start(serve_sim, App(receiver))
            sim = make_sim(webhook_url=f"{hook_url}/webhooks/shopify")
            key = sim.add_variant("A", 5).listing_key
            order = sim.place_order([(key, 1)])
            assert order is not None
            async with httpx.AsyncClient(timeout=10) as http:
                assert await sim.deliver_webhooks(http) == 1
                sim.cancel_order(order.order_id)
                answer[0] = 500
                assert await sim.deliver_webhooks(http) == 0
                retry_ids = [h.event_id for h in sim.pending_webhooks]
                answer[0] = 200
                assert await sim.deliver_webhooks(http) == 2
            nursery.cancel_scope.cancel()
    secret = Secret(sim.credentials()["webhook_secret"])
    topics = [parse_webhook_topic(r.headers) for r in received]
    assert topics == [
        "orders/create",
        "orders/cancelled",
        "orders/updated",
        "orders/cancelled",
        "orders/updated",
    ]
    for r in received:
        assert r.path == "/webhooks/shopify"
        assert verify_webhook(secret, r.body, r.headers["x-shopify-hmac-sha256"])
        assert webhook_shop_domain(r.headers) == "tokyo.myshopify.com"
        assert json.loads(r.body)["admin_graphql_api_id"] == order.order_id
    # A redelivery carries the same event id, so the receiver can deduplicate it.
    assert [webhook_event_id(r.headers) for r in received[3:]] == retry_ids
    assert sim.pending_webhooks == []


async def test_cost_bucket_resync_keeps_points_of_requests_still_in_flight(
    autojump_clock: MockClock,
) -> None:
    bucket = CostBucket(rate=100.0, size=1000.0)
    await bucket.acquire(300)
    await bucket.acquire(300)
    # The first answer comes back; the shop has only seen that one (1000 - 300).
    status = _ThrottleStatus(maximum_available=1000, currently_available=700, restore_rate=100)
    bucket.settle(300, status)
    assert bucket.available == pytest.approx(400)  # the second 300 is still owed
    start = trio.current_time()
    await bucket.acquire(500)  # 100 short: one second of refill
    assert trio.current_time() - start == pytest.approx(1.0)
