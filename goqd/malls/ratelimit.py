"""Token buckets that keep each mall API under its documented rate, across restarts too.

Time comes from ``trio.current_time()`` so a ``MockClock`` drives it in tests and in
the simulation. A bucket is owned by one store (every adapter instance of the store
shares it, see ``shared_bucket``); calls wait in FIFO order through a ``trio.Lock``
(trio locks are fair).

A mall counts a call when the call *arrives*, which goqd cannot see; it only knows that
the call arrived after it was sent and before its answer came back. ``TokenBucket.slot``
therefore holds a token while the call is out and counts it as spent when the answer
arrives: the next call leaves a full token's time after the latest moment the mall can
have counted the previous one, however the network delayed either of them.

A new process must not spend what the killed one already spent: a store's ``Limiters``
hand every bucket's state (its level, the wall time of that level, the calls still out,
a "blocked until" the mall asked for) to a ``save`` function every time it changes,
before the call goes out and when it is answered, and restore it when the bucket is made
again. Wall time, because trio's clock starts again with the process. This module never
does I/O itself: ``goqd.stores.state`` keeps the records.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

import msgspec
import trio

from goqd.wallclock import WallClock

# The longest a persisted "blocked until" may hold a bucket after a restart. A wall clock
# set back, or a record written under a wrong clock, must not park a store for good;
# no mall's documented throttle is longer (``goqd.malls.base.RETRY_AFTER_CAP_S``).
MAX_BLOCK_S = 600.0


class BucketState(msgspec.Struct, frozen=True, kw_only=True):
    """A bucket as it was at wall time ``at``: what a restarted process starts from."""

    level: float  # tokens saved up at ``at`` (calls still out not subtracted)
    at: float  # wall clock, epoch seconds
    out: float = 0.0  # calls sent and not yet answered at ``at``
    blocked_until: float = 0.0  # wall clock; the mall asked for no call before then


class Limiter(Protocol):
    """A bucket ``Limiters`` can save and restore (a ``SavedLevel``: ``TokenBucket``,
    Shopify's cost bucket).

    ``on_change`` is called after every change, before the call that made it goes out.
    """

    on_change: Callable[[], None] | None

    def state(self, now: float, wall: float) -> BucketState: ...

    def restore(self, saved: BucketState, now: float, wall: float) -> None: ...

    def block_until(self, blocked_until: float, now: float, wall: float) -> None: ...

    def start_empty(self, now: float) -> None: ...


L = TypeVar("L", bound=Limiter)


def saved_state(
    level: float, stamp: float | None, blocked_until: float, now: float, wall: float, out: float
) -> BucketState:
    """A bucket's record: ``level`` at trio time ``stamp`` (None: now) and a trio-time
    ``blocked_until``, in wall time (``now`` and ``wall`` are the same instant)."""
    at = wall + ((now if stamp is None else stamp) - now)
    blocked = wall + (blocked_until - now) if blocked_until > now else 0.0
    return BucketState(level=level, at=at, out=out, blocked_until=blocked)


def restored_level(saved: BucketState, wall: float, rate: float, size: float) -> float:
    """What ``saved`` has refilled to by ``wall`` (within ``[0, size]``). A record from the
    future (the wall clock was set back) refills nothing; an unreadable level is empty."""
    elapsed = max(0.0, wall - saved.at) if math.isfinite(saved.at) else 0.0
    level = saved.level if math.isfinite(saved.level) else 0.0
    return max(0.0, min(size, level + elapsed * rate))


def held_until(current: float, blocked_until: float, now: float, wall: float) -> float:
    """A trio-time "no call before" that also honours a persisted one (``blocked_until``,
    wall time), at most ``MAX_BLOCK_S`` on."""
    left = blocked_until - wall
    if math.isfinite(left) and left > 0:
        return max(current, now + min(left, MAX_BLOCK_S))
    return current


class SavedLevel:
    """What every bucket ``Limiters`` keeps shares: ``level`` units saved up (at most
    ``size``, refilling at ``rate`` per second) as of trio time ``_stamp``, and a trio-time
    "no call before" the mall asked for; saved as a ``BucketState`` and restored from one.
    ``TokenBucket`` counts calls, Shopify's cost bucket query-cost points."""

    def __init__(self, rate: float, size: float) -> None:
        self.rate = rate
        self.size = size
        self.level = size
        self._stamp: float | None = None
        self._blocked_until = 0.0
        # Called whenever the state changes (see ``Limiters``).
        self.on_change: Callable[[], None] | None = None

    def _saved(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _in_flight(self) -> float:
        """Units taken by calls still out that ``level`` does not yet lack."""
        return 0.0

    def _refill(self, now: float) -> None:
        if self._stamp is None:
            self._stamp = now
        if now <= self._stamp:
            return  # blocked (the stamp was moved ahead): nothing accrues yet
        self.level = min(self.size, self.level + (now - self._stamp) * self.rate)
        self._stamp = now

    async def _refilled(self) -> float:
        """Wait out a "no call before", then refill to now; returns now (trio time)."""
        while True:
            now = trio.current_time()
            if now >= self._blocked_until:
                self._refill(now)
                return now
            # A later throttle may move the deadline while this sleeps: look again.
            await trio.sleep_until(self._blocked_until)

    def state(self, now: float, wall: float) -> BucketState:
        """This bucket in wall time; ``now`` (trio) and ``wall`` are the same instant."""
        return saved_state(
            self.level, self._stamp, self._blocked_until, now, wall, self._in_flight()
        )

    def restore(self, saved: BucketState, now: float, wall: float) -> None:
        """Start where a previous process left off (``saved`` is its last record).

        Calls that were still out when it stopped count as spent now: the mall may have
        counted them at any time up to the moment the process died. A record from the
        future (the wall clock was set back) refills nothing.
        """
        out = max(0.0, saved.out) if math.isfinite(saved.out) else self.size
        self.level = max(0.0, restored_level(saved, wall, self.rate, self.size) - out)
        self._stamp = now
        self.block_until(saved.blocked_until, now, wall)

    def block_until(self, blocked_until: float, now: float, wall: float) -> None:
        """Honour a persisted "no call before" (wall time), at most ``MAX_BLOCK_S`` on."""
        self._blocked_until = held_until(self._blocked_until, blocked_until, now, wall)

    def start_empty(self, now: float) -> None:
        """Assume the mall has just counted a full bucket (nothing better is known)."""
        self.level = 0.0
        self._stamp = now


class _Held:
    """A token ``TokenBucket.slot`` holds for the call made inside it."""

    def __init__(self, bucket: TokenBucket) -> None:
        self.bucket = bucket
        self.out = True


# The slot the current task is inside, for ``take_again``.
_HELD: ContextVar[_Held | None] = ContextVar("goqd_held_slot", default=None)


async def take_again() -> None:
    """The call inside the current task's ``slot`` goes out once more (the transport
    resends a read whose pooled connection failed under it): a second request at the mall
    whenever the first reached it, which goqd cannot tell from one the mall never read.
    The first attempt is over, so its token is spent now; the resend waits for one of its
    own, which the slot spends when it ends.

    Outside a ``slot`` (Shopify's cost bucket), nothing: the throttle status of the
    resend's answer shows whatever the shop counted, and ``CostBucket.settle`` takes it.
    """
    held = _HELD.get()
    if held is None:
        return
    if held.out:
        held.out = False
        held.bucket._spend()
    await held.bucket._take(save=True)
    held.out = True


class TokenBucket(SavedLevel):
    """``rate`` tokens per second, at most ``burst`` (its ``size``) saved up; starts full.

    ``restore`` (a restarted process) and ``start_empty`` (nothing trustworthy known)
    change where it starts.
    """

    def __init__(self, rate: float, burst: float) -> None:
        if not (rate > 0 and math.isfinite(rate)) or not (burst >= 1 and math.isfinite(burst)):
            raise ValueError("rate must be > 0 and burst >= 1")
        super().__init__(rate, burst)
        self._out = 0
        self._lock = trio.Lock()
        self._answered = trio.Event()

    def _in_flight(self) -> float:
        return self._out

    async def acquire(self) -> None:
        """Wait for one token and spend it now (the call goes out at once)."""
        await self._take(save=False)
        self._spend()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a token; the call made inside the block spends it when it ends.

        The block ends when the mall's answer has arrived (or the call failed, or was
        cancelled): the latest time the mall can have counted it. Until then the token
        is taken from what other callers may use, so calls running side by side never
        overdraw the bucket either.
        """
        await self._take(save=True)
        held = _Held(self)
        reset = _HELD.set(held)
        try:
            yield
        finally:
            _HELD.reset(reset)
            if held.out:  # not when ``take_again`` was cancelled waiting
                self._spend()

    async def _take(self, *, save: bool) -> None:
        async with self._lock:
            while True:
                await self._refilled()
                free = self.level - self._out
                # Float rounding can leave 0.9999999999999998 tokens; asking for a sleep
                # of 1e-17 s would never move a MockClock. Forgive that much.
                if free >= 1 - 1e-9:
                    self._out += 1
                    if save:
                        self._saved()
                    return
                # Refill alone cannot help while the calls out hold a full bucket: their
                # answers can, so wake on whichever comes first.
                wait = (1 - free) / self.rate
                with trio.move_on_after(wait):
                    await self._answered.wait()

    def _spend(self) -> None:
        self._refill(trio.current_time())
        self._out -= 1
        self.level = max(0.0, self.level - 1)
        self._answered.set()
        self._answered = trio.Event()
        self._saved()

    def block_for(self, seconds: float) -> None:
        """The mall said to back off (Retry-After): no token before then, and none saved."""
        now = trio.current_time()
        self._blocked_until = max(self._blocked_until, now + seconds)
        self.level = 0
        self._stamp = self._blocked_until
        self._saved()


class Limiters(dict[str, Any]):
    """A store's rate buckets by API name, each restored from and saved to its records.

    ``saved`` are the records a previous process left (by bucket name); ``trusted`` says
    whether they can be believed to be complete, that is, whether every call that
    process made is in them. When not (a torn record, a reboot since), every bucket
    starts empty instead: the slowest start, and the only safe one. A bucket with no
    record in a trusted set was never used and starts full. ``save(name, state)`` is
    called on every change and must be quick (the store keeps it in a local file).

    A dict, so ``StoreContext.rate_buckets`` stays what it always was for adapters and
    tests that pass a plain one.
    """

    def __init__(
        self,
        *,
        clock: WallClock,
        saved: Mapping[str, BucketState] | None = None,
        trusted: bool = True,
        save: Callable[[str, BucketState], None] | None = None,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.saved = dict(saved or {})
        self.trusted = trusted
        self._save = save

    def attach(self, name: str, bucket: Limiter) -> None:
        """Start ``bucket`` from its record and save it from now on."""
        now, wall = trio.current_time(), self.clock()
        record = self.saved.pop(name, None)
        if not self.trusted:
            bucket.start_empty(now)
            if record is not None:
                # A later record may be missing, but a Retry-After it carried holds.
                bucket.block_until(record.blocked_until, now, wall)
        elif record is not None:
            bucket.restore(record, now, wall)
        save = self._save
        if save is not None:

            def saved() -> None:
                save(name, bucket.state(trio.current_time(), self.clock()))

            bucket.on_change = saved
        self[name] = bucket


def shared_bucket(
    registry: dict[str, TokenBucket], name: str, rate: float, burst: float
) -> TokenBucket:
    """The store's bucket for one mall API, shared by every adapter instance of that store.

    A store's budget at the mall is the mall's, not an adapter's: the key test of
    ``goqctl key set`` and the session restarted after it must not each start with a full
    bucket (Rakuten answered 429 right after every renewal until they shared one). With
    ``Limiters`` the budget outlives the process as well.
    """
    return shared_limiter(registry, name, lambda: TokenBucket(rate, burst))


def shared_limiter(registry: dict[str, Any], name: str, make: Callable[[], L]) -> L:
    """``shared_bucket`` for any ``Limiter``: the store's one, made by ``make`` once."""
    bucket: L | None = registry.get(name)
    if bucket is None:
        bucket = make()
        if isinstance(registry, Limiters):
            registry.attach(name, bucket)
        else:
            registry[name] = bucket
    return bucket
