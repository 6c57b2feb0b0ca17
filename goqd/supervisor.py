"""Erlang/OTP-style one_for_one supervision for trio tasks.

A trio nursery is already *one_for_all*: one failing child cancels its siblings. goqd
wants that for the ledger, the control server and the HTTP server (if the ledger dies
the process exits and systemd, the top supervisor, restarts it), but not for store
actors: a store whose mall misbehaves in some unforeseen way must not take the other
stores with it. ``supervise()`` gives each such child its own restart loop:

* ``permanent`` children are restarted whatever happens, even after a normal return;
* ``transient`` children are restarted only after an exception;
* ``temporary`` children are never restarted.

Restarts wait an exponential backoff with jitter (on ``trio.sleep``, so a
``MockClock`` drives it). More than ``intensity`` restarts within ``period`` seconds
(measured with ``trio.current_time()``) and the supervisor gives up on that child: it
reports ``on_give_up`` (the app marks the store ``down``) and returns, leaving the rest
of the daemon running.

This module must never catch ``BaseException``: ``trio.Cancelled`` and
``KeyboardInterrupt`` always propagate, so shutdown is never mistaken for a crash.
Keep supervision levels few: restart budgets multiply (systemd restarts the daemon,
this restarts a store actor, the store actor retries its mall calls itself).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import structlog
import trio

from goqd.errors import ChildReturned

log = structlog.get_logger("goqd.supervisor")

Restart = Literal["permanent", "transient", "temporary"]
Child = Callable[..., Awaitable[object]]
OnRestart = Callable[[str, Exception, int], None]
OnGiveUp = Callable[[str, Exception], None]


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """What OTP calls a child specification.

    ``intensity``/``period``: more than ``intensity`` restarts within ``period``
    seconds and the supervisor gives up (``intensity=0`` gives up on the first
    failure). ``backoff_initial`` doubles on each restart inside the current period,
    capped at ``backoff_max``; the actual wait is drawn uniformly from
    ``[delay/2, delay]`` so that many children failing together do not restart in
    lockstep.
    """

    name: str
    restart: Restart = "permanent"
    intensity: int = 5
    period: float = 60.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0

    def __post_init__(self) -> None:
        if self.restart not in ("permanent", "transient", "temporary"):
            raise ValueError(f"unknown restart type {self.restart!r}")
        if self.intensity < 0 or self.period <= 0:
            raise ValueError("intensity must be >= 0 and period > 0")
        if self.backoff_initial < 0 or self.backoff_max < self.backoff_initial:
            raise ValueError("need 0 <= backoff_initial <= backoff_max")


def _unwrap(exc: Exception) -> Exception:
    """The one real error inside (nested) single-member exception groups."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def backoff_delay(spec: ChildSpec, restarts_in_period: int, rng: random.Random) -> float:
    """The wait before restart number ``restarts_in_period`` (1-based) of this period."""
    base = min(spec.backoff_max, spec.backoff_initial * 2.0 ** max(0, restarts_in_period - 1))
    return rng.uniform(base / 2, base)


async def supervise(
    spec: ChildSpec,
    child: Child,
    *,
    on_restart: OnRestart | None = None,
    on_give_up: OnGiveUp | None = None,
    rng: random.Random | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``child`` under ``spec``'s restart policy until it is done or given up on.

    ``child`` is started as ``await nursery.start(child)`` in a nursery of its own, so
    it must accept ``task_status`` and call ``task_status.started()`` when its setup
    is done (use ``functools.partial`` for other arguments).

    Readiness: ``task_status.started()`` is reported as soon as the *first* start
    attempt has finished, whether the child reached ``started()`` or its setup raised.
    A store whose setup fails must not hold back the daemon's ``READY=1``; the failure
    is reported through ``on_restart`` / ``on_give_up`` and the logs, and retried
    here. (A child whose setup hangs without raising does hold it back: that is a bug
    in the child, and systemd's start timeout reports it.)

    Resource handling: owns one inner nursery per run of the child; borrows nothing.

    Error handling: catches ``Exception`` (and exception groups made only of
    ``Exception``) from the child, never ``BaseException``. Each restart calls
    ``on_restart(name, error, n)`` where ``n`` counts restarts within the current
    period, logs ``child_restarted`` and sleeps the backoff. When the restart budget
    is spent, or a ``temporary`` child fails, it calls ``on_give_up(name, error)``,
    logs ``child_gave_up`` and returns. A clean return of a ``transient`` or
    ``temporary`` child returns quietly. Exceptions raised by the callbacks propagate
    (they are the app's bugs, not the child's). Cancellation propagates unchanged.
    """
    rng = rng if rng is not None else random.Random()
    restarts: deque[float] = deque()
    reported = False

    def report_started() -> None:
        nonlocal reported
        if not reported:
            reported = True
            task_status.started()

    while True:
        error: Exception
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(child)
                report_started()
        except Exception as exc:
            error = _unwrap(exc)
        else:
            if spec.restart != "permanent":
                log.info("child_exited", child=spec.name)
                return
            error = ChildReturned(spec.name)
        report_started()
        # A child that raised while we were being cancelled is not a crash:
        # let the cancellation win instead of counting a restart.
        await trio.lowlevel.checkpoint_if_cancelled()

        if spec.restart == "temporary":
            _give_up(spec, error, on_give_up)
            return

        now = trio.current_time()
        restarts.append(now)
        while restarts and restarts[0] <= now - spec.period:
            restarts.popleft()
        if len(restarts) > spec.intensity:
            _give_up(spec, error, on_give_up)
            return

        delay = backoff_delay(spec, len(restarts), rng)
        log.warning(
            "child_restarted",
            child=spec.name,
            error=f"{type(error).__name__}: {error}",
            restarts=len(restarts),
            backoff_seconds=round(delay, 3),
        )
        if on_restart is not None:
            on_restart(spec.name, error, len(restarts))
        await trio.sleep(delay)


def _give_up(spec: ChildSpec, error: Exception, on_give_up: OnGiveUp | None) -> None:
    log.error(
        "child_gave_up",
        child=spec.name,
        error=f"{type(error).__name__}: {error}",
        restart=spec.restart,
        intensity=spec.intensity,
        period_seconds=spec.period,
    )
    if on_give_up is not None:
        on_give_up(spec.name, error)
