"""Simulated au PAY マーケット (Wow!manager shop API) for tests, ``goqd demo`` and ``goqd sim``.

Speaks the real wire format on the real paths (``/wmshopapi/<method>``), so the base URL
is the only difference an adapter sees: ``searchTradeInfoListProc`` (GET, XML),
``updateStock`` (POST XML, plain stock and 項目選択肢別 choice stock, per-item results),
``searchStocks`` and ``searchItemInfos`` (GET, XML). Auth is ``Authorization: Bearer
<API key>``; keys are issued on the simulator's wall clock and stop working 90 days
later, or at once after ``expire_credentials()``.

Facts are from docs/malls.md §4. What is assumed [I] is a constructor argument:

* error codes (``CODE_*`` below) and the HTTP status of an auth failure
  (``auth_error_status``, 401);
* throttling: a per-API token bucket (``rate_limit`` per second, ``rate_burst``) answered
  with HTTP 429, ``Retry-After`` and an XML error body;
* maintenance: HTTP 503 with an XML error body; 5xx faults: an HTML page;
* ``updateStock``: at most ``update_max`` items (200, [V-secondary]); an unknown item code
  or choice is a per-item error and that item is not applied (each item is atomic, the
  others go through); ``<status>`` is 1 when any item failed (``status_on_item_error``);
* ``searchTradeInfoListProc``: at most ``order_page_max`` per page; ``resultCount`` is the
  page's count; no results is status 0 with ``resultCount`` 0;
* a line cancelled on its own shows ``itemCancelStatus`` = ``item_cancel_value``.

Listing keys follow the adapter: plain items are keyed by ``itemCode``, choices by
``itemCode/child`` with ``child`` = horizontal + vertical code ("-" and "" dropped); a
listing's ``attrs`` hold ``item_code``, ``choice_h`` and ``choice_v``.

Like every simulator, it listens on loopback only and never reaches a real mall host.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Unpack
from xml.etree.ElementTree import Element  # the type defusedxml returns; never parses
from xml.sax.saxutils import escape

import defusedxml
import defusedxml.ElementTree as SafeET
import trio

from goqd.sim.base import ApiKeyArgs, ApiKeyMall, RatePlan, SimListing, SimOrder, SimSpec
from goqd.sim.http import XML_TYPE, Request, Response

JST = dt.timezone(dt.timedelta(hours=9), "JST")

# [I] error codes: the real list is not published.
CODE_BAD_PARAM = "PME0001"
CODE_AUTH = "PME0106"
CODE_SHOP = "PME0107"
CODE_NOT_FOUND = "PME0201"
CODE_ITEM_UNKNOWN = "PME0203"
CODE_CHOICE_UNKNOWN = "PME0204"
CODE_BAD_STOCK = "PME0205"
CODE_SEGMENT = "PME0206"
CODE_TOO_MANY = "PME0301"
CODE_MAINTENANCE = "PME9001"
CODE_THROTTLED = "PME9002"

MESSAGE_AUTH = "認証に失敗しました。APIキーの有効期限と接続元IPアドレスを確認してください。"

LIVE_FLOW = ["新規受付", "発送待ち", "完了"]
MAX_STOCK = 99999


def _real(code: str) -> str:
    code = code.strip()
    return "" if code in ("", "-") else code


def _el(tag: str, value: object) -> str:
    return f"<{tag}>{escape(str(value))}</{tag}>"


def _doc(inner: str) -> str:
    return f'<?xml version="1.0" encoding="UTF-8"?><response>{inner}</response>'


def _ok(inner: str = "") -> str:
    return _doc("<result><status>0</status></result>" + inner)


def _wrong_type(text: str) -> str:
    numeric = r"<(unit|stockCount|choicesStockCount|resultCount|maxCount)>[^<]*</\1>"
    mangled, n = re.subn(numeric, r"<\1>many</\1>", text)
    if n == 0:
        mangled = re.sub(r"<status>[^<]*</status>", "<status>ok</status>", text)
    return mangled


def _parse_date(text: str) -> dt.date | None:
    for fmt in ("%Y%m%d", "%Y-%m-%d", "%Y/%m/%d"):
        try:
            return dt.datetime.strptime(text.strip(), fmt).date()
        except ValueError:
            continue
    return None


Route = Callable[[Request], Awaitable[Response]]


class SimAupay(ApiKeyMall):
    """A simulated au PAY マーケット shop. See the module docstring for the assumptions."""

    mall = "aupay"

    def __init__(
        self,
        *,
        auth_error_status: int = 401,
        rate_limit: float = 1.0,
        rate_burst: float = 2.0,
        update_max: int = 200,
        order_page_max: int = 1000,
        stock_page_max: int = 500,
        item_page_max: int = 500,
        status_on_item_error: int = 1,
        item_cancel_value: str = "キャンセル",
        **base: Unpack[ApiKeyArgs],
    ) -> None:
        super().__init__(**base)
        self.auth_error_status = auth_error_status
        self.rate_limit = rate_limit
        self.rate_burst = rate_burst
        self.update_max = update_max
        self.order_page_max = order_page_max
        self.stock_page_max = stock_page_max
        self.item_page_max = item_page_max
        self.status_on_item_error = status_on_item_error
        self.item_cancel_value = item_cancel_value
        self.update_calls = 0
        self._current_key = ""
        self._order_serial = 10_000_000
        self._detail_serial = 90_000_000
        self._lots: dict[str, int] = {}
        self._routes: dict[tuple[str, str], Route] = {
            ("GET", "searchTradeInfoListProc"): self._search_orders,
            ("GET", "searchStocks"): self._search_stocks,
            ("GET", "searchItemInfos"): self._search_items,
            ("POST", "updateStock"): self._update_stock,
        }
        self.issue_credentials()

    # -- statuses and ids --------------------------------------------------------------

    def initial_status(self) -> str:
        return LIVE_FLOW[0]

    def cancelled_status(self) -> str:
        return "キャンセル"

    def status_flow(self) -> list[str]:
        return list(LIVE_FLOW)

    def new_order_id(self) -> str:
        self._order_serial += 1
        return str(self._order_serial)

    def line_id_for(self, order: SimOrder, n: int) -> str:
        # orderDetailId is unique across the shop, not per order [V: used as a key].
        self._detail_serial += 1
        return str(self._detail_serial)

    # -- catalogue ---------------------------------------------------------------------

    def _lot(self, item_code: str) -> int:
        return self._lots.setdefault(item_code, 700_000_000 + len(self._lots) + 1)

    def add_item(self, item_code: str, quantity: int, *, name: str = "") -> SimListing:
        """A plain-stock item (通常在庫)."""
        self._lot(item_code)
        return self.add_listing(
            item_code, name=name or item_code, quantity=quantity, attrs={"item_code": item_code}
        )

    def add_choice_item(
        self, item_code: str, choices: Iterable[tuple[str, str, int]], *, name: str = ""
    ) -> list[str]:
        """An item with 項目選択肢別在庫: ``(horizontal, vertical, count)`` per choice.

        Returns the listing keys (``itemCode/child``) in the order given.
        """
        self._lot(item_code)
        keys = []
        for h, v, count in choices:
            child = _real(h) + _real(v)
            if not child:
                raise ValueError("a choice needs a horizontal or vertical code")
            key = f"{item_code}/{child}"
            self.add_listing(
                key,
                name=name or item_code,
                quantity=count,
                attrs={"item_code": item_code, "choice_h": h, "choice_v": v},
            )
            keys.append(key)
        return keys

    @staticmethod
    def _item_code(listing: SimListing) -> str:
        return listing.attrs.get("item_code") or listing.listing_key.partition("/")[0]

    def _items(self) -> dict[str, list[SimListing]]:
        """itemCode -> its listings, in catalogue order."""
        items: dict[str, list[SimListing]] = {}
        for listing in self.listings.values():
            items.setdefault(self._item_code(listing), []).append(listing)
        return items

    # -- order events beyond the base class ---------------------------------------------

    def cancel_line(self, order_id: str, line_id: str) -> None:
        """One line is cancelled (itemCancelStatus); the mall restores that line's stock."""
        order = self.orders[order_id]
        for line in order.lines:
            if line.line_id == line_id and not line.cancelled:
                line.cancelled = True
                listing = self.listings.get(line.listing_key)
                if listing is not None and listing.quantity is not None:
                    listing.quantity += line.quantity
        order.updated_at = self.clock()

    def reject_order(self, order_id: str) -> None:
        """Fraud review said no (審査NG): the order ends and the mall restores its stock."""
        self.cancel_order(order_id)
        self.orders[order_id].status = "審査NG"

    # -- credentials -------------------------------------------------------------------

    def issue_credentials(self) -> dict[str, str]:
        """A new API key, as an operator copies it from Wow!manager (valid 90 days)."""
        key = "".join(f"{self.rng.getrandbits(8):02x}" for _ in range(32))
        self.add_key(key)
        self._current_key = key
        return self._credential_dict(key)

    def credentials(self) -> dict[str, str]:
        """The key issued last, or a new one once that has stopped working."""
        if not self.key_valid(self._current_key):
            return self.issue_credentials()
        return self._credential_dict(self._current_key)

    def _credential_dict(self, key: str) -> dict[str, str]:
        issued = self._keys[key] - self.key_lifetime_s
        day = dt.datetime.fromtimestamp(issued, JST).strftime("%Y-%m-%d")
        return {"api_key": key, "shop_id": self.shop_id, "issued_at": day}

    # -- HTTP --------------------------------------------------------------------------

    def api_name(self, request: Request) -> str:
        return request.path.rstrip("/").rpartition("/")[2]

    def _error(self, status: int, code: str, message: str, **headers: str) -> Response:
        body = _doc(
            "<result><status>1</status><error>"
            + _el("code", code)
            + _el("message", message)
            + "</error></result>"
        )
        return Response.xml(body, status=status, headers=headers or None)

    # Guard hooks: Wow!manager's answers in its <response><result> error format.

    def route_refusal(self, request: Request, api: str) -> Response | None:
        if request.path.startswith("/wmshopapi/") and (request.method, api) in self._routes:
            return None
        return self._error(404, CODE_NOT_FOUND, "指定されたAPIは存在しません。")

    def maintenance_reply(self, api: str) -> Response:
        return self._error(503, CODE_MAINTENANCE, "ただいまシステムメンテナンス中です。")

    def server_error_reply(self, api: str) -> Response:
        # [I] the web server's own page, not the API's XML.
        return Response(
            500,
            "<html><body><h1>500 Internal Server Error</h1></body></html>",
            content_type="text/html; charset=utf-8",
        )

    def auth_refusal(self, request: Request, api: str, *, expired: bool) -> Response | None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if expired or scheme != "Bearer" or not self.key_valid(key.strip()):
            return self._error(self.auth_error_status, CODE_AUTH, MESSAGE_AUTH)
        return None

    def rate_plan(self, api: str) -> RatePlan | None:
        return RatePlan(self.rate_limit, self.rate_burst)

    def throttle_reply(self, api: str, wait: float, *, cost: float, forced: bool) -> Response:
        # [I] The mall's own limit says the interval it allows; a forced one the plan's.
        retry_after = wait if forced else max(1.0, 1.0 / self.rate_limit)
        return self._error(
            429,
            CODE_THROTTLED,
            "リクエストが集中しています。しばらく時間をおいて再度お試しください。",
            **{"retry-after": f"{retry_after:g}"},
        )

    busy_page = (
        "<html><head><title>au PAY マーケット</title></head>"
        "<body>ただいまアクセスが集中しています。</body></html>"
    )

    async def handle(self, request: Request, api: str) -> Response:
        response = await self._routes[(request.method, api)](request)
        if not self.faults.malformed or response.status != 200:
            return response
        return self.reply_ok(
            response.body.decode("utf-8"),
            str,
            drop_field=lambda text: re.sub(r"<status>[^<]*</status>", "", text),
            wrong_type=_wrong_type,
            content_type=XML_TYPE,
        )

    def _check_shop(self, shop_id: str) -> Response | None:
        if shop_id.strip() != self.shop_id:
            return self._error(200, CODE_SHOP, "店舗IDが一致しません。")
        return None

    def _paging(self, request: Request, maximum: int) -> tuple[int, int] | Response:
        try:
            size = int(request.arg("totalCount", "10"))
            start = int(request.arg("startCount", "1"))
        except ValueError:
            return self._error(200, CODE_BAD_PARAM, "totalCount/startCountが不正です。")
        if not 1 <= size <= maximum or start < 1:
            return self._error(200, CODE_BAD_PARAM, f"totalCountは1～{maximum}で指定してください。")
        return start, size

    # -- searchTradeInfoListProc -------------------------------------------------------

    def _order_date(self, order: SimOrder) -> dt.datetime:
        return dt.datetime.fromtimestamp(order.created_at, JST)

    async def _search_orders(self, request: Request) -> Response:
        refused = self._check_shop(request.arg("shopId"))
        if refused is not None:
            return refused
        paging = self._paging(request, self.order_page_max)
        if isinstance(paging, Response):
            return paging
        start, size = paging
        first = _parse_date(request.arg("startDate"))
        last = _parse_date(request.arg("endDate"))
        if first is None or last is None:
            return self._error(200, CODE_BAD_PARAM, "startDate/endDateが不正です。")
        wanted_status = request.arg("orderStatus")
        selected = sorted(
            (
                o
                for o in self.orders.values()
                if first <= self._order_date(o).date() <= last
                and (not wanted_status or o.status == wanted_status)
            ),
            key=lambda o: (o.created_at, o.order_id),
        )
        page = selected[start - 1 : start - 1 + size]
        return Response.xml(
            _ok(_el("resultCount", len(page)) + "".join(self._order_xml(o) for o in page))
        )

    def _order_xml(self, order: SimOrder) -> str:
        parts = [
            _el("orderId", order.order_id),
            _el("orderDate", self._order_date(order).strftime("%Y/%m/%d %H:%M")),
            _el("sellMethodSegment", 1),
            _el("orderStatus", order.status),
        ]
        for line in order.lines:
            listing = self.listings.get(line.listing_key)
            item_code = line.listing_key.partition("/")[0]
            child = line.listing_key.partition("/")[2]
            option = ""
            if listing is not None:
                item_code = self._item_code(listing)
                h, v = listing.attrs.get("choice_h", ""), listing.attrs.get("choice_v", "")
                option = "/".join(c for c in (_real(h), _real(v)) if c)
            parts.append(
                "<detail>"
                + _el("orderDetailId", line.line_id)
                + _el("itemManagementId", child)
                + _el("itemCode", item_code)
                + _el("lotnumber", self._lots.get(item_code, ""))
                + _el("itemName", listing.name if listing else item_code)
                + _el("itemOption", option)
                + _el("itemCancelStatus", self.item_cancel_value if line.cancelled else "")
                + _el("unit", line.quantity)
                + _el("itemPrice", 1000)
                + "</detail>"
            )
        return "<orderInfo>" + "".join(parts) + "</orderInfo>"

    # -- searchStocks / searchItemInfos ------------------------------------------------

    def _matching_items(self, request: Request) -> list[tuple[str, list[SimListing]]]:
        code = request.arg("itemCode")
        lot = request.arg("lotNumber")
        return [
            (item_code, listings)
            for item_code, listings in self._items().items()
            if (not code or code in item_code)  # partial match [V-secondary]
            and (not lot or lot == str(self._lots.get(item_code, "")))
        ]

    async def _search_stocks(self, request: Request) -> Response:
        refused = self._check_shop(request.arg("shopId"))
        if refused is not None:
            return refused
        paging = self._paging(request, self.stock_page_max)
        if isinstance(paging, Response):
            return paging
        start, size = paging
        items = self._matching_items(request)
        rows = []
        for item_code, listings in items[start - 1 : start - 1 + size]:
            head = _el("lotNumber", self._lots.get(item_code, "")) + _el("itemCode", item_code)
            if len(listings) == 1 and "choice_h" not in listings[0].attrs:
                count = listings[0].quantity or 0
                rows.append(
                    f"<resultStocks>{head}{_el('stockSegment', 1)}"
                    f"{_el('stockCount', count)}</resultStocks>"
                )
                continue
            choices = "".join(
                "<choicesStocks>"
                + _el("choicesStockHorizontalCode", c.attrs.get("choice_h", "-"))
                + _el("choicesStockHorizontalName", _real(c.attrs.get("choice_h", "")))
                + _el("choicesStockVerticalCode", c.attrs.get("choice_v", "-"))
                + _el("choicesStockVerticalName", _real(c.attrs.get("choice_v", "")))
                + _el("choicesStockCount", c.quantity or 0)
                + "</choicesStocks>"
                for c in listings
            )
            rows.append(f"<resultStocks>{head}{_el('stockSegment', 2)}{choices}</resultStocks>")
        body = _el("maxCount", len(items)) + "".join(rows)
        return Response.xml(_ok(f"<searchResult>{body}</searchResult>"))

    async def _search_items(self, request: Request) -> Response:
        refused = self._check_shop(request.arg("shopId"))
        if refused is not None:
            return refused
        paging = self._paging(request, self.item_page_max)
        if isinstance(paging, Response):
            return paging
        start, size = paging
        items = self._matching_items(request)
        rows = "".join(
            "<resultItems>"
            + _el("lotNumber", self._lots.get(item_code, ""))
            + _el("itemCode", item_code)
            + _el("itemName", listings[0].name)
            + _el("itemPrice", 1000)
            + _el("saleStatus", 1)
            + "</resultItems>"
            for item_code, listings in items[start - 1 : start - 1 + size]
        )
        body = _el("maxCount", len(items)) + rows
        return Response.xml(_ok(f"<searchResult>{body}</searchResult>"))

    # -- updateStock -------------------------------------------------------------------

    @staticmethod
    def _count(text: str | None) -> int | None:
        text = (text or "").strip()
        if not text.isdigit() or int(text) > MAX_STOCK:
            return None
        return int(text)

    def _check_item(self, node: Element) -> tuple[str, list[tuple[SimListing, int]] | str]:
        """``(itemCode, [(listing, count)])`` to apply, or ``(itemCode, error message)``.

        The error message starts with the code and a space.
        """
        item_code = (node.findtext("itemCode") or "").strip()
        if not item_code:
            return "", f"{CODE_BAD_PARAM} 商品コードが指定されていません。"
        listings = self._items().get(item_code)
        if not listings:
            return item_code, f"{CODE_ITEM_UNKNOWN} 指定された商品コードの商品が存在しません。"
        segment = (node.findtext("stockSegment") or "").strip()
        is_choice = "choice_h" in listings[0].attrs
        if segment == "1":
            if is_choice:
                return item_code, f"{CODE_SEGMENT} 在庫区分が商品の設定と一致しません。"
            count = self._count(node.findtext("stockCount"))
            if count is None:
                return item_code, f"{CODE_BAD_STOCK} 在庫数は0～{MAX_STOCK}で指定してください。"
            return item_code, [(listings[0], count)]
        if segment != "2":
            return item_code, f"{CODE_BAD_PARAM} 在庫区分が不正です。"
        if not is_choice:
            return item_code, f"{CODE_SEGMENT} 在庫区分が商品の設定と一致しません。"
        by_child = {
            _real(c.attrs.get("choice_h", "")) + _real(c.attrs.get("choice_v", "")): c
            for c in listings
        }
        updates: list[tuple[SimListing, int]] = []
        for cs in node.findall("choicesStocks"):
            h = cs.findtext("choicesStockHorizontalCode") or ""
            v = cs.findtext("choicesStockVerticalCode") or ""
            listing = by_child.get(_real(h) + _real(v))
            if listing is None:
                return item_code, f"{CODE_CHOICE_UNKNOWN} 指定された選択肢が存在しません。({h}{v})"
            count = self._count(cs.findtext("choicesStockCount"))
            if count is None:
                return item_code, f"{CODE_BAD_STOCK} 在庫数は0～{MAX_STOCK}で指定してください。"
            updates.append((listing, count))
        if not updates:
            return item_code, f"{CODE_BAD_PARAM} 選択肢別在庫が指定されていません。"
        return item_code, updates

    async def _update_stock(self, request: Request) -> Response:
        self.update_calls += 1
        try:
            root = SafeET.fromstring(request.body)
        except (SafeET.ParseError, defusedxml.DefusedXmlException):
            return self._error(400, CODE_BAD_PARAM, "リクエストXMLが不正です。")
        refused = self._check_shop(root.findtext("shopId") or "")
        if refused is not None:
            return refused
        nodes = root.findall("stockUpdateItem")
        if not nodes:
            return self._error(200, CODE_BAD_PARAM, "在庫更新商品が指定されていません。")
        if len(nodes) > self.update_max:
            return self._error(
                200, CODE_TOO_MANY, f"在庫更新商品は最大{self.update_max}件まで指定できます。"
            )
        results = []
        failed = False
        for node in nodes:
            item_code, outcome = self._check_item(node)
            if isinstance(outcome, str):
                failed = True
                code, _, message = outcome.partition(" ")
                results.append(
                    "<updateResult>"
                    + _el("itemCode", item_code)
                    + "<error>"
                    + _el("code", code)
                    + _el("message", message)
                    + "</error></updateResult>"
                )
                continue
            for listing, count in outcome:
                self.apply_stock(listing.listing_key, count)
            results.append("<updateResult>" + _el("itemCode", item_code) + "</updateResult>")
        status = self.status_on_item_error if failed else 0
        body = _doc(f"<result><status>{status}</status></result>" + "".join(results))
        if self.faults.timeout_after_apply:
            await trio.sleep(3600)
        return Response.xml(body)


__all__ = ["SimAupay"]


SIM = SimSpec("aupay", SimAupay)
