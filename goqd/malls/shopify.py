"""Shopify adapter: GraphQL Admin API client for one shop, plus webhook helpers.

What it speaks (docs/malls.md §5): ``POST /admin/api/{API_VERSION}/graphql.json`` with the
``X-Shopify-Access-Token`` header. Every request is a *named* GraphQL operation sent with
``operationName`` (the simulator dispatches on that name; it cannot run a GraphQL engine).

- Orders: ``orders(query: "updated_at:>'…' AND updated_at:<='…'", sortKey: UPDATED_AT)``,
  cursor-paged, each order's ``lineItems`` paged too. Line id = line item GID; listing
  key = the variant's **InventoryItem GID** (the thing ``inventorySetQuantities``
  addresses, so a push needs no lookup); link code = the line's SKU (or the variant's
  barcode with ``link_field = "barcode"``); quantity = ``currentQuantity`` (order edits
  and removals lower it; 0 means the line is gone, reported as cancelled).
- Stock: ``inventorySetQuantities`` (name ``available``, absolute) with
  ``changeFromQuantity`` compare-and-set (``PushItem.previous_quantity``; ``None`` sends
  ``null`` = skip the check) and the ``@idempotent`` key that 2026-04 makes mandatory.
  A stale compare-and-set comes back as that listing refused with code ``"stale"``.
- Cost-based throttling: a local leaky bucket on *query cost* (100 points/s standard
  plan) keeps us under the limit; ``THROTTLED`` and HTTP 429 become ``MallRateLimited``.
- Webhooks: ``verify_webhook`` (base64 HMAC-SHA256 of the raw body, constant-time
  compare), ``parse_webhook_topic`` and ``webhook_event_id`` for the daemon's HTTP
  server, which answers ``orders/create|updated|cancelled`` by waking the poller.

This module must never log or format a credential, never send a mutation without an
idempotency key, and never let an httpx or msgspec exception escape.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import msgspec
import trio

from goqd.errors import (
    MallAuthError,
    MallError,
    MallProtocolError,
    MallRateLimited,
    MallUnavailable,
)
from goqd.malls.base import (
    DECODE_ERRORS,
    KeyExpiry,
    MallLimits,
    MallSpec,
    OrderPage,
    StoreContext,
    bounded_wait,
    opt_choice,
    opt_integer,
    opt_number,
    opt_text,
    push_outcome,
    read_options,
)
from goqd.malls.client import MallClient, Reply, Table, error_class
from goqd.malls.ratelimit import SavedLevel, shared_limiter
from goqd.messages import ListingAttrs, MallListing, OrderLine, PushItem, PushOutcome
from goqd.secret import Secret

MALL = "shopify"

# The Admin API version every request is pinned to. 2026-04 is the first version where
# ``changeFromQuantity`` is mandatory and ``@idempotent`` is required on
# inventorySetQuantities (docs/malls.md §5.2 [V]); this adapter relies on both.
API_VERSION = "2026-04"

# Shopify refuses a query whose *requested* cost exceeds 1000 before running it
# (shopify.dev "Single query limit" [V]). The brief's orders(first: 100) with
# lineItems(first: 250) would request ~75,000 points, so pages are sized to fit:
# 2 + 25 * (1 + 2 + 10 * 3) = 827 points. Orders with more than 10 lines get their
# remaining lines from GoqdOrderLineItems (1 + 2 + 250 * 3 = 753 points).
MAX_QUERY_COST = 1000
ORDERS_PAGE = 25
ORDER_LINES_FIRST = 10
MORE_LINES_FIRST = 250
VARIANTS_PAGE = 100
MUTATION_COST = 10  # Shopify's flat cost for a mutation [V: rate-limit docs]

# The credential-file field an expiring token's end is written in.
EXPIRES_FIELD = "expires_at"

WEBHOOK_ORDER_TOPICS = ("orders/create", "orders/updated", "orders/cancelled")

# How the Admin API's HTTP replies are classified, and the code each is recorded with.
# 402 is a frozen shop (an unpaid bill), 423 a locked one: the merchant must act at
# Shopify, but nothing about goqd's credential is wrong, so it keeps retrying. 403 is a
# missing scope or a revoked app: only a new credential fixes that.
TABLE: Table = {
    401: MallAuthError,
    402: MallUnavailable,
    403: MallAuthError,
    423: MallUnavailable,
    429: MallRateLimited,
}
_STATUS_CODES = {401: "unauthorized", 403: "forbidden", 429: "throttled"}

# Status strings goqd uses for a Shopify order (Shopify has no single status field):
# "open", "closed" (archived, still a sale) and "cancelled" (cancelledAt is set).
STATUS_OPEN = "open"
STATUS_CLOSED = "closed"
STATUS_CANCELLED = "cancelled"

_INVENTORY_ITEM_GID = "gid://shopify/InventoryItem/"
_FIELD_INDEX = re.compile(r"^\d+$")

# A namespace for the deterministic idempotency keys (uuid5 of the request content).
_KEY_NAMESPACE = uuid.UUID("6f1b7c1e-3a52-4c1e-9a56-2f0d7f6c9b41")

T = TypeVar("T")


# --------------------------------------------------------------------------------------
# GraphQL documents. Costs are computed with Shopify's published rules (object 1,
# scalar 0, connection 2 + first * node cost); pageInfo is not counted [I].
# --------------------------------------------------------------------------------------

_LINE_FIELDS = """
        id sku quantity currentQuantity
        variant { id barcode inventoryItem { id } }"""

Q_PING = "query GoqdPing { shop { id name } location { id } }"
PING_COST = 2

Q_ORDERS = (
    """query GoqdOrders($first: Int!, $after: String, $query: String!, $lineFirst: Int!) {
  orders(first: $first, after: $after, query: $query, sortKey: UPDATED_AT) {
    nodes {
      id name updatedAt cancelledAt closed
      lineItems(first: $lineFirst) {
        nodes {"""
    + _LINE_FIELDS
    + """ }
        pageInfo { hasNextPage endCursor }
      }
    }
    pageInfo { hasNextPage endCursor }
  }
}"""
)

Q_ORDER_LINES = (
    """query GoqdOrderLineItems($id: ID!, $first: Int!, $after: String) {
  order(id: $id) {
    id
    lineItems(first: $first, after: $after) {
      nodes {"""
    + _LINE_FIELDS
    + """ }
      pageInfo { hasNextPage endCursor }
    }
  }
}"""
)

M_SET_QUANTITIES = """mutation GoqdSetQuantities(
  $input: InventorySetQuantitiesInput!, $idempotencyKey: String!
) {
  inventorySetQuantities(input: $input) @idempotent(key: $idempotencyKey) {
    inventoryAdjustmentGroup { id changes { name delta quantityAfterChange } }
    userErrors { code field message }
  }
}"""

Q_LEVELS = """query GoqdInventoryLevels($ids: [ID!]!, $locationId: ID!) {
  nodes(ids: $ids) {
    ... on InventoryItem {
      id tracked
      inventoryLevel(locationId: $locationId) { quantities(names: ["available"]) { name quantity } }
    }
  }
}"""

Q_VARIANTS = """query GoqdVariants($first: Int!, $after: String, $locationId: ID!) {
  productVariants(first: $first, after: $after) {
    nodes {
      id sku barcode displayName
      inventoryItem {
        id tracked
        inventoryLevel(locationId: $locationId) {
          quantities(names: ["available"]) { name quantity }
        }
      }
    }
    pageInfo { hasNextPage endCursor }
  }
}"""


def orders_cost(first: int, line_first: int) -> int:
    return 2 + first * (1 + 2 + line_first * 3)


def order_lines_cost(first: int) -> int:
    return 1 + 2 + first * 3


def levels_cost(n: int) -> int:
    return 3 * n


def variants_cost(first: int) -> int:
    return 2 + first * 4


# --------------------------------------------------------------------------------------
# Wire shapes (responses allow unknown fields: Shopify adds fields in new versions)
# --------------------------------------------------------------------------------------


class _Wire(msgspec.Struct, rename="camel"):
    pass


class _ThrottleStatus(_Wire):
    maximum_available: float
    currently_available: float
    restore_rate: float


class _Cost(_Wire):
    requested_query_cost: float | None = None
    actual_query_cost: float | None = None
    throttle_status: _ThrottleStatus | None = None


class _Extensions(_Wire):
    cost: _Cost | None = None


class _ErrorExtensions(_Wire):
    code: str = ""


class _GqlError(_Wire):
    message: str = ""
    extensions: _ErrorExtensions | None = None


class _Envelope(_Wire):
    data: msgspec.Raw = msgspec.Raw(b"null")
    errors: list[_GqlError] | str | None = None
    extensions: _Extensions | None = None


class _PageInfo(_Wire):
    has_next_page: bool
    end_cursor: str | None = None


class _Id(_Wire):
    id: str


class _Variant(_Wire):
    id: str
    inventory_item: _Id | None
    barcode: str | None = None


class _LineItem(_Wire):
    id: str
    quantity: int
    current_quantity: int
    variant: _Variant | None
    sku: str | None = None


class _LineConn(_Wire):
    nodes: list[_LineItem]
    page_info: _PageInfo


class _Order(_Wire):
    id: str
    updated_at: datetime
    line_items: _LineConn
    cancelled_at: datetime | None = None
    closed: bool = False
    name: str = ""


class _OrderConn(_Wire):
    nodes: list[_Order]
    page_info: _PageInfo


class _OrdersData(_Wire):
    orders: _OrderConn


class _OrderLinesOrder(_Wire):
    id: str
    line_items: _LineConn


class _OrderLinesData(_Wire):
    order: _OrderLinesOrder | None


class _Shop(_Wire):
    id: str
    name: str = ""


class _PingData(_Wire):
    shop: _Shop
    location: _Id | None = None


class _UserError(_Wire):
    message: str
    code: str | None = None
    field: list[str] | None = None


class _AdjustmentGroup(_Wire):
    id: str


class _SetPayload(_Wire):
    user_errors: list[_UserError]
    inventory_adjustment_group: _AdjustmentGroup | None = None


class _SetData(_Wire):
    inventory_set_quantities: _SetPayload | None


class _Quantity(_Wire):
    name: str
    quantity: int


class _Level(_Wire):
    quantities: list[_Quantity]


class _InventoryItem(_Wire):
    id: str
    tracked: bool = True
    inventory_level: _Level | None = None


class _LevelsData(_Wire):
    # nodes() returns null for unknown ids; a non-InventoryItem node decodes as {}.
    nodes: list[dict[str, Any] | None]


class _VariantNode(_Wire):
    id: str
    inventory_item: _InventoryItem
    sku: str | None = None
    barcode: str | None = None
    display_name: str = ""


class _VariantConn(_Wire):
    nodes: list[_VariantNode]
    page_info: _PageInfo


class _VariantsData(_Wire):
    product_variants: _VariantConn


# --------------------------------------------------------------------------------------
# Local leaky bucket on query cost
# --------------------------------------------------------------------------------------


class CostBucket(SavedLevel):
    """Shopify's leaky bucket, mirrored locally so we rarely get THROTTLED.

    ``acquire(cost)`` waits until ``cost`` points are available and takes them. Each
    response's ``throttleStatus`` resyncs the level with the server (minus what other
    requests of ours it may not have counted yet, see ``settle``), which also gives back
    the difference between requested and actual cost. Time is ``trio.current_time()``. A
    ``goqd.malls.ratelimit.SavedLevel``: the store's ``Limiters`` keep its level across
    restarts (a new process that started full was THROTTLED by its first queries). The
    level already lacks the points of requests in flight.
    """

    def __init__(self, rate: float, size: float) -> None:
        super().__init__(rate, size)
        # Requests taken by ``acquire``: ticket -> (cost, answers received before it was
        # sent, the number of its own answer or 0 while it is out).
        self._sent: dict[int, tuple[float, int, int]] = {}
        self._tickets = 0
        self._answers = 0
        self._lock = trio.Lock()

    @property
    def available(self) -> float:
        """Points the next request may take now (as of the last refill)."""
        return self.level

    async def acquire(self, cost: float) -> int:
        """Take ``cost`` points; the ticket names this request to ``settle``."""
        cost = min(cost, self.size)
        async with self._lock:
            while True:
                await self._refilled()
                if self.level >= cost:
                    self.level -= cost
                    self._tickets += 1
                    self._sent[self._tickets] = (cost, self._answers, 0)
                    self._saved()
                    return self._tickets
                # At least a microsecond: a 1e-15 s wait (float rounding) never moves a
                # virtual clock, and spending early would get THROTTLED by Shopify.
                await trio.sleep(max(1e-6, (cost - self.level) / self.rate))

    def settle(
        self, cost: float, status: _ThrottleStatus | None, ticket: int | None = None
    ) -> None:
        """The request that took ``cost`` (``ticket``) is over; resync from the server if
        it said.

        The status is the shop's level as it answered this request. It has counted every
        request of ours answered before this one was sent (those arrived first), but
        maybe none of the others: requests and answers overtake each other on the way
        (a watch read's answer came back after a poll's, and the level it carried wiped
        out the poll's 827 points: THROTTLED). So the level is the shop's less all of
        those. A status with numbers no Shopify plan has is ignored: a restore rate of
        1e-300 points/s, taken at its word, would make the next request wait for ever.
        """
        cost = min(cost, self.size)
        if ticket not in self._sent:  # a caller without tickets: its oldest request out
            out = [t for t, (_, _, answer) in self._sent.items() if not answer]
            ticket = next((t for t in out if self._sent[t][0] == cost), out[0] if out else None)
        owed = 0.0
        if ticket is not None:
            own_cost, seen, _ = self._sent[ticket]
            self._answers += 1
            self._sent[ticket] = (own_cost, seen, self._answers)
            owed = sum(
                c
                for t, (c, _, answer) in self._sent.items()
                if t != ticket and (not answer or answer > seen)
            )
        # A request answered before every request out was sent is counted in any status
        # still to come.
        floor = min((s for _, s, answer in self._sent.values() if not answer), default=None)
        for t, (_, _, answer) in list(self._sent.items()):
            if answer and (floor is None or answer <= floor):
                del self._sent[t]
        if status is None or not _plausible(status):
            return
        now = trio.current_time()
        self._refill(now)
        self.rate = status.restore_rate
        self.size = max(1.0, status.maximum_available)
        self.level = max(0.0, min(self.size, status.currently_available - owed))
        self._saved()

    def block_for(self, seconds: float) -> None:
        now = trio.current_time()
        self._blocked_until = max(self._blocked_until, now + bounded_wait(seconds, default=1.0))
        self._saved()


def _plausible(status: _ThrottleStatus) -> bool:
    """Numbers a Shopify plan can have (restore rates are 50 to a few thousand)."""
    return (
        1.0 <= status.restore_rate <= 1e6
        and 1.0 <= status.maximum_available <= 1e8
        and math.isfinite(status.currently_available)
    )


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: str) -> float | None:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _field_index(field: list[str] | None) -> int | None:
    """``["input", "quantities", "3", "changeFromQuantity"]`` -> 3."""
    if not field:
        return None
    for i, part in enumerate(field[:-1]):
        if part == "quantities" and _FIELD_INDEX.match(field[i + 1]):
            return int(field[i + 1])
    return None


def idempotency_key(store: str, input_: Mapping[str, Any], attempt: int = 0) -> str:
    """A key that is the same for a retry of the same request and differs otherwise.

    Derived from the store and the whole mutation input (listing keys, locations,
    quantities, changeFromQuantity, and the push versions inside
    referenceDocumentUri), because Shopify refuses a reused key with different
    parameters (IDEMPOTENCY_KEY_PARAMETER_MISMATCH [V]). ``attempt`` changes the key
    only when Shopify asks for a new one (IDEMPOTENCY_PREVIOUS_ATTEMPT_FAILED).
    """
    canonical = json.dumps([store, input_, attempt], sort_keys=True, separators=(",", ":"))
    return str(uuid.uuid5(_KEY_NAMESPACE, canonical))


# --------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------

LIMITS = MallLimits(
    # [I] 100 quantities per inventorySetQuantities call; the mutation's input array is
    # believed to accept 250. read_batch: 100 ids per nodes() call (300 points).
    push_batch=100,
    read_batch=100,
    # An empty poll costs a few points; a full page ~827. 10 s keeps a busy shop well
    # inside 100 points/s with room for pushes [I].
    min_poll_interval=10.0,
    # The sale watch: 50 levels (150 points) a round, 30 points/s at one round in 5 s.
    watch_max=50,
    # inventorySetQuantities compares and sets (changeFromQuantity): no read needed.
    read_before_push=False,
)


class ShopifyAdapter:
    """One store's GraphQL Admin API session.

    Options (checked against ``SPEC.options``): ``overlap_s`` (600),
    ``initial_lookback_s`` (86400), ``link_field`` ("sku" default, or "barcode"),
    ``default_location_id`` (a Location GID; otherwise the shop's primary location,
    asked once), ``cost_rate`` (100 points/s; Advanced 200, Plus 1000), ``cost_bucket``
    (1000 points), ``orders_page`` (25), ``order_lines_first`` (10).
    """

    mall = MALL
    limits = LIMITS

    def __init__(self, ctx: StoreContext) -> None:
        self._ctx = ctx
        opts = read_options(SPEC, ctx)
        self._url = ctx.base_url.rstrip("/") + f"/admin/api/{API_VERSION}/graphql.json"
        self._overlap: float = opts["overlap_s"]
        self._lookback: float = opts["initial_lookback_s"]
        self._link_field: str = opts["link_field"]
        # ``location_id`` is the option's older name.
        self._location: str | None = opts["default_location_id"] or opts["location_id"]
        # The defaults already fill most of the 1000-point single query limit; larger
        # pages get MAX_COST_EXCEEDED (a MallProtocolError), so only shrink them.
        self._orders_page: int = opts["orders_page"]
        self._line_first: int = opts["order_lines_first"]
        # The store's, like every mall's buckets: shared by a key test and the session,
        # and kept across restarts.
        self._bucket = shared_limiter(
            ctx.rate_buckets, "cost", lambda: CostBucket(opts["cost_rate"], opts["cost_bucket"])
        )
        self._client = MallClient(ctx, MALL, is_secret=SPEC.is_secret_field)
        self._live = ctx.live_statuses or SPEC.default_live_statuses
        self._cancel = ctx.cancel_statuses or SPEC.default_cancel_statuses

    # -- errors ---------------------------------------------------------------------------

    # -- transport ------------------------------------------------------------------------

    async def _post(self, operation: str, payload: bytes, *, read: bool) -> Reply:
        """One GraphQL POST; a ``read`` (a query, no mutation) may be sent again on a
        fresh connection if the pooled one turns out closed."""
        token = self._ctx.credentials.get("access_token")
        if token is None:
            raise self._client.error(MallAuthError, "credential file has no access_token")
        headers = {
            "X-Shopify-Access-Token": token.reveal(),
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        return await self._client.send(
            operation, "POST", self._url, headers=headers, content=payload, read=read
        )

    def _http_error(self, reply: Reply) -> MallError:
        status = reply.status
        text = _error_text(reply.body) or f"HTTP {status}"
        cls = error_class(TABLE, status)
        if cls is MallProtocolError:
            text = f"unexpected HTTP {status}: {text}"
        else:
            text = f"{status} {text}"
        return self._client.reply_error(
            cls,
            text,
            _STATUS_CODES.get(status, f"http_{status}"),
            reply=reply,
            bucket=self._bucket,
            retry_default=2.0,
        )

    async def _call(
        self,
        operation: str,
        document: str,
        variables: Mapping[str, Any],
        cost: int,
        data_type: type[T],
    ) -> T:
        """Send one named operation and return its decoded ``data``."""
        payload = msgspec.json.encode(
            {"query": document, "variables": variables, "operationName": operation}
        )
        ticket = await self._bucket.acquire(cost)
        status_info: _ThrottleStatus | None = None
        try:
            reply = await self._post(
                operation, payload, read=document.lstrip().startswith("query ")
            )
            if reply.status != 200:
                raise self._http_error(reply)
            try:
                env = msgspec.json.decode(reply.body, type=_Envelope)
            except DECODE_ERRORS as exc:
                kind = reply.headers.get("content-type", "?")
                raise self._client.error(
                    MallProtocolError, f"{operation}: response is not GraphQL JSON ({kind}): {exc}"
                ) from exc
            cost_info = env.extensions.cost if env.extensions else None
            status_info = cost_info.throttle_status if cost_info else None
            if env.errors:
                raise self._graphql_error(operation, env.errors, cost_info)
            if bytes(env.data) in (b"null", b""):
                raise self._client.error(MallProtocolError, f"{operation}: response has no data")
            try:
                return msgspec.json.decode(env.data, type=data_type)
            except DECODE_ERRORS as exc:
                raise self._client.error(
                    MallProtocolError, f"{operation}: unexpected data: {exc}"
                ) from exc
        finally:
            self._bucket.settle(cost, status_info, ticket)

    def _graphql_error(
        self, operation: str, errors: list[_GqlError] | str, cost: _Cost | None
    ) -> MallError:
        if isinstance(errors, str):
            return self._client.error(MallProtocolError, f"{operation}: {errors}")
        codes = [e.extensions.code if e.extensions else "" for e in errors]
        text = "; ".join(f"{c or 'ERROR'}: {e.message}" for c, e in zip(codes, errors, strict=True))
        if "THROTTLED" in codes:
            retry = 1.0
            if cost and cost.throttle_status and _plausible(cost.throttle_status):
                ts = cost.throttle_status
                requested = cost.requested_query_cost or 1.0
                deficit = max(1.0, requested - ts.currently_available)
                retry = deficit / ts.restore_rate
            return self._client.throttled(
                f"{operation}: {text}",
                bucket=self._bucket,
                wait=retry,
                default=1.0,
                code="throttled",
            )
        if "ACCESS_DENIED" in codes:
            return self._client.error(MallAuthError, f"{operation}: {text}", code="access_denied")
        if "INTERNAL_SERVER_ERROR" in codes or "SERVICE_UNAVAILABLE" in codes:
            return self._client.error(MallUnavailable, f"{operation}: {text}")
        return self._client.error(
            MallProtocolError, f"{operation}: {text}", code=codes[0] or "graphql"
        )

    # -- locations --------------------------------------------------------------------------

    async def _default_location(self) -> str:
        if self._location is None:
            data = await self._call("GoqdPing", Q_PING, {}, PING_COST, _PingData)
            if data.location is None:
                raise self._client.error(MallProtocolError, "shop has no primary location")
            self._location = data.location.id
        return self._location

    # -- MallAdapter --------------------------------------------------------------------------

    async def check_credentials(self) -> None:
        data = await self._call("GoqdPing", Q_PING, {}, PING_COST, _PingData)
        if self._location is None and data.location is not None:
            self._location = data.location.id

    async def credential_expiry(self) -> float | None:
        expires = self._ctx.credentials.get(EXPIRES_FIELD)
        if expires is None:
            return None
        return _parse_iso(expires.reveal().strip())

    async def fetch_orders(self, cursor: str | None) -> OrderPage:
        # The window is in Shopify's time (its clock as its responses show it), so a skew
        # between the clocks never moves it past orders (goqd.malls.clock).
        began = self._ctx.clock()
        clock = self._ctx.mall_clock
        window = clock.window(
            began,
            _parse_iso(cursor) if cursor else None,
            overlap=self._overlap,
            initial_lookback=self._lookback,
        )
        end = float(int(window.end))  # Shopify's updatedAt has whole seconds
        start = min(window.start, end)
        search = f"updated_at:>'{_iso(start)}' AND updated_at:<='{_iso(end)}'"
        lines: list[OrderLine] = []
        orders_seen = 0
        after: str | None = None
        while True:
            variables = {
                "first": self._orders_page,
                "after": after,
                "query": search,
                "lineFirst": self._line_first,
            }
            data = await self._call(
                "GoqdOrders",
                Q_ORDERS,
                variables,
                orders_cost(self._orders_page, self._line_first),
                _OrdersData,
            )
            for order in data.orders.nodes:
                orders_seen += 1
                items = list(order.line_items.nodes)
                page = order.line_items.page_info
                while page.has_next_page:
                    more = await self._more_lines(order.id, page.end_cursor)
                    items.extend(more.nodes)
                    page = more.page_info
                lines.extend(self._order_lines(order, items))
            info = data.orders.page_info
            if not info.has_next_page:
                break
            if not info.end_cursor or info.end_cursor == after:
                raise self._client.error(
                    MallProtocolError, "GoqdOrders: hasNextPage without a new cursor"
                )
            after = info.end_cursor
        # Never later than Shopify's time when the search ran.
        done = clock.cursor_after(began, end)
        return OrderPage(lines=tuple(lines), cursor=_iso(done), orders_seen=orders_seen)

    async def _more_lines(self, order_id: str, after: str | None) -> _LineConn:
        if not after:
            raise self._client.error(MallProtocolError, "lineItems: hasNextPage without a cursor")
        data = await self._call(
            "GoqdOrderLineItems",
            Q_ORDER_LINES,
            {"id": order_id, "first": MORE_LINES_FIRST, "after": after},
            order_lines_cost(MORE_LINES_FIRST),
            _OrderLinesData,
        )
        if data.order is None:
            raise self._client.error(
                MallProtocolError, f"order {order_id} vanished while paging its lines"
            )
        return data.order.line_items

    def _order_lines(self, order: _Order, items: list[_LineItem]) -> list[OrderLine]:
        if order.cancelled_at is not None:
            status = STATUS_CANCELLED
        else:
            status = STATUS_CLOSED if order.closed else STATUS_OPEN
        if status in self._live:
            order_cancelled = False
        elif status in self._cancel:
            order_cancelled = True
        else:
            return []
        # Shopify has no way to undo a cancellation (the Admin API has orderCancel and
        # no reverse; a cancelled order stays cancelled), so an order-level cancel is
        # terminal. A line edited down to 0 is not: a later edit of the same line could
        # in principle raise it again [I].
        terminal = order_cancelled and status == STATUS_CANCELLED
        updated = order.updated_at.timestamp()
        out: list[OrderLine] = []
        for item in items:
            variant = item.variant
            if variant is None or variant.inventory_item is None:
                # A custom line item (or a deleted variant) has no inventory item: there
                # is no stock counter at Shopify to address, so nothing to book [I].
                continue
            current = item.current_quantity
            removed = current <= 0
            quantity = current if current > 0 else item.quantity
            if quantity <= 0:
                continue
            link = (variant.barcode if self._link_field == "barcode" else item.sku) or ""
            out.append(
                OrderLine(
                    order_id=order.id,
                    line_id=item.id,
                    listing_key=variant.inventory_item.id,
                    link_code=link,
                    quantity=quantity,
                    cancelled=order_cancelled or removed,
                    terminal=terminal,
                    updated_at=updated,
                    status=status,
                )
            )
        return out

    async def push_stock(self, items: Sequence[PushItem]) -> list[PushOutcome]:
        outcomes: dict[int, PushOutcome] = {}
        default_location: str | None = None
        for i in range(0, len(items), self.limits.push_batch):
            chunk = list(enumerate(items[i : i + self.limits.push_batch], start=i))
            if default_location is None and any(
                not it.attrs.extra.get("location_id") for _, it in chunk
            ):
                default_location = await self._default_location()
            await self._push_chunk(chunk, default_location or "", outcomes)
        return [outcomes[i] for i in range(len(items))]

    async def _push_chunk(
        self,
        chunk: list[tuple[int, PushItem]],
        default_location: str,
        outcomes: dict[int, PushOutcome],
    ) -> None:
        """Push one batch; ``outcomes`` gets one entry per position in ``chunk``."""
        pending = chunk
        attempt = 0
        # Each round either finishes, or drops at least one refused item, or (at most
        # three times) retries under a new key: this loop ends.
        while pending:
            input_ = self._set_input(pending, default_location)
            key = idempotency_key(self._ctx.store, input_, attempt)
            data = await self._call(
                "GoqdSetQuantities",
                M_SET_QUANTITIES,
                {"input": input_, "idempotencyKey": key},
                MUTATION_COST,
                _SetData,
            )
            payload = data.inventory_set_quantities
            if payload is None:
                raise self._client.error(MallProtocolError, "inventorySetQuantities returned null")
            codes = {err.code for err in payload.user_errors}
            if "IDEMPOTENCY_CONCURRENT_REQUEST" in codes:
                # Our earlier attempt with this key is still running at Shopify.
                raise self._client.error(
                    MallUnavailable, "inventorySetQuantities: IDEMPOTENCY_CONCURRENT_REQUEST"
                )
            if "IDEMPOTENCY_PREVIOUS_ATTEMPT_FAILED" in codes:
                # Shopify asks for a new key: the failed attempt applied nothing.
                if attempt >= 3:
                    raise self._client.error(
                        MallUnavailable,
                        "inventorySetQuantities: IDEMPOTENCY_PREVIOUS_ATTEMPT_FAILED",
                    )
                attempt += 1
                continue
            refused: dict[int, PushOutcome] = {}
            for err in payload.user_errors:
                idx = _field_index(err.field)
                if idx is None or not 0 <= idx < len(pending):
                    # Not about one quantity (name, reason, document uri, key misuse):
                    # every item of this request carries it.
                    for pos, item in pending:
                        outcomes[pos] = _refusal(item, err)
                    return
                refused.setdefault(idx, _refusal(pending[idx][1], err))
            for idx, out in refused.items():
                outcomes[pending[idx][0]] = out
            rest = [p for idx, p in enumerate(pending) if idx not in refused]
            if not refused or payload.inventory_adjustment_group is not None:
                # Accepted: everything, or everything but the refused ones.
                for pos, item in rest:
                    outcomes[pos] = push_outcome(item, accepted=True, quantity=item.quantity)
                return
            # Shopify refused the whole request because of the items above and applied
            # nothing: send the others again (a different input, so a different key).
            pending = rest
            attempt = 0

    def _set_input(
        self, pending: list[tuple[int, PushItem]], default_location: str
    ) -> dict[str, Any]:
        quantities = [
            {
                "inventoryItemId": item.listing_key,
                "locationId": item.attrs.extra.get("location_id") or default_location,
                "quantity": max(0, item.quantity),
                # null skips the compare-and-set; 2026-04 requires the key itself.
                "changeFromQuantity": item.previous_quantity,
            }
            for _, item in pending
        ]
        versions = sorted({item.version for _, item in pending})
        return {
            "name": "available",
            "reason": "correction",
            # Deterministic, so a retry of the same push is the same request.
            "referenceDocumentUri": (
                f"goqd://stock-push/{quote(self._ctx.store, safe='')}"
                f"?versions={versions[0]}-{versions[-1]}"
            ),
            "quantities": quantities,
        }

    async def read_stock(self, listing_keys: Sequence[str]) -> dict[str, int | None]:
        # nodes() fails the whole call on a malformed global id, so only
        # InventoryItem GIDs are asked; anything else is simply unknown here.
        keys = [k for k in dict.fromkeys(listing_keys) if k.startswith(_INVENTORY_ITEM_GID)]
        result: dict[str, int | None] = {}
        if not keys:
            return result
        location = await self._default_location()
        for i in range(0, len(keys), self.limits.read_batch):
            batch = keys[i : i + self.limits.read_batch]
            data = await self._call(
                "GoqdInventoryLevels",
                Q_LEVELS,
                {"ids": batch, "locationId": location},
                levels_cost(len(batch)),
                _LevelsData,
            )
            for raw in data.nodes:
                if not raw or "id" not in raw:
                    continue
                try:
                    node = msgspec.convert(raw, type=_InventoryItem)
                except msgspec.ValidationError as exc:
                    raise self._client.error(
                        MallProtocolError, f"GoqdInventoryLevels: {exc}"
                    ) from exc
                qty = _available(node)
                if node.tracked and qty is None:
                    continue  # known item, but not stocked at this location
                result[node.id] = qty
        return result

    async def iter_listings(self) -> AsyncIterator[MallListing]:
        location = await self._default_location()
        after: str | None = None
        while True:
            data = await self._call(
                "GoqdVariants",
                Q_VARIANTS,
                {"first": VARIANTS_PAGE, "after": after, "locationId": location},
                variants_cost(VARIANTS_PAGE),
                _VariantsData,
            )
            for v in data.product_variants.nodes:
                link = (v.barcode if self._link_field == "barcode" else v.sku) or ""
                qty = _available(v.inventory_item)
                if v.inventory_item.tracked and qty is None:
                    # Not stocked at this location: listed with 0 so that the operator
                    # sees it; a push to it is refused ITEM_NOT_STOCKED_AT_LOCATION [I].
                    qty = 0
                yield MallListing(
                    listing_key=v.inventory_item.id,
                    link_code=link,
                    name=v.display_name,
                    quantity=qty,
                    attrs=ListingAttrs(extra={"location_id": location, "variant_id": v.id}),
                )
            info = data.product_variants.page_info
            if not info.has_next_page:
                return
            if not info.end_cursor or info.end_cursor == after:
                raise self._client.error(
                    MallProtocolError, "GoqdVariants: hasNextPage without a new cursor"
                )
            after = info.end_cursor


def _available(item: _InventoryItem) -> int | None:
    """The ``available`` count, or None when untracked (unlimited) or not stocked."""
    if not item.tracked:
        return None
    if item.inventory_level is None:
        return None
    for q in item.inventory_level.quantities:
        if q.name == "available":
            return q.quantity
    return None


def _refusal(item: PushItem, err: _UserError) -> PushOutcome:
    """One listing refused by a userError; a stale compare-and-set is code "stale"."""
    code = err.code or "USER_ERROR"
    field = ".".join(err.field or ()) or "-"
    if code == "CHANGE_FROM_QUANTITY_STALE":
        return push_outcome(
            item,
            accepted=False,
            code="stale",
            message=(
                f"{code}: {err.message} (field {field}; Shopify no longer shows "
                f"{item.previous_quantity}: a sale goqd has not booked yet?)"
            ),
        )
    return push_outcome(
        item,
        accepted=False,
        code=code,
        message=f"{code}: {err.message} (field {field})",
    )


def _error_text(body: bytes) -> str:
    """The ``errors`` text of a Shopify error body (string, list or object), short."""
    try:
        obj = json.loads(body)
        errors = obj.get("errors") if isinstance(obj, dict) else None
        if isinstance(errors, str):
            return errors[:300]
        if errors is not None:
            return json.dumps(errors, ensure_ascii=False)[:300]
    except (ValueError, UnicodeDecodeError, RecursionError):  # a body nested absurdly deep
        pass
    return ""


# --------------------------------------------------------------------------------------
# Webhooks (used by the daemon's HTTP server)
# --------------------------------------------------------------------------------------


def _header(headers: Mapping[str, str], name: str) -> str:
    name = name.lower()
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return ""


def verify_webhook(secret: Secret, body: bytes, hmac_header: str) -> bool:
    """True if ``X-Shopify-Hmac-Sha256`` is the base64 HMAC-SHA256 of the raw body.

    The key is the app's client secret (credential field ``webhook_secret``). The
    comparison is constant-time; a missing or non-ASCII header is simply False.
    """
    if not hmac_header:
        return False
    try:
        given = hmac_header.strip().encode("ascii")
    except UnicodeEncodeError:
        return False
    digest = hmac.new(secret.reveal().encode("utf-8"), body, hashlib.sha256).digest()
    return hmac.compare_digest(base64.b64encode(digest), given)


def sign_webhook(secret: Secret, body: bytes) -> str:
    """The ``X-Shopify-Hmac-Sha256`` value Shopify would send for ``body``."""
    digest = hmac.new(secret.reveal().encode("utf-8"), body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def parse_webhook_topic(headers: Mapping[str, str]) -> str:
    """``X-Shopify-Topic`` (e.g. "orders/create"), lower-case; "" when absent."""
    return _header(headers, "x-shopify-topic").strip().lower()


def webhook_event_id(headers: Mapping[str, str]) -> str:
    """The id to deduplicate deliveries by: ``X-Shopify-Event-Id`` (the same across
    duplicate deliveries of one event [V: shopify.dev "Ignore duplicate webhooks"]),
    else ``X-Shopify-Webhook-Id``; "" when neither is present."""
    return (
        _header(headers, "x-shopify-event-id").strip()
        or _header(headers, "x-shopify-webhook-id").strip()
    )


def webhook_shop_domain(headers: Mapping[str, str]) -> str:
    """``X-Shopify-Shop-Domain`` (e.g. "example.myshopify.com"), lower-case."""
    return _header(headers, "x-shopify-shop-domain").strip().lower()


ORDER_TOPICS = frozenset(
    {"orders/create", "orders/updated", "orders/cancelled", "orders/edited", "orders/delete"}
)


def check_webhook(
    credentials: dict[str, Secret], body: bytes, headers: Mapping[str, str]
) -> bool | None:
    """The daemon's webhook hook: None if the signature is wrong, else whether the
    topic is an order event worth an immediate poll."""
    secret = credentials.get("webhook_secret")
    if secret is None or not verify_webhook(
        secret, body, _header(headers, "x-shopify-hmac-sha256")
    ):
        return None
    return parse_webhook_topic(headers) in ORDER_TOPICS


SPEC = MallSpec(
    name=MALL,
    title="Shopify",
    open_adapter=ShopifyAdapter,
    limits=LIMITS,
    credential_fields=("access_token", "webhook_secret"),
    optional_fields=(EXPIRES_FIELD,),
    secret_fields=("access_token", "webhook_secret"),
    options={
        "overlap_s": opt_number(600, 0, 7 * 86400),
        "initial_lookback_s": opt_number(86400, 0, 60 * 86400),
        "link_field": opt_choice("sku", "sku", "barcode"),
        "default_location_id": opt_text(None, prefix="gid://shopify/Location/"),
        "location_id": opt_text(None, prefix="gid://shopify/Location/"),
        "orders_page": opt_integer(ORDERS_PAGE, 1, 250),
        "order_lines_first": opt_integer(ORDER_LINES_FIRST, 1, 250),
        "cost_rate": opt_number(100.0, 1, 100_000),
        "cost_bucket": opt_number(1000.0, 1, 1_000_000),
    },
    default_live_statuses=(STATUS_OPEN, STATUS_CLOSED),
    default_cancel_statuses=(STATUS_CANCELLED,),
    webhook=check_webhook,
    # Only some tokens expire; those carry expires_at (ISO 8601).
    expiry=KeyExpiry(
        credential="access token",
        field=EXPIRES_FIELD,
        renewal=(
            "rotate the access token in the Shopify admin (the app's API credentials), write "
            "access_token, webhook_secret and expires_at (if it expires) to a JSON file and run "
            "`goqctl key set {store} --file new.json`"
        ),
    ),
)
