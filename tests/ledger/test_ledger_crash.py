"""A real subprocess booking lines is SIGKILLed at random moments (and at the named
crash points inside and after the transaction); after each restart the ledger holds
every acknowledged line exactly once and conserves stock."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from goqd.ledger import open_db, queries
from tests.helpers.crash_writer import SKUS, line_for
from tests.helpers.paths import ROOT

LINES = 600


def _spawn(db: Path, env_extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.crash_writer", str(db), str(LINES), "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _check(db: Path, acked: int, *, complete: bool) -> None:
    conn = open_db(str(db))  # as the daemon opens it again after the crash
    lines = queries.order_lines(conn)
    booked = {r.order_id: r.booked_qty for r in lines}
    for n in range(acked):
        expected = 0 if n % 7 == 0 else line_for(n).quantity
        assert booked.get(f"o{n}") == expected, f"acknowledged line o{n} lost or wrong"
    if complete:
        assert len(booked) == LINES
    sold: Counter[str] = Counter()
    for r in lines:
        sold[r.sku] += r.booked_qty
    moved: Counter[str] = Counter()
    for mv in queries.movements(conn):
        moved[mv.sku] += mv.delta
    totals = queries.totals(conn)
    for s in map(str, range(SKUS)):
        if s not in totals:
            continue  # killed while the catalogue was being set up
        assert totals[s] == 1000 - sold[s] == moved[s]
    assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    conn.close()


def _run_until(proc: subprocess.Popen[str], kill_after_acks: int | None) -> int:
    acked = 0
    assert proc.stdout is not None
    for raw in proc.stdout:
        if raw.startswith("acked "):
            acked = int(raw.split()[1])
            if kill_after_acks is not None and acked >= kill_after_acks:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=60)
    return acked


@pytest.mark.slow
def test_random_sigkills_lose_no_acknowledged_line(tmp_path: Path) -> None:
    db = tmp_path / "goqd.db"
    rng = random.Random(20261127)
    kills = 0
    for _ in range(6):
        proc = _spawn(db)
        # Kill either after some acknowledgements, or at a random wall-clock moment.
        if rng.random() < 0.5:
            acked = _run_until(proc, rng.randrange(1, LINES // 20))
        else:
            time.sleep(rng.uniform(0.05, 0.8))
            proc.send_signal(signal.SIGKILL)
            out, _ = proc.communicate(timeout=60)
            # What it printed before the kill is exactly what was acknowledged.
            acks = [int(r.split()[1]) for r in out.splitlines() if r.startswith("acked ")]
            acked = max(acks, default=0)
        kills += 1
        if db.exists():
            _check(db, acked, complete=False)
    final = _spawn(db)
    assert _run_until(final, None) == LINES
    _check(db, LINES, complete=True)
    assert kills == 6


@pytest.mark.slow
@pytest.mark.parametrize("point", ["ledger.in_transaction@215", "ledger.after_commit@220"])
def test_crash_at_named_points_is_recovered_by_replay(tmp_path: Path, point: str) -> None:
    db = tmp_path / "goqd.db"
    proc = _spawn(db, {"GOQD_CRASHPOINT": point})
    acked = _run_until(proc, None)
    assert proc.returncode == -signal.SIGKILL
    assert 0 < acked < LINES  # it died in the middle of booking
    _check(db, acked, complete=False)
    final = _spawn(db)
    assert _run_until(final, None) == LINES
    _check(db, LINES, complete=True)
