"""What the adapters remember across restarts, and what Amazon's catch-up costs.

The adapters keep "this order version is already read" in ``ctx.state``; the store
actor backs it with the store's state file (``goqd.stores.state``). Here a "restart" is
a new adapter over the file a fresh ``open_store_state`` reads back, and its fresh
process's rate buckets restored from the same file, against the same simulator (which
outlives the restart, as a mall does). Requests are counted at the simulator.
"""

from __future__ import annotations

import functools
import random
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from goqd.errors import MallAuthError
from goqd.malls.amazon import AmazonAdapter
from goqd.malls.base import StoreContext
from goqd.malls.client import ACCESS_TOKEN_MARGIN_S, MallClient, TokenAuth, TokenResponse
from goqd.malls.yahoo import YahooAdapter
from goqd.secret import Secret
from goqd.sim.amazon import SimAmazon
from goqd.sim.base import SimMall
from goqd.sim.http import Response
from goqd.sim.yahoo import SimYahoo
from goqd.stores.state import open_store_state
from tests.helpers import rig
from tests.helpers.rig import SimRouter

EPOCH = 1_717_200_000.0
HOST = "mall.sim.invalid"
BASE = f"http://{HOST}"


def wall() -> float:
    return EPOCH + trio.current_time()


@pytest.fixture
def state_dir(tmp_path: Path) -> str:
    return str(tmp_path)


@asynccontextmanager
async def opened(sim: SimMall, state_dir: str, store: str, **options: Any) -> AsyncIterator[Any]:
    """A store's adapter as a newly started process opens it: state file read back."""
    state = open_store_state(state_dir, store)
    async with httpx.AsyncClient(transport=SimRouter({HOST: sim.app})) as http:
        ctx = StoreContext(
            store=store,
            mall=sim.mall,
            base_url=BASE,
            credentials={k: Secret(v) for k, v in sim.credentials().items()},
            http=http,
            clock=wall,
            options=options,
            urls={"lwa": BASE, "token": BASE + "/yconnect/v2/token"},
            rate_buckets=state.limiters(wall),
            state=state.adapter(),
        )
        yield AmazonAdapter(ctx) if sim.mall == "amazon" else YahooAdapter(ctx)


def calls(sim: SimMall, api: str) -> int:
    return sum(1 for r in sim.requests if r.api == api or r.path.endswith("/" + api))


async def test_yahoo_after_a_restart_reads_only_the_orders_that_changed(
    autojump_clock: trio.testing.MockClock, state_dir: str
) -> None:
    sim = SimYahoo(shop_id="mystore", clock=wall)
    sim.add_item("A-1", quantity=50)
    orders = [sim.place_order([("A-1", 1)]) for _ in range(5)]
    await trio.sleep(30)  # older than SETTLE_S: what orderInfo answers is final
    async with opened(sim, state_dir, "ya") as adapter:
        first = await adapter.fetch_orders(None)
    assert calls(sim, "orderInfo") == 5
    await trio.sleep(60)
    async with opened(sim, state_dir, "ya") as adapter:
        again = await adapter.fetch_orders(first.cursor)
    # The same window after a restart: every line comes back, no order is read again.
    assert calls(sim, "orderInfo") == 5
    assert set(again.lines) == set(first.lines)
    first_order = orders[0]
    assert first_order is not None
    sim.cancel_order(first_order.order_id)
    await trio.sleep(30)
    async with opened(sim, state_dir, "ya") as adapter:
        changed = await adapter.fetch_orders(again.cursor)
    assert calls(sim, "orderInfo") == 6  # the cancelled one alone
    assert {ln.order_id for ln in changed.lines if ln.cancelled} == {first_order.order_id}


async def test_amazon_after_a_restart_reads_no_items_again_at_the_same_version(
    autojump_clock: trio.testing.MockClock, state_dir: str
) -> None:
    sim = SimAmazon(shop_id="A2SELLERJP0001", clock=wall)
    sim.add_listing("SKU-1", quantity=50)
    for _ in range(4):
        sim.place_order([("SKU-1", 1)])
    await trio.sleep(200)  # past getOrders' two-minute lag
    async with opened(sim, state_dir, "am", overlap_s=600) as adapter:
        first = await adapter.fetch_orders(None)
    assert calls(sim, "getOrderItems") == 4
    await trio.sleep(60)
    async with opened(sim, state_dir, "am", overlap_s=600) as adapter:
        again = await adapter.fetch_orders(first.cursor)
    assert calls(sim, "getOrderItems") == 4
    assert set(again.lines) == set(first.lines)


async def test_amazon_a_poll_cut_short_keeps_the_items_it_had_read(
    autojump_clock: trio.testing.MockClock, state_dir: str
) -> None:
    """A 429 on the third order's items fails the poll; the two read before it are not
    read again, by the retry nor by a process started after it."""
    sim = SimAmazon(shop_id="A2SELLERJP0001", clock=wall)
    sim.add_listing("SKU-1", quantity=50)
    for _ in range(3):
        sim.place_order([("SKU-1", 1)])
    await trio.sleep(200)
    original = sim.handle
    answered = 0

    async def third_items_throttled(request: Any, api: str) -> Any:
        nonlocal answered
        if api == "getOrderItems":
            answered += 1
            if answered == 3:
                # Amazon's 429, answered in place of the items (the simulator's own fault
                # flags are checked before this handler is reached).
                body = {"errors": [{"code": "QuotaExceeded", "message": "throttled"}]}
                return Response.json(body, status=429)
        return await original(request, api)

    sim.handle = third_items_throttled  # type: ignore[method-assign]
    async with opened(sim, state_dir, "am") as adapter:
        with pytest.raises(Exception, match="throttled"):
            await adapter.fetch_orders(None)
    async with opened(sim, state_dir, "am") as adapter:
        page = await adapter.fetch_orders(None)
    assert len(page.lines) == 3
    assert calls(sim, "getOrderItems") == 4  # three reads and the one refused


async def test_amazon_catch_up_after_a_burst_pages_through_each_order_at_most_twice(
    autojump_clock: trio.testing.MockClock, state_dir: str
) -> None:
    """Forty orders at once, getOrders pages of two, a poll a minute. With the 600 s
    overlap every poll for ten minutes paged through all forty again (200 and more
    getOrders calls: once getOrders' burst of 20 was spent, one page a minute). Now each
    order is paged through at most twice, and its items read once."""
    n, polls = 40, 15
    sim = SimAmazon(shop_id="A2SELLERJP0001", clock=wall)
    sim.add_listing("SKU-1", quantity=500)
    async with opened(sim, state_dir, "am", page_size=2) as adapter:
        cursor = (await adapter.fetch_orders(None)).cursor
        for _ in range(n):
            sim.place_order([("SKU-1", 1)])
        booked: set[str] = set()
        for _ in range(polls):
            await trio.sleep(60)
            page = await adapter.fetch_orders(cursor)
            cursor = page.cursor
            booked |= {ln.order_id for ln in page.lines}
    assert booked == set(sim.orders)
    get_orders = calls(sim, "getOrders")
    assert get_orders <= 1 + polls + 2 * (n // 2), get_orders
    assert calls(sim, "getOrderItems") == n
    assert sim.throttled_requests == 0


def test_the_daemon_restarted_reads_no_yahoo_order_again() -> None:
    """The store actor backs ``ctx.state`` with the store's state file: a daemon
    started again polls the same window without one ``orderInfo`` call."""
    tmp = tempfile.mkdtemp(prefix="gq-caches-", dir=rig._fast_tmp())

    async def main() -> None:
        fleet = rig.build_fleet((("ya", "yahoo"),), clock=rig.mock_wall_clock, seed=3)
        router, urls = rig.router_for(fleet)
        sim = fleet.sims["ya"]
        market = fleet.market(random.Random(3))
        daemon = functools.partial(
            rig.open_daemon, fleet, tmp, urls, transport=router, clock=rig.mock_wall_clock
        )
        async with daemon():
            for _ in range(4):
                market.place("ya", "TS-RED-S", 1, rig.mock_wall_clock())
            await trio.sleep(120)  # two polls: the orders are read, and settled
        read = calls(sim, "orderInfo")
        assert read == 4
        async with daemon(seed_ledger=False) as run:
            handle = run.daemon.handles["ya"]
            await rig.wait_for(lambda: handle.polls > 0, timeout=120, what="a poll")
        assert calls(sim, "orderInfo") == read

    try:
        with rig.inline_threads(), rig.ordered_deadlines(), rig.deterministic_scheduling(3):
            trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------
# The access token of a refresh-token mall (``goqd.malls.client.TokenAuth``)
# --------------------------------------------------------------------------------------


def _client(clock: Any) -> MallClient:
    ctx = StoreContext(
        store="s1",
        mall="test",
        base_url=BASE,
        credentials={},
        http=httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500))),
        clock=clock,
    )
    return MallClient(ctx, "test")


async def test_an_access_token_is_minted_once_for_tasks_that_need_it_together(
    autojump_clock: trio.testing.MockClock,
) -> None:
    minted: list[str] = []

    async def mint() -> TokenResponse:
        await trio.sleep(1)  # the token endpoint takes its time
        minted.append(f"token-{len(minted)}")
        return TokenResponse(access_token=minted[-1], expires_in=3600)

    auth = TokenAuth(_client(wall), mint)
    got: list[tuple[str, bool]] = []

    async def use() -> None:
        token, fresh = await auth.token()
        got.append((token.reveal(), fresh))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(use)
    assert minted == ["token-0"]
    assert sorted(got) == [("token-0", False)] * 4 + [("token-0", True)]
    # Kept until a minute before it expires, then minted again.
    await trio.sleep(3600 - ACCESS_TOKEN_MARGIN_S - 5)
    assert (await auth.token())[0].reveal() == "token-0"
    await trio.sleep(10)
    assert (await auth.token())[0].reveal() == "token-1"


async def test_a_refused_token_is_replaced_once_and_a_refused_mint_leaves_none(
    autojump_clock: trio.testing.MockClock,
) -> None:
    refuse = False
    minted = 0

    async def mint() -> TokenResponse:
        nonlocal minted
        await trio.sleep(1)
        if refuse:
            raise MallAuthError("token: invalid_grant", mall="test", store="s1")
        minted += 1
        return TokenResponse(access_token=f"token-{minted}", expires_in=3600)

    auth = TokenAuth(_client(wall), mint)
    stale, _ = await auth.token()
    # Two calls refused with the same token: one refresh between them.
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(functools.partial(auth.refresh, stale=stale))
    assert minted == 2
    refuse = True
    with pytest.raises(MallAuthError):
        await auth.refresh()
    # No token is left to send: the next call asks the endpoint again, and is refused.
    with pytest.raises(MallAuthError):
        await auth.token()
    refuse = False
    token, fresh = await auth.token()
    assert (token.reveal(), fresh) == ("token-3", True)
