"""The one interface every mall adapter implements, and the types it speaks.

An adapter is a pure client: it speaks one mall's wire format over an injected
``httpx.AsyncClient`` and translates to and from goqd's types (``goqd.messages``). It
raises only goqd's errors (``goqd.errors.MallError`` and subclasses); nothing above
``goqd/malls`` ever sees an httpx or msgspec exception. It never logs or formats a
credential: messages are built from the mall's own error codes and texts.

Adding a mall adds a module here, a simulator in ``goqd/sim``, a test file and a line
in ``goqd/malls/registry.py``; it never touches the store actor.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Protocol

import httpx
import msgspec

from goqd.errors import ConfigError
from goqd.messages import MallListing, OrderLine, PushItem, PushOutcome
from goqd.secret import Secret

WallClock = Callable[[], float]


class OrderPage(msgspec.Struct, frozen=True, kw_only=True):
    """Everything one poll found, and the cursor to commit with it.

    The adapter has already followed every page; ``cursor`` is opaque to everyone but
    the adapter that made it (a timestamp, usually).
    """

    lines: tuple[OrderLine, ...]
    cursor: str
    orders_seen: int = 0
    # Wall time before which every sale is in ``lines`` or an earlier page; None = the
    # moment the fetch began. A mall whose order feed lags (Amazon, ~2 minutes) says so
    # here: the sale watch releases a hold no order explained once this passes it.
    complete_before: float | None = None


class MallLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Documented limits the store actor must respect for this mall."""

    push_batch: int  # listings per stock-update call
    read_batch: int  # listings per stock-read call
    min_poll_interval: float  # seconds; config may not go below it
    # Listings the sale watch reads per round (0: one read call's worth), chosen so a
    # round every 5 s leaves most of the read budget to diff and import.
    watch_max: int = 0
    # Read the counters of a batch right before pushing it (with the watch on): a sale
    # there since goqd last looked is held, not erased by the absolute count. False
    # where the push itself compares and sets (Shopify's changeFromQuantity).
    read_before_push: bool = True


class StoreContext(msgspec.Struct, frozen=True, kw_only=True):
    """What an adapter is given when it is opened for one store."""

    store: str
    mall: str
    base_url: str
    credentials: dict[str, Secret]
    http: httpx.AsyncClient
    clock: WallClock
    # Per-store overrides of the mall's default order statuses (strings, as the mall
    # spells them); empty means the mall's defaults from malls.md.
    live_statuses: tuple[str, ...] = ()
    cancel_statuses: tuple[str, ...] = ()
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    # Extra base URLs (e.g. a separate token endpoint) by name.
    urls: dict[str, str] = msgspec.field(default_factory=dict)
    # The store's rate buckets by API name, shared across adapter instances of the store
    # (see ``goqd.malls.ratelimit.shared_bucket``).
    rate_buckets: dict[str, Any] = msgspec.field(default_factory=dict)


class MallAdapter(Protocol):
    """One store's client for one mall."""

    mall: str
    limits: MallLimits

    async def check_credentials(self) -> None:
        """Make the cheapest authenticated call; raise ``MallAuthError`` if rejected."""
        ...

    async def fetch_orders(self, cursor: str | None) -> OrderPage:
        """Every order line changed since ``cursor`` (with overlap), all pages."""
        ...

    async def push_stock(self, items: Sequence[PushItem]) -> list[PushOutcome]:
        """Set absolute counts (with mall attributes); one outcome per item.

        A whole-call failure raises; a per-listing refusal is an outcome with
        ``accepted=False`` and the mall's code and message.
        """
        ...

    async def read_stock(self, listing_keys: Sequence[str]) -> dict[str, int | None]:
        """The mall's current count for each key it knows (None: unlimited)."""
        ...

    def iter_listings(self) -> AsyncIterator[MallListing]:
        """Every listing of the store (for import)."""
        ...

    async def credential_expiry(self) -> float | None:
        """Epoch seconds when the credential expires, if the mall can tell."""
        ...


AdapterFactory = Callable[[StoreContext], MallAdapter]
WebhookCheck = Callable[[dict[str, Secret], bytes, Mapping[str, str]], bool | None]


class MallSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A mall as the registry knows it.

    ``credential_fields`` are the keys the store's credential file (JSON object) must
    hold; every value becomes a ``Secret``. ``webhook`` is True for malls that push
    order events to goqd (Shopify).
    """

    name: str
    title: str  # human name, e.g. "楽天市場"
    open_adapter: AdapterFactory
    limits: MallLimits
    credential_fields: tuple[str, ...]
    default_live_statuses: tuple[str, ...] = ()
    default_cancel_statuses: tuple[str, ...] = ()
    # For malls that push order events: (credentials, raw body, headers) -> None when the
    # signature is wrong, else whether the event may have changed orders (then goqd
    # polls that store at once). Served at ``POST /webhooks/<store>``.
    webhook: WebhookCheck | None = None


def number_option(ctx: StoreContext, name: str, default: float, low: float, high: float) -> float:
    """A numeric ``options.<name>`` of a store, checked; a bad one names store and key."""
    value = ctx.options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigError(
            f"store {ctx.store}",
            f"options.{name}",
            f"must be a number between {low:g} and {high:g}, got {value!r}",
        )
    return float(value)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context (certifi's CA bundle, as httpx builds it) for every mall client.

    Each ``httpx.AsyncClient`` otherwise loads the CA bundle into a context of its own,
    once per store on the way to READY: 1.1 s for 50 stores under a profiler, and the
    daemon's RSS at READY fell from 126 to 74 MB with this and the other start-up
    changes (BENCHMARKS.md, scale).
    """
    return httpx.create_ssl_context()
