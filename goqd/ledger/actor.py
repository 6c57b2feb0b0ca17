"""The ledger actor: the only writer of the SQLite file.

Why a worker thread and not aiosqlite: aiosqlite was the first choice, but it
awaits asyncio futures and fails under ``trio.run``. The same idea, one connection on
one worker thread, is done here with trio's own ``trio.to_thread.run_sync`` and a
``CapacityLimiter(1)``: one thread hop per *batch*, never per line, because a hop costs
about as much as a durable commit.

Group commit: the actor takes one request, drains everything else already waiting (up
to ``max_batch``), applies them all in one transaction, commits, then answers every
caller and wakes every store whose outbox changed. Nobody is answered before the
commit is durable: an answer is a promise that survives a crash.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import structlog
import trio

from goqd import messages as m
from goqd.errors import GoqdError, LedgerError, LedgerUnavailable
from goqd.ledger.db import Ledger
from goqd.ledger.schema import Synchronous, open_db
from goqd.wallclock import WallClock

log = structlog.get_logger("goqd.ledger")

MAX_BATCH = 1000
R = TypeVar("R", bound=m.LedgerReply)


class _Call:
    """One request in the inbox and the slot its answer goes into."""

    __slots__ = ("done", "msg", "reply")

    def __init__(self, msg: m.LedgerRequest) -> None:
        self.msg = msg
        self.done = trio.Event()
        self.reply: m.LedgerReply | GoqdError | None = None


class Wakeups:
    """One level-triggered flag per store: "your outbox has something new".

    The ledger sets it after a commit; the store's push loop waits on it. A flag set
    while the push loop is busy is kept, so no notification is lost.
    """

    def __init__(self) -> None:
        self._events: dict[str, trio.Event] = {}

    def notify(self, store: str) -> None:
        self._events.setdefault(store, trio.Event()).set()

    async def wait(self, store: str) -> None:
        """Wait for a notification (bound it with ``trio.move_on_after``) and consume it."""
        event = self._events.setdefault(store, trio.Event())
        try:
            await event.wait()
        finally:
            if event.is_set() and self._events.get(store) is event:
                self._events[store] = trio.Event()


class LedgerMetrics(Protocol):
    """The part of ``goqd.metrics.Metrics`` the ledger updates."""

    def observe_ledger_batch(self, size: int, seconds: float, oversold: int) -> None: ...


class LedgerClient:
    """How every other actor talks to the ledger. Cheap to share."""

    def __init__(self, send: trio.MemorySendChannel[_Call], wakeups: Wakeups) -> None:
        self._send = send
        self.wakeups = wakeups

    async def call(self, msg: m.LedgerRequest) -> m.LedgerReply:
        """Send ``msg`` and wait for the committed answer; a refusal is raised."""
        call = _Call(msg)
        await self._send.send(call)
        # If we are cancelled here the ledger still applies the request: every request
        # is idempotent (bookings by line identity, operator requests by request id).
        await call.done.wait()
        if isinstance(call.reply, GoqdError):
            raise call.reply
        assert call.reply is not None
        return call.reply

    async def ask(self, msg: m.LedgerRequest, reply_type: type[R]) -> R:
        reply = await self.call(msg)
        if not isinstance(reply, reply_type):
            raise LedgerError(
                f"ledger answered {type(reply).__name__} to {type(msg).__name__}, "
                f"expected {reply_type.__name__}"
            )
        return reply

    def statistics(self) -> Any:
        return self._send.statistics()


async def run_ledger(
    path: str,
    inbox: trio.MemoryReceiveChannel[_Call],
    wakeups: Wakeups,
    *,
    synchronous: Synchronous = "full",
    now: WallClock = time.time,
    metrics: LedgerMetrics | None = None,
    max_batch: int = MAX_BATCH,
    check: bool = True,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Own the ledger file and answer every request until the inbox closes.

    Resource handling: opens the SQLite connection (on the worker thread) before
    ``started()``, so a corrupt or too-new file fails ``nursery.start``; closes the
    connection on exit. Borrows ``inbox`` (the caller closes the send side) and calls
    ``wakeups.notify`` after each commit.

    Error handling: a request the ledger refuses (a ``GoqdError``) is answered with that
    error and costs nobody else anything. So is a request whose handling raises anything
    else (an int SQLite cannot store, a bug): it is rolled back alone, its caller gets a
    ``LedgerError`` naming the request type, it is logged once as
    ``ledger_request_failed`` with its traceback, and the rest of its batch commits. A
    database error during a batch (disk full, I/O error) rolls the whole batch back and
    answers every caller in it with a ``LedgerUnavailable``: nothing is acknowledged that is
    not durable, callers retry. No request ends the ledger: only the inbox closing or
    cancellation does.
    """
    limiter = trio.CapacityLimiter(1)
    conn = await trio.to_thread.run_sync(
        lambda: open_db(path, synchronous=synchronous, check=check), limiter=limiter
    )
    ledger = Ledger(conn, now=now)
    log.info("ledger_opened", path=path, synchronous=synchronous)
    task_status.started()
    try:
        async with inbox:
            async for first in inbox:
                calls = [first]
                while len(calls) < max_batch:
                    try:
                        calls.append(inbox.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await _apply(ledger, calls, limiter, wakeups, metrics)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(conn.close, limiter=limiter)


async def _apply(
    ledger: Ledger,
    calls: list[_Call],
    limiter: trio.CapacityLimiter,
    wakeups: Wakeups,
    metrics: LedgerMetrics | None,
) -> None:
    started = time.perf_counter()
    try:
        # Shielded: once the batch is on the thread, its callers must hear the outcome.
        with trio.CancelScope(shield=True):
            result = await trio.to_thread.run_sync(
                ledger.apply_batch, [c.msg for c in calls], limiter=limiter
            )
    except sqlite3.Error as exc:
        log.error("ledger_batch_failed", error=str(exc), requests=len(calls))
        _fail_all(
            calls, LedgerUnavailable(f"the ledger could not commit: {exc}; nothing was applied")
        )
        return
    # Broad on purpose: the ledger serves every actor, so whatever a batch raises is
    # answered and logged here and the ledger goes on with the next batch.
    except Exception:
        log.exception(
            "ledger_batch_failed",
            requests=len(calls),
            request_types=sorted({type(c.msg).__name__ for c in calls}),
        )
        _fail_all(
            calls,
            LedgerUnavailable(
                "the ledger could not apply this batch (an internal error, logged as "
                "ledger_batch_failed); nothing was applied"
            ),
        )
        return
    for index, failure in result.failures:
        log.error(
            "ledger_request_failed", request=type(calls[index].msg).__name__, exc_info=failure
        )
    for call, reply in zip(calls, result.replies, strict=True):
        call.reply = reply
        call.done.set()
    for store in result.woken:
        wakeups.notify(store)
    if metrics is not None:
        metrics.observe_ledger_batch(len(calls), time.perf_counter() - started, result.oversold)


def _fail_all(calls: list[_Call], failure: LedgerUnavailable) -> None:
    for call in calls:
        call.reply = failure
        call.done.set()


@asynccontextmanager
async def open_ledger(
    path: str,
    *,
    synchronous: Synchronous = "full",
    now: WallClock = time.time,
    metrics: LedgerMetrics | None = None,
    check: bool = True,
) -> AsyncIterator[LedgerClient]:
    """Run a ledger actor for the duration of the block (tests, benchmarks, tools)."""
    send, receive = trio.open_memory_channel[_Call](0)
    wakeups = Wakeups()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            _run_ledger_kw, path, receive, wakeups, synchronous, now, metrics, check
        )
        async with send:
            yield LedgerClient(send, wakeups)


async def _run_ledger_kw(
    path: str,
    receive: trio.MemoryReceiveChannel[_Call],
    wakeups: Wakeups,
    synchronous: Synchronous,
    now: WallClock,
    metrics: LedgerMetrics | None,
    check: bool,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    await run_ledger(
        path,
        receive,
        wakeups,
        synchronous=synchronous,
        now=now,
        metrics=metrics,
        check=check,
        task_status=task_status,
    )


def open_ledger_channel() -> tuple[LedgerClient, trio.MemoryReceiveChannel[_Call]]:
    """The channel pair the app wires: a client for everyone, the inbox for the actor."""
    send, receive = trio.open_memory_channel[_Call](0)
    return LedgerClient(send, Wakeups()), receive
