"""``goqd demo``: simulated malls on loopback, a real daemon on a temporary SQLite
ledger, a demo catalogue linked across every store, and a market placing orders.

Everything the daemon does here it would do against real malls: the adapters speak the
malls' wire formats over real HTTP to the simulators, the ledger is a real SQLite file
with FULL durability, credentials are read from 0600 files, operators could connect to
the control socket printed at start. Only the base URLs differ.

At the end it checks what a merchant cares about: every order line a mall accepted was
booked (``lost_lines``), every mall shows the ledger's count (``converged``), and how
many units were sold that were not on the shelf (``oversold_units``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, TextIO

import msgspec
import trio

from goqd import messages as m
from goqd.app import Daemon, run_daemon
from goqd.config import Config, DaemonConfig, StoreConfig
from goqd.sim.base import SimMall
from goqd.sim.http import serve_sim
from goqd.sim.market import Market
from goqd.sim.registry import SIMS

CATALOGUE = [
    ("TS-RED-S", "Tシャツ 赤 S"),
    ("TS-RED-M", "Tシャツ 赤 M"),
    ("TS-BLU-M", "Tシャツ 青 M"),
    ("MUG-WHT", "マグカップ 白"),
    ("MUG-BLK", "マグカップ 黒"),
    ("TOTE-NAT", "トートバッグ 生成"),
    ("SOCK-GRY", "靴下 グレー"),
    ("CAP-NVY", "キャップ 紺"),
    ("TEA-SEN", "煎茶 100g"),
    ("TEA-HOJ", "ほうじ茶 100g"),
    ("FUROSHIKI", "風呂敷"),
    ("TENUGUI", "手ぬぐい"),
]


class DemoSummary(msgspec.Struct, kw_only=True):
    seconds: float
    stores: list[str]
    products: int
    orders: int
    refused_orders: int
    cancelled_units: int
    lines_booked: int
    pushes: int
    oversold_units: int
    ledger_oversold_units: int
    lost_lines: int
    converged: bool
    mismatches: list[str]


def demo_stores(malls: list[str] | None = None) -> list[tuple[str, str]]:
    """Two stores of each mall (name, mall); every simulated mall by default."""
    stores = []
    for mall in malls or list(SIMS):
        if mall not in SIMS:
            raise ValueError(f"no simulated mall {mall!r} (choose from {', '.join(SIMS)})")
        stores += [(f"{mall}-a", mall), (f"{mall}-b", mall)]
    return stores


async def run_demo(
    *,
    seconds: float = 30.0,
    seed: int = 1,
    order_rate: float = 4.0,
    poll_interval: str = "2s",
    out: TextIO | None = None,
    live: bool = True,
    keep: str | None = None,
    malls: list[str] | None = None,
) -> DemoSummary:
    """Run the demo for ``seconds`` of market, then let the daemon settle."""
    out = out or sys.stdout
    rng = random.Random(seed)
    tmp = keep or tempfile.mkdtemp(prefix="goqd-demo-", dir="/tmp")
    try:
        stores = demo_stores(malls)
        return await _run(tmp, stores, seconds, rng, order_rate, poll_interval, out, live)
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


async def _run(
    tmp: str,
    stores: list[tuple[str, str]],
    seconds: float,
    rng: random.Random,
    order_rate: float,
    poll_interval: str,
    out: TextIO,
    live: bool,
) -> DemoSummary:
    say: Callable[[str], None] = (
        (lambda s: print(s, file=out, flush=True)) if live else (lambda s: None)
    )
    clock = time.time
    settle_timeout = 30.0 + max(SIMS[mall].settle_s for _, mall in stores)
    async with trio.open_nursery() as nursery:
        sims: dict[str, SimMall] = {}
        urls: dict[str, str] = {}
        for n, (name, mall) in enumerate(stores):
            spec = SIMS[mall]
            sim = spec.cls(shop_id=f"{300000 + n}", clock=clock, seed=rng.randrange(1 << 30))
            sims[name] = sim
            urls[name] = await nursery.start(serve_sim, sim.app)
        # The real daemon's config, credentials in 0600 files, as an operator would write.
        store_cfgs = []
        os.makedirs(os.path.join(tmp, "etc"), exist_ok=True)
        for name, mall in stores:
            cred = os.path.join(tmp, "etc", f"{name}.json")
            fd = os.open(cred, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(sims[name].credentials(), f)
            spec = SIMS[mall]
            store_cfgs.append(
                StoreConfig(
                    name=name,
                    mall=mall,
                    base_url=urls[name],
                    credentials=cred,
                    poll_interval=poll_interval,
                    push_retry="5s",
                    request_timeout="10s",
                    urls={k: urls[name] + path for k, path in spec.url_paths.items()},
                    options=dict(spec.options),
                )
            )
        config = Config(
            daemon=DaemonConfig(
                state_dir=os.path.join(tmp, "state"),
                control_socket=os.path.join(tmp, "control.sock"),
                http_listen="127.0.0.1:0",
                base_store=stores[0][0],
                log_level="warning",
            ),
            stores=tuple(store_cfgs),
            source=os.path.join(tmp, "etc", "goqd.toml"),
        )
        daemon: Daemon = await nursery.start(run_daemon, config)
        say(
            f"goqd demo: {len(stores)} simulated stores "
            f"({', '.join(n for n, _ in stores)}), ledger {config.daemon.ledger_path}"
        )
        say(f"  control socket {config.daemon.control_socket}  metrics {daemon.http_url}/metrics")

        market = await _catalogue(daemon, sims, rng)
        say(
            f"  catalogue: {len(CATALOGUE)} products linked in every store; "
            f"market runs {seconds:g}s at ~{order_rate:g} orders/s"
        )

        start = trio.current_time()
        next_view = start + 1.0
        while trio.current_time() - start < seconds:
            await trio.sleep(rng.expovariate(order_rate))
            market.place_random(clock())
            roll = rng.random()
            if roll < 0.08:
                market.cancel_random()
            elif roll < 0.3:
                market.advance_random()
            if trio.current_time() >= next_view:
                next_view += 2.0
                say(await _view(daemon, market, trio.current_time() - start))

        say("  market closed; waiting for every store to show the ledger's count …")
        if any(mall == "amazon" for _, mall in stores):
            say(
                "  (Amazon shows orders to getOrders about 2 minutes late, as the real "
                "SP-API does: up to ~4 minutes)"
            )
        converged, mismatches = await _settle(daemon, market, settle_timeout)
        summary = await _summary(daemon, market, seconds, converged, mismatches)
        nursery.cancel_scope.cancel()
    return summary


async def _catalogue(daemon: Daemon, sims: dict[str, SimMall], rng: random.Random) -> Market:
    keys: dict[str, dict[str, str]] = {}
    real: dict[str, int] = {}
    base = daemon.config.daemon.base_store
    for sku, title in CATALOGUE:
        total = rng.randint(4, 20)
        real[sku] = total
        await daemon.ledger.call(m.UpsertProduct(sku=sku, name=title, total=total, store=base))
    for store, sim in sims.items():
        spec = SIMS[sim.mall]
        keys[store] = {}
        for sku, title in CATALOGUE:
            listing = spec.add(sim, spec.listing_key(sku), sku, title, real[sku])
            keys[store][sku] = listing.listing_key
            await daemon.ledger.call(
                m.UpsertListing(
                    store=store, listing_key=listing.listing_key, link_code=sku, name=title, sku=sku
                )
            )
    hot = [sku for sku, _ in CATALOGUE[:3]]
    return Market(sims=sims, keys=keys, real=real, rng=rng, hot=hot)


async def _view(daemon: Daemon, market: Market, elapsed: float) -> str:
    infos = await daemon.store_infos()
    cells = "  ".join(f"{i.name}:{i.state}/q{i.outbox}" for i in infos)
    return (
        f"  t={elapsed:5.1f}s orders={len(market.placed):4d} refused={market.refused:3d} "
        f"oversold={market.oversold_units:2d}  {cells}"
    )


async def _ledger_totals(daemon: Daemon) -> dict[str, int]:
    products = await daemon.ledger.ask(m.ListProducts(limit=10_000), m.ProductList)
    return {p.sku: p.total for p in products.products}


def _mismatches(market: Market, totals: dict[str, int]) -> list[str]:
    bad = []
    for store, sim in market.sims.items():
        for sku, key in market.keys[store].items():
            have = sim.stock(key)
            want = max(0, totals[sku])
            if have != want:
                bad.append(f"{store}/{key}: mall {have}, ledger {want}")
    return bad


async def _settle(daemon: Daemon, market: Market, limit_s: float) -> tuple[bool, list[str]]:
    """Poll every store until each mall's count equals the ledger's, or time runs out."""
    deadline = trio.current_time() + limit_s
    bad: list[str] = []
    while trio.current_time() < deadline:
        for handle in daemon.handles.values():
            handle.request_poll()
        await trio.sleep(1.0)
        status = await daemon.ledger.ask(m.GetLedgerStatus(), m.LedgerStatus)
        booked = _booked_lines(daemon)
        bad = _mismatches(market, await _ledger_totals(daemon))
        if not bad and status.outbox == 0 and market.mall_lines() <= booked:
            return True, []
    return False, bad


def _booked_lines(daemon: Daemon) -> set[tuple[str, str, str]]:
    # A read-only connection beside the ledger's writer: WAL lets readers in.
    conn = sqlite3.connect(f"file:{daemon.config.daemon.ledger_path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT store, order_id, line_id FROM order_lines")
        return {(str(a), str(b), str(c)) for a, b, c in rows}
    finally:
        conn.close()


async def _summary(
    daemon: Daemon, market: Market, seconds: float, converged: bool, mismatches: list[str]
) -> DemoSummary:
    status = await daemon.ledger.ask(m.GetLedgerStatus(), m.LedgerStatus)
    booked = _booked_lines(daemon)
    lost = market.mall_lines() - booked
    return DemoSummary(
        seconds=seconds,
        stores=sorted(daemon.handles),
        products=len(CATALOGUE),
        orders=len(market.placed),
        refused_orders=market.refused,
        cancelled_units=market.cancelled_units,
        lines_booked=len(booked),
        pushes=sum(h.pushes for h in daemon.handles.values()),
        oversold_units=market.oversold_units,
        ledger_oversold_units=status.oversold_units,
        lost_lines=len(lost),
        converged=converged,
        mismatches=mismatches[:20],
    )


def format_summary(summary: DemoSummary) -> str:
    data: dict[str, Any] = msgspec.to_builtins(summary)
    lines = ["", "goqd demo summary"]
    for key, value in data.items():
        if key == "mismatches" and not value:
            continue
        lines.append(f"  {key:<22} {value}")
    verdict = (
        "OK: nothing lost, every mall converged"
        if (summary.converged and summary.lost_lines == 0)
        else "PROBLEM: see lost_lines / mismatches"
    )
    lines.append(f"  {verdict}")
    return "\n".join(lines)
