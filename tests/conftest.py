"""Fixtures shared across the rooms (tests/malls, ledger, control, integration, runtime).

* ``sock_dir``: a fresh, short directory under /tmp for Unix sockets, removed after the
  test. pytest's ``tmp_path`` is too deep: a socket path must fit in ``sun_path``
  (108 bytes on Linux), so sockets get a directory of their own.
* ``rig`` (tests.helpers.daemon) and ``shop`` (tests.helpers.catalogue): a real daemon over
  a simulated Rakuten fleet; registered here as plugins because tests in more than one
  room use them.
* ``promtool`` and ``systemd_analyze``: the path of an outside program a test runs.
  Missing, it skips the test on a developer's machine but fails it when ``CI`` is set
  (.ci/run installs both and sets ``CI=true``), so CI never passes by skipping them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

pytest_plugins = ["tests.helpers.daemon", "tests.helpers.catalogue"]


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="goqd-t-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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
