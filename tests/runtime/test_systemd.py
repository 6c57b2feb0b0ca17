"""sd_notify datagrams, the watchdog loop, and the systemd unit files."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing

from goqd import systemd
from tests.helpers.paths import ROOT

UNITS = ROOT / "systemd"


def _drain(sock: socket.socket) -> list[str]:
    out: list[str] = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.fixture(params=["path", "abstract"])
def notify_socket(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, in both address forms."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    if request.param == "path":
        # A short directory: AF_UNIX paths are limited to 107 bytes.
        tmp = tempfile.mkdtemp(prefix="goqd-n-")
        path = os.path.join(tmp, "notify")
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
    else:
        name = f"goqd-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        yield sock
    finally:
        sock.close()
        if request.param == "path":
            shutil.rmtree(tmp)


def test_notify_sends_exact_datagrams(notify_socket: socket.socket) -> None:
    assert systemd.ready()
    assert systemd.ready("2 stores")
    assert systemd.watchdog()
    assert systemd.status("syncing 2 stores\nREADY=1")
    assert systemd.stopping()
    assert systemd.extend_timeout(1.5)
    assert _drain(notify_socket) == [
        "READY=1",
        "READY=1\nSTATUS=2 stores",
        "WATCHDOG=1",
        # The newline is flattened: a status text can never inject another assignment.
        "STATUS=syncing 2 stores READY=1",
        "STOPPING=1",
        "EXTEND_TIMEOUT_USEC=1500000",
    ]


def test_notify_is_a_noop_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify("READY=1") is False


def test_notify_to_a_vanished_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/goqd/notify")
    with structlog.testing.capture_logs() as logs:
        assert systemd.watchdog() is False
    assert logs[0]["event"] == "notify_failed"


def test_watchdog_interval_reads_usec_and_checks_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    assert systemd.watchdog_interval() is None


async def test_watchdog_pings_only_while_probe_succeeds(
    notify_socket: socket.socket, autojump_clock: trio.testing.MockClock
) -> None:
    t0 = trio.current_time()
    pings_at: list[float] = []

    async def probe() -> bool:
        now = trio.current_time() - t0
        ok = not (20 <= now < 40)  # the ledger stops answering for 20 s
        if ok:
            pings_at.append(now)
        return ok

    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: systemd.run_watchdog(
                    probe, interval=10.0, task_status=task_status
                )
            )
            await trio.sleep(59)
            nursery.cancel_scope.cancel()
    # Beats every 5 s: 0..15 ok, 20..35 failing, 40..55 ok.
    assert pings_at == [0, 5, 10, 15, 40, 45, 50, 55]
    assert _drain(notify_socket) == ["WATCHDOG=1"] * 8
    events = [e["event"] for e in logs]
    assert events == ["watchdog_probe_failed", "watchdog_probe_recovered"]


async def test_watchdog_hanging_or_raising_probe_sends_nothing(
    notify_socket: socket.socket, autojump_clock: trio.testing.MockClock
) -> None:
    calls = 0

    async def hanging() -> bool:
        nonlocal calls
        calls += 1
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def raising() -> bool:
        raise RuntimeError("ledger gone")

    for probe in (hanging, raising):
        with trio.move_on_after(60):
            await systemd.run_watchdog(probe, interval=10.0)
    assert calls >= 10  # it kept probing at its cadence although each probe hung
    assert _drain(notify_socket) == []


# -- unit files ------------------------------------------------------------------------

GUIDES = (ROOT / "docs" / "operator-guide.md", ROOT / "docs" / "operator-guide.ja.md")
# Where systemd's own units live; a verify root needs them (sysinit.target and friends).
_SYSTEM_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))


def _exec_start(unit: Path) -> Path:
    """The program the unit's ExecStart= runs."""
    match = re.search(r"^ExecStart=[-@:+!]*(\S+)", unit.read_text(), re.MULTILINE)
    assert match, unit
    return Path(match.group(1))


def _verify_root(root: Path) -> Path:
    """A directory tree for ``systemd-analyze verify --root``: systemd's own units, both
    goqd units byte for byte as shipped, and an executable at each shipped Exec*= path.

    Returns the directory holding the goqd units. verify checks that ExecStart's program
    exists and is executable *inside the root*, so nothing on this machine is touched
    and the units need no editing.
    """
    system = next((d for d in _SYSTEM_UNIT_DIRS if (d / "sysinit.target").exists()), None)
    assert system is not None, "systemd's own unit directory not found"
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for name in ("goqd.service", "goqd@.service"):
        shutil.copyfile(UNITS / name, units / name)
        # Every command the unit runs (ExecStart, ExecReload's kill), as verify checks each.
        text = (UNITS / name).read_text()
        for command in re.findall(r"^Exec\w+=[-@:+!]*(\S+)", text, re.MULTILINE):
            program = root / Path(command).relative_to("/")
            program.parent.mkdir(parents=True, exist_ok=True)
            program.write_text("#!/bin/sh\nexit 0\n")
            program.chmod(0o755)
    return units


def _verify(systemd_analyze: str, root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze, "verify", "--man=no", f"--root={root}", *units],
        capture_output=True,
        text=True,
        timeout=60,
        # Offline checks only: never ask the running manager (if any) for anything.
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice", "SYSTEMD_PAGER": ""},
    )


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_unit_files_exist_and_match_each_other() -> None:
    main = (UNITS / "goqd.service").read_text()
    inst = (UNITS / "goqd@.service").read_text()
    for text in (main, inst):
        assert "Type=notify" in text and "NotifyAccess=main" in text
        assert "WatchdogSec=30" in text and "Restart=on-failure" in text
        assert re.search(r"^StateDirectory=goqd", text, re.MULTILINE)
        assert re.search(r"^RuntimeDirectory=goqd", text, re.MULTILINE)
    assert "ExecStart=/opt/goqd/bin/goqd run --config /etc/goqd/goqd.toml" in main
    assert "ExecStart=/opt/goqd/bin/goqd run --config /etc/goqd/%i.toml" in inst
    assert "GOQD_CONTROL_SOCKET=/run/goqd/%i/control.sock" in inst


def test_both_units_bound_open_files_memory_and_tasks_alike() -> None:
    main = _directives((UNITS / "goqd.service").read_text())
    inst = _directives((UNITS / "goqd@.service").read_text())
    for key in ("LimitNOFILE", "MemoryMax", "TasksMax"):
        assert len(main.get(key, [])) == 1 and main[key] == inst.get(key), key
    # The HTTP listener's cap is a quarter of the open-files limit, and at that limit it
    # is still the configured maximum: three quarters stay for everything else.
    from goqd.http import HttpLimits

    assert int(main["LimitNOFILE"][0]) // 4 >= HttpLimits().max_connections


def test_unit_comments_claim_no_mode_check_of_the_config_file() -> None:
    # goqd checks the mode of credential files only; the config holds no secrets and a
    # 0644 config is accepted, so no comment may promise otherwise.
    for name in ("goqd.service", "goqd@.service"):
        text = (UNITS / name).read_text()
        assert not re.search(r"refuses config", text), name
        assert "The config holds no secrets" in text, name


def test_the_units_run_goqd_where_the_operator_guide_installs_it() -> None:
    program = _exec_start(UNITS / "goqd.service")
    assert _exec_start(UNITS / "goqd@.service") == program
    venv = program.parent.parent
    for guide in GUIDES:
        text = guide.read_text()
        # The guide's step 2 makes the venv whose bin/goqd the unit runs, and installs
        # the units unchanged: no step rewrites ExecStart.
        assert f"python3 -m venv {venv}\n" in text, guide.name
        assert "install -m 0644 systemd/goqd.service /etc/systemd/system/" in text, guide.name
        assert "/usr/bin/goqd" not in text and "sed 's#" not in text, guide.name


def test_systemd_analyze_verify_passes_on_both_units_as_shipped(
    systemd_analyze: str, tmp_path: Path
) -> None:
    units = _verify_root(tmp_path)
    for name in ("goqd.service", "goqd@.service"):
        assert (units / name).read_bytes() == (UNITS / name).read_bytes()
    # A template is verified through an instance, found by name in the root.
    result = _verify(systemd_analyze, tmp_path, str(units / "goqd.service"), "goqd@shop1.service")
    assert result.returncode == 0, result.stdout + result.stderr
    # verify reports unit-file problems (bad values, unknown keys) as warnings with exit
    # status 0, each line naming the file: none may mention ours.
    complaints = [line for line in result.stderr.splitlines() if "goqd" in line]
    assert complaints == [], result.stderr


def test_systemd_analyze_verify_catches_a_missing_program_and_a_broken_unit(
    systemd_analyze: str, tmp_path: Path
) -> None:
    # Guards the test above against passing vacuously: verify must look for ExecStart's
    # program inside the root, and must read our file.
    units = _verify_root(tmp_path)
    program = tmp_path / _exec_start(UNITS / "goqd.service").relative_to("/")
    program.unlink()
    missing = _verify(systemd_analyze, tmp_path, str(units / "goqd.service"))
    assert missing.returncode != 0
    assert f"{_exec_start(UNITS / 'goqd.service')} is not executable" in missing.stderr
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    broken = units / "goqd.service"
    broken.write_text(broken.read_text().replace("Type=notify", "Type=notifyy"))
    result = _verify(systemd_analyze, tmp_path, str(broken))
    assert "notifyy" in result.stderr


def _exposure(systemd_analyze: str, unit: Path) -> float:
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


def test_security_exposure_of_goqd_service_is_at_most_2(systemd_analyze: str) -> None:
    assert _exposure(systemd_analyze, UNITS / "goqd.service") <= 2.0


def test_security_exposure_of_the_instance_unit_is_at_most_2(
    systemd_analyze: str, tmp_path: Path
) -> None:
    shutil.copyfile(UNITS / "goqd@.service", tmp_path / "goqd@.service")
    instance = tmp_path / "goqd@shop1.service"
    instance.symlink_to("goqd@.service")
    assert _exposure(systemd_analyze, instance) <= 2.0
