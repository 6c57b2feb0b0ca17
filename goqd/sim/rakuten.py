"""A simulated 楽天市場 RMS: RakutenPayOrderAPI, Inventory API 2.0, ItemAPI 2.0 search and
the licenseKey expiry-date API, on the real paths with the real auth and body shapes.

It keeps what Rakuten keeps: listings keyed ``manageNumber/variantId`` whose stock the
mall lowers when it takes an order (在庫連動) and restores on 900; orders numbered
``NNNNNN-YYYYMMDD-NNNNNNNN`` moving 100 → 300 → 500, cancelled to 900, edited into 400
with a ``ChangeReasonModelList`` entry; license keys that expire; stock written for
unknown SKUs kept "orphaned" and invisible, as Rakuten does [V].

What is assumed ([I]; each is a constructor argument or an attribute a test can flip):

* error codes the sources do not give: window > 63 days ``…SEARCH_ORDER_ERROR_015``,
  endDatetime ``…_012/_013``, paging ``…_021/_022/_023``, getOrder > 100 numbers
  ``…GET_ORDER_ERROR_002``, version missing ``…_009`` / below ``min_get_order_version``
  ``…_010`` (real Rakuten accepts older versions; goqd needs 7 for SkuModelList);
* HTTP 400 for ``ES04-01`` (function not enabled; one source fakes 200);
* maintenance: 503 ``{"Results":{"errorCode":"ES03-01","message":"Service Unavailable"}}``;
  throttling: 429 + ``Retry-After`` + ``{"Results":{"errorCode":"ES05-01",…}}``;
  5xx fault: 500 ``{"Results":{"errorCode":"ES03-00",…}}``;
* rates: 1 req/s for each order API, bulk-upsert, items.search and expiry-date;
  5 req/s bulk-get (``rate_limits`` overrides, ``enforce_rate_limits=False`` disables);
* bulk-get omits unknown, orphaned and unlimited-stock SKUs; items.search pages in
  manageNumber order and its cursorMark is opaque;
* a newly issued licenseKey does not revoke the old one (``rotation_revokes_old``);
* an order number's shop part is ``shop_id`` when that is six digits, else six digits
  derived from it (so any store name works in demos).

Never listens beyond loopback (``serve_sim`` enforces it) and never calls a real mall.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import random
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Unpack

import trio

from goqd.sim.base import ApiKeyArgs, ApiKeyMall, RatePlan, SimListing, SimOrder, SimSpec
from goqd.sim.http import Request, Response

JST = timezone(timedelta(hours=9), "JST")
_RMS_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\+0900$")
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")

# API names are RMS's own function names (the ones a shop enables in 利用機能編集).
SEARCH_ORDER = "rpay.order.searchOrder"
GET_ORDER = "rpay.order.getOrder"
BULK_UPSERT = "inventories.bulk.upsert"
BULK_GET = "inventories.bulk.get"
ITEM_SEARCH = "items.search"
KEY_EXPIRY = "license.expiryDate.get"

_ROUTES: dict[tuple[str, str], str] = {
    ("POST", "/es/2.0/order/searchOrder/"): SEARCH_ORDER,
    ("POST", "/es/2.0/order/searchOrder"): SEARCH_ORDER,
    ("POST", "/es/2.0/order/getOrder/"): GET_ORDER,
    ("POST", "/es/2.0/order/getOrder"): GET_ORDER,
    ("POST", "/es/2.0/inventories/bulk-upsert"): BULK_UPSERT,
    ("POST", "/es/2.1/inventories/bulk-upsert"): BULK_UPSERT,
    ("POST", "/es/2.0/inventories/bulk-get"): BULK_GET,
    ("POST", "/es/2.1/inventories/bulk-get"): BULK_GET,
    ("GET", "/es/2.0/items/search"): ITEM_SEARCH,
    ("GET", "/es/1.0/license-management/license-key/expiry-date"): KEY_EXPIRY,
}

DEFAULT_RATES: dict[str, float] = {
    SEARCH_ORDER: 1.0,
    GET_ORDER: 1.0,
    BULK_UPSERT: 1.0,
    BULK_GET: 5.0,
    ITEM_SEARCH: 1.0,
    KEY_EXPIRY: 1.0,
}

# searchOrder dateType -> the order datetime it searches on (6 決済確定日 is not modelled).
_DATE_FIELDS = {
    1: "orderDatetime",
    2: "shopOrderCfmDatetime",
    3: "orderFixDatetime",
    4: "shippingInstDatetime",
    5: "shippingCmplRptDatetime",
    6: "settlementDatetime",
}
_ORDER_DATETIMES = (
    "orderDatetime",
    "shopOrderCfmDatetime",
    "orderFixDatetime",
    "shippingInstDatetime",
    "shippingCmplRptDatetime",
)
# The datetimes Rakuten fills in when an order reaches a status.
_STATUS_DATETIMES: dict[str, tuple[str, ...]] = {
    "300": ("shopOrderCfmDatetime", "orderFixDatetime"),
    "500": ("shippingInstDatetime", "shippingCmplRptDatetime"),
}
_VALID_PROGRESS = frozenset({100, 200, 300, 400, 500, 600, 700, 800, 900})
MAX_WINDOW_S = 63 * 86400
MAX_LOOKBACK_S = 730 * 86400


def format_jst(epoch: float) -> str:
    return datetime.fromtimestamp(int(epoch), JST).strftime("%Y-%m-%dT%H:%M:%S+0900")


def _parse_rms(text: str) -> int:
    return int(datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp())


def _results(
    code: str, message: str, status: int, headers: Mapping[str, str] | None = None
) -> Response:
    return Response.json({"Results": {"errorCode": code, "message": message}}, status, headers)


@dataclass
class _Change:
    change_id: int
    change_type: int
    detail: int | None
    reason_detail: int | None
    applied: float
    fixed: float | None = None
    completed: float | None = None

    def model(self) -> dict[str, Any]:
        return {
            "changeId": self.change_id,
            "changeType": self.change_type,
            "changeTypeDetail": self.detail,
            "changeReason": 0,
            "changeReasonDetail": self.reason_detail,
            "changeApplyDatetime": format_jst(self.applied),
            "changeFixDatetime": format_jst(self.fixed) if self.fixed is not None else None,
            "changeCmplDatetime": format_jst(self.completed)
            if self.completed is not None
            else None,
        }


@dataclass
class _OrderMeta:
    datetimes: dict[str, float]
    changes: list[_Change] = field(default_factory=list)
    status_before_change: str | None = None


class SimRakuten(ApiKeyMall):
    """Simulated RMS for one shop. See the module docstring for what is assumed."""

    mall = "rakuten"

    def __init__(
        self,
        *,
        min_get_order_version: int = 7,
        search_result_cap: int = 15000,
        rate_limits: Mapping[str, float] | None = None,
        enforce_rate_limits: bool = True,
        rotation_revokes_old: bool = False,
        **base: Unpack[ApiKeyArgs],
    ) -> None:
        super().__init__(**base)
        shop_id = self.shop_id
        self.shop_number = (
            shop_id
            if len(shop_id) == 6 and shop_id.isdigit()
            else f"{zlib.crc32(shop_id.encode()) % 1_000_000:06d}"
        )
        self.min_get_order_version = min_get_order_version
        self.search_result_cap = search_result_cap
        self.enforce_rate_limits = enforce_rate_limits
        self.rotation_revokes_old = rotation_revokes_old
        # RMS functions the shop has not enabled: requests get ES04-01.
        self.disabled_functions: set[str] = set()
        # Stock Rakuten stored for SKUs it does not know: invisible to every read [V].
        self.orphans: dict[str, int] = {}
        # listing key -> (code, message, field): bulk-upsert refuses that SKU, as Rakuten
        # does for 予約商品 (IE1101) or 定期購入 (IE1102) items.
        self.refusals: dict[str, tuple[str, str, str]] = {}
        self._rates = {**DEFAULT_RATES, **(rate_limits or {})}
        self._key_rng = random.Random(f"rakuten-keys-{shop_id}-{self.seed}")
        self.service_secret = f"SP{self.shop_number}_{self._token()}"
        self._latest_key = ""
        self._meta: dict[str, _OrderMeta] = {}
        self._detail_serial = 100_000_000
        self._change_serial = 0
        self.issue_credentials()

    # -- credentials ---------------------------------------------------------------------

    def _token(self) -> str:
        alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"
        return "".join(self._key_rng.choice(alphabet) for _ in range(24))

    def credentials(self) -> dict[str, str]:
        """The newest licenseKey (it may have been expired by ``expire_credentials``)."""
        return {"service_secret": self.service_secret, "license_key": self._latest_key}

    def issue_credentials(self) -> dict[str, str]:
        """A new licenseKey valid for ``key_lifetime_days``, as RMS issues one."""
        if self.rotation_revokes_old:
            self.expire_credentials()
        self._latest_key = f"SL{self.shop_number}_{self._token()}"
        self.add_key(self._latest_key)
        return self.credentials()

    def set_key_expiry(self, license_key: str, expires_at: float) -> None:
        self._keys[license_key] = expires_at

    def _authorised(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme != "ESA" or not token:
            return False
        try:
            raw = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        secret, sep, key = raw.partition(":")
        return bool(sep) and secret == self.service_secret and self.key_valid(key)

    # -- catalogue and orders ------------------------------------------------------------

    def normal_key(self, listing_key: str) -> str:
        """Listing keys are ``manageNumber/variantId`` (a listing's ``link_code`` is the
        SKU's merchantDefinedSkuId). Rakuten lower-cases manageNumber, so the key does
        too."""
        manage_number, sep, variant_id = listing_key.partition("/")
        if not sep or not _ID_RE.match(manage_number) or not _ID_RE.match(variant_id):
            raise ValueError(
                f"Rakuten listing keys are manageNumber/variantId, got {listing_key!r}"
            )
        return f"{manage_number.lower()}/{variant_id}"

    def initial_status(self) -> str:
        return "100"

    def cancelled_status(self) -> str:
        return "900"

    def status_flow(self) -> list[str]:
        return ["100", "300", "500"]

    def new_order_id(self) -> str:
        day = datetime.fromtimestamp(self.clock(), JST).strftime("%Y%m%d")
        return f"{self.shop_number}-{day}-{self.next_serial():08d}"

    def line_id_for(self, order: SimOrder, n: int) -> str:
        self._detail_serial += 1  # itemDetailId: unique across the shop
        return str(self._detail_serial)

    def place_order(self, items: list[tuple[str, int]]) -> SimOrder | None:
        order = super().place_order(items)
        if order is not None:
            self._meta[order.order_id] = _OrderMeta({"orderDatetime": order.created_at})
        return order

    def set_status(self, order_id: str, status: str) -> None:
        super().set_status(order_id, status)
        meta = self._meta[order_id]
        for name in _STATUS_DATETIMES.get(status, ()):
            meta.datetimes.setdefault(name, self.clock())

    def _add_change(self, order_id: str, change: _Change) -> None:
        self._meta[order_id].changes.append(change)

    def _next_change(self, change_type: int, detail: int | None, reason: int | None) -> _Change:
        self._change_serial += 1
        return _Change(self._change_serial, change_type, detail, reason, self.clock())

    def request_cancel(self, order_id: str) -> None:
        """キャンセル申請: the order goes to 800; Rakuten keeps the stock taken until 900."""
        self._add_change(order_id, self._next_change(0, None, 1))
        super().set_status(order_id, "800")

    def cancel_order(self, order_id: str) -> None:
        """キャンセル確定 (900): the mall restores its stock; a キャンセル完了 change entry."""
        order = self.orders[order_id]
        if order.cancelled:
            return
        super().cancel_order(order_id)
        now = self.clock()
        change = self._next_change(2, None, 1)
        change.fixed = change.completed = now
        self._add_change(order_id, change)

    def edit_quantity(self, order_id: str, line_id: str, quantity: int) -> None:
        """変更: the line's units change (0 deletes the line, deleteItemFlag=1), the mall's
        stock follows, and the order waits in 400 with a 変更申請 change entry."""
        order = self.orders[order_id]
        line = next(ln for ln in order.lines if ln.line_id == line_id)
        increase = quantity > line.quantity
        if quantity <= 0:
            if not line.cancelled:
                line.cancelled = True
                listing = self.listings.get(line.listing_key)
                if listing is not None and listing.quantity is not None:
                    listing.quantity += line.quantity
            order.updated_at = self.clock()
        else:
            super().edit_quantity(order_id, line_id, quantity)
        meta = self._meta[order_id]
        if order.status != "400":
            meta.status_before_change = order.status
        self._add_change(order_id, self._next_change(4, 1 if increase else 0, None))
        super().set_status(order_id, "400")

    def confirm_change(self, order_id: str) -> None:
        """変更確定: the order leaves 400 for the status it had before the change."""
        meta = self._meta[order_id]
        now = self.clock()
        if meta.changes:
            meta.changes[-1].fixed = meta.changes[-1].completed = now
        self.set_status(order_id, meta.status_before_change or "300")

    def orphaned_stock(self, listing_key: str) -> int | None:
        return self.orphans.get(listing_key)

    # -- HTTP ----------------------------------------------------------------------------

    def api_name(self, request: Request) -> str:
        return _ROUTES.get((request.method, request.path), request.path)

    # Guard hooks: RMS's answers in its {"Results": {...}} error format.

    def route_refusal(self, request: Request, api: str) -> Response | None:
        if api in self._rates:
            return None
        if any(path == request.path for _, path in _ROUTES):
            return _results("ES02-05", "Method Not Allowed", 405)
        return _results("ES02-01", "Not Found", 404)

    def maintenance_reply(self, api: str) -> Response:
        return _results("ES03-01", "Service Unavailable", 503)

    def server_error_reply(self, api: str) -> Response:
        return _results("ES03-00", "Internal Server Error", 500)

    def auth_refusal(self, request: Request, api: str, *, expired: bool) -> Response | None:
        if expired or not self._authorised(request):
            return _results("GA0001", "Un-Authorised", 401)
        return None

    def rate_plan(self, api: str) -> RatePlan | None:
        if not self.enforce_rate_limits:
            return None
        # Burst 1: "n per second" is enforced as one request per 1/n s [I]. A tenth of a
        # token of slack: a client that spaced its requests right can still see them
        # arrive a little closer together (network jitter under a real clock).
        return RatePlan(self._rates[api], 1.0, slack=0.1)

    def documented_limit(self, api: str) -> tuple[float, float] | None:
        # The documented rate whether or not this simulator enforces it; burst 1 [I].
        rate = DEFAULT_RATES.get(api)
        return None if rate is None else (rate, 1.0)

    def throttle_reply(self, api: str, wait: float, *, cost: float, forced: bool) -> Response:
        # [I] RMS's Retry-After is the fault plan's value whichever limit refused.
        headers = {"Retry-After": f"{self.faults.retry_after:g}"}
        return _results("ES05-01", "Too Many Requests", 429, headers)

    async def handle(self, request: Request, api: str) -> Response:
        if api in self.disabled_functions:
            return _results("ES04-01", "Bad Request", 400)
        if api == BULK_UPSERT:
            return await self._bulk_upsert(request)
        handlers: dict[str, Callable[[Request], Response]] = {
            SEARCH_ORDER: self._search_order,
            GET_ORDER: self._get_order,
            BULK_GET: self._bulk_get,
            ITEM_SEARCH: self._item_search,
            KEY_EXPIRY: self._key_expiry,
        }
        return handlers[api](request)

    busy_page = "<html><head><title>RMS</title></head><body>メンテナンス中です</body></html>"

    def _ok(self, obj: dict[str, Any], primary: str) -> Response:
        """A 200 JSON body (spoiled as ``faults.malformed`` says). ``primary`` is the
        field a client cannot do without."""
        return self.reply_ok(
            obj,
            lambda o: json.dumps(o, ensure_ascii=False),
            drop_field=lambda o: {k: v for k, v in o.items() if k != primary},
            wrong_type=lambda o: {
                **o,
                primary: 20261128 if isinstance(o.get(primary), str) else "x",
            },
        )

    @staticmethod
    def _json_object(request: Request) -> dict[str, Any] | None:
        try:
            body = request.json()
        except (ValueError, UnicodeDecodeError):
            return None
        return body if isinstance(body, dict) else None

    # -- RakutenPayOrderAPI --------------------------------------------------------------

    @staticmethod
    def _order_error(code: str, message: str) -> Response:
        return Response.json(
            {
                "orderNumberList": None,
                "MessageModelList": [
                    {"messageType": "ERROR", "messageCode": code, "message": message}
                ],
                "PaginationResponseModel": None,
            },
            400,
        )

    def _search_order(self, request: Request) -> Response:
        err = "ORDER_EXT_API_SEARCH_ORDER_ERROR_"
        body = self._json_object(request)
        if body is None:
            return self._order_error(err + "001", "リクエストの形式が不正です。")
        date_type = body.get("dateType")
        if date_type is None:
            return self._order_error(err + "009", "dateTypeの項目を指定して下さい。")
        if type(date_type) is not int or date_type not in _DATE_FIELDS:
            return self._order_error(err + "008", "dateTypeの値が不正です。")
        start_text = body.get("startDatetime")
        if start_text is None:
            return self._order_error(err + "010", "startDatetimeの値を指定して下さい。")
        if not isinstance(start_text, str) or not _RMS_DATETIME.match(start_text):
            return self._order_error(err + "011", "startDatetimeの書式が不正です。")
        end_text = body.get("endDatetime")
        if end_text is None:
            return self._order_error(err + "012", "endDatetimeの値を指定して下さい。")
        if not isinstance(end_text, str) or not _RMS_DATETIME.match(end_text):
            return self._order_error(err + "013", "endDatetimeの書式が不正です。")
        start, end = _parse_rms(start_text), _parse_rms(end_text)
        if end < start:
            return self._order_error(
                err + "014", "endDatetimeはstartDatetime以降を指定して下さい。"
            )
        if end - start > MAX_WINDOW_S:
            return self._order_error(err + "015", "検索期間は63日以内で指定して下さい。")
        if start < self.clock() - MAX_LOOKBACK_S:
            return self._order_error(err + "016", "startDatetimeは過去2年以内を指定して下さい。")
        progress = body.get("orderProgressList")
        if progress is not None and (
            not isinstance(progress, list)
            or any(type(p) is not int or p not in _VALID_PROGRESS for p in progress)
        ):
            return self._order_error(err + "020", "orderProgressListの値が不正です。")
        paging = body.get("PaginationRequestModel")
        if not isinstance(paging, dict):
            return self._order_error(err + "021", "PaginationRequestModelを指定して下さい。")
        amount, page = paging.get("requestRecordsAmount"), paging.get("requestPage")
        if type(amount) is not int or not 1 <= amount <= 1000:
            return self._order_error(err + "022", "requestRecordsAmountの値が不正です。")
        if type(page) is not int or page < 1:
            return self._order_error(err + "023", "requestPageの値が不正です。")
        descending = any(
            isinstance(s, dict) and s.get("sortDirection") == 2
            for s in paging.get("SortModelList") or []
        )

        date_field = _DATE_FIELDS[date_type]
        wanted = None if progress is None else {str(p) for p in progress}
        hits: list[tuple[float, str]] = []
        for order in self.orders.values():
            stamp = self._meta[order.order_id].datetimes.get(date_field)
            if stamp is None or not start <= int(stamp) <= end:
                continue
            if wanted is not None and order.status not in wanted:
                continue
            hits.append((self._meta[order.order_id].datetimes["orderDatetime"], order.order_id))
        hits.sort(reverse=descending)
        numbers = [number for _, number in hits[: self.search_result_cap]]
        if not numbers:
            return self._ok(
                {
                    "orderNumberList": [],
                    "MessageModelList": [
                        {
                            "messageType": "INFO",
                            "messageCode": "ORDER_EXT_API_SEARCH_ORDER_INFO_102",
                            "message": "注文検索に成功しました。(検索結果０件)",
                        }
                    ],
                    "PaginationResponseModel": {
                        "totalRecordsAmount": None,
                        "totalPages": None,
                        "requestPage": None,
                    },
                },
                "orderNumberList",
            )
        pages = math.ceil(len(numbers) / amount)
        return self._ok(
            {
                "orderNumberList": numbers[(page - 1) * amount : page * amount],
                "MessageModelList": [
                    {
                        "messageType": "INFO",
                        "messageCode": "ORDER_EXT_API_SEARCH_ORDER_INFO_101",
                        "message": "注文検索に成功しました。",
                    }
                ],
                "PaginationResponseModel": {
                    "totalRecordsAmount": len(numbers),
                    "totalPages": pages,
                    "requestPage": page,
                },
            },
            "orderNumberList",
        )

    def _get_order_error(self, code: str, message: str) -> Response:
        return Response.json(
            {
                "MessageModelList": [
                    {"messageType": "ERROR", "messageCode": code, "message": message}
                ],
                "OrderModelList": [],
            },
            400,
        )

    def _get_order(self, request: Request) -> Response:
        err = "ORDER_EXT_API_GET_ORDER_ERROR_"
        body = self._json_object(request)
        if body is None:
            return self._get_order_error(err + "001", "リクエストの形式が不正です。")
        numbers = body.get("orderNumberList")
        if not isinstance(numbers, list) or not numbers:
            return self._get_order_error(err + "001", "orderNumberListの項目を指定してください。")
        if len(numbers) > 100:
            return self._get_order_error(
                err + "002", "orderNumberListは100件以内で指定してください。"
            )
        version = body.get("version")
        if version is None:
            return self._get_order_error(err + "009", "versionの項目を指定してください。")
        if type(version) is not int or version < self.min_get_order_version:
            return self._get_order_error(err + "010", "versionの値が不正です。")
        messages: list[dict[str, Any]] = []
        models: list[dict[str, Any]] = []
        for number in numbers:
            order = self.orders.get(number) if isinstance(number, str) else None
            if order is None:
                messages.append(
                    {
                        "messageType": "WARNING",
                        "messageCode": "ORDER_EXT_API_GET_ORDER_WARNING_101",
                        "message": "指定された注文番号は存在しません。",
                        "orderNumber": number,
                    }
                )
                continue
            messages.append(
                {
                    "messageType": "INFO",
                    "messageCode": "ORDER_EXT_API_GET_ORDER_INFO_101",
                    "message": "受注情報取得に成功しました。",
                    "orderNumber": number,
                }
            )
            models.append(self._order_model(order))
        return self._ok(
            {"version": version, "MessageModelList": messages, "OrderModelList": models},
            "OrderModelList",
        )

    def _order_model(self, order: SimOrder) -> dict[str, Any]:
        meta = self._meta[order.order_id]
        items: list[dict[str, Any]] = []
        goods = 0
        for line in order.lines:
            manage_number, _, variant_id = line.listing_key.partition("/")
            listing = self.listings.get(line.listing_key)
            price = int((listing.attrs.get("price") if listing else None) or 1000)
            if not line.cancelled:
                goods += price * line.quantity
            items.append(
                {
                    "itemDetailId": int(line.line_id),
                    "itemName": listing.name if listing else manage_number,
                    "itemId": zlib.crc32(manage_number.encode()) % 100_000_000,
                    "itemNumber": listing.attrs.get("itemNumber") if listing else None,
                    "manageNumber": manage_number,
                    "price": price,
                    "priceTaxIncl": price * 11 // 10,
                    "taxRate": 0.1,
                    "units": line.quantity,
                    "inventoryType": 1,
                    "restoreInventoryFlag": 0,
                    "deleteItemFlag": 1 if line.cancelled else 0,
                    "selectedChoice": None,
                    "SkuModelList": [
                        {
                            "variantId": variant_id,
                            "merchantDefinedSkuId": (listing.link_code or None)
                            if listing
                            else None,
                            "skuInfo": None,
                        }
                    ],
                }
            )
        model: dict[str, Any] = {
            "orderNumber": order.order_id,
            "orderProgress": int(order.status),
            "subStatusId": None,
            "subStatusName": None,
        }
        for name in _ORDER_DATETIMES:
            stamp = meta.datetimes.get(name)
            model[name] = format_jst(stamp) if stamp is not None else None
        model.update(
            {
                "cancelDueDate": None,
                "goodsPrice": goods,
                "totalPrice": goods,
                "requestPrice": goods,
                "OrdererModel": {
                    "familyName": "楽天",
                    "firstName": "太郎",
                    "emailAddress": "masked@pc.fw.rakuten.ne.jp",
                },
                "ChangeReasonModelList": [c.model() for c in meta.changes],
                "PackageModelList": [{"basketId": 1, "ItemModelList": items}],
            }
        )
        return model

    # -- Inventory API 2.0 ---------------------------------------------------------------

    @staticmethod
    def _inventory_errors(errors: list[dict[str, Any]], status: int = 400) -> Response:
        return Response.json({"errors": errors}, status)

    @staticmethod
    def _inv_error(code: str, message: str, path: str) -> dict[str, Any]:
        return {"code": code, "message": message, "metadata": {"propertyPath": path}}

    async def _bulk_upsert(self, request: Request) -> Response:
        body = self._json_object(request)
        rows = body.get("inventories") if body is not None else None
        if not isinstance(rows, list) or not 1 <= len(rows) <= 400:
            return self._inventory_errors(
                [
                    self._inv_error(
                        "IE0105", "Size of inventories must be between 1 and 400.", "inventories"
                    )
                ]
            )
        errors: list[dict[str, Any]] = []
        updates: list[tuple[str, str, int]] = []  # key, mode, quantity
        for i, row in enumerate(rows):
            path = f"inventories[{i}]"
            if not isinstance(row, dict):
                errors.append(self._inv_error("IE0002", "Invalid value.", path))
                continue
            row_errors = len(errors)
            manage_number, variant_id = row.get("manageNumber"), row.get("variantId")
            mode, quantity = row.get("mode"), row.get("quantity")
            for name, value in (("manageNumber", manage_number), ("variantId", variant_id)):
                if not isinstance(value, str) or not value:
                    errors.append(
                        self._inv_error("IE0001", f"{name} is required.", f"{path}.{name}")
                    )
                elif len(value.encode()) > 32:
                    errors.append(
                        self._inv_error(
                            "IE0004",
                            f"Max length of {name} must be within 32 bytes.",
                            f"{path}.{name}",
                        )
                    )
                elif not _ID_RE.match(value):
                    errors.append(
                        self._inv_error("IE0002", f"Invalid value of {name}.", f"{path}.{name}")
                    )
            if mode not in ("ABSOLUTE", "RELATIVE"):
                errors.append(
                    self._inv_error("IE0007", "Invalid choice selected for mode.", f"{path}.mode")
                )
            if type(quantity) is not int:
                errors.append(
                    self._inv_error("IE0002", "Invalid value of quantity.", f"{path}.quantity")
                )
            elif mode == "ABSOLUTE" and not 0 <= quantity <= 99999:
                errors.append(
                    self._inv_error(
                        "IE0003", "Quantity must be between 0 and 99999.", f"{path}.quantity"
                    )
                )
            if len(errors) > row_errors:
                continue
            assert isinstance(manage_number, str) and isinstance(variant_id, str)
            assert isinstance(quantity, int) and isinstance(mode, str)
            key = f"{manage_number.lower()}/{variant_id}"
            refusal = self.refusals.get(key)
            if refusal is not None:
                code, message, field_name = refusal
                errors.append(self._inv_error(code, message, f"{path}.{field_name}"))
                continue
            if mode == "RELATIVE":
                current = (
                    self.listings[key].quantity if key in self.listings else self.orphans.get(key)
                )
                if current is None:
                    current = 0
                if not 0 <= current + quantity <= 99999:
                    errors.append(
                        self._inv_error(
                            "IE0003", "Quantity must be between 0 and 99999.", f"{path}.quantity"
                        )
                    )
                    continue
            updates.append((key, mode, quantity))
        if errors:
            return self._inventory_errors(errors)  # validation is for the whole request
        for key, mode, quantity in updates:
            listing = self.listings.get(key)
            if listing is None:
                base = self.orphans.get(key, 0) if mode == "RELATIVE" else 0
                self.orphans[key] = base + quantity
                continue
            if mode == "RELATIVE":
                quantity += listing.quantity or 0
            self.apply_stock(key, quantity)
        if self.faults.timeout_after_apply:
            await trio.sleep(3600)
        if self.faults.malformed == "html":
            return self._ok({}, "")  # the only spoiling a body-less 204 can show
        return Response(204, b"")

    def _bulk_get(self, request: Request) -> Response:
        body = self._json_object(request)
        rows = body.get("inventories") if body is not None else None
        if not isinstance(rows, list) or not 1 <= len(rows) <= 1000:
            return self._inventory_errors(
                [
                    self._inv_error(
                        "IE0105", "Size of inventories must be between 1 and 1000.", "inventories"
                    )
                ]
            )
        found: list[dict[str, Any]] = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or not all(
                isinstance(row.get(k), str) and row.get(k) for k in ("manageNumber", "variantId")
            ):
                return self._inventory_errors(
                    [
                        self._inv_error(
                            "IE0001",
                            "manageNumber and variantId are required.",
                            f"inventories[{i}]",
                        )
                    ]
                )
            key = f"{row['manageNumber'].lower()}/{row['variantId']}"
            listing = self.listings.get(key)
            if listing is None or listing.quantity is None:
                continue
            manage_number, _, variant_id = key.partition("/")
            found.append(
                {
                    "manageNumber": manage_number,
                    "variantId": variant_id,
                    "quantity": listing.quantity,
                    "created": "2024-01-01T00:00:00+09:00",
                    "updated": format_jst(self.clock()).replace("+0900", "+09:00"),
                }
            )
        return self._ok({"inventories": found}, "inventories")

    # -- ItemAPI 2.0 -----------------------------------------------------------------------

    def _items(self) -> dict[str, list[SimListing]]:
        items: dict[str, list[SimListing]] = {}
        for key in sorted(self.listings):
            items.setdefault(key.partition("/")[0], []).append(self.listings[key])
        return items

    def _item_model(self, manage_number: str, variants: list[SimListing]) -> dict[str, Any]:
        first = variants[0]
        return {
            "manageNumber": manage_number,
            "itemNumber": first.attrs.get("itemNumber"),
            "title": first.attrs.get("title") or first.name,
            "itemType": "NORMAL",
            "genreId": "100000",
            "hideItem": False,
            "unlimitedInventoryFlag": all(v.quantity is None for v in variants),
            "variants": {
                v.listing_key.partition("/")[2]: {
                    "merchantDefinedSkuId": v.link_code or None,
                    "restockOnCancel": True,
                    "backOrderFlag": v.allow_overdraft,
                    "hidden": False,
                    "standardPrice": v.attrs.get("price", "1000"),
                }
                for v in variants
            },
            "created": "2024-01-01T00:00:00+09:00",
            "updated": "2024-01-01T00:00:00+09:00",
        }

    def _item_search(self, request: Request) -> Response:
        def bad(code: str, message: str) -> Response:
            return Response.json({"errors": [{"code": code, "message": message}]}, 400)

        try:
            hits = int(request.arg("hits", "10"))
            offset = int(request.arg("offset", "0"))
        except ValueError:
            return bad("IE0002", "Invalid value of hits or offset.")
        if not 1 <= hits <= 100:
            return bad("IE0003", "hits must be between 1 and 100.")
        if not 0 <= offset <= 10000:
            return bad("IE0003", "offset must be between 0 and 10000.")
        cursor_mark = request.arg("cursorMark")
        if cursor_mark and "offset" in request.query:
            return bad("IE0105", "offset and cursorMark cannot be specified together.")
        items = self._items()
        names = list(items)
        obj: dict[str, Any] = {"numFound": len(names)}
        next_mark = ""
        if cursor_mark:
            after = ""
            if cursor_mark != "*":
                try:
                    after = base64.urlsafe_b64decode(cursor_mark.encode()).decode()
                except (binascii.Error, UnicodeDecodeError):
                    return bad("IE0002", "Invalid value of cursorMark.")
            page = [n for n in names if n > after][:hits]
            obj["offset"] = 0
            next_mark = (
                base64.urlsafe_b64encode(page[-1].encode()).decode() if page else cursor_mark
            )
        else:
            page = names[offset : offset + hits]
            obj["offset"] = offset
        obj["results"] = [{"item": self._item_model(n, items[n])} for n in page]
        if cursor_mark:
            obj["nextCursorMark"] = next_mark
        return self._ok(obj, "results")

    # -- LicenseManagementAPI ------------------------------------------------------------

    def _key_expiry(self, request: Request) -> Response:
        key = request.arg("licenseKey")
        if not key:
            return _results("ES02-03", "licenseKey is required", 400)
        expiry = self._keys.get(key)
        if expiry is None:
            return _results("ES02-04", "licenseKey not found", 404)
        # JST without an offset, as RMS answers [V].
        text = datetime.fromtimestamp(int(expiry), JST).strftime("%Y-%m-%dT%H:%M:%S")
        return self._ok({"expiryDate": text}, "expiryDate")


def _listing_key(sku: str) -> str:
    # RMS addresses stock by manageNumber/variantId: a lower-case item, the SKU variant.
    return f"{sku.lower()}/{sku}"


SIM = SimSpec("rakuten", SimRakuten, _listing_key)
