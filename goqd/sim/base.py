"""What every simulated mall shares: listings whose stock the mall itself lowers,
orders that move through statuses, fault switches, and a request history.

A mall-specific simulator (``goqd/sim/<mall>.py``) subclasses ``SimMall`` and adds its
wire format: routes, auth scheme, bodies, status codes, error shapes, batch and rate
limits. The market generator and the checker use only this base class, so they work
the same for every mall.

Time: the wall clock shared with the daemon under test (epoch seconds; under a
``MockClock`` derived from ``trio.current_time()``), plus the simulator's
``clock_offset``: a mall whose clock disagrees with goqd's (seconds, minutes, nine hours
of a zone read wrong) stamps its orders, filters its searches, checks signatures and
dates its responses by ``clock()``, its own time. Every response carries an HTTP
``Date`` from it, as real malls' servers send one.

Nothing here may ever reach a real mall host: simulators listen on loopback only.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate

import trio

from goqd.sim.http import App, Request, Response

WallClock = Callable[[], float]


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
    # (version-ish) history of absolute values this listing was set to, for I4 checks
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
        self.shop_id = shop_id
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
        self._serial = 0
        self.app = App(self._dispatch)

    def clock(self) -> float:
        """This mall's own time: the shared wall clock plus ``clock_offset``."""
        return self.wall_clock() + self.clock_offset

    # -- catalogue and market ----------------------------------------------------------

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
        response = await self.handle(request, api)
        response.headers.setdefault("date", formatdate(self.clock(), usegmt=True))
        # Recorded on the shared wall clock: the harness lines requests up with its own
        # plans and with other malls whatever this mall's clock says.
        self.requests.append(
            RecordedRequest(self.wall_clock(), request.method, request.path, api, response.status)
        )
        return response

    def api_name(self, request: Request) -> str:
        return request.path

    @abstractmethod
    async def handle(self, request: Request, api: str) -> Response: ...

    def roll(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    @abstractmethod
    def credentials(self) -> dict[str, str]:
        """Credentials that this simulator accepts right now (for the store's file)."""
        ...
