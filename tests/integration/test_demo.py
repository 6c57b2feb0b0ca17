"""``goqd demo`` as a newcomer meets it: ``--malls`` chooses the malls (and the summary
names them), a wrong name is a usage error that starts nothing, and the five-mall demo
runs on a simulated clock that keeps Amazon's two-minute order lag in simulated time
while nothing is lost and every mall converges.

Everything is real except time: simulators over HTTP on 127.0.0.1, the daemon, the
SQLite ledger. Durations are simulated seconds; no test asserts wall time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from goqd.tools.demo import format_summary, run_demo
from goqd.tools.fleet import available_malls
from tests.helpers.paths import ROOT

pytestmark = pytest.mark.slow


def goqd_demo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "goqd.cli.goqd", "demo", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        # Bounds a regression that ignores --malls (the full demo runs minutes).
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_malls_option_runs_only_those_malls_and_the_json_names_them(tmp_path: Path) -> None:
    # A repeated name counts once.
    result = goqd_demo(
        "--malls",
        "shopify, rakuten,shopify",
        "--seconds",
        "5",
        "--speed",
        "10",
        "--json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["malls"] == ["rakuten", "shopify"]
    assert summary["stores"] == ["rakuten-a", "rakuten-b", "shopify-a", "shopify-b"]
    assert set(summary["booked_after_s"]) <= {"rakuten", "shopify"}
    assert summary["orders"] > 0
    assert summary["converged"] is True
    assert summary["lost_lines"] == 0


@pytest.mark.parametrize(
    ("malls", "named"),
    [("rakuten,qoo10", "'qoo10'"), ("rakuten,Amazon", "'Amazon'"), (" , ", "no mall given")],
)
def test_a_bad_malls_list_is_a_usage_error_that_starts_nothing(
    tmp_path: Path, malls: str, named: str
) -> None:
    kept = tmp_path / "kept"
    result = goqd_demo("--malls", malls, "--keep", str(kept), "--json", cwd=tmp_path)
    assert result.returncode == 2
    assert "--malls" in result.stderr
    assert named in result.stderr
    for mall in available_malls():  # the valid names, so the user can correct it
        assert mall in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not kept.exists()  # no config, no ledger, no simulators


def test_five_mall_demo_on_the_simulated_clock_converges_and_keeps_amazons_lag() -> None:
    summary = run_demo(seconds=10.0, order_rate=2.0, speed=10.0, live=False)
    assert summary.malls == sorted(available_malls())
    assert len(summary.stores) == 2 * len(available_malls())
    assert summary.converged, summary.mismatches
    assert summary.lost_lines == 0
    assert summary.lines_booked > 0
    # Amazon shows an order to getOrders two simulated minutes after it was placed;
    # the demo's faster clock must not shorten that: no Amazon line was booked sooner.
    amazon = summary.booked_after_s["amazon"]
    assert amazon.lines > 0
    assert amazon.min_s >= 120.0
    assert summary.simulated_s >= amazon.max_s
    assert summary.speed == 10.0
    head = format_summary(summary).strip().splitlines()[0]
    assert all(mall in head for mall in available_malls())
