"""The reliability harness at scale: the figures CI prints after the README's tests.

A plain ``pytest`` does not collect this file (no ``test_`` prefix): the quick budgets of
``tests/integration/test_reliability_*.py`` run there. ``.ci/run`` runs it by name::

    .venv/bin/python -m pytest -p no:cacheprovider tests/reliability_scale.py

* **SIGKILLs of the real process** (``GOQD_SCALE_KILLS``, at least 200): ``goqd run`` in a
  subprocess against simulated Rakuten, Yahoo, au PAY, Shopify and Amazon stores served
  over loopback by this process, so the malls' state, their request logs and their own
  rate limiters outlive every kill; ``GOQD_SCALE_RIGS`` such daemons (default 3), each
  with malls of its own, at once. Customers buy and cancel on Rakuten, au PAY and
  Shopify (Yahoo's and Amazon's order APIs are slow by design: a minute or more for a
  handful of orders); all five are polled, watched and pushed to. Each life of the
  daemon: start; READY (a clean start is required); settle; every invariant checked
  (no loss, conservation, convergence, no stale overwrite: I1–I4 of docs/reliability.md,
  by ``tests.helpers.checker``); armed (``GOQD_CRASHPOINT_ARM``); orders,
  cancellations, operator restocks and stock imports until it dies, at a crash point
  (each of ``goqd.crashpoints.POINTS`` at least ``GOQD_SCALE_POINT_HITS`` times, default
  20) or by a SIGKILL at a random moment; then the ledger file is checked before the
  next start (``rig.ledger_consistent``). One life in twenty more is killed at a random
  moment of its start-up instead (the next life's checks cover it).
* **Rate limits across restarts**: every request a mall refused as over its documented
  limit (each simulator's limiter counts them: Rakuten, au PAY and Amazon per API, Yahoo
  per URL with its lock-out, Shopify's cost bucket), and every 429 the checker's
  throttling check (catalogue entry E2) finds in the malls' request logs. Both must be 0.
* **Seeds of the deterministic simulation** (``GOQD_SCALE_SEEDS``, default 500, from
  ``GOQD_SCALE_SEED_START``, default 1) in ``GOQD_SCALE_WORKERS`` processes (default 2),
  started first so they run beside the kills; each seed judged by ``rig.seed_failure``.

A failing seed prints its replay command; a failing life prints its crash point and N
and the command that replays the run up to it. The figures are printed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from goqd import messages as m
from goqd.control import protocol as p
from goqd.crashpoints import POINTS
from goqd.errors import ControlError, GoqdError
from goqd.sim.market import Market
from tests.helpers import checker, rig
from tests.helpers.paths import ROOT

STORES = (("ra", "rakuten"), ("ya", "yahoo"), ("au", "aupay"), ("sh", "shopify"), ("am", "amazon"))
SELLING = ("ra", "au", "sh")
# Enough for every life's customers: a product sold out only pushes zeros.
CATALOGUE = {"TS-RED-S": 4000, "TS-RED-M": 3000, "MUG-WHT": 2000, "TEA-SEN": 6000, "CAP-NVY": 1000}
# Which reach of a point (counted once armed) kills the daemon: 1..4, or 1..2 for the
# stock import's chunks (one per import here).
NTH = {"stock_import.chunk_applied": 2}
READY_S = 60.0  # start to READY, at most (measured 0.6–2 s here, more under load)
SETTLE_S = 120.0  # READY to every mall showing the ledger's count and every line booked
POINT_S = 20.0  # work before a crash point must have been reached


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


class Figures:
    """The run's figures, printed by pytest's terminal summary: the last lines before
    pytest's own summary, whatever failed."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.write_line("")
        for line in self.lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    out = Figures()
    request.config.pluginmanager.register(out, "goqd-reliability-figures")
    yield out


@dataclass
class SeedWorkers:
    seeds: list[int]
    procs: list[subprocess.Popen[str]]
    outputs: list[str]
    started: float


@pytest.fixture(scope="module")
def seed_workers() -> Iterator[SeedWorkers]:
    """The seeds, dealt out to worker processes (``python -m tests.helpers.rig SEED…``,
    one JSON line a seed), started before the kills so both use the two cores."""
    count = _env_int("GOQD_SCALE_SEEDS", 500)
    start = _env_int("GOQD_SCALE_SEED_START", 1)
    workers = max(1, _env_int("GOQD_SCALE_WORKERS", 2))
    seeds = list(range(start, start + count))
    tmp = tempfile.mkdtemp(prefix="goqd-scale-seeds-")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0"}
    procs, outputs = [], []
    for k in range(workers):
        mine = [str(s) for s in seeds[k::workers]]
        if not mine:
            continue
        path = os.path.join(tmp, f"worker-{k}.jsonl")
        with open(path, "w") as out, open(path + ".err", "w") as err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.helpers.rig", *mine],
                    stdout=out,
                    stderr=err,
                    env=env,
                    cwd=ROOT,
                )
            )
        outputs.append(path)
    try:
        yield SeedWorkers(seeds, procs, outputs, time.perf_counter())
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------- SIGKILLs


@dataclass
class Soak:
    """What the kills did, for the figures."""

    lives: int = 0
    kills: int = 0
    random_kills: int = 0
    startup_kills: int = 0
    hits: Counter[str] = field(default_factory=Counter)
    not_reached: Counter[str] = field(default_factory=Counter)
    checks: int = 0
    ready_s: list[float] = field(default_factory=list)
    settle_s: list[float] = field(default_factory=list)
    restocks: int = 0
    imports: int = 0
    starts: list[float] = field(default_factory=list)  # wall time of every daemon start
    failures: list[str] = field(default_factory=list)


async def _wait_ready_or_dead(r: rig.ProcessRig) -> bool:
    """True once the control socket answers; False if the daemon died first."""
    with trio.move_on_after(READY_S):
        while True:
            if not r.daemon.running:
                return False
            try:
                await r.daemon.request(p.Status(), timeout=2.0)
                return True
            except ControlError:
                await trio.sleep(0.05)
    raise AssertionError(f"not READY within {READY_S:g}s:\n{r.daemon.log_tail()}")


async def _settle(r: rig.ProcessRig) -> bool:
    """Poll the selling stores until every mall shows the ledger's count and every line
    is booked; False if the daemon died first."""
    with trio.move_on_after(SETTLE_S):
        while r.daemon.running:
            if rig.converged(r.fleet, r.ledger_path):
                return True
            await r.daemon.poll_now(SELLING)  # orders are placed only there
            for _ in range(10):
                await trio.sleep(0.1)
                if not r.daemon.running or rig.converged(r.fleet, r.ledger_path):
                    break
        return False
    raise AssertionError(f"not settled within {SETTLE_S:g}s of READY:\n{r.daemon.log_tail()}")


def _spread(values: list[float]) -> str:
    if not values:
        return "none"
    return f"mean {sum(values) / len(values):.1f}s, max {max(values):.1f}s"


def _check_all(r: rig.ProcessRig) -> None:
    report = checker.check(r.fleet.sims, r.ledger_path, initial=r.fleet.initial, keys=r.fleet.keys)
    assert report.ok, report.summary()


def _stock_csv(rng: random.Random) -> str:
    return "sku,delta\n" + "".join(f"{sku},{rng.randint(1, 3)}\n" for sku in CATALOGUE)


async def _work(
    r: rig.ProcessRig, market: Market, rng: random.Random, soak: Soak, *, imports: bool
) -> None:
    """Customers and an operator, one step: orders, a cancellation now and then, a
    restock or a stock import, and "poll now" for the stores that sell."""
    market.place_random(time.time())
    roll = rng.random()
    if roll < 0.15:
        market.cancel_random()
    elif roll < 0.35:
        market.advance_random()
    with contextlib.suppress(ControlError):
        if imports or roll > 0.95:
            await r.daemon.request(p.StockImport(csv_text=_stock_csv(rng)), timeout=5.0)
            soak.imports += 1
        elif roll > 0.9:
            sku = rng.choice(sorted(CATALOGUE))
            await r.daemon.request(m.AdjustStock(sku=sku, delta=2, reason="scale"), timeout=5.0)
            soak.restocks += 1
    await r.daemon.poll_now(SELLING)


STARTUP = "start-up"  # a life killed at a random moment before it settled


async def _life(
    r: rig.ProcessRig,
    market: Market,
    rng: random.Random,
    soak: Soak,
    starts: list[float],
    point: str | None,
    nth: int,
) -> None:
    """One start of the daemon: READY, settled, checked (the invariants I1–I4), then
    armed (its crash point counts from here), worked until it dies or is killed, and the ledger file
    checked before the next start. A ``STARTUP`` life is killed at a random moment of
    its start instead: the next life's checks cover it."""
    armed = point not in (None, STARTUP)
    starts.append(time.time())
    began = time.perf_counter()
    await r.daemon.start(
        crashpoint=f"{point}@{nth}" if armed else "",
        env={"GOQD_CRASHPOINT_ARM": "SIGUSR2"} if armed else None,
    )
    if point == STARTUP:
        await trio.sleep(rng.uniform(0.0, 1.5))
    else:
        if not await _wait_ready_or_dead(r):
            raise AssertionError(f"goqd died before READY:\n{r.daemon.log_tail()}")
        soak.ready_s.append(time.perf_counter() - began)
        began = time.perf_counter()
        if not await _settle(r):
            raise AssertionError(f"goqd died while it settled:\n{r.daemon.log_tail()}")
        soak.settle_s.append(time.perf_counter() - began)
        _check_all(r)
        soak.checks += 1
        if armed:
            r.daemon.signal(signal.SIGUSR2)
        until = time.perf_counter() + (POINT_S if armed else rng.uniform(0.2, 2.5))
        while r.daemon.running and time.perf_counter() < until:
            await _work(r, market, rng, soak, imports=point == "stock_import.chunk_applied")
            await trio.sleep(rng.uniform(0.0, 0.3))
    if r.daemon.running:
        if armed:
            soak.not_reached[str(point)] += 1
        await r.daemon.kill()
        if point == STARTUP:
            soak.startup_kills += 1
        else:
            soak.random_kills += 1
    else:
        assert r.daemon.proc is not None
        rc = r.daemon.proc.returncode
        assert armed and rc == -signal.SIGKILL, f"goqd exited with {rc}:\n{r.daemon.log_tail()}"
        soak.hits[str(point)] += 1
    soak.kills += 1
    rig.ledger_consistent(r.ledger_path)


@dataclass
class Rates:
    """Requests over a mall's documented limit, over every rig and every start."""

    refused: Counter[str] = field(default_factory=Counter)  # by mall
    e2: list[str] = field(default_factory=list)
    by_api: Counter[str] = field(default_factory=Counter)
    after_start: list[float] = field(default_factory=list)

    def add(self, r: rig.ProcessRig, starts: list[float]) -> None:
        """Each simulator's own limiter counts the requests it refused; the checker's
        throttling check (catalogue entry E2) reads its request log (every 429 outside an
        injected throttle)."""
        for store, sim in r.fleet.sims.items():
            self.refused[sim.mall] += int(getattr(sim, "throttled_requests", 0))
            self.e2 += [str(v) for v in checker.check_throttling(sim, store, [], [])]
            for req in sim.requests:
                if req.status == 429:
                    self.by_api[f"{sim.mall} {req.api}"] += 1
                    since = [req.at - s for s in starts if s <= req.at]
                    if since:
                        self.after_start.append(min(since))

    def lines(self, starts: int) -> list[str]:
        near = sum(1 for s in self.after_start if s <= 5.0)
        out = [
            f"rate-limit violations at the malls across {starts} starts: "
            f"{sum(self.refused.values())} requests refused by the malls' limiters "
            f"({', '.join(f'{m} {n}' for m, n in sorted(self.refused.items()))}), "
            f"{len(self.e2)} throttling findings (429s outside an injected throttle); {near} of "
            f"{len(self.after_start)} 429s came within 5 s of a start"
        ]
        if self.by_api:
            out.append(
                "  429s by API: " + ", ".join(f"{k} {n}" for k, n in self.by_api.most_common())
            )
        return out


async def test_sigkills_of_the_real_process_lose_nothing_and_keep_the_malls_limits(
    seed_workers: SeedWorkers, figures: Figures
) -> None:
    """The kills run on ``GOQD_SCALE_RIGS`` rigs at once (default 3), each a daemon with
    malls of its own: a life mostly waits for the malls' rate limits, not for a CPU."""
    del seed_workers  # asked for only to start the seeds first: they run beside the kills
    target = _env_int("GOQD_SCALE_KILLS", 200)
    per_point = _env_int("GOQD_SCALE_POINT_HITS", 20)
    seed = _env_int("GOQD_SCALE_KILL_SEED", 20261202)
    rigs = max(1, _env_int("GOQD_SCALE_RIGS", 3))
    # The plan (which life dies where, on which rig) is a function of these four; what
    # each life's customers do is drawn from its own generator, so one life's timing
    # cannot shift another's crash point. Each point gets two lives more than asked: a
    # point a life does not reach in time (then killed at random) must not leave it short.
    planner = random.Random(seed)
    points: list[str | None] = [pt for pt in POINTS for _ in range(per_point + 2)]
    points += [None] * max(0, target - len(points))
    # Kills during start-up on top (one in twenty): their restart is checked by the
    # next life, so they do not count towards the kills asked for.
    points += [STARTUP] * (target // 20)
    planner.shuffle(points)
    plan = [(i, pt, planner.randint(1, NTH.get(pt or "", 4))) for i, pt in enumerate(points)]
    rerun = (
        f"GOQD_SCALE_KILL_SEED={seed} GOQD_SCALE_KILLS={target} "
        f"GOQD_SCALE_POINT_HITS={per_point} GOQD_SCALE_RIGS={rigs} GOQD_SCALE_SEEDS=0 "
        ".venv/bin/python -m pytest -p no:cacheprovider tests/reliability_scale.py -k sigkills"
    )
    soak = Soak()
    rates = Rates()
    orders: list[Market] = []
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for k in range(rigs):
            nursery.start_soon(
                _run_rig, k, plan[k::rigs], seed, soak, rates, orders, f"{rerun} (rig {k})"
            )
    elapsed = time.perf_counter() - started
    short = {pt: soak.hits[pt] for pt in POINTS if soak.hits[pt] < per_point}
    checked = soak.kills - soak.startup_kills
    figures.lines += [
        f"SIGKILL: {soak.kills} kills of `goqd run` in {elapsed:.0f}s on {rigs} rigs at once: "
        f"{sum(soak.hits.values())} at crash points and {soak.random_kills} at random "
        f"moments, each after its start was READY ({_spread(soak.ready_s)}), settled "
        f"({_spread(soak.settle_s)}) and passed I1–I4, plus "
        f"{soak.startup_kills} during start-up; {soak.checks} checks in "
        f"{len(soak.starts)} starts; {sum(len(m.placed) for m in orders)} orders, "
        f"{sum(m.cancelled_units for m in orders)} units cancelled, {soak.restocks} "
        f"restocks, {soak.imports} stock imports; {len(soak.failures)} failed",
        "crash points hit: "
        + ", ".join(f"{pt} {soak.hits[pt]}" for pt in POINTS)
        + (
            f" (not reached within {POINT_S:g}s: {dict(soak.not_reached)})"
            if soak.not_reached
            else ""
        ),
        *rates.lines(len(soak.starts)),
    ]
    problems = list(soak.failures)
    if checked < target:
        problems.append(f"only {checked} kills after a checked start, {target} asked")
    if short:
        problems.append(f"crash points hit fewer than {per_point} times: {short}")
    if sum(rates.refused.values()) or rates.e2:
        problems.append(rates.lines(len(soak.starts))[0] + "\n" + "\n".join(rates.e2[:20]))
    assert not problems, "\n\n".join(problems)


async def _run_rig(
    k: int,
    plan: list[tuple[int, str | None, int]],
    seed: int,
    soak: Soak,
    rates: Rates,
    markets: list[Market],
    rerun: str,
) -> None:
    """One rig's lives, in order, then its final start; failures are recorded, not
    raised, so the other rigs and the figures go on."""
    starts: list[float] = []
    tmp = tempfile.mkdtemp(prefix=f"gqs{k}-", dir="/tmp")  # short: the socket path's limit
    try:
        async with rig.open_process_rig(STORES, tmp, catalogue=CATALOGUE, seed=k) as r:
            market = Market(
                sims={s: r.fleet.sims[s] for s in SELLING},
                keys=r.fleet.keys,
                real=dict(r.fleet.initial),
                rng=random.Random(f"{seed}-market-{k}"),
            )
            markets.append(market)
            for i, point, nth in [*plan, (len(plan), "final", 0)]:
                what = {
                    "final": "the final start, settle, checks and SIGTERM",
                    None: "a SIGKILL at a random moment after the checks",
                    STARTUP: "a SIGKILL at a random moment of the start",
                }.get(point, f"GOQD_CRASHPOINT={point}@{nth}, armed after the checks")
                try:
                    if point == "final":
                        await _final(r, soak, starts)
                    else:
                        soak.lives += 1
                        work = random.Random(f"{seed}-{i}")
                        await _life(r, market, work, soak, starts, point, nth)
                except (AssertionError, GoqdError, trio.TooSlowError) as exc:
                    soak.failures.append(f"life {i} ({what}); replay the run: {rerun}\n{exc}")
                    if r.daemon.running:
                        await r.daemon.kill()
            rates.add(r, starts)
    finally:
        soak.starts += starts
        shutil.rmtree(tmp, ignore_errors=True)


async def _final(r: rig.ProcessRig, soak: Soak, starts: list[float]) -> None:
    """The last start: READY, settled, checked, stopped with SIGTERM, checked again."""
    starts.append(time.time())
    await r.daemon.start()
    if not await _wait_ready_or_dead(r):
        raise AssertionError(f"goqd died before READY:\n{r.daemon.log_tail()}")
    if not await _settle(r):
        raise AssertionError(f"goqd died while it settled:\n{r.daemon.log_tail()}")
    _check_all(r)
    rc = await r.daemon.stop()
    assert rc == 0, r.daemon.log_tail()
    _check_all(r)
    soak.checks += 2


# ---------------------------------------------------------------------- seeds


async def test_seeds_of_the_deterministic_simulation_lose_nothing(
    seed_workers: SeedWorkers, figures: Figures
) -> None:
    for proc in seed_workers.procs:
        await trio.to_thread.run_sync(proc.wait)
    elapsed = time.perf_counter() - seed_workers.started
    results: list[dict[str, Any]] = []
    for path in seed_workers.outputs:
        with open(path) as f:
            results += [json.loads(line) for line in f if line.startswith("{")]
    results.sort(key=lambda r: r["seed"])
    done = {r["seed"] for r in results}
    # A seed whose worker died prints nothing: name it with its replay.
    missing = [s for s in seed_workers.seeds if s not in done]
    failures = [f for f in map(rig.seed_failure, results) if f is not None]
    if missing:
        errors = "".join(Path(path + ".err").read_text()[-2000:] for path in seed_workers.outputs)
        failures.append(
            f"seeds {missing}: no result (replay one: {rig.replay_command(missing[0])})\n"
            f"the workers' stderr:\n{errors}"
        )
    bad = [r["seed"] for r in results if rig.seed_failure(r) is not None] + missing
    if results:
        figures.lines.append(
            rig.dst_figures(results, len(bad))
            + f"; {len(seed_workers.procs)} workers, {elapsed:.0f}s"
        )
    if bad:
        figures.lines.append(f"failing seeds: {bad}")
    assert not failures, "\n\n".join(failures)
