"""Yahoo!ショッピング adapter against the simulator (loopback) and canned bodies (MockTransport)."""

from __future__ import annotations

import base64
import itertools
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from goqd.errors import MallAuthError, MallProtocolError, MallRateLimited, MallUnavailable
from goqd.malls import yahoo
from goqd.malls.yahoo import YahooAdapter
from goqd.messages import ListingAttrs, PushItem
from goqd.sim.yahoo import SimYahoo
from tests.helpers import paths
from tests.helpers.malls import serve_mall, store_context

FIXTURES = paths.FIXTURES / "yahoo"
EPOCH = 1_717_200_000.0  # 2024-06-01 00:00 UTC
DAY = 86400.0


def wall() -> float:
    return EPOCH + trio.current_time()


def make_adapter(
    url: str,
    creds: dict[str, str],
    http: httpx.AsyncClient,
    urls: dict[str, str] | None = None,
    **options: Any,
) -> YahooAdapter:
    ctx = store_context("yahoo", url, http, wall, creds, store="yshop", urls=urls, options=options)
    return YahooAdapter(ctx)


@asynccontextmanager
async def open_sim(
    *, sim_kw: dict[str, Any] | None = None, **options: Any
) -> AsyncIterator[tuple[SimYahoo, YahooAdapter, str, httpx.AsyncClient]]:
    sim = SimYahoo(shop_id="mystore", clock=wall, **(sim_kw or {}))
    async with serve_mall(sim, http_timeout=5.0) as shop:
        adapter = make_adapter(shop.url, sim.credentials(), shop.http, **options)
        yield sim, adapter, shop.url, shop.http


def push(key: str, qty: int, version: int = 1, overdraft: bool | None = None) -> PushItem:
    return PushItem(
        listing_key=key,
        sku=key,
        quantity=qty,
        version=version,
        attrs=ListingAttrs(allow_overdraft=overdraft),
    )


def api_calls(sim: SimYahoo, name: str) -> list[Any]:
    return [r for r in sim.requests if r.path.endswith("/" + name)]


# --------------------------------------------------------------------------------------
# Auth, signature, tokens (loopback)
# --------------------------------------------------------------------------------------


async def test_every_store_call_is_signed_and_the_sim_verifies_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=5)
        await adapter.check_credentials()
        await adapter.read_stock(["A-1"])
        store_calls = [r for r in sim.requests if "/ShoppingWebService/" in r.path]
        assert len(store_calls) == 2
        assert all(r.status == 200 for r in store_calls)
        assert sim.signatures_verified == 2
        assert sim.bad_signatures == 0


@pytest.mark.parametrize("spoil", ["other_key", "other_version"])
async def test_bad_signature_is_refused_by_sim_and_is_auth_error(
    autojump_clock: trio.testing.MockClock, spoil: str
) -> None:
    async with open_sim() as (sim, _, url, http):
        creds = sim.credentials()
        if spoil == "other_key":
            other = rsa.generate_private_key(public_exponent=65537, key_size=1024)
            creds["public_key_pem"] = (
                other.public_key()
                .public_bytes(
                    serialization.Encoding.PEM,
                    serialization.PublicFormat.SubjectPublicKeyInfo,
                )
                .decode()
            )
        else:
            creds["public_key_version"] = "2"
        adapter = make_adapter(url, creds, http)
        with pytest.raises(MallAuthError) as info:
            await adapter.read_stock(["A-1"])
        assert info.value.code == "pk-00001"
        assert sim.bad_signatures == 1


async def test_expired_access_token_is_refreshed_silently_and_call_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=5)
        assert await adapter.read_stock(["A-1"]) == {"A-1": 5}
        sim.revoke_access_tokens()
        assert await adapter.read_stock(["A-1"]) == {"A-1": 5}
        statuses = [r.status for r in api_calls(sim, "getStock")]
        assert statuses == [200, 401, 200]
        assert sim.token_refreshes == 2


async def test_access_token_renewed_before_its_hour_ends_without_a_401(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=5)
        await adapter.read_stock(["A-1"])
        await trio.sleep(3590)
        await adapter.read_stock(["A-1"])
        assert [r.status for r in api_calls(sim, "getStock")] == [200, 200]
        assert sim.token_refreshes == 2


async def test_revoked_refresh_token_is_auth_error_with_invalid_grant(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        await adapter.read_stock(["A-1"])
        sim.expire_credentials()
        with pytest.raises(MallAuthError) as info:
            await adapter.read_stock(["A-1"])
        assert info.value.code == "invalid_grant"
        assert [r.status for r in api_calls(sim, "getStock")] == [200, 401]


async def test_issued_credentials_work_after_expiry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, url, http):
        sim.expire_credentials()
        with pytest.raises(MallAuthError):
            await adapter.check_credentials()
        renewed = make_adapter(url, sim.issue_credentials(), http)
        await renewed.check_credentials()


async def test_refresh_token_dies_after_28_days(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim() as (_sim, adapter, _, _):
        await adapter.check_credentials()
        expiry = await adapter.credential_expiry()
        assert expiry == pytest.approx(wall() + 28 * DAY, abs=1)
        with trio.fail_after(40 * DAY):
            await trio.sleep(28 * DAY + 1)
        with pytest.raises(MallAuthError):
            await adapter.read_stock(["A-1"])


async def test_rotated_refresh_token_is_used_and_moves_expiry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim(sim_kw={"rotate_refresh_token": True}) as (sim, adapter, _, _):
        first = await adapter.credential_expiry()
        await trio.sleep(DAY)
        await adapter.check_credentials()
        await trio.sleep(3600)
        await adapter.read_stock(["A-1"])  # refresh with the rotated token
        assert sim.token_refreshes == 2
        second = await adapter.credential_expiry()
        assert first is not None and second is not None
        assert second - first == pytest.approx(DAY + 3600, abs=2)  # rotated at each refresh


# --------------------------------------------------------------------------------------
# Orders (loopback)
# --------------------------------------------------------------------------------------


async def test_orders_fetched_across_several_pages(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim(order_page_size=2) as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=100)
        sim.add_item("B-1", sub_code="B-1-red", quantity=100)
        ids = []
        for _ in range(5):
            order = sim.place_order([("A-1", 1), ("B-1:B-1-red", 2)])
            assert order is not None
            ids.append(order.order_id)
            await trio.sleep(10)
        page = await adapter.fetch_orders(None)
        assert sorted({line.order_id for line in page.lines}) == sorted(ids)
        assert len(page.lines) == 10
        assert len(api_calls(sim, "orderList")) == 3
        red = [line for line in page.lines if line.listing_key == "B-1:B-1-red"]
        assert {line.link_code for line in red} == {"B-1-red"}
        assert all(line.quantity == 2 and not line.cancelled for line in red)


async def test_cancellation_seen_next_poll_as_terminal_with_newer_updated_at(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=10)
        order = sim.place_order([("A-1", 3)])
        assert order is not None
        await trio.sleep(60)
        first = await adapter.fetch_orders(None)
        (line,) = first.lines
        assert not line.cancelled and line.status == "2"
        await trio.sleep(120)
        sim.cancel_order(order.order_id)
        await trio.sleep(60)
        second = await adapter.fetch_orders(first.cursor)
        (again,) = second.lines
        assert again.cancelled and again.terminal and again.status == "4"
        assert again.line_id == line.line_id
        assert again.updated_at > line.updated_at


async def test_status_change_within_live_statuses_is_seen(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=10)
        order = sim.place_order([("A-1", 1)])
        assert order is not None
        first = await adapter.fetch_orders(None)
        await trio.sleep(900)
        sim.advance(order.order_id)
        second = await adapter.fetch_orders(first.cursor)
        assert [(ln.status, ln.cancelled) for ln in second.lines] == [("5", False)]


async def test_old_order_cancelled_later_is_found_within_change_lookback(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=10)
        order = sim.place_order([("A-1", 2)])
        assert order is not None
        await trio.sleep(700)  # so the next poll's overlap no longer covers it
        page = await adapter.fetch_orders(None)
        for _ in range(3):  # three days of polls in which nothing changes
            with trio.fail_after(2 * DAY):
                await trio.sleep(DAY)
            page = await adapter.fetch_orders(page.cursor)
            assert page.lines == ()
        sim.cancel_order(order.order_id)
        page = await adapter.fetch_orders(page.cursor)
        assert [(ln.order_id, ln.cancelled, ln.terminal) for ln in page.lines] == [
            (order.order_id, True, True)
        ]


async def test_change_lookback_option_bounds_how_far_back_cancellations_are_seen(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim(change_lookback_days=1) as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=10)
        order = sim.place_order([("A-1", 2)])
        assert order is not None
        page = await adapter.fetch_orders(None)
        with trio.fail_after(4 * DAY):
            await trio.sleep(3 * DAY)
        page = await adapter.fetch_orders(page.cursor)
        sim.cancel_order(order.order_id)
        page = await adapter.fetch_orders(page.cursor)
        assert page.lines == ()  # older than the look-back: documented limit


async def test_cursor_overlap_returns_recent_lines_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=10)
        sim.place_order([("A-1", 1)])
        await trio.sleep(30)
        first = await adapter.fetch_orders(None)
        await trio.sleep(60)  # well inside the 600 s overlap
        second = await adapter.fetch_orders(first.cursor)
        assert [ln.order_id for ln in second.lines] == [ln.order_id for ln in first.lines]
        assert float(second.cursor) > float(first.cursor)


async def test_unchanged_orders_are_not_read_again_and_their_lines_come_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=10)
        for _ in range(3):
            sim.place_order([("A-1", 1)])
        await trio.sleep(30)
        first = await adapter.fetch_orders(None)
        assert len(api_calls(sim, "orderInfo")) == 3
        page = first
        for _ in range(3):  # inside the 600 s overlap: every order is in every window
            await trio.sleep(60)
            page = await adapter.fetch_orders(page.cursor)
            assert page.lines == first.lines
            assert page.orders_seen == 3
        assert len(api_calls(sim, "orderList")) == 4
        assert len(api_calls(sim, "orderInfo")) == 3  # none after the first poll


async def test_changed_order_is_read_again_and_only_that_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=10)
        cancelled = sim.place_order([("A-1", 2)])
        moved = sim.place_order([("A-1", 1)])
        assert cancelled is not None and moved is not None
        await trio.sleep(30)
        first = await adapter.fetch_orders(None)
        assert len(api_calls(sim, "orderInfo")) == 2

        await trio.sleep(60)
        sim.cancel_order(cancelled.order_id)  # LastUpdateTime and OrderStatus move
        await trio.sleep(30)
        second = await adapter.fetch_orders(first.cursor)
        assert len(api_calls(sim, "orderInfo")) == 3
        by_order = {ln.order_id: ln for ln in second.lines}
        assert (by_order[cancelled.order_id].cancelled, by_order[cancelled.order_id].terminal) == (
            True,
            True,
        )
        assert by_order[moved.order_id] == {ln.order_id: ln for ln in first.lines}[moved.order_id]

        await trio.sleep(60)
        sim.advance(moved.order_id)  # a live status change (2 -> 5)
        await trio.sleep(30)
        third = await adapter.fetch_orders(second.cursor)
        assert len(api_calls(sim, "orderInfo")) == 4
        assert {ln.order_id: ln.status for ln in third.lines} == {
            cancelled.order_id: "4",
            moved.order_id: "5",
        }


async def test_poll_asked_again_with_the_old_cursor_returns_its_lines_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The ledger failed to commit a poll, so the store actor asks again with the cursor
    before it. Lines of that poll must come back, the cancellation above all. They do
    without another ``orderInfo``: the memory holds what the mall answered, not what
    the ledger booked, so a poll returns the same lines with or without it."""
    async with open_sim() as (sim, adapter, url, http):
        sim.add_item("A-1", quantity=10)
        cancelled = sim.place_order([("A-1", 2)])
        kept = sim.place_order([("A-1", 1)])
        assert cancelled is not None and kept is not None
        await trio.sleep(30)
        first = await adapter.fetch_orders(None)
        retried_first = await adapter.fetch_orders(None)  # the very first commit failed
        assert retried_first.lines == first.lines
        await trio.sleep(60)
        sim.cancel_order(cancelled.order_id)
        await trio.sleep(30)
        second = await adapter.fetch_orders(first.cursor)
        reads = len(api_calls(sim, "orderInfo"))
        assert reads == 3  # two, then the cancelled one again

        # The ledger did not commit `second`: same cursor as before.
        await trio.sleep(5)
        retried = await adapter.fetch_orders(first.cursor)
        assert retried.lines == second.lines
        assert [ln.cancelled for ln in retried.lines if ln.order_id == cancelled.order_id] == [True]
        assert len(api_calls(sim, "orderInfo")) == reads

        # An adapter without any memory returns the same lines for that cursor.
        await trio.sleep(5)
        fresh = make_adapter(url, sim.credentials(), http)
        assert (await fresh.fetch_orders(first.cursor)).lines == retried.lines
        assert sim.throttled_requests == 0


async def test_order_read_in_the_second_it_changed_is_read_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """LastUpdateTime has whole seconds: an answer read in the second of the change may
    miss a later change in that same second, so it is not kept."""
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=10)
        order = sim.place_order([("A-1", 3)])
        assert order is not None
        stamp = order.updated_at
        first = await adapter.fetch_orders(None)
        assert trio.current_time() < yahoo.SETTLE_S  # read right after the order came in
        assert [ln.quantity for ln in first.lines] == [3]
        sim.edit_quantity(order.order_id, order.lines[0].line_id, 1)
        order.updated_at = stamp  # the same whole second: orderList shows no change
        await trio.sleep(60)
        second = await adapter.fetch_orders(first.cursor)
        assert [ln.quantity for ln in second.lines] == [1]
        assert len(api_calls(sim, "orderInfo")) == 2
        await trio.sleep(60)
        third = await adapter.fetch_orders(second.cursor)  # settled now: kept
        assert third.lines == second.lines
        assert len(api_calls(sim, "orderInfo")) == 2


async def test_orders_that_left_the_window_are_forgotten(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=10)
        order = sim.place_order([("A-1", 1)])
        assert order is not None
        await trio.sleep(30)
        page = await adapter.fetch_orders(None)
        assert set(adapter._seen) == {order.order_id}
        await trio.sleep(700)
        page = await adapter.fetch_orders(page.cursor)  # window from cursor - 600: still in
        assert len(page.lines) == 1
        assert set(adapter._seen) == {order.order_id}
        await trio.sleep(60)
        page = await adapter.fetch_orders(page.cursor)  # past the overlap now
        assert page.lines == ()
        assert set(adapter._seen) == set()
        assert len(api_calls(sim, "orderInfo")) == 1


async def test_orders_in_neither_status_set_are_not_returned_nor_detailed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=10)
        odd = sim.place_order([("A-1", 1)])
        live = sim.place_order([("A-1", 1)])
        assert odd is not None and live is not None
        sim.set_status(odd.order_id, "8")
        page = await adapter.fetch_orders(None)
        assert {ln.order_id for ln in page.lines} == {live.order_id}
        assert len(api_calls(sim, "orderInfo")) == 1


async def test_order_apis_respect_one_request_per_second_per_url(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=100)
        for _ in range(6):
            sim.place_order([("A-1", 1)])
        await adapter.fetch_orders(None)
        await adapter.read_stock(["A-1"])
        await adapter.push_stock([push("A-1", 50)])
        by_path: dict[str, list[float]] = {}
        for r in sim.requests:
            by_path.setdefault(r.path, []).append(r.at)
        assert len(by_path["/ShoppingWebService/V1/orderInfo"]) == 6
        # 10 % wider than the documented second, so a call late on its way is still legal.
        spacing = 1.0 / (yahoo.RATE_PER_URL * yahoo.RATE_MARGIN)
        assert spacing > 1.1
        for path, times in by_path.items():
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert all(gap >= spacing - 1e-6 for gap in gaps), (path, gaps)
        assert sim.throttled_requests == 0


# --------------------------------------------------------------------------------------
# Stock (loopback)
# --------------------------------------------------------------------------------------


async def test_push_over_batch_limit_splits_calls_and_mall_counts_change(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        keys = [f"K-{n:04d}" for n in range(1003)]
        for key in keys:
            sim.add_item(key, quantity=1)
        outcomes = await adapter.push_stock([push(k, 7, version=n) for n, k in enumerate(keys)])
        assert all(o.accepted for o in outcomes)
        assert [o.version for o in outcomes] == list(range(1003))
        assert [len(c["item_code"].split(",")) for c in sim.stock_calls] == [1000, 3]
        assert all(sim.stock(k) == 7 for k in keys)


async def test_allow_overdraft_goes_with_every_push_and_the_sim_stores_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("ON-1", quantity=5)
        sim.add_item("OFF-1", quantity=5, allow_overdraft=True)
        sim.add_item("NONE-1", quantity=5, allow_overdraft=True)
        outcomes = await adapter.push_stock(
            [push("ON-1", 0, overdraft=True), push("OFF-1", 0, overdraft=False), push("NONE-1", 0)]
        )
        assert all(o.accepted for o in outcomes)
        assert sim.stock_calls and all("allow_overdraft" in c for c in sim.stock_calls)
        sent = {
            code: call["allow_overdraft"]
            for call in sim.stock_calls
            for code in call["item_code"].split(",")
        }
        assert sent == {"ON-1": "1", "OFF-1": "0", "NONE-1": "0"}
        assert sim.listings["ON-1"].allow_overdraft is True
        assert sim.listings["OFF-1"].allow_overdraft is False
        assert sim.listings["NONE-1"].allow_overdraft is False
        # The mall now sells ON-1 past zero and refuses the others.
        assert sim.place_order([("ON-1", 1)]) is not None
        assert sim.place_order([("OFF-1", 1)]) is None
        assert sim.stock("ON-1") == -1


async def test_refused_item_code_leaves_the_others_applied(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=1)
        sim.add_item("B-1", quantity=1)
        outcomes = await adapter.push_stock(
            [push("A-1", 4), push("bad_code", 4), push("x,y", 4), push("B-1", 6)]
        )
        assert [o.accepted for o in outcomes] == [True, False, False, True]
        assert outcomes[1].code == "st-02004" and "bad_code" in outcomes[1].message
        assert outcomes[2].code == "invalid_item"
        assert sim.stock("A-1") == 4 and sim.stock("B-1") == 6
        # The refused call, then the resend without the refused code.
        assert [c["item_code"] for c in sim.stock_calls] == ["A-1,bad_code,B-1", "A-1,B-1"]


async def test_unknown_item_code_is_accepted_silently_and_absent_from_read_stock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=1)
        outcomes = await adapter.push_stock([push("NOPE-1", 3), push("A-1", 2)])
        assert [o.accepted for o in outcomes] == [True, True]
        assert "NOPE-1" not in sim.listings
        assert await adapter.read_stock(["NOPE-1", "A-1"]) == {"A-1": 2}


async def test_read_stock_reports_unlimited_as_none_and_sub_codes_by_joined_key(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=4)
        sim.add_item("B-1", sub_code="B-1-s", quantity=None)
        sim.add_item("B-1", sub_code="B-1-m", quantity=2)
        got = await adapter.read_stock(["A-1", "B-1:B-1-s", "B-1:B-1-m", "B-1:B-1-l"])
        assert got == {"A-1": 4, "B-1:B-1-s": None, "B-1:B-1-m": 2}


async def test_push_that_times_out_after_the_mall_applied_it_is_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=1)
        sim.faults.timeout_after_apply = True
        with pytest.raises(MallUnavailable):
            await adapter.push_stock([push("A-1", 9)])
        assert sim.stock("A-1") == 9


async def test_silent_noop_fault_accepts_without_applying(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=1)
        sim.faults.silent_noop = True
        (outcome,) = await adapter.push_stock([push("A-1", 9)])
        assert outcome.accepted
        assert await adapter.read_stock(["A-1"]) == {"A-1": 1}


# --------------------------------------------------------------------------------------
# Listings (loopback)
# --------------------------------------------------------------------------------------


async def test_iter_listings_walks_categories_pages_and_takes_allow_overdraft(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.categories["kitchen"] = ("キッチン", None)
        sim.categories["cups"] = ("カップ", "kitchen")
        for n in range(105):  # more than one myItemList page (max 100)
            sim.add_item(f"P-{n:03d}", quantity=n)
        sim.add_item(
            "CUP-1", sub_code="CUP-1-red", quantity=3, allow_overdraft=True, stcat_key="cups"
        )
        sim.add_item("CUP-1", sub_code="CUP-1-blue", quantity=None, stcat_key="cups")
        listings = [listing async for listing in adapter.iter_listings()]
        by_key = {listing.listing_key: listing for listing in listings}
        assert len(listings) == 107 == len(by_key)
        red = by_key["CUP-1:CUP-1-red"]
        assert (red.link_code, red.quantity, red.attrs.allow_overdraft) == ("CUP-1-red", 3, True)
        blue = by_key["CUP-1:CUP-1-blue"]
        assert (blue.quantity, blue.attrs.allow_overdraft) == (None, False)
        assert by_key["P-104"].quantity == 104
        # all: 2 pages; kitchen (empty) and cups: 1 each
        assert len(api_calls(sim, "myItemList")) == 4
        assert len(api_calls(sim, "stCategoryList")) == 4  # root + every category


async def test_link_field_item_id_links_option_lines_by_item_code(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim(link_field="ItemId") as (sim, adapter, _, _):
        sim.add_item("CUP-1", sub_code="CUP-1-red", quantity=3)
        sim.place_order([("CUP-1:CUP-1-red", 1)])
        page = await adapter.fetch_orders(None)
        assert [(ln.listing_key, ln.link_code) for ln in page.lines] == [
            ("CUP-1:CUP-1-red", "CUP-1")
        ]
        listings = [listing async for listing in adapter.iter_listings()]
        assert [(li.listing_key, li.link_code) for li in listings] == [("CUP-1:CUP-1-red", "CUP-1")]


# --------------------------------------------------------------------------------------
# Faults (loopback)
# --------------------------------------------------------------------------------------


async def test_maintenance_and_server_errors_are_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.faults.maintenance = True
        with pytest.raises(MallUnavailable) as info:
            await adapter.read_stock(["A-1"])
        assert not isinstance(info.value, MallRateLimited)
        sim.faults.maintenance = False
        sim.faults.error_rate = 1.0
        with pytest.raises(MallUnavailable):
            await adapter.fetch_orders(None)


async def test_throttle_is_rate_limited_with_retry_after_and_bucket_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_sim() as (sim, adapter, _, _):
        sim.add_item("A-1", quantity=1)
        sim.faults.throttle_rate = 1.0
        sim.faults.retry_after = 7
        with pytest.raises(MallRateLimited) as info:
            await adapter.read_stock(["A-1"])
        assert info.value.retry_after == 7
        sim.faults.throttle_rate = 0.0
        before = trio.current_time()
        assert await adapter.read_stock(["A-1"]) == {"A-1": 1}
        assert trio.current_time() - before >= 7


async def test_sim_locks_a_url_out_after_a_burst(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim(sim_kw={"rate_burst": 1.0, "lockout_s": 30.0}) as (sim, first, url, http):
        sim.add_item("A-1", quantity=1)
        second = make_adapter(url, sim.credentials(), http)  # its own buckets
        await first.read_stock(["A-1"])
        await second.check_credentials()  # orderCount: another URL, not locked
        with pytest.raises(MallRateLimited) as info:
            await second.read_stock(["A-1"])  # same URL within the second
        assert info.value.retry_after == 30
        with pytest.raises(MallRateLimited):
            await first.read_stock(["A-1"])  # the whole URL is locked, not the client
        assert sim.throttled_requests == 2
        await trio.sleep(31)
        assert await first.read_stock(["A-1"]) == {"A-1": 1}


# --------------------------------------------------------------------------------------
# Canned bodies (MockTransport)
# --------------------------------------------------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def xml(name: str, status: int = 200) -> httpx.Response:
    return httpx.Response(status, content=fixture(name), headers={"content-type": "text/xml"})


def creds(**overrides: str) -> dict[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    base = {
        "client_id": "cid-secret-1",
        "client_secret": "csecret-secret-2",
        "refresh_token": "rt-secret-3",
        "seller_id": "mystore",
        "public_key_pem": pem.decode(),
        "public_key_version": "1",
        "refresh_token_issued_at": "2024-05-20",
    }
    return {**base, **overrides}


def mock_adapter(
    handler: Handler, credentials: dict[str, str] | None = None, **options: Any
) -> YahooAdapter:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return make_adapter("https://circus.example", credentials or creds(), http, **options)


def token_ok(request: httpx.Request) -> httpx.Response | None:
    if request.url.path == "/yconnect/v2/token":
        return httpx.Response(200, content=fixture("token.json"))
    return None


async def test_fixture_orders_parse_into_lines(autojump_clock: trio.testing.MockClock) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if (tok := token_ok(request)) is not None:
            return tok
        body = request.content.decode()
        seen.append(request.url.path.rsplit("/", 1)[-1])
        if request.url.path.endswith("/orderList"):
            assert "<OrderTimeFrom>" in body and "LastUpdateTime" in body
            return xml("orderList.xml")
        order_id = body.split("<OrderId>")[1].split("</OrderId>")[0]
        return xml(f"orderInfo_{order_id.split('-')[1]}.xml")

    adapter = mock_adapter(handler)
    page = await adapter.fetch_orders(None)
    assert seen == ["orderList", "orderInfo", "orderInfo"]  # status 8 never detailed
    first, second, third = page.lines
    assert (first.listing_key, first.link_code, first.quantity) == (
        "tshirt-01:tshirt-01-red-m",
        "tshirt-01-red-m",
        2,
    )
    assert first.updated_at == yahoo.parse_time("2024-06-01T09:06:40+09:00")
    assert (second.listing_key, second.link_code, second.line_id) == ("mug-02", "mug-02", "2")
    assert (third.cancelled, third.terminal, third.quantity) == (True, True, 3)
    assert page.orders_seen == 2


async def test_inactive_order_in_live_status_is_cancelled_but_not_terminal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if (tok := token_ok(request)) is not None:
            return tok
        if request.url.path.endswith("/orderList"):
            return httpx.Response(
                200,
                content=b"<Result><Search><TotalCount>1</TotalCount><OrderInfo>"
                b"<OrderId>mystore-10000009</OrderId></OrderInfo></Search></Result>",
            )
        return xml("orderInfo_inactive.xml")

    page = await mock_adapter(handler).fetch_orders(None)
    (line,) = page.lines
    assert (line.cancelled, line.terminal, line.status) == (True, False, "2")


async def test_poll_that_fails_part_way_keeps_the_answers_it_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[str] = []
    failed: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if (tok := token_ok(request)) is not None:
            return tok
        api = request.url.path.rsplit("/", 1)[-1]
        if api == "orderList":
            seen.append(api)
            return xml("orderList.xml")
        body = request.content.decode()
        order_id = body.split("<OrderId>")[1].split("</OrderId>")[0]
        seen.append(order_id)
        if order_id.endswith("02") and not failed:
            failed.append(order_id)
            return httpx.Response(500, content=b"<Error><Message>busy</Message></Error>")
        return xml(f"orderInfo_{order_id.split('-')[1]}.xml")

    adapter = mock_adapter(handler)
    await trio.sleep(700)  # the fixture orders were last updated at 09:06:40 / 09:08:00
    with pytest.raises(MallUnavailable):
        await adapter.fetch_orders(None)
    page = await adapter.fetch_orders(None)
    assert len(page.lines) == 3
    again = await adapter.fetch_orders(None)
    assert again.lines == page.lines
    assert seen == [
        "orderList",
        "mystore-10000001",
        "mystore-10000002",  # 500
        "orderList",
        "mystore-10000002",  # only the one the failed poll did not read
        "orderList",
    ]


async def test_fixture_stock_bodies_parse(autojump_clock: trio.testing.MockClock) -> None:
    forms: list[dict[str, list[str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if (tok := token_ok(request)) is not None:
            return tok
        forms.append(urllib.parse.parse_qs(request.content.decode()))
        if request.url.path.endswith("/getStock"):
            return xml("getStock.xml")
        return xml("setStock.xml")

    adapter = mock_adapter(handler)
    got = await adapter.read_stock(["tshirt-01:tshirt-01-red-m", "mug-02", "gone-99"])
    assert got == {"tshirt-01:tshirt-01-red-m": 12, "mug-02": None}
    outcomes = await adapter.push_stock(
        [push("tshirt-01:tshirt-01-red-m", 7, overdraft=True), push("mug-02", 0)]
    )
    assert all(o.accepted for o in outcomes)
    assert [f["allow_overdraft"] for f in forms[1:]] == [["0"], ["1"]]
    assert forms[1]["item_code"] == ["mug-02"] and forms[1]["quantity"] == ["0"]


async def test_fixture_listings_parse(autojump_clock: trio.testing.MockClock) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if (tok := token_ok(request)) is not None:
            return tok
        name = request.url.path.rsplit("/", 1)[-1]
        if name == "stCategoryList":
            nested = "page_key" in request.url.params
            return xml("stCategoryList_empty.xml" if nested else "stCategoryList.xml")
        if name == "myItemList":
            assert request.url.params["stcat_key"] == "kitchen"
            return xml("myItemList.xml")
        return xml("getStock.xml")

    listings = [listing async for listing in mock_adapter(handler).iter_listings()]
    assert [
        (li.listing_key, li.name, li.quantity, li.attrs.allow_overdraft) for li in listings
    ] == [
        ("tshirt-01:tshirt-01-red-m", "Tシャツ", 12, True),
        ("mug-02", "マグカップ", None, False),
    ]


async def test_mall_rejection_naming_one_item_resends_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if (tok := token_ok(request)) is not None:
            return tok
        codes = urllib.parse.parse_qs(request.content.decode())["item_code"][0]
        calls.append(codes)
        if "tee_shirt" in codes.split(","):
            return xml("error_param.xml", status=400)
        return xml("setStock.xml")

    outcomes = await mock_adapter(handler).push_stock(
        [push("tee_shirt", 1, version=4), push("mug-02", 2, version=5)]
    )
    assert calls == ["tee_shirt,mug-02", "mug-02"]
    assert [(o.accepted, o.code, o.version) for o in outcomes] == [
        (False, "st-02004", 4),
        (True, "", 5),
    ]


async def test_whole_call_rejection_not_naming_an_item_raises(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if (tok := token_ok(request)) is not None:
            return tok
        return httpx.Response(
            400,
            content=b"<Error><Message>seller_id is invalid</Message><Code>ed-00002</Code></Error>",
        )

    with pytest.raises(MallProtocolError) as info:
        await mock_adapter(handler).push_stock([push("mug-02", 2)])
    assert info.value.code == "ed-00002"


async def test_refresh_without_new_refresh_token_keeps_the_old_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    refresh_forms: list[dict[str, list[str]]] = []
    revoked = {"once": True}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/yconnect/v2/token":
            refresh_forms.append(urllib.parse.parse_qs(request.content.decode()))
            assert "X-sws-signature" in request.headers
            return httpx.Response(200, content=fixture("token.json"))
        if revoked["once"] and len(refresh_forms) == 1:
            revoked["once"] = False
            return httpx.Response(
                401,
                content=b"<Error><Message>expired</Message><Code>px-04102</Code></Error>",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return xml("getStock.xml")

    await mock_adapter(handler).read_stock(["mug-02"])
    assert [f["refresh_token"] for f in refresh_forms] == [["rt-secret-3"], ["rt-secret-3"]]
    assert [f["grant_type"] for f in refresh_forms] == [["refresh_token"]] * 2


async def test_second_invalid_token_after_refresh_is_auth_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if (tok := token_ok(request)) is not None:
            return tok
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    with pytest.raises(MallAuthError):
        await mock_adapter(handler).read_stock(["mug-02"])


async def test_invalid_grant_is_auth_error_and_never_shows_credentials(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, content=fixture("token_invalid_grant.json"))

    values = creds()
    with pytest.raises(MallAuthError) as info:
        await mock_adapter(handler, values).fetch_orders(None)
    assert info.value.code == "invalid_grant"
    text = f"{info.value} {info.value!r} {info.value.message}"
    for field in ("client_id", "client_secret", "refresh_token"):
        assert values[field] not in text


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (
            httpx.Response(503, content=b"<Error><Message>m</Message><Code>x</Code></Error>"),
            MallUnavailable,
        ),
        (httpx.Response(429, headers={"Retry-After": "12"}), MallRateLimited),
        (
            httpx.Response(403, content=b"<Error><Message>no</Message><Code>y</Code></Error>"),
            MallAuthError,
        ),
        (
            httpx.Response(
                200, content=b"<ResultSet><Result><Status>1</Status></Result></ResultSet>"
            ),
            MallProtocolError,
        ),
        (
            httpx.Response(
                200, content=b"<!DOCTYPE x [<!ENTITY a 'b'>]><ResultSet>&a;</ResultSet>"
            ),
            MallProtocolError,
        ),
        (httpx.Response(200, content=b'{"ResultSet": {}}'), MallProtocolError),
    ],
)
async def test_store_api_status_and_body_mapping(
    autojump_clock: trio.testing.MockClock, response: httpx.Response, expected: type[Exception]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if (tok := token_ok(request)) is not None:
            return tok
        return response

    with pytest.raises(expected) as info:
        await mock_adapter(handler).read_stock(["mug-02"])
    assert type(info.value) is expected
    if isinstance(info.value, MallRateLimited):
        assert info.value.retry_after == 12


async def test_transport_errors_and_oversized_bodies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(MallUnavailable):
        await mock_adapter(refuse).read_stock(["mug-02"])

    def huge(request: httpx.Request) -> httpx.Response:
        if (tok := token_ok(request)) is not None:
            return tok
        return httpx.Response(200, content=b"<ResultSet>" + b" " * (17 * 1024 * 1024))

    with pytest.raises(MallProtocolError):
        await mock_adapter(huge).read_stock(["mug-02"])

    def token_down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, content=b"<html>bad gateway</html>")

    with pytest.raises(MallUnavailable):
        await mock_adapter(token_down).read_stock(["mug-02"])


async def test_signature_header_decrypts_to_seller_and_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if (tok := token_ok(request)) is not None:
            return tok
        sealed = base64.b64decode(request.headers["X-sws-signature"])
        seen.append(key.decrypt(sealed, padding.PKCS1v15()).decode())
        assert request.headers["X-sws-signature-version"] == "3"
        assert request.headers["Authorization"] == "Bearer at-fixture-0001"
        return xml("getStock.xml")

    adapter = mock_adapter(handler, creds(public_key_pem=pem.decode(), public_key_version="3"))
    await adapter.read_stock(["mug-02"])
    assert seen == [f"mystore:{int(wall())}"]


async def test_credential_expiry_and_missing_fields(autojump_clock: trio.testing.MockClock) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500)

    adapter = mock_adapter(handler)
    expiry = await adapter.credential_expiry()
    assert expiry == yahoo.parse_time("2024-05-20T00:00:00+09:00") + 28 * DAY  # type: ignore[operator]
    values = creds()
    del values["refresh_token_issued_at"]
    assert await mock_adapter(handler, values).credential_expiry() is None
    del values["seller_id"]
    with pytest.raises(MallAuthError, match="seller_id"):
        await mock_adapter(handler, values).check_credentials()


@pytest.mark.parametrize(
    "configured",
    [
        "https://auth.example.jp",
        "https://auth.example.jp/",
        "https://auth.example.jp/yconnect/v2/token",
    ],
)
async def test_token_url_from_urls_as_base_or_full_endpoint(
    autojump_clock: trio.testing.MockClock, configured: str
) -> None:
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(str(request.url.copy_with(query=None)))
        if request.url.path == "/yconnect/v2/token":
            return httpx.Response(200, content=fixture("token.json"))
        return xml("getStock.xml")

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    adapter = make_adapter("https://circus.example", creds(), http, urls={"token": configured})
    await adapter.read_stock(["mug-02"])
    assert hosts == [
        "https://auth.example.jp/yconnect/v2/token",
        "https://circus.example/ShoppingWebService/V1/getStock",
    ]


def test_spec_describes_the_mall() -> None:
    spec = yahoo.SPEC
    assert spec.name == "yahoo"
    assert spec.limits.push_batch == 1000 and spec.limits.read_batch == 1000
    assert spec.default_live_statuses == ("1", "2", "3", "5")
    assert spec.default_cancel_statuses == ("4",)
    assert set(spec.credential_fields) == {
        "client_id",
        "client_secret",
        "refresh_token",
        "seller_id",
        "public_key_pem",
        "public_key_version",
    }
