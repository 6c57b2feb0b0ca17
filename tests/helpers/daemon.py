"""A real daemon in process for end-to-end tests: the ``rig`` fixture (one Rakuten
simulator fleet, the daemon, its control socket), ``eventually`` to wait on a condition
on the real clock, and a listener standing in for systemd's notify socket.

``rig`` is a fixture: tests/conftest.py registers this module as a plugin."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest
import trio

from goqd import messages as m
from goqd.app import Daemon, run_daemon
from goqd.sim.rakuten import SimRakuten
from goqd.tools.fleet import open_fleet
from tests.helpers.rig import wait_for

SKUS = {"TS-RED-S": 10, "MUG-WHT": 3}


def key(sku: str) -> str:
    return f"{sku.lower()}/{sku}"


async def outbox_empty(daemon: Daemon) -> bool:
    """Every push the ledger queued has been taken and answered."""
    status = await daemon.ledger.ask(m.GetLedgerStatus(), m.LedgerStatus)
    return status.outbox == 0


@dataclass
class Rig:
    daemon: Daemon
    sims: dict[str, SimRakuten]
    socket: str
    tmp: str

    async def poll(self, *stores: str) -> None:
        for s in stores or tuple(self.sims):
            self.daemon.handles[s].request_poll()

    async def booked(self, store: str) -> None:
        """Poll ``store`` and wait until a poll that began after this call committed.
        The sale watch may show a sale at the other malls sooner; the booking is what
        the ledger's totals and history reflect."""
        with trio.fail_after(20):
            assert await self.daemon.handles[store].poll_and_wait()

    async def total(self, sku: str) -> int:
        return (await self.daemon.ledger.ask(m.GetHistory(sku=sku, limit=0), m.History)).total


async def eventually(check: Callable[[], Awaitable[bool] | bool], seconds: float = 20) -> None:
    await wait_for(check, timeout=seconds, every=0.02)


@pytest.fixture
async def rig(sock_dir: str) -> AsyncIterator[Rig]:
    tmp = sock_dir
    sims: dict[str, SimRakuten] = {}
    for n, name in enumerate(("ra", "rb")):
        sim = SimRakuten(shop_id=f"{400000 + n}", clock=time.time, seed=n)
        for sku, qty in SKUS.items():
            sim.add_listing(key(sku), link_code=sku, quantity=qty)
        sims[name] = sim
    async with open_fleet(sims) as fleet, trio.open_nursery() as nursery:
        config = fleet.config(tmp, poll_interval="60s", push_retry="1s", request_timeout="5s")
        daemon: Daemon = await nursery.start(run_daemon, config)
        for sku, qty in SKUS.items():
            await daemon.ledger.call(m.UpsertProduct(sku=sku, total=qty, store="ra"))
            for store in sims:
                await daemon.ledger.call(
                    m.UpsertListing(store=store, listing_key=key(sku), link_code=sku, sku=sku)
                )
        rig = Rig(daemon, sims, config.daemon.control_socket, tmp)
        await eventually(lambda: outbox_empty(rig.daemon))
        yield rig
        nursery.cancel_scope.cancel()


@contextlib.contextmanager
def notify_listener() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for $NOTIFY_SOCKET, and its address (a short path:
    pytest's tmp_path can exceed sun_path). test_startup_refusals uses it too."""
    tmp = tempfile.mkdtemp(prefix="goqd-notify-", dir="/tmp")
    path = os.path.join(tmp, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        sock.setblocking(False)
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(tmp, ignore_errors=True)


def received(sock: socket.socket) -> list[str]:
    """The datagrams waiting on ``sock``, oldest first."""
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out
