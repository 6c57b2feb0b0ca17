"""``goqd demo``: simulated malls on loopback, a real daemon on a temporary SQLite
ledger, a demo catalogue linked across every store, and a market placing orders.

Everything the daemon does here it would do against real malls: the adapters speak the
malls' wire formats over real HTTP to the simulators, the ledger is a real SQLite file
with FULL durability, credentials are read from 0600 files, the config is one ``goqd
check-config`` accepts (each mall's own minimum poll interval by default), operators
could connect to the control socket printed at start. Only the base URLs differ.

Time is simulated, as in ``goqd sim`` (``goqd.tools.fleet.SimulatedTime``): the demo's
trio clock runs ``speed`` times faster than real time, and the daemon, the simulators,
the ledger and the market all read that clock. What a mall imposes keeps its simulated
length (Amazon shows an order to getOrders two simulated minutes after it was placed),
so the five-mall demo, under three simulated minutes, takes under a minute. Work on this
machine (HTTP on loopback, SQLite commits) still costs real time, which the fast clock
multiplies by ``speed``: a higher speed is faster and a little less like a real day.

At the end it checks what a merchant cares about: every order line a mall accepted was
booked (``lost_lines``), every mall shows the ledger's count (``converged``), and how
many units were sold that were not on the shelf (``oversold_units``). It never talks
to a real mall and never reports a figure it did not count in this run.
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import msgspec
import trio

from goqd import messages as m
from goqd.app import Daemon, run_daemon
from goqd.config import check_config
from goqd.malls.registry import MALLS
from goqd.sim.base import SimMall
from goqd.sim.market import Market
from goqd.sim.registry import SIMS
from goqd.tools.fleet import SimulatedTime, available_malls, make_sims, open_fleet
from goqd.tools.simbench import (
    ledger_first_seen,
    ledger_snapshot,
    poll_interval_for,
    stock_mismatches,
)

# Simulated seconds per real second. The five-mall demo is under three simulated
# minutes (30 s of market, Amazon's two-minute order lag, its next poll); at 4 that is
# about 45 s of wall time on a loaded 2-core machine, and a real millisecond of work
# costs only four simulated ones, so pacing and timeouts behave much as against real
# malls.
DEMO_SPEED = 4.0
# While settling, every store is asked to poll now (``goqctl poll-now``) this often
# (simulated seconds). Not every second: Amazon allows getOrders a burst of 20 and then
# one a minute, and polling it every second spent the burst before its last orders
# showed, which then waited a minute more.
FORCE_POLL_S = 10.0

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


class BookingDelay(msgspec.Struct, kw_only=True):
    """Simulated seconds from a mall accepting an order to the ledger booking its
    lines, over one mall's stores."""

    lines: int
    min_s: float
    max_s: float


class DemoSummary(msgspec.Struct, kw_only=True):
    seconds: float  # simulated seconds the market was open
    malls: list[str]
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
    booked_after_s: dict[str, BookingDelay]  # by mall
    # Filled in by the run around the summary: simulated seconds from the daemon's
    # READY to the end of the check, and real seconds of the whole run.
    speed: float = 0.0
    simulated_s: float = 0.0
    wall_s: float = 0.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``goqd demo``."""
    parser.description = (
        "Simulated malls on 127.0.0.1, a real daemon on a temporary ledger and "
        "a market placing orders. The demo's clock runs --speed times faster than real "
        "time: every time it takes or shows is in simulated seconds, and the malls' own "
        "delays keep their length in it (Amazon shows an order 2 simulated minutes late)."
    )
    parser.add_argument(
        "--seconds",
        type=positive_float,
        default=30.0,
        help="simulated seconds the market runs (default 30)",
    )
    parser.add_argument(
        "--speed",
        type=positive_float,
        default=DEMO_SPEED,
        help=f"simulated seconds per real second (default {DEMO_SPEED:g}: all five malls "
        "in under a minute)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--order-rate", type=positive_float, default=4.0, help="orders per simulated second"
    )
    parser.add_argument(
        "--poll-interval",
        default="min",
        help="goqd's poll interval for every store, or 'min' (default): each mall's fastest",
    )
    parser.add_argument("--json", action="store_true", help="print only the summary, as JSON")
    parser.add_argument("--keep", metavar="DIR", help="keep the ledger and config in DIR")
    parser.add_argument(
        "--malls",
        type=_mall_list,
        help="comma-separated malls to simulate (default: all of them)",
    )


def positive_float(text: str) -> float:
    """An option's number, finite and above 0 (argparse's ``type``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number more than 0, not {text!r}")
    return value


def _mall_list(text: str) -> list[str]:
    try:
        return parse_malls(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_malls(text: str) -> list[str]:
    """``--malls``: comma-separated mall names; each counts once, in the order given.

    Raises ValueError naming the unknown names and the valid ones, or if none is given.
    """
    return _check_malls([x.strip() for x in text.split(",") if x.strip()])


def _check_malls(names: Sequence[str]) -> list[str]:
    valid = available_malls()
    unknown = [x for x in names if x not in valid]
    if unknown:
        bad = list(dict.fromkeys(unknown))
        raise ValueError(
            f"unknown mall{'s' if len(bad) > 1 else ''} {', '.join(repr(x) for x in bad)} "
            f"(choose from {', '.join(valid)})"
        )
    if not names:
        raise ValueError(f"no mall given (choose from {', '.join(valid)})")
    return list(dict.fromkeys(names))


def demo_stores(malls: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """Two stores of each mall (name, mall); every simulated mall by default."""
    chosen = available_malls() if malls is None else _check_malls(malls)
    stores = []
    for mall in chosen:
        stores += [(f"{mall}-a", mall), (f"{mall}-b", mall)]
    return stores


def demo_polls(stores: Sequence[tuple[str, str]], poll_interval: str) -> dict[str, str]:
    """Each mall's poll interval: ``poll_interval``, or "min" for the mall's own minimum.

    Raises ValueError if a mall does not allow it: the demo runs only a config ``goqd
    check-config`` would accept.
    """
    return {mall: poll_interval_for(mall, poll_interval) for _, mall in stores}


def run_demo(
    *,
    seconds: float = 30.0,
    seed: int = 1,
    order_rate: float = 4.0,
    poll_interval: str = "min",
    speed: float = DEMO_SPEED,
    out: TextIO | None = None,
    live: bool = True,
    keep: str | None = None,
    malls: Sequence[str] | None = None,
) -> DemoSummary:
    """Run the market for ``seconds`` simulated seconds, then let the daemon settle.

    Runs its own ``trio.run`` on a simulated clock ``speed`` times faster than real
    time, so it must not be called from inside one. Bad arguments (an unknown mall, a
    speed or duration not above 0) raise ValueError before anything starts.
    """
    stores = demo_stores(malls)
    polls = demo_polls(stores, poll_interval)
    if not seconds > 0 or not order_rate > 0:
        raise ValueError("seconds and order rate must be more than 0")
    sim_time = SimulatedTime(speed)
    started = time.perf_counter()
    tmp = keep or tempfile.mkdtemp(prefix="goqd-demo-", dir="/tmp")
    try:
        run = functools.partial(
            _run,
            tmp=tmp,
            stores=stores,
            seconds=seconds,
            rng=random.Random(seed),
            # The daemon's own (retry jitter) apart, so the market a seed gives stays
            # the same whatever the daemon draws.
            daemon_rng=random.Random(f"goqd-demo-daemon-{seed}"),
            order_rate=order_rate,
            polls=polls,
            out=out or sys.stdout,
            live=live,
            sim_time=sim_time,
        )
        summary = sim_time.run(run)
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    summary.wall_s = round(time.perf_counter() - started, 1)
    return summary


async def _run(
    *,
    tmp: str,
    stores: list[tuple[str, str]],
    seconds: float,
    rng: random.Random,
    daemon_rng: random.Random,
    order_rate: float,
    polls: dict[str, str],
    out: TextIO,
    live: bool,
    sim_time: SimulatedTime,
) -> DemoSummary:
    say: Callable[[str], None] = (
        (lambda s: print(s, file=out, flush=True)) if live else (lambda s: None)
    )
    clock = sim_time.wall
    malls = sorted({mall for _, mall in stores})
    settle_timeout = 30.0 + max(SIMS[mall].settle_s for mall in malls)
    sims = make_sims(
        stores, clock=clock, seeds=[rng.randrange(1 << 30) for _ in stores], first_shop=300000
    )
    async with open_fleet(sims) as fleet, trio.open_nursery() as nursery:
        config = fleet.config(
            tmp,
            per_store={store: {"poll_interval": polls[mall]} for store, mall in stores},
            push_retry="5s",
            request_timeout="10s",
            daemon={"base_store": stores[0][0], "log_level": "warning"},
        )
        # What `goqd run` would refuse, the demo does not run either.
        check_config(config)
        daemon: Daemon = await nursery.start(
            functools.partial(run_daemon, config, clock=clock, rng=daemon_rng)
        )
        ready_at = trio.current_time()
        say(
            f"goqd demo: {len(malls)} malls ({', '.join(malls)}), {len(stores)} simulated "
            f"stores, ledger {config.daemon.ledger_path}"
        )
        say(f"  control socket {config.daemon.control_socket}  metrics {daemon.http_url}/metrics")
        say(
            f"  the clock runs {sim_time.speed:g}x real time: every time shown is simulated "
            "(mall delays keep their real length in it)"
        )

        market = await _catalogue(daemon, sims, rng)
        say(
            f"  catalogue: {len(CATALOGUE)} products linked in every store; "
            f"market runs {seconds:g}s at ~{order_rate:g} orders/s"
        )

        start = trio.current_time()
        next_view = start + 5.0
        while trio.current_time() - start < seconds:
            await trio.sleep(rng.expovariate(order_rate))
            market.place_random(clock())
            roll = rng.random()
            if roll < 0.08:
                market.cancel_random()
            elif roll < 0.3:
                market.advance_random()
            if trio.current_time() >= next_view:
                next_view += 5.0
                say(await _view(daemon, market, trio.current_time() - start))

        say("  market closed; waiting for every store to show the ledger's count …")
        for mall in malls:
            if (late := SIMS[mall].order_delay_s) > 0:
                say(
                    f"  ({MALLS[mall].title} shows orders about {late / 60:.0f} minutes late, "
                    f"as the real mall does: its last orders are booked about that many "
                    "simulated minutes from now)"
                )
        converged, mismatches = await _settle(daemon, market, settle_timeout, start, say)
        summary = await _summary(daemon, market, malls, seconds, converged, mismatches)
        summary.speed = sim_time.speed
        summary.simulated_s = round(trio.current_time() - ready_at, 1)
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


async def _settle(
    daemon: Daemon,
    market: Market,
    limit_s: float,
    opened_at: float,
    say: Callable[[str], None],
) -> tuple[bool, list[str]]:
    """Ask every store to poll (``goqctl poll-now``) until each mall's count equals the
    ledger's, the outbox is empty, nothing is parked and every line a mall accepted is
    booked, or ``limit_s`` simulated seconds pass."""
    deadline = trio.current_time() + limit_s
    next_view = trio.current_time() + 15.0
    next_poll = trio.current_time()
    bad: list[str] = []
    while trio.current_time() < deadline:
        if trio.current_time() >= next_poll:
            next_poll += FORCE_POLL_S
            for handle in daemon.handles.values():
                handle.request_poll()
        await trio.sleep(1.0)
        totals, booked, outbox, parked = await trio.to_thread.run_sync(
            ledger_snapshot, daemon.config.daemon.ledger_path
        )
        bad = stock_mismatches(market, totals)
        unbooked = len(market.mall_lines() - booked)
        if not bad and outbox == 0 and parked == 0 and unbooked == 0:
            return True, []
        if trio.current_time() >= next_view:
            next_view += 15.0
            say(
                f"  t={trio.current_time() - opened_at:5.1f}s waiting: {unbooked} lines not "
                f"booked yet, {len(bad)} listings differ, outbox {outbox}"
            )
    return False, bad


async def _summary(
    daemon: Daemon,
    market: Market,
    malls: list[str],
    seconds: float,
    converged: bool,
    mismatches: list[str],
) -> DemoSummary:
    status = await daemon.ledger.ask(m.GetLedgerStatus(), m.LedgerStatus)
    first_seen = await trio.to_thread.run_sync(ledger_first_seen, daemon.config.daemon.ledger_path)
    lost = market.mall_lines() - set(first_seen)
    return DemoSummary(
        seconds=seconds,
        malls=malls,
        stores=sorted(daemon.handles),
        products=len(CATALOGUE),
        orders=len(market.placed),
        refused_orders=market.refused,
        cancelled_units=market.cancelled_units,
        lines_booked=len(first_seen),
        pushes=sum(h.pushes for h in daemon.handles.values()),
        oversold_units=market.oversold_units,
        ledger_oversold_units=status.oversold_units,
        lost_lines=len(lost),
        converged=converged,
        mismatches=mismatches[:20],
        booked_after_s=_booking_delays(market, first_seen),
    )


def _booking_delays(
    market: Market, first_seen: dict[tuple[str, str, str], float]
) -> dict[str, BookingDelay]:
    """Per mall: from each order's acceptance, by the simulator's clock, to the ledger's
    ``first_seen`` of its lines, by the daemon's; both read the same simulated clock."""
    delays: dict[str, list[float]] = {}
    for store, sim in market.sims.items():
        for order in sim.orders.values():
            for line in order.lines:
                seen = first_seen.get((store, order.order_id, line.line_id))
                if seen is not None:
                    delays.setdefault(sim.mall, []).append(seen - order.created_at)
    return {
        mall: BookingDelay(lines=len(d), min_s=round(min(d), 1), max_s=round(max(d), 1))
        for mall, d in sorted(delays.items())
    }


def format_summary(summary: DemoSummary) -> str:
    data: dict[str, Any] = msgspec.to_builtins(summary)
    lines = [
        "",
        f"goqd demo summary: {len(summary.malls)} malls ({', '.join(summary.malls)}), "
        f"{len(summary.stores)} stores",
    ]
    for key, value in data.items():
        if key == "mismatches" and not value:
            continue
        if key == "booked_after_s":
            continue
        if isinstance(value, list):
            value = ", ".join(str(x) for x in value)
        lines.append(f"  {key:<22} {value}")
    for mall, delay in summary.booked_after_s.items():
        label = f"booked after ({mall})"
        lines.append(
            f"  {label:<22} {delay.min_s:g}-{delay.max_s:g} simulated s ({delay.lines} lines)"
        )
    verdict = (
        "OK: nothing lost, every mall converged"
        if (summary.converged and summary.lost_lines == 0)
        else "PROBLEM: see lost_lines / mismatches"
    )
    lines.append(f"  {verdict}")
    return "\n".join(lines)
