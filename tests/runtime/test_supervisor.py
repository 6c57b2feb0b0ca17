"""supervise(): OTP one_for_one restarts, backoff, intensity/period, cancellation."""

from __future__ import annotations

import functools
import random

import pytest
import structlog
import trio
import trio.testing

from goqd.errors import ChildReturned
from goqd.supervisor import ChildSpec, backoff_delay, supervise


class Boom(Exception):
    pass


class Recorder:
    """A child that records when it starts and fails or returns as told."""

    def __init__(self, *, fail_setup: int = 0, run_for: float = 0.0, crash: bool = True) -> None:
        self.starts: list[float] = []
        self.fail_setup = fail_setup
        self.run_for = run_for
        self.crash = crash

    async def __call__(self, *, task_status: trio.TaskStatus[None]) -> None:
        self.starts.append(trio.current_time())
        if len(self.starts) <= self.fail_setup:
            raise Boom(f"setup failed #{len(self.starts)}")
        task_status.started()
        await trio.sleep(self.run_for)
        if self.crash:
            raise Boom(f"crash #{len(self.starts)}")


async def test_crashed_child_is_restarted_after_growing_jittered_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    spec = ChildSpec("A", intensity=10, period=1000.0, backoff_initial=1.0, backoff_max=8.0)
    child = Recorder(run_for=0.0)
    restarts: list[tuple[str, str, int]] = []
    with trio.move_on_after(100):
        await supervise(
            spec,
            child,
            rng=random.Random(7),
            on_restart=lambda name, exc, n: restarts.append((name, str(exc), n)),
        )
    gaps = [b - a for a, b in zip(child.starts, child.starts[1:], strict=False)]
    # n-th restart waits within [base/2, base], base = 1, 2, 4, 8, 8, ... (capped).
    for i, gap in enumerate(gaps[:6], start=1):
        base = min(8.0, 2.0 ** (i - 1))
        assert base / 2 <= gap <= base, (i, gap)
    # Same seed, same schedule: the jitter is deterministic.
    rng = random.Random(7)
    assert gaps[:3] == pytest.approx([backoff_delay(spec, n, rng) for n in (1, 2, 3)])
    assert restarts[0] == ("A", "crash #1", 1)
    assert restarts[2][2] == 3


async def test_gives_up_when_intensity_exceeded_within_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    spec = ChildSpec("A", intensity=3, period=60.0, backoff_initial=1.0, backoff_max=4.0)
    child = Recorder()
    gave_up: list[tuple[str, str]] = []
    with structlog.testing.capture_logs() as logs, trio.fail_after(1000):
        await supervise(spec, child, on_give_up=lambda name, exc: gave_up.append((name, str(exc))))
    # 1 start + 3 restarts allowed; the 4th failure within 60 s gives up.
    assert len(child.starts) == 4
    assert gave_up == [("A", "crash #4")]
    assert [e["event"] for e in logs].count("child_restarted") == 3
    assert logs[-1]["event"] == "child_gave_up" and logs[-1]["child"] == "A"
    assert logs[-1]["log_level"] == "error"


async def test_does_not_give_up_when_restarts_are_spread_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Crashes every ~30 s: never more than 2 restarts inside any 60 s window.
    spec = ChildSpec("A", intensity=2, period=60.0, backoff_initial=1.0, backoff_max=1.0)
    child = Recorder(run_for=30.0)
    gave_up: list[str] = []
    with trio.move_on_after(600):
        await supervise(spec, child, on_give_up=lambda name, exc: gave_up.append(name))
    assert gave_up == []
    assert len(child.starts) >= 15


async def test_same_crash_rate_packed_together_gives_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Control for the test above: same spec, crashes every ~1 s instead of 30 s.
    spec = ChildSpec("A", intensity=2, period=60.0, backoff_initial=1.0, backoff_max=1.0)
    child = Recorder(run_for=0.0)
    gave_up: list[str] = []
    with trio.move_on_after(600):
        await supervise(spec, child, on_give_up=lambda name, exc: gave_up.append(name))
    assert gave_up == ["A"]
    assert len(child.starts) == 3


async def test_cancellation_propagates_and_is_not_counted_as_a_crash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    child = Recorder(run_for=float("inf"))
    restarts: list[str] = []
    gave_up: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                supervise,
                ChildSpec("A"),
                child,
                on_restart=lambda n, e, c: restarts.append(n),
                on_give_up=lambda n, e: gave_up.append(n),
            )
        )
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert nursery.cancel_scope.cancelled_caught
    assert restarts == [] and gave_up == []
    assert len(child.starts) == 1


async def test_cancellation_during_backoff_propagates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    child = Recorder()
    with trio.CancelScope() as scope:
        scope.deadline = trio.current_time() + 0.1
        await supervise(ChildSpec("A", backoff_initial=10.0, backoff_max=10.0), child)
    assert scope.cancelled_caught
    assert len(child.starts) == 1


async def test_child_raising_while_cancelled_does_not_restart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts = 0
    restarts: list[str] = []

    async def child(*, task_status: trio.TaskStatus[None]) -> None:
        nonlocal starts
        starts += 1
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            raise Boom("cleanup failed")

    with trio.CancelScope() as scope:
        scope.deadline = trio.current_time() + 1
        await supervise(ChildSpec("A"), child, on_restart=lambda n, e, c: restarts.append(n))
    assert starts == 1 and restarts == []


async def test_keyboard_interrupt_is_not_caught(autojump_clock: trio.testing.MockClock) -> None:
    async def child(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        raise KeyboardInterrupt

    with pytest.raises(BaseExceptionGroup) as info:
        await supervise(ChildSpec("A"), child)
    assert info.group_contains(KeyboardInterrupt)


async def test_transient_child_that_returns_normally_is_not_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    child = Recorder(run_for=3.0, crash=False)
    with trio.fail_after(10):
        await supervise(ChildSpec("A", restart="transient"), child)
    assert len(child.starts) == 1


async def test_transient_child_that_crashes_is_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    child = Recorder(run_for=3.0, fail_setup=0)
    with trio.move_on_after(30):
        await supervise(ChildSpec("A", restart="transient"), child)
    assert len(child.starts) > 1


async def test_permanent_child_that_returns_is_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    child = Recorder(run_for=3.0, crash=False)
    errors: list[Exception] = []
    with trio.move_on_after(30):
        await supervise(ChildSpec("A"), child, on_restart=lambda n, e, c: errors.append(e))
    assert len(child.starts) > 1
    assert isinstance(errors[0], ChildReturned)


async def test_temporary_child_is_never_restarted_and_reports_give_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    child = Recorder(run_for=1.0)
    gave_up: list[str] = []
    with trio.fail_after(10):
        await supervise(
            ChildSpec("A", restart="temporary"),
            child,
            on_give_up=lambda n, e: gave_up.append(str(e)),
        )
    assert len(child.starts) == 1
    assert gave_up == ["crash #1"]


async def test_started_is_reported_at_once_even_when_first_setup_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    child = Recorder(fail_setup=2, run_for=float("inf"))
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(functools.partial(supervise, ChildSpec("A"), child))
        # READY must not wait for the backoff: started() came right after attempt 1.
        assert trio.current_time() == t0
        assert len(child.starts) == 1
        await trio.sleep(30)
        # Two setup failures, then a third attempt that stays up.
        assert len(child.starts) == 3
        nursery.cancel_scope.cancel()


async def test_started_waits_for_the_childs_own_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow_setup(*, task_status: trio.TaskStatus[None]) -> None:
        await trio.sleep(5)
        task_status.started()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(functools.partial(supervise, ChildSpec("A"), slow_setup))
        assert trio.current_time() - t0 == pytest.approx(5)
        nursery.cancel_scope.cancel()


async def test_give_up_on_first_failure_still_reports_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    child = Recorder(fail_setup=1)
    gave_up: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                supervise,
                ChildSpec("A", intensity=0),
                child,
                on_give_up=lambda n, e: gave_up.append(str(e)),
            )
        )
    assert gave_up == ["setup failed #1"]


def test_child_spec_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        ChildSpec("A", restart="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ChildSpec("A", period=0)
    with pytest.raises(ValueError):
        ChildSpec("A", backoff_initial=10, backoff_max=1)
