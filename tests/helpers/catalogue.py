"""The ``shop`` fixture: a real daemon over a simulated Rakuten fleet with a base store
whose catalogue is imported, linked and diffed by the catalogue tests.

tests/conftest.py registers this module as a plugin, so ``shop`` is a fixture everywhere
(a test module may define its own ``shop``, which wins)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trio

from goqd.app import Daemon, run_daemon
from goqd.sim.rakuten import SimRakuten
from goqd.tools.fleet import open_fleet


@dataclass
class Shop:
    daemon: Daemon
    base: SimRakuten
    other: SimRakuten
    socket: str


@pytest.fixture
async def shop(sock_dir: str) -> AsyncIterator[Shop]:
    tmp = sock_dir
    sims = {
        "base": SimRakuten(shop_id="500001", clock=time.time, seed=1),
        "other": SimRakuten(shop_id="500002", clock=time.time, seed=2),
    }
    sims["base"].add_listing("tshirt/red-s", link_code="TS-RED-S", name="Tシャツ", quantity=7)
    sims["base"].add_listing("mug/white", link_code="MUG-WHT", name="マグ", quantity=3)
    sims["other"].add_listing("t01/rs", link_code="ts-red-s", name="Tシャツ", quantity=1)
    sims["other"].add_listing("m01/w", link_code="MUG-WHT", name="マグ", quantity=9)
    sims["other"].add_listing("x01/x", link_code="NEW-ITEM", name="新商品", quantity=4)
    async with open_fleet(sims) as fleet, trio.open_nursery() as nursery:
        config = fleet.config(
            tmp,
            per_store={"other": {"link_normalize": ("casefold",)}},
            poll_interval="60s",
            push_retry="1s",
            daemon={"base_store": "base"},
        )
        daemon = await nursery.start(run_daemon, config)
        yield Shop(daemon, sims["base"], sims["other"], config.daemon.control_socket)
        nursery.cancel_scope.cancel()
