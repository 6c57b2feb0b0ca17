"""Crashes of the real ``goqd run`` process (docs/reliability.md C1–C6, X4 and the SIGKILL soak).

The simulated malls (Rakuten, Shopify, au PAY) are served over loopback by this test
process; the daemon is ``python -m goqd.cli.goqd run --config FILE`` in a subprocess
with ``GOQD_CRASHPOINT=name@N``, which SIGKILLs itself the N-th time it reaches the named
point. After every crash the daemon is restarted; at the end it is stopped with SIGTERM
and ``tests.helpers.checker`` compares every mall with the ledger: nothing lost, nothing
booked twice, every listing converged, no stale value applied (I1–I4).

Each test prints its figures (crash points × restarts survived, orders, lines); run
``pytest tests/integration/test_reliability_crash.py -s`` to see them.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from goqd import messages as m
from goqd.errors import ControlError
from goqd.ledger import open_db, queries
from goqd.sim.market import Market
from tests.helpers import checker, rig
from tests.helpers.paths import ROOT

pytestmark = pytest.mark.slow

STORES = (("ra", "rakuten"), ("sh", "shopify"), ("au", "aupay"))
CATALOGUE = {"TS-RED-S": 40, "TS-RED-M": 30, "MUG-WHT": 20, "TEA-SEN": 60, "CAP-NVY": 10}


@pytest.fixture
async def prig() -> AsyncIterator[rig.ProcessRig]:
    # Short path: the control socket's path must fit in sun_path (108 bytes).
    tmp = tempfile.mkdtemp(prefix="gqc-", dir="/tmp")
    try:
        async with rig.open_process_rig(STORES, tmp, catalogue=CATALOGUE) as r:
            yield r
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _orders(market: Market, n: int) -> None:
    for _ in range(n):
        market.place_random(time.time())
        roll = market.rng.random()
        if roll < 0.15:
            market.cancel_random()
        elif roll < 0.4:
            market.advance_random()


def _history_lengths(r: rig.ProcessRig) -> dict[tuple[str, str], int]:
    return {
        (s, k): len(listing.set_history)
        for s, sim in r.fleet.sims.items()
        for k, listing in sim.listings.items()
    }


def _applied_but_queued(
    r: rig.ProcessRig, before: dict[tuple[str, str], int]
) -> list[tuple[str, str]]:
    """Listings whose mall applied, since ``before``, the count the ledger still has in
    its outbox for them: a push whose outcome goqd never recorded."""
    queued = {
        (x.store, x.listing_key): x.quantity for x in queries.read(r.ledger_path, queries.outbox)
    }
    return [
        (s, k)
        for s, sim in r.fleet.sims.items()
        for k, listing in sim.listings.items()
        if (s, k) in queued
        and len(listing.set_history) > before[(s, k)]
        and listing.set_history[-1] == queued[(s, k)]
    ]


async def _run_until_exit(r: rig.ProcessRig, market: Market, limit: float) -> bool:
    """Keep the daemon busy (orders, poll-now) until it exits; False if it never did."""
    with trio.move_on_after(limit):
        while r.daemon.running:
            _orders(market, 1)
            await r.daemon.poll_now(r.stores)
            await trio.sleep(0.2)
        return True
    return False


async def _finish(r: rig.ProcessRig, market: Market) -> checker.CheckReport:
    """A clean daemon: settle, stop with SIGTERM, check I1–I4."""
    if not r.daemon.running:
        await r.daemon.start()
        await r.daemon.wait_ready()
    await r.settle(timeout=60)
    rc = await r.daemon.stop()
    assert rc == 0, r.daemon.log_tail()
    report = checker.check(r.fleet.sims, r.ledger_path, initial=r.fleet.initial, keys=r.fleet.keys)
    assert report.ok, report.summary()
    return report


CRASH_POINTS = [
    # (point, catalogue row, the N of each successive crash)
    ("store.poll_received", "C1", (1, 2, 3)),
    ("ledger.in_transaction", "C2", (2, 5, 9)),
    ("ledger.after_commit", "C3", (3, 6, 10)),
    ("store.before_push", "C4", (1, 2, 4)),
    ("store.push_sent", "C5", (1, 3, 5)),  # the mall applied it, goqd has no answer
    ("store.after_push", "C5b", (1, 3, 5)),  # goqd has the answer, the ledger not yet
]


def test_every_crash_point_in_the_code_is_listed_and_crashed_here() -> None:
    """``goqd.crashpoints.POINTS`` (which the run at scale crashes at 20 times each) and
    this file's table name every point the code has."""
    import re

    from goqd.crashpoints import POINTS, PUSH_SENT

    in_code = {PUSH_SENT}
    for path in (ROOT / "goqd").rglob("*.py"):
        in_code |= set(re.findall(r'crashpoint\("([a-z_.]+)"\)', path.read_text()))
    assert in_code == set(POINTS)
    assert {c[0] for c in CRASH_POINTS} == in_code - {"stock_import.chunk_applied"}


@pytest.mark.parametrize(("point", "row", "nths"), CRASH_POINTS, ids=[c[1] for c in CRASH_POINTS])
async def test_crash_at_each_named_point_then_restart_loses_nothing(
    prig: rig.ProcessRig, point: str, row: str, nths: tuple[int, ...]
) -> None:
    r = prig
    market = r.fleet.market(random.Random(zlib.crc32(point.encode())))
    _orders(market, 8)
    crashed = 0
    cursors_before = queries.read(r.ledger_path, queries.cursors)
    unrecorded = 0  # crashes after which a mall shows a push the ledger still has queued
    for i, nth in enumerate(nths):
        histories = _history_lengths(r)
        await r.daemon.start(crashpoint=f"{point}@{nth}")
        exited = await _run_until_exit(r, market, limit=20)
        assert exited, f"{point}@{nth} was never reached:\n{r.daemon.log_tail()}"
        assert r.daemon.proc is not None and r.daemon.proc.returncode == -signal.SIGKILL
        assert "daemon_stopped" not in r.daemon.log_tail(3)
        crashed += 1
        rig.ledger_consistent(r.ledger_path)
        if row == "C1" and i == 0:
            # The first poll response of the process died before the ledger had it:
            # nothing was acknowledged, no cursor moved.
            assert queries.read(r.ledger_path, queries.cursors) == cursors_before
            assert queries.read(r.ledger_path, queries.order_lines) == []
        unrecorded += bool(_applied_but_queued(r, histories))
        _orders(market, 3)
    report = await _finish(r, market)
    if row == "C3":
        # The re-poll after the crash saw committed lines again and absorbed them.
        assert queries.read(r.ledger_path, queries.counter, "duplicates") > 0
    if row in ("C5", "C5b"):
        # At least one crash came after the mall applied a push and before the ledger
        # heard of it (the push is still queued): the same absolute value goes out again.
        assert unrecorded, "no crash fell between a push applied and its outcome recorded"
    print(
        f"\n{row} {point}: {crashed} crashes at N={list(nths)} ({unrecorded} with a push "
        f"applied and unrecorded), {crashed} restarts survived, "
        f"{len(market.placed)} orders; {report.summary()}"
    )


async def test_random_sigkills_soak_loses_nothing(prig: rig.ProcessRig) -> None:
    """SIGKILL at random moments (bounded: 8 kills, 45 s), orders and operator restocks
    arriving all the while; after each kill the ledger is consistent, at the end I1–I4."""
    r = prig
    rng = random.Random(20261127)
    market = r.fleet.market(rng)
    kills = 0
    restocks = 0
    deadline = trio.current_time() + 45
    async with trio.open_nursery() as nursery:

        async def customers() -> None:
            while True:
                _orders(market, 1)
                await trio.sleep(rng.uniform(0.05, 0.3))

        nursery.start_soon(customers)
        while kills < 8 and trio.current_time() < deadline:
            await r.daemon.start()
            # Sometimes before READY, sometimes mid-poll or mid-push.
            await trio.sleep(rng.uniform(0.2, 2.5))
            if r.daemon.running and rng.random() < 0.5:
                try:
                    sku = rng.choice(sorted(CATALOGUE))
                    await r.daemon.request(m.AdjustStock(sku=sku, delta=3, reason="soak"))
                    market.real[sku] += 3
                    restocks += 1
                except ControlError:
                    pass  # not ready yet: the operator tries again later
                await r.daemon.poll_now(r.stores)
                await trio.sleep(rng.uniform(0.0, 0.6))
            await r.daemon.kill()
            kills += 1
            rig.ledger_consistent(r.ledger_path)
        nursery.cancel_scope.cancel()
    report = await _finish(r, market)
    assert kills >= 5
    print(
        f"\nSIGKILL soak: {kills} kills, {kills} restarts survived, {len(market.placed)} orders, "
        f"{restocks} restocks; {report.summary()}"
    )


async def test_sigterm_with_pushes_in_flight_stops_cleanly_and_loses_nothing(
    prig: rig.ProcessRig,
) -> None:
    """X4: SIGTERM while a push to a slow mall is in flight: exit 0 well within the stop
    timeout, and after a restart I1–I4 hold."""
    r = prig
    market = r.fleet.market(random.Random(4))
    await r.daemon.start()
    await r.daemon.wait_ready()
    await r.settle()
    slow = r.fleet.sims["sh"]
    slow.faults.latency = 3.0  # every Shopify call takes 3 s: pushes are in flight
    in_flight = rig.track_in_flight(slow)
    before = len(slow.requests)
    market.place("ra", "TS-RED-S", 2, time.time())
    market.place("au", "MUG-WHT", 1, time.time())
    await r.daemon.poll_now(["ra", "au"])
    # Wait until Shopify has been sent something (it answers 3 s later).
    await rig.wait_for(lambda: in_flight.pushes > 0, timeout=10, what="a push to Shopify")
    assert in_flight.now > 0
    started = time.perf_counter()
    rc = await r.daemon.stop(timeout=25)
    elapsed = time.perf_counter() - started
    assert rc == 0, r.daemon.log_tail()
    assert elapsed < 5.0, f"took {elapsed:.1f}s to stop"
    assert '"daemon_stopped"' in r.daemon.log_tail(5)
    slow.faults.latency = 0.0
    await trio.sleep(2.0)  # let the abandoned slow calls finish at the mall
    _orders(market, 4)
    report = await _finish(r, market)
    print(
        f"\nX4: stopped in {elapsed:.2f}s with {in_flight.at_peak} Shopify call(s) in flight "
        f"({len(slow.requests) - before} answered since); {report.summary()}"
    )


_CHECKPOINT_WRITER = textwrap.dedent(
    """
    import sys, time
    from goqd import messages as m
    from goqd.ledger import queries
    from goqd.ledger import Ledger, open_db

    path, start = sys.argv[1], int(sys.argv[2])
    conn = open_db(path)
    conn.execute("PRAGMA wal_autocheckpoint=0")  # only our explicit checkpoints
    ledger = Ledger(conn, now=time.time)
    if not queries.products(conn):
        ledger.apply_batch(
            [m.UpsertProduct(sku=f"S{s}", total=100000) for s in range(20)]
            + [m.UpsertListing(store="x", listing_key=f"k{s}", sku=f"S{s}") for s in range(20)]
        )
    n = start
    while True:
        lines = tuple(
            m.OrderLine(order_id=f"o{i}", line_id="1", listing_key=f"k{i % 20}",
                        quantity=1 + i % 3, updated_at=4e9 + i)
            for i in range(n, n + 2000)
        )
        ledger.apply_batch([m.OrderLinesSeen(store="x", lines=lines, cursor=str(n + 2000))])
        n += 2000
        print(f"acked {n}", flush=True)
        print("checkpoint", flush=True)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        print("checkpointed", flush=True)
    """
)


def test_sigkill_during_wal_checkpoints_keeps_the_ledger_sound(tmp_path: Path) -> None:
    """C6: a writer that checkpoints the WAL after every batch is SIGKILLed at random
    moments; each time the file passes quick_check, every acknowledged line is there
    exactly once and stock is conserved."""
    db = tmp_path / "goqd.db"
    root = ROOT
    env = {**os.environ, "PYTHONPATH": str(root)}
    rng = random.Random(6)
    acked = 0
    in_checkpoint = 0
    kills = 0
    deadline = time.monotonic() + 20
    while kills < 12 and time.monotonic() < deadline:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHECKPOINT_WRITER, str(db), str(acked)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=root,
        )
        assert proc.stdout is not None
        seen: list[str] = []
        if kills % 2:
            # Aim at a checkpoint: kill a few milliseconds after one starts.
            for raw in proc.stdout:
                seen.append(raw.strip())
                if raw.strip() == "checkpoint" and seen.count("checkpoint") >= 2:
                    time.sleep(rng.uniform(0, 0.004))
                    break
        else:
            time.sleep(rng.uniform(0.6, 1.6))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        lines = seen + out.splitlines()
        acks = [int(x.split()[1]) for x in lines if x.startswith("acked ")]
        acked = max(acks, default=acked)
        if lines and lines[-1] == "checkpoint":
            in_checkpoint += 1
        kills += 1
        conn = open_db(str(db))  # quick_check inside; refuses a damaged file
        try:
            booked = queries.order_lines(conn)
            units = sum(x.booked_qty for x in booked)
            assert len(booked) >= acked  # nothing acknowledged is missing (more may have committed)
            assert sum(queries.totals(conn).values()) == 20 * 100000 - units
            moved = sum(mv.delta for mv in queries.movements(conn) if mv.cause == "order")
            assert moved == -units
            assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        except sqlite3.Error as exc:  # pragma: no cover - the failure we are looking for
            pytest.fail(f"ledger unreadable after kill {kills}: {exc}")
        finally:
            conn.close()
    assert kills >= 6
    print(f"\nC6: {kills} kills ({in_checkpoint} inside a WAL checkpoint), {acked} lines acked")
