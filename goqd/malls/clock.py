"""Each mall's clock as goqd measures it, so that order windows follow the mall's time.

A mall stamps its orders with its own clock and filters its order search by it. goqd's
wall clock may disagree: the host's clock is wrong, the mall's is, or the two were never
set alike. Asked for "orders since 10:00" by goqd's clock while the mall's clock says
01:00, a mall returns nothing for nine hours, and the sale watch then took the units it
had held for those orders for counts that fell for no reason and put them back on sale.

``MallClock`` holds what a store's responses said about its mall's clock: every response
that carries an HTTP ``Date`` (``goqd.malls.transport`` reads it, for every request, in
one place) bounds the mall's clock minus goqd's to an interval ``[low, high)``: the
date is whole seconds and was written somewhere between the request leaving and the
answer arriving. Adapters ask it for an order window (``window``) and, after the fetch,
for the cursor to commit (``cursor_after``); the store actor reports the skew
(``skew``) and stops trusting its order feed while it is above the store's limit.

The rules a skew must never break: a cursor is never later than the mall's own time
when its search ran (a lower bound, so nothing between the two is skipped), and a cursor
later than the mall's clock shows now (the mall's clock went back, or the cursor was
written by a wrong clock) is not trusted: the window widens to the initial look-back.

Without any ``Date`` seen (a transport that sends none, as test doubles do) every
conversion is the identity: goqd's own clock. This module never sleeps, never does I/O and
never raises on a malformed date: one bad header is one sample fewer.
"""

from __future__ import annotations

import email.utils
import math
import statistics
from collections import deque
from dataclasses import dataclass
from datetime import UTC

# Samples kept per store: its newest responses (about a minute of them with the watch
# on). A jump of the mall's clock is followed within a poll, and one odd header (a
# cache's old response) does not move the reported skew on its own (the median).
_KEEP = 16
# The reported skew is the median of this many of the newest samples.
_MEDIAN_OF = 5
# A cursor up to this much later than the mall's time now (its upper bound) is still one
# this clock wrote (estimates of one instant differ by a second's truncation and the
# round trips); beyond it, it came from another clock.
_CURSOR_SLACK_S = 2.0


@dataclass(frozen=True, slots=True)
class ClockSample:
    """One response's ``Date``: the mall's clock minus goqd's was in ``[low, high)``."""

    sent: float  # goqd's wall time when the request went out
    received: float  # goqd's wall time when the response head arrived
    low: float
    high: float

    @property
    def mid(self) -> float:
        return (self.low + self.high) / 2


@dataclass(frozen=True, slots=True)
class Window:
    """An order window in the mall's time. ``reset``: the cursor could not be trusted
    (none, unreadable, or later than the mall's clock now) and ``start`` is the initial
    look-back instead."""

    start: float
    end: float
    reset: bool


def parse_http_date(value: str | None) -> float | None:
    """Epoch seconds of an RFC 9110 HTTP-date (``Sun, 06 Nov 1994 08:49:37 GMT``), or
    None for anything else. Dates without a zone are UTC, as the RFC says they are."""
    if not value or len(value) > 64:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        epoch = when.timestamp()
    except (OverflowError, ValueError, OSError):
        return None
    return epoch if math.isfinite(epoch) else None


class MallClock:
    """What one store's responses said about its mall's clock (see the module docstring).

    Owned by the store (``StoreHandle``), so it outlives sessions; fed by the store's
    HTTP transport; read by the adapter and the store actor, all on the trio thread.
    """

    def __init__(self) -> None:
        self._samples: deque[ClockSample] = deque(maxlen=_KEEP)

    # -- measuring -----------------------------------------------------------------------

    def observe(self, mall_time: float, *, sent: float, received: float) -> None:
        """A response dated ``mall_time`` (whole seconds, as ``Date`` has them) to a
        request sent at ``sent`` and answered at ``received`` (goqd's wall clock)."""
        if not (math.isfinite(mall_time) and math.isfinite(sent) and math.isfinite(received)):
            return
        if received < sent:
            return  # goqd's own clock stepped back during the request: no bound holds
        self._samples.append(
            ClockSample(sent, received, mall_time - received, mall_time + 1.0 - sent)
        )

    def observe_date(self, value: str | None, *, sent: float, received: float) -> None:
        """``observe`` a ``Date`` header's value; anything unreadable is ignored."""
        mall_time = parse_http_date(value)
        if mall_time is not None:
            self.observe(mall_time, sent=sent, received=received)

    # -- reading -------------------------------------------------------------------------

    @property
    def known(self) -> bool:
        return bool(self._samples)

    def samples(self) -> tuple[ClockSample, ...]:
        return tuple(self._samples)

    def skew(self) -> float | None:
        """The mall's clock minus goqd's, in seconds (None until a response had a date)."""
        if not self._samples:
            return None
        recent = list(self._samples)[-_MEDIAN_OF:]
        return float(statistics.median(s.mid for s in recent))

    def latest_offset(self) -> float | None:
        """The mall's clock minus goqd's by the newest response alone (None before any):
        what a refusal just received says, before the median of ``skew`` follows."""
        return self._samples[-1].mid if self._samples else None

    def _bounds(self) -> tuple[float, float]:
        """The offset interval of the newest samples that agree with each other: each
        truncates its date at a different fraction of a second, so together they pin the
        offset closer than one can. An older sample that disagrees (the clock jumped) and
        everything before it is left out."""
        if not self._samples:
            return 0.0, 0.0
        low, high = -math.inf, math.inf
        for sample in reversed(self._samples):
            if max(low, sample.low) >= min(high, sample.high):
                break
            low, high = max(low, sample.low), min(high, sample.high)
        return low, high

    def to_mall(self, wall: float) -> float:
        """The mall's best-estimate time at goqd's wall time ``wall`` (for signatures)."""
        low, high = self._bounds()
        return wall + (low + high) / 2

    def floor(self, wall: float) -> float:
        """A time the mall's clock had certainly reached at goqd's wall time ``wall``."""
        return wall + self._bounds()[0]

    def ceil(self, wall: float) -> float:
        """A time the mall's clock had certainly not passed at goqd's wall time ``wall``."""
        return wall + self._bounds()[1]

    def floor_since(self, wall: float) -> float:
        """``floor(wall)``, but by the least offset any one sample showed from just before
        ``wall`` on: if the mall's clock jumped back meanwhile, the bound follows it."""
        if not self._samples:
            return wall
        lows = [s.low for s in self._samples if s.sent >= wall]
        before = [s for s in self._samples if s.sent < wall]
        if before:
            lows.append(before[-1].low)
        return min(wall + min(lows), self.floor(wall))

    def to_wall_floor(self, mall_time: float) -> float:
        """A goqd wall time no later than the moment the mall's clock showed ``mall_time``."""
        return mall_time - self._bounds()[1]

    def doubt(self) -> float:
        """How far apart the offset bounds of the kept samples are (a second and a round
        trip when the clock is steady, the jump when it was not): what a window's start
        is widened by."""
        if not self._samples:
            return 0.0
        lows = [s.low for s in self._samples]
        highs = [s.high for s in self._samples]
        return max(highs) - min(lows)

    # -- order windows -------------------------------------------------------------------

    def window(
        self,
        wall: float,
        cursor: float | None,
        *,
        overlap: float,
        initial_lookback: float,
        lag: float = 0.0,
    ) -> Window:
        """The order window for a fetch that begins at goqd's wall time ``wall``.

        ``end`` is the mall's time now, by the upper bound (a search that reaches a
        second past the mall's now costs nothing; one that stops short defers the newest
        orders to the next poll), less ``lag`` (a feed that shows orders late). ``start``
        is ``cursor - overlap``, widened by ``doubt()``; with no usable cursor, or one
        later than the mall's clock now, it is ``end - initial_lookback`` and ``reset``
        is set. ``start`` is never after ``end``.
        """
        now = self.ceil(wall)
        end = now - lag
        usable = cursor is not None and math.isfinite(cursor)
        if not usable or cursor is None or cursor > now + _CURSOR_SLACK_S + self.doubt():
            return Window(start=end - initial_lookback, end=end, reset=True)
        return Window(start=min(cursor - overlap - self.doubt(), end), end=end, reset=False)

    def cursor_after(self, wall: float, end: float, *, lag: float = 0.0) -> float:
        """The cursor to commit for a fetch that began at ``wall`` and searched up to
        ``end``: never later than the mall's time when its search ran (less ``lag``)."""
        return min(end, self.floor_since(wall) - lag)


def describe_skew(seconds: float) -> str:
    """``"9h00m03s ahead of"`` / ``"4m10s behind"`` / ``"12s ahead of"`` goqd's clock."""
    whole = round(abs(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        text = f"{hours}h{minutes:02d}m{secs:02d}s"
    elif minutes:
        text = f"{minutes}m{secs:02d}s"
    else:
        text = f"{secs}s"
    return f"{text} {'ahead of' if seconds >= 0 else 'behind'}"
