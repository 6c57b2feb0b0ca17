"""Faults at the malls, under deterministic simulation (docs/reliability.md E1–E6, A1–A2, M1–M2,
D1–D3, I1–I6), and the checker itself.

How it runs: ``tests.helpers.rig.run_dst`` / ``run_scenario`` put the real daemon
(``run_daemon``: ledger on a real SQLite file, store actors, control socket) and the
simulated malls in one ``trio.run`` under ``MockClock(autojump_threshold=0)``. The
daemon's HTTP transport hands requests straight to the simulators (no sockets) and the
ledger's worker thread runs inline, so virtual minutes of outages and backoff cost
milliseconds and a seed replays exactly (``PYTHONHASHSEED=0 python -m tests.helpers.rig
SEED`` in a fresh process). Every scenario ends with ``tests.helpers.checker.check``.

``test_seeded_fault_plans_lose_nothing`` is the CI job: as many seeds as fit
``GOQD_DST_BUDGET`` seconds (default 45), starting at ``GOQD_DST_START`` (default 1); a
failure prints its seed, plan and the replay command.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from goqd import messages as m
from goqd.control import protocol as p
from goqd.control.client import call
from goqd.errors import LEVEL_CREDENTIAL, LEVEL_TEMPORARY
from goqd.ledger import Ledger, open_db, queries
from goqd.sim.rakuten import SimRakuten
from tests.helpers import checker, faults, rig
from tests.helpers.checker import EpisodeRecord, check, check_throttling, propagation_delays
from tests.helpers.faults import Episode, FaultPlan, run_plan
from tests.helpers.paths import ROOT

clock = rig.mock_wall_clock
RA_SEARCH = "rpay.order.searchOrder"
RA_UPSERT = "inventories.bulk.upsert"


def _cursor(run: rig.Running, store: str) -> str | None:
    return queries.read(run.ledger_path, queries.cursors).get(store)


async def _settle(run: rig.Running, limit: float = 900.0) -> float:
    """Virtual seconds until everything converged, without poking the daemon: the I3
    bound is the daemon's own business (poll interval, push retry, backoff)."""
    start = trio.current_time()
    await rig.wait_for(
        lambda: rig.converged(run.fleet, run.ledger_path),
        timeout=limit,
        every=1.0,
        what="convergence",
    )
    return trio.current_time() - start


def _check(run: rig.Running, **kw: Any) -> checker.CheckReport:
    report = check(
        run.fleet.sims, run.ledger_path, initial=run.fleet.initial, keys=run.fleet.keys, **kw
    )
    assert report.ok, report.summary()
    return report


def _errors(run: rig.Running, store: str) -> list[m.ErrorRecord]:
    return queries.read(run.ledger_path, queries.errors, store)


def _metric(run: rig.Running, name: str, **labels: str) -> float:
    samples = checker.metric_samples(run.metrics_text())
    return sum(
        v for (n, lab), v in samples.items() if n == name and labels.items() <= dict(lab).items()
    )


# ------------------------------------------------------------------ the checker itself


def _tiny(tmp_path: Path) -> tuple[dict[str, SimRakuten], str, Ledger, dict[str, int]]:
    """One Rakuten store, two SKUs, two orders booked, the mall showing the ledger's count."""
    sim = SimRakuten(shop_id="600000", clock=lambda: 1_790_000_000.0, seed=1)
    sims = {"ra": sim}
    path = str(tmp_path / "goqd.db")
    times = iter(range(1_789_999_000, 1_790_100_000))
    ledger = Ledger(open_db(path), now=lambda: float(next(times)))
    initial = {"A": 5, "B": 3}
    ledger.apply_batch(
        [m.UpsertProduct(sku=s, total=q) for s, q in initial.items()]
        + [m.UpsertListing(store="ra", listing_key=f"a{s.lower()}/{s}", sku=s) for s in initial]
    )
    for s, q in initial.items():
        sim.add_listing(f"a{s.lower()}/{s}", quantity=q)
    lines = []
    for key, qty in (("aa/A", 2), ("ab/B", 1)):
        order = sim.place_order([(key, qty)])
        assert order is not None
        line = order.lines[0]
        lines.append(
            m.OrderLine(
                order_id=order.order_id,
                line_id=line.line_id,
                listing_key=key,
                quantity=qty,
                updated_at=1_790_000_000.0,
            )
        )
    ledger.apply_batch([m.OrderLinesSeen(store="ra", lines=tuple(lines), cursor="c1")])
    for key, sku in (("aa/A", "A"), ("ab/B", "B")):
        sim.apply_stock(key, queries.totals(ledger.conn)[sku])
    ledger.conn.execute("DELETE FROM outbox")
    return sims, path, ledger, initial


def _kinds(report: checker.CheckReport) -> set[str]:
    return {v.invariant for v in report.violations}


def test_checker_passes_a_consistent_run_and_flags_every_kind_of_damage(tmp_path: Path) -> None:
    sims, path, ledger, initial = _tiny(tmp_path)
    sim = sims["ra"]
    assert check(sims, path, initial=initial).ok

    # I1: a line the mall has and the ledger lost.
    lost = sim.place_order([("aa/A", 1)])
    assert lost is not None
    report = check(sims, path, initial=initial)
    assert any("lost" in v.detail for v in report.violations if v.invariant == "I1")
    del sim.orders[lost.order_id]
    sim.listings["aa/A"].quantity = 3

    # I1 + I2: the same line's units taken off twice.
    ledger.conn.execute(
        "INSERT INTO movements (sku, delta, total_after, cause, store, order_id, line_id, at) "
        "SELECT 'A', -2, 1, 'order', store, order_id, line_id, 0 FROM order_lines WHERE sku='A'"
    )
    ledger.conn.execute("UPDATE products SET total = 1 WHERE sku = 'A'")
    report = check(sims, path, initial=initial, invariants=("I1", "I2"))
    assert {"I1", "I2"} <= _kinds(report)
    assert any("more or less than once" in v.detail for v in report.violations)
    ledger.conn.execute("DELETE FROM movements WHERE total_after = 1 AND sku = 'A'")
    ledger.conn.execute("UPDATE products SET total = 3 WHERE sku = 'A'")
    assert check(sims, path, initial=initial).ok

    # I3: the mall shows something else than max(0, total).
    sim.listings["ab/B"].quantity = 7
    assert _kinds(check(sims, path, invariants=("I3",))) == {"I3"}
    sim.listings["ab/B"].quantity = 2

    # I4: a value from before the last one applied after it (stale overwrite).
    sim.listings["aa/A"].set_history.append(5)  # A went 5 -> 3; 5 after 3 goes back
    report = check(sims, path, invariants=("I4",))
    assert _kinds(report) == {"I4"} and "older count" in report.violations[0].detail
    sim.listings["aa/A"].set_history.pop()

    # I6: an episode that hit the daemon but left no error and no metric behind.
    episode = EpisodeRecord(store="ra", kind="server_error", start=1.0, end=2.0, hits=3)
    report = check(sims, path, invariants=("I6",), episodes=[episode], metrics_text="")
    assert _kinds(report) == {"I6"} and len(report.violations) == 2


def test_checker_matches_pushed_values_to_ledger_counts_in_order() -> None:
    counts, at = [5, 4, 5, 3], [0.0, 1.0, 2.0, 3.0]
    # 5 (import), 4, 5 (a cancel), 3: fine, even with a repeated value (a re-send).
    assert checker._match_history([5, 4, 4, 5, 3], None, counts, at) == ([0, 1, 1, 2, 3], None)
    # The second 5 is only legitimate once the cancel (t=2) has happened.
    assert checker._match_history([4, 5], [1.5, 1.6], counts, at)[1] == 1
    # 4 after 3: goes back.
    assert checker._match_history([3, 4], None, counts, at)[1] == 1


def test_throttle_check_flags_rate_overruns_and_ignored_retry_after() -> None:
    sim = SimRakuten(shop_id="600001", clock=lambda: 0.0)
    rec = sim.requests.append
    from goqd.sim.base import RecordedRequest

    rec(RecordedRequest(10.0, "POST", "/x", RA_SEARCH, 429))
    rec(RecordedRequest(12.0, "POST", "/x", RA_SEARCH, 200))  # 2 s after Retry-After: 5
    rec(RecordedRequest(50.0, "POST", "/x", RA_SEARCH, 429))  # no throttle injected then
    records = [EpisodeRecord(store="ra", kind="throttle", start=5.0, end=20.0, hits=1)]
    episodes = [Episode(store="ra", kind="throttle", start=0, duration=15, retry_after=5.0)]
    found = check_throttling(sim, "ra", records, episodes)
    assert len(found) == 2
    assert "Retry-After 5s" in found[0].detail and "outside" in found[1].detail


def test_fault_plans_are_a_function_of_their_seed() -> None:
    a = faults.make_plan(7, ["ra", "rb", "ya"], duration=600)
    assert a == faults.make_plan(7, ["ra", "rb", "ya"], duration=600)
    assert a != faults.make_plan(8, ["ra", "rb", "ya"], duration=600)
    for store in ("ra", "rb", "ya"):
        mine = sorted((e for e in a.episodes if e.store == store), key=lambda e: e.start)
        assert all(x.end <= y.start for x, y in itertools.pairwise(mine))
        assert all(e.start >= 0 and e.end <= 600 for e in mine)


# ------------------------------------------------------------------ seeded fault plans


def _rig_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0"}


@pytest.mark.slow
def test_seeded_fault_plans_lose_nothing() -> None:
    """The deterministic-simulation CI job: seeds until the budget is spent.

    Each seed: six stores (2 Rakuten, Yahoo, au PAY, Shopify, Amazon), 20 virtual minutes of
    orders, cancellations, status moves, quantity edits and operator restocks, a seeded
    plan of every fault kind (renewing expired keys and reflecting after silent no-ops as
    an operator would), then settling. Checked: I1–I4, I6, E2 (Retry-After honoured, no
    rate overrun), convergence within 2 poll intervals + the longest push backoff.
    """
    budget = float(os.environ.get("GOQD_DST_BUDGET", "45"))
    start = int(os.environ.get("GOQD_DST_START", "1"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.helpers.rig",
            "--budget",
            str(budget),
            "--start",
            str(start),
            "--min",
            "5",
        ],
        capture_output=True,
        text=True,
        env=_rig_env(),
        cwd=ROOT,
        timeout=budget + 120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(results) >= 5
    failures = [f for f in map(rig.seed_failure, results) if f is not None]
    print("\n" + rig.dst_figures(results, len(failures)))
    assert not failures, "\n\n".join(failures)


# Replays seed N in a fresh process after allocating M objects first, so every later
# address differs (as ASLR makes addresses differ from one process to the next).
_REPLAY_SHIFTED = (
    "import sys; junk = [object() for _ in range(int(sys.argv[2]))]; "
    "from tests.helpers.rig import _main; sys.exit(_main([sys.argv[1]]))"
)


@pytest.mark.slow
def test_a_seed_replays_exactly_in_a_fresh_process() -> None:
    prints = []
    for shift in (0, 1000):
        out = subprocess.run(
            [sys.executable, "-c", _REPLAY_SHIFTED, "3", str(shift)],
            capture_output=True,
            text=True,
            env=_rig_env(),
            cwd=ROOT,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        prints.append(json.loads(out.stdout.splitlines()[0])["fingerprint"])
    assert prints[0] == prints[1]


class _WakeInAnyOrder(trio.abc.Instrument):
    """Puts every task trio wakes at a random place in its run queue: the order in which
    tasks are woken (by a cancellation going through a set of tasks hashed by address,
    say) then varies as it may between processes."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        from trio._core._run import GLOBAL_RUN_CONTEXT

        runq = GLOBAL_RUN_CONTEXT.runner.runq
        runq.insert(self.rng.randrange(len(runq)), runq.pop())


def test_a_seed_replays_exactly_whatever_order_trio_wakes_tasks_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run is a function of its seed, not of the order tasks become runnable in
    (``rig.deterministic_scheduling``); without it this seed's fingerprint changed with
    every shuffle."""
    from trio._core import _run

    # As in ``python -m tests.helpers.rig``: under pytest, Hypothesis (when it is
    # imported) has already switched trio's deterministic mode on for every run.
    monkeypatch.setattr(_run, "_ALLOW_DETERMINISTIC_SCHEDULING", False)
    run = trio.run
    prints = []
    for shuffle in (None, 1, 2):
        instruments = [] if shuffle is None else [_WakeInAnyOrder(shuffle)]
        monkeypatch.setattr(
            trio, "run", lambda *a, i=instruments, **kw: run(*a, instruments=i, **kw)
        )
        outcome = rig.run_scenario(rig.Scenario(seed=3, market_seconds=300))
        assert outcome.report.ok, outcome.describe()
        prints.append(outcome.fingerprint)
    assert prints[0] == prints[1] == prints[2], prints


# ------------------------------------------------------------------ catalogue rows

TWO = (("ra", "rakuten"), ("rb", "rakuten"))
THREE = (("ra", "rakuten"), ("rb", "rakuten"), ("sh", "shopify"))


def test_e1_order_api_5xx_for_minutes_holds_the_cursor_backs_off_and_catches_up() -> None:
    async def body(run: rig.Running) -> None:
        ra = run.fleet.sims["ra"]
        handle = run.daemon.handles["ra"]
        market = run.fleet.market(random.Random(1))
        before = _cursor(run, "ra")
        first = len(ra.requests)
        ra.faults.error_rate = 1.0
        for _ in range(10):  # five minutes of orders while RMS answers 500
            assert market.place("ra", "TEA-SEN", 1, clock()) is not None
            await trio.sleep(30)
        assert _cursor(run, "ra") == before  # nothing acknowledged past the outage
        assert (handle.state, handle.error_level) == ("degraded", 8)
        polls = [r.at for r in ra.requests[first:] if r.api == RA_SEARCH]
        gaps = [b - a for a, b in itertools.pairwise(polls)]
        assert all(r.status == 500 for r in ra.requests[first:])
        assert len(polls) <= 20  # backing off, not hammering: 300 s of outage
        assert len({round(g, 3) for g in gaps}) > 1  # jittered
        assert max(gaps) > 30  # grown well past the first retry
        ra.faults.error_rate = 0.0
        await _settle(run)
        assert _cursor(run, "ra") != before
        assert _metric(run, "goqd_polls_total", store="ra", outcome="unavailable") >= len(polls)
        _check(run)

    rig.run_dst(body, seed=11, stores=TWO)


def test_e2_throttling_honours_retry_after_and_stays_under_the_rate() -> None:
    async def body(run: rig.Running) -> None:
        ra = run.fleet.sims["ra"]
        market = run.fleet.market(random.Random(2))
        plan = FaultPlan(
            2, (Episode(store="ra", kind="throttle", start=0, duration=180, retry_after=25.0),)
        )
        async with trio.open_nursery() as nursery:
            records: list[EpisodeRecord] = []

            async def go() -> None:
                records.extend(await run_plan(plan, run.fleet.sims, clock=clock))

            nursery.start_soon(go)
            for _ in range(6):
                market.place("ra", "TS-RED-S", 1, clock())
                market.place("rb", "TS-RED-M", 1, clock())
                run.poll_all()
                await trio.sleep(30)
        assert records[0].hits > 0
        assert check_throttling(ra, "ra", records, plan.episodes) == []
        throttled = [r for r in ra.requests if r.status == 429]
        assert throttled
        await _settle(run)
        assert check_throttling(ra, "ra", records, plan.episodes) == []
        assert ra.throttled_requests == 0  # the sim's own RMS rate window never fired
        _check(run)

    rig.run_dst(body, seed=12, stores=TWO)


def test_e2_a_throttled_push_waits_for_retry_after_not_an_outage_backoff() -> None:
    """Three minutes of 429s (Retry-After 5 s) on every Rakuten call. An outage's
    exponential backoff would by then wait up to 300 s between tries; a throttle must
    not: the tries come every Retry-After or two, through the episode and right after
    it."""

    async def body(run: rig.Running) -> None:
        ra = run.fleet.sims["ra"]
        market = run.fleet.market(random.Random(3))
        await _settle(run)
        start = clock()
        plan = FaultPlan(
            3, (Episode(store="ra", kind="throttle", start=0, duration=180, retry_after=5.0),)
        )
        records: list[EpisodeRecord] = []
        async with trio.open_nursery() as nursery:

            async def go() -> None:
                records.extend(await run_plan(plan, run.fleet.sims, clock=clock))

            nursery.start_soon(go)
            for _ in range(6):  # sales at rb keep pushes for ra coming
                assert market.place("rb", "TS-RED-M", 1, clock()) is not None
                run.poll_all()
                await trio.sleep(30)
        end = start + 180
        pushes = [r for r in ra.requests if r.api == RA_UPSERT and r.at >= start]
        throttled = [r.at for r in pushes if r.status == 429]
        assert len(throttled) >= 10  # every few seconds through the episode
        # At most two waits of Retry-After between tries: the counter read before the
        # push shares its bucket with the sale watch, whose own 429s block it too.
        gaps = [b - a for a, b in itertools.pairwise(throttled)]
        assert max(gaps) < 2 * 5.0 + 1.0
        await _settle(run)
        first_ok = min(
            r.at for r in ra.requests if r.api == RA_UPSERT and r.status < 300 and r.at >= end
        )
        assert first_ok - end < 2 * 5.0 + 1.0
        _check(run)

    rig.run_dst(body, seed=13, stores=TWO)


def test_e2_a_batch_throttled_part_way_is_not_sent_again_from_the_start() -> None:
    """Amazon takes one patch per listing: a 429 on the fourth of five must not send the
    first three again (under a burst that re-sent the same first patches after every
    throttle, and the outbox drained at a fraction of the allowed rate)."""

    async def body(run: rig.Running) -> None:
        am = run.fleet.sims["am"]
        await _settle(run)
        start = clock()
        am.faults.throttle_rate = 0.4
        for _ in range(3):
            for sku in ("TS-RED-S", "TS-RED-M", "TEA-SEN"):  # three Amazon pushes at once
                assert run.fleet.market(random.Random(4)).place("ra", sku, 1, clock())
            run.poll_all()
            await trio.sleep(30)
        am.faults.throttle_rate = 0.0
        await _settle(run)
        patches = [r for r in am.requests if r.api == "patchListingsItem" and r.at >= start]
        assert sum(r.status == 429 for r in patches) >= 2
        # Every count Amazon applied is a new one: nothing was applied twice over.
        for sku in ("TS-RED-S", "TS-RED-M", "TEA-SEN"):
            history = am.listings[run.fleet.keys["am"][sku]].set_history
            assert isinstance(history, rig.TimedHistory)
            applied = [v for t, v in zip(history.times, history, strict=True) if t >= start]
            assert len(applied) >= 3
            assert all(a != b for a, b in itertools.pairwise(applied)), (sku, applied)
        _check(run)

    rig.run_dst(body, seed=14, stores=(("ra", "rakuten"), ("am", "amazon")))


@pytest.mark.parametrize("kind", ["timeout_after_apply", "timeout"])
def test_e3_push_timeouts_resend_the_absolute_value_and_converge(kind: str) -> None:
    async def body(run: rig.Running) -> None:
        rb = run.fleet.sims["rb"]
        key = run.fleet.keys["rb"]["TS-RED-S"]
        market = run.fleet.market(random.Random(3))
        plan = FaultPlan(3, (Episode(store="rb", kind=kind, start=0, duration=120, latency=30),))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_plan(plan, run.fleet.sims, clock=clock))
            for _ in range(3):
                market.place("ra", "TS-RED-S", 1, clock())
                run.poll_all()
                await trio.sleep(40)
        await _settle(run)
        history = list(rb.listings[key].set_history)
        if kind == "timeout_after_apply":
            # Applied, unanswered, retried with the same absolute value: a repeat.
            assert any(a == b for a, b in itertools.pairwise(history)), history
        assert _metric(run, "goqd_pushes_total", store="rb", outcome="failed") > 0
        _check(run)

    rig.run_dst(body, seed=13, stores=TWO)


def test_e4_a_listing_the_mall_refuses_stays_pending_alone_with_its_own_error() -> None:
    async def body(run: rig.Running) -> None:
        rb = run.fleet.sims["rb"]
        assert isinstance(rb, SimRakuten)
        refused = run.fleet.keys["rb"]["MUG-WHT"]
        fine = run.fleet.keys["rb"]["TS-RED-S"]
        rb.refusals[refused] = ("IE1101", "予約商品の在庫は更新できません。", "variantId")
        market = run.fleet.market(random.Random(4))
        market.place("ra", "MUG-WHT", 1, clock())
        market.place("ra", "TS-RED-S", 2, clock())
        run.poll_all()
        await rig.wait_for(lambda: rb.stock(fine) == 10, timeout=60, what="the fine listing")
        await trio.sleep(20)
        outbox = queries.read(run.ledger_path, queries.outbox)
        assert [(x.store, x.listing_key) for x in outbox] == [("rb", refused)]
        errors = [e for e in _errors(run, "rb") if e.listing_key == refused]
        assert errors and errors[0].level == LEVEL_TEMPORARY
        assert "IE1101" in errors[0].code + errors[0].message
        assert rb.stock(refused) == 3  # untouched at the mall
        del rb.refusals[refused]  # the merchant fixes the item; the retry goes through
        await _settle(run, limit=600)
        _check(run)

    rig.run_dst(body, seed=14, stores=TWO)


def test_e5_maintenance_degrades_one_store_others_unaffected_then_catches_up() -> None:
    async def body(run: rig.Running) -> None:
        ra = run.fleet.sims["ra"]
        market = run.fleet.market(random.Random(5))
        since = clock()
        ra.faults.maintenance = True
        for _ in range(6):
            market.place("ra", "TEA-SEN", 1, clock())
            market.place("sh", "TS-RED-S", 1, clock())
            run.poll_all()
            await trio.sleep(20)
        handle = run.daemon.handles["ra"]
        assert (handle.state, handle.error_level) == ("degraded", 8)
        assert run.daemon.handles["rb"].state == "running"
        # Shopify's orders reach rb as fast as ever while ra is down.
        delays = propagation_delays(run.fleet.sims, run.ledger_path, "rb", since=since)
        assert delays and max(delays) < 5.0, delays
        ra.faults.maintenance = False
        await _settle(run)
        # stays for the operator
        assert any(e.level == LEVEL_TEMPORARY for e in _errors(run, "ra"))
        _check(run)

    rig.run_dst(body, seed=15, stores=THREE)


def test_e6_a_silent_noop_is_found_by_the_discrepancy_check_and_reflected() -> None:
    async def body(run: rig.Running) -> None:
        rb = run.fleet.sims["rb"]
        key = run.fleet.keys["rb"]["TS-RED-S"]
        market = run.fleet.market(random.Random(6))
        rb.faults.silent_noop = True
        market.place("ra", "TS-RED-S", 3, clock())
        run.poll_all()
        await trio.sleep(30)
        assert queries.read(run.ledger_path, queries.outbox) == []
        assert rb.stock(key) == 12  # the mall said yes and did nothing
        rb.faults.silent_noop = False
        diff = await call(run.socket, p.Diff(store="rb"))
        assert [(r.listing_key, r.ledger_quantity, r.mall_quantity) for r in diff.rows] == [
            (key, 9, 12)
        ]
        await call(run.socket, p.Reflect(store="rb"))
        await _settle(run)
        assert (await call(run.socket, p.Diff(store="rb"))).rows == ()
        _check(run)

    rig.run_dst(body, seed=16, stores=TWO)


def test_an_order_first_seen_cancelled_after_a_push_overwrote_its_sale_is_repaired() -> None:
    """Seed 16's finding (Rakuten rb ended at 49, the ledger at 48): rb sold a unit, a
    push from another store's booking overwrote rb's counter (which had counted the
    sale), and the customer cancelled before rb's next poll, so rb put back a unit the
    push had already taken off. The ledger first sees the order cancelled and books
    nothing; without the sale watch nothing else would ever push rb again."""

    async def body(run: rig.Running) -> None:
        rb = run.fleet.sims["rb"]
        key = run.fleet.keys["rb"]["TEA-SEN"]
        market = run.fleet.market(random.Random(16))
        polled = run.daemon.handles["rb"].polls
        await rig.wait_for(lambda: run.daemon.handles["rb"].polls > polled, timeout=120)
        # rb's next poll is a minute away.
        sale = market.place("rb", "TEA-SEN", 1, clock())
        assert sale is not None and rb.stock(key) == 19
        market.place("ra", "TEA-SEN", 2, clock())
        run.daemon.handles["ra"].request_poll()
        await rig.wait_for(lambda: rb.stock(key) == 18, timeout=30, what="the push to rb")
        rb.cancel_order(sale.order.order_id)
        assert rb.stock(key) == 19  # 20 - 2, and the cancelled unit put back once more
        # rb has not been polled since the sale
        assert queries.read(run.ledger_path, queries.order_lines, "rb") == []
        await _settle(run)
        assert rb.stock(key) == 18
        _check(run)

    rig.run_dst(body, seed=16, stores=TWO, watch_interval="0s")


@pytest.mark.slow
def test_seed_16_without_the_sale_watch_loses_nothing() -> None:
    """Seed 16 ended one unit off when polls were timed from their start (the sale watch
    repairs the same thing on its own, so it runs here without it)."""
    outcome = rig.run_scenario(rig.Scenario(seed=16, watch_interval="0s"))
    assert outcome.report.ok and outcome.settled_after is not None, outcome.describe()


def test_a1_a2_expired_key_stops_the_store_keeps_its_work_and_renewal_resumes_it() -> None:
    async def body(run: rig.Running) -> None:
        ra = run.fleet.sims["ra"]
        assert isinstance(ra, SimRakuten)
        handle = run.daemon.handles["ra"]
        market = run.fleet.market(random.Random(7))
        cursor = _cursor(run, "ra")
        ra.expire_credentials()
        market.place("ra", "TS-RED-S", 1, clock())
        run.poll_all()
        await rig.wait_for(lambda: handle.state == "stopped", timeout=120, what="stopped")
        assert handle.error_level == 9
        assert any(e.level == LEVEL_CREDENTIAL for e in _errors(run, "ra"))
        assert _metric(run, "goqd_polls_total", store="ra", outcome="auth") >= 1
        seen = len(ra.requests)
        market.place("rb", "MUG-WHT", 2, clock())  # a change ra must get later
        run.poll_all()
        await trio.sleep(600)  # ten minutes stopped: no polling, no pushing
        assert len(ra.requests) == seen
        assert _cursor(run, "ra") == cursor
        # MUG-WHT's new count waits for ra
        assert len(queries.read(run.ledger_path, queries.outbox, "ra")) == 1
        reply = await call(run.socket, p.KeySet(store="ra", credentials=ra.issue_credentials()))
        assert isinstance(reply, m.Done)
        await _settle(run)
        assert handle.state == "running"
        assert not any(
            e.level == LEVEL_CREDENTIAL
            for e in queries.read(run.ledger_path, queries.errors, "ra", open_only=True)
        )
        _check(run)

    rig.run_dst(body, seed=17, stores=TWO)


def test_m1_malformed_bodies_degrade_without_moving_the_cursor() -> None:
    async def body(run: rig.Running) -> None:
        ra = run.fleet.sims["ra"]
        handle = run.daemon.handles["ra"]
        market = run.fleet.market(random.Random(8))
        for variant in faults.MALFORMED:
            before = _cursor(run, "ra")
            ra.faults.malformed = variant
            market.place("ra", "TEA-SEN", 1, clock())
            run.poll_all()
            await trio.sleep(5)
            assert (handle.state, handle.error_level) == ("degraded", 8), variant
            assert _cursor(run, "ra") == before, variant
            ra.faults.malformed = ""
            await _settle(run)
        assert _metric(run, "goqd_polls_total", store="ra", outcome="protocol") >= 4
        _check(run)

    rig.run_dst(body, seed=18, stores=TWO)


def test_m2_lines_for_unknown_or_ambiguous_listings_park_then_book_once_linked() -> None:
    async def body(run: rig.Running) -> None:
        ra, rb = run.fleet.sims["ra"], run.fleet.sims["rb"]
        ra.add_listing("new-item/NEW-1", link_code="NEW-1", quantity=5)
        order = ra.place_order([("new-item/NEW-1", 2)])
        assert order is not None
        run.poll_all()
        await rig.wait_for(
            lambda: len(queries.read(run.ledger_path, queries.parked_lines)) == 1,
            timeout=60,
            what="a parked line",
        )
        # Two rb listings of TS-RED-M: ambiguous (複数の商品が紐づいています); orders park.
        rb.add_listing("ts-red-m2/TS-RED-M", link_code="TS-RED-M", quantity=6)
        # goqd links only listings it has seen: the operator imports the store first.
        await call(run.socket, p.Import(store="rb"))
        await call(run.socket, m.Link(store="rb", listing_key="ts-red-m2/TS-RED-M", sku="TS-RED-M"))
        amb = rb.place_order([(run.fleet.keys["rb"]["TS-RED-M"], 1)])
        assert amb is not None
        run.poll_all()
        await rig.wait_for(
            lambda: len(queries.read(run.ledger_path, queries.parked_lines)) == 2,
            timeout=60,
            what="two parked lines",
        )
        report = check(run.fleet.sims, run.ledger_path, invariants=("I1",))
        assert report.ok and report.parked == 2
        # The operator resolves both; the parked lines are booked exactly once.
        await run.daemon.ledger.call(m.UpsertProduct(sku="NEW-1", total=5))
        await call(run.socket, m.Link(store="ra", listing_key="new-item/NEW-1", sku="NEW-1"))
        await call(run.socket, m.Unlink(store="rb", listing_key="ts-red-m2/TS-RED-M"))
        run.fleet.keys["ra"]["NEW-1"] = "new-item/NEW-1"
        await rig.wait_for(
            lambda: queries.read(run.ledger_path, queries.parked_lines) == [],
            timeout=60,
            what="parked lines released",
        )
        assert (await run.totals())["NEW-1"] == 3
        assert (await run.totals())["TS-RED-M"] == 5
        report = check(run.fleet.sims, run.ledger_path, invariants=("I1", "I2"))
        assert report.ok and report.parked == 0, report.summary()

    rig.run_dst(body, seed=19, stores=TWO)


def test_d1_d2_duplicates_are_counted_and_edits_corrected_once() -> None:
    async def body(run: rig.Running) -> None:
        market = run.fleet.market(random.Random(9))
        placed = [market.place(s, "TEA-SEN", 2, clock()) for s in ("ra", "sh")]
        assert all(placed)
        for _ in range(4):  # overlapping windows return the same lines again
            run.poll_all()
            await trio.sleep(15)
        assert _metric(run, "goqd_order_lines_total", outcome="duplicate") > 0
        assert queries.read(run.ledger_path, queries.counter, "duplicates") > 0
        for x in placed:
            assert x is not None
            run.fleet.sims[x.store].edit_quantity(x.order.order_id, x.order.lines[0].line_id, 1)
        run.poll_all()
        await _settle(run)
        history = await run.daemon.ledger.ask(m.GetHistory(sku="TEA-SEN"), m.History)
        corrections = [mv for mv in history.movements if mv.cause == "correction"]
        assert sorted((mv.store, mv.delta) for mv in corrections) == [("ra", 1), ("sh", 1)]
        assert history.total == 20 - 2
        _check(run)

    rig.run_dst(body, seed=20, stores=(("ra", "rakuten"), ("sh", "shopify")))


async def test_d3_an_order_seen_by_webhook_and_by_poll_is_applied_once(tmp_path: Path) -> None:
    """Real time, real HTTP: the Shopify simulator POSTs signed ``orders/create`` (and a
    duplicate delivery of it) to the daemon's ``/webhooks/sh``; each triggers a poll, as
    does the timer. The order is booked once; the repeats count as duplicates."""
    from goqd.app import run_daemon

    fleet = rig.build_fleet((("sh", "shopify"), ("ra", "rakuten")), clock=time.time, seed=21)
    router, urls = rig.router_for(fleet)
    sh = fleet.sims["sh"]
    config = rig.make_config(str(tmp_path), fleet, urls, push_retry="1s")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            daemon = await nursery.start(
                lambda task_status: run_daemon(config, transport=router, task_status=task_status)
            )
            await rig.seed_catalogue(daemon.ledger.call, fleet)
            path = config.daemon.ledger_path
            await rig.wait_for(lambda: rig.converged(fleet, path), timeout=20)
            sh.webhook_url = daemon.http_url + "/webhooks/sh"
            market = fleet.market(random.Random(21))
            assert market.place("sh", "TS-RED-S", 2, time.time()) is not None
            hook = sh.pending_webhooks[0]
            async with httpx.AsyncClient() as http:
                assert await sh.deliver_webhooks(http) == 1  # answered 200 after the poll
                assert len(queries.read(path, queries.order_lines)) == 1
                sh.pending_webhooks.append(hook)  # Shopify delivers it again
                assert await sh.deliver_webhooks(http) == 1
            daemon.handles["sh"].request_poll()  # and the timer comes round
            await rig.wait_for(lambda: rig.converged(fleet, path), timeout=20)
            report = check(fleet.sims, path, initial=fleet.initial, keys=fleet.keys)
            assert report.ok and report.booked == 1, report.summary()
            assert queries.read(path, queries.counter, "duplicates") >= 1
            nursery.cancel_scope.cancel()


FAULTY = ["maintenance", "throttle", "expired_credential", "timeout", "server_error"]


@pytest.mark.parametrize("kind", FAULTY)
def test_i5_a_failing_store_does_not_delay_pushes_to_healthy_ones(kind: str) -> None:
    """One store in trouble for 5 minutes while orders arrive at another: the third,
    healthy store gets every change as fast as with no fault at all."""

    def scenario(faulty: bool) -> list[float]:
        async def body(run: rig.Running) -> list[float]:
            market = run.fleet.market(random.Random(22))
            for sim in run.fleet.sims.values():
                sim.faults.latency = 0.2  # every mall answers in 200 ms: delays are real
            since = clock()
            episodes = (
                (
                    Episode(
                        store="rb",
                        kind=kind,
                        start=0,
                        duration=300,
                        latency=30,  # type: ignore[arg-type]
                        retry_after=30.0,
                    ),
                )
                if faulty
                else ()
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: run_plan(FaultPlan(22, episodes), run.fleet.sims, clock=clock)
                )
                for _ in range(10):
                    market.place("ra", rng_sku(market), 1, clock())
                    run.daemon.handles["ra"].request_poll()
                    await trio.sleep(30)
            return propagation_delays(run.fleet.sims, run.ledger_path, "sh", since=since)

        result: list[float] = rig.run_dst(body, seed=22, stores=THREE)
        return result

    baseline = scenario(False)
    delays = scenario(True)
    assert len(delays) == len(baseline) >= 5
    assert all(math.isfinite(d) for d in delays)
    violations = checker.check_isolation(delays, max(baseline) + 2.0, "sh")
    assert not violations, (violations, baseline, delays)
    print(
        f"\nI5 {kind}: healthy store delays max {max(delays):.2f}s "
        f"(baseline {max(baseline):.2f}s) over {len(delays)} changes"
    )


def rng_sku(market: Any) -> str:
    return str(market.rng.choice(sorted(market.real)))


def test_a_push_applied_after_its_timeout_is_repaired() -> None:
    async def body(run: rig.Running) -> None:
        market = run.fleet.market(random.Random(23))
        # The first push to rb sits in RMS's queue for 30 s (our timeout is 10 s).
        plan = FaultPlan(
            23, (Episode(store="rb", kind="late_apply", start=0, duration=8, latency=30),)
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_plan(plan, run.fleet.sims, clock=clock))
            market.place("ra", "TS-RED-S", 1, clock())
            run.poll_all()
            await trio.sleep(15)
            market.place("ra", "TS-RED-S", 1, clock())  # a newer count goes out meanwhile
            run.poll_all()
        await trio.sleep(900)
        # The mall itself applied an older request after a newer one, so I4 ("values
        # never go back") is broken by the mall, not by goqd; what goqd owes is repair:
        # the final count is the ledger's (I3) and every line is booked once (I1, I2).
        _check(run, invariants=("I1", "I2", "I3"))
        rb = run.fleet.sims["rb"]
        history = rb.listings[run.fleet.keys["rb"]["TS-RED-S"]].set_history
        assert history[-1] == 10 and 11 in history[-3:-1]  # the late 11, then re-asserted

    rig.run_dst(body, seed=23, stores=TWO)


def test_key_renewal_stays_within_rakutens_rate_limits() -> None:
    async def body(run: rig.Running) -> None:
        ra = run.fleet.sims["ra"]
        assert isinstance(ra, SimRakuten)
        ra.expire_credentials()
        run.poll_all()
        await rig.wait_for(lambda: run.daemon.handles["ra"].state == "stopped", timeout=60)
        await call(run.socket, p.KeySet(store="ra", credentials=ra.issue_credentials()))
        await trio.sleep(30)
        assert [r for r in ra.requests if r.status == 429] == []

    rig.run_dst(body, seed=24, stores=TWO)
