"""Amazon SP-API adapter for the JP marketplace (Orders v0, Listings Items 2021-08-01).

Facts and their sources are in docs/malls.md §3 and in Amazon's own models
(``tests/fixtures/spapi``); the tests validate every request this module sends, and every
response the simulator (``goqd.sim.amazon``) answers, against those models. Choices
marked [I] are assumptions the simulator mirrors and makes configurable.

Auth. Login with Amazon (LWA) ``POST /auth/o2/token`` with the refresh-token grant gives
an access token for one hour [V]; it goes out as ``x-amz-access-token`` and is renewed a
minute before it expires. A 403 with a token we did not just mint is refreshed once and
retried (Amazon says "Expired Token" with a 403 [V]); a 403 right after a refresh, or an
LWA ``invalid_grant`` / ``invalid_client``, is ``MallAuthError`` (``LEVEL_CREDENTIAL``:
the yearly app authorization [V-secondary] must be renewed).

Orders. ``getOrders`` with ``LastUpdatedAfter = cursor - overlap_s`` and
``LastUpdatedBefore = now - lag_s``; Amazon refuses a ``LastUpdatedBefore`` later than two
minutes before its own clock and most updates show up two minutes after they happen
[V], so the window ends there and the cursor is that end. ``lag_s`` defaults to 125: the
documented two minutes plus 5 s for clock skew [I: a few seconds of skew is a reported
cause of InvalidInput]. Only ``MarketplaceIds`` and ``NextToken`` are sent for the next
pages [I: developers report InvalidInput when filters go with the token]. Only MFN orders
are asked for (``FulfillmentChannels=MFN``) and any AFN order that comes anyway is
skipped: FBA stock is Amazon's, not the merchant's [I]. ``getOrderItems`` is called per
order; the items of an order whose ``LastUpdateDate`` has not changed since they were read
are reused from the adapter's state (``ctx.state``, kept across restarts), so neither the
overlap nor a restart costs extra ``getOrderItems`` calls (0.5 per second [V]). Amazon
never changes an item without touching ``LastUpdateDate``, which is defined as "any
change in order status" [V]. The overlap (``overlap_s``, 60 s) is for updates Amazon
shows later than ``lag_s`` after they happen: one shown up to ``lag_s + overlap_s``
(185 s) late is still read. Every poll pages through every order of its window again
(getOrders cannot leave out the known ones), so the overlap is kept that short: with
600 s and pages of two, a burst of orders spent getOrders' burst of 20 on re-reading and
then came in at one page a minute. Line id ``OrderItemId``; listing key and
link code ``SellerSKU`` (option ``link_field = "asin"`` links by ASIN instead);
``updated_at`` is ``LastUpdateDate``.

Statuses. Live: PendingAvailability, Pending, Unshipped, PartiallyShipped, Shipped,
InvoiceUnconfirmed (docs/malls.md §3.3 [I]: Amazon lowers the MFN quantity at purchase, so
every non-cancelled order holds its units, pre-orders included). Canceled is a
cancellation Amazon never undoes (terminal). Unfulfillable applies to Multi-Channel
Fulfillment orders only [V] and is in neither set.

Stock. ``patchListingsItem`` replaces ``/attributes/fulfillment_availability`` with one
``DEFAULT`` (merchant-fulfilled) entry: the quantity, plus the listing's
``lead_time_to_ship_max_days`` and ``restock_date`` when goqd has them (Amazon drops the
keys a replace leaves out [V: amzn/selling-partner-api-models#4406], which is why they
go with every push). One call per listing under the 5-per-second plan [V], paced at 90 %
of it (``RATE_MARGIN``) from each answer; ``push_batch`` is 20 so one batch takes about
four seconds. HTTP 200 with status ``INVALID`` (or a 400 for that listing) is a
per-listing refusal; ``ACCEPTED`` is asynchronous and may never apply [V], which
``read_stock`` reveals in the discrepancy check.

Reading counts. ``read_stock`` asks ``searchListingsItems`` for up to 20 SKUs at once
(``identifiers`` + ``identifiersType=SKU`` [V]) with ``fulfillmentAvailability``: the
sale watch reads up to 100 listings every 5 s, which ``getListingsItem`` (one listing a
call) could not afford. [I] search answers from the same listing data as
``getListingsItem``; if it were served from a lagging index, the watch would see sales
later, never invent one.

Listings. ``searchListingsItems`` (in the 2021-08-01 model [V]) pages through every
listing with summaries, attributes and fulfillment availability, 20 per page. Listings
without a ``DEFAULT`` fulfillment channel (FBA) are left out of sync.

Options (checked against ``SPEC.options``): ``overlap_s`` (60), ``initial_lookback_s``
(86400), ``lag_s`` (125; the real SP-API refuses less than 120, lower it only against the
simulator), ``link_field`` (``"sku"`` or ``"asin"``), ``marketplace_id``
(``A1VC38T7YXB528``), ``page_size`` (getOrders ``MaxResultsPerPage``, 1-100, default 100).
Credentials: ``client_id``, ``client_secret``, ``refresh_token``, ``seller_id`` and
optionally ``authorized_at`` (YYYY-MM-DD, the day the seller authorized the app).

This module must never log or format the LWA client secret, the refresh token or an
access token: they reach httpx only in the token form and the ``x-amz-access-token``
header, and every message is built from Amazon's own error codes and texts.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import msgspec

from goqd.errors import ConfigError, MallAuthError, MallError, MallProtocolError, MallRateLimited
from goqd.malls.adapterstate import SeenOrders
from goqd.malls.base import (
    DECODE_ERRORS,
    KeyExpiry,
    MallLimits,
    MallSpec,
    OrderPage,
    StoreContext,
    opt_choice,
    opt_integer,
    opt_number,
    opt_text,
    push_outcome,
    read_options,
)
from goqd.malls.client import (
    OAUTH_REFUSALS,
    MallClient,
    Reply,
    Table,
    TokenAuth,
    TokenResponse,
    error_class,
    short,
)
from goqd.malls.ratelimit import shared_bucket
from goqd.messages import ListingAttrs, MallCount, MallListing, OrderLine, PushItem, PushOutcome

MALL = "amazon"
MARKETPLACE_JP = "A1VC38T7YXB528"
JST = timezone(timedelta(hours=9), "JST")

LWA_PATH = "/auth/o2/token"
ORDERS_PATH = "/orders/v0/orders"
LISTINGS_PATH = "/listings/2021-08-01/items"

AUTHORIZATION_LIFETIME_S = 365 * 86400.0  # app authorization is renewed yearly [V-secondary]
# The credential-file field with the day the seller authorised the app (YYYY-MM-DD).
AUTHORIZED_FIELD = "authorized_at"
ORDERS_PAGE_MAX = 100  # MaxResultsPerPage 1-100 [V]
SEARCH_PAGE_MAX = 20  # searchListingsItems pageSize maximum [V]
LEAD_TIME_MAX_DAYS = 30  # "greater than the allowed maximum '30'" [V: models#2344]
MAX_PAGES = 10_000  # a NextToken chain longer than this is a mall bug, not data
USER_AGENT = "goqd/0.1 (Language=Python)"

# Usage plans [V: the models' operation descriptions]: (rate per second, burst).
# The buckets refill at RATE_MARGIN of these rates; see there.
RATES: dict[str, tuple[float, float]] = {
    "lwa": (1.0, 1.0),  # [I] LWA publishes no rate; one token an hour is the normal use
    "getOrders": (0.0167, 20.0),  # paced at the full rate: see RATE_MARGIN
    "getOrderItems": (0.5, 30.0),
    "getListingsItem": (5.0, 10.0),
    "patchListingsItem": (5.0, 5.0),
    "searchListingsItems": (5.0, 5.0),
}
# Amazon counts a call on arrival, so every call is paced from its answer
# (``TokenBucket.slot``), which no delay on the way can undercut: spacing sends 10 %
# wider alone left the first token after a spent burst 22 ms of slack, and six patches
# once arrived within 184 ms (429). The 10 % stays for Amazon's own timekeeping (how it
# refills and rounds its buckets is not documented). Bursts stay as documented: the
# 429s came after the burst was spent, never from it. getOrders is the exception: one
# call a minute is the poll itself, its burst of 20 absorbs any jitter, and 90 % would
# stretch a 60 s poll interval to 66.5 s once the burst is spent.
RATE_MARGIN = 0.9
FULL_RATE = frozenset({"getOrders"})

ORDER_STATUSES = frozenset(
    {
        "PendingAvailability",
        "Pending",
        "Unshipped",
        "PartiallyShipped",
        "Shipped",
        "InvoiceUnconfirmed",
        "Canceled",
        "Unfulfillable",
    }
)
LIVE_STATUSES = (
    "PendingAvailability",
    "Pending",
    "Unshipped",
    "PartiallyShipped",
    "Shipped",
    "InvoiceUnconfirmed",
)
CANCEL_STATUSES = ("Canceled",)
TERMINAL_STATUSES = frozenset({"Canceled"})

DEFAULT_CHANNEL = "DEFAULT"  # merchant-fulfilled (MFN) [V]
LINK_FIELDS = ("sku", "asin")
CREDENTIAL_FIELDS = ("client_id", "client_secret", "refresh_token", "seller_id")
# How SP-API's replies are classified (an access token refused is the app's
# authorisation: LEVEL_CREDENTIAL), and LWA's (an OAuth refusal of the refresh token too).
TABLE: Table = {401: MallAuthError, 403: MallAuthError, 429: MallRateLimited}
LWA_TABLE: Table = {**TABLE, **OAUTH_REFUSALS}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")

# The watch reads 100 listings a round: five searchListingsItems calls, about a second
# of its 5 req/s plan, every 5 s; a push batch of 20 is read in one call first.
LIMITS = MallLimits(push_batch=20, read_batch=20, min_poll_interval=60.0, watch_max=100)


T = TypeVar("T")

# --------------------------------------------------------------------------------------
# Wire formats. Response Structs ignore unknown fields (Amazon adds fields); fields
# without a default are the ones we cannot work without.
# --------------------------------------------------------------------------------------


class _Pascal(msgspec.Struct, kw_only=True, rename="pascal"):
    pass


class _Camel(msgspec.Struct, kw_only=True, rename="camel"):
    pass


class _Error(msgspec.Struct, kw_only=True):
    code: str | None = None
    message: str | None = None
    details: str | None = None


class _ErrorList(msgspec.Struct, kw_only=True):
    errors: list[_Error] | None = None


class _Order(_Pascal):
    amazon_order_id: str
    purchase_date: str
    last_update_date: str
    order_status: str
    fulfillment_channel: str | None = None
    marketplace_id: str | None = None


class _OrdersList(_Pascal):
    orders: list[_Order]
    next_token: str | None = None


class _GetOrdersResponse(msgspec.Struct, kw_only=True):
    payload: _OrdersList


class _OrderItem(_Pascal):
    asin: str = msgspec.field(name="ASIN")
    order_item_id: str
    quantity_ordered: int
    seller_sku: str | None = msgspec.field(default=None, name="SellerSKU")


class _OrderItemsList(_Pascal):
    amazon_order_id: str
    order_items: list[_OrderItem]
    next_token: str | None = None


class _GetOrderItemsResponse(msgspec.Struct, kw_only=True):
    payload: _OrderItemsList


class _Issue(_Camel):
    code: str
    message: str
    severity: str = "ERROR"


class _Submission(_Camel):
    sku: str
    status: str
    submission_id: str
    issues: list[_Issue] | None = None


class _Availability(_Camel):
    fulfillment_channel_code: str
    quantity: int | None = None


class _AttrAvailability(msgspec.Struct, kw_only=True):
    # Attribute names are snake_case as the product type definitions spell them.
    fulfillment_channel_code: str | None = None
    quantity: int | None = None
    lead_time_to_ship_max_days: int | None = None
    restock_date: str | None = None
    marketplace_id: str | None = None


class _Attributes(msgspec.Struct, kw_only=True):
    fulfillment_availability: list[_AttrAvailability] | None = None


class _Summary(_Camel):
    marketplace_id: str
    asin: str | None = None
    item_name: str | None = None


class _Item(_Camel):
    sku: str
    summaries: list[_Summary] | None = None
    attributes: _Attributes | None = None
    fulfillment_availability: list[_Availability] | None = None


class _Pagination(_Camel):
    next_token: str | None = None


class _ItemSearchResults(_Camel):
    number_of_results: int
    items: list[_Item]
    pagination: _Pagination | None = None


class _SeenOrder(msgspec.Struct, frozen=True):
    """Items of one order as of one ``LastUpdateDate`` (kept in ``ctx.state``)."""

    last_update_date: str
    items: tuple[_OrderItem, ...]


# The adapter's records of items already read: "items/<AmazonOrderId>".
_SEEN_KEY = "items/"


# --------------------------------------------------------------------------------------
# Time helpers: SP-API speaks ISO 8601; goqd sends UTC with a Z, to the second.
# --------------------------------------------------------------------------------------


def format_iso(epoch: float) -> str:
    return datetime.fromtimestamp(math.floor(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> float:
    """Epoch seconds of an ISO 8601 datetime; one without an offset is UTC."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def _lwa_url(configured: str) -> str:
    """``urls["lwa"]`` may be the full endpoint or just a host; a bare host gets the path."""
    if urlsplit(configured).path in ("", "/"):
        return configured.rstrip("/") + LWA_PATH
    return configured


class AmazonAdapter:
    """One seller's SP-API session: the HTTP client (borrowed), the LWA access token
    (in memory only), a token bucket per SP-API operation, and the order items seen on
    the previous poll."""

    mall = MALL
    limits = LIMITS

    def __init__(self, ctx: StoreContext) -> None:
        for name in CREDENTIAL_FIELDS:
            value = ctx.credentials.get(name)
            if value is None or not value.reveal():
                raise ConfigError(f"store {ctx.store}", "credentials", f"{name} is missing")
        self._ctx = ctx
        opts = read_options(SPEC, ctx)
        self._overlap_s: float = opts["overlap_s"]
        self._initial_lookback_s: float = opts["initial_lookback_s"]
        self._lag_s: float = opts["lag_s"]
        self._page_size: int = opts["page_size"]
        self._marketplace: str = opts["marketplace_id"]
        self._link_field: str = opts["link_field"]
        self._live = frozenset(ctx.live_statuses or LIVE_STATUSES)
        self._cancel = frozenset(ctx.cancel_statuses or CANCEL_STATUSES)
        unknown = (self._live | self._cancel) - ORDER_STATUSES
        if unknown:
            raise ConfigError(
                f"store {ctx.store}",
                "live-statuses/cancel-statuses",
                f"not Amazon OrderStatus values: {', '.join(sorted(unknown))}",
            )
        self._seller_id = ctx.credentials["seller_id"].reveal()
        self._lwa_url = _lwa_url(ctx.urls.get("lwa", ctx.base_url))
        self._base = ctx.base_url.rstrip("/")
        self._buckets = {
            api: shared_bucket(
                ctx.rate_buckets, api, rate * (1.0 if api in FULL_RATE else RATE_MARGIN), burst
            )
            for api, (rate, burst) in RATES.items()
        }
        self._client = MallClient(
            ctx, MALL, model="the SP-API model", is_secret=SPEC.is_secret_field
        )
        self._auth = TokenAuth(self._client, self._mint)
        self._seen = SeenOrders(ctx.state, _SEEN_KEY, _SeenOrder)

    # -- errors ------------------------------------------------------------------------

    def _decode(self, kind: type[T], reply: Reply, api: str) -> T:
        return self._client.decode(kind, reply.body, api)

    @staticmethod
    def _first_error(body: bytes) -> tuple[str, str]:
        """(code, message + details) of the first ``errors`` entry; best effort."""
        try:
            errors = msgspec.json.decode(body, type=_ErrorList).errors or []
        except DECODE_ERRORS:
            errors = []
        if not errors:
            return "", ""
        first = errors[0]
        text = " ".join(p for p in (short(first.message), short(first.details)) if p)
        return first.code or "", text

    def _raise_for_status(self, api: str, reply: Reply) -> None:
        code, text = self._first_error(reply.body)
        detail = " ".join(p for p in (code, text) if p) or "no error body"
        status = reply.status
        cls = error_class(TABLE, status)
        message = f"{api}: HTTP {status} ({detail})"
        if cls is MallAuthError:
            message = (
                f"{api}: Amazon refused the access ({detail}, HTTP {status}); check that the "
                "app is still authorized for this seller (Seller Central > Apps) and run "
                "`goqctl key set`"
            )
            code = code or "Unauthorized"
        elif cls is MallRateLimited:
            message = f"{api}: throttled ({detail})"
            code = code or "QuotaExceeded"
        raise self._client.reply_error(
            cls,
            message,
            code,
            reply=reply,
            bucket=self._buckets[api],
            retry_default=_retry_default(api),
        )

    # -- HTTP --------------------------------------------------------------------------

    async def _call(
        self,
        api: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        accept: tuple[int, ...] = (200,),
    ) -> Reply:
        """One SP-API call: rate, access token, status mapping.

        A 403 with an access token minted before this call is taken for an expired one:
        the token is refreshed and the call retried once.
        """
        content = None if body is None else msgspec.json.encode(body)
        for attempt in range(2):
            token, minted = await self._auth.token()
            headers = {
                "x-amz-access-token": token.reveal(),
                "accept": "application/json",
                "user-agent": USER_AGENT,
            }
            if content is not None:
                headers["content-type"] = "application/json"
            # Paced from the answer (``TokenBucket.slot``): Amazon counts a call when it
            # arrives. Paced from the send, six patches once arrived within 184 ms, where
            # 5 a second with a burst of 5 allows six in no less than 200 ms.
            reply = await self._client.send(
                api,
                method,
                self._base + path,
                headers=headers,
                bucket=self._buckets[api],
                content=content,
                params=params,
            )
            if reply.status in accept:
                return reply
            if reply.status == 403 and attempt == 0 and not minted:
                await self._auth.refresh(stale=token)
                continue
            self._raise_for_status(api, reply)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _mint(self) -> TokenResponse:
        """An access token from Login with Amazon (the refresh-token grant)."""
        creds = self._ctx.credentials
        form = {
            "grant_type": "refresh_token",
            "refresh_token": creds["refresh_token"].reveal(),
            "client_id": creds["client_id"].reveal(),
            "client_secret": creds["client_secret"].reveal(),
        }
        return await self._client.request_token(
            "lwa",
            self._lwa_url,
            form,
            headers={
                "content-type": "application/x-www-form-urlencoded;charset=UTF-8",
                "accept": "application/json",
                "user-agent": USER_AGENT,
            },
            bucket=self._buckets["lwa"],
            table=LWA_TABLE,
            retry_default=_retry_default("lwa"),
            auth_hint=(
                "Login with Amazon refused the credential: re-authorize the app for this "
                "seller and run `goqctl key set`"
            ),
        )

    # -- credentials -------------------------------------------------------------------

    async def check_credentials(self) -> None:
        """A fresh LWA token, then one listing search and one single-order getOrders.

        Polling needs the Orders role and pushing the Listings role, and ``seller_id``
        must belong to the token; the two cheapest calls that prove all three cost one
        of getOrders' 20 burst tokens and one listings token.
        """
        await self._auth.refresh()
        await self._call(
            "searchListingsItems",
            "GET",
            f"{LISTINGS_PATH}/{quote(self._seller_id, safe='')}",
            params={"marketplaceIds": self._marketplace, "pageSize": "1"},
        )
        end = self._ctx.mall_clock.floor(self._ctx.clock()) - self._lag_s
        await self._call(
            "getOrders",
            "GET",
            ORDERS_PATH,
            params={
                "MarketplaceIds": self._marketplace,
                "LastUpdatedAfter": format_iso(end - 3600),
                "LastUpdatedBefore": format_iso(end),
                "MaxResultsPerPage": "1",
            },
        )

    async def credential_expiry(self) -> float | None:
        """``authorized_at`` + 365 days, when the credential file says when that was."""
        given = self._ctx.credentials.get(AUTHORIZED_FIELD)
        if given is None or not given.reveal():
            return None
        try:
            day = date.fromisoformat(given.reveal().strip()[:10])
        except ValueError as exc:
            raise self._client.error(
                MallProtocolError, "credential field authorized_at is not a YYYY-MM-DD date"
            ) from exc
        # [I] Seller Central shows the authorization day in the seller's local time.
        start = datetime(day.year, day.month, day.day, tzinfo=JST).timestamp()
        return start + AUTHORIZATION_LIFETIME_S

    # -- orders ------------------------------------------------------------------------

    async def fetch_orders(self, cursor: str | None) -> OrderPage:
        # Every time here is Amazon's (its clock as its responses show it): a skew between
        # the clocks never moves the window past orders, and LastUpdatedBefore stays the
        # 2 minutes before Amazon's now that it must be (goqd.malls.clock).
        began = self._ctx.clock()
        clock = self._ctx.mall_clock
        cursor_at: float | None = None
        if cursor is not None:
            try:
                cursor_at = parse_iso(cursor)
            except ValueError as exc:
                raise self._client.error(
                    MallProtocolError, f"cursor {cursor!r} is not an ISO 8601 datetime"
                ) from exc
        span = clock.window(
            began,
            cursor_at,
            overlap=self._overlap_s,
            initial_lookback=self._initial_lookback_s,
            lag=self._lag_s,
        )
        end = float(math.floor(span.end))
        start = min(span.start, end)
        orders = await self._search_orders(start, end)
        window: set[str] = set()
        lines: list[OrderLine] = []
        for order in orders:
            if order.fulfillment_channel == "AFN":
                continue
            status = order.order_status
            if status in self._live:
                cancelled = False
            elif status in self._cancel:
                cancelled = True
            else:
                continue
            window.add(order.amazon_order_id)
            known = await self._items_of(order)
            lines += self._order_lines(order, known.items, cancelled)
        self._seen.keep_only(window)
        # Never later than Amazon's time when the search ran, less the lag; the sale
        # watch compares complete_before with goqd's own clock.
        done = float(math.floor(clock.cursor_after(began, end, lag=self._lag_s)))
        return OrderPage(
            lines=tuple(lines),
            cursor=format_iso(done),
            orders_seen=len(orders),
            complete_before=clock.to_wall_floor(done),
        )

    async def _items_of(self, order: _Order) -> _SeenOrder:
        """The order's items at its ``LastUpdateDate``: read once, then from the state.

        Kept at once, so a poll that fails later (a 429 on the next order) or a process
        killed after it does not read them again.
        """
        previous = self._seen.get(order.amazon_order_id)
        if previous is not None and previous.last_update_date == order.last_update_date:
            return previous
        items = await self._order_items(order.amazon_order_id)
        known = _SeenOrder(order.last_update_date, items)
        self._seen.put(order.amazon_order_id, known)
        return known

    async def _search_orders(self, start: float, end: float) -> list[_Order]:
        api = "getOrders"
        params: dict[str, str] = {
            "MarketplaceIds": self._marketplace,
            "LastUpdatedAfter": format_iso(start),
            "LastUpdatedBefore": format_iso(end),
            "OrderStatuses": ",".join(sorted(self._live | self._cancel)),
            "FulfillmentChannels": "MFN",
            "MaxResultsPerPage": str(self._page_size),
        }
        found: dict[str, _Order] = {}
        tokens: set[str] = set()
        for _ in range(MAX_PAGES):
            reply = await self._call(api, "GET", ORDERS_PATH, params=params)
            page = self._decode(_GetOrdersResponse, reply, api).payload
            for order in page.orders:
                known = found.get(order.amazon_order_id)
                if known is None or self._stamp(known) <= self._stamp(order):
                    found[order.amazon_order_id] = order
            token = page.next_token
            if not token:
                return list(found.values())
            if token in tokens:
                raise self._client.error(MallProtocolError, f"{api}: NextToken repeated itself")
            tokens.add(token)
            params = {"MarketplaceIds": self._marketplace, "NextToken": token}
        raise self._client.error(MallProtocolError, f"{api}: more than {MAX_PAGES} pages")

    def _stamp(self, order: _Order) -> float:
        try:
            return parse_iso(order.last_update_date)
        except ValueError as exc:
            raise self._client.error(
                MallProtocolError,
                f"getOrders: order {order.amazon_order_id} has a malformed LastUpdateDate",
            ) from exc

    async def _order_items(self, order_id: str) -> tuple[_OrderItem, ...]:
        api = "getOrderItems"
        path = f"{ORDERS_PATH}/{quote(order_id, safe='')}/orderItems"
        params: dict[str, str] = {}
        items: list[_OrderItem] = []
        tokens: set[str] = set()
        for _ in range(MAX_PAGES):
            reply = await self._call(api, "GET", path, params=params)
            page = self._decode(_GetOrderItemsResponse, reply, api).payload
            items += page.order_items
            if not page.next_token:
                return tuple(items)
            if page.next_token in tokens:
                raise self._client.error(MallProtocolError, f"{api}: NextToken repeated itself")
            tokens.add(page.next_token)
            params = {"NextToken": page.next_token}
        raise self._client.error(MallProtocolError, f"{api}: more than {MAX_PAGES} pages")

    def _order_lines(
        self, order: _Order, items: Sequence[_OrderItem], cancelled: bool
    ) -> list[OrderLine]:
        updated_at = self._stamp(order)
        status = order.order_status
        terminal = cancelled and status in TERMINAL_STATUSES
        lines = []
        for item in items:
            # MFN lines of the seller's own offers always carry SellerSKU; a line without
            # one is still returned (the ledger parks it) under a key naming its ASIN.
            key = item.seller_sku or f"asin:{item.asin}"
            link = item.asin if self._link_field == "asin" else (item.seller_sku or "")
            quantity = max(item.quantity_ordered, 0)
            lines.append(
                OrderLine(
                    order_id=order.amazon_order_id,
                    line_id=item.order_item_id,
                    listing_key=key,
                    link_code=link,
                    quantity=quantity,
                    cancelled=cancelled or quantity == 0,
                    terminal=terminal,
                    updated_at=updated_at,
                    status=status,
                )
            )
        return lines

    # -- stock -------------------------------------------------------------------------

    def _item_path(self, sku: str) -> str:
        return f"{LISTINGS_PATH}/{quote(self._seller_id, safe='')}/{quote(sku, safe='')}"

    async def push_stock(self, items: Sequence[PushItem]) -> list[PushOutcome]:
        """One ``patchListingsItem`` per item, in order, under the 5-per-second bucket.

        A failure part way (typically a 429) carries the outcomes of the patches Amazon
        already answered (``MallError.done``): without them the whole batch went out
        again and, under a burst, the same first patches were re-sent after every
        throttle."""
        outcomes: list[PushOutcome] = []
        try:
            for item in items:
                outcomes.append(await self._patch(item))
        except MallError as exc:
            exc.done = tuple(outcomes)
            raise
        return outcomes

    async def _patch(self, item: PushItem) -> PushOutcome:
        problem = _push_problem(item)
        if problem:
            return _outcome(item, accepted=False, code="invalid_value", message=problem)
        entry: dict[str, Any] = {
            "fulfillment_channel_code": DEFAULT_CHANNEL,
            "quantity": item.quantity,
        }
        if item.attrs.lead_time_days is not None:
            entry["lead_time_to_ship_max_days"] = item.attrs.lead_time_days
        if item.attrs.restock_date is not None:
            entry["restock_date"] = item.attrs.restock_date
        body = {
            "productType": "PRODUCT",
            "patches": [
                {
                    "op": "replace",
                    "path": "/attributes/fulfillment_availability",
                    "value": [entry],
                }
            ],
        }
        api = "patchListingsItem"
        reply = await self._call(
            api,
            "PATCH",
            self._item_path(item.listing_key),
            params={"marketplaceIds": self._marketplace},
            body=body,
            accept=(200, 400),
        )
        if reply.status == 400:
            # InvalidInput about this listing (its SKU or its values): refuse it alone.
            code, text = self._first_error(reply.body)
            return _outcome(
                item, accepted=False, code=code or "InvalidInput", message=text or "HTTP 400"
            )
        submission = self._decode(_Submission, reply, api)
        issues = submission.issues or []
        text = "; ".join(f"{i.code} {short(i.message)}" for i in issues)
        if submission.status == "ACCEPTED":
            return _outcome(item, accepted=True, message=text)
        errors = [i for i in issues if i.severity == "ERROR"] or issues
        return _outcome(
            item,
            accepted=False,
            code=errors[0].code if errors else submission.status,
            message=text or f"status {submission.status}",
        )

    async def read_stock(self, listing_keys: Sequence[str]) -> dict[str, int | None]:
        """The MFN quantity Amazon holds for each key, 20 SKUs a ``searchListingsItems``
        call (``identifiers`` with ``identifiersType=SKU``, at most 20 [V]): a twentieth
        of the calls ``getListingsItem`` takes, which the sale watch needs. A SKU with a
        comma cannot be named in that comma-delimited list and is read on its own.

        Unknown SKUs and FBA-only listings are absent from the result.
        """
        found = await self._read(listing_keys, attributes=False)
        return {key: count.quantity for key, count in found.items()}

    async def read_listings(self, listing_keys: Sequence[str]) -> dict[str, MallCount]:
        """``read_stock``'s counts with the lead time and restock date of each listing's
        ``DEFAULT`` entry, from the same calls asked for ``attributes`` too."""
        return await self._read(listing_keys, attributes=True)

    async def _read(self, listing_keys: Sequence[str], *, attributes: bool) -> dict[str, MallCount]:
        # ``attributes`` carries the whole listing (its title, bullet points and the
        # like): only a diff asks for it, not the sale watch's frequent reads.
        included = "attributes,fulfillmentAvailability" if attributes else "fulfillmentAvailability"
        keys = [k for k in dict.fromkeys(listing_keys) if k]
        counts: dict[str, MallCount] = {}
        listed = [k for k in keys if "," not in k]
        api = "searchListingsItems"
        path = f"{LISTINGS_PATH}/{quote(self._seller_id, safe='')}"
        for start in range(0, len(listed), SEARCH_PAGE_MAX):
            chunk = listed[start : start + SEARCH_PAGE_MAX]
            wanted = set(chunk)
            params = {
                "marketplaceIds": self._marketplace,
                "includedData": included,
                "identifiers": ",".join(chunk),
                "identifiersType": "SKU",
                "pageSize": str(SEARCH_PAGE_MAX),
            }
            for _ in range(MAX_PAGES):  # 20 SKUs fit one page; follow a token anyway
                reply = await self._call(api, "GET", path, params=params)
                page = self._decode(_ItemSearchResults, reply, api)
                for item in page.items:
                    found = _mall_count(item, self._marketplace)
                    if item.sku in wanted and found is not None:
                        counts[item.sku] = found
                token = page.pagination.next_token if page.pagination else None
                if not token or not page.items:
                    break
                params = {**params, "pageToken": token}
        for key in keys:
            if "," in key:
                found_one = await self._read_one(key, included)
                if found_one is not None:
                    counts[key] = found_one
        return counts

    async def _read_one(self, key: str, included: str) -> MallCount | None:
        """``getListingsItem``: one listing's MFN quantity, None if unknown or FBA."""
        api = "getListingsItem"
        reply = await self._call(
            api,
            "GET",
            self._item_path(key),
            params={"marketplaceIds": self._marketplace, "includedData": included},
            accept=(200, 404),
        )
        if reply.status == 404:
            return None
        return _mall_count(self._decode(_Item, reply, api), self._marketplace)

    # -- listings ----------------------------------------------------------------------

    async def iter_listings(self) -> AsyncIterator[MallListing]:
        """Every merchant-fulfilled listing, 20 per ``searchListingsItems`` page.

        ``attrs`` carries the lead time and restock date Amazon has for the listing, so
        an import can take them in (docs/design.md §2 item 3); FBA listings are skipped.
        """
        api = "searchListingsItems"
        path = f"{LISTINGS_PATH}/{quote(self._seller_id, safe='')}"
        params = {
            "marketplaceIds": self._marketplace,
            "includedData": "summaries,attributes,fulfillmentAvailability",
            "pageSize": str(SEARCH_PAGE_MAX),
        }
        tokens: set[str] = set()
        for _ in range(MAX_PAGES):
            reply = await self._call(api, "GET", path, params=params)
            page = self._decode(_ItemSearchResults, reply, api)
            for item in page.items:
                listing = self._listing(item)
                if listing is not None:
                    yield listing
            token = page.pagination.next_token if page.pagination else None
            if not token or not page.items:
                return
            if token in tokens:
                raise self._client.error(MallProtocolError, f"{api}: pageToken repeated itself")
            tokens.add(token)
            params = {**params, "pageToken": token}
        raise self._client.error(MallProtocolError, f"{api}: more than {MAX_PAGES} pages")

    def _listing(self, item: _Item) -> MallListing | None:
        found = _mfn_quantity(item, self._marketplace)
        if found is None:
            return None
        quantity, attr = found
        summary = next(
            (s for s in item.summaries or () if s.marketplace_id == self._marketplace), None
        )
        asin = (summary.asin if summary else None) or ""
        return MallListing(
            listing_key=item.sku,
            link_code=asin if self._link_field == "asin" else item.sku,
            name=(summary.item_name if summary else None) or item.sku,
            quantity=quantity,
            attrs=_listing_attrs(attr),
        )


def _listing_attrs(attr: _AttrAvailability | None) -> ListingAttrs:
    """The lead time and restock date of a ``DEFAULT`` entry, as goqd holds them."""
    restock = attr.restock_date if attr else None
    return ListingAttrs(
        lead_time_days=attr.lead_time_to_ship_max_days if attr else None,
        restock_date=restock[:10] if restock and _DATE.match(restock) else None,
    )


def _mall_count(item: _Item, marketplace: str) -> MallCount | None:
    """What Amazon shows for a merchant-fulfilled listing; None for an FBA-only one."""
    found = _mfn_quantity(item, marketplace)
    if found is None:
        return None
    quantity, attr = found
    return MallCount(quantity=quantity, attrs=_listing_attrs(attr))


def _mfn_quantity(item: _Item, marketplace: str) -> tuple[int, _AttrAvailability | None] | None:
    """(MFN quantity, the DEFAULT attribute entry) or None for an FBA-only listing.

    A listing with no fulfillment availability at all has no offer quantity yet and
    counts as MFN with 0 [I].
    """
    attrs = [
        a
        for a in (item.attributes.fulfillment_availability or [] if item.attributes else [])
        if a.marketplace_id in (None, marketplace)
    ]
    attr = next((a for a in attrs if a.fulfillment_channel_code == DEFAULT_CHANNEL), None)
    entries = item.fulfillment_availability or []
    default = next((e for e in entries if e.fulfillment_channel_code == DEFAULT_CHANNEL), None)
    if default is None and attr is None and (entries or attrs):
        return None
    if default is not None and default.quantity is not None:
        return default.quantity, attr
    return (attr.quantity if attr and attr.quantity is not None else 0), attr


def _retry_default(api: str) -> float:
    """The wait after a throttle without a usable ``Retry-After`` (SP-API rarely sends
    one [I]): the time the usage plan needs to grant one request, in whole seconds (60
    for getOrders; the plan's own rate, not the bucket's slower one)."""
    return float(math.ceil(1.0 / RATES[api][0]))


def _push_problem(item: PushItem) -> str:
    """Why Amazon would refuse this item's values, found before spending a call on it."""
    if item.quantity < 0:
        return f"quantity {item.quantity} is negative"
    lead = item.attrs.lead_time_days
    if lead is not None and not 0 <= lead <= LEAD_TIME_MAX_DAYS:
        return f"lead time {lead} days is outside 0..{LEAD_TIME_MAX_DAYS}"
    restock = item.attrs.restock_date
    if restock is not None:
        try:
            date.fromisoformat(restock)
        except ValueError:
            return f"restock date {restock!r} is not YYYY-MM-DD"
    if not item.listing_key:
        return "empty SKU"
    return ""


def _outcome(item: PushItem, *, accepted: bool, code: str = "", message: str = "") -> PushOutcome:
    return push_outcome(item, accepted=accepted, code=code, message=message, quantity=item.quantity)


SPEC = MallSpec(
    name=MALL,
    title="Amazon.co.jp",
    open_adapter=AmazonAdapter,
    limits=LIMITS,
    credential_fields=CREDENTIAL_FIELDS,
    optional_fields=(AUTHORIZED_FIELD,),
    # The client id (the app's) and the seller id are not secrets.
    secret_fields=("client_secret", "refresh_token"),
    options={
        "overlap_s": opt_number(60, 0, 30 * 86400),
        "initial_lookback_s": opt_number(86400, 0, 730 * 86400),
        "lag_s": opt_number(125, 0, 86400),
        "page_size": opt_integer(ORDERS_PAGE_MAX, 1, ORDERS_PAGE_MAX),
        "marketplace_id": opt_text(MARKETPLACE_JP),
        "link_field": opt_choice("sku", *LINK_FIELDS),
    },
    default_live_statuses=LIVE_STATUSES,
    default_cancel_statuses=CANCEL_STATUSES,
    expiry=KeyExpiry(
        credential="app authorisation (アプリ認可, 1 year)",
        field=AUTHORIZED_FIELD,
        lifetime_s=AUTHORIZATION_LIFETIME_S,
        renewal=(
            "re-authorise the app in Seller Central (アプリの認可を更新; yearly), write the new "
            "refresh_token and authorized_at (YYYY-MM-DD) with the other fields to a JSON file "
            "and run `goqctl key set {store} --file new.json`"
        ),
    ),
)
