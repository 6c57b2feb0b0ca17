"""A store that recovers pushes what waits at once (issue 20, item 2), and the smaller
items of issue 20 (item 6): a stopped store is an error in the log, a 404 during import
names the API instead of saying "try again shortly", and Yahoo's ``orderCount`` takes the
``sellerId`` its pages document."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest
import structlog
import trio
import trio.testing

from goqd import messages as m
from goqd.config import StoreConfig
from goqd.control import protocol as p
from goqd.control.client import RemoteError, call
from goqd.errors import MallUnavailable
from goqd.ledger import LedgerClient, open_ledger
from goqd.malls.base import MallLimits, MallSpec, OrderPage, StoreContext
from goqd.messages import MallListing, PushItem, PushOutcome
from goqd.sim.http import Request, Response
from goqd.sim.yahoo import SimYahoo
from goqd.stores.actor import StoreHandle, run_store
from tests.helpers import rig

clock = rig.mock_wall_clock


# ---------------------------------------------------------------- recovery


class _FullJitter(random.Random):
    """Every backoff at its full length, so the test knows how long each one is."""

    def uniform(self, a: float, b: float) -> float:
        return b


class _Mall:
    """A mall in maintenance until ``down`` is cleared: polls and pushes fail alike."""

    mall = "fake"
    limits = MallLimits(push_batch=100, read_batch=100, min_poll_interval=1.0)

    def __init__(self) -> None:
        self.down = True
        self.pushes: list[tuple[float, tuple[str, ...]]] = []
        self.push_attempts: list[float] = []

    def _check(self) -> None:
        if self.down:
            raise MallUnavailable("メンテナンス中", mall="fake", store="s")

    async def check_credentials(self) -> None:
        self._check()

    async def fetch_orders(self, cursor: str | None) -> OrderPage:
        self._check()
        return OrderPage(lines=(), cursor="c")

    async def push_stock(self, items: Sequence[PushItem]) -> list[PushOutcome]:
        self.push_attempts.append(trio.current_time())
        self._check()
        self.pushes.append((trio.current_time(), tuple(i.listing_key for i in items)))
        return [
            PushOutcome(listing_key=i.listing_key, version=i.version, accepted=True) for i in items
        ]

    async def read_stock(self, listing_keys: Sequence[str]) -> dict[str, int | None]:
        self._check()
        return {}

    async def iter_listings(self) -> AsyncIterator[MallListing]:
        self._check()
        return
        yield  # pragma: no cover

    async def credential_expiry(self) -> float | None:
        return None


async def _store_with_a_push_waiting(
    nursery: trio.Nursery, tmp: str, mall: _Mall
) -> tuple[StoreHandle, LedgerClient]:
    ledger: LedgerClient = await nursery.start(_ledger, os.path.join(tmp, "l.db"))
    await ledger.call(m.UpsertProduct(sku="A", name="A", total=5))
    await ledger.call(m.UpsertListing(store="s", listing_key="s-A", link_code="A", sku="A"))

    def open_adapter(ctx: StoreContext) -> Any:
        return mall

    spec = MallSpec(
        name="fake",
        title="Fake",
        open_adapter=open_adapter,
        limits=mall.limits,
        credential_fields=(),
    )
    config = StoreConfig(
        name="s",
        mall="fake",
        base_url="http://fake.invalid",
        credentials="unused.json",
        poll_interval="60s",
        push_retry="5s",
        watch_interval="0s",
    )
    handle = StoreHandle(name="s", mall="fake", credentials={})
    await nursery.start(
        lambda task_status: run_store(
            config, spec, handle, ledger, clock=clock, rng=_FullJitter(), task_status=task_status
        )
    )
    return handle, ledger


async def _ledger(path: str, *, task_status: trio.TaskStatus[LedgerClient]) -> None:
    async with open_ledger(path, now=clock) as ledger:
        task_status.started(ledger)
        await trio.sleep_forever()


async def test_when_a_poll_gets_through_the_waiting_push_goes_at_once(
    autojump_clock: trio.testing.MockClock, tmp_path: Any
) -> None:
    mall = _Mall()
    with rig.inline_threads():
        async with trio.open_nursery() as nursery:
            handle, _ = await _store_with_a_push_waiting(nursery, str(tmp_path), mall)
            # Five minutes of maintenance: the push backs off 2, 4, …, 128, 256 s; its
            # next try would be at 510 s.
            await trio.sleep(300)
            assert handle.state == "degraded" and not mall.pushes
            last_try = mall.push_attempts[-1]
            assert last_try + 256 > 300 + 60  # the backoff had minutes left
            mall.down = False
            handle.request_poll()
            recovered_at = trio.current_time()
            with trio.fail_after(1):  # virtual: "at once", not after the backoff
                while not mall.pushes:
                    await trio.sleep(0.01)
            assert mall.pushes[0][1] == ("s-A",)
            assert mall.pushes[0][0] - recovered_at < 1
            assert handle.state == "running"
            nursery.cancel_scope.cancel()


async def test_the_backoff_starts_over_after_a_recovery(
    autojump_clock: trio.testing.MockClock, tmp_path: Any
) -> None:
    mall = _Mall()
    with rig.inline_threads():
        async with trio.open_nursery() as nursery:
            handle, ledger = await _store_with_a_push_waiting(nursery, str(tmp_path), mall)
            await trio.sleep(300)
            mall.down = False
            handle.request_poll()
            await trio.sleep(5)
            assert len(mall.pushes) == 1
            # Down again, with a new count to push: its retries begin at 2 s again.
            mall.down = True
            await ledger.call(m.AdjustStock(sku="A", delta=1, reason="restock"))
            await trio.sleep(60)
            tries = [t for t in mall.push_attempts if t > mall.pushes[0][0]]
            assert len(tries) >= 4, tries
            assert tries[1] - tries[0] <= 2.5
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- item 6


def test_a_stopped_store_is_logged_as_an_error() -> None:
    handle = StoreHandle(name="s", mall="rakuten", credentials={})
    with structlog.testing.capture_logs() as logs:
        handle.set_state("degraded", level=8, message="timeout")
        handle.set_state("stopped", level=9, message="licenseKey rejected")
        handle.set_state("running")
    levels = {(e["new"], e["log_level"]) for e in logs if e["event"] == "store_state_changed"}
    assert levels == {("degraded", "warning"), ("stopped", "error"), ("running", "info")}


def test_an_import_answered_404_names_the_api_not_enabled_and_does_not_say_try_again() -> None:
    async def body(run: rig.Running) -> None:
        ra = run.fleet.sims["ra"]
        handle = ra.handle

        async def items_api_off(request: Request, api: str) -> Response:
            if request.path.startswith("/es/2.0/items/"):
                return Response(404, b"", content_type="application/json")
            return await handle(request, api)

        ra.handle = items_api_off  # type: ignore[method-assign]
        with pytest.raises(RemoteError) as refused:
            await call(run.socket, p.Import(store="ra"))
        error = refused.value
        assert "404" in error.message and "/es/2.0/items/search" in error.message
        assert "not enabled for this shop" in error.message
        assert "try again" not in error.hint and "enable" in error.hint
        # An outage is still an outage: "try again shortly".
        ra.handle = handle  # type: ignore[method-assign]
        ra.faults.maintenance = True
        with pytest.raises(RemoteError) as down:
            await call(run.socket, p.Import(store="ra"))
        assert down.value.hint == "try again shortly"

    rig.run_dst(body, seed=41)


async def test_yahoo_order_count_takes_seller_id_as_documented_and_refuses_the_other_name(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sim = SimYahoo(shop_id="ya-shop", clock=clock, require_signature=False)
    router = rig.SimRouter({"ya.sim.invalid": sim.app})
    token = sim.credentials()
    async with httpx.AsyncClient(transport=router) as http:
        tok = await http.post(
            "http://ya.sim.invalid/yconnect/v2/token",
            data={
                "grant_type": "refresh_token",
                "client_id": token["client_id"],
                "client_secret": token["client_secret"],
                "refresh_token": token["refresh_token"],
            },
        )
        headers = {"Authorization": f"Bearer {tok.json()['access_token']}"}
        url = "http://ya.sim.invalid/ShoppingWebService/V1/orderCount"
        wrong = await http.get(url, params={"seller_id": "ya-shop"}, headers=headers)
        right = await http.get(url, params={"sellerId": "ya-shop"}, headers=headers)
    assert wrong.status_code == 400 and b"sellerId" in wrong.content
    assert right.status_code == 200 and b"<NewOrder>" in right.content
