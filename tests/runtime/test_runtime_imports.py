"""The daemon apart from its tools: ``goqd run`` loads no simulator and no tool.

The simulators and the tools (demo, benchmarks, the simulated fleet) are large, import
every mall's simulator and are no part of what runs in production; a fresh interpreter
that builds ``goqd``'s argument parser, parses a ``run`` command line and imports the
daemon's wiring must not have loaded any of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers.paths import ROOT

_PROBE = """
import json, sys
from goqd.cli import goqd
args = goqd.parse_args(["run", "--config", "/etc/goqd/goqd.toml"])
assert args.command == "run", args
import goqd.app
print(json.dumps(sorted(sys.modules)))
"""


def test_goqd_run_imports_no_simulator_and_no_tool() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout)
    assert "goqd.app" in modules  # the probe did load the daemon
    loaded = [
        name
        for name in modules
        if name in ("goqd.sim", "goqd.tools") or name.startswith(("goqd.sim.", "goqd.tools."))
    ]
    assert loaded == []


def test_a_tool_subcommand_still_parses_its_own_options() -> None:
    from goqd.cli import goqd

    args = goqd.parse_args(["bench", "ledger", "--skus", "10"])
    assert (args.command, args.bench, args.skus) == ("bench", "ledger", 10)
    args = goqd.parse_args(["demo", "--malls", "rakuten", "--seconds", "5"])
    assert (args.command, args.malls, args.seconds) == ("demo", ["rakuten"], 5.0)
