"""Simulated Amazon SP-API (JP marketplace): LWA token endpoint, Orders v0, Listings Items.

Speaks the paths, headers, bodies and error shapes of docs/malls.md §3 and of Amazon's
own models (``tests/fixtures/spapi``), so the adapter in ``goqd/malls/amazon.py`` talks to it
exactly as to the real service (only the base URL differs; LWA is served on the same
host). The tests validate every request and response recorded in ``exchanges`` against
the models.

- ``POST /auth/o2/token`` (refresh-token grant): access tokens ``Atza|…`` live 3600 s of
  the sim clock; ``invalid_grant`` (400) for a dead refresh token, ``invalid_client``
  (401) for a wrong client id/secret.
- Every SP-API call needs a live ``x-amz-access-token``; otherwise 403 ``Unauthorized``
  ("Access to requested resource is denied.") [V], with "The access token you provided
  has expired." in ``details`` for an expired one [I: details text].
- ``GET /orders/v0/orders`` (getOrders), ``GET /orders/v0/orders/{id}/orderItems``
  (getOrderItems), ``GET|PATCH /listings/2021-08-01/items/{sellerId}/{sku}``
  (getListingsItem, patchListingsItem), ``GET /listings/2021-08-01/items/{sellerId}``
  (searchListingsItems).
- Usage plans per operation as in the models [V] (token buckets on
  ``trio.current_time()``); over the limit: 429 ``QuotaExceeded`` [I: code and text],
  counted in ``throttled_requests``, with ``Retry-After`` only if ``retry_after_header``
  [I: SP-API documents no Retry-After].
- getOrders rules [V]: exactly one of ``CreatedAfter``/``LastUpdatedAfter``, no
  ``Created*`` with ``LastUpdated*``, Before ≥ After and at least ``min_before_s``
  (120) before now, ``MaxResultsPerPage`` 1–100, enum-checked statuses and channels.
  Errors are 400 ``InvalidInput``. With ``NextToken`` only ``MarketplaceIds`` may come
  along [I: developers report InvalidInput otherwise]; tokens are base64 with ``+/=`` so
  an adapter that does not URL-encode them fails here too.
- Eventual consistency [V: "most updated orders data are available two minutes after"]:
  getOrders shows an order as it was ``data_lag_s`` (120) seconds ago — a new order is
  invisible for that long, a fresh cancellation still shows the old status.
  getOrderItems reads the current order.
- Statuses Pending → Unshipped → Shipped, cancellation Canceled; ``afn_rate`` (or
  ``place_fba_order``) makes FBA orders that leave MFN stock alone.
- patchListingsItem: HTTP 200 with ``ACCEPTED`` or ``INVALID`` plus issues [V]. Refused
  (INVALID): a path that is not a top-level snake_case attribute (camelCase
  ``fulfillmentAvailability`` → ``90000900`` [V]), an entry without
  ``fulfillment_channel_code`` (the "does not have enough values" message [V]), a bad
  quantity, a lead time above 30 days [V] or a restock date that is not YYYY-MM-DD [I],
  and — by default — an unknown SKU (``unknown_sku="accept"`` instead accepts it and
  stores nothing visible, as Amazon does for some patches to unknown SKUs [V:
  selling-partner-api-models#2797]). ``replace`` sets exactly the keys given, so a push
  without the lead time clears it [V: #4406]; another channel code is added beside the
  existing one [V: #2061]. Accepted patches apply after ``apply_delay_s`` [V: ACCEPTED is
  asynchronous]; ``faults.silent_noop`` accepts and never applies [V: #5327].
  Every patch is kept in ``patches`` with the SKU and body.

Never listens on anything but loopback (``serve_sim`` enforces it).
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any, Unpack

import trio

from goqd.sim.base import (
    RatePlan,
    RefreshTokenMall,
    SimArgs,
    SimLine,
    SimListing,
    SimOrder,
    SimSpec,
)
from goqd.sim.http import Request, Response

JST = timezone(timedelta(hours=9))
MARKETPLACE_JP = "A1VC38T7YXB528"
LWA_PATH = "/auth/o2/token"
ORDERS_PATH = "/orders/v0/orders"
LISTINGS_PATH = "/listings/2021-08-01/items/"
ACCESS_TOKEN_LIFETIME_S = 3600
LEAD_TIME_MAX_DAYS = 30
HISTORY = 10_000  # exchanges and patches kept for inspection
OPEN_TOKENS = 1_000  # NextToken / pageToken results kept; the oldest is dropped first

# Usage plans from the models' operation descriptions [V]: (rate per second, burst).
USAGE_PLANS: dict[str, tuple[float, float]] = {
    "getOrders": (0.0167, 20.0),
    "getOrderItems": (0.5, 30.0),
    "getListingsItem": (5.0, 10.0),
    "patchListingsItem": (5.0, 5.0),
    "searchListingsItems": (5.0, 5.0),
}
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
INCLUDED_DATA = frozenset(
    {
        "summaries",
        "attributes",
        "issues",
        "offers",
        "fulfillmentAvailability",
        "procurement",
        "relationships",
        "productTypes",
    }
)
PATCH_OPS = frozenset({"add", "replace", "merge", "delete"})
MFN = "DEFAULT"
FBA = "AMAZON_JP"

MSG_UNAUTHORIZED = "Access to requested resource is denied."
MSG_EXPIRED = "The access token you provided has expired."
MSG_QUOTA = "You exceeded your quota for the requested resource."
MSG_UNPARSEABLE = "Request has missing or invalid parameters and cannot be parsed."
MSG_NEXT_TOKEN = (
    "We could not decode your NextToken. Possible reasons include: a transmission "
    "error, improper quoting or a truncation problem."
)

_ATTRIBUTE_PATH = re.compile(r"^/attributes/([a-z0-9_]+)$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(math.floor(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: str) -> float:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def _json_text(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False)


def _csv(values: list[str] | None) -> list[str]:
    return [v for raw in values or () for v in raw.split(",") if v]


@dataclass
class SimExchange:
    """One SP-API request and the answer to it, for model validation in tests."""

    operation: str
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes
    status: int
    response: bytes


@dataclass
class PatchRecord:
    sku: str
    body: Any
    status: str  # ACCEPTED / INVALID / VALID, or "HTTP 400"


@dataclass
class _Pages:
    """What a NextToken / pageToken stands for: the rest of a result."""

    rows: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)


class _BadRequest(Exception):
    def __init__(self, message: str, code: str = "InvalidInput") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SimAmazon(RefreshTokenMall):
    """Amazon SP-API for one seller (``shop_id`` is the seller id) in one marketplace."""

    mall = "amazon"

    def __init__(
        self,
        *,
        marketplace_id: str = MARKETPLACE_JP,
        data_lag_s: float = 120.0,
        min_before_s: float = 120.0,
        apply_delay_s: float = 0.0,
        unknown_sku: str = "invalid",
        afn_rate: float = 0.0,
        items_page_size: int = 100,
        retry_after_header: bool = False,
        initial_status: str = "Pending",
        **base: Unpack[SimArgs],
    ) -> None:
        super().__init__(**base)
        if unknown_sku not in ("invalid", "accept"):
            raise ValueError("unknown_sku must be 'invalid' or 'accept'")
        self.marketplace_id = marketplace_id
        self.data_lag_s = data_lag_s
        self.min_before_s = min_before_s
        self.apply_delay_s = apply_delay_s
        self.unknown_sku = unknown_sku
        self.afn_rate = afn_rate
        self.items_page_size = items_page_size
        self.retry_after_header = retry_after_header
        self._initial_status = initial_status
        self.client_id = f"amzn1.application-oa2-client.{self.rng.getrandbits(128):032x}"
        self.client_secret = f"amzn1.oa2-cs.v1.{self.rng.getrandbits(256):064x}"
        self._pages: dict[str, _Pages] = {}
        self._versions: dict[str, list[tuple[float, str]]] = {}  # order -> (updated, status)
        self._channel: dict[str, str] = {}  # order id -> MFN / AFN
        self._other_channels: dict[str, dict[str, dict[str, Any]]] = {}
        self._pending: list[tuple[float, str, list[dict[str, Any]]]] = []
        self._request_serial = 0
        # Bounded so a long demo or benchmark run does not grow without limit.
        self.exchanges: deque[SimExchange] = deque(maxlen=HISTORY)
        self.patches: deque[PatchRecord] = deque(maxlen=HISTORY)
        self._current = self.issue_credentials()

    # -- catalogue ---------------------------------------------------------------------

    def add_item(
        self,
        sku: str,
        *,
        quantity: int = 0,
        name: str = "",
        asin: str = "",
        fba: bool = False,
        lead_time_days: int | None = None,
        restock_date: str | None = None,
        price: int = 1000,
    ) -> SimListing:
        """A listing: merchant-fulfilled (``DEFAULT``) unless ``fba``."""
        attrs = {
            "asin": asin or self._asin_for(sku),
            "channel": FBA if fba else MFN,
            "price": str(price),
            "created_at": str(self.clock()),
        }
        if lead_time_days is not None:
            attrs["lead_time_to_ship_max_days"] = str(lead_time_days)
        if restock_date is not None:
            attrs["restock_date"] = restock_date
        return self.add_listing(sku, link_code=sku, name=name, quantity=quantity, attrs=attrs)

    @staticmethod
    def _asin_for(sku: str) -> str:
        digest = sum((i + 1) * ord(c) for i, c in enumerate(sku)) % 36**8
        chars = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        text = ""
        for _ in range(8):
            digest, r = divmod(digest, 36)
            text = chars[r] + text
        return "B0" + text

    def lead_time(self, sku: str) -> int | None:
        """The lead time Amazon holds for ``sku`` (what the last applied patch sent)."""
        value = self.listings[sku].attrs.get("lead_time_to_ship_max_days")
        return int(value) if value is not None else None

    def restock_date(self, sku: str) -> str | None:
        return self.listings[sku].attrs.get("restock_date")

    def stock(self, listing_key: str) -> int | None:
        self.settle()
        return super().stock(listing_key)

    # -- orders ------------------------------------------------------------------------

    def initial_status(self) -> str:
        return self._initial_status

    def cancelled_status(self) -> str:
        return "Canceled"

    def status_flow(self) -> list[str]:
        return ["Pending", "Unshipped", "Shipped"]

    def new_order_id(self) -> str:
        serial = self.next_serial()
        return f"503-{serial:07d}-{(serial * 7919) % 10**7:07d}"

    def line_id_for(self, order: SimOrder, n: int) -> str:
        return f"{self.next_serial():014d}"

    def place_order(
        self, items: list[tuple[str, int]], *, channel: str | None = None
    ) -> SimOrder | None:
        """A customer orders; MFN orders lower the listing's quantity (Amazon does [V])."""
        if channel == "AFN" or (channel is None and self.roll(self.afn_rate)):
            return self.place_fba_order(items)
        order = super().place_order(items)
        if order is not None:
            self._channel[order.order_id] = "MFN"
            self._snapshot(order)
        return order

    def place_fba_order(self, items: list[tuple[str, int]]) -> SimOrder:
        """An order Amazon fulfils from its own warehouse: MFN stock stays as it is."""
        now = self.clock()
        order = SimOrder(self.new_order_id(), [], self.initial_status(), now, now)
        for n, (key, qty) in enumerate(items, start=1):
            order.lines.append(SimLine(self.line_id_for(order, n), key, qty))
        self.orders[order.order_id] = order
        self._channel[order.order_id] = "AFN"
        self._snapshot(order)
        return order

    def cancel_order(self, order_id: str) -> None:
        order = self.orders[order_id]
        if order.cancelled:
            return
        if self._channel.get(order_id) == "AFN":
            order.cancelled = True
            order.status = self.cancelled_status()
            order.updated_at = self.clock()
        else:
            super().cancel_order(order_id)
        self._snapshot(order)

    def set_status(self, order_id: str, status: str) -> None:
        super().set_status(order_id, status)
        self._snapshot(self.orders[order_id])

    def edit_quantity(self, order_id: str, line_id: str, quantity: int) -> None:
        super().edit_quantity(order_id, line_id, quantity)
        self._snapshot(self.orders[order_id])

    def _snapshot(self, order: SimOrder) -> None:
        self._versions.setdefault(order.order_id, []).append((order.updated_at, order.status))

    def _visible(self, order_id: str, now: float) -> tuple[float, str] | None:
        """The order as getOrders shows it now: as it was ``data_lag_s`` ago."""
        for updated_at, status in reversed(self._versions.get(order_id, ())):
            if updated_at + self.data_lag_s <= now:
                return updated_at, status
        return None

    # -- credentials -------------------------------------------------------------------

    def credentials(self) -> dict[str, str]:
        return dict(self._current)

    def issue_credentials(self) -> dict[str, str]:
        """The seller authorizes the app again: a new LWA refresh token."""
        token = f"Atzr|{base64.urlsafe_b64encode(self.rng.randbytes(48)).decode()}"
        self._refresh_tokens[token] = math.inf  # LWA refresh tokens do not expire
        self._current = {
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "refresh_token": token,
            "seller_id": self.shop_id,
            "authorized_at": datetime.fromtimestamp(self.clock(), JST).date().isoformat(),
        }
        return dict(self._current)

    # -- HTTP --------------------------------------------------------------------------

    def api_name(self, request: Request) -> str:
        if request.path == LWA_PATH:
            return "lwa"
        route = self._route(request)
        return route[0] if route else request.path

    def _route(self, request: Request) -> tuple[str, dict[str, str]] | None:
        path, method = request.path, request.method
        if path == ORDERS_PATH and method == "GET":
            return "getOrders", {}
        if path.startswith(ORDERS_PATH + "/") and path.endswith("/orderItems"):
            order_id = path[len(ORDERS_PATH) + 1 : -len("/orderItems")]
            if method == "GET" and order_id and "/" not in order_id:
                return "getOrderItems", {"orderId": order_id}
            return None
        if path.startswith(LISTINGS_PATH):
            # The ASGI path is already percent-decoded, so a SKU may contain "/".
            seller, sep, sku = path[len(LISTINGS_PATH) :].partition("/")
            if not sep:
                return ("searchListingsItems", {"sellerId": seller}) if method == "GET" else None
            if sku and method == "GET":
                return "getListingsItem", {"sellerId": seller, "sku": sku}
            if sku and method == "PATCH":
                return "patchListingsItem", {"sellerId": seller, "sku": sku}
        return None

    # Guard hooks: the SP-API's answers in its error format.

    def route_refusal(self, request: Request, api: str) -> Response | None:
        if api == "lwa" or api in USAGE_PLANS:
            return None
        return self._error(404, "NotFound", "Resource not found.")

    def guarded(self, request: Request, api: str) -> bool:
        return api != "lwa"  # LWA is api.amazon.com, another service

    def maintenance_reply(self, api: str) -> Response:
        return self._error(503, "ServiceUnavailable", "Service temporarily unavailable.")

    def server_error_reply(self, api: str) -> Response:
        return self._error(
            500, "InternalFailure", "We encountered an internal error. Please try again."
        )

    def auth_refusal(self, request: Request, api: str, *, expired: bool) -> Response | None:
        state = self.access_expired(request.headers.get("x-amz-access-token", ""))
        if expired or state:
            return self._error(403, "Unauthorized", MSG_UNAUTHORIZED, MSG_EXPIRED)
        if state is None:
            return self._error(403, "Unauthorized", MSG_UNAUTHORIZED)
        return None

    def rate_plan(self, api: str) -> RatePlan | None:
        rate, burst = USAGE_PLANS[api]
        # A client that paces itself exactly at the plan's rate may arrive with 1 - ε
        # tokens because of float rounding; that is not over the limit.
        return RatePlan(rate, burst, slack=1e-9)

    def documented_limit(self, api: str) -> tuple[float, float] | None:
        plan = USAGE_PLANS.get(api)
        return None if plan is None else (float(plan[0]), float(plan[1]))

    def throttle_reply(self, api: str, wait: float, *, cost: float, forced: bool) -> Response:
        headers = {"Retry-After": str(max(1, math.ceil(wait)))} if self.retry_after_header else {}
        return self._error(429, "QuotaExceeded", MSG_QUOTA, headers=headers)

    async def handle(self, request: Request, api: str) -> Response:
        self.settle()
        if api == "lwa":
            return self._lwa(request)
        route = self._route(request)
        assert route is not None  # route_refusal answered every other request
        operation, params = route
        handler: Callable[[Request, dict[str, str]], Response] = {
            "getOrders": self._get_orders,
            "getOrderItems": self._get_order_items,
            "getListingsItem": self._get_listings_item,
            "searchListingsItems": self._search_listings_items,
            "patchListingsItem": self._patch_listings_item,
        }[operation]
        try:
            response = handler(request, params)
        except _BadRequest as exc:
            response = self._error(400, exc.code, exc.message)
        response.headers["x-amzn-RateLimit-Limit"] = f"{USAGE_PLANS[operation][0]:g}"
        if operation == "patchListingsItem" and self.faults.timeout_after_apply:
            # The patch is applied; the answer never comes within a client timeout.
            await trio.sleep(3600)
        return response

    def answered(self, request: Request, api: str, response: Response) -> None:
        if api not in USAGE_PLANS:
            return  # only SP-API operations are validated against the models
        self.exchanges.append(
            SimExchange(
                api,
                request.method,
                request.path,
                {k: list(v) for k, v in request.query.items()},
                request.body,
                response.status,
                response.body,
            )
        )

    def _error(
        self,
        status: int,
        code: str,
        message: str,
        details: str = "",
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        return Response.json(
            {"errors": [{"code": code, "message": message, "details": details}]},
            status,
            headers={"x-amzn-RequestId": self._request_id(), **(headers or {})},
        )

    def _request_id(self) -> str:
        self._request_serial += 1
        n = self._request_serial
        return f"{n:08x}-0000-4000-8000-{(n * 2654435761) % 16**12:012x}"

    def _ok(self, payload: dict[str, Any]) -> Response:
        """A 200 JSON answer (spoiled as ``faults.malformed`` asks)."""
        return self.reply_ok(
            payload,
            _json_text,
            drop_field=lambda p: {},
            wrong_type=lambda p: {k: 12345 for k in p},
            headers={"x-amzn-RequestId": self._request_id()},
        )

    # -- LWA ---------------------------------------------------------------------------

    def _lwa(self, request: Request) -> Response:
        if request.method != "POST":
            return Response.json({"error": "invalid_request"}, 400)
        try:
            form = request.form()
        except UnicodeDecodeError:
            form = {}
        if form.get("grant_type") != "refresh_token":
            return Response.json(
                {"error": "unsupported_grant_type", "error_description": "grant_type"}, 400
            )
        if form.get("client_id") != self.client_id or (
            form.get("client_secret") != self.client_secret
        ):
            return Response.json(
                {"error": "invalid_client", "error_description": "Client authentication failed"},
                401,
            )
        token = form.get("refresh_token", "")
        if self.faults.expired_credential or not self.refresh_ok(token):
            return Response.json(
                {
                    "error": "invalid_grant",
                    "error_description": "The request has an invalid grant parameter : "
                    "refresh_token",
                },
                400,
            )
        access = f"Atza|{base64.urlsafe_b64encode(self.rng.randbytes(48)).decode()}"
        self.add_access_token(access, ACCESS_TOKEN_LIFETIME_S)
        return Response.json(
            {
                "access_token": access,
                "refresh_token": token,
                "token_type": "bearer",
                "expires_in": ACCESS_TOKEN_LIFETIME_S,
            }
        )

    # -- pagination --------------------------------------------------------------------

    def _new_token(self, pages: _Pages) -> str:
        # Real tokens are long base64 strings with "+", "/" and "=" [V: issue reports].
        token = base64.b64encode(self.rng.randbytes(45) + b"\xfb\xff").decode()
        self._pages[token] = pages
        while len(self._pages) > OPEN_TOKENS:
            del self._pages[next(iter(self._pages))]
        return token

    def _page(self, rows: list[dict[str, Any]], size: int) -> tuple[list[dict[str, Any]], str]:
        if len(rows) <= size:
            return rows, ""
        return rows[:size], self._new_token(_Pages(rows[size:]))

    def _marketplaces(self, request: Request, name: str) -> None:
        ids = _csv(request.query.get(name))
        if not ids:
            raise _BadRequest(f"Missing required parameter: {name}.")
        if self.marketplace_id not in ids:
            raise _BadRequest(f"Invalid {name}: the seller does not sell in {','.join(ids)}.")

    # -- getOrders ---------------------------------------------------------------------

    def _get_orders(self, request: Request, params: dict[str, str]) -> Response:
        self._marketplaces(request, "MarketplaceIds")
        token = request.arg("NextToken")
        if token:
            mixed = set(request.query) - {"MarketplaceIds", "NextToken"}
            if mixed:
                raise _BadRequest(
                    "NextToken cannot be combined with " + ", ".join(sorted(mixed)) + "."
                )
            pages = self._pages.pop(token, None)
            if pages is None:
                raise _BadRequest(MSG_NEXT_TOKEN)
            rows, next_token = self._page(pages.rows, pages.extra["size"])
            if next_token:
                self._pages[next_token].extra = pages.extra
            return self._ok({"payload": self._orders_payload(rows, next_token, pages.extra)})

        now = self.clock()
        created_after = self._date_arg(request, "CreatedAfter")
        created_before = self._date_arg(request, "CreatedBefore")
        updated_after = self._date_arg(request, "LastUpdatedAfter")
        updated_before = self._date_arg(request, "LastUpdatedBefore")
        if (created_after is None) == (updated_after is None):
            raise _BadRequest("Exactly one of CreatedAfter and LastUpdatedAfter is required.")
        if updated_after is not None and created_before is not None:
            raise _BadRequest("CreatedBefore cannot be combined with LastUpdatedAfter.")
        if created_after is not None and updated_before is not None:
            raise _BadRequest("LastUpdatedBefore cannot be combined with CreatedAfter.")
        by_update = updated_after is not None
        after = updated_after if by_update else created_after
        before = updated_before if by_update else created_before
        assert after is not None
        latest = now - self.min_before_s
        name = "LastUpdated" if by_update else "Created"
        if before is None:
            before = latest
        elif before > latest:
            raise _BadRequest(
                f"{name}Before must be at least {self.min_before_s:g} seconds before the "
                "time of the request."
            )
        if after > before:
            raise _BadRequest(f"{name}Before must be equal to or after {name}After.")
        size_text = request.arg("MaxResultsPerPage", "100")
        if not size_text.isdigit() or not 1 <= int(size_text) <= 100:
            raise _BadRequest("MaxResultsPerPage must be an integer between 1 and 100.")
        statuses = set(_csv(request.query.get("OrderStatuses")))
        if statuses - ORDER_STATUSES:
            raise _BadRequest(
                f"Invalid OrderStatuses: {', '.join(sorted(statuses - ORDER_STATUSES))}."
            )
        channels = set(_csv(request.query.get("FulfillmentChannels")))
        if channels - {"AFN", "MFN"}:
            raise _BadRequest("Invalid FulfillmentChannels.")

        found: list[tuple[float, str, dict[str, Any]]] = []
        for order in self.orders.values():
            shown = self._visible(order.order_id, now)
            if shown is None:
                continue
            updated_at, status = shown
            stamp = updated_at if by_update else order.created_at
            channel = self._channel.get(order.order_id, "MFN")
            if not after <= stamp <= before:
                continue
            if (statuses and status not in statuses) or (channels and channel not in channels):
                continue
            found.append((stamp, order.order_id, self._order_json(order, updated_at, status)))
        found.sort(key=lambda row: (row[0], row[1]))
        extra: dict[str, Any] = {"size": int(size_text), f"{name}Before": _iso(before)}
        rows, next_token = self._page([row for _, _, row in found], int(size_text))
        if next_token:
            self._pages[next_token].extra = extra
        return self._ok({"payload": self._orders_payload(rows, next_token, extra)})

    @staticmethod
    def _orders_payload(
        rows: list[dict[str, Any]], next_token: str, extra: dict[str, Any]
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"Orders": rows}
        if next_token:
            payload["NextToken"] = next_token
        for key in ("LastUpdatedBefore", "CreatedBefore"):
            if key in extra:
                payload[key] = extra[key]
        return payload

    @staticmethod
    def _date_arg(request: Request, name: str) -> float | None:
        text = request.arg(name)
        if not text:
            return None
        try:
            return _parse_iso(text)
        except ValueError:
            raise _BadRequest(f"{name} is not an ISO 8601 date: {text!r}.") from None

    def _order_json(self, order: SimOrder, updated_at: float, status: str) -> dict[str, Any]:
        units = sum(line.quantity for line in order.lines)
        shipped = units if status in ("Shipped", "InvoiceUnconfirmed") else 0
        row: dict[str, Any] = {
            "AmazonOrderId": order.order_id,
            "PurchaseDate": _iso(order.created_at),
            "LastUpdateDate": _iso(updated_at),
            "OrderStatus": status,
            "FulfillmentChannel": self._channel.get(order.order_id, "MFN"),
            "SalesChannel": "Amazon.co.jp",
            "ShipServiceLevel": "Std JP Kanto8",
            "NumberOfItemsShipped": shipped,
            "NumberOfItemsUnshipped": 0 if status == "Canceled" else units - shipped,
            "PaymentMethod": "Other",
            "PaymentMethodDetails": ["Standard"],
            "MarketplaceId": self.marketplace_id,
            "ShipmentServiceLevelCategory": "Standard",
            "OrderType": "StandardOrder",
            "EarliestShipDate": _iso(order.created_at + 86400),
            "LatestShipDate": _iso(order.created_at + 2 * 86400),
            "IsBusinessOrder": False,
            "IsPrime": False,
            "IsPremiumOrder": False,
            "IsGlobalExpressEnabled": False,
            "IsReplacementOrder": False,
            "IsSoldByAB": False,
            "IsISPU": False,
            "IsAccessPointOrder": False,
            "HasRegulatedItems": False,
        }
        if status not in ("Pending", "PendingAvailability", "Canceled"):
            total = sum(self._price(line.listing_key) * line.quantity for line in order.lines)
            row["OrderTotal"] = {"CurrencyCode": "JPY", "Amount": f"{total:.2f}"}
        return row

    def _price(self, listing_key: str) -> int:
        listing = self.listings.get(listing_key)
        return int(listing.attrs.get("price", "1000")) if listing else 1000

    # -- getOrderItems -----------------------------------------------------------------

    def _get_order_items(self, request: Request, params: dict[str, str]) -> Response:
        order_id = params["orderId"]
        token = request.arg("NextToken")
        if token:
            pages = self._pages.pop(token, None)
            if pages is None or pages.extra.get("order") != order_id:
                raise _BadRequest(MSG_NEXT_TOKEN)
            rows, next_token = self._page(pages.rows, self.items_page_size)
        else:
            order = self.orders.get(order_id)
            if order is None:
                return self._error(404, "NotFound", f"Order {order_id} was not found.")
            rows, next_token = self._page(
                [self._item_json(order, line) for line in order.lines], self.items_page_size
            )
        if next_token:
            self._pages[next_token].extra = {"order": order_id}
        payload: dict[str, Any] = {"OrderItems": rows, "AmazonOrderId": order_id}
        if next_token:
            payload["NextToken"] = next_token
        return self._ok({"payload": payload})

    def _item_json(self, order: SimOrder, line: SimLine) -> dict[str, Any]:
        listing = self.listings.get(line.listing_key)
        shipped = line.quantity if order.status in ("Shipped", "InvoiceUnconfirmed") else 0
        row: dict[str, Any] = {
            "ASIN": listing.attrs.get("asin", self._asin_for(line.listing_key))
            if listing
            else self._asin_for(line.listing_key),
            "SellerSKU": line.listing_key,
            "OrderItemId": line.line_id,
            "Title": listing.name if listing else line.listing_key,
            "QuantityOrdered": line.quantity,
            "QuantityShipped": shipped,
            "ProductInfo": {"NumberOfItems": "1"},
            "ConditionId": "New",
            "ConditionSubtypeId": "New",
            "IsTransparency": False,
            "SerialNumberRequired": False,
        }
        # While Pending, pricing, taxes and gift status are left out [V].
        if order.status not in ("Pending", "PendingAvailability"):
            amount = self._price(line.listing_key) * line.quantity
            row["ItemPrice"] = {"CurrencyCode": "JPY", "Amount": f"{amount:.2f}"}
            row["ItemTax"] = {"CurrencyCode": "JPY", "Amount": f"{amount / 11:.2f}"}
            row["PromotionDiscount"] = {"CurrencyCode": "JPY", "Amount": "0.00"}
            row["IsGift"] = "false"
        return row

    # -- listings ----------------------------------------------------------------------

    def _wrong_seller(self, params: dict[str, str]) -> Response | None:
        if params["sellerId"] == self.shop_id:
            return None
        # [I] A seller id the token is not authorized for is refused like a bad token.
        return self._error(403, "Unauthorized", MSG_UNAUTHORIZED)

    def _included(self, request: Request) -> set[str]:
        raw = request.query.get("includedData")
        included = set(_csv(raw)) if raw else {"summaries"}
        if included - INCLUDED_DATA:
            raise _BadRequest(
                f"Invalid includedData: {', '.join(sorted(included - INCLUDED_DATA))}."
            )
        return included

    def _get_listings_item(self, request: Request, params: dict[str, str]) -> Response:
        denied = self._wrong_seller(params)
        if denied is not None:
            return denied
        self._marketplaces(request, "marketplaceIds")
        included = self._included(request)
        sku = params["sku"]
        listing = self.listings.get(sku)
        if listing is None:
            return self._error(
                404, "NOT_FOUND", f"SKU '{sku}' not found in marketplace {self.marketplace_id}"
            )
        return self._ok(self._listing_json(listing, included))

    def _search_listings_items(self, request: Request, params: dict[str, str]) -> Response:
        denied = self._wrong_seller(params)
        if denied is not None:
            return denied
        self._marketplaces(request, "marketplaceIds")
        included = self._included(request)
        size_text = request.arg("pageSize", "10")
        if not size_text.isdigit() or not 1 <= int(size_text) <= 20:
            raise _BadRequest("pageSize must be an integer between 1 and 20.")
        token = request.arg("pageToken")
        if token:
            pages = self._pages.pop(token, None)
            if pages is None:
                raise _BadRequest("Invalid pageToken.")
            keys: list[str] = pages.extra["keys"]
            offset: int = pages.extra["offset"]
        else:
            wanted = _csv(request.query.get("identifiers"))
            kind = request.arg("identifiersType")
            if bool(wanted) != bool(kind):
                raise _BadRequest("identifiers and identifiersType go together.")
            if kind and kind != "SKU":
                raise _BadRequest(f"identifiersType {kind} is not supported by this simulator.")
            if len(wanted) > 20:  # the model's maxItems [V]
                raise _BadRequest("identifiers accepts at most 20 values.")
            keys = sorted(k for k in self.listings if not wanted or k in wanted)
            offset = 0
        end = offset + int(size_text)
        body: dict[str, Any] = {
            "numberOfResults": len(keys),
            "items": [
                self._listing_json(self.listings[k], included)
                for k in keys[offset:end]
                if k in self.listings
            ],
        }
        if end < len(keys):
            next_token = self._new_token(_Pages([], {"keys": keys, "offset": end}))
            body["pagination"] = {"nextToken": next_token}
        return self._ok(body)

    def _listing_json(self, listing: SimListing, included: set[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"sku": listing.listing_key}
        entries = self._entries(listing)
        if "summaries" in included:
            created = float(listing.attrs.get("created_at", "0")) or self.clock()
            out["summaries"] = [
                {
                    "marketplaceId": self.marketplace_id,
                    "asin": listing.attrs.get("asin", self._asin_for(listing.listing_key)),
                    "productType": "PRODUCT",
                    "conditionType": "new_new",
                    "status": ["BUYABLE", "DISCOVERABLE"]
                    if (listing.quantity or 0) > 0
                    else ["DISCOVERABLE"],
                    "itemName": listing.name,
                    "createdDate": _iso(created),
                    "lastUpdatedDate": _iso(self.clock()),
                }
            ]
        if "attributes" in included:
            out["attributes"] = {
                "fulfillment_availability": [
                    {**entry, "marketplace_id": self.marketplace_id} for entry in entries
                ],
                "item_name": [
                    {
                        "value": listing.name,
                        "language_tag": "ja_JP",
                        "marketplace_id": self.marketplace_id,
                    }
                ],
            }
        if "fulfillmentAvailability" in included:
            out["fulfillmentAvailability"] = [
                {"fulfillmentChannelCode": e["fulfillment_channel_code"], "quantity": e["quantity"]}
                for e in entries
                if "quantity" in e
            ]
        if "issues" in included:
            out["issues"] = []
        return out

    def _entries(self, listing: SimListing) -> list[dict[str, Any]]:
        """``fulfillment_availability`` as Amazon holds it for ``listing``."""
        primary: dict[str, Any] = {
            "fulfillment_channel_code": listing.attrs.get("channel", MFN),
            "quantity": max(0, listing.quantity or 0),
        }
        lead = listing.attrs.get("lead_time_to_ship_max_days")
        if lead is not None:
            primary["lead_time_to_ship_max_days"] = int(lead)
        restock = listing.attrs.get("restock_date")
        if restock is not None:
            primary["restock_date"] = restock
        others = self._other_channels.get(listing.listing_key, {})
        return [primary, *others.values()]

    # -- patchListingsItem -------------------------------------------------------------

    def _patch_listings_item(self, request: Request, params: dict[str, str]) -> Response:
        denied = self._wrong_seller(params)
        if denied is not None:
            return denied
        self._marketplaces(request, "marketplaceIds")
        sku = params["sku"]
        try:
            body = request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        patches = body.get("patches") if isinstance(body, dict) else None
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("productType"), str)
            or not isinstance(patches, list)
            or not patches
            or not all(
                isinstance(p, dict) and p.get("op") in PATCH_OPS and isinstance(p.get("path"), str)
                for p in patches
            )
        ):
            self.patches.append(PatchRecord(sku, body, "HTTP 400"))
            raise _BadRequest(MSG_UNPARSEABLE)
        issues = self._patch_issues(sku, patches)
        preview = request.arg("mode") == "VALIDATION_PREVIEW"
        known = sku in self.listings
        if issues:
            status = "INVALID"
        elif preview:
            status = "VALID"
        else:
            status = "ACCEPTED"
            if known and not self.faults.silent_noop:
                due = self.clock() + (0 if self.faults.timeout_after_apply else self.apply_delay_s)
                self._pending.append((due, sku, patches))
                self.settle()
        self.patches.append(PatchRecord(sku, body, status))
        return self._ok(
            {
                "sku": sku,
                "status": status,
                "submissionId": f"{self.rng.getrandbits(128):032x}",
                "issues": issues,
            }
        )

    def _patch_issues(self, sku: str, patches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        issues: list[dict[str, Any]] = []

        def issue(code: str, message: str, attribute: str) -> None:
            issues.append(
                {
                    "code": code,
                    "message": message,
                    "severity": "ERROR",
                    "attributeNames": [attribute],
                    "categories": ["INVALID_ATTRIBUTE"],
                }
            )

        if sku not in self.listings and self.unknown_sku == "invalid":
            # [I] code and text; the real service may instead accept (unknown_sku="accept").
            issues.append(
                {
                    "code": "NOT_FOUND",
                    "message": f"SKU '{sku}' not found in marketplace {self.marketplace_id}",
                    "severity": "ERROR",
                    "categories": [],
                }
            )
            return issues
        for patch in patches:
            match = _ATTRIBUTE_PATH.match(patch["path"])
            if match is None:
                issue(
                    "90000900",
                    f"The attribute path '{patch['path']}' is not a valid top-level attribute "
                    "for product type 'PRODUCT'.",
                    patch["path"].rsplit("/", 1)[-1],
                )
                continue
            if match.group(1) != "fulfillment_availability" or patch["op"] == "delete":
                continue
            value = patch.get("value")
            if not isinstance(value, list) or not value:
                issue(
                    "99022",
                    "The attribute 'fulfillment_availability' does not have enough values. "
                    "The required minimum is '1' value(s).",
                    "fulfillment_availability",
                )
                continue
            for entry in value:
                issues += self._entry_issues(entry)
        return issues

    @staticmethod
    def _entry_issues(entry: Any) -> list[dict[str, Any]]:
        found: list[tuple[str, str]] = []
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("fulfillment_channel_code"), str)
            or not entry.get("fulfillment_channel_code")
        ):
            found.append(
                (
                    "99022",
                    "The field 'fulfillment_channel_code' for the attribute "
                    "'fulfillment_availability' does not have enough values. The required "
                    "minimum is '1' value(s).",
                )
            )
            entry = entry if isinstance(entry, dict) else {}
        quantity = entry.get("quantity")
        if quantity is not None and (
            isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 0
        ):
            found.append(("4000001", "The provided value for 'Quantity' is invalid."))
        lead = entry.get("lead_time_to_ship_max_days")
        if lead is not None and (isinstance(lead, bool) or not isinstance(lead, int) or lead < 0):
            found.append(("4000001", "The provided value for 'Handling Time' is invalid."))
        elif isinstance(lead, int) and lead > LEAD_TIME_MAX_DAYS:
            found.append(
                (
                    "4000001",
                    "Value for 'fulfillment_availability' is greater than the allowed "
                    f"maximum '{LEAD_TIME_MAX_DAYS}'.",
                )
            )
        restock = entry.get("restock_date")
        if restock is not None and not _valid_date(restock):
            found.append(("4000001", "The provided value for 'Restock Date' is invalid."))
        return [
            {
                "code": code,
                "message": message,
                "severity": "ERROR",
                "attributeNames": ["fulfillment_availability"],
                "categories": ["INVALID_ATTRIBUTE"],
            }
            for code, message in found
        ]

    def settle(self) -> None:
        """Apply every accepted patch whose delay has passed."""
        now = self.clock()
        due = [p for p in self._pending if p[0] <= now]
        if not due:
            return
        self._pending = [p for p in self._pending if p[0] > now]
        for _, sku, patches in due:
            self._apply_patches(sku, patches)

    def _apply_patches(self, sku: str, patches: list[dict[str, Any]]) -> None:
        listing = self.listings.get(sku)
        if listing is None:
            return
        for patch in patches:
            match = _ATTRIBUTE_PATH.match(patch["path"])
            if match is None or match.group(1) != "fulfillment_availability":
                continue
            entries = patch.get("value") or []
            if patch["op"] == "delete":
                entries = [{"fulfillment_channel_code": listing.attrs.get("channel", MFN)}]
            for entry in entries:
                self._apply_entry(listing, patch["op"], entry)

    def _apply_entry(self, listing: SimListing, op: str, entry: dict[str, Any]) -> None:
        code = entry["fulfillment_channel_code"]
        if code != listing.attrs.get("channel", MFN):
            # Another channel code is added beside the existing one [V: #2061].
            others = self._other_channels.setdefault(listing.listing_key, {})
            base = others.get(code, {}) if op == "merge" else {}
            others[code] = {**base, **entry}
            return
        keys = ("lead_time_to_ship_max_days", "restock_date")
        if op != "merge":
            # replace sets exactly the keys given: the others are gone [V: #4406].
            for key in keys:
                listing.attrs.pop(key, None)
        for key in keys:
            if entry.get(key) is not None:
                listing.attrs[key] = str(entry[key])
        if op == "delete":
            return
        if isinstance(entry.get("quantity"), int):
            self.apply_stock(listing.listing_key, entry["quantity"])


def _valid_date(value: object) -> bool:
    if not isinstance(value, str) or not _DATE.match(value):
        return False
    try:
        date.fromisoformat(value)
    except ValueError:
        return False
    return True


SIM = SimSpec("amazon", SimAmazon, url_paths={"lwa": LWA_PATH}, settle_s=240.0, order_delay_s=125.0)
