"""Simulated Yahoo!ショッピング: Store API (XML) and the YConnect v2 token endpoint.

Speaks the paths, headers, bodies and error shapes of docs/malls.md §2 so the
adapter in ``goqd/malls/yahoo.py`` talks to it exactly as to the real mall (only the base
URL differs; the token endpoint is served on the same base URL):

- ``POST /yconnect/v2/token`` (``grant_type=refresh_token``; client id/secret as form
  fields or Basic auth): JSON tokens; access tokens live 3600 s and refresh tokens 28
  days of the sim clock; ``{"error": "invalid_grant"}`` for a dead refresh token.
- ``/ShoppingWebService/V1/{orderCount,orderList,orderInfo,getStock,setStock,myItemList,
  stCategoryList}``: ``Authorization: Bearer`` checked (401 + ``WWW-Authenticate: Bearer
  error="invalid_token"`` when expired or revoked), the ``X-sws-signature`` decrypted with
  the private key this sim generated and compared with ``"<seller>:<unixtime>"``.
- ``orderCount`` takes ``sellerId`` (as Yahoo's GET order APIs document it, e.g.
  orderChangeHistory, and as the public clients calling orderCount send it) and refuses
  a call without it (``ed-00002``); the stock APIs' form posts take ``seller_id``.
- Errors are ``<Error><Message/><Code/></Error>``. Only ``px-04102`` (expired token) and
  ``ed-00002`` (parameter error) are codes seen in public sources; the other codes below
  are invented and marked [I].

Assumptions made configurable because the mall's behaviour is not documented:

- [I] the 1-query-per-second-per-URL rule [V] is enforced as a token bucket per path
  (``rate``, with ``rate_burst`` of slack for network jitter); going over locks that URL
  for ``lockout_s`` seconds, every request in the lock-out gets 429 + ``Retry-After``
  (remaining seconds) and the ``<Error>`` body ``rl-00001``.
- [I] ``getStock`` asked for a bare 商品コード of an item with 個別商品コード answers one
  row per sub code; unknown codes answer ``Status`` 0; rows carry ``AllowOverdraft``.
- [I] ``setStock`` takes ``allow_overdraft`` either as one value for the whole call or as a
  comma list; it stores the flag per item. Item codes outside the documented character set
  (half-width alphanumerics and '-', each part ≤ 99) make the whole call fail with an
  error naming the code. Unknown but well-formed codes are accepted silently [V/I].
- [I] status flow 2 (処理中) → 5 (完了), or 1 (予約中) → 2 → 5 with ``reservation=True``;
  cancellation is 4 with ``IsActive`` false.
- [I] a missing or bad signature is 401 with ``pk-00001`` (set ``require_signature=False``
  to accept unsigned calls, as the real mall does with a 12-hour refresh token).

Never listens on anything but loopback (``serve_sim`` enforces it).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Unpack

import defusedxml
import defusedxml.ElementTree as SafeET
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from goqd.sim.base import RatePlan, RefreshTokenMall, SimArgs, SimListing, SimOrder, SimSpec
from goqd.sim.http import XML_TYPE, Request, Response

JST = timezone(timedelta(hours=9))
STORE_API = "/ShoppingWebService/V1/"
TOKEN_PATH = "/yconnect/v2/token"
ACCESS_TOKEN_LIFETIME_S = 3600
REFRESH_TOKEN_LIFETIME_S = 28 * 86400
MAX_CODES = 1000  # getStock / setStock [V]
MAX_ITEM_LIST = 100  # myItemList results [V]

CODE_EXPIRED_TOKEN = "px-04102"  # [V-secondary: a client treats it as token expired]
CODE_PARAM = "ed-00002"  # [V: named on the getStock page; meaning I]
CODE_SIGNATURE = "pk-00001"  # [I]
CODE_SELLER = "ed-00001"  # [I] seller_id not granted to this token
CODE_LOCKOUT = "rl-00001"  # [I]
CODE_MAINTENANCE = "ed-00503"  # [I]
CODE_SERVER = "ed-00500"  # [I]
CODE_NO_ORDER = "od-00003"  # [I]
CODE_ITEM_CODE = "st-02004"  # [I]
CODE_NOT_FOUND = "ed-00404"  # [I]

MESSAGE_LOCKOUT = (
    "短い時間で同一URLに大量にアクセスがありました。しばらくしてから再度お試しください。"
)

_CODE_PART = re.compile(r"[A-Za-z0-9-]{1,99}")
_QUANTITY = re.compile(r"[+-]?\d{1,9}|INI")

_KEY_CACHE: dict[int, rsa.RSAPrivateKey] = {}


def _private_key(bits: int) -> rsa.RSAPrivateKey:
    """One RSA key per size per process: generating one costs ~0.1 s per simulator."""
    key = _KEY_CACHE.get(bits)
    if key is None:
        key = _KEY_CACHE[bits] = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(math.floor(epoch), JST).isoformat()


def _condition_time(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.strptime(text.strip(), "%Y%m%d%H%M%S").replace(tzinfo=JST).timestamp()


def _split_key(listing: SimListing) -> tuple[str, str]:
    item = listing.attrs.get("item_code")
    if item is not None:
        return item, listing.attrs.get("sub_code", "")
    item, _, sub = listing.listing_key.partition(":")
    return item, sub


class SimYahoo(RefreshTokenMall):
    """Yahoo!ショッピング for one store (``shop_id`` is the seller id)."""

    mall = "yahoo"

    def __init__(
        self,
        *,
        reservation: bool = False,
        rotate_refresh_token: bool = False,
        require_signature: bool = True,
        signature_skew_s: float = 600.0,
        rate: float = 1.0,
        rate_burst: float = 2.0,
        lockout_s: float = 60.0,
        key_bits: int = 2048,
        **base: Unpack[SimArgs],
    ) -> None:
        super().__init__(**base)
        self.reservation = reservation
        self.rotate_refresh_token = rotate_refresh_token
        self.require_signature = require_signature
        self.signature_skew_s = signature_skew_s
        self.rate = rate
        self.rate_burst = rate_burst
        self.lockout_s = lockout_s
        self._private = _private_key(key_bits)
        self.public_key_version = "1"
        self.client_id = f"dj00{self.rng.getrandbits(64):016x}"
        self.client_secret = f"{self.rng.getrandbits(128):032x}"
        # page_key -> (name, parent page_key); items without stcat_key sit in "all".
        self.categories: dict[str, tuple[str, str | None]] = {"all": ("全商品", None)}
        self.signatures_verified = 0
        self.bad_signatures = 0
        self.stock_calls: list[dict[str, str]] = []  # every setStock form, as sent
        self._current = self.issue_credentials()

    # -- catalogue ---------------------------------------------------------------------

    def add_item(
        self,
        item_code: str,
        *,
        sub_code: str = "",
        name: str = "",
        quantity: int | None = 0,
        allow_overdraft: bool = False,
        stcat_key: str = "all",
    ) -> SimListing:
        """A 商品 (or one 個別商品 of it); the listing key is ``item`` or ``item:sub``."""
        key = f"{item_code}:{sub_code}" if sub_code else item_code
        return self.add_listing(
            key,
            link_code=sub_code or item_code,
            name=name or item_code,
            quantity=quantity,
            allow_overdraft=allow_overdraft,
            attrs={"item_code": item_code, "sub_code": sub_code, "stcat_key": stcat_key},
        )

    # -- SimMall hooks -----------------------------------------------------------------

    def initial_status(self) -> str:
        return "1" if self.reservation else "2"

    def cancelled_status(self) -> str:
        return "4"

    def status_flow(self) -> list[str]:
        return ["1", "2", "5"] if self.reservation else ["2", "5"]

    # -- credentials -------------------------------------------------------------------

    def public_key_pem(self) -> str:
        return (
            self._private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )

    def credentials(self) -> dict[str, str]:
        """The credential set issued last (dead after ``expire_credentials``)."""
        return dict(self._current)

    def issue_credentials(self) -> dict[str, str]:
        """A new refresh token with the app's id/secret and the store's public key."""
        now = self.clock()
        token = f"rt-{self.rng.getrandbits(96):024x}"
        self._refresh_tokens[token] = now + REFRESH_TOKEN_LIFETIME_S
        self._current = {
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "refresh_token": token,
            "seller_id": self.shop_id,
            "public_key_pem": self.public_key_pem(),
            "public_key_version": self.public_key_version,
            "refresh_token_issued_at": datetime.fromtimestamp(now, JST).isoformat(),
        }
        return dict(self._current)

    revoke_access_tokens = RefreshTokenMall.expire_access_tokens  # the tests' word for it

    # -- HTTP --------------------------------------------------------------------------

    # Guard hooks: the Store API's answers in its <Error> format.

    def _routes(self) -> dict[str, Callable[[Request], Response]]:
        return {
            "orderCount": self._order_count,
            "orderList": self._order_list,
            "orderInfo": self._order_info,
            "getStock": self._get_stock,
            "myItemList": self._my_item_list,
            "stCategoryList": self._st_category_list,
        }

    def route_refusal(self, request: Request, api: str) -> Response | None:
        if request.path == TOKEN_PATH:
            return None
        name = request.path[len(STORE_API) :] if request.path.startswith(STORE_API) else ""
        if name == "setStock" or name in self._routes():
            return None
        return self._error(404, CODE_NOT_FOUND, "Not Found")

    def guarded(self, request: Request, api: str) -> bool:
        return request.path != TOKEN_PATH  # YConnect is another host

    def maintenance_reply(self, api: str) -> Response:
        return self._error(503, CODE_MAINTENANCE, "ただいまメンテナンス中です")

    def server_error_reply(self, api: str) -> Response:
        return self._error(500, CODE_SERVER, "Internal Server Error")

    def auth_refusal(self, request: Request, api: str, *, expired: bool) -> Response | None:
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        if expired or self.access_expired(token) is not False:
            return self._error(
                401,
                CODE_EXPIRED_TOKEN,
                "The access token is invalid or has expired.",
                headers={
                    "WWW-Authenticate": 'Bearer error="invalid_token", '
                    'error_description="The access token is invalid or has expired."'
                },
            )
        if not self.require_signature:
            return None
        if self._signature_ok(request):
            self.signatures_verified += 1
            return None
        self.bad_signatures += 1
        return self._error(401, CODE_SIGNATURE, "Public key authentication failed.")

    def rate_plan(self, api: str) -> RatePlan | None:
        # One query per second per URL, enforced per path: the API name is the path.
        return RatePlan(self.rate, self.rate_burst, lockout=self.lockout_s)

    def documented_limit(self, api: str) -> tuple[float, float] | None:
        # One query per second per URL, burst 1 (``rate_burst`` leaves room for jitter);
        # the token endpoint is another host's.
        return (self.rate, 1.0) if api.startswith(STORE_API) else None

    def throttle_reply(self, api: str, wait: float, *, cost: float, forced: bool) -> Response:
        message = "Too Many Requests" if forced else MESSAGE_LOCKOUT
        return self._error(
            429, CODE_LOCKOUT, message, headers={"Retry-After": str(max(1, math.ceil(wait)))}
        )

    async def handle(self, request: Request, api: str) -> Response:
        if request.path == TOKEN_PATH:
            return self._token(request)
        name = request.path[len(STORE_API) :]
        if name == "orderCount" and not request.arg("sellerId"):
            # A GET order API: its parameter is sellerId, not the stock APIs' seller_id.
            return self._error(400, CODE_PARAM, "sellerId is required")
        if self._seller(name, request) != self.shop_id:
            return self._error(403, CODE_SELLER, "seller_id is not permitted for this token")
        if name == "setStock":
            return await self._set_stock(request)
        return self._routes()[name](request)

    def _seller(self, name: str, request: Request) -> str:
        if name in ("orderList", "orderInfo"):
            root = self._parse_request_xml(request)
            return (root.findtext("SellerId") or "").strip() if root is not None else ""
        if request.method == "POST":
            try:
                return request.form().get("seller_id", "")
            except UnicodeDecodeError:
                return ""
        return request.arg("sellerId" if name == "orderCount" else "seller_id")

    def _signature_ok(self, request: Request) -> bool:
        if request.headers.get("x-sws-signature-version") != self.public_key_version:
            return False
        try:
            sealed = base64.b64decode(request.headers.get("x-sws-signature", ""), validate=True)
            plain = self._private.decrypt(sealed, padding.PKCS1v15()).decode("ascii")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return False
        seller, _, stamp = plain.partition(":")
        if seller != self.shop_id or not stamp.isdigit():
            return False
        return abs(int(stamp) - self.clock()) <= self.signature_skew_s

    # -- token endpoint ----------------------------------------------------------------

    def _token(self, request: Request) -> Response:
        if request.method != "POST":
            return Response.json({"error": "invalid_request"}, status=400)
        form = request.form()
        client_id, client_secret = form.get("client_id", ""), form.get("client_secret", "")
        basic = request.headers.get("authorization", "")
        if basic.startswith("Basic "):
            try:
                pair = base64.b64decode(basic[6:]).decode()
            except (ValueError, binascii.Error, UnicodeDecodeError):
                pair = ""
            client_id, _, client_secret = pair.partition(":")
        if client_id != self.client_id or client_secret != self.client_secret:
            return Response.json(
                {"error": "invalid_client", "error_description": "client authentication failed"},
                status=401,
            )
        if form.get("grant_type") != "refresh_token":
            return Response.json({"error": "unsupported_grant_type"}, status=400)
        now = self.clock()
        token = form.get("refresh_token", "")
        if self.faults.expired_credential or not self.refresh_ok(token):
            return Response.json(
                {"error": "invalid_grant", "error_description": "invalid refresh token"},
                status=400,
            )
        access = f"at-{self.rng.getrandbits(128):032x}"
        self.add_access_token(access, ACCESS_TOKEN_LIFETIME_S)
        body: dict[str, str | int] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": ACCESS_TOKEN_LIFETIME_S,
        }
        if self.rotate_refresh_token:
            del self._refresh_tokens[token]
            new = f"rt-{self.rng.getrandbits(96):024x}"
            self._refresh_tokens[new] = now + REFRESH_TOKEN_LIFETIME_S
            self._current = {**self._current, "refresh_token": new}
            body["refresh_token"] = new
        return Response.json(body)

    # -- Store API endpoints -----------------------------------------------------------

    def _order_count(self, request: Request) -> Response:
        root = ET.Element("ResultSet")
        count = ET.SubElement(ET.SubElement(root, "Result"), "Count")
        live = [o for o in self.orders.values() if not o.cancelled]
        ET.SubElement(count, "NewOrder").text = str(sum(o.status == "2" for o in live))
        ET.SubElement(count, "NewReserve").text = str(sum(o.status == "1" for o in live))
        return self._finish("orderCount", root)

    def _parse_request_xml(self, request: Request) -> ET.Element | None:
        try:
            root: ET.Element = SafeET.fromstring(request.body)
        except (ET.ParseError, defusedxml.DefusedXmlException, ValueError):
            return None
        return root

    def _order_list(self, request: Request) -> Response:
        req = self._parse_request_xml(request)
        search = req.find("Search") if req is not None else None
        if search is None:
            return self._error(400, CODE_PARAM, "Invalid request XML")
        fields = [f.strip() for f in (search.findtext("Field") or "").split(",") if f.strip()]
        if not fields:
            return self._error(400, CODE_PARAM, "Field is required")
        try:
            size = int(search.findtext("Result") or "10")
            start = int(search.findtext("Start") or "1")
            cond = search.find("Condition")
            t_from = _condition_time(cond.findtext("OrderTimeFrom")) if cond is not None else None
            t_to = _condition_time(cond.findtext("OrderTimeTo")) if cond is not None else None
        except ValueError:
            return self._error(400, CODE_PARAM, "Invalid parameter")
        if size < 1 or start < 1:
            return self._error(400, CODE_PARAM, "Invalid Result/Start")
        want_status = cond.findtext("OrderStatus") if cond is not None else None
        want_active = cond.findtext("IsActive") if cond is not None else None
        want_id = cond.findtext("OrderId") if cond is not None else None
        matched: list[SimOrder] = []
        for order in self.orders.values():
            created = math.floor(order.created_at)  # OrderTime has second precision
            if t_from is not None and created < t_from:
                continue
            if t_to is not None and created > t_to:
                continue
            if want_status and order.status != want_status.strip():
                continue
            if want_active and (want_active.strip() == "true") == order.cancelled:
                continue
            if want_id and order.order_id != want_id.strip():
                continue
            matched.append(order)
        descending = (search.findtext("Sort") or "+order_time").strip() == "-order_time"
        matched.sort(key=lambda o: (o.created_at, o.order_id), reverse=descending)
        root = ET.Element("Result", Status="OK")
        out = ET.SubElement(root, "Search")
        ET.SubElement(out, "TotalCount").text = str(len(matched))
        for n, order in enumerate(matched[start - 1 : start - 1 + size], start=start):
            info = ET.SubElement(out, "OrderInfo", Index=str(n))
            values = self._order_values(order)
            for field in fields:
                if field in values:
                    ET.SubElement(info, field).text = values[field]
        return self._finish("orderList", root)

    def _order_values(self, order: SimOrder) -> dict[str, str]:
        return {
            "OrderId": order.order_id,
            "OrderTime": _iso(order.created_at),
            "LastUpdateTime": _iso(order.updated_at),
            "OrderStatus": order.status,
            "IsActive": "false" if order.cancelled else "true",
        }

    def _order_info(self, request: Request) -> Response:
        req = self._parse_request_xml(request)
        target = req.find("Target") if req is not None else None
        if target is None:
            return self._error(400, CODE_PARAM, "Invalid request XML")
        fields = [f.strip() for f in (target.findtext("Field") or "").split(",") if f.strip()]
        if not fields:
            return self._error(400, CODE_PARAM, "Field is required")
        order = self.orders.get((target.findtext("OrderId") or "").strip())
        if order is None:
            return self._error(400, CODE_NO_ORDER, "The order does not exist.")
        root = ET.Element("ResultSet", totalResultsAvailable="1", totalResultsReturned="1")
        result = ET.SubElement(root, "Result")
        ET.SubElement(result, "Status").text = "OK"
        info = ET.SubElement(result, "OrderInfo")
        values = self._order_values(order)
        for field in fields:
            if field in values:
                ET.SubElement(info, field).text = values[field]
        for line in order.lines:
            listing = self.listings.get(line.listing_key)
            if listing is not None:
                item_code, sub_code = _split_key(listing)
                title = listing.name
            else:
                item_code, _, sub_code = line.listing_key.partition(":")
                title = item_code
            item_values = {
                "LineId": line.line_id,
                "ItemId": item_code,
                "SubCode": sub_code,
                "Title": title,
                "Quantity": str(line.quantity),
            }
            item = ET.SubElement(info, "Item")
            for field in fields:
                if field in item_values:
                    ET.SubElement(item, field).text = item_values[field]
        return self._finish("orderInfo", root)

    def _codes(self, form: dict[str, str]) -> list[str] | Response:
        codes = [c for c in form.get("item_code", "").split(",") if c != ""]
        if not codes:
            return self._error(400, CODE_PARAM, "item_code is required")
        if len(codes) > MAX_CODES:
            return self._error(400, CODE_PARAM, f"item_code exceeds {MAX_CODES} codes")
        return codes

    def _rows_for(self, code: str) -> list[SimListing]:
        """A full key finds its listing; a bare 商品コード finds all its 個別商品 [I]."""
        listing = self.listings.get(code)
        if listing is not None:
            return [listing]
        return [
            lst
            for lst in self.listings.values()
            if _split_key(lst)[0] == code and _split_key(lst)[1]
        ]

    def _get_stock(self, request: Request) -> Response:
        codes = self._codes(request.form())
        if isinstance(codes, Response):
            return codes
        root = ET.Element("ResultSet")
        rows = 0
        for code in codes:
            found = self._rows_for(code)
            if not found:
                result = ET.SubElement(root, "Result")
                ET.SubElement(result, "ItemCode").text = code
                ET.SubElement(result, "Status").text = "0"
                ET.SubElement(result, "Quantity")
                rows += 1
            for listing in found:
                item_code, sub_code = _split_key(listing)
                result = ET.SubElement(root, "Result")
                ET.SubElement(result, "ItemCode").text = item_code
                ET.SubElement(result, "SubCode").text = sub_code
                ET.SubElement(result, "Status").text = "1"
                qty = ET.SubElement(result, "Quantity")
                qty.text = "" if listing.quantity is None else str(listing.quantity)
                ET.SubElement(result, "AllowOverdraft").text = (
                    "1" if listing.allow_overdraft else "0"
                )
                rows += 1
        root.set("totalResultsAvailable", str(rows))
        root.set("totalResultsReturned", str(rows))
        root.set("firstResultPosition", "1")
        return self._finish("getStock", root)

    async def _set_stock(self, request: Request) -> Response:
        form = request.form()
        self.stock_calls.append(form)
        codes = self._codes(form)
        if isinstance(codes, Response):
            return codes
        quantities = form.get("quantity", "").split(",")
        if len(quantities) != len(codes):
            return self._error(400, CODE_PARAM, "quantity count does not match item_code")
        flags_raw = form.get("allow_overdraft")
        flags: list[str | None]
        if flags_raw is None:
            flags = [None] * len(codes)
        else:
            parts = flags_raw.split(",")
            if len(parts) == 1:
                parts = parts * len(codes)
            if len(parts) != len(codes) or any(p not in ("0", "1") for p in parts):
                return self._error(400, CODE_PARAM, "allow_overdraft is invalid")
            flags = list(parts)
        for code, qty in zip(codes, quantities, strict=True):
            if not all(_CODE_PART.fullmatch(p) for p in code.split(":")) or code.count(":") > 1:
                return self._error(400, CODE_ITEM_CODE, f"item_code is invalid. ({code})")
            if not _QUANTITY.fullmatch(qty):
                return self._error(400, CODE_PARAM, f"quantity is invalid. ({code})")
        root = ET.Element("ResultSet")
        for code, qty, flag in zip(codes, quantities, flags, strict=True):
            listing = self.listings.get(code)
            item_code, _, sub_code = code.partition(":")
            if listing is not None and not self.faults.silent_noop:
                if qty == "INI":
                    listing.quantity = None
                elif qty[0] in "+-":
                    listing.quantity = (listing.quantity or 0) + int(qty)
                else:
                    listing.quantity = int(qty)
                if listing.quantity is not None:
                    listing.set_history.append(listing.quantity)
                if flag is not None:
                    listing.allow_overdraft = flag == "1"
            # Unknown codes are echoed like known ones: the mall says nothing [V/I].
            result = ET.SubElement(root, "Result")
            ET.SubElement(result, "ItemCode").text = item_code
            if sub_code:
                ET.SubElement(result, "SubCode").text = sub_code
            shown = listing.quantity if listing is not None else None
            ET.SubElement(result, "Quantity").text = (
                qty if listing is None else ("" if shown is None else str(shown))
            )
        root.set("totalResultsAvailable", str(len(codes)))
        root.set("totalResultsReturned", str(len(codes)))
        root.set("firstResultPosition", "1")
        response = self._finish("setStock", root)
        if self.faults.timeout_after_apply:
            await trio.sleep(3600)
        return response

    def _items(self) -> dict[str, list[SimListing]]:
        items: dict[str, list[SimListing]] = {}
        for listing in self.listings.values():
            items.setdefault(_split_key(listing)[0], []).append(listing)
        return items

    def _my_item_list(self, request: Request) -> Response:
        stcat = request.arg("stcat_key")
        query = request.arg("query")
        if not stcat and not query:
            return self._error(400, CODE_PARAM, "queryかstcat_keyのどちらか片方が必須です")
        try:
            start = int(request.arg("start", "1"))
            results = int(request.arg("results", "25"))
        except ValueError:
            return self._error(400, CODE_PARAM, "Invalid parameter")
        if start < 1 or not 1 <= results <= MAX_ITEM_LIST:
            return self._error(400, CODE_PARAM, "Invalid start/results")
        with_stock = request.arg("stock") == "true"
        matched: list[tuple[str, list[SimListing]]] = []
        for code, members in sorted(self._items().items()):
            first = members[0]
            if stcat and first.attrs.get("stcat_key", "all") != stcat:
                continue
            if query and query not in (code if request.arg("type") != "name" else first.name):
                continue
            matched.append((code, members))
        page = matched[start - 1 : start - 1 + results]
        root = ET.Element(
            "ResultSet",
            totalResultsAvailable=str(len(matched)),
            totalResultsReturned=str(len(page)),
            firstResultPosition=str(start),
        )
        for code, members in page:
            result = ET.SubElement(root, "Result")
            ET.SubElement(result, "ItemCode").text = code
            ET.SubElement(result, "Name").text = members[0].name
            has_sub = any(_split_key(m)[1] for m in members)
            ET.SubElement(result, "HasSubCode").text = "1" if has_sub else "0"
            if with_stock:
                qty = ET.SubElement(result, "Quantity")
                if not has_sub and members[0].quantity is not None:
                    qty.text = str(members[0].quantity)
        return self._finish("myItemList", root)

    def _st_category_list(self, request: Request) -> Response:
        parent = request.arg("page_key") or None
        if parent is not None and parent not in self.categories:
            return self._error(400, CODE_PARAM, "page_key does not exist")
        children = [(k, n) for k, (n, p) in self.categories.items() if p == parent]
        root = ET.Element(
            "ResultSet",
            totalResultsAvailable=str(len(children)),
            totalResultsReturned=str(len(children)),
            firstResultPosition="1",
        )
        for key, name in children:
            result = ET.SubElement(root, "Result")
            ET.SubElement(result, "PageKey").text = key
            ET.SubElement(result, "Name").text = name
        return self._finish("stCategoryList", root)

    # -- bodies ------------------------------------------------------------------------

    def _error(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> Response:
        root = ET.Element("Error")
        ET.SubElement(root, "Message").text = message
        ET.SubElement(root, "Code").text = code
        return Response.xml(_xml_text(root), status=status, headers=headers)

    busy_page = "<!DOCTYPE html><html><body><p>ただいま混み合っています</p></body></html>"

    def _finish(self, api: str, root: ET.Element) -> Response:
        """Serialise a 200 body (spoiled first if a ``malformed`` fault is set)."""

        def drop(root: ET.Element) -> ET.Element:
            _drop_first(root, ("OrderId", "LineId", "ItemCode", "PageKey", "TotalCount", "Count"))
            return root

        def spoil(root: ET.Element) -> ET.Element:
            _spoil_number(root)
            return root

        return self.reply_ok(
            root, _xml_text, drop_field=drop, wrong_type=spoil, content_type=XML_TYPE
        )


def _xml_text(root: ET.Element) -> str:
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode")


def _drop_first(root: ET.Element, tags: tuple[str, ...]) -> None:
    for tag in tags:
        for parent in root.iter():
            for child in list(parent):
                if child.tag == tag:
                    parent.remove(child)
                    return


def _spoil_number(root: ET.Element) -> None:
    for elem in root.iter():
        if elem.tag in ("TotalCount", "Quantity") and (elem.text or "").strip():
            elem.text = "abc"
            return
    if "totalResultsAvailable" in root.attrib:
        root.set("totalResultsAvailable", "many")


SIM = SimSpec("yahoo", SimYahoo, url_paths={"token": TOKEN_PATH})
