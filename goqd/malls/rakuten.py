"""楽天市場 (Rakuten RMS WEB SERVICE) adapter.

Orders come from RakutenPayOrderAPI (``searchOrder`` then ``getOrder``), stock goes out
through Inventory API 2.0 ``bulk-upsert`` (ABSOLUTE) and is read back with ``bulk-get``,
listings come from ItemAPI 2.0 ``items.search``, and the licenseKey's expiry from
LicenseManagementAPI. Facts and their sources are in docs/malls.md §1; every choice
marked [I] below is an assumption the simulator (``goqd.sim.rakuten``) mirrors.

Auth: ``Authorization: ESA base64(serviceSecret:licenseKey)``. Any 401 (GA0001 /
ES01-01) and ``ES04-01`` (the API function is not enabled for the shop) raise
``MallAuthError``: both need an operator.

How orders are found. Rakuten has no "updated after" search [I, docs/malls.md §1.2], so each
poll makes two searches:

1. ``dateType=1`` (order date) from ``cursor - overlap_s`` to now, statuses live+cancel:
   every new order;
2. ``orderProgressList`` = 400 (変更確定待ち) + the cancel statuses, over the last
   ``change_lookback_days`` (default 30) of order dates: quantity edits and
   cancellations of older orders.

Windows longer than 63 days are split; a window that hits the 15,000-result cap is
halved until it does not. An order already returned at a terminal cancel status (900)
is not read again with ``getOrder`` once the ledger committed the poll that returned it
(the next call passes that cursor back); the set lives in memory, so after a restart
each such order is read once more and the ledger dedupes it. Known gap: an order that
is edited (400) and then moves on (300/500) between two polls is not re-read unless it
is still inside the overlap window; the discrepancy check catches what remains.

``updated_at``: Rakuten has no update time for an order, so it is the latest of
``orderDatetime``, ``shopOrderCfmDatetime``, ``orderFixDatetime``,
``shippingInstDatetime``, ``shippingCmplRptDatetime`` and every ``changeApplyDatetime`` /
``changeFixDatetime`` / ``changeCmplDatetime`` in ``ChangeReasonModelList``. Each of
these only ever gets set or added as an order moves on, so the value never goes back;
date-only fields such as ``cancelDueDate`` are deadlines, not updates, and are ignored.

Options (declared with their bounds in ``SPEC.options``): ``overlap_s`` (600),
``initial_lookback_s`` (86400), ``change_lookback_days`` (30), ``link_field`` (see
``LINK_FIELDS``), ``page_size`` (searchOrder records per page, ≤1000),
``get_order_batch`` (≤100), ``search_result_cap`` (15000).

This module must never log or format the serviceSecret or licenseKey: they reach
httpx only through ``_auth_header`` and the one expiry-date query parameter. The
header's base64 form is registered with the log redactor when the adapter opens.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import msgspec

from goqd.errors import ConfigError, MallAuthError, MallError, MallProtocolError, MallRateLimited
from goqd.logs import register_secret
from goqd.malls.base import (
    DECODE_ERRORS,
    KeyExpiry,
    MallLimits,
    MallSpec,
    OrderPage,
    StoreContext,
    opt_choice,
    opt_integer,
    push_outcome,
    read_options,
)
from goqd.malls.client import MallClient, Reply, Table, error_class, short
from goqd.malls.ratelimit import TokenBucket, shared_bucket
from goqd.messages import ListingAttrs, MallListing, OrderLine, PushItem, PushOutcome

# POST APIs that change nothing: searchOrder, getOrder and bulk-get only read.
_READ_POSTS = frozenset({"rpay.order.searchOrder", "rpay.order.getOrder", "inventories.bulk.get"})

MALL = "rakuten"
JST = timezone(timedelta(hours=9), "JST")

SEARCH_ORDER_PATH = "/es/2.0/order/searchOrder/"
GET_ORDER_PATH = "/es/2.0/order/getOrder/"
BULK_UPSERT_PATH = "/es/2.0/inventories/bulk-upsert"
BULK_GET_PATH = "/es/2.0/inventories/bulk-get"
ITEM_SEARCH_PATH = "/es/2.0/items/search"
KEY_EXPIRY_PATH = "/es/1.0/license-management/license-key/expiry-date"

MAX_WINDOW_S = 63 * 86400  # searchOrder: endDatetime - startDatetime <= 63 days [V]
MAX_LOOKBACK_S = 730 * 86400  # searchOrder: startDatetime within the past 2 years [V]
SEARCH_PAGE_MAX = 1000  # requestRecordsAmount [V]
SEARCH_RESULT_CAP = 15000  # results per search [V]
GET_ORDER_MAX = 100  # orderNumberList per getOrder [V]
GET_ORDER_VERSION = 7  # first version with SkuModelList [V]
UPSERT_MAX = 400  # bulk-upsert items [V]
BULK_GET_MAX = 1000  # bulk-get items [V]
QUANTITY_MAX = 99999  # Inventory API quantity range, IE0003 [V]
ITEM_SEARCH_HITS = 100  # items.search hits 1..100 [V]

LIVE_STATUSES = ("100", "200", "300", "400", "500", "600", "700")
CANCEL_STATUSES = ("900",)
# 900 キャンセル確定 is final; 800 キャンセル確定待ち can still be withdrawn (docs/malls.md §1.3).
TERMINAL_STATUSES = frozenset({"900"})
CHANGE_STATUS = "400"

# link_code choices (option ``link_field``):
#   merchantDefinedSkuId    システム連携用SKU番号 (default); falls back to variantId when empty
#   variantId               SKU管理番号
#   manageNumber+variantId  商品管理番号 and SKU管理番号 concatenated without a separator,
#                           the code many merchants built before SKU migration
LINK_FIELDS = ("merchantDefinedSkuId", "variantId", "manageNumber+variantId")
DEFAULT_LINK_FIELD = "merchantDefinedSkuId"

# How the gateway's replies are classified. Credential problems: HTTP 401, GA0001
# (expired key, field note), ES01-01 (bad key; every ES01 code is read as one), GE0011
# (Inventory API auth). ES04-01 = the function is not enabled for the shop, which only
# an operator can change too.
_FUNCTION_DISABLED = "ES04-01"
TABLE: Table = {
    401: MallAuthError,
    429: MallRateLimited,
    "GA0001": MallAuthError,
    "ES01-01": MallAuthError,
    "GE0011": MallAuthError,
    _FUNCTION_DISABLED: MallAuthError,
}
_DEFAULT_RETRY_AFTER = 1.0  # [I] the throttle body/headers are undocumented
_PROPERTY_INDEX = re.compile(r"^inventories\[(\d+)\]")

T = TypeVar("T")


# --------------------------------------------------------------------------------------
# Wire formats. Response Structs allow unknown fields (Rakuten adds fields with each
# getOrder version); fields without a default are the ones we cannot work without, so a
# response missing them is a MallProtocolError.
# --------------------------------------------------------------------------------------


class _Wire(msgspec.Struct, kw_only=True, rename="camel"):
    pass


class _GatewayResults(_Wire):
    error_code: str = ""
    message: str = ""


class _GatewayError(_Wire):
    results: _GatewayResults | None = msgspec.field(default=None, name="Results")


class _Message(_Wire):
    message_type: str = ""
    message_code: str = ""
    message: str = ""
    order_number: str | None = None


class _PaginationResponse(_Wire):
    total_records_amount: int | None = None
    total_pages: int | None = None
    request_page: int | None = None


class _SearchOrderResponse(_Wire):
    order_number_list: list[str] | None
    messages: list[_Message] | None = msgspec.field(default=None, name="MessageModelList")
    pagination: _PaginationResponse | None = msgspec.field(
        default=None, name="PaginationResponseModel"
    )


class _MessagesOnly(_Wire):
    messages: list[_Message] | None = msgspec.field(default=None, name="MessageModelList")


class _Sku(_Wire):
    variant_id: str | None = None
    merchant_defined_sku_id: str | None = None


class _OrderItem(_Wire):
    item_detail_id: int
    manage_number: str
    units: int
    item_number: str | None = None
    item_name: str | None = None
    delete_item_flag: int | None = 0
    skus: list[_Sku] | None = msgspec.field(default=None, name="SkuModelList")


class _Package(_Wire):
    items: list[_OrderItem] = msgspec.field(name="ItemModelList")
    basket_id: int | None = None


class _ChangeReason(_Wire):
    change_type: int | None = None
    change_apply_datetime: str | None = None
    change_fix_datetime: str | None = None
    change_cmpl_datetime: str | None = None


class _Order(_Wire):
    order_number: str
    order_progress: int
    order_datetime: str
    packages: list[_Package] = msgspec.field(name="PackageModelList")
    shop_order_cfm_datetime: str | None = None
    order_fix_datetime: str | None = None
    shipping_inst_datetime: str | None = None
    shipping_cmpl_rpt_datetime: str | None = None
    change_reasons: list[_ChangeReason] | None = msgspec.field(
        default=None, name="ChangeReasonModelList"
    )


class _GetOrderResponse(_Wire):
    orders: list[_Order] | None = msgspec.field(name="OrderModelList")
    messages: list[_Message] | None = msgspec.field(default=None, name="MessageModelList")


class _InventoryErrorMeta(_Wire):
    property_path: str = ""


class _InventoryError(_Wire):
    code: str = ""
    message: str = ""
    metadata: _InventoryErrorMeta | None = None


class _InventoryErrors(_Wire):
    errors: list[_InventoryError]


class _Inventory(_Wire):
    manage_number: str
    variant_id: str
    quantity: int


class _BulkGetResponse(_Wire):
    inventories: list[_Inventory]


class _ItemVariant(_Wire):
    merchant_defined_sku_id: str | None = None


class _Item(_Wire):
    manage_number: str
    item_number: str | None = None
    title: str | None = None
    unlimited_inventory_flag: bool | None = False
    variants: dict[str, _ItemVariant] | None = None


class _ItemResult(_Wire):
    item: _Item | None = None


class _ItemSearchResponse(_Wire):
    num_found: int
    results: list[_ItemResult]
    offset: int | None = None
    next_cursor_mark: str | None = None


class _ExpiryResponse(_Wire):
    expiry_date: str


# --------------------------------------------------------------------------------------
# Time helpers: Rakuten speaks JST with a "+0900" offset (exactly; "+09:00" is refused).
# --------------------------------------------------------------------------------------


def format_jst(epoch: float) -> str:
    """``YYYY-MM-DDThh:mm:ss+0900``, the only form searchOrder accepts."""
    return datetime.fromtimestamp(int(epoch), JST).strftime("%Y-%m-%dT%H:%M:%S+0900")


def parse_jst(text: str) -> float:
    """Epoch seconds of a Rakuten datetime; a value without an offset is JST."""
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=JST)
    return value.timestamp()


def split_listing_key(listing_key: str) -> tuple[str, str] | None:
    """``manageNumber/variantId`` -> the two parts; neither may contain ``/``."""
    manage_number, sep, variant_id = listing_key.partition("/")
    if not sep or not manage_number or not variant_id or "/" in variant_id:
        return None
    return manage_number, variant_id


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _windows(start: int, end: int, width: int) -> Iterator[tuple[int, int]]:
    """Inclusive second ranges covering [start, end], none longer than ``width``."""
    while start <= end:
        stop = min(start + width, end)
        yield start, stop
        start = stop + 1


class RakutenAdapter:
    """One store's RMS session: HTTP client (borrowed), a token bucket per RMS API, and
    the in-memory set of orders already returned at a terminal cancel status."""

    mall = MALL

    def __init__(self, ctx: StoreContext) -> None:
        for name in SPEC.credential_fields:
            if name not in ctx.credentials:
                raise ConfigError(f"store {ctx.store}", "credentials", f"{name} is missing")
        self._ctx = ctx
        self.limits = SPEC.limits
        options = read_options(SPEC, ctx)
        self._overlap_s: int = options["overlap_s"]
        self._initial_lookback_s: int = options["initial_lookback_s"]
        self._change_lookback_s = 86400 * options["change_lookback_days"]
        self._page_size: int = options["page_size"]
        self._get_order_batch: int = options["get_order_batch"]
        self._search_cap: int = options["search_result_cap"]
        self._link_field: str = options["link_field"]
        # What goes on the wire is the base64 of both secrets: mask that form in logs too.
        register_secret(self._auth_header().removeprefix("ESA "))
        self._live = frozenset(ctx.live_statuses or SPEC.default_live_statuses)
        self._cancel = frozenset(ctx.cancel_statuses or SPEC.default_cancel_statuses)
        # One bucket per RMS API. Orders: ≈1 req/s [I, docs/malls.md §1.6]; Inventory bulk-upsert
        # 1 req/s and bulk-get 5 req/s [V]; items.search and expiry-date 1 req/s [I]. Burst 1:
        # "5 per second" is read as evenly spaced, never 5 at once and 5 more [I].
        # Requests are spaced 10% wider than the limit: the first request of a session also
        # opens the connection, so it can arrive late and crowd the next one.
        margin = 0.9
        self._search_bucket = shared_bucket(ctx.rate_buckets, "search", 1.0 * margin, 1)
        self._get_order_bucket = shared_bucket(ctx.rate_buckets, "get_order", 1.0 * margin, 1)
        self._upsert_bucket = shared_bucket(ctx.rate_buckets, "upsert", 1.0 * margin, 1)
        self._bulk_get_bucket = shared_bucket(ctx.rate_buckets, "bulk_get", 5.0 * margin, 1)
        self._item_bucket = shared_bucket(ctx.rate_buckets, "item", 1.0 * margin, 1)
        self._license_bucket = shared_bucket(ctx.rate_buckets, "license", 1.0 * margin, 1)
        self._client = MallClient(ctx, MALL, is_secret=SPEC.is_secret_field)
        # Orders returned at a terminal status, not yet known to be committed:
        # (the cursor returned with them, their numbers).
        self._final_pending: tuple[str, set[str]] | None = None
        self._final_seen: set[str] = set()

    def _decode(self, kind: type[T], reply: Reply, api: str) -> T:
        return self._client.decode(kind, reply.body, api)

    # -- HTTP --------------------------------------------------------------------------

    def _auth_header(self) -> str:
        secret = self._ctx.credentials["service_secret"].reveal()
        key = self._ctx.credentials["license_key"].reveal()
        return "ESA " + base64.b64encode(f"{secret}:{key}".encode()).decode("ascii")

    async def _call(
        self,
        api: str,
        bucket: TokenBucket,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        secret_in_url: bool = False,
    ) -> Reply:
        """One request under ``bucket``; gateway-level failures are raised here.

        ``secret_in_url``: the expiry-date call carries the licenseKey in its URL.
        """
        headers = {"Authorization": self._auth_header(), "Accept": "application/json"}
        content: bytes | None = None
        if body is not None:
            content = msgspec.json.encode(body)
            headers["Content-Type"] = "application/json; charset=utf-8"
        # Paced from the answer (``TokenBucket.slot``): RMS counts a call on arrival, and
        # a send held up at start-up (a new connection, a busy process) crowded the next.
        reply = await self._client.send(
            api,
            method,
            self._ctx.base_url.rstrip("/") + path,
            headers=headers,
            bucket=bucket,
            content=content,
            params=params,
            # POSTs that only read may be sent again on a fresh connection.
            read=api in _READ_POSTS,
            secret_in_url=secret_in_url,
        )
        self._raise_for_gateway(api, bucket, reply)
        return reply

    def _raise_for_gateway(self, api: str, bucket: TokenBucket, reply: Reply) -> None:
        code, text = "", ""
        if reply.body[:1] == b"{" and b'"Results"' in reply.body[:4096]:
            try:
                results = msgspec.json.decode(reply.body, type=_GatewayError).results
            except DECODE_ERRORS:
                results = None
            if results is not None:
                code, text = results.error_code, short(results.message)
        status = reply.status
        detail = " ".join(p for p in (code, text) if p) or f"HTTP {status}"
        if code.startswith("ES01"):
            cls: type[MallError] = MallAuthError
        elif status in TABLE or code in TABLE or status >= 500:
            cls = error_class(TABLE, status, code)
        elif code:
            cls = MallProtocolError
        else:
            return  # an answer for the caller to read (a 4xx about the request, say)
        if cls is MallAuthError and code == _FUNCTION_DISABLED and status != 401:
            message = (
                f"{api}: the API function is not enabled for this shop ({detail}); enable it "
                "in RMS 拡張サービス一覧 > WEB APIサービス > 利用機能編集"
            )
        elif cls is MallAuthError:
            message = (
                f"{api}: Rakuten rejected the serviceSecret/licenseKey ({detail}); "
                "renew the licenseKey in RMS and run `goqctl key set`"
            )
            code = code or "http_401"
        elif cls is MallRateLimited:
            message = f"{api}: throttled ({detail})"
            code = code or "http_429"
        elif cls is MallProtocolError:
            message = f"{api}: gateway error ({detail}, HTTP {status})"
        else:
            message = f"{api}: HTTP {status} ({detail})"
        raise self._client.reply_error(
            cls, message, code, reply=reply, bucket=bucket, retry_default=_DEFAULT_RETRY_AFTER
        )

    # -- credentials -------------------------------------------------------------------

    async def check_credentials(self) -> None:
        """A one-minute searchOrder: cheap, and proves the order API is enabled too."""
        now = int(self._ctx.mall_clock.floor(self._ctx.clock()))
        await self._search_page(1, now - 60, now, [], 1, amount=30)

    async def credential_expiry(self) -> float | None:
        api = "license.expiryDate.get"
        reply = await self._call(
            api,
            self._license_bucket,
            "GET",
            KEY_EXPIRY_PATH,
            params={"licenseKey": self._ctx.credentials["license_key"].reveal()},
            secret_in_url=True,
        )
        if reply.status != 200:
            raise self._client.error(MallProtocolError, f"{api}: unexpected HTTP {reply.status}")
        expiry = self._decode(_ExpiryResponse, reply, api).expiry_date
        try:
            return parse_jst(expiry)
        except ValueError as exc:
            raise self._client.error(
                MallProtocolError, f"{api}: bad expiryDate {expiry!r}"
            ) from exc

    # -- orders ------------------------------------------------------------------------

    async def fetch_orders(self, cursor: str | None) -> OrderPage:
        # The window is in Rakuten's time (its clock as its responses show it), so a skew
        # between the clocks never moves it past orders (goqd.malls.clock).
        began = self._ctx.clock()
        clock = self._ctx.mall_clock
        try:
            cursor_at = None if cursor is None else int(parse_jst(cursor))
        except ValueError:
            # Not a cursor this adapter wrote: start over as on a first poll rather than
            # fail every poll; the ledger dedupes what is read twice.
            cursor_at = None
        window = clock.window(
            began,
            cursor_at,
            overlap=self._overlap_s,
            initial_lookback=self._initial_lookback_s,
        )
        if cursor is not None and cursor_at is not None:
            self._promote_final(cursor)
        end = int(window.end)
        # Rakuten refuses a start older than two years; keep an hour of margin.
        start = max(min(int(window.start), end), end - MAX_LOOKBACK_S + 3600)

        numbers: dict[str, None] = {}  # insertion-ordered set
        wanted = sorted(int(s) for s in self._live | self._cancel if s.isdigit())
        for w_start, w_end in _windows(start, end, MAX_WINDOW_S):
            await self._search_window(numbers, w_start, w_end, wanted)
        changed = sorted(
            int(s) for s in ({CHANGE_STATUS} & self._live) | self._cancel if s.isdigit()
        )
        if self._change_lookback_s and changed:
            change_start = max(end - self._change_lookback_s, end - MAX_LOOKBACK_S + 3600)
            for w_start, w_end in _windows(change_start, end, MAX_WINDOW_S):
                await self._search_window(numbers, w_start, w_end, changed)

        to_read = [n for n in numbers if n not in self._final_seen]
        # Never later than Rakuten's time when the searches ran.
        new_cursor = format_jst(int(clock.cursor_after(began, end)))
        lines: list[OrderLine] = []
        final: set[str] = set()
        orders_seen = 0
        for batch in _chunks(to_read, self._get_order_batch):
            for order in await self._get_orders(batch):
                orders_seen += 1
                status = str(order.order_progress)
                lines.extend(self._order_lines(order))
                if status in TERMINAL_STATUSES and status in self._cancel:
                    final.add(order.order_number)
        # Anything still pending from an uncommitted poll was read again above.
        self._final_pending = (new_cursor, final) if final else None
        return OrderPage(lines=tuple(lines), cursor=new_cursor, orders_seen=orders_seen)

    def _promote_final(self, cursor: str) -> None:
        """The caller passes back the cursor it committed: what that poll returned at a
        terminal status is booked, so it need not be read again."""
        if self._final_pending is None:
            return
        pending_cursor, numbers = self._final_pending
        # Same fixed-width JST format, so string order is time order.
        if cursor >= pending_cursor:
            self._final_seen |= numbers
            self._final_pending = None

    async def _search_window(
        self, numbers: dict[str, None], start: int, end: int, progress: list[int]
    ) -> None:
        page = 1
        while True:
            response = await self._search_page(1, start, end, progress, page)
            pagination = response.pagination
            total = (pagination.total_records_amount if pagination else None) or 0
            if page == 1 and total >= self._search_cap and end > start:
                # The search stops at the cap: halve the window until nothing is cut off.
                middle = (start + end) // 2
                await self._search_window(numbers, start, middle, progress)
                await self._search_window(numbers, middle + 1, end, progress)
                return
            found = response.order_number_list or []
            for number in found:
                numbers[number] = None
            pages = (pagination.total_pages if pagination else None) or 0
            if page >= pages or not found:
                return
            page += 1

    async def _search_page(
        self,
        date_type: int,
        start: int,
        end: int,
        progress: list[int],
        page: int,
        *,
        amount: int | None = None,
    ) -> _SearchOrderResponse:
        api = "rpay.order.searchOrder"
        body: dict[str, Any] = {
            "dateType": date_type,
            "startDatetime": format_jst(start),
            "endDatetime": format_jst(end),
            "PaginationRequestModel": {
                "requestRecordsAmount": amount or self._page_size,
                "requestPage": page,
                "SortModelList": [{"sortColumn": 1, "sortDirection": 1}],
            },
        }
        if progress:
            body["orderProgressList"] = progress
        reply = await self._call(api, self._search_bucket, "POST", SEARCH_ORDER_PATH, body=body)
        if reply.status != 200:
            raise self._order_api_error(api, reply)
        return self._decode(_SearchOrderResponse, reply, api)

    async def _get_orders(self, numbers: Sequence[str]) -> list[_Order]:
        api = "rpay.order.getOrder"
        body = {"orderNumberList": list(numbers), "version": GET_ORDER_VERSION}
        reply = await self._call(api, self._get_order_bucket, "POST", GET_ORDER_PATH, body=body)
        if reply.status != 200:
            raise self._order_api_error(api, reply)
        # Numbers Rakuten could not return come back as WARNING messages; an order we
        # cannot read now is read again on a later poll while it is in a search window.
        return self._decode(_GetOrderResponse, reply, api).orders or []

    def _order_api_error(self, api: str, reply: Reply) -> MallProtocolError:
        """A 4xx from the order API names what it disliked in MessageModelList."""
        code, text = "", ""
        try:
            messages = msgspec.json.decode(reply.body, type=_MessagesOnly).messages or []
        except DECODE_ERRORS:
            messages = []
        for message in messages:
            if message.message_type == "ERROR":
                code, text = message.message_code, short(message.message)
                break
        detail = " ".join(p for p in (code, text) if p) or "no message"
        return self._client.error(
            MallProtocolError, f"{api}: HTTP {reply.status} ({detail})", code=code
        )

    def _order_lines(self, order: _Order) -> list[OrderLine]:
        status = str(order.order_progress)
        if status in self._live:
            cancelled = False
        elif status in self._cancel:
            cancelled = True
        else:
            return []  # e.g. 800: keep whatever was booked until it settles
        terminal = cancelled and status in TERMINAL_STATUSES
        updated_at = self._updated_at(order)
        lines = []
        for package in order.packages:
            for item in package.items:
                sku = item.skus[0] if item.skus else None
                variant_id = (sku.variant_id if sku else None) or ""
                # Pre-SKU-migration items carry their stock key in itemNumber.
                key_part = variant_id or item.item_number or ""
                deleted = item.delete_item_flag == 1 or item.units <= 0
                lines.append(
                    OrderLine(
                        order_id=order.order_number,
                        line_id=str(item.item_detail_id),
                        listing_key=f"{item.manage_number}/{key_part}",
                        link_code=self._link_code(
                            item.manage_number,
                            key_part,
                            sku.merchant_defined_sku_id if sku else None,
                        ),
                        quantity=max(item.units, 0),
                        cancelled=cancelled or deleted,
                        terminal=terminal,
                        updated_at=updated_at,
                        status=status,
                    )
                )
        return lines

    def _updated_at(self, order: _Order) -> float:
        stamps = [
            order.order_datetime,
            order.shop_order_cfm_datetime,
            order.order_fix_datetime,
            order.shipping_inst_datetime,
            order.shipping_cmpl_rpt_datetime,
        ]
        for change in order.change_reasons or ():
            stamps += [
                change.change_apply_datetime,
                change.change_fix_datetime,
                change.change_cmpl_datetime,
            ]
        try:
            return max(parse_jst(s) for s in stamps if s)
        except ValueError as exc:
            raise self._client.error(
                MallProtocolError,
                f"rpay.order.getOrder: order {order.order_number} has a malformed datetime",
            ) from exc

    def _link_code(self, manage_number: str, variant_id: str, merchant_sku: str | None) -> str:
        if self._link_field == "variantId":
            return variant_id
        if self._link_field == "manageNumber+variantId":
            return f"{manage_number}{variant_id}"
        return merchant_sku or variant_id

    # -- stock -------------------------------------------------------------------------

    async def push_stock(self, items: Sequence[PushItem]) -> list[PushOutcome]:
        outcomes: list[PushOutcome | None] = [None] * len(items)
        sendable: list[tuple[int, str, str]] = []
        for i, item in enumerate(items):
            parts = split_listing_key(item.listing_key)
            if parts is None:
                outcomes[i] = _refused(
                    item, "invalid_listing_key", "listing key must be manageNumber/variantId"
                )
            elif not 0 <= item.quantity <= QUANTITY_MAX:
                # Rakuten would refuse the whole request for this one item: refuse it here.
                outcomes[i] = _refused(
                    item, "IE0003", f"quantity must be between 0 and {QUANTITY_MAX}"
                )
            else:
                sendable.append((i, *parts))
        for batch in _chunks(sendable, self.limits.push_batch):
            await self._upsert(items, batch, outcomes)
        done = [o for o in outcomes if o is not None]
        assert len(done) == len(items)
        return done

    async def _upsert(
        self,
        items: Sequence[PushItem],
        batch: Sequence[tuple[int, str, str]],
        outcomes: list[PushOutcome | None],
    ) -> None:
        """Send ``batch``; items Rakuten names in a 400 are refused and the rest resent
        (validation is all-or-nothing per request [I])."""
        api = "inventories.bulk.upsert"
        pending = list(batch)
        while pending:
            body = {
                "inventories": [
                    {
                        "manageNumber": manage_number,
                        "variantId": variant_id,
                        "mode": "ABSOLUTE",
                        "quantity": items[i].quantity,
                    }
                    for i, manage_number, variant_id in pending
                ]
            }
            reply = await self._call(api, self._upsert_bucket, "POST", BULK_UPSERT_PATH, body=body)
            if reply.status == 204 or (reply.status == 200 and not reply.body.strip()):
                for i, _, _ in pending:
                    outcomes[i] = push_outcome(items[i], accepted=True, quantity=items[i].quantity)
                return
            if reply.status not in (400, 404):
                raise self._client.error(
                    MallProtocolError, f"{api}: unexpected HTTP {reply.status}"
                )
            errors = self._decode(_InventoryErrors, reply, api).errors
            named: dict[int, list[_InventoryError]] = {}
            for error in errors:
                path = error.metadata.property_path if error.metadata else ""
                match = _PROPERTY_INDEX.match(path)
                if match and int(match.group(1)) < len(pending):
                    named.setdefault(int(match.group(1)), []).append(error)
            if not named:
                first = errors[0] if errors else _InventoryError()
                raise self._client.error(
                    MallProtocolError,
                    f"{api}: request refused ({first.code} {short(first.message)})",
                    code=first.code,
                )
            for j, refusals in named.items():
                i = pending[j][0]
                outcomes[i] = _refused(
                    items[i],
                    refusals[0].code,
                    "; ".join(short(e.message) for e in refusals),
                )
            pending = [p for j, p in enumerate(pending) if j not in named]

    async def read_stock(self, listing_keys: Sequence[str]) -> dict[str, int | None]:
        api = "inventories.bulk.get"
        wanted: list[tuple[str, str, str]] = []
        for key in listing_keys:
            parts = split_listing_key(key)
            if parts is not None:
                wanted.append((key, *parts))
        result: dict[str, int | None] = {}
        for batch in _chunks(wanted, self.limits.read_batch):
            # Rakuten lower-cases manageNumber; variantId is case-sensitive [V].
            by_id: dict[tuple[str, str], list[str]] = {}
            for key, manage_number, variant_id in batch:
                by_id.setdefault((manage_number.lower(), variant_id), []).append(key)
            body = {
                "inventories": [
                    {"manageNumber": manage_number, "variantId": variant_id}
                    for _, manage_number, variant_id in batch
                ]
            }
            reply = await self._call(api, self._bulk_get_bucket, "POST", BULK_GET_PATH, body=body)
            if reply.status != 200:
                raise self._inventory_error(api, reply)
            for row in self._decode(_BulkGetResponse, reply, api).inventories:
                for key in by_id.get((row.manage_number.lower(), row.variant_id), ()):
                    result[key] = row.quantity
        return result

    def _inventory_error(self, api: str, reply: Reply) -> MallProtocolError:
        try:
            errors = msgspec.json.decode(reply.body, type=_InventoryErrors).errors
        except DECODE_ERRORS:
            errors = []
        if errors:
            return self._client.error(
                MallProtocolError,
                f"{api}: HTTP {reply.status} ({errors[0].code} {short(errors[0].message)})",
                code=errors[0].code,
            )
        return self._client.error(MallProtocolError, f"{api}: unexpected HTTP {reply.status}")

    # -- listings ----------------------------------------------------------------------

    async def iter_listings(self) -> AsyncIterator[MallListing]:
        """Every SKU of every item, via ItemAPI 2.0 ``items.search`` with ``cursorMark``
        paging (offset stops at 10,000 [V]), quantities from ``bulk-get``.

        items.search lags registrations and deletions by up to 24 h [V]; deleted items
        come back with only ``manageNumber`` and are skipped. A SKU with no inventory
        record is reported as 0 [I]; an item with ``unlimitedInventoryFlag`` as None.
        """
        api = "items.search"
        cursor_mark = "*"
        while True:
            reply = await self._call(
                api,
                self._item_bucket,
                "GET",
                ITEM_SEARCH_PATH,
                params={"hits": str(ITEM_SEARCH_HITS), "cursorMark": cursor_mark},
            )
            if reply.status != 200:
                raise self._inventory_error(api, reply)
            page = self._decode(_ItemSearchResponse, reply, api)
            found: list[tuple[str, str, str, bool]] = []  # key, link code, name, unlimited
            for result in page.results:
                item = result.item
                if item is None or not item.variants:
                    continue
                unlimited = bool(item.unlimited_inventory_flag)
                for variant_id, variant in item.variants.items():
                    found.append(
                        (
                            f"{item.manage_number}/{variant_id}",
                            self._link_code(
                                item.manage_number, variant_id, variant.merchant_defined_sku_id
                            ),
                            item.title or item.manage_number,
                            unlimited,
                        )
                    )
            counts = await self.read_stock([key for key, _, _, unlimited in found if not unlimited])
            for key, link_code, name, unlimited in found:
                yield MallListing(
                    listing_key=key,
                    link_code=link_code,
                    name=name,
                    quantity=None if unlimited else counts.get(key, 0),
                    attrs=ListingAttrs(),
                )
            next_mark = page.next_cursor_mark
            # The documented end condition: nextCursorMark equals the cursorMark sent.
            if not next_mark or next_mark == cursor_mark or not page.results:
                return
            cursor_mark = next_mark


def _refused(item: PushItem, code: str, message: str) -> PushOutcome:
    return push_outcome(item, accepted=False, code=code, message=message)


SPEC = MallSpec(
    name=MALL,
    title="楽天市場",
    open_adapter=RakutenAdapter,
    # A poll is at least two searchOrder calls at 1 req/s, plus paging and getOrder; 10 s
    # leaves room for that and for the merchant's other tools sharing the shop's limits.
    limits=MallLimits(push_batch=UPSERT_MAX, read_batch=BULK_GET_MAX, min_poll_interval=10.0),
    credential_fields=("service_secret", "license_key"),
    secret_fields=("service_secret", "license_key"),
    options={
        "overlap_s": opt_integer(600, 0, MAX_WINDOW_S),
        "initial_lookback_s": opt_integer(86400, 0, MAX_LOOKBACK_S - 86400),
        "change_lookback_days": opt_integer(30, 0, 720),
        "page_size": opt_integer(SEARCH_PAGE_MAX, 1, SEARCH_PAGE_MAX),
        "get_order_batch": opt_integer(GET_ORDER_MAX, 1, GET_ORDER_MAX),
        "search_result_cap": opt_integer(SEARCH_RESULT_CAP, 1, 10**6),
        "link_field": opt_choice(DEFAULT_LINK_FIELD, *LINK_FIELDS),
    },
    default_live_statuses=LIVE_STATUSES,
    default_cancel_statuses=CANCEL_STATUSES,
    # No field: the licenseKey's expiry is asked at LicenseManagementAPI.
    expiry=KeyExpiry(
        credential="licenseKey (ライセンスキー, 90 days)",
        renewal=(
            "issue a new licenseKey in RMS (WEB APIサービス → ライセンスキー発行), write it with "
            "service_secret and license_key to a JSON file and run "
            "`goqctl key set {store} --file new.json`"
        ),
    ),
)
