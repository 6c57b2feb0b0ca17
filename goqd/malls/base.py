"""The one interface every mall adapter implements, and the types it speaks.

An adapter is a pure client: it speaks one mall's wire format over an injected
``httpx.AsyncClient`` and translates to and from goqd's types (``goqd.messages``). It
raises only goqd's errors (``goqd.errors.MallError`` and subclasses); nothing above
``goqd/malls`` ever sees an httpx or msgspec exception. It never logs or formats a
credential: messages are built from the mall's own error codes and texts.

Adding a mall adds a module here, a simulator in ``goqd/sim``, a test file and its name
in ``goqd/mallnames.py``; it never touches the store actor. Everything goqd knows
about a mall besides its adapter is on its ``MallSpec``: credential fields and which are
secret, options, limits, default statuses, and how its key expires and is renewed
(``KeyExpiry``). How a request goes out and how the answer becomes a goqd error is
``goqd.malls.client``, the same for every mall.

Shared here so every adapter behaves the same: the ``options`` a mall accepts
(``OptionSpec``, checked by ``check-config`` before anything runs), the one
``Retry-After`` parser, and ``guard_adapter``, which turns any exception an adapter did
not mean to raise into a ``MallProtocolError`` so one strange response can never take
the store actor down.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import httpx
import msgspec
import structlog

from goqd.errors import ConfigError, MallError, MallProtocolError
from goqd.malls.adapterstate import AdapterState, MemoryState
from goqd.malls.clock import MallClock, parse_http_date
from goqd.messages import ListingAttrs, MallCount, MallListing, OrderLine, PushItem, PushOutcome
from goqd.secret import Secret
from goqd.wallclock import WallClock

log = structlog.get_logger("goqd.malls")

# Writes a store's whole credential (every field, as the store now uses it) where the
# next start reads it. Given by the core; never raises for a failed write.
CredentialSaver = Callable[[Mapping[str, Secret]], Awaitable[None]]

# What decoding an untrusted body can raise: msgspec's errors (ValidationError is one),
# and RecursionError for nesting deeper than the interpreter allows ("[[[[…", a hundred
# thousand deep, is a few hundred kilobytes).
DECODE_ERRORS: tuple[type[Exception], ...] = (msgspec.DecodeError, RecursionError)


class OrderPage(msgspec.Struct, frozen=True, kw_only=True):
    """Everything one poll found, and the cursor to commit with it.

    The adapter has already followed every page; ``cursor`` is opaque to everyone but
    the adapter that made it (a timestamp, usually).
    """

    lines: tuple[OrderLine, ...]
    cursor: str
    orders_seen: int = 0
    # goqd's wall time before which every sale is in ``lines`` or an earlier page; None =
    # the moment the fetch began. A mall whose order feed lags (Amazon, ~2 minutes) says
    # so here (from its mall-time cursor by ``MallClock.to_wall_floor``): the sale watch
    # releases a hold no order explained once this passes it.
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
    # spells them); empty means the mall's defaults from docs/malls.md.
    live_statuses: tuple[str, ...] = ()
    cancel_statuses: tuple[str, ...] = ()
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    # Extra base URLs (e.g. a separate token endpoint) by name.
    urls: dict[str, str] = msgspec.field(default_factory=dict)
    # The store's rate buckets by API name, shared across adapter instances of the store
    # (see ``goqd.malls.ratelimit.shared_bucket``).
    rate_buckets: dict[str, Any] = msgspec.field(default_factory=dict)
    # The mall's clock as the store's responses show it (``goqd.malls.clock``): order
    # windows and cursors are in the mall's time, never goqd's wall time.
    mall_clock: MallClock = msgspec.field(default_factory=MallClock)
    # What the adapter keeps across polls and restarts (order versions already read);
    # the store actor backs it with the store's state file (``goqd.malls.adapterstate``).
    state: AdapterState = msgspec.field(default_factory=MemoryState)
    # Where fields the mall renewed at run time (a rotated refresh token) are written so a
    # restart uses them: see ``replace_credentials``. None: they live in memory only.
    save_credentials: CredentialSaver | None = None


async def replace_credentials(ctx: StoreContext, fields: Mapping[str, str]) -> None:
    """Replace fields of the store's credential that the mall renewed at run time.

    ``ctx.credentials`` is changed in place: the store's adapters share that dict (the
    store's own and an operator's diff or import), so each one uses the new values from
    its next call, and so does the next session of the store. Then the whole credential,
    the other fields exactly as they were, goes to ``ctx.save_credentials``, which
    reports a failed write itself: the store goes on with the values in memory.
    """
    for name, value in fields.items():
        ctx.credentials[name] = Secret(value)
    if ctx.save_credentials is not None:
        await ctx.save_credentials(ctx.credentials)


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

    # ``read_listings`` (``ListingReader`` below) is optional: a mall whose stock answers
    # carry the attributes goqd pushes implements it; ``read_listings()`` reads the
    # others' counts through ``read_stock``.

    def iter_listings(self) -> AsyncIterator[MallListing]:
        """Every listing of the store (for import)."""
        ...

    async def credential_expiry(self) -> float | None:
        """Epoch seconds when the credential expires, if the mall can tell."""
        ...


@runtime_checkable
class ListingReader(Protocol):
    """An adapter that reads the mall attributes goqd pushes along with the counts."""

    async def read_listings(self, listing_keys: Sequence[str]) -> dict[str, MallCount]:
        """What the mall shows for each key it knows: the count, and the attributes
        goqd pushes as the mall holds them (``None`` where it has none)."""
        ...


async def read_listings(adapter: MallAdapter, listing_keys: Sequence[str]) -> dict[str, MallCount]:
    """``adapter.read_listings`` where the mall reports attributes; otherwise the counts
    of ``read_stock`` with no attributes, so a mall without any needs nothing more."""
    if isinstance(adapter, ListingReader):
        return await adapter.read_listings(listing_keys)
    counts = await adapter.read_stock(listing_keys)
    return {key: MallCount(quantity=quantity) for key, quantity in counts.items()}


def push_outcome(
    item: PushItem,
    *,
    accepted: bool,
    code: str = "",
    message: str = "",
    quantity: int | None = None,
) -> PushOutcome:
    """The outcome of pushing ``item``: what the mall said, and the count it was sent."""
    return PushOutcome(
        listing_key=item.listing_key,
        version=item.version,
        accepted=accepted,
        code=code,
        message=message,
        quantity=quantity,
    )


AdapterFactory = Callable[[StoreContext], MallAdapter]
WebhookCheck = Callable[[dict[str, Secret], bytes, Mapping[str, str]], bool | None]


# --------------------------------------------------------------------------------------
# Options: what ``[stores.options]`` may hold for a mall
# --------------------------------------------------------------------------------------

OptionKind = Literal["number", "integer", "flag", "choice", "text", "codes"]


class OptionSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One ``options.<name>`` a mall accepts: its kind, its bounds and its default.

    Declared on ``MallSpec.options``; ``check-config`` refuses a value ``parse`` refuses,
    so a store never meets a bad option only once it runs.
    """

    kind: OptionKind
    default: Any
    low: float = -math.inf
    high: float = math.inf
    choices: tuple[str, ...] = ()
    # text: the value must start with this (e.g. a Shopify Location GID).
    prefix: str = ""

    def parse(self, value: object) -> Any:
        """The value as the adapter uses it; ``ValueError`` says what is wrong with it."""
        if self.kind in ("number", "integer"):
            whole = self.kind == "integer"
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not self.low <= value <= self.high
                or (whole and isinstance(value, float) and not value.is_integer())
            ):
                kind = "whole number" if whole else "number"
                raise ValueError(
                    f"must be a {kind} between {self.low:g} and {self.high:g}, got {value!r}"
                )
            return int(value) if whole else float(value)
        if self.kind == "flag":
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, got {value!r}")
            return value
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        if self.kind == "text":
            if not isinstance(value, str) or not value.startswith(self.prefix) or not value:
                want = f"text starting with {self.prefix!r}" if self.prefix else "non-empty text"
                raise ValueError(f"must be {want}, got {value!r}")
            return value
        # codes: "A,B" from a config file (option values are scalars), or a sequence.
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(c, str) for c in items):
            raise ValueError(f"must be a comma-separated list of codes, got {value!r}")
        return tuple(c.strip() for c in items if c.strip())


def opt_number(default: float, low: float, high: float) -> OptionSpec:
    return OptionSpec(kind="number", default=float(default), low=low, high=high)


def opt_integer(default: int, low: int, high: int) -> OptionSpec:
    return OptionSpec(kind="integer", default=default, low=low, high=high)


def opt_flag(default: bool) -> OptionSpec:
    return OptionSpec(kind="flag", default=default)


def opt_choice(default: str, *choices: str) -> OptionSpec:
    return OptionSpec(kind="choice", default=default, choices=choices)


def opt_text(default: str | None, *, prefix: str = "") -> OptionSpec:
    return OptionSpec(kind="text", default=default, prefix=prefix)


def opt_codes(default: tuple[str, ...]) -> OptionSpec:
    return OptionSpec(kind="codes", default=default)


class KeyExpiry(msgspec.Struct, frozen=True, kw_only=True):
    """How a mall's credential runs out, and what an operator does about it.

    ``credential`` names it for messages ("licenseKey (ライセンスキー, 90 days)").
    ``field`` is the credential-file field the adapter computes the expiry from, where
    the mall cannot be asked ("" when it can: Rakuten's expiry-date API); without it in
    the file goqd cannot warn, and says to add it. ``lifetime_s`` is how long the
    credential lasts from that field's date (0: the field is the expiry itself).
    ``renewal`` is what to do, ending in `goqctl key set`; "{store}" is replaced by the
    store's name.
    """

    credential: str
    renewal: str
    field: str = ""
    lifetime_s: float = 0.0


class MallSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A mall as the registry knows it.

    ``credential_fields`` are the keys the store's credential file (JSON object) must
    hold, ``optional_fields`` those it may hold (an issue date, say); every value becomes
    a ``Secret``. ``secret_fields`` are the ones that really are secret: only their values
    are registered with the log redactor, so a seller id or an issue date does not mask
    order ids and timestamps all over the logs. ``None`` means every field is secret, and
    a key in the file the mall does not name at all is treated as secret too.

    ``options`` are the ``[stores.options]`` the mall accepts; anything else is refused
    by ``check-config``. ``expiry`` says how the credential runs out (``KeyExpiry``),
    which ``goqd.expiry`` turns into warnings. ``webhook`` is set for malls that push
    order events (Shopify).
    """

    name: str
    title: str  # human name, e.g. "楽天市場"
    open_adapter: AdapterFactory
    limits: MallLimits
    credential_fields: tuple[str, ...]
    optional_fields: tuple[str, ...] = ()
    secret_fields: tuple[str, ...] | None = None
    options: dict[str, OptionSpec] = msgspec.field(default_factory=dict)
    default_live_statuses: tuple[str, ...] = ()
    default_cancel_statuses: tuple[str, ...] = ()
    # When the credential expires and how it is renewed; None: goqd cannot tell.
    expiry: KeyExpiry | None = None
    # For malls that push order events: (credentials, raw body, headers) -> None when the
    # signature is wrong, else whether the event may have changed orders (then goqd
    # polls that store at once). Served at ``POST /webhooks/<store>``.
    webhook: WebhookCheck | None = None

    def is_secret_field(self, name: str) -> bool:
        known = name in self.credential_fields or name in self.optional_fields
        return self.secret_fields is None or name in self.secret_fields or not known


def option_problem(spec: MallSpec, options: Mapping[str, object]) -> tuple[str, str] | None:
    """The first option in ``options`` that ``spec`` refuses, as (name, reason)."""
    for name, value in options.items():
        option = spec.options.get(name)
        if option is None:
            close = difflib.get_close_matches(name, list(spec.options), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            known = ", ".join(sorted(spec.options)) or "none"
            return name, f"unknown option for {spec.title}{hint} (known: {known})"
        try:
            option.parse(value)
        except ValueError as exc:
            return name, str(exc)
    return None


def read_options(spec: MallSpec, ctx: StoreContext) -> dict[str, Any]:
    """Every option of ``spec``: the store's value, checked, or the default.

    ``check-config`` has refused bad values already; an adapter opened another way (a
    test, a tool) still gets the same ``ConfigError`` naming the option.
    """
    problem = option_problem(spec, ctx.options)
    if problem is not None:
        raise ConfigError(f"store {ctx.store}", f"options.{problem[0]}", problem[1])
    return {
        name: option.parse(ctx.options[name]) if name in ctx.options else option.default
        for name, option in spec.options.items()
    }


def header_safe(token: str) -> bool:
    """Whether a token the mall minted can go into a request header as it is: visible
    ASCII only. Anything else would make every later request fail to encode."""
    return bool(token) and token.isascii() and token.isprintable() and " " not in token


# --------------------------------------------------------------------------------------
# Retry-After
# --------------------------------------------------------------------------------------

# The longest a mall's Retry-After may hold a store back. Longer is asked again after
# this: a typo or a hostile value ("inf", a date in the year 9999) must never park a
# store for good, and ten minutes is longer than any documented throttle of the malls.
RETRY_AFTER_CAP_S = 600.0
# delta-seconds (RFC 9110) with a fraction, which some malls send; more than 12 digits
# is no wait any mall means.
DELTA_SECONDS = re.compile(r"\s*\d{1,12}(?:\.\d{1,9})?\s*")


def parse_retry_after(
    value: str | None, *, now: float, default: float, cap: float = RETRY_AFTER_CAP_S
) -> float:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    A date is relative to ``now`` (the adapter's wall clock); one in the past means
    now. Anything else (absent, ``inf``, ``nan``, negative, exponents, garbage) is
    ``default``. The result is always finite and within ``[0, cap]``.
    """
    seconds: float | None = None
    if value and len(value) <= 64:
        if DELTA_SECONDS.fullmatch(value):
            seconds = float(value)
        else:
            when = parse_http_date(value)
            if when is not None:
                seconds = max(0.0, when - now)
    return bounded_wait(seconds, default=default, cap=cap)


def bounded_wait(seconds: float | None, *, default: float, cap: float = RETRY_AFTER_CAP_S) -> float:
    """A wait a mall asked for (or one computed from its numbers), made safe to sleep:
    ``default`` when missing or not finite, and within ``[0, cap]``."""
    if seconds is None or not math.isfinite(seconds):
        seconds = default if math.isfinite(default) else cap
    return min(max(seconds, 0.0), cap)


# --------------------------------------------------------------------------------------
# The guard: one strange response fails one call, never the store
# --------------------------------------------------------------------------------------

# No mall counts this many units of one listing; a larger number is a broken response,
# and the ledger (SQLite integers) must not be the one to find out.
QUANTITY_LIMIT = 10**12

T = TypeVar("T")


class GuardedAdapter:
    """A ``MallAdapter`` whose calls raise only ``MallError``.

    Adapters translate the failures they expect; a response shaped in a way nobody
    expected can still make their parsing raise ``KeyError``, ``IndexError``,
    ``RecursionError`` and the like. Here any such exception becomes a
    ``MallProtocolError`` naming the mall, the store and the call (``LEVEL_TEMPORARY``:
    the store goes degraded and retries), and the traceback is logged once per call and exception
    type, since it is a bug to fix. Results are checked for numbers no mall sends.
    ``trio.Cancelled`` and other ``BaseException`` pass through untouched.
    """

    def __init__(self, inner: MallAdapter, *, store: str, mall: str) -> None:
        self.inner = inner
        self.mall = inner.mall
        self.limits = inner.limits
        self._store = store
        self._logged: set[tuple[str, str]] = set()

    def _error(self, api: str, message: str) -> MallProtocolError:
        return MallProtocolError(
            f"{api}: {message}", mall=self.mall, store=self._store, code="unreadable_response"
        )

    def _unexpected(self, api: str, exc: Exception) -> MallProtocolError:
        kind = type(exc).__name__
        if (api, kind) not in self._logged:
            self._logged.add((api, kind))
            log.error(
                "adapter_raised_unexpected",
                store=self._store,
                mall=self.mall,
                api=api,
                error=kind,
                exc_info=exc,
            )
        # Only the type: the text of an unexpected exception may quote the response.
        return self._error(api, f"the response could not be read ({kind})")

    async def _call(self, api: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except MallError:
            raise
        except Exception as exc:
            raise self._unexpected(api, exc) from exc

    def _check_quantity(self, api: str, what: str, quantity: object) -> None:
        if not isinstance(quantity, int) or not -QUANTITY_LIMIT <= quantity <= QUANTITY_LIMIT:
            raise self._error(api, f"{what}: quantity {quantity!r} is not a plausible count")

    async def check_credentials(self) -> None:
        await self._call("check_credentials", self.inner.check_credentials)

    async def fetch_orders(self, cursor: str | None) -> OrderPage:
        page = await self._call("fetch_orders", lambda: self.inner.fetch_orders(cursor))
        for line in page.lines:
            self._check_quantity("fetch_orders", f"order {line.order_id}", line.quantity)
            if not math.isfinite(line.updated_at):
                raise self._error("fetch_orders", f"order {line.order_id}: no usable time")
        return page

    async def push_stock(self, items: Sequence[PushItem]) -> list[PushOutcome]:
        return await self._call("push_stock", lambda: self.inner.push_stock(items))

    async def read_stock(self, listing_keys: Sequence[str]) -> dict[str, int | None]:
        counts = await self._call("read_stock", lambda: self.inner.read_stock(listing_keys))
        for key, quantity in counts.items():
            if quantity is not None:
                self._check_quantity("read_stock", key, quantity)
        return counts

    async def read_listings(self, listing_keys: Sequence[str]) -> dict[str, MallCount]:
        found = await self._call("read_listings", lambda: read_listings(self.inner, listing_keys))
        for key, count in found.items():
            if count.quantity is not None:
                self._check_quantity("read_listings", key, count.quantity)
            self._check_attrs("read_listings", key, count.attrs)
        return found

    def _check_attrs(self, api: str, what: str, attrs: ListingAttrs) -> None:
        # A lead time of SQLite-breaking size is a broken response like such a count.
        lead = attrs.lead_time_days
        if lead is not None and (isinstance(lead, bool) or not 0 <= lead <= QUANTITY_LIMIT):
            raise self._error(api, f"{what}: lead time {lead!r} is not a plausible number")

    async def iter_listings(self) -> AsyncIterator[MallListing]:
        try:
            async with aclosing(self.inner.iter_listings()) as listings:  # type: ignore[type-var]
                async for listing in listings:
                    if listing.quantity is not None:
                        self._check_quantity("iter_listings", listing.listing_key, listing.quantity)
                    yield listing
        except MallError:
            raise
        except Exception as exc:
            raise self._unexpected("iter_listings", exc) from exc

    async def credential_expiry(self) -> float | None:
        expiry = await self._call("credential_expiry", self.inner.credential_expiry)
        if expiry is not None and not math.isfinite(expiry):
            raise self._error("credential_expiry", "not a usable time")
        return expiry


def guard_adapter(adapter: MallAdapter, ctx: StoreContext) -> MallAdapter:
    """``adapter`` behind a ``GuardedAdapter`` (once: guarding twice changes nothing)."""
    if isinstance(adapter, GuardedAdapter):
        return adapter
    return GuardedAdapter(adapter, store=ctx.store, mall=ctx.mall)


def guarded(factory: AdapterFactory) -> AdapterFactory:
    """A factory whose adapters are guarded (the registry hands out only these)."""
    if getattr(factory, "_goqd_guarded", False):
        return factory

    def open_guarded(ctx: StoreContext) -> MallAdapter:
        return guard_adapter(factory(ctx), ctx)

    open_guarded._goqd_guarded = True  # type: ignore[attr-defined]
    return open_guarded


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context (certifi's CA bundle, as httpx builds it) for every mall client.

    Each ``httpx.AsyncClient`` otherwise loads the CA bundle into a context of its own,
    once per store on the way to READY: 1.1 s for 50 stores under a profiler, and the
    daemon's RSS at READY fell from 126 to 74 MB with this and the other start-up
    changes (BENCHMARKS.md, scale).
    """
    return httpx.create_ssl_context()
