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

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"


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

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed"
)


def _verifiable_copy(unit: Path, dest: Path) -> Path:
    """The unit with ExecStart pointed at a binary that exists on this machine.

    ``systemd-analyze verify`` refuses a unit whose ExecStart binary is missing, and
    /usr/bin/goqd exists only where goqd is installed. Everything else stays as is.
    """
    true = shutil.which("true") or "/bin/true"
    text = re.sub(
        r"^(ExecStart=)/usr/bin/goqd\b", rf"\g<1>{true}", unit.read_text(), flags=re.MULTILINE
    )
    out = dest / unit.name
    out.write_text(text)
    return out


def _verify(*paths: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        # Offline checks only: never ask the running manager (if any) for anything.
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice", "SYSTEMD_PAGER": ""},
    )


def test_unit_files_exist_and_match_each_other() -> None:
    main = (UNITS / "goqd.service").read_text()
    inst = (UNITS / "goqd@.service").read_text()
    for text in (main, inst):
        assert "Type=notify" in text and "NotifyAccess=main" in text
        assert "WatchdogSec=30" in text and "Restart=on-failure" in text
        assert re.search(r"^StateDirectory=goqd", text, re.MULTILINE)
        assert re.search(r"^RuntimeDirectory=goqd", text, re.MULTILINE)
    assert "ExecStart=/usr/bin/goqd run --config /etc/goqd/goqd.toml" in main
    assert "ExecStart=/usr/bin/goqd run --config /etc/goqd/%i.toml" in inst
    assert "GOQD_CONTROL_SOCKET=/run/goqd/%i/control.sock" in inst


@needs_systemd_analyze
def test_systemd_analyze_verify_passes_on_both_units(tmp_path: Path) -> None:
    main = _verifiable_copy(UNITS / "goqd.service", tmp_path)
    template = _verifiable_copy(UNITS / "goqd@.service", tmp_path)
    # A template is verified through an instance; the instance name resolves to the
    # template file in the same directory.
    instance = tmp_path / "goqd@shop1.service"
    instance.symlink_to(template.name)
    result = _verify(main, instance)
    assert result.returncode == 0, result.stdout + result.stderr
    # verify reports unit-file problems (bad values, unknown keys) as warnings with exit
    # status 0, each line naming the file: none may mention ours.
    complaints = [line for line in result.stderr.splitlines() if "goqd" in line]
    assert complaints == [], result.stderr


@needs_systemd_analyze
def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    # Guards the test above against passing vacuously (e.g. verify ignoring the file).
    broken = _verifiable_copy(UNITS / "goqd.service", tmp_path)
    broken.write_text(broken.read_text().replace("Type=notify", "Type=notifyy"))
    result = _verify(broken)
    assert "notifyy" in result.stderr


def _exposure(unit: Path) -> float:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@needs_systemd_analyze
def test_security_exposure_of_goqd_service_is_at_most_2(tmp_path: Path) -> None:
    assert _exposure(UNITS / "goqd.service") <= 2.0


@needs_systemd_analyze
def test_security_exposure_of_the_instance_unit_is_at_most_2(tmp_path: Path) -> None:
    template = _verifiable_copy(UNITS / "goqd@.service", tmp_path)
    instance = tmp_path / "goqd@shop1.service"
    instance.symlink_to(template.name)
    assert _exposure(instance) <= 2.0
