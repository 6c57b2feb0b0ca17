"""A simulated Shopify shop speaking the GraphQL Admin API (docs/malls.md §5).

Same path and header as the real service: ``POST /admin/api/{API_VERSION}/graphql.json``
with ``X-Shopify-Access-Token``. It cannot run a GraphQL engine, so it **dispatches on
``operationName``** (the named operations goqd's adapter sends: GoqdPing, GoqdOrders,
GoqdOrderLineItems, GoqdSetQuantities, GoqdInventoryLevels, GoqdVariants), checks that
the query text declares that operation, and validates the variables strictly (unknown
or mistyped variables are a top-level error, as GraphQL would give). The response
shapes are what the adapter's selection sets ask for.

Modelled, with the assumptions marked [I]:
- Orders with line items; ``quantity`` is what was ordered, ``currentQuantity`` follows
  ``edit_quantity``; ``cancel_order`` sets ``cancelledAt`` (the sim keeps
  ``currentQuantity`` as it was [I]); ``advance`` closes (archives) an order.
- Listing keys are InventoryItem GIDs (use ``add_variant``); stock is the ``available``
  quantity at the primary location (the one sales decrement [I]); other locations hold
  levels only for items stocked there (``add_location`` / ``set_level``).
- ``inventorySetQuantities`` with ``changeFromQuantity`` compare-and-set (stale ->
  userError CHANGE_FROM_QUANTITY_STALE), the mandatory ``@idempotent`` key (missing ->
  top-level error [I for the message]) and replay: the same key with the same input
  returns the first result without applying again; with another input,
  IDEMPOTENCY_KEY_PARAMETER_MISMATCH. The key is read from a literal
  ``@idempotent(key: "...")`` or from the variable ``$idempotencyKey``. A request
  with any userError applies nothing (``atomic_set=True`` [I]; False applies the
  valid quantities).
- Cost-based throttling: a leaky bucket of ``bucket_size`` points refilled at
  ``cost_rate`` points/s on ``trio.current_time()``. The requested cost is computed
  from the query text received, by Shopify's published rules (``query_cost``), never
  taken from the client; above ``max_query_cost`` (1000 [V]) the query is refused
  before running; the difference between requested and actual cost is refunded.
  Throttled answers are HTTP 200 with ``THROTTLED`` and
  ``extensions.cost.throttleStatus`` [I]; ``throttle_http_status=429`` sends them as 429
  with Retry-After instead.
- Webhooks: with ``webhook_url``, order events queue signed deliveries that
  ``deliver_webhooks(http)`` POSTs (the caller runs it).

It listens on loopback only (``serve_sim``) and never contacts a real Shopify host.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Unpack

import httpx
import msgspec
import trio
from msgspec import UNSET, Meta, UnsetType

from goqd.sim.base import (
    RateBucket,
    RatePlan,
    SimArgs,
    SimListing,
    SimMall,
    SimOrder,
    SimSpec,
)
from goqd.sim.http import Request, Response

# The Admin API version this shop serves. 2026-04 is the first where
# ``changeFromQuantity`` is mandatory and ``@idempotent`` is required on
# inventorySetQuantities (docs/malls.md §5.2 [V]).
API_VERSION = "2026-04"

UNAUTHORIZED_BODY = {
    "errors": "[API] Invalid API key or access token (unrecognized login or wrong password)"
}

# InventoryAdjustmentGroup reasons accepted by inventorySetQuantities [V: shopify.dev].
REASONS = frozenset(
    {
        "correction",
        "cycle_count_available",
        "damaged",
        "movement_canceled",
        "movement_created",
        "movement_received",
        "movement_updated",
        "other",
        "promotion",
        "quality_control",
        "received",
        "reservation_created",
        "reservation_deleted",
        "reservation_updated",
        "restock",
        "safety_stock",
        "shrinkage",
    }
)

_IDEMPOTENT = re.compile(r'@idempotent\(\s*key:\s*(?:"([^"]*)"|\$(\w+))\s*\)')
_TERM = re.compile(r"^updated_at:(>=|<=|>|<)'?([^']+?)'?$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")

PageSize = Annotated[int, Meta(ge=1, le=250)]


# --------------------------------------------------------------------------------------
# Requested query cost, from the query text (Shopify's published rules [V: shopify.dev
# "GraphQL Admin API rate limits", cost calculation]): a scalar or enum field costs 0,
# an object 1 plus its selection, a connection 2 plus ``first`` (or ``last``) times the
# cost of one node, a list sized by its ``ids`` that many times its element; an
# interface or union the most expensive of its fragments; a mutation 10. ``pageInfo``
# and the ``edges`` wrapper are not counted [I].
# --------------------------------------------------------------------------------------

MUTATION_COST = 10

_GQL_TOKEN = re.compile(
    r"""(?P<skip>[\s,]+|\#[^\n]*)|(?P<string>"(?:[^"\\]|\\.)*")|(?P<spread>\.\.\.)"""
    r"""|(?P<number>-?\d+(?:\.\d+)?)|(?P<name>[_A-Za-z][_0-9A-Za-z]*)|(?P<punct>[{}()\[\]:!$@=])"""
)


@dataclass
class _Field:
    name: str
    args: dict[str, Any]
    selection: list[_Field] | None  # None: a scalar or enum
    fragment: bool = False  # an inline fragment: ``... on Type { ... }``


class _CostParser:
    """Just enough of a GraphQL reader to price one operation (no named fragments)."""

    def __init__(self, text: str, variables: dict[str, Any]) -> None:
        self.tokens: list[str] = []
        pos = 0
        while pos < len(text):
            m = _GQL_TOKEN.match(text, pos)
            if m is None:
                raise ValueError(f"unexpected character {text[pos]!r} at {pos}")
            if m.lastgroup != "skip":
                self.tokens.append(m.group())
            pos = m.end()
        self.at = 0
        self.variables = variables

    def peek(self) -> str:
        return self.tokens[self.at] if self.at < len(self.tokens) else ""

    def next(self, expected: str | None = None) -> str:
        token = self.peek()
        if not token or (expected is not None and token != expected):
            raise ValueError(f"expected {expected or 'more'}, found {token or 'the end'}")
        self.at += 1
        return token

    def operation(self) -> tuple[str, list[_Field]]:
        kind = "query"
        if self.peek() in ("query", "mutation", "subscription"):
            kind = self.next()
            if self.peek() not in ("(", "@", "{"):
                self.next()  # the operation's name
            if self.peek() == "(":
                self.skip_group("(", ")")  # variable definitions
            self.directives()
        return kind, self.selection_set()

    def skip_group(self, opening: str, closing: str) -> None:
        depth = 0
        while True:
            token = self.next()
            depth += (token == opening) - (token == closing)
            if depth == 0:
                return

    def directives(self) -> None:
        while self.peek() == "@":
            self.next()
            self.next()
            if self.peek() == "(":
                self.arguments()

    def selection_set(self) -> list[_Field]:
        self.next("{")
        fields: list[_Field] = []
        while self.peek() != "}":
            if self.peek() == "...":
                self.next()
                if self.peek() == "on":
                    self.next()
                    self.next()  # the type condition
                elif self.peek() not in ("{", "@"):
                    raise ValueError("named fragments are not supported")
                self.directives()
                fields.append(_Field("...", {}, self.selection_set(), fragment=True))
                continue
            name = self.next()
            if self.peek() == ":":  # ``alias: field``
                self.next()
                name = self.next()
            args = self.arguments() if self.peek() == "(" else {}
            self.directives()
            selection = self.selection_set() if self.peek() == "{" else None
            fields.append(_Field(name, args, selection))
        self.next("}")
        return fields

    def arguments(self) -> dict[str, Any]:
        self.next("(")
        args: dict[str, Any] = {}
        while self.peek() != ")":
            name = self.next()
            self.next(":")
            args[name] = self.value()
        self.next(")")
        return args

    def value(self) -> Any:
        token = self.next()
        if token == "$":
            return self.variables.get(self.next())
        if token == "[":
            items = []
            while self.peek() != "]":
                items.append(self.value())
            self.next("]")
            return items
        if token == "{":
            self.at -= 1
            self.skip_group("{", "}")
            return None  # input objects do not size anything
        if token[0] == '"':
            return json.loads(token)
        if token[0].isdigit() or token[0] == "-":
            return float(token) if "." in token else int(token)
        return token  # an enum value, true, false or null


def _selection_cost(fields: list[_Field]) -> int:
    plain = sum(_field_cost(f) for f in fields if not f.fragment)
    fragments = [_selection_cost(f.selection or []) for f in fields if f.fragment]
    return plain + max(fragments, default=0)


def _node_cost(connection: list[_Field]) -> int:
    """One node of a connection: ``nodes { ... }`` or ``edges { node { ... } }``."""
    costs = [0]
    for f in connection:
        if f.name == "nodes" and f.selection is not None:
            costs.append(1 + _selection_cost(f.selection))
        elif f.name == "edges" and f.selection is not None:
            costs += [
                1 + _selection_cost(n.selection or []) for n in f.selection if n.name == "node"
            ]
    return max(costs)


def _field_cost(f: _Field) -> int:
    if f.selection is None:
        return 0
    size = f.args.get("first", f.args.get("last"))
    if size is not None:
        # A negative page would price below zero and pay tokens into the bucket.
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"{f.name}: first/last must be a non-negative integer")
        return 2 + size * _node_cost(f.selection)
    ids = f.args.get("ids")
    if isinstance(ids, list):
        return len(ids) * (1 + _selection_cost(f.selection))
    return 1 + _selection_cost(f.selection)


def query_cost(query: str, variables: dict[str, Any]) -> int:
    """The requested cost of ``query`` run with ``variables``, as Shopify computes it
    before running a query. Raises ValueError for text it cannot read."""
    parser = _CostParser(query, variables)
    kind, selection = parser.operation()
    if kind == "mutation":
        return MUTATION_COST
    return _selection_cost(selection)


# --------------------------------------------------------------------------------------
# Variables each operation accepts (strict: a typo in the adapter fails loudly)
# --------------------------------------------------------------------------------------


class _Vars(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    pass


class _PingVars(_Vars):
    pass


class _OrdersVars(_Vars):
    first: PageSize
    query: str
    line_first: PageSize
    after: str | None = None


class _OrderLinesVars(_Vars):
    id: str
    first: PageSize
    after: str | None = None


class _QuantityIn(_Vars):
    inventory_item_id: str
    location_id: str
    quantity: int
    # 2026-04: must be present; null skips the compare-and-set [V].
    change_from_quantity: int | UnsetType | None = UNSET


class _SetInput(_Vars):
    name: str
    reason: str
    quantities: list[_QuantityIn]
    reference_document_uri: str | None = None


class _SetVars(_Vars):
    input: _SetInput
    idempotency_key: str | None = None


class _LevelsVars(_Vars):
    ids: Annotated[list[str], Meta(max_length=250)]
    location_id: str


class _VariantsVars(_Vars):
    first: PageSize
    location_id: str
    after: str | None = None


class _BadBody(Exception):
    """The body is not a JSON object with a ``query`` string."""


class _GraphQLFailure(Exception):
    """A top-level GraphQL error: ``errors`` is the list to send."""

    def __init__(self, message: str, code: str, **extra: Any) -> None:
        super().__init__(message)
        self.errors = [{"message": message, "extensions": {"code": code, **extra}}]


@dataclass
class _Operation:
    vars_type: type[_Vars]
    run: Callable[[Any, str], Awaitable[tuple[dict[str, Any], float]]]


@dataclass
class PendingWebhook:
    topic: str
    body: bytes
    webhook_id: str
    event_id: str
    triggered_at: str
    attempts: int = 0


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _num(gid: str) -> int:
    tail = gid.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _cursor(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode()


def _uncursor(text: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(text.encode()))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _GraphQLFailure(
            f"Invalid cursor for current pagination sort: {text}", "BAD_REQUEST"
        ) from exc


class SimShopify(SimMall):
    """One simulated shop. See the module docstring for what is modelled."""

    mall = "shopify"

    def __init__(
        self,
        *,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        cost_rate: float = 100.0,
        bucket_size: float = 1000.0,
        max_query_cost: int = 1000,
        max_quantities: int = 250,
        atomic_set: bool = True,
        throttle_http_status: int = 200,
        token_ttl: float | None = None,
        **base: Unpack[SimArgs],
    ) -> None:
        super().__init__(**base)
        self.domain = f"{self.shop_id}.myshopify.com"
        self.path = f"/admin/api/{API_VERSION}/graphql.json"
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret or f"shpss_{self.rng.getrandbits(128):032x}"
        self.cost_rate = cost_rate
        self.bucket_size = bucket_size
        self.max_query_cost = max_query_cost
        self.max_quantities = max_quantities
        self.atomic_set = atomic_set
        self.throttle_http_status = throttle_http_status
        self.token_ttl = token_ttl

        self.primary_location = f"gid://shopify/Location/{self.next_serial()}"
        self.locations: dict[str, str] = {self.primary_location: "Shop location"}
        self.other_levels: dict[tuple[str, str], int] = {}  # (item, location) -> available
        self.ordered_quantity: dict[str, int] = {}  # line id -> quantity as ordered
        self.cancelled_at: dict[str, float] = {}

        self._tokens: dict[str, float | None] = {}  # token -> expiry (epoch) or None
        self._current: dict[str, str] = {}
        self.issue_credentials()

        self.cost_log: list[tuple[float, float]] = []  # (trio time, points charged)

        self._idempotency: dict[str, tuple[str, dict[str, Any]]] = {}
        self.idempotent_replays = 0
        self.applied_mutations = 0

        self.pending_webhooks: list[PendingWebhook] = []
        self.webhooks_delivered = 0

        self._operations: dict[str, _Operation] = {
            "GoqdPing": _Operation(_PingVars, self._op_ping),
            "GoqdOrders": _Operation(_OrdersVars, self._op_orders),
            "GoqdOrderLineItems": _Operation(_OrderLinesVars, self._op_order_lines),
            "GoqdSetQuantities": _Operation(_SetVars, self._op_set_quantities),
            "GoqdInventoryLevels": _Operation(_LevelsVars, self._op_levels),
            "GoqdVariants": _Operation(_VariantsVars, self._op_variants),
        }

    # -- credentials ------------------------------------------------------------------------

    def issue_credentials(self) -> dict[str, str]:
        """A new valid access token (with the app's webhook secret) for ``key set``."""
        token = f"shpat_{self.rng.getrandbits(128):032x}"
        expires = self.clock() + self.token_ttl if self.token_ttl else None
        self._tokens[token] = expires
        self._current = {"access_token": token, "webhook_secret": self.webhook_secret}
        if expires is not None:
            self._current["expires_at"] = _iso(expires)
        return dict(self._current)

    def expire_credentials(self) -> None:
        """Every token issued so far stops working (401, as Shopify answers)."""
        self._tokens.clear()

    def credentials(self) -> dict[str, str]:
        return dict(self._current)

    def _token_ok(self, token: str) -> bool:
        if token not in self._tokens:
            return False
        expires = self._tokens[token]
        return expires is None or self.clock() < expires

    # -- catalogue --------------------------------------------------------------------------

    def add_variant(
        self,
        sku: str,
        quantity: int | None = 0,
        *,
        name: str = "",
        barcode: str = "",
    ) -> SimListing:
        """A product variant with its inventory item; ``quantity=None`` = not tracked."""
        n = self.next_serial()
        key = f"gid://shopify/InventoryItem/{n}"
        attrs = {"variant_id": f"gid://shopify/ProductVariant/{n}", "barcode": barcode}
        return self.add_listing(
            key,
            link_code=sku,
            name=name or f"Product {sku} - Default Title",
            quantity=quantity,
            attrs=attrs,
        )

    def add_location(self, name: str) -> str:
        gid = f"gid://shopify/Location/{self.next_serial()}"
        self.locations[gid] = name
        return gid

    def set_level(self, listing_key: str, location_id: str, quantity: int) -> None:
        """Stock an item at a location (the primary location sets the listing itself)."""
        if location_id == self.primary_location:
            self.listings[listing_key].quantity = quantity
        else:
            self.other_levels[(listing_key, location_id)] = quantity

    def level(self, listing_key: str, location_id: str) -> int | None:
        if location_id == self.primary_location:
            listing = self.listings.get(listing_key)
            return None if listing is None else listing.quantity
        return self.other_levels.get((listing_key, location_id))

    def _variant_id(self, listing: SimListing) -> str:
        vid = listing.attrs.get("variant_id")
        if not vid:
            vid = f"gid://shopify/ProductVariant/{self.next_serial()}"
            listing.attrs["variant_id"] = vid
        return vid

    # -- orders -----------------------------------------------------------------------------

    def initial_status(self) -> str:
        return "open"

    def cancelled_status(self) -> str:
        return "cancelled"

    def status_flow(self) -> list[str]:
        return ["open", "closed"]

    def new_order_id(self) -> str:
        return f"gid://shopify/Order/{self.next_serial()}"

    def line_id_for(self, order: SimOrder, n: int) -> str:
        return f"gid://shopify/LineItem/{self.next_serial()}"

    def place_order(self, items: list[tuple[str, int]]) -> SimOrder | None:
        order = super().place_order(items)
        if order is not None:
            for line in order.lines:
                self.ordered_quantity[line.line_id] = line.quantity
            self._queue_webhook("orders/create", order)
        return order

    def cancel_order(self, order_id: str) -> None:
        already = self.orders[order_id].cancelled
        super().cancel_order(order_id)
        if not already:
            self.cancelled_at[order_id] = self.clock()
            self._queue_webhook("orders/cancelled", self.orders[order_id])
            self._queue_webhook("orders/updated", self.orders[order_id])

    def edit_quantity(self, order_id: str, line_id: str, quantity: int) -> None:
        super().edit_quantity(order_id, line_id, quantity)
        self._queue_webhook("orders/updated", self.orders[order_id])

    def set_status(self, order_id: str, status: str) -> None:
        super().set_status(order_id, status)
        self._queue_webhook("orders/updated", self.orders[order_id])

    # -- HTTP -------------------------------------------------------------------------------

    def api_name(self, request: Request) -> str:
        try:
            body = json.loads(request.body)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[…"
            return "graphql"
        name = body.get("operationName") if isinstance(body, dict) else None
        return name if isinstance(name, str) and name else "graphql"

    # Guard hooks: Shopify's answers (JSON ``errors``; throttles as GraphQL errors).

    def route_refusal(self, request: Request, api: str) -> Response | None:
        if request.path != self.path or request.method != "POST":
            return Response.json({"errors": "Not Found"}, 404)
        return None

    def maintenance_reply(self, api: str) -> Response:
        # [I] Shopify's 503 during an outage; a JSON errors string like its 4xx.
        return Response.json({"errors": "Service Unavailable"}, 503, headers={"retry-after": "60"})

    def server_error_reply(self, api: str) -> Response:
        return Response.json({"errors": "Internal Server Error"}, 500)

    def auth_refusal(self, request: Request, api: str, *, expired: bool) -> Response | None:
        if expired or not self._token_ok(request.headers.get("x-shopify-access-token", "")):
            return Response.json(
                UNAUTHORIZED_BODY,
                401,
                headers={"www-authenticate": 'Basic Realm="Shopify API Authentication"'},
            )
        return None

    def price(self, request: Request, api: str) -> float | Response:
        """The requested cost of the query, computed from its text before it runs."""
        try:
            _, _, body = self._parse(request)
            try:
                requested = query_cost(body["query"], body.get("variables") or {})
            except (ValueError, RecursionError) as exc:
                raise _GraphQLFailure(f"Parse error: {exc}", "BAD_REQUEST") from exc
            if requested > self.max_query_cost:
                raise _GraphQLFailure(
                    f"Query cost is {requested}, which exceeds the single query max cost "
                    f"limit ({self.max_query_cost}).",
                    "MAX_COST_EXCEEDED",
                    cost=requested,
                    maxCost=self.max_query_cost,
                )
        except _BadBody:
            return Response.json(
                {"errors": {"query": "Required parameter missing or invalid"}}, 400
            )
        except _GraphQLFailure as failure:
            return Response.json({"errors": failure.errors})
        return float(requested)

    def rate_plan(self, api: str) -> RatePlan | None:
        # One bucket of query cost for the app on this shop, whatever the operation.
        return RatePlan(self.cost_rate, self.bucket_size, key="cost")

    def documented_limit(self, api: str) -> tuple[float, float] | None:
        return None  # Shopify limits query cost, not requests: only its throttles count

    def throttle_reply(self, api: str, wait: float, *, cost: float, forced: bool) -> Response:
        if forced:
            # A forced throttle drains the bucket as far as a real one could be; the
            # status then implies a wait of up to faults.retry_after (a cheap query
            # cannot imply more), and the 429 variant says faults.retry_after outright.
            self._bucket().drain_for(trio.current_time(), cost, wait)
        body = {
            "errors": [
                {
                    "message": "Throttled",
                    "extensions": {
                        "code": "THROTTLED",
                        "documentation": "https://shopify.dev/api/usage/rate-limits",
                    },
                }
            ],
            "extensions": {"cost": self._cost(int(cost), None)},
        }
        if self.throttle_http_status == 429:
            return Response.json(body, 429, headers={"retry-after": str(max(1, math.ceil(wait)))})
        return Response.json(body)

    def _bucket(self) -> RateBucket:
        bucket = self.bucket("graphql")
        assert bucket is not None  # rate_plan always sets one
        return bucket

    def _parse(self, request: Request) -> tuple[_Operation, _Vars, dict[str, Any]]:
        try:
            body = json.loads(request.body)
            if not isinstance(body, dict) or not isinstance(body.get("query"), str):
                raise ValueError("no query")
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise _BadBody from exc
        query: str = body["query"]
        name = body.get("operationName")
        operation = self._operations.get(name) if isinstance(name, str) else None
        if operation is None or not re.search(rf"\b(query|mutation)\s+{name}\b", query):
            raise _GraphQLFailure(f'No operation named "{name}"', "OPERATION_NOT_FOUND")
        if not isinstance(body.get("variables") or {}, dict):
            raise _GraphQLFailure("Variables must be an object", "INVALID_VARIABLE")
        try:
            variables = msgspec.convert(body.get("variables") or {}, type=operation.vars_type)
        except msgspec.ValidationError as exc:
            raise _GraphQLFailure(f"Variable validation failed: {exc}", "INVALID_VARIABLE") from exc
        return operation, variables, body

    async def handle(self, request: Request, api: str) -> Response:
        # price() read and priced this body already; reading it again is pure.
        operation, variables, body = self._parse(request)
        requested = query_cost(body["query"], body.get("variables") or {})
        try:
            data, actual = await operation.run(variables, body["query"])
        except _GraphQLFailure as failure:
            self._settle(requested, 0)
            return Response.json({"errors": failure.errors})
        self._settle(requested, actual)
        return self._respond({"data": data, "extensions": {"cost": self._cost(requested, actual)}})

    def _settle(self, requested: int, actual: float) -> None:
        self._bucket().refund(requested - actual)
        self.cost_log.append((trio.current_time(), actual))

    def _cost(self, requested: int, actual: float | None) -> dict[str, Any]:
        return {
            "requestedQueryCost": requested,
            "actualQueryCost": actual,
            "throttleStatus": {
                "maximumAvailable": float(self.bucket_size),
                "currentlyAvailable": round(self._bucket().tokens, 3),
                "restoreRate": float(self.cost_rate),
            },
        }

    busy_page = "<!DOCTYPE html><html><body>Oops</body></html>"

    def _respond(self, payload: dict[str, Any]) -> Response:
        def drop(p: dict[str, Any]) -> dict[str, Any]:
            data = p["data"]
            return {
                **p,
                "data": {k: ({} if isinstance(v, dict) else None) for k, v in data.items()},
            }

        return self.reply_ok(
            payload,
            lambda p: json.dumps(p, ensure_ascii=False),
            drop_field=drop,
            wrong_type=lambda p: {**p, "data": {k: "unexpected" for k in p["data"]}},
        )

    # -- operations -------------------------------------------------------------------------

    async def _op_ping(self, v: _PingVars, query: str) -> tuple[dict[str, Any], float]:
        data = {
            "shop": {"id": "gid://shopify/Shop/1", "name": self.shop_id},
            "location": {"id": self.primary_location},
        }
        return data, 2

    def _search(self, text: str) -> Callable[[float], bool]:
        """The updated_at terms of an orders search query, ANDed. Anything else is
        refused [I: real Shopify ignores unknown terms; the sim is strict to catch
        adapter bugs]."""
        checks: list[Callable[[float], bool]] = []
        for term in filter(None, (t.strip() for t in text.split(" AND "))):
            m = _TERM.match(term)
            if m is None:
                raise _GraphQLFailure(f"Unsupported search term: {term}", "BAD_REQUEST")
            try:
                dt = datetime.fromisoformat(m.group(2))
            except ValueError as exc:
                raise _GraphQLFailure(f"Invalid date in search: {term}", "BAD_REQUEST") from exc
            bound = (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
            op = m.group(1)
            checks.append(
                {
                    ">": lambda t, b=bound: t > b,
                    ">=": lambda t, b=bound: t >= b,
                    "<": lambda t, b=bound: t < b,
                    "<=": lambda t, b=bound: t <= b,
                }[op]
            )
        return lambda t: all(check(t) for check in checks)

    def _line_node(self, order: SimOrder, index: int) -> dict[str, Any]:
        line = order.lines[index]
        listing = self.listings.get(line.listing_key)
        variant = None
        if listing is not None:
            variant = {
                "id": self._variant_id(listing),
                "barcode": listing.attrs.get("barcode") or None,
                "inventoryItem": {"id": listing.listing_key},
            }
        return {
            "id": line.line_id,
            "sku": listing.link_code if listing is not None else None,
            "quantity": self.ordered_quantity.get(line.line_id, line.quantity),
            "currentQuantity": line.quantity,
            "variant": variant,
        }

    def _lines_conn(self, order: SimOrder, start: int, first: int) -> tuple[dict[str, Any], int]:
        end = min(len(order.lines), start + first)
        nodes = [self._line_node(order, i) for i in range(start, end)]
        conn = {
            "nodes": nodes,
            "pageInfo": {"hasNextPage": end < len(order.lines), "endCursor": _cursor(end)},
        }
        return conn, len(nodes)

    async def _op_orders(self, v: _OrdersVars, query: str) -> tuple[dict[str, Any], float]:
        match = self._search(v.query)
        rows = sorted(
            ((int(o.updated_at), _num(o.order_id), o) for o in self.orders.values()),
            key=lambda r: (r[0], r[1]),
        )
        rows = [r for r in rows if match(r[0])]
        if v.after:
            mark = _uncursor(v.after)
            rows = [r for r in rows if [r[0], r[1]] > mark]
        page = rows[: v.first]
        nodes = []
        actual = 2.0
        for updated, _, order in page:
            lines, n = self._lines_conn(order, 0, v.line_first)
            cancelled = self.cancelled_at.get(order.order_id)
            nodes.append(
                {
                    "id": order.order_id,
                    "name": f"#{1000 + _num(order.order_id)}",
                    "updatedAt": _iso(updated),
                    "cancelledAt": _iso(cancelled) if cancelled is not None else None,
                    "closed": order.status == "closed",
                    "lineItems": lines,
                }
            )
            actual += 3 + 3 * n
        end = [page[-1][0], page[-1][1]] if page else None
        info = {"hasNextPage": len(rows) > v.first, "endCursor": _cursor(end) if end else None}
        return {"orders": {"nodes": nodes, "pageInfo": info}}, actual

    async def _op_order_lines(self, v: _OrderLinesVars, query: str) -> tuple[dict[str, Any], float]:
        order = self.orders.get(v.id)
        if order is None:
            return {"order": None}, 1
        start = int(_uncursor(v.after)) if v.after else 0
        lines, n = self._lines_conn(order, start, v.first)
        return {"order": {"id": order.order_id, "lineItems": lines}}, 3 + 3 * n

    async def _op_levels(self, v: _LevelsVars, query: str) -> tuple[dict[str, Any], float]:
        if v.location_id not in self.locations:
            raise _GraphQLFailure(f"Invalid id: {v.location_id}", "BAD_REQUEST")
        nodes: list[dict[str, Any] | None] = []
        actual = 0.0
        for gid in v.ids:
            if not gid.startswith("gid://"):
                raise _GraphQLFailure(f"Invalid global id '{gid}'", "BAD_REQUEST")
            listing = self.listings.get(gid)
            if listing is None:
                nodes.append(None)
                continue
            nodes.append(self._item_node(listing, v.location_id))
            actual += 3
        return {"nodes": nodes}, actual

    def _item_node(self, listing: SimListing, location_id: str) -> dict[str, Any]:
        level = None
        stocked = location_id == self.primary_location or (
            (listing.listing_key, location_id) in self.other_levels
        )
        if stocked:
            qty = self.level(listing.listing_key, location_id)
            level = {"quantities": [{"name": "available", "quantity": qty or 0}]}
        return {
            "id": listing.listing_key,
            "tracked": listing.quantity is not None,
            "inventoryLevel": level,
        }

    async def _op_variants(self, v: _VariantsVars, query: str) -> tuple[dict[str, Any], float]:
        if v.location_id not in self.locations:
            raise _GraphQLFailure(f"Invalid id: {v.location_id}", "BAD_REQUEST")
        listings = list(self.listings.values())
        start = int(_uncursor(v.after)) if v.after else 0
        page = listings[start : start + v.first]
        nodes = [
            {
                "id": self._variant_id(listing),
                "sku": listing.link_code or None,
                "barcode": listing.attrs.get("barcode") or None,
                "displayName": listing.name,
                "inventoryItem": self._item_node(listing, v.location_id),
            }
            for listing in page
        ]
        end = start + len(page)
        info = {"hasNextPage": end < len(listings), "endCursor": _cursor(end)}
        return {"productVariants": {"nodes": nodes, "pageInfo": info}}, 2 + 4 * len(page)

    async def _op_set_quantities(self, v: _SetVars, query: str) -> tuple[dict[str, Any], float]:
        directive = _IDEMPOTENT.search(query)
        key: str | None = None
        if directive is not None:
            literal, var = directive.groups()
            key = (
                literal
                if literal is not None
                else (v.idempotency_key if var == "idempotencyKey" else None)
            )
        if not key:
            # [I] message text; the 2026-04 changelog says only "an error at runtime".
            raise _GraphQLFailure(
                "An idempotency key is required for this mutation. Provide one with the "
                "@idempotent(key: ...) directive.",
                "IDEMPOTENCY_KEY_REQUIRED",
            )
        if len(v.input.quantities) > self.max_quantities:
            raise _GraphQLFailure(
                f"The input array size of {len(v.input.quantities)} is greater than the "
                f"maximum allowed of {self.max_quantities}.",
                "MAX_INPUT_SIZE_EXCEEDED",
            )
        for i, q in enumerate(v.input.quantities):
            if q.change_from_quantity is UNSET:
                raise _GraphQLFailure(
                    f"quantities.{i}.changeFromQuantity must be provided (null skips the "
                    "check) as of 2026-04.",
                    "INVALID_VARIABLE",
                )
        fingerprint = json.dumps(msgspec.to_builtins(v.input), sort_keys=True)
        stored = self._idempotency.get(key)
        if stored is not None:
            if stored[0] == fingerprint:
                self.idempotent_replays += 1
                return stored[1], MUTATION_COST
            data = self._set_payload(
                None,
                [
                    self._user_error(
                        "IDEMPOTENCY_KEY_PARAMETER_MISMATCH",
                        "The same idempotency key cannot be used with different operation "
                        "parameters.",
                        None,
                    )
                ],
            )
            return data, MUTATION_COST
        data = self._set_quantities(v.input)
        self._idempotency[key] = (fingerprint, data)
        if self.faults.timeout_after_apply:
            await trio.sleep(3600)
        return data, MUTATION_COST

    @staticmethod
    def _user_error(code: str, message: str, field: list[str] | None) -> dict[str, Any]:
        return {"code": code, "field": field, "message": message}

    @staticmethod
    def _set_payload(group: dict[str, Any] | None, errors: list[dict[str, Any]]) -> dict[str, Any]:
        return {"inventorySetQuantities": {"inventoryAdjustmentGroup": group, "userErrors": errors}}

    def _set_quantities(self, input_: _SetInput) -> dict[str, Any]:
        errors: list[dict[str, Any]] = []
        if input_.name not in ("available", "on_hand"):
            errors.append(
                self._user_error(
                    "INVALID_NAME",
                    "The quantity name must be either 'available' or 'on_hand'.",
                    ["input", "name"],
                )
            )
        if input_.reason not in REASONS:
            errors.append(
                self._user_error(
                    "INVALID_REASON", "The specified reason is invalid.", ["input", "reason"]
                )
            )
        uri = input_.reference_document_uri
        if uri is not None and not _URI.match(uri):
            errors.append(
                self._user_error(
                    "INVALID_REFERENCE_DOCUMENT",
                    "The specified reference document is invalid.",
                    ["input", "referenceDocumentUri"],
                )
            )
        if errors:
            return self._set_payload(None, errors)
        valid: list[_QuantityIn] = []
        seen: set[tuple[str, str]] = set()
        for i, q in enumerate(input_.quantities):
            err = self._check_quantity(i, q, seen)
            if err is None:
                valid.append(q)
            else:
                errors.append(err)
        if errors and self.atomic_set:
            return self._set_payload(None, errors)
        changes = []
        for q in valid:
            before = self.level(q.inventory_item_id, q.location_id) or 0
            if q.location_id == self.primary_location:
                self.apply_stock(q.inventory_item_id, q.quantity)
            elif not self.faults.silent_noop:
                self.other_levels[(q.inventory_item_id, q.location_id)] = q.quantity
            changes.append(
                {
                    "name": input_.name,
                    "delta": q.quantity - before,
                    "quantityAfterChange": q.quantity,
                }
            )
        group = None
        if valid:
            self.applied_mutations += 1
            group = {
                "id": f"gid://shopify/InventoryAdjustmentGroup/{self.next_serial()}",
                "changes": changes,
            }
        return self._set_payload(group, errors)

    def _check_quantity(
        self, i: int, q: _QuantityIn, seen: set[tuple[str, str]]
    ) -> dict[str, Any] | None:
        base = ["input", "quantities", str(i)]
        pair = (q.inventory_item_id, q.location_id)
        if pair in seen:
            return self._user_error(
                "NO_DUPLICATE_INVENTORY_ITEM_ID_GROUP_ID_PAIR",
                "The combination of inventoryItemId and locationId must be unique.",
                [*base, "inventoryItemId"],
            )
        seen.add(pair)
        if q.inventory_item_id not in self.listings:
            return self._user_error(
                "INVALID_INVENTORY_ITEM",
                "The specified inventory item could not be found.",
                [*base, "inventoryItemId"],
            )
        if q.location_id not in self.locations:
            return self._user_error(
                "INVALID_LOCATION",
                "The specified location could not be found.",
                [*base, "locationId"],
            )
        if q.location_id != self.primary_location and pair not in self.other_levels:
            return self._user_error(
                "ITEM_NOT_STOCKED_AT_LOCATION",
                "The specified inventory item is not stocked at the location.",
                [*base, "locationId"],
            )
        if q.quantity < 0:
            return self._user_error(
                "INVALID_QUANTITY_NEGATIVE",
                "The quantity can't be negative.",
                [*base, "quantity"],
            )
        if q.quantity > 1_000_000_000:
            return self._user_error(
                "INVALID_QUANTITY_TOO_HIGH",
                "The total quantity can't be higher than 1,000,000,000.",
                [*base, "quantity"],
            )
        change_from = q.change_from_quantity
        if change_from is not None and change_from != self.level(*pair):
            return self._user_error(
                "CHANGE_FROM_QUANTITY_STALE",
                "The changeFromQuantity value does not match persisted value.",
                [*base, "changeFromQuantity"],
            )
        return None

    # -- webhooks ---------------------------------------------------------------------------

    def _queue_webhook(self, topic: str, order: SimOrder) -> None:
        if not self.webhook_url:
            return
        cancelled = self.cancelled_at.get(order.order_id)
        payload = {
            "id": _num(order.order_id),
            "admin_graphql_api_id": order.order_id,
            "name": f"#{1000 + _num(order.order_id)}",
            "created_at": _iso(order.created_at),
            "updated_at": _iso(order.updated_at),
            "cancelled_at": _iso(cancelled) if cancelled is not None else None,
            "line_items": [
                {
                    "id": _num(line.line_id),
                    "admin_graphql_api_id": line.line_id,
                    "sku": self.listings[line.listing_key].link_code
                    if line.listing_key in self.listings
                    else None,
                    "quantity": self.ordered_quantity.get(line.line_id, line.quantity),
                    "current_quantity": line.quantity,
                }
                for line in order.lines
            ],
        }
        n = self.next_serial()
        self.pending_webhooks.append(
            PendingWebhook(
                topic=topic,
                body=json.dumps(payload, ensure_ascii=False).encode(),
                webhook_id=f"{n:08x}-0000-4000-8000-{self.rng.getrandbits(48):012x}",
                event_id=f"{n:08x}-0000-4000-9000-{self.rng.getrandbits(48):012x}",
                triggered_at=datetime.fromtimestamp(self.clock(), UTC).isoformat(),
            )
        )

    async def deliver_webhooks(self, http: httpx.AsyncClient) -> int:
        """POST every pending webhook to ``webhook_url``; keep those not answered 2xx.

        Returns how many were delivered. A failed delivery stays queued with the same
        webhook and event ids, as Shopify's retries are.
        """
        if not self.webhook_url:
            return 0
        secret = self.webhook_secret.encode("utf-8")
        delivered = 0
        keep: list[PendingWebhook] = []
        for hook in self.pending_webhooks:
            hook.attempts += 1
            headers = {
                "Content-Type": "application/json",
                "X-Shopify-Topic": hook.topic,
                "X-Shopify-Hmac-Sha256": base64.b64encode(
                    hmac.new(secret, hook.body, hashlib.sha256).digest()
                ).decode("ascii"),
                "X-Shopify-Shop-Domain": self.domain,
                "X-Shopify-Webhook-Id": hook.webhook_id,
                "X-Shopify-Event-Id": hook.event_id,
                "X-Shopify-Triggered-At": hook.triggered_at,
                "X-Shopify-API-Version": API_VERSION,
            }
            try:
                resp = await http.post(self.webhook_url, content=hook.body, headers=headers)
            except httpx.HTTPError:
                keep.append(hook)
                continue
            if 200 <= resp.status_code < 300:
                delivered += 1
            else:
                keep.append(hook)
        self.pending_webhooks = keep
        self.webhooks_delivered += delivered
        return delivered


def _add_variant(sim: SimMall, key: str, sku: str, name: str, quantity: int) -> SimListing:
    # Shopify addresses stock by InventoryItem GID, minted by the shop.
    assert isinstance(sim, SimShopify)
    return sim.add_variant(sku, quantity, name=name)


SIM = SimSpec("shopify", SimShopify, add=_add_variant)
