"""What every simulated mall shares: listings whose stock the mall itself lowers,
orders that move through statuses, fault switches, a request history, the guard
pipeline every request goes through and the rate bucket each mall's limits run on.

A mall-specific simulator (``goqd/sim/<mall>.py``) subclasses ``SimMall`` and adds its
wire format: routes, auth scheme, bodies, status codes, error shapes, batch and rate
limits. The market generator and the checker use only this base class, so they work
the same for every mall.

The guard pipeline (``SimMall.guard``) runs these checks in this order, the first that
refuses answers, and only a request that passes them all reaches ``handle``:

1. route: a path or method the mall does not serve gets the mall's 404 (or 405);
2. maintenance: ``faults.maintenance`` answers the mall's maintenance reply, before the
   mall has looked at who is asking, as a front end in maintenance does;
3. server error: ``faults.error_rate`` answers the mall's 5xx, again before any check;
4. auth: the credential presented (or ``faults.expired_credential``);
5. rate limit: the mall prices the request (one call, or a GraphQL query's cost), then
   ``faults.throttle_rate`` may throttle it (counted in ``forced_throttles``), then the
   mall's own limit (``rate_plan``; counted in ``throttled_requests``); limits belong
   to a known caller, so they come after auth.

Each step is a hook whose reply the subclass renders in its mall's format; the
decisions (which fault fires, whether the bucket grants) are made here once. Endpoints
a real mall serves from another host (OAuth token endpoints) skip the pipeline
(``guarded`` is False for them).

Time: the wall clock shared with the daemon under test (epoch seconds; under a
``MockClock`` derived from ``trio.current_time()``), plus the simulator's
``clock_offset``: a mall whose clock disagrees with goqd's (seconds, minutes, nine hours
of a zone read wrong) stamps its orders, filters its searches, checks signatures and
dates its responses by ``clock()``, its own time. Every response carries an HTTP
``Date`` from it, as real malls' servers send one. Rate buckets run on
``trio.current_time()``, the clock the adapters' own buckets pace themselves by.

Nothing here may ever reach a real mall host: simulators listen on loopback only.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import TypedDict, TypeVar, Unpack

import trio

from goqd.sim.http import HTML_TYPE, JSON_TYPE, App, Request, Response
from goqd.wallclock import WallClock


class SimArgs(TypedDict, total=False):
    """What every simulator's constructor takes besides its mall's own options."""

    shop_id: str
    clock: WallClock
    seed: int
    clock_offset: float


class ApiKeyArgs(SimArgs, total=False):
    """What an ``ApiKeyMall``'s constructor takes besides its mall's own options."""

    key_lifetime_days: float


@dataclass(frozen=True)
class RatePlan:
    """A mall's limit on one API: ``rate`` per second with room for ``burst``.

    ``key`` names the bucket (APIs with the same key share one; "" = the API name).
    ``slack`` is how far short of a whole token a request may still pass (a client
    pacing itself exactly at the rate arrives a hair early under float rounding or
    network jitter); ``lockout`` > 0 locks the bucket that long once it refuses.
    """

    rate: float
    burst: float
    key: str = ""
    slack: float = 0.0
    lockout: float = 0.0


class RateBucket:
    """A token bucket that refuses instead of waiting: the mall's side of a limit.

    Starts full. ``take`` answers None when granted, else the seconds until the amount
    would be granted (the rest of a lock-out while one runs).
    """

    def __init__(self, plan: RatePlan, now: float) -> None:
        self.plan = plan
        self.rate = plan.rate
        self.size = plan.burst
        self.tokens = plan.burst
        self.stamp = now
        self.locked_until = 0.0

    def _refill(self, now: float) -> None:
        self.tokens = min(self.size, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float, amount: float = 1.0) -> float | None:
        if now < self.locked_until:
            return self.locked_until - now
        self._refill(now)
        if self.tokens + self.plan.slack >= amount:
            self.tokens -= amount  # below zero by at most the slack: it is paid back
            return None
        if self.plan.lockout > 0:
            self.locked_until = now + self.plan.lockout
            return self.plan.lockout
        return (amount - self.plan.slack - self.tokens) / self.rate

    def refund(self, amount: float) -> None:
        """Give back what a request was charged beyond what it used."""
        self.tokens = min(self.size, self.tokens + amount)

    def drain_for(self, now: float, amount: float, wait: float) -> None:
        """Empty the bucket as far as a real one refusing ``amount`` for ``wait``
        seconds would be, so the state the mall reports agrees with its answer."""
        self._refill(now)
        self.tokens = max(0.0, amount - wait * self.rate)


Body = TypeVar("Body")


@dataclass
class Faults:
    """Switches a test or fault plan flips. All off by default.

    ``error_rate`` / ``throttle_rate`` are probabilities per request drawn from the
    simulator's seeded RNG, so a seed replays the same faults.
    """

    expired_credential: bool = False
    maintenance: bool = False
    error_rate: float = 0.0  # 5xx
    throttle_rate: float = 0.0  # 429 / mall throttle
    retry_after: float = 1.0
    latency: float = 0.0  # seconds added to every response
    malformed: str = ""  # "", "missing_field", "wrong_type", "html", "truncated"
    silent_noop: bool = False  # accept stock updates without applying them
    timeout_after_apply: bool = False  # apply a push, then hang past the client timeout


@dataclass
class SimListing:
    listing_key: str
    link_code: str
    name: str
    quantity: int | None  # None = unlimited
    allow_overdraft: bool = False
    attrs: dict[str, str] = field(default_factory=dict)
    # Every value this listing was set to, in order: the no-stale-overwrite check of
    # docs/reliability.md reads it.
    set_history: list[int] = field(default_factory=list)


@dataclass
class SimLine:
    line_id: str
    listing_key: str
    quantity: int
    cancelled: bool = False


@dataclass
class SimOrder:
    order_id: str
    lines: list[SimLine]
    status: str
    created_at: float
    updated_at: float
    cancelled: bool = False


@dataclass
class RecordedRequest:
    at: float
    method: str
    path: str
    api: str  # the mall API name the request counts against
    status: int


class SimMall(ABC):
    """Base of every simulated mall. Subclasses implement ``handle`` and the hooks."""

    mall: str = ""

    def __init__(
        self, *, shop_id: str, clock: WallClock, seed: int = 0, clock_offset: float = 0.0
    ) -> None:
        # Subclasses take their mall's options by keyword and pass the rest on as
        # ``**base: Unpack[SimArgs]``.
        self.shop_id = shop_id
        self.seed = seed
        self.wall_clock = clock
        # Seconds this mall's clock is ahead of the shared wall clock (negative: behind).
        # A test may change it at any time: the mall's clock jumps.
        self.clock_offset = clock_offset
        self.rng = random.Random(seed)
        self.faults = Faults()
        self.listings: dict[str, SimListing] = {}
        self.orders: dict[str, SimOrder] = {}
        self.requests: list[RecordedRequest] = []
        self.oversold_units = 0
        self.refused_orders = 0
        # Requests refused by the mall's own limit (an adapter going over it), and
        # throttle answers forced by ``faults.throttle_rate``.
        self.throttled_requests = 0
        self.forced_throttles = 0
        self.buckets: dict[str, RateBucket] = {}
        self._serial = 0
        self.app = App(self._dispatch)

    def clock(self) -> float:
        """This mall's own time: the shared wall clock plus ``clock_offset``."""
        return self.wall_clock() + self.clock_offset

    # -- catalogue and market ----------------------------------------------------------

    def normal_key(self, listing_key: str) -> str:
        """The key the mall files ``listing_key`` under (a mall may refuse it with
        ValueError, or normalise it)."""
        return listing_key

    def add_listing(
        self,
        listing_key: str,
        *,
        link_code: str = "",
        name: str = "",
        quantity: int | None = 0,
        allow_overdraft: bool = False,
        attrs: dict[str, str] | None = None,
    ) -> SimListing:
        listing_key = self.normal_key(listing_key)
        listing = SimListing(
            listing_key,
            link_code or listing_key,
            name or listing_key,
            quantity,
            allow_overdraft,
            dict(attrs or {}),
        )
        self.listings[listing_key] = listing
        return listing

    def next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def new_order_id(self) -> str:
        """Mall-specific order number format; subclasses override."""
        return f"{self.shop_id}-{self.next_serial():08d}"

    @abstractmethod
    def initial_status(self) -> str:
        """The status a new order starts in, as the mall spells it."""

    def place_order(self, items: list[tuple[str, int]]) -> SimOrder | None:
        """A customer orders; the mall lowers its own stock, refusing if it has none.

        Returns ``None`` when the mall refuses (out of stock and no overdraft).
        ``oversold_units`` counts nothing here: the market generator knows the real
        total and does that accounting.
        """
        for key, qty in items:
            listing = self.listings.get(key)
            if listing is None or qty <= 0:
                return None
            if (
                listing.quantity is not None
                and listing.quantity < qty
                and not listing.allow_overdraft
            ):
                self.refused_orders += 1
                return None
        now = self.clock()
        order = SimOrder(self.new_order_id(), [], self.initial_status(), now, now)
        for n, (key, qty) in enumerate(items, start=1):
            listing = self.listings[key]
            if listing.quantity is not None:
                listing.quantity -= qty
            order.lines.append(SimLine(self.line_id_for(order, n), key, qty))
        self.orders[order.order_id] = order
        return order

    def line_id_for(self, order: SimOrder, n: int) -> str:
        return str(n)

    def cancel_order(self, order_id: str) -> None:
        """The order is cancelled at the mall; the mall puts its own stock back."""
        order = self.orders[order_id]
        if order.cancelled:
            return
        order.cancelled = True
        order.status = self.cancelled_status()
        order.updated_at = self.clock()
        for line in order.lines:
            listing = self.listings.get(line.listing_key)
            if listing is not None and listing.quantity is not None and not line.cancelled:
                listing.quantity += line.quantity

    @abstractmethod
    def cancelled_status(self) -> str: ...

    @abstractmethod
    def status_flow(self) -> list[str]:
        """Live statuses in the order the mall moves an order through them."""

    def advance(self, order_id: str) -> None:
        """Move a live order to its next live status (no-op at the last or if cancelled)."""
        order = self.orders[order_id]
        flow = self.status_flow()
        if order.cancelled or order.status not in flow:
            return
        i = flow.index(order.status)
        if i + 1 < len(flow):
            self.set_status(order_id, flow[i + 1])

    def edit_quantity(self, order_id: str, line_id: str, quantity: int) -> None:
        """The shop changes a line's quantity (Rakuten 変更); the mall adjusts its stock."""
        order = self.orders[order_id]
        for line in order.lines:
            if line.line_id == line_id:
                listing = self.listings.get(line.listing_key)
                if listing is not None and listing.quantity is not None:
                    listing.quantity -= quantity - line.quantity
                line.quantity = quantity
        order.updated_at = self.clock()

    def set_status(self, order_id: str, status: str) -> None:
        order = self.orders[order_id]
        order.status = status
        order.updated_at = self.clock()

    def stock(self, listing_key: str) -> int | None:
        return self.listings[listing_key].quantity

    def apply_stock(self, listing_key: str, quantity: int) -> bool:
        """An accepted stock update. Returns False when the key is unknown."""
        listing = self.listings.get(listing_key)
        if listing is None:
            return False
        if self.faults.silent_noop:
            return True
        listing.quantity = quantity
        listing.set_history.append(quantity)
        return True

    # -- HTTP --------------------------------------------------------------------------

    async def _dispatch(self, request: Request) -> Response:
        if self.faults.latency:
            await trio.sleep(self.faults.latency)
        api = self.api_name(request)
        response = await self.guard(request, api)
        response.headers.setdefault("date", formatdate(self.clock(), usegmt=True))
        # Recorded on the shared wall clock: the harness lines requests up with its own
        # plans and with other malls whatever this mall's clock says.
        self.requests.append(
            RecordedRequest(self.wall_clock(), request.method, request.path, api, response.status)
        )
        self.answered(request, api, response)
        return response

    async def guard(self, request: Request, api: str) -> Response:
        """The guard pipeline (order in the module docstring), then ``handle``."""
        missing = self.route_refusal(request, api)
        if missing is not None:
            return missing
        if not self.guarded(request, api):
            return await self.handle(request, api)
        if self.faults.maintenance:
            return self.maintenance_reply(api)
        if self.roll(self.faults.error_rate):
            return self.server_error_reply(api)
        denied = self.auth_refusal(request, api, expired=self.faults.expired_credential)
        if denied is not None:
            return denied
        cost = self.price(request, api)
        if isinstance(cost, Response):
            return cost
        if self.roll(self.faults.throttle_rate):
            self.forced_throttles += 1
            return self.throttle_reply(api, self.faults.retry_after, cost=cost, forced=True)
        bucket = self.bucket(api)
        if bucket is not None:
            wait = bucket.take(trio.current_time(), cost)
            if wait is not None:
                self.throttled_requests += 1
                return self.throttle_reply(api, wait, cost=cost, forced=False)
        return await self.handle(request, api)

    def bucket(self, api: str) -> RateBucket | None:
        """The bucket ``api`` is counted in (None: the mall sets no limit on it)."""
        plan = self.rate_plan(api)
        if plan is None:
            return None
        key = plan.key or api
        bucket = self.buckets.get(key)
        if bucket is None or bucket.plan != plan:  # a test changed the mall's limit
            bucket = self.buckets[key] = RateBucket(plan, trio.current_time())
        return bucket

    def api_name(self, request: Request) -> str:
        return request.path

    # -- hooks of the guard pipeline ------------------------------------------------------

    @abstractmethod
    def route_refusal(self, request: Request, api: str) -> Response | None:
        """The mall's answer to a path or method it does not serve; None: routed."""

    def guarded(self, request: Request, api: str) -> bool:
        """False for endpoints the real mall serves apart from its API (token hosts)."""
        return True

    @abstractmethod
    def maintenance_reply(self, api: str) -> Response: ...

    @abstractmethod
    def server_error_reply(self, api: str) -> Response: ...

    @abstractmethod
    def auth_refusal(self, request: Request, api: str, *, expired: bool) -> Response | None:
        """The mall's refusal of the credential presented, or None to let it through.

        ``expired``: the ``expired_credential`` fault is on, so whatever is presented
        counts as an expired credential.
        """

    def price(self, request: Request, api: str) -> float | Response:
        """What the request costs against the mall's limit; a Response refuses it
        before it is charged (a query the mall cannot price)."""
        return 1.0

    def rate_plan(self, api: str) -> RatePlan | None:
        """The mall's limit on ``api``; None: no limit."""
        return None

    def documented_limit(self, api: str) -> tuple[float, float] | None:
        """The mall's published (or assumed) limit on ``api`` as (requests per second,
        burst), which the benchmark holds goqd's use against; None: not limited by a
        count of requests. It can differ from ``rate_plan``: a simulator may leave a
        little room for network jitter, or not enforce a limit it knows."""
        plan = self.rate_plan(api)
        return None if plan is None else (plan.rate, plan.burst)

    @abstractmethod
    def throttle_reply(self, api: str, wait: float, *, cost: float, forced: bool) -> Response:
        """The mall's throttle answer; ``wait`` is the seconds until it would grant."""

    @abstractmethod
    async def handle(self, request: Request, api: str) -> Response:
        """A request that passed every guard."""

    def answered(self, request: Request, api: str, response: Response) -> None:
        """Called with every answer, after it is recorded (for a mall's own logs)."""
        return  # most malls keep no log beyond ``requests``

    # -- fault injection: spoiled bodies ------------------------------------------------

    # The page the mall's front end serves instead of the API when overloaded.
    busy_page = "<!DOCTYPE html><html><body><h1>Service Unavailable</h1></body></html>"

    def reply_ok(
        self,
        body: Body,
        render: Callable[[Body], str],
        *,
        drop_field: Callable[[Body], Body],
        wrong_type: Callable[[Body], Body],
        content_type: str = JSON_TYPE,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """A 200 answer of ``body``, spoiled as ``faults.malformed`` asks: "html" the
        busy page, "missing_field" / "wrong_type" the mall's own way of losing a field
        the client needs or giving it the wrong type, "truncated" half the text."""
        kind = self.faults.malformed
        if kind == "html":
            return Response(200, self.busy_page, content_type=HTML_TYPE, headers=headers)
        if kind == "missing_field":
            body = drop_field(body)
        elif kind == "wrong_type":
            body = wrong_type(body)
        text = render(body)
        if kind == "truncated":
            text = text[: max(1, len(text) // 2)]
        return Response(200, text, content_type=content_type, headers=headers)

    def roll(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    @abstractmethod
    def credentials(self) -> dict[str, str]:
        """Credentials that this simulator accepts right now (for the store's file)."""
        ...


class RefreshTokenMall(SimMall):
    """A mall whose API takes short-lived access tokens minted by an OAuth refresh-token
    grant (Amazon's LWA, Yahoo's YConnect). Expiry times are on the mall's own clock."""

    def __init__(self, **base: Unpack[SimArgs]) -> None:
        super().__init__(**base)
        # Private names: tests/control/test_security.py reads them for its canaries.
        self._refresh_tokens: dict[str, float] = {}  # token -> expires at
        self._access_tokens: dict[str, float] = {}
        self.token_refreshes = 0

    def refresh_ok(self, token: str) -> bool:
        return self.clock() < self._refresh_tokens.get(token, -math.inf)

    def add_access_token(self, token: str, lifetime: float) -> None:
        self.token_refreshes += 1
        self._access_tokens[token] = self.clock() + lifetime

    def access_expired(self, token: str) -> bool | None:
        """Whether ``token`` has expired; None: never issued, or revoked."""
        expires = self._access_tokens.get(token)
        return None if expires is None else self.clock() >= expires

    def expire_credentials(self) -> None:
        """Every refresh and access token issued so far stops working."""
        self._refresh_tokens.clear()
        self._access_tokens.clear()

    def expire_access_tokens(self) -> None:
        """Access tokens die early (as if their hour had passed); refresh tokens live."""
        self._access_tokens.clear()


class ApiKeyMall(SimMall):
    """A mall whose credential is a long-lived key that stops working
    ``key_lifetime_days`` after it is issued (Rakuten's licenseKey, au PAY's API key).
    Expiry times are on the mall's own clock."""

    def __init__(self, *, key_lifetime_days: float = 90.0, **base: Unpack[SimArgs]) -> None:
        super().__init__(**base)
        self.key_lifetime_s = key_lifetime_days * 86400
        # key -> expires at. Private name: tests/control/test_security.py reads it for canaries.
        self._keys: dict[str, float] = {}

    def add_key(self, key: str) -> None:
        self._keys[key] = self.clock() + self.key_lifetime_s

    def key_valid(self, key: str) -> bool:
        return self.clock() < self._keys.get(key, -math.inf)

    def expire_credentials(self) -> None:
        """Every key issued so far expires now."""
        now = self.clock()
        for key in self._keys:
            self._keys[key] = min(self._keys[key], now)


# --------------------------------------------------------------------------------------
# What the demo, the benchmark and the tests need to set a simulated mall up
# --------------------------------------------------------------------------------------


def add_plain(sim: SimMall, key: str, sku: str, name: str, quantity: int) -> SimListing:
    """A listing at ``key`` whose link code is the SKU (most malls)."""
    return sim.add_listing(key, link_code=sku, name=name, quantity=quantity)


def same_key(sku: str) -> str:
    return sku


@dataclass(frozen=True)
class SimSpec:
    """A simulated mall, exported as ``SIM`` by ``goqd/sim/<mall>.py``: the simulator
    class, the listing key a SKU gets there, and the config ``urls`` the adapter needs
    besides its base URL (token endpoints on the same host)."""

    mall: str
    cls: type[SimMall]
    listing_key: Callable[[str], str] = same_key
    # name -> path on the simulator's host (e.g. {"token": "/yconnect/v2/token"})
    url_paths: dict[str, str] = field(default_factory=dict)
    options: dict[str, str | int | float | bool] = field(default_factory=dict)
    # Creates a listing for ``sku``; returns it (its ``listing_key`` is what goqd uses).
    add: Callable[[SimMall, str, str, str, int], SimListing] = add_plain
    # How long after the market stops this mall can still be catching up: Amazon
    # publishes orders to getOrders about two minutes late [V, docs/malls.md §3.2].
    settle_s: float = 30.0
    # How late the mall itself shows a new order to its order API (Amazon's, as the
    # adapter's lag_s default): the benchmark adds it to its latency targets.
    order_delay_s: float = 0.0
