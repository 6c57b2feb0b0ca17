"""A real daemon with Rakuten simulators on loopback HTTP in a thread of its own, so
goqctl (which runs its own trio loop) can be driven from the test's thread: ``open_shop``
and the catalogues the diff, reflect and CSV tests start from."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import structlog
import trio

from goqd import messages as m
from goqd.app import Daemon, run_daemon
from goqd.cli.goqctl import main as goqctl_main
from goqd.config import Config
from goqd.control import protocol as p
from goqd.control.client import call_sync
from goqd.sim.rakuten import SimRakuten
from tests.helpers import rig


class Shop:
    """Rakuten stores ``base`` and ``other`` served on loopback HTTP, and a daemon that
    can be stopped and started again on the same ledger, all in one trio run in its own
    thread. Orders are polled on request only and the sale watch is off, so what the
    malls show moves only when a test moves it."""

    def __init__(self, tmp: str, sims: dict[str, SimRakuten]) -> None:
        self.tmp = tmp
        self.sims = sims
        self.config: Config
        self.daemon: Daemon
        self._token: trio.lowlevel.TrioToken
        self._nursery: trio.Nursery
        self._stop_daemon: trio.CancelScope | None = None
        self._daemon_done: trio.Event | None = None

    @property
    def socket(self) -> str:
        return self.config.daemon.control_socket

    def run(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    async def _start(self) -> None:
        done = trio.Event()

        async def serve(*, task_status: trio.TaskStatus[Daemon]) -> None:
            try:
                with trio.CancelScope() as scope:
                    self._stop_daemon = scope
                    await run_daemon(self.config, task_status=task_status)
            finally:
                done.set()

        self._daemon_done = done
        self.daemon = await self._nursery.start(serve)

    async def _stop(self) -> None:
        assert self._stop_daemon is not None and self._daemon_done is not None
        self._stop_daemon.cancel()
        await self._daemon_done.wait()

    def restart_daemon(self) -> None:
        self.run(self._stop)
        self.run(self._start)

    def call(self, req: p.ControlRequest, timeout: float = 30) -> Any:
        return call_sync(self.socket, req, timeout=timeout)

    def ask(self, msg: m.LedgerRequest, reply: type[Any]) -> Any:
        return self.run(self.daemon.ledger.ask, msg, reply)

    def goqctl(self, *args: str) -> int:
        return goqctl_main(["--socket", self.socket, *args])

    def wait(self, check: Callable[[], bool], what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
            time.sleep(0.02)

    def settled(self) -> bool:
        return bool(self.call(p.Status()).ledger.outbox == 0)


@contextlib.contextmanager
def open_shop(sims: dict[str, SimRakuten], **store_kw: Any) -> Iterator[Shop]:
    tmp = tempfile.mkdtemp(prefix="goqd-diffd-", dir="/tmp")
    shop = Shop(tmp, sims)
    ready = threading.Event()
    stop: dict[str, Any] = {}
    failed: list[BaseException] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            stores = [
                await rig.serve_store(
                    nursery,
                    tmp,
                    name,
                    sim,
                    poll_interval="1h",
                    push_retry="1s",
                    watch_interval="0s",
                    **store_kw,
                )
                for name, sim in sims.items()
            ]
            shop.config = rig.loopback_config(tmp, stores, base_store="base")
            shop._nursery = nursery
            shop._token = trio.lowlevel.current_trio_token()
            await shop._start()
            stop["event"] = trio.Event()
            ready.set()
            await stop["event"].wait()
            nursery.cancel_scope.cancel()

    def thread_main() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported in the test's thread
            failed.append(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=thread_main, name="goqd-shop", daemon=True)
    # The daemon's log lines are kept aside, not printed into goqctl's stdout.
    with structlog.testing.capture_logs():
        thread.start()
        try:
            assert ready.wait(30) and not failed, failed
            yield shop
        finally:
            if "event" in stop:
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(stop["event"].set, trio_token=shop._token)
            thread.join(30)
            shutil.rmtree(tmp, ignore_errors=True)
    assert not thread.is_alive() and not failed, failed


def three_products() -> dict[str, SimRakuten]:
    base = SimRakuten(shop_id="500001", clock=time.time, seed=1)
    other = SimRakuten(shop_id="500002", clock=time.time, seed=2)
    for code, name in (("A", "Tシャツ 赤"), ("B", "マグカップ"), ("C", "タオル")):
        base.add_listing(f"{code.lower()}/1", link_code=code, name=name, quantity=10)
        other.add_listing(f"{code.lower()}/2", link_code=code, name=name, quantity=10)
    other.add_listing("x/2", link_code="X-NEW", name="未登録の商品", quantity=4)
    return {"base": base, "other": other}


def make_one_of_each(shop: Shop) -> None:
    """At store ``other``: a/2 differs (a push the mall ignored), b/2 differs only by
    units the sale watch holds, c/2 has a push waiting (the store is paused)."""
    base, other = shop.sims["base"], shop.sims["other"]
    other.faults.silent_noop = True
    shop.call(m.SetStock(sku="A", quantity=8))
    # The base mall's counter fell by one (a sale whose order is not polled yet): the
    # sale watch reads it twice and holds that unit back from every store.
    base.listings["b/1"].quantity = 9
    for count in (10, 9):
        seen = m.StockSeen(
            store="base",
            counts=(m.SeenCount(listing_key="b/1", quantity=count),),
            read_started=time.time(),
            hold_expiry=3600.0,
        )
        shop.ask(seen, m.Done)
    shop.wait(shop.settled, "the pushes the mall ignores")
    other.faults.silent_noop = False
    shop.call(p.Pause(store="other"))
    shop.call(m.SetStock(sku="C", quantity=5))
    shop.wait(lambda: base.stock("c/1") == 5, "the base store's push of C")
