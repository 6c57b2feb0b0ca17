"""au PAY マーケット (旧 Wowma!) adapter: the Wow!manager shop API, ``/wmshopapi/<method>``.

Orders come from ``searchTradeInfoListProc`` (GET, XML); stock goes out through
``updateStock`` (POST XML, plain stock and 項目選択肢別 choice stock) and is read back
with ``searchStocks``; ``searchItemInfos`` adds item names on import. The facts and their
sources are in docs/malls.md §4. Every behaviour that was assumed rather than
sourced is marked [I] below; ``goqd.sim.aupay`` follows the same assumptions and makes
them configurable.

Listing identity:

* plain stock: ``listing_key = itemCode``;
* choice stock: ``listing_key = f"{itemCode}/{child}"`` where ``child`` is the order
  line's ``itemManagementId``, which for stock lines is the horizontal choice code
  followed by the vertical one, each dropped when it is ``-`` or empty [I: the order
  field is documented as the variant id, the concatenation rule comes from a client
  that matches it against ``searchStocks`` rows]. The raw codes travel with the
  listing as ``attrs.extra["choice_h"]`` / ``["choice_v"]`` (resolved at import, or
  looked up with ``searchStocks`` the first time a push needs them).
  An ``itemCode`` containing ``/`` is therefore not supported [I].

Order ``updated_at``: ``searchTradeInfoListProc`` carries no update time and no
status-change time (only ``orderDate``) [I: none in any client's field list]. The
adapter therefore stamps each order with the time it first saw the order's current
*fingerprint* (status, and every line's id, item, unit and itemCancelStatus): an
unchanged order keeps its stamp, a changed one gets ``max(now, previous stamp +
1 ms)``. The highest stamp issued is persisted in the cursor, and an order seen for the
first time by this adapter instance is stamped at least that high, so a stamp never
goes backwards for a later state even across restarts or a wall clock stepped back.
This matters: the ledger ignores observations older than the one it booked.

Links: the option ``link_field`` picks the code the link condition matches:
``"listing_key"`` (default: ``itemCode`` or ``itemCode/child``), ``"item_code"``
(``itemCode`` only; all choices of one item then match one SKU, which the ledger reports
as ambiguous) or ``"concat"`` (``itemCode + child``, e.g. ``ITEM002-red-s``, the
convention of merchants whose SKU is the item code plus the choice codes).

This module must never parse XML with anything but defusedxml, never put the API key,
shop id or anything else from a request into an exception message, and never raise
anything but goqd errors.
"""

from __future__ import annotations

import datetime as dt
import math
import xml.etree.ElementTree as ET  # builds request bodies only; parsing is defusedxml's
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import defusedxml
import defusedxml.ElementTree as SafeET
import httpx
import msgspec

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
    opt_choice,
    opt_codes,
    opt_flag,
    opt_integer,
    opt_number,
    push_outcome,
    read_options,
)
from goqd.malls.client import MAX_BODY_BYTES, MallClient, Reply, Table, error_class
from goqd.malls.ratelimit import shared_bucket
from goqd.messages import ListingAttrs, MallListing, OrderLine, PushItem, PushOutcome

MALL: Final = "aupay"
DEFAULT_BASE_URL: Final = "https://api.manager.wowma.jp"
JST: Final = dt.timezone(dt.timedelta(hours=9), "JST")

API_ORDERS: Final = "searchTradeInfoListProc"
API_UPDATE_STOCK: Final = "updateStock"
API_SEARCH_STOCKS: Final = "searchStocks"
API_SEARCH_ITEMS: Final = "searchItemInfos"
_APIS: Final = (API_ORDERS, API_UPDATE_STOCK, API_SEARCH_STOCKS, API_SEARCH_ITEMS)

# Requests are spaced 10 % wider than the mall's rate: a call delayed on its way
# otherwise arrives less than one token after the next, and a mall that counts on
# arrival refuses it (BENCHMARKS.md, finding 5). Burst stays 1.
RATE_MARGIN: Final = 0.9

# The API key is valid 90 days from its issue date [V].
KEY_LIFETIME_S: Final = 90 * 86400
# The credential-file field with that date (YYYY-MM-DD, JST).
ISSUED_FIELD: Final = "issued_at"

LIVE_STATUSES: Final = (
    "新規受付",
    "発送前入金待ち",
    "与信待ち",
    "発送待ち",
    "発送後入金待ち",
    "完了",
    "新規予約",
    "予約中",
    "保留",
    # Decremented while under review so a rejected order costs a restore, never an
    # oversell [I, docs/malls.md §4.2 daemon mapping].
    "不正取引審査中",
    # Same reasoning for a review put on hold: book it now, restore if it ends in 審査NG.
    "審査保留",
)
CANCEL_STATUSES: Final = ("キャンセル", "審査NG")
# The mall never reopens these [I]; a store's own extra cancel statuses are not terminal.
TERMINAL_CANCEL_STATUSES: Final = frozenset(CANCEL_STATUSES)
# キャンセル受付中 and shop-defined statuses are in neither set: such orders are
# not returned and keep whatever was booked.

# Error codes are not published [I]. These are the codes the simulator uses for a
# rejected key / wrong shop, for maintenance and for throttling; a message naming the
# key, authentication or the source IP also counts as an auth failure, because vendor
# tools report expired key, unregistered IP and wrong shop id alike [V: docs/malls.md §4.1].
DEFAULT_AUTH_CODES: Final = ("PME0106", "PME0107")
AUTH_MESSAGE_MARKERS: Final = ("認証", "APIキー", "接続元IP", "IPアドレス", "ショップID", "店舗ID")
MAINTENANCE_CODES: Final = frozenset({"PME9001"})
THROTTLE_CODES: Final = frozenset({"PME9002"})
# How the shop API's replies are classified; a store's ``auth_error_codes`` are added.
# What it does not name: a 4xx is a request that did not fit the API (the mall's words
# say how), anything else a well-formed error goqd cannot classify [I], retried.
TABLE: Final[Table] = {
    401: MallAuthError,
    403: MallAuthError,
    429: MallRateLimited,
    **dict.fromkeys(MAINTENANCE_CODES, MallUnavailable),
    **dict.fromkeys(THROTTLE_CODES, MallRateLimited),
}
# itemCancelStatus values meaning "this line is cancelled" [I: values not published].
DEFAULT_ITEM_CANCEL_VALUES: Final = ("キャンセル", "キャンセル済", "キャンセル済み", "1")

_LINK_FIELDS: Final = ("listing_key", "item_code", "concat")
_LIST_TAGS: Final = frozenset(
    {"orderInfo", "detail", "resultStocks", "choicesStocks", "resultItems", "updateResult"}
)
_MAX_PAGES: Final = 2000
_MAX_DEPTH: Final = 32  # the shop API's answers nest about five deep
_MESSAGE_MAX: Final = 300
# An error the mall reported inside an answer (HTTP 200) that is not at hand.
_ANSWERED: Final = Reply(200, httpx.Headers(), b"")


# --------------------------------------------------------------------------------------
# Wire format (decoded from the XML tree; unknown elements are ignored)
# --------------------------------------------------------------------------------------


class _Wire(msgspec.Struct, rename="camel"):
    pass


class _Error(_Wire):
    code: str = ""
    message: str = ""


class _Result(_Wire):
    status: int
    error: _Error | None = None


class _Envelope(_Wire):
    result: _Result


class _Detail(_Wire):
    order_detail_id: str
    item_code: str
    unit: int
    item_management_id: str = ""
    item_cancel_status: str = ""
    item_name: str = ""


class _OrderInfo(_Wire):
    order_id: str
    order_date: str
    order_status: str
    detail: list[_Detail] = msgspec.field(default_factory=list)


class _OrdersResponse(_Wire):
    result: _Result
    result_count: int = 0
    order_info: list[_OrderInfo] = msgspec.field(default_factory=list)


class _ChoiceStock(_Wire):
    choices_stock_count: int
    choices_stock_horizontal_code: str = ""
    choices_stock_vertical_code: str = ""
    choices_stock_horizontal_name: str = ""
    choices_stock_vertical_name: str = ""


class _ResultStock(_Wire):
    item_code: str
    stock_segment: str = ""
    # Absent or empty on choice items, so it is read by hand (see _plain_count).
    stock_count: str = ""
    choices_stocks: list[_ChoiceStock] = msgspec.field(default_factory=list)


class _StockSearch(_Wire):
    max_count: str = ""
    result_stocks: list[_ResultStock] = msgspec.field(default_factory=list)


class _StocksResponse(_Wire):
    result: _Result
    search_result: _StockSearch | None = None


class _ResultItem(_Wire):
    item_code: str
    item_name: str = ""


class _ItemSearch(_Wire):
    max_count: str = ""
    result_items: list[_ResultItem] = msgspec.field(default_factory=list)


class _ItemsResponse(_Wire):
    result: _Result
    search_result: _ItemSearch | None = None


class _UpdateResult(_Wire):
    item_code: str = ""
    error: _Error | None = None


class _UpdateResponse(_Wire):
    result: _Result
    update_result: list[_UpdateResult] = msgspec.field(default_factory=list)


class _CursorState(msgspec.Struct, frozen=True):
    """What the cursor string holds: see ``fetch_orders``."""

    v: int
    floor: float  # orders placed before this were never goqd's business
    end: float  # the last window's end (poll time)
    stamp: float  # highest updated_at ever issued for this store


_W = TypeVar("_W", bound=_Wire)


# --------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------


def _real_code(code: str) -> str:
    """A choice code, or "" when the axis is unused ("-" or empty) [V, repo]."""
    code = code.strip()
    return "" if code in ("", "-") else code


def child_code(horizontal: str, vertical: str) -> str:
    """The variant id an order line carries for a choice: horizontal then vertical [I]."""
    return _real_code(horizontal) + _real_code(vertical)


def listing_key_for(item_code: str, child: str) -> str:
    child = _real_code(child)
    return f"{item_code}/{child}" if child else item_code


def split_listing_key(listing_key: str) -> tuple[str, str]:
    """``(itemCode, child)``; child is "" for plain stock."""
    item_code, _, child = listing_key.partition("/")
    return item_code, child


def _jst_date(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, JST).strftime("%Y-%m-%d")


_DATE_FORMATS: Final = (
    "%Y/%m/%d %H:%M:%S",
    "%Y/%m/%d %H:%M",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%dT%H:%M:%S",
    "%Y/%m/%d",
    "%Y-%m-%d",
)


def _parse_jst(text: str) -> float | None:
    text = text.strip()
    for fmt in _DATE_FORMATS:
        try:
            return dt.datetime.strptime(text, fmt).replace(tzinfo=JST).timestamp()
        except ValueError:
            continue
    return None


def _xml_to_obj(elem: Any, depth: int = 0) -> Any:
    """An element as nested dicts: leaves are their text, list tags are always lists.

    A tag that repeats where one value is expected keeps its first occurrence. Nesting
    deeper than ``_MAX_DEPTH`` is no au PAY answer (``ValueError``): it would otherwise
    exhaust the interpreter's recursion limit.
    """
    if depth > _MAX_DEPTH:
        raise ValueError(f"elements nested deeper than {_MAX_DEPTH}")
    children = list(elem)
    if not children:
        return (elem.text or "").strip()
    out: dict[str, Any] = {}
    for child in children:
        tag = child.tag
        if not isinstance(tag, str):
            continue  # comments and processing instructions
        value = _xml_to_obj(child, depth + 1)
        if tag in _LIST_TAGS:
            out.setdefault(tag, []).append(value)
        elif tag not in out:
            out[tag] = value
    return out


@dataclass
class _Seen:
    fingerprint: tuple[Any, ...]
    stamp: float


@dataclass
class _Entry:
    """One PushItem on its way to updateStock."""

    index: int
    item: PushItem
    item_code: str
    quantity: int
    choice: tuple[str, str] | None  # (horizontal, vertical) raw codes; None = plain


@dataclass
class _Group:
    """One ``stockUpdateItem``: a plain entry, or every choice entry of one item."""

    item_code: str
    entries: list[_Entry] = field(default_factory=list)

    @property
    def is_choice(self) -> bool:
        return self.entries[0].choice is not None


# --------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------


class AupayAdapter:
    """One au PAY マーケット store's client. See the module docstring for the rules."""

    mall: str = MALL

    def __init__(self, ctx: StoreContext) -> None:
        self._ctx = ctx
        opts = read_options(SPEC, ctx)
        self.limits = MallLimits(
            # updateStock takes at most 200 stockUpdateItem [V-secondary: transcription of
            # the official spec, qol-kk.com "登録商品の在庫数更新API"].
            push_batch=opts["push_batch"],
            read_batch=opts["read_batch"],
            min_poll_interval=opts["min_poll_interval"],
        )
        # No published rate limit; clients sleep ~0.9 s between pages [V-secondary], so
        # one request per second per API [I] (option ``rate_per_s``: the mall's limit).
        # The buckets refill at RATE_MARGIN of it: see there.
        rate = opts["rate_per_s"] * RATE_MARGIN
        self._buckets = {api: shared_bucket(ctx.rate_buckets, api, rate, 1) for api in _APIS}
        self._overlap_s: float = opts["overlap_s"]
        self._initial_lookback_s: float = opts["initial_lookback_s"]
        # The API filters by order date only, so status changes are found by re-reading
        # every order this young [I].
        self._change_lookback_s: float = opts["change_lookback_days"] * 86400
        # Clients use 100..1000, one caps at 500 [V-secondary]; 500 [I].
        self._order_page: int = opts["page_size"]
        # searchStocks totalCount max 500 [V-secondary].
        self._stock_page: int = opts["stock_page_size"]
        self._item_page: int = opts["items_page_size"]  # [I]
        self._read_single_max: int = opts["read_single_max"]
        self._fetch_names: bool = opts["fetch_names"]
        self._client = MallClient(
            ctx, MALL, max_body=opts["max_body_bytes"], is_secret=SPEC.is_secret_field
        )
        self._default_retry_after: float = opts["retry_after_default"]
        self._table: Table = {**TABLE, **dict.fromkeys(opts["auth_error_codes"], MallAuthError)}
        self._item_cancel_values = frozenset(opts["item_cancel_values"])
        self._link_field: str = opts["link_field"]
        self._live = frozenset(ctx.live_statuses or LIVE_STATUSES)
        self._cancel = frozenset(ctx.cancel_statuses or CANCEL_STATUSES)
        base = (ctx.base_url or DEFAULT_BASE_URL).rstrip("/")
        self._prefix = base if base.endswith("/wmshopapi") else base + "/wmshopapi"
        self._seen: dict[str, _Seen] = {}
        # itemCode/child -> raw (horizontal, vertical) codes, for pushes whose listing
        # was registered from an order line rather than imported.
        self._choice_codes: dict[str, tuple[str, str]] = {}

    # -- errors ------------------------------------------------------------------------

    def _clean(self, text: str) -> str:
        """Mall text for a message: one line, bounded, and never a credential (masked
        before the cut, so no part of one is left at the end)."""
        return " ".join(self._client.mask(text).split())[:_MESSAGE_MAX]

    def _mall_error(self, api: str, code: str, message: str, reply: Reply) -> MallError:
        """Map an error the mall reported in its own format to a goqd error."""
        text = self._clean(f"{code} {message}".strip()) or "no error detail"
        status = reply.status
        where = f"{api}: HTTP {status}: {text}" if status != 200 else f"{api}: {text}"
        unfit = MallProtocolError if 400 <= status < 500 else MallUnavailable
        cls = error_class(self._table, status, code, otherwise=unfit)
        if any(m in message for m in AUTH_MESSAGE_MARKERS):
            cls = MallAuthError
        if cls is MallAuthError:
            where = f"{where} (API key, shop id or source IP rejected)"
        return self._client.reply_error(
            cls,
            where,
            reply=reply,
            bucket=self._buckets[api],
            retry_default=self._default_retry_after,
        )

    # -- transport ---------------------------------------------------------------------

    def _credential(self, name: str) -> str:
        secret = self._ctx.credentials.get(name)
        value = secret.reveal() if secret is not None else ""
        if not value:
            raise self._client.error(
                MallAuthError, f"credential field {name!r} is missing or empty"
            )
        return value

    def _shop_id(self) -> str:
        return self._credential("shop_id")

    async def _call(
        self,
        api: str,
        *,
        params: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> dict[str, Any]:
        """One request; returns the ``<response>`` tree as dicts after status 0.

        An error ``<result>`` is raised as the matching goqd error, except for
        ``updateStock`` whose per-item errors the caller reads (``body`` is set).
        """
        headers = {
            "Authorization": f"Bearer {self._credential('api_key')}",
            # The documented content types, GET included [V].
            "Content-Type": (
                "application/xml; charset=utf-8"
                if body is not None
                else "application/x-www-form-urlencoded"
            ),
            "Accept": "application/xml",
        }
        # Paced from the answer (``TokenBucket.slot``): the mall counts a call on arrival.
        reply = await self._client.send(
            api,
            "POST" if body is not None else "GET",
            f"{self._prefix}/{api}",
            headers=headers,
            bucket=self._buckets[api],
            content=body,
            params=params,
        )
        if reply.status != 200:
            code, message = self._error_detail(reply.body)
            raise self._mall_error(api, code, message, reply)
        tree = self._parse(api, reply.body, reply.headers.get("content-type", ""))
        envelope = self._convert(api, tree, _Envelope)
        if envelope.result.status != 0 and body is None:
            err = envelope.result.error or _Error()
            raise self._mall_error(api, err.code, err.message, reply)
        return tree

    def _parse(self, api: str, raw: bytes, content_type: str) -> dict[str, Any]:
        head = raw.lstrip()[:100].lower()
        if "html" in content_type.lower() or head.startswith((b"<!doctype html", b"<html")):
            raise self._client.error(
                MallProtocolError, api=api, message="answered with an HTML page instead of XML"
            )
        try:
            root = SafeET.fromstring(raw)
        except (ET.ParseError, defusedxml.DefusedXmlException) as exc:
            raise self._client.error(
                MallProtocolError, api=api, message=f"unreadable XML ({type(exc).__name__})"
            ) from exc
        if root.tag != "response":
            raise self._client.error(
                MallProtocolError,
                api=api,
                message=f"unexpected root element <{self._clean(str(root.tag))}>",
            )
        try:
            tree = _xml_to_obj(root)
        except ValueError as exc:
            raise self._client.error(MallProtocolError, api=api, message=str(exc)) from exc
        if not isinstance(tree, dict):
            raise self._client.error(MallProtocolError, api=api, message="empty <response>")
        return tree

    def _convert(self, api: str, tree: dict[str, Any], kind: type[_W]) -> _W:
        try:
            return msgspec.convert(tree, kind, strict=False)
        except msgspec.ValidationError as exc:
            raise self._client.error(
                MallProtocolError, api=api, message=f"unexpected response: {self._clean(str(exc))}"
            ) from exc

    def _error_detail(self, raw: bytes) -> tuple[str, str]:
        """``(code, message)`` from an error body, or blanks when it is not au PAY XML."""
        try:
            root = SafeET.fromstring(raw)
        except (ET.ParseError, defusedxml.DefusedXmlException):
            return "", ""
        error = root.find("./result/error")
        if error is None:
            return "", ""
        return (error.findtext("code") or "").strip(), (error.findtext("message") or "").strip()

    # -- credentials -------------------------------------------------------------------

    async def check_credentials(self) -> None:
        """``searchStocks`` for one row: the cheapest authenticated read.

        The answer is decoded like any other, so a mangled body is a protocol error
        here too rather than a false "the key works".
        """
        tree = await self._call(
            API_SEARCH_STOCKS,
            params={"shopId": self._shop_id(), "totalCount": "1", "startCount": "1"},
        )
        found = self._convert(API_SEARCH_STOCKS, tree, _StocksResponse).search_result
        if found is not None:
            self._count(API_SEARCH_STOCKS, found.max_count)
            for row in found.result_stocks:
                self._row_counts(row)

    async def credential_expiry(self) -> float | None:
        """Issue date (credential field ``issued_at``, JST) + 90 days; None if absent."""
        secret = self._ctx.credentials.get(ISSUED_FIELD)
        if secret is None or not secret.reveal().strip():
            return None
        issued = _parse_jst(secret.reveal()[:10].replace("/", "-"))
        return None if issued is None else issued + KEY_LIFETIME_S

    # -- orders ------------------------------------------------------------------------

    def _decode_cursor(self, cursor: str | None, now: float) -> _CursorState:
        if cursor:
            try:
                return msgspec.json.decode(cursor, type=_CursorState)
            except DECODE_ERRORS:
                pass
            try:
                # A bare timestamp (an operator reset, or another tool's cursor).
                end = float(cursor)
            except ValueError:
                end = None
            if end is not None and math.isfinite(end):
                return _CursorState(v=1, floor=end - self._overlap_s, end=end, stamp=0.0)
        floor = now - self._initial_lookback_s
        return _CursorState(v=1, floor=floor, end=floor + self._overlap_s, stamp=0.0)

    async def fetch_orders(self, cursor: str | None) -> OrderPage:
        """Every order line ordered since the floor and young enough to still change.

        The window is ``[max(floor, min(cursor end - overlap, now - change lookback)),
        now]`` by order date (JST days; the API has no finer filter). ``floor`` is set
        by the first poll (``now - initial_lookback_s``) and kept, so the change lookback
        never pulls in orders from before goqd took over. Orders placed before the floor
        are dropped client-side (``orderDate`` has minute precision, hence the 60 s).

        Every time here is au PAY's (its clock as its responses show it), so a skew
        between the clocks never moves the window past orders. A cursor later than au
        PAY's clock now was written by another clock: its end is not used, and its floor
        moves back to the initial look-back (goqd.malls.clock).
        """
        began = self._ctx.clock()
        clock = self._ctx.mall_clock
        now = clock.ceil(began)
        state = self._decode_cursor(cursor, now)
        window = clock.window(
            began,
            state.end if cursor else None,
            overlap=self._overlap_s,
            initial_lookback=self._initial_lookback_s,
        )
        floor = min(state.floor, window.start) if window.reset else state.floor
        start = max(floor, min(window.start, now - self._change_lookback_s))
        params = {
            "shopId": self._shop_id(),
            "totalCount": str(self._order_page),
            "startDate": _jst_date(start),
            "endDate": _jst_date(now),
            "dateType": "0",  # 受注日
        }
        high = state.stamp
        lines: dict[tuple[str, str], OrderLine] = {}
        seen_now: dict[str, _Seen] = {}
        orders_seen = 0
        start_count = 1
        for _ in range(_MAX_PAGES):
            tree = await self._call(API_ORDERS, params={**params, "startCount": str(start_count)})
            page_time = self._ctx.clock()
            page = self._convert(API_ORDERS, tree, _OrdersResponse)
            for info in page.order_info:
                orders_seen += 1
                ordered_at = _parse_jst(info.order_date)
                if ordered_at is None:
                    raise self._client.error(
                        MallProtocolError,
                        api=API_ORDERS,
                        message=f"order {info.order_id}: orderDate {info.order_date!r}",
                    )
                if ordered_at + 60 <= floor:
                    continue
                seen = self._stamp(info, ordered_at, page_time, high)
                seen_now[info.order_id] = seen
                high = max(high, seen.stamp)
                for line in self._lines(info, seen.stamp):
                    lines[(line.order_id, line.line_id)] = line
            # resultCount is the page's count [V]; some clients read it as the total, so
            # a short page also ends the walk.
            if page.result_count < self._order_page or len(page.order_info) < self._order_page:
                break
            start_count += self._order_page
        else:
            raise self._client.error(
                MallProtocolError, api=API_ORDERS, message=f"more than {_MAX_PAGES} pages"
            )
        # Orders that left the window can no longer be observed: forget them.
        self._seen = seen_now
        # Never later than au PAY's time when the search ran.
        done = clock.cursor_after(began, now)
        new_cursor = _CursorState(v=1, floor=floor, end=done, stamp=high)
        return OrderPage(
            lines=tuple(lines.values()),
            cursor=msgspec.json.encode(new_cursor).decode(),
            orders_seen=orders_seen,
        )

    def _stamp(self, info: _OrderInfo, ordered_at: float, page_time: float, high: float) -> _Seen:
        """The order's updated_at: see the module docstring."""
        fingerprint = (
            info.order_status,
            tuple(
                (d.order_detail_id, d.item_code, d.item_management_id, d.unit, d.item_cancel_status)
                for d in info.detail
            ),
        )
        previous = self._seen.get(info.order_id)
        if previous is not None and previous.fingerprint == fingerprint:
            return previous
        # First sight in this process: at least every stamp already handed out (the
        # ledger may hold one from before a restart). A change: strictly later.
        floor = high if previous is None else previous.stamp + 0.001
        stamp = max(page_time, ordered_at, floor)
        seen = _Seen(fingerprint, stamp)
        self._seen[info.order_id] = seen
        return seen

    def _link_code(self, item_code: str, child: str) -> str:
        if self._link_field == "item_code":
            return item_code
        if self._link_field == "concat":
            return item_code + _real_code(child)
        return listing_key_for(item_code, child)

    def _lines(self, info: _OrderInfo, stamp: float) -> Iterator[OrderLine]:
        status = info.order_status.strip()
        if status in self._live:
            order_cancelled = False
        elif status in self._cancel:
            order_cancelled = True
        else:
            return
        terminal = order_cancelled and status in TERMINAL_CANCEL_STATUSES
        for d in info.detail:
            if not d.order_detail_id.strip() or not d.item_code.strip():
                raise self._client.error(
                    MallProtocolError,
                    api=API_ORDERS,
                    message=f"order {info.order_id}: detail without ids",
                )
            item_code = d.item_code.strip()
            child = _real_code(d.item_management_id)
            line_cancelled = d.item_cancel_status.strip() in self._item_cancel_values
            yield OrderLine(
                order_id=info.order_id.strip(),
                line_id=d.order_detail_id.strip(),
                listing_key=listing_key_for(item_code, child),
                link_code=self._link_code(item_code, child),
                quantity=d.unit,
                cancelled=order_cancelled or line_cancelled,
                # A line cancelled on its own is not known to be final [I].
                terminal=terminal,
                updated_at=stamp,
                status=status,
            )

    # -- stock reads -------------------------------------------------------------------

    async def _search_stocks(self, item_code: str | None = None) -> AsyncIterator[_ResultStock]:
        """Every ``resultStocks`` row (``itemCode`` filters by partial match [V])."""
        base = {"shopId": self._shop_id(), "totalCount": str(self._stock_page)}
        if item_code is not None:
            base["itemCode"] = item_code
        start = 1
        for _ in range(_MAX_PAGES):
            tree = await self._call(API_SEARCH_STOCKS, params={**base, "startCount": str(start)})
            found = self._convert(API_SEARCH_STOCKS, tree, _StocksResponse).search_result
            rows = found.result_stocks if found is not None else []
            for row in rows:
                yield row
            total = self._count(API_SEARCH_STOCKS, found.max_count if found else "")
            if len(rows) < self._stock_page or (total is not None and start + len(rows) > total):
                return
            start += self._stock_page
        raise self._client.error(
            MallProtocolError, api=API_SEARCH_STOCKS, message=f"more than {_MAX_PAGES} pages"
        )

    async def _search_items(self) -> AsyncIterator[_ResultItem]:
        base = {"shopId": self._shop_id(), "totalCount": str(self._item_page)}
        start = 1
        for _ in range(_MAX_PAGES):
            tree = await self._call(API_SEARCH_ITEMS, params={**base, "startCount": str(start)})
            found = self._convert(API_SEARCH_ITEMS, tree, _ItemsResponse).search_result
            rows = found.result_items if found is not None else []
            for row in rows:
                yield row
            total = self._count(API_SEARCH_ITEMS, found.max_count if found else "")
            if len(rows) < self._item_page or (total is not None and start + len(rows) > total):
                return
            start += self._item_page
        raise self._client.error(
            MallProtocolError, api=API_SEARCH_ITEMS, message=f"more than {_MAX_PAGES} pages"
        )

    def _count(self, api: str, text: str) -> int | None:
        text = text.strip()
        if not text:
            return None
        if not text.isdigit():
            raise self._client.error(
                MallProtocolError,
                api=api,
                message=f"maxCount {self._clean(text)!r} is not a number",
            )
        return int(text)

    def _plain_count(self, row: _ResultStock) -> int:
        text = row.stock_count.strip()
        if not text.isdigit():
            raise self._client.error(
                MallProtocolError,
                api=API_SEARCH_STOCKS,
                message=f"{row.item_code}: stockCount {self._clean(text)!r}",
            )
        return int(text)

    def _row_counts(self, row: _ResultStock) -> dict[str, int]:
        """listing_key -> count for one ``resultStocks`` row; remembers choice codes."""
        item_code = row.item_code.strip()
        if not row.choices_stocks:
            if row.stock_segment.strip() == "2":
                return {}  # choice stock with no choice set up yet: nothing to count
            return {item_code: self._plain_count(row)}
        counts: dict[str, int] = {}
        for cs in row.choices_stocks:
            h, v = cs.choices_stock_horizontal_code, cs.choices_stock_vertical_code
            child = child_code(h, v)
            if not child:
                raise self._client.error(
                    MallProtocolError,
                    api=API_SEARCH_STOCKS,
                    message=f"{item_code}: choice without codes",
                )
            key = listing_key_for(item_code, child)
            self._choice_codes[key] = (h.strip(), v.strip())
            counts[key] = cs.choices_stock_count
        return counts

    async def read_stock(self, listing_keys: Sequence[str]) -> dict[str, int | None]:
        """Counts from ``searchStocks``: per item for a few items, else one full walk."""
        wanted = set(listing_keys)
        item_codes = {split_listing_key(k)[0] for k in wanted}
        counts: dict[str, int | None] = {}

        async def take(rows: AsyncIterator[_ResultStock]) -> None:
            async for row in rows:
                if row.item_code.strip() not in item_codes:
                    continue  # partial-match neighbours, or items nobody asked for
                for key, count in self._row_counts(row).items():
                    if key in wanted:
                        counts[key] = count

        if len(item_codes) <= self._read_single_max:
            for code in sorted(item_codes):
                await take(self._search_stocks(code))
        else:
            await take(self._search_stocks())
        return counts

    async def iter_listings(self) -> AsyncIterator[MallListing]:
        """Every plain item and every choice of every item, with counts and choice codes.

        Names come from ``searchItemInfos`` [V-secondary: used by a public client with
        ``totalCount``/``startCount`` and ``searchResult/resultItems``]; choice names are
        appended from ``choicesStockHorizontalName``/``VerticalName`` when present.
        """
        names: dict[str, str] = {}
        if self._fetch_names:
            async for item in self._search_items():
                names[item.item_code.strip()] = item.item_name.strip()
        async for row in self._search_stocks():
            item_code = row.item_code.strip()
            name = names.get(item_code, "")
            if not row.choices_stocks:
                if row.stock_segment.strip() == "2":
                    continue  # choice stock with no choice set up yet: nothing to list
                yield MallListing(
                    listing_key=item_code,
                    link_code=self._link_code(item_code, ""),
                    name=name,
                    quantity=self._plain_count(row),
                )
                continue
            counts = self._row_counts(row)
            for cs in row.choices_stocks:
                h = cs.choices_stock_horizontal_code.strip()
                v = cs.choices_stock_vertical_code.strip()
                child = child_code(h, v)
                key = listing_key_for(item_code, child)
                label = "/".join(
                    n.strip()
                    for n in (cs.choices_stock_horizontal_name, cs.choices_stock_vertical_name)
                    if n.strip() and n.strip() != "-"
                )
                yield MallListing(
                    listing_key=key,
                    link_code=self._link_code(item_code, child),
                    name=f"{name} {label}".strip(),
                    quantity=counts[key],
                    attrs=ListingAttrs(
                        extra={"item_code": item_code, "choice_h": h, "choice_v": v}
                    ),
                )

    # -- stock pushes ------------------------------------------------------------------

    async def push_stock(self, items: Sequence[PushItem]) -> list[PushOutcome]:
        """Absolute counts via ``updateStock``, per-item results honoured.

        All choices of one item pushed together go in one ``stockUpdateItem`` (no
        request names an item twice, so every per-item result is unambiguous). When the
        mall refuses such a multi-choice item, each choice is resent on its own so that
        only the refused choice is reported refused.
        """
        outcomes: dict[int, PushOutcome] = {}
        batch = max(1, self.limits.push_batch)
        for offset in range(0, len(items), batch):
            chunk = list(enumerate(items[offset : offset + batch], start=offset))
            await self._push_chunk(chunk, outcomes)
        return [outcomes[i] for i in range(len(items))]

    def _outcome(
        self, entry: _Entry, accepted: bool, code: str = "", message: str = ""
    ) -> PushOutcome:
        return push_outcome(
            entry.item,
            accepted=accepted,
            code=code,
            message=message,
            quantity=entry.quantity,
        )

    async def _choice_for(self, item: PushItem) -> tuple[str, str] | None:
        extra = item.attrs.extra
        if "choice_h" in extra or "choice_v" in extra:
            return extra.get("choice_h", "-") or "-", extra.get("choice_v", "-") or "-"
        cached = self._choice_codes.get(item.listing_key)
        if cached is None:
            # Registered from an order line, never imported: ask the mall once.
            item_code, _ = split_listing_key(item.listing_key)
            async for row in self._search_stocks(item_code):
                if row.item_code.strip() == item_code and row.choices_stocks:
                    self._row_counts(row)
            cached = self._choice_codes.get(item.listing_key)
        return cached

    async def _push_chunk(
        self, chunk: list[tuple[int, PushItem]], outcomes: dict[int, PushOutcome]
    ) -> None:
        plain: list[_Group] = []
        choices: dict[str, _Group] = {}
        for index, item in chunk:
            item_code, child = split_listing_key(item.listing_key)
            quantity = max(0, item.quantity)
            if not child:
                entry = _Entry(index, item, item_code, quantity, None)
                plain.append(_Group(item_code, [entry]))
                continue
            codes = await self._choice_for(item)
            entry = _Entry(index, item, item_code, quantity, codes)
            if codes is None:
                outcomes[index] = self._outcome(
                    entry,
                    False,
                    "choice_unknown",
                    f"{item_code} has no choice {child!r} in searchStocks; re-import the store",
                )
                continue
            choices.setdefault(item_code, _Group(item_code)).entries.append(entry)
        pending = plain + list(choices.values())
        while pending:
            request, pending = self._take_request(pending)
            errors = await self._send_update(request)
            for group in request:
                error = errors.get(group.item_code)
                if error is None:
                    for entry in group.entries:
                        outcomes[entry.index] = self._outcome(entry, True)
                elif len(group.entries) > 1:
                    # Which choice did the mall refuse? Ask once per choice.
                    pending.extend(_Group(group.item_code, [e]) for e in group.entries)
                else:
                    code, message = error
                    outcomes[group.entries[0].index] = self._outcome(
                        group.entries[0], False, code or "refused", message
                    )

    def _take_request(self, pending: list[_Group]) -> tuple[list[_Group], list[_Group]]:
        """Groups for one call: each itemCode at most once, at most push_batch of them."""
        request: list[_Group] = []
        rest: list[_Group] = []
        codes: set[str] = set()
        for group in pending:
            if group.item_code in codes or len(request) >= max(1, self.limits.push_batch):
                rest.append(group)
            else:
                codes.add(group.item_code)
                request.append(group)
        return request, rest

    def _update_body(self, groups: Sequence[_Group]) -> bytes:
        root = ET.Element("request")
        ET.SubElement(root, "shopId").text = self._shop_id()
        for group in groups:
            node = ET.SubElement(root, "stockUpdateItem")
            ET.SubElement(node, "itemCode").text = group.item_code
            if not group.is_choice:
                ET.SubElement(node, "stockSegment").text = "1"  # 通常在庫
                ET.SubElement(node, "stockCount").text = str(group.entries[0].quantity)
                continue
            ET.SubElement(node, "stockSegment").text = "2"  # 項目選択肢別在庫
            for entry in group.entries:
                h, v = entry.choice or ("-", "-")
                cs = ET.SubElement(node, "choicesStocks")
                ET.SubElement(cs, "choicesStockHorizontalCode").text = h
                ET.SubElement(cs, "choicesStockVerticalCode").text = v
                ET.SubElement(cs, "choicesStockCount").text = str(entry.quantity)
        body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
        return body

    async def _send_update(self, groups: Sequence[_Group]) -> dict[str, tuple[str, str]]:
        """itemCode -> (code, message) for every item the mall refused."""
        tree = await self._call(API_UPDATE_STOCK, body=self._update_body(groups))
        response = self._convert(API_UPDATE_STOCK, tree, _UpdateResponse)
        sent = {g.item_code for g in groups}
        errors: dict[str, tuple[str, str]] = {}
        for result in response.update_result:
            if result.error is None:
                continue
            item_code = result.item_code.strip()
            if not item_code and len(sent) == 1:
                item_code = next(iter(sent))
            if item_code in sent:
                errors[item_code] = (
                    self._clean(result.error.code),
                    self._clean(result.error.message),
                )
        if response.result.status != 0 and not errors:
            # Not about any one item (auth, size, maintenance): the whole call failed.
            err = response.result.error or _Error()
            raise self._mall_error(API_UPDATE_STOCK, err.code, err.message, _ANSWERED)
        return errors


SPEC = MallSpec(
    name=MALL,
    title="au PAY マーケット",
    open_adapter=AupayAdapter,
    limits=MallLimits(push_batch=200, read_batch=1000, min_poll_interval=60.0),
    credential_fields=("api_key", "shop_id"),
    optional_fields=(ISSUED_FIELD,),
    secret_fields=("api_key",),
    options={
        "push_batch": opt_integer(200, 1, 1000),
        "read_batch": opt_integer(1000, 1, 10_000),
        "min_poll_interval": opt_number(60, 1, 86400),
        "rate_per_s": opt_number(1.0, 0.01, 100),
        "overlap_s": opt_number(600, 0, 30 * 86400),
        "initial_lookback_s": opt_number(86400, 0, 730 * 86400),
        "change_lookback_days": opt_number(14, 0, 365),
        "page_size": opt_integer(500, 1, 1000),
        "stock_page_size": opt_integer(500, 1, 1000),
        "items_page_size": opt_integer(100, 1, 1000),
        "read_single_max": opt_integer(3, 0, 1000),
        "fetch_names": opt_flag(True),
        "max_body_bytes": opt_integer(MAX_BODY_BYTES, 1024, 256 * 1024 * 1024),
        "retry_after_default": opt_number(5.0, 0, 600),
        "auth_error_codes": opt_codes(DEFAULT_AUTH_CODES),
        "item_cancel_values": opt_codes(DEFAULT_ITEM_CANCEL_VALUES),
        "link_field": opt_choice("listing_key", *_LINK_FIELDS),
    },
    default_live_statuses=LIVE_STATUSES,
    default_cancel_statuses=CANCEL_STATUSES,
    expiry=KeyExpiry(
        credential="API key (APIキー, 90 days)",
        field=ISSUED_FIELD,
        lifetime_s=KEY_LIFETIME_S,
        renewal=(
            "re-issue the API key in Wow!manager (各種お申し込み → API利用申請; APIキー再発行), "
            "write api_key, shop_id and issued_at (YYYY-MM-DD) to a JSON file and run "
            "`goqctl key set {store} --file new.json`"
        ),
    ),
)
