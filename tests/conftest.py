"""Fixtures shared across test files.

* ``now`` and ``ledger``: a ledger on a fake clock holding ``tests.test_ledger``'s
  catalogue (SKU A 10 units, B 5, each listed in r1, r2, r3).
* ``promtool`` and ``systemd_analyze``: the path of an outside program a test runs.
  Missing, it skips the test on a developer's machine but fails it when ``CI`` is set
  (.ci/run installs both and sets ``CI=true``), so CI never passes by skipping them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from goqd.ledger import LedgerClient, open_ledger
from tests.test_ledger import FakeNow, setup_catalogue


@pytest.fixture
def now() -> FakeNow:
    return FakeNow()


@pytest.fixture
async def ledger(tmp_path: Path, now: FakeNow) -> AsyncIterator[LedgerClient]:
    async with open_ledger(str(tmp_path / "goqd.db"), now=now) as client:
        await setup_catalogue(client)
        yield client


def required_tool(name: str, why: str) -> str:
    """The path of the program ``name``. Missing, it skips the test on a developer's
    machine but fails it in CI (``CI`` set to 1, true or yes), where ``why`` must be
    checked."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{name} is not installed; CI must {why}")
        pytest.skip(f"{name} not installed")
    return path


@pytest.fixture
def promtool() -> str:
    return required_tool(
        "promtool", "check the metrics and test the alert rules (Debian package: prometheus)"
    )


@pytest.fixture
def systemd_analyze() -> str:
    return required_tool("systemd-analyze", "verify the unit files (Debian package: systemd)")
