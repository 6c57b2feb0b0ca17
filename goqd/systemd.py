"""sd_notify, written in-house: READY, RELOADING, WATCHDOG, STATUS and STOPPING for systemd.

The protocol is one datagram of ``KEY=value`` lines to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for the abstract namespace).
Outside systemd the variable is unset and every call is a no-op returning False, so
the daemon needs no special mode for running in a terminal or in tests.

``run_watchdog`` sends ``WATCHDOG=1`` only after a real liveness check (the daemon's
probe asks the ledger to answer): a stuck ledger must stop the pings so that systemd
kills and restarts the process. This module must never ping from a thread or a task
that does not check anything, and must never block the trio thread on the socket.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable

import structlog
import trio

log = structlog.get_logger("goqd.systemd")


def notify(state: str) -> bool:
    """Send ``state`` to ``$NOTIFY_SOCKET``; False if unset, unsupported or refused."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        # Unset, or a vsock address (only used by VMs): nothing to do.
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Non-blocking: a full receive queue must not stall the event loop.
            sock.setblocking(False)
            sock.sendto(state.encode("utf-8"), address)
    except OSError as exc:
        log.warning("notify_failed", error=f"{type(exc).__name__}: {exc}")
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would start another KEY=value assignment in the datagram.
    return " ".join(text.splitlines())


def ready(status: str = "") -> bool:
    """``READY=1``: the daemon's setup is done (with an optional ``STATUS=``)."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))


def watchdog() -> bool:
    """``WATCHDOG=1``: only after a real liveness check (see ``run_watchdog``)."""
    return notify("WATCHDOG=1")


def stopping(status: str = "") -> bool:
    """``STOPPING=1``: shutdown has begun."""
    return notify("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))


def reloading(status: str = "") -> bool:
    """``RELOADING=1`` with ``MONOTONIC_USEC=``: a reload has begun; ``ready()`` ends it.

    systemd's notify-reload protocol wants the time of the request on CLOCK_MONOTONIC
    (the system's clock, never trio's): it tells this reload from an earlier one.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    text = f"RELOADING=1\nMONOTONIC_USEC={usec}"
    return notify(text + (f"\nSTATUS={_one_line(status)}" if status else ""))


def status(text: str) -> bool:
    """``STATUS=``: one line shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def extend_timeout(seconds: float) -> bool:
    """``EXTEND_TIMEOUT_USEC=``: ask for more time to start or stop (e.g. draining)."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def watchdog_interval() -> float | None:
    """``$WATCHDOG_USEC`` in seconds, or None when the watchdog is off or meant for
    another process (``$WATCHDOG_PID`` names a different pid)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


async def run_watchdog(
    probe: Callable[[], Awaitable[bool]],
    *,
    interval: float,
    probe_timeout: float | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Every ``interval / 2`` seconds, run ``probe`` and send ``WATCHDOG=1`` if it said yes.

    ``interval`` is systemd's watchdog interval (``watchdog_interval()``). Pinging at
    half of it leaves one missed beat of slack. ``probe_timeout`` (default
    ``interval / 4``) bounds each probe: a probe that hangs counts as a failure.

    Resource handling: owns nothing; runs until cancelled.

    Error handling: a probe that returns False, raises an ``Exception`` or times out
    means "not alive": no ping this beat, ``watchdog_probe_failed`` is logged once
    (and ``watchdog_probe_recovered`` when it answers again). systemd then kills the
    process if no ping arrives within ``interval``. Cancellation propagates.
    """
    if interval <= 0:
        raise ValueError("interval must be positive")
    period = interval / 2
    timeout = probe_timeout if probe_timeout is not None else interval / 4
    failing = False
    task_status.started()
    next_beat = trio.current_time()
    while True:
        alive = False
        reason = "timeout"
        with trio.move_on_after(timeout):
            try:
                alive = bool(await probe())
                reason = "probe returned false"
            except Exception as exc:
                # A broken probe is a dead daemon as far as systemd is concerned.
                reason = f"{type(exc).__name__}: {exc}"
        if alive:
            watchdog()
            if failing:
                log.info("watchdog_probe_recovered")
                failing = False
        elif not failing:
            log.warning("watchdog_probe_failed", reason=reason)
            failing = True
        # Keep a fixed cadence however long the probe took.
        next_beat += period
        await trio.sleep_until(max(next_beat, trio.current_time()))
