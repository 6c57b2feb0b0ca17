"""The store actor: one per store, owning that store's mall session.

Two loops share one state machine (docs/design.md §2 items 4–5, §3):

* **poll**: fetch every order line since the cursor, hand them to the ledger with the
  new cursor, and move on only when the ledger has committed both;
* **push**: wake when the ledger says this store's outbox changed (or on a timer for
  retries), take up to the mall's batch limit, call the mall, report what it accepted;
* **watch** (the sale watch, docs/design.md §4): every ``watch-interval``, read the mall's own
  counters of the store's recently sold and low-stock listings and hand them to the
  ledger, which holds back units a counter lost to a sale the order API does not show
  yet. A reading that overlapped a push of the same listing is dropped (it may predate
  the push).

States: ``running``; ``degraded`` (a level-8 error: timeouts, 5xx, throttling,
maintenance, malformed responses, a mall clock further from goqd's than the store's
``clock-skew-limit`` — keep retrying with backoff, recover by itself);
``stopped`` (level 9: the credential is expired or rejected — no polling, no pushing
until ``goqctl key set`` or ``goqctl errors clear``); ``paused`` (the operator said
so). ``down`` is set by the supervisor when it gives up on the actor. Transitions are
logged once; the per-attempt details go to metrics.

This module never imports httpx exceptions or a mall module: it speaks to the mall only
through ``goqd.malls.base.MallAdapter``.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import httpx
import msgspec
import structlog
import trio

from goqd import expiry
from goqd import messages as m
from goqd.config import StoreConfig
from goqd.crashpoints import crashpoint
from goqd.errors import (
    LEVEL_CREDENTIAL,
    LEVEL_TEMPORARY,
    LedgerError,
    MallAuthError,
    MallError,
    MallProtocolError,
    MallRateLimited,
    MallUnavailable,
    recorded_codes,
)
from goqd.ledger import LedgerClient
from goqd.malls.adapterstate import AdapterState, MemoryState
from goqd.malls.base import (
    CredentialSaver,
    MallAdapter,
    MallSpec,
    StoreContext,
    guard_adapter,
    tls_context,
)
from goqd.malls.clock import MallClock, describe_skew
from goqd.malls.transport import mall_transport, open_mall_client
from goqd.secret import Secret
from goqd.stores.credentials import CredentialKeeper
from goqd.stores.state import open_store_state
from goqd.wallclock import WallClock

if TYPE_CHECKING:
    from goqd.metrics import Metrics

log = structlog.get_logger("goqd.store")

State = Literal["running", "degraded", "stopped", "paused", "down"]

BACKOFF_INITIAL = 2.0
# After a push failed ambiguously (timeout, 5xx), its listings are pushed once more after
# this many request timeouts: by then a late write of the old request has landed.
REASSERT_AFTER = 2.0
BACKOFF_MAX = 300.0
# A hold is released as unexplained only if the poll that should have booked its sale
# began at least this long after the watch saw the counter fall.
EXPLAIN_MARGIN_S = 5.0
# The credential-expiry question (an API call at some malls that can wait) comes only
# after EXPIRY_START_S, at a random point of the span, never among the first calls of a
# start. Polls and pushes start at once: their buckets, restored from the state file,
# already pace them, and a first push held back left a listing's first absolute count
# (sent before goqd knows what the mall shows, so without compare-and-set) room to
# erase a sale made meanwhile (measured in goqd sim: one stale Shopify write in 2 of 7
# runs with a 0–2 s delay).
EXPIRY_START_S = (300.0, 900.0)
# What a store's recovery heals: the failures of its own calls (``failed``,
# ``_check_clock``), never an error another path recorded without a listing (a bad
# order line, a parked line whose order named none): those wait for the operator.
HEALED_CODES = (
    *(c.code for c in (MallError, MallUnavailable, MallRateLimited, MallProtocolError)),
    "clock_skew",
)


@dataclass
class StoreHandle:
    """A store's live state, shared with the control server and metrics.

    Only the store actor and the operator requests below change it, all on the trio
    thread; ``changed`` wakes anyone waiting for a state change.
    """

    name: str
    mall: str
    credentials: dict[str, Secret]
    state: State = "running"
    error_level: int = 0
    message: str = ""
    last_poll_ok_at: float | None = None
    last_push_ok_at: float | None = None
    credential_expires_at: float | None = None
    polls: int = 0  # polls completed and committed
    polls_started: int = 0
    pushes: int = 0
    # Polls are numbered as they start (``polls_started``); these are the numbers of the
    # latest poll that committed and of the latest that failed. ``poll_finished`` is set
    # (and replaced) whenever either moves or the state changes.
    last_ok_started: int = 0
    last_failed_started: int = 0
    poll_finished: trio.Event = field(default_factory=trio.Event)
    changed: trio.Event = field(default_factory=trio.Event)
    poll_requested: trio.Event = field(default_factory=trio.Event)
    # The store's rate buckets, outliving adapter instances (key tests, session restarts).
    rate_buckets: dict[str, Any] = field(default_factory=dict)
    # The mall's clock as the store's responses show it; outlives sessions like the buckets.
    mall_clock: MallClock = field(default_factory=MallClock)
    _session: trio.CancelScope | None = None
    _metrics: Metrics | None = None
    # The adapter's records (``goqd.malls.adapterstate``), opened by the first run_store
    # and kept by every later one: a supervisor restart goes on where it stopped.
    _adapter_state: AdapterState | None = None
    # Writes the credential when the mall renews part of it (a rotated refresh token);
    # the daemon gives every store one. None: such values live in memory only.
    credential_keeper: CredentialKeeper | None = None
    # Settings a reload changed (``reconfigure``); each new mall session reads them, and
    # so does an actor the supervisor restarts. None: the config the actor started with.
    config: StoreConfig | None = None

    def set_state(self, state: State, *, level: int = 0, message: str = "") -> None:
        if state == self.state and level == self.error_level:
            self.message = message or self.message
            return
        # Stopped (level 9: a new key) and down (a crash loop) need the operator: errors.
        # Degraded retries by itself: a warning. Anything else is news.
        emit = (
            log.error
            if state in ("stopped", "down")
            else log.warning
            if state == "degraded"
            else log.info
        )
        emit(
            "store_state_changed",
            store=self.name,
            mall=self.mall,
            old=self.state,
            new=state,
            level=level,
            message=message,
        )
        self.state = state
        self.error_level = level
        self.message = message
        if self._metrics is not None:
            self._metrics.set_state(self.name, state)
            self._metrics.store_error_level.labels(self.name).set(level)
            self._metrics.store_up.labels(self.name, self.mall).set(
                1 if state in ("running", "degraded") else 0
            )
        old, self.changed = self.changed, trio.Event()
        old.set()
        self._poll_progress()

    async def wait_until_active(self) -> None:
        """Return when the store may talk to its mall (not stopped, paused or down)."""
        while self.state in ("stopped", "paused", "down"):
            await self.changed.wait()

    # -- operator requests -------------------------------------------------------------

    def pause(self) -> None:
        if self.state != "down":
            self.set_state("paused", message="paused by operator")

    def resume(self) -> None:
        if self.state in ("paused", "stopped"):
            self.set_state("running")
            self.request_poll()

    def request_poll(self) -> None:
        self.poll_requested.set()

    async def poll_and_wait(self) -> bool:
        """Ask for a poll and wait for the first one that *started after this call*.

        For webhooks: the mall is answered 200 only once what it announced is durable
        (docs/reliability.md I6). Returns True when such a poll committed, False as soon as one
        failed (the mall redelivers; polls that failed before this call do not count)
        or the store cannot poll (stopped, paused, down). Bound it with
        ``trio.move_on_after``.
        """
        target = self.polls_started + 1
        self.request_poll()
        while self.last_ok_started < target:
            if self.last_failed_started >= target or self.state in ("stopped", "paused", "down"):
                return False
            await self.poll_finished.wait()
        return True

    def _committed(self, started: int) -> None:
        self.polls += 1
        self.last_ok_started = started
        self._poll_progress()

    def _poll_failed(self, started: int) -> None:
        self.last_failed_started = started
        self._poll_progress()

    def _poll_progress(self) -> None:
        old, self.poll_finished = self.poll_finished, trio.Event()
        old.set()

    def reconfigure(self, config: StoreConfig, credentials: dict[str, Secret]) -> None:
        """New settings or a credential from a reload: restart the mall session with
        them. Unlike ``renew`` nothing resumes: a store stopped at level 9 stays stopped
        until its error is cleared, a paused one paused."""
        self.config = config
        self.credentials = credentials
        if self._session is not None:
            self._session.cancel()

    def renew(self, credentials: dict[str, Secret]) -> None:
        """New credentials: restart the mall session with them and resume."""
        self.credentials = credentials
        if self._session is not None:
            self._session.cancel()
        self.resume()


def _backoff(attempt: int, rng: random.Random, cap: float) -> float:
    """Exponential backoff with full jitter, never below one second."""
    return max(1.0, rng.uniform(0, min(cap, BACKOFF_INITIAL * 2**attempt)))


async def run_store(
    config: StoreConfig,
    spec: MallSpec,
    handle: StoreHandle,
    ledger: LedgerClient,
    *,
    clock: WallClock = time.time,
    metrics: Metrics | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    rng: random.Random | None = None,
    key_warning_days: int = 14,
    state_dir: str | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Poll and push for one store until cancelled.

    Resource handling: opens the store's ``httpx.AsyncClient`` (closed on exit) on its
    ``MallTransport`` (the mall's clock measured into ``handle.mall_clock``; a read on a
    connection the mall had closed sent once more) and its adapter; reads the store's
    cursor from the ledger and, with ``state_dir``, the store's state file
    (``goqd.stores.state``: its rate buckets as the last process left them, the adapter's
    records) before ``started()``. Borrows the ledger client and ``ledger.wakeups``.

    Error handling: every ``MallError`` is handled here — recorded in the ledger's error
    table (one row per store and code, its count rising), reflected in the state, and
    retried with backoff (level 8) or parked until renewed (level 9). The adapter is
    guarded (``goqd.malls.base.guard_adapter``), so a response that makes its parsing
    raise anything else is a ``MallProtocolError`` too: that call fails, the store goes
    degraded and retries, and the supervisor's restart budget is untouched. A
    ``LedgerError`` (for example a full disk) is retried with backoff: nothing was
    acknowledged. Any other exception escapes to the supervisor, which restarts the
    actor.
    """
    rng = rng or random.Random()
    handle._metrics = metrics
    cursor_reply = await ledger.ask(m.GetCursor(store=config.name), m.Cursor)
    cursor = cursor_reply.cursor
    if handle._adapter_state is None:
        handle._adapter_state = await _open_state(config.name, handle, clock, state_dir)
    if config.paused and handle.state == "running":
        handle.set_state("paused", message="paused in config")
    task_status.started()
    log.info("store_started", store=config.name, mall=config.mall, cursor=cursor)
    while True:
        if handle.config is not None:
            config = handle.config
        with trio.CancelScope() as scope:
            handle._session = scope
            wire = mall_transport(
                transport=transport,
                verify=tls_context(),
                clock=clock,
                mall_clock=handle.mall_clock,
                on_retry=_retry_counter(metrics, config.name),
            )
            async with open_mall_client(wire, timeout=config.timeout_seconds) as http:
                ctx = StoreContext(
                    store=config.name,
                    mall=config.mall,
                    base_url=config.base_url.rstrip("/"),
                    credentials=handle.credentials,
                    http=http,
                    clock=clock,
                    live_statuses=config.live_statuses or spec.default_live_statuses,
                    cancel_statuses=config.cancel_statuses or spec.default_cancel_statuses,
                    options=dict(config.options),
                    urls=dict(config.urls),
                    rate_buckets=handle.rate_buckets,
                    mall_clock=handle.mall_clock,
                    state=handle._adapter_state,
                    save_credentials=_saver(handle),
                )
                session = _Session(
                    config,
                    spec,
                    # Guarded: whatever a mall sends, a call fails with a MallError
                    # (already so from the registry; a spec passed in directly too).
                    guard_adapter(spec.open_adapter(ctx), ctx),
                    handle,
                    ledger,
                    clock,
                    metrics,
                    rng,
                    key_warning_days,
                )
                session.cursor = cursor
                try:
                    await session.run()
                finally:
                    cursor = session.cursor
        # Cancelled by renew() or reconfigure(): open a new session with what they set.
        handle._session = None


def _saver(handle: StoreHandle) -> CredentialSaver | None:
    keeper = handle.credential_keeper
    return keeper.save if keeper is not None else None


async def _open_state(
    store: str, handle: StoreHandle, clock: WallClock, state_dir: str | None
) -> AdapterState:
    """The adapter's records, and the store's rate buckets restored from the state file.

    Without a state directory (a store actor run on its own, in a test) both live in
    memory only.
    """
    if state_dir is None:
        return MemoryState()
    state = await trio.to_thread.run_sync(open_store_state, state_dir, store)
    limiters = state.limiters(clock)
    limiters.update(handle.rate_buckets)
    handle.rate_buckets = limiters
    if not limiters.trusted:
        log.warning(
            "rate_limits_unknown",
            store=store,
            message="the state file is damaged or from before a reboot; every rate "
            "bucket starts empty",
        )
    return state.adapter()


class _Session:
    """One mall session: the poll and push loops over one adapter."""

    def __init__(
        self,
        config: StoreConfig,
        spec: MallSpec,
        adapter: MallAdapter,
        handle: StoreHandle,
        ledger: LedgerClient,
        clock: WallClock,
        metrics: Metrics | None,
        rng: random.Random,
        key_warning_days: int,
    ) -> None:
        self.config = config
        self.spec = spec
        self.adapter = adapter
        self.handle = handle
        self.ledger = ledger
        self.clock = clock
        self.metrics = metrics
        self.rng = rng
        self.cursor: str | None = None
        self.store = config.name
        self.key_warning_days = key_warning_days
        # Listings whose last push failed ambiguously, and when to push them again.
        self._reassert: set[str] = set()
        self._reassert_at = 0.0
        # For the watch: listings being pushed now, and those pushed while a watch read
        # is out (a reading taken across a push of its listing is dropped).
        self._pushing: set[str] = set()
        self._pushed_during_read: set[str] | None = None
        # Wall time before which every sale has been booked (the last committed poll).
        self._complete_before = 0.0
        # The mall's clock is further from goqd's than the store's limit (``_check_clock``).
        self._clock_skewed = False
        # Set (and replaced) when the store recovers: a push waiting out its retry backoff
        # goes at once (``_wait_backoff``).
        self._push_wake = trio.Event()
        self._watch_after = ""  # where the watch's rotation through the listings is
        # The store's level-8 errors are to be marked healed at the next trusted success
        # (``recovered``): set by a recovery, and at the start for those a stop left open.
        self._heal_due = True

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.poll_loop)
            nursery.start_soon(self.push_loop)
            nursery.start_soon(self._after, self.rng.uniform(*EXPIRY_START_S), self.expiry_loop)
            if self.config.watch_seconds > 0:
                nursery.start_soon(self.watch_loop)

    @staticmethod
    async def _after(delay: float, loop: Callable[[], Awaitable[None]]) -> None:
        await trio.sleep(delay)
        await loop()

    # -- failures ------------------------------------------------------------------------

    async def failed(self, exc: MallError | LedgerError, where: str, attempt: int) -> float:
        """Record the failure, move the state, and say how long to wait."""
        if isinstance(exc, MallError):
            level = exc.level
            # goqd's documented code; the mall's own (IE0003, QuotaExceeded) beside it.
            code, mall_code = recorded_codes(exc)
        else:
            level, code, mall_code = LEVEL_TEMPORARY, "ledger_unavailable", ""
        message = f"{where}: {exc}"
        if not isinstance(exc, LedgerError):
            # Recorded before the state moves, so whoever sees the state sees the error.
            # If the ledger itself is failing, the state still tells the operator.
            with contextlib.suppress(LedgerError):
                await self.ledger.call(
                    m.RecordError(
                        store=self.store,
                        level=level,
                        code=code,
                        message=message,
                        mall_code=mall_code,
                    )
                )
        if isinstance(exc, MallAuthError):
            self.handle.set_state("stopped", level=LEVEL_CREDENTIAL, message=message)
        elif self.handle.state == "running" or level > self.handle.error_level:
            self.handle.set_state("degraded", level=LEVEL_TEMPORARY, message=message)
        else:
            self.handle.message = message
        if isinstance(exc, MallRateLimited) and exc.retry_after is not None:
            # A throttle is not an outage: the mall said when the next request is
            # welcome (the adapter has blocked its bucket until then). Backing off
            # exponentially instead stalled a 10,000-order burst for minutes after
            # each run of 429s (BENCHMARKS.md, scale). Never below a second, like any
            # retry: a mall answering "Retry-After: 0" must not be spun on.
            return max(exc.retry_after, 1.0)
        return _backoff(attempt, self.rng, BACKOFF_MAX)

    async def recovered(self) -> None:
        """A call succeeded: back to running, unless the order feed is still not to be
        trusted (``_feed_trusted``): a store whose orders may be going unseen is not
        running because its pushes or its watch go through.

        On the way back the store's level-8 errors of the episode are marked healed in
        the ledger (kept in history): a throttle or maintenance that passed needs no
        operator, and open errors that pile up hide the ones that do. Errors recorded
        after this moment belong to a new episode and stay open.
        """
        if not self._feed_trusted():
            return
        if self.handle.state == "degraded":
            self.handle.set_state("running", message="recovered; check `goqctl errors --all`")
            self._heal_due = True
        if self._heal_due and self.handle.state == "running":
            try:
                await self.ledger.call(
                    m.ResolveErrors(store=self.store, codes=HEALED_CODES, before=self.clock())
                )
            except LedgerError:
                return  # the next success tries again
            self._heal_due = False

    def _feed_trusted(self) -> bool:
        """Whether the store's order polling can be believed: its latest poll committed
        and the mall's clock agrees with goqd's. Only then may a counter that fell with
        no order in the feed be taken for something other than a sale."""
        h = self.handle
        return (
            not self._clock_skewed
            and h.last_ok_started > 0
            and h.last_ok_started >= h.last_failed_started
        )

    def _wake_pushes(self) -> None:
        old, self._push_wake = self._push_wake, trio.Event()
        old.set()

    async def _wait_backoff(self, delay: float) -> bool:
        """Wait out a push's retry backoff, or less: True if the store recovered (a poll
        got through) meanwhile. What waits then goes at once and the backoff starts
        over; after maintenance the malls were otherwise left stale for up to two
        minutes longer than the ledger."""
        woken = self._push_wake
        with trio.move_on_after(delay):
            await woken.wait()
            return True
        return False

    async def _check_clock(self) -> None:
        """Compare the mall's clock (its responses' ``Date``) with goqd's.

        Order windows follow the mall's clock whatever it says (``goqd.malls.clock``),
        but a skew beyond the store's ``clock-skew-limit`` means a clock is wrong, and
        timestamps read with it may be too: the store is degraded (level 8, code
        ``clock_skew``, once per episode) and its order feed is not trusted, so no hold
        is released as unexplained until the clocks agree again.
        """
        skew = self.handle.mall_clock.skew()
        if skew is None:
            return
        if self.metrics is not None:
            self.metrics.mall_clock_skew_seconds.labels(self.store).set(skew)
        limit = self.config.clock_skew_seconds
        if abs(skew) <= limit:
            if self._clock_skewed:
                self._clock_skewed = False
                log.info("mall_clock_agrees", store=self.store, mall=self.config.mall, skew_s=skew)
                await self.recovered()
            return
        if self._clock_skewed:
            return
        self._clock_skewed = True
        message = (
            f"clock skew: the {self.config.mall} clock of store {self.store} is "
            f"{describe_skew(skew)} goqd's (limit {limit:g}s; measured from its responses' "
            "Date). Orders are searched by the mall's clock, but no hold is released as "
            "unexplained until the clocks agree: check this host's clock (timedatectl)"
        )
        log.error(
            "mall_clock_skewed",
            store=self.store,
            mall=self.config.mall,
            skew_s=round(skew, 1),
            limit_s=limit,
        )
        with contextlib.suppress(LedgerError):
            await self.ledger.call(
                m.RecordError(
                    store=self.store, level=LEVEL_TEMPORARY, code="clock_skew", message=message
                )
            )
        if self.handle.state == "running":
            self.handle.set_state("degraded", level=LEVEL_TEMPORARY, message=message)
        elif self.handle.state == "degraded":
            self.handle.message = message

    # -- poll ----------------------------------------------------------------------------

    async def poll_loop(self) -> None:
        attempt = 0
        while True:
            await self.handle.wait_until_active()
            self.handle.poll_requested = trio.Event()
            self.handle.polls_started += 1
            this_poll = self.handle.polls_started
            delay = self.config.poll_seconds
            started = trio.current_time()
            started_wall = self.clock()
            outcome = "ok"
            try:
                page = await self.adapter.fetch_orders(self.cursor)
                crashpoint("store.poll_received")
                booked = await self.ledger.ask(
                    m.OrderLinesSeen(store=self.store, lines=page.lines, cursor=page.cursor),
                    m.OrderLinesBooked,
                )
                self.cursor = page.cursor
                self._complete_before = (
                    started_wall if page.complete_before is None else page.complete_before
                )
                was_failing, attempt = attempt > 0, 0
                was_degraded = self.handle.state == "degraded"
                self.handle._committed(this_poll)
                self.handle.last_poll_ok_at = self.clock()
                await self._check_clock()
                await self.recovered()
                if was_failing or (was_degraded and self.handle.state == "running"):
                    # The store recovered: what waits in the outbox goes now, not when
                    # its retry backoff runs out.
                    self._wake_pushes()
                self._count_lines(booked)
                if booked.booked or booked.parked or booked.rejected:
                    log.info(
                        "orders_booked",
                        store=self.store,
                        lines=len(page.lines),
                        booked=booked.booked,
                        parked=booked.parked,
                        rejected=len(booked.rejected),
                        oversold=booked.oversold_units,
                    )
            except (MallError, LedgerError) as exc:
                outcome = _outcome(exc)
                self.handle._poll_failed(this_poll)
                delay = await self.failed(exc, "poll", attempt)
                attempt += 1
                # A refusal's Date measures the clock too (a stale signature, say).
                await self._check_clock()
            if self.metrics is not None:
                self.metrics.polls_total.labels(self.store, outcome).inc()
                self.metrics.mall_requests_total.labels(self.store, self.config.mall, outcome).inc()
                self.metrics.poll_duration_seconds.labels(self.store).observe(
                    trio.current_time() - started
                )
                if outcome == "ok":
                    self.metrics.poll_last_success_timestamp_seconds.labels(self.store).set(
                        self.clock()
                    )
            if self.handle.state in ("stopped", "paused"):
                continue  # wait_until_active blocks until resumed
            if outcome == "ok":
                # The interval runs from this poll's start, so an order waits at most
                # one interval plus one poll for goqd to see it, however long polls take.
                delay = max(0.0, started + delay - trio.current_time())
            with trio.move_on_after(delay):
                await self.handle.poll_requested.wait()

    def _count_lines(self, booked: m.OrderLinesBooked) -> None:
        if self.metrics is None:
            return
        for outcome, n in (
            ("booked", booked.booked),
            ("duplicate", booked.duplicates),
            ("stale", booked.stale),
            ("parked", booked.parked),
            ("rejected", len(booked.rejected)),
        ):
            if n:
                self.metrics.order_lines_total.labels(self.store, outcome).inc(n)
        if booked.oversold_units:
            log.warning("oversold", store=self.store, units=booked.oversold_units)

    # -- push ----------------------------------------------------------------------------

    async def push_loop(self) -> None:
        attempt = 0
        wakeups = self.ledger.wakeups
        limit = self.spec.limits.push_batch
        read_first = self.config.watch_seconds > 0 and self.spec.limits.read_before_push
        while True:
            await self.handle.wait_until_active()
            try:
                batch = await self.ledger.ask(
                    m.TakePushes(store=self.store, limit=limit, peek=read_first), m.PushBatch
                )
                if read_first and batch.items:
                    # Read these counters first: a sale since goqd last looked becomes a
                    # hold (its rows are rewritten) instead of being overwritten.
                    await self._read_before_push([i.listing_key for i in batch.items])
                    if self.handle.state == "stopped":
                        continue  # the mall refused the credential: a push would be too
                    batch = await self.ledger.ask(
                        m.TakePushes(store=self.store, limit=limit), m.PushBatch
                    )
            except LedgerError as exc:
                woken = await self._wait_backoff(await self.failed(exc, "push", attempt))
                attempt = 0 if woken else attempt + 1
                continue
            if self.metrics is not None:
                self.metrics.outbox_pending.labels(self.store).set(batch.pending)
            if not batch.items:
                if self._reassert and trio.current_time() >= self._reassert_at:
                    keys, self._reassert = tuple(sorted(self._reassert)), set()
                    with contextlib.suppress(LedgerError):
                        await self.ledger.call(
                            m.QueuePushes(store=self.store, listing_keys=keys, strict=False)
                        )
                    continue
                wait = self.config.push_retry_seconds
                if self._reassert:
                    wait = min(wait, max(0.0, self._reassert_at - trio.current_time()))
                with trio.move_on_after(wait):
                    await wakeups.wait(self.store)
                continue
            batch_keys = [i.listing_key for i in batch.items]
            self._pushing.update(batch_keys)
            if self._pushed_during_read is not None:
                self._pushed_during_read.update(batch_keys)
            try:
                attempt = await self._push(batch, attempt)
            finally:
                self._pushing.difference_update(batch_keys)

    async def _push(self, batch: m.PushBatch, attempt: int) -> int:
        """One push call and its report to the ledger; returns the new failure count."""
        try:
            crashpoint("store.before_push")
            outcomes = await self.adapter.push_stock(batch.items)
            crashpoint("store.after_push")
        except MallError as exc:
            # Listings the mall answered before the failure are reported as answered.
            answered = {o.listing_key for o in exc.done}
            rest = [i for i in batch.items if i.listing_key not in answered]
            if exc.done:
                with contextlib.suppress(LedgerError):  # if not, they simply go again
                    await self._report(batch.items, exc.done)
            if isinstance(exc, MallUnavailable) and not isinstance(exc, MallRateLimited):
                # Ambiguous: the mall may still apply this request after a newer one
                # (a timeout is not a "no"). Re-assert these counts once any such late
                # write would have landed.
                self._reassert.update(i.listing_key for i in rest)
                self._reassert_at = trio.current_time() + REASSERT_AFTER * max(
                    1.0, self.config.timeout_seconds
                )
            if self.metrics is not None:
                self.metrics.pushes_total.labels(self.store, "failed").inc(len(rest))
                self.metrics.mall_requests_total.labels(
                    self.store, self.config.mall, _outcome(exc)
                ).inc()
            delay = await self.failed(exc, "push", attempt)
            if self.handle.state not in ("stopped", "paused") and await self._wait_backoff(delay):
                return 0  # the store recovered: push now, and back off from the start
            # A throttle says nothing about the mall's health: the next outage's backoff
            # starts from the beginning.
            return attempt if isinstance(exc, MallRateLimited) else attempt + 1
        try:
            await self._report(batch.items, outcomes)
        except LedgerError as exc:
            # The rows stay in the outbox and the same absolute values go out again.
            await self._wait_backoff(await self.failed(exc, "push", 0))
            return 0
        await self.recovered()
        return 0

    async def _report(self, items: Sequence[m.PushItem], outcomes: Sequence[m.PushOutcome]) -> None:
        """Tell the ledger what the mall answered for ``outcomes`` (some of ``items``)."""
        done = await self._complete(items, outcomes)
        await self.ledger.call(m.PushesDone(store=self.store, outcomes=tuple(done)))
        accepted = sum(1 for o in done if o.accepted)
        self.handle.pushes += accepted
        self.handle.last_push_ok_at = self.clock()
        if self.metrics is not None:
            self.metrics.mall_requests_total.labels(self.store, self.config.mall, "ok").inc()
            self.metrics.pushes_total.labels(self.store, "accepted").inc(accepted)
            if len(done) > accepted:
                self.metrics.pushes_total.labels(self.store, "rejected").inc(len(done) - accepted)
            self.metrics.push_last_success_timestamp_seconds.labels(self.store).set(self.clock())
        log.debug(
            "stock_pushed",
            store=self.store,
            accepted=accepted,
            rejected=len(done) - accepted,
        )

    async def _complete(
        self, items: Sequence[m.PushItem], outcomes: Sequence[m.PushOutcome]
    ) -> list[m.PushOutcome]:
        """Fill in each outcome's quantity: what was sent or, for a stale
        compare-and-set, what the mall shows now (and poll, to book the sale behind it)."""
        sent = {(i.listing_key, i.version): i.quantity for i in items}
        stale = [o.listing_key for o in outcomes if not o.accepted and o.code == m.STALE]
        current: dict[str, int | None] = {}
        if stale:
            self.handle.request_poll()
            with contextlib.suppress(MallError):
                current = await self.adapter.read_stock(stale)
        return [
            msgspec.structs.replace(
                o,
                quantity=current.get(o.listing_key)
                if o.code == m.STALE and not o.accepted
                else sent.get((o.listing_key, o.version)),
            )
            for o in outcomes
        ]

    async def _read_before_push(self, keys: list[str]) -> None:
        """Hand the ledger the counters of ``keys`` as they are now. Best effort: if the
        mall does not answer, the push goes ahead as it would without the watch, but the
        failure is recorded and shown like the watch's own (docs/reliability.md I6)."""
        read_started = self.clock()
        try:
            counts = await self.adapter.read_stock(keys)
        except MallError as exc:
            if self.metrics is not None:
                self.metrics.mall_requests_total.labels(
                    self.store, self.config.mall, _outcome(exc)
                ).inc()
            await self.failed(exc, "read_before_push", 0)
            return
        await self._stock_seen(counts, read_started)

    # -- sale watch ----------------------------------------------------------------------

    async def watch_loop(self) -> None:
        """Read the mall's counters of listings at risk; the ledger compares them.

        Why: a sale shows on the mall's counter at once but in its order API only at the
        next poll (Amazon: ~2 minutes later still). Until goqd books it, every other
        store keeps offering the unit. One read call's worth per round, paced by the
        adapter's own rate buckets; failures are recorded like any mall error but never
        hold up polling or pushing.
        """
        interval = self.config.watch_seconds
        limit = self.spec.limits.watch_max or self.spec.limits.read_batch
        attempt = 0
        # Start at a random point of the interval: stores started together do not read
        # their malls in step, and the watch does not wake together with the poll loop.
        await trio.sleep(self.rng.uniform(0, interval))
        while True:
            await self.handle.wait_until_active()
            started = trio.current_time()
            try:
                await self._watch_round(limit)
                attempt = 0
                delay = max(0.0, started + interval - trio.current_time())
            except (MallError, LedgerError) as exc:
                # Recorded and shown like any failure (docs/reliability.md I6: every fault is
                # visible), though polls and pushes go on regardless.
                if self.metrics is not None and isinstance(exc, MallError):
                    self.metrics.mall_requests_total.labels(
                        self.store, self.config.mall, _outcome(exc)
                    ).inc()
                delay = max(interval, await self.failed(exc, "watch", attempt))
                attempt += 1
            await trio.sleep(delay)

    async def _watch_round(self, limit: int) -> None:
        targets = await self.ledger.ask(
            m.GetWatchList(
                store=self.store,
                below=self.config.watch_below,
                limit=limit,
                after=self._watch_after,
            ),
            m.WatchList,
        )
        self._watch_after = targets.next_after
        keys = [k for k in targets.listing_keys if k not in self._pushing]
        if not keys:
            return
        read_started = self.clock()
        pushed: set[str] = set()
        self._pushed_during_read = pushed
        try:
            counts = await self.adapter.read_stock(keys)
        finally:
            self._pushed_during_read = None
        await self.recovered()
        await self._stock_seen(
            {k: q for k, q in counts.items() if k not in pushed and k not in self._pushing},
            read_started,
        )

    async def _stock_seen(self, counts: dict[str, int | None], read_started: float) -> None:
        seen = tuple(
            m.SeenCount(listing_key=key, quantity=qty)
            for key, qty in counts.items()
            if qty is not None
        )
        if self.metrics is not None:
            self.metrics.mall_requests_total.labels(self.store, self.config.mall, "ok").inc()
        if seen:
            await self._check_clock()
            # While the order feed cannot be trusted (a poll failing, the mall's clock
            # off), a counter that fell may be a sale goqd cannot see yet: nothing is
            # released as unexplained, not even by age, until a trusted poll has looked.
            trusted = self._feed_trusted()
            done = await self.ledger.ask(
                m.StockSeen(
                    store=self.store,
                    counts=seen,
                    read_started=read_started,
                    hold_expiry=self.config.hold_expiry_seconds if trusted else math.inf,
                    # Less a margin for the mall's clocks: its counter and its order
                    # feed are different systems.
                    explained_before=self._complete_before - EXPLAIN_MARGIN_S if trusted else 0.0,
                ),
                m.Done,
            )
            if done.changed:
                log.info("stock_watch_changed_holds", store=self.store, listings=done.changed)

    # -- credential expiry ---------------------------------------------------------------

    async def expiry_loop(self) -> None:
        """Ask the mall when the credential expires, twice a day (cheap, best effort)."""
        while True:
            await self.handle.wait_until_active()
            try:
                expires = await self.adapter.credential_expiry()
            except MallError:
                expires = None
            if expires is not None:
                self.handle.credential_expires_at = expires
                if self.metrics is not None:
                    self.metrics.credential_expiry_timestamp_seconds.labels(self.store).set(expires)
                now = self.clock()
                if expiry.expiry_state(expires, now, self.key_warning_days) in (
                    "warning",
                    "expired",
                ):
                    # A warning, not yet an error: the store keeps syncing until the mall
                    # refuses the key (that is level 9).
                    log.warning(
                        "credential_expiring",
                        store=self.store,
                        mall=self.config.mall,
                        days_left=expiry.days_left(expires, now),
                        action=expiry.warning_message(self.store, self.config.mall, expires, now),
                    )
            await trio.sleep(12 * 3600)


def _outcome(exc: Exception) -> str:
    if isinstance(exc, MallAuthError):
        return "auth"
    if isinstance(exc, MallRateLimited):
        return "rate_limited"
    if isinstance(exc, MallUnavailable):
        return "unavailable"
    if isinstance(exc, MallProtocolError):
        return "protocol"
    return "error"


def _retry_counter(metrics: Metrics | None, store: str) -> Callable[[str], None]:
    """Counts the reads sent again after a pooled connection turned out closed (not an
    outage: no error, a debug line and a metric)."""

    def count(error: str) -> None:
        log.debug("mall_request_retried", store=store, error=error)
        if metrics is not None:
            metrics.mall_request_retries_total.labels(store).inc()

    return count
