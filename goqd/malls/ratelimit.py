"""Token buckets that keep each mall API under its documented rate.

Time comes from ``trio.current_time()`` so a ``MockClock`` drives it in tests and in
the simulation. A bucket is owned by one adapter (one store's session); calls wait in
FIFO order through a ``trio.Lock`` (trio locks are fair).
"""

from __future__ import annotations

import trio


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full."""

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp: float | None = None
        self._lock = trio.Lock()
        self._blocked_until = 0.0

    def _refill(self, now: float) -> None:
        if self._stamp is None:
            self._stamp = now
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self) -> None:
        """Wait for one token."""
        async with self._lock:
            while True:
                now = trio.current_time()
                if now < self._blocked_until:
                    await trio.sleep_until(self._blocked_until)
                    continue
                self._refill(now)
                # Float rounding can leave 0.9999999999999998 tokens; asking for a sleep
                # of 1e-17 s would never move a MockClock. Forgive that much.
                if self._tokens >= 1 - 1e-9:
                    self._tokens = max(0.0, self._tokens - 1)
                    return
                await trio.sleep((1 - self._tokens) / self.rate)

    def block_for(self, seconds: float) -> None:
        """The mall said to back off (Retry-After): no token before then, and none saved."""
        now = trio.current_time()
        self._blocked_until = max(self._blocked_until, now + seconds)
        self._tokens = 0
        self._stamp = self._blocked_until


def shared_bucket(
    registry: dict[str, TokenBucket], name: str, rate: float, burst: float
) -> TokenBucket:
    """The store's bucket for one mall API, shared by every adapter instance of that store.

    A store's budget at the mall is the mall's, not an adapter's: the key test of
    ``goqctl key set`` and the session restarted after it must not each start with a full
    bucket (Rakuten answered 429 right after every renewal until they shared one).
    """
    bucket = registry.get(name)
    if bucket is None:
        bucket = registry[name] = TokenBucket(rate, burst)
    return bucket
