"""Yahoo!ショッピング Store API adapter (orders, stock, listings, YConnect v2 tokens).

Wire facts come from docs/malls.md §2 ([V] sourced, [I] inferred) and the Store API
pages found with the search tool; every [I] choice below is marked where it is made.

Auth. Every Store API call carries ``Authorization: Bearer <access token>`` plus the
public-key signature headers ``X-sws-signature`` (Base64 of RSA PKCS#1 v1.5 encryption of
``"<sellerId>:<unixtime>"`` with the store's public key) and ``X-sws-signature-version``.
Access tokens last one hour and are refreshed at the YConnect v2 token endpoint with the
refresh token (28 days). An expired access token (401 + ``WWW-Authenticate: Bearer
error="invalid_token"``) is refreshed once and the call retried; a refused refresh
(``invalid_grant``) is ``MallAuthError`` (``LEVEL_CREDENTIAL``). A refresh response
without a new refresh token keeps the old one. A new one (Yahoo may rotate it and stop
taking the old) replaces it, with ``refresh_token_issued_at``, in the store's
credential, which the core writes where a restart reads it
(``goqd.malls.base.replace_credentials``). The refresh token is read from the store's
credential at each refresh, since every adapter of the store (an operator's diff or
import too) shares it: one refused right after another adapter rotated it is tried again
with the new one.

Orders. ``orderList`` (XML POST) is searched by **order time** only: the Store API pages
show no update-time condition (docs/malls.md §8 lists it as unknown), so a cancellation of an
older order would never fall inside a window of new orders. [I] Each poll therefore
searches the order-time window ``[now - change_lookback_days, now]`` (option
``change_lookback_days``, default 14), asks for ``LastUpdateTime`` in the ``Field`` list,
and returns the lines of every order created or updated since ``cursor - overlap_s``.
Cancellations of orders older than the look-back are not seen; raise the option for
shops that cancel later than that. The cursor is the poll's ``now`` (window end), epoch
seconds as a string.

``orderInfo`` (one order per call, 1 per second) is asked only for an order whose
``(LastUpdateTime, OrderStatus)`` in ``orderList`` differs from the last time it was
read: the answer is kept (in memory and in the adapter's state, ``ctx.state``, which
outlives the process) and its lines are returned again from there, so neither the
overlap nor a restart costs extra calls (as the Amazon adapter does with
``getOrderItems``); at under one call a second, re-reading a window after every restart
was most of what Yahoo polls did. A poll therefore returns exactly what it would
without the memory, which is what makes it safe when the ledger fails to commit a poll
and the store actor asks again with the old cursor. [I] Yahoo moves ``LastUpdateTime``
on every change to an order; the time has whole seconds only, so an answer read less
than ``SETTLE_S`` after it is not kept (a change later in the same second would not move
it). The memory holds the orders of the last completed poll's window (plus what a poll
that failed after it had read), which bounds the state too.

Stock. ``setStock`` (form POST, comma lists, at most 1000 codes [V: getStock/setStock
pages]) with absolute quantities only; every call sends ``allow_overdraft`` (超過購入)
from each item's attrs (``None`` → 0). [I] Whether ``allow_overdraft`` takes one value
per call or a list is not documented, so items are grouped by the flag and each call
sends one value that holds for every code in it. ``getStock`` reads counts; an empty
``Quantity`` is unlimited (``None``). Unknown item codes are accepted silently by the
mall and are absent from ``read_stock``.

Listing keys. The stock pages say an item with a 個別商品コード is addressed as
``"<商品コード>:<個別商品コード>"`` [V, getStock.html/setStock.html], so by default the
listing key of an option line is ``"ItemId:SubCode"`` and of a plain item ``ItemId``
(option ``sub_code_key = "sub"`` uses the bare SubCode instead, as some clients do). The
link code is the merchant's SKU: ``SubCode`` when non-empty, else ``ItemId`` (option
``link_field = "SubCode" | "ItemId"``, default ``"SubCode"``).

Rate. 1 query per second per URL [V]; one ``TokenBucket(0.9, 1)`` per URL (the token
endpoint included): see ``RATE_MARGIN``.

This module must never log or format a credential, never parse XML with anything but
defusedxml, and never send a relative stock value.
"""

from __future__ import annotations

import base64
import contextlib
import re
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import defusedxml
import defusedxml.ElementTree as SafeET
import msgspec
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from goqd.errors import (
    MallAuthError,
    MallError,
    MallProtocolError,
    MallRateLimited,
    MallUnavailable,
)
from goqd.logs import register_secret
from goqd.malls.adapterstate import SeenOrders
from goqd.malls.base import (
    KeyExpiry,
    MallLimits,
    MallSpec,
    OrderPage,
    StoreContext,
    header_safe,
    opt_choice,
    opt_integer,
    opt_number,
    push_outcome,
    read_options,
    replace_credentials,
)
from goqd.malls.client import (
    OAUTH_REFUSALS,
    MallClient,
    Reply,
    Table,
    TokenAuth,
    TokenResponse,
    error_class,
)
from goqd.malls.clock import describe_skew
from goqd.malls.ratelimit import TokenBucket, shared_bucket
from goqd.messages import ListingAttrs, MallCount, MallListing, OrderLine, PushItem, PushOutcome
from goqd.secret import Secret

MALL = "yahoo"
STORE_API = "/ShoppingWebService/V1"
TOKEN_PATH = "/yconnect/v2/token"
JST = timezone(timedelta(hours=9))

PUSH_BATCH = 1000  # setStock / getStock: "カンマ区切りで最大1,000個" [V]
READ_BATCH = 1000
ITEM_LIST_PAGE = 100  # myItemList results: 最大値100 [V]
REFRESH_TOKEN_LIFETIME_S = 28 * 86400.0  # 4 weeks [V]
# When the refresh token was issued: its 28 days count from there.
ISSUED_FIELD = "refresh_token_issued_at"
# [I] No documented length; far longer than any token, far shorter than the credential
# file may be, so a token that will not fit is refused before the old one is replaced.
MAX_REFRESH_TOKEN = 4096
MAX_QUANTITY = 999_999_999  # setStock quantity range [V]
CANCELLED_FINAL = "4"  # キャンセル: "二度と有効にすることはできない" [V, NE manual]
RATE_PER_URL = 1.0  # "1クエリ/秒" per URL [V]
# Requests are spaced 10 % wider than the documented rate: a call delayed on its way
# (connection setup, a slow hop) otherwise arrives less than a second before the next
# one, and Yahoo locks the whole URL out for a while (BENCHMARKS.md, finding 5).
# Burst stays 1: one call at a time is all Yahoo documents.
RATE_MARGIN = 0.9
# orderInfo answers are reused only when read this long after the order's
# LastUpdateTime (both on Yahoo's clock), which has whole seconds: 1 s for that, the rest
# a margin, since the clock measured is that of the servers writing ``Date``, not
# necessarily the one stamping orders [I].
SETTLE_S = 10.0
# [I] How far a signature's unixtime may be from Yahoo's clock is not documented. An auth
# refusal while Yahoo's clock (as its Date headers show it) is further than this from
# goqd's is a stale signature, not a rejected key: every signed call fails alike.
SIGNATURE_SKEW_S = 60.0

LIVE_STATUSES = ("1", "2", "3", "5")  # 予約中, 処理中, 保留, 完了
CANCEL_STATUSES = ("4",)

CREDENTIAL_FIELDS = (
    "client_id",
    "client_secret",
    "refresh_token",
    "seller_id",
    "public_key_pem",
    "public_key_version",
)
# How the Store API's replies are classified (401/403 further checked for a stale
# signature, see ``_raise_for_status``), and the token endpoint's: there a 403 is not a
# refused credential, only a 401 or an OAuth refusal is.
TABLE: Table = {401: MallAuthError, 403: MallAuthError, 429: MallRateLimited}
TOKEN_TABLE: Table = {401: MallAuthError, 429: MallRateLimited, **OAUTH_REFUSALS}
# POST APIs that change nothing (the token endpoint and setStock do).
_READ_POSTS = frozenset({"orderList", "orderInfo", "getStock"})
# XML elements that may repeat and are therefore always decoded as lists.
_LIST_TAGS = frozenset({"Result", "OrderInfo", "Item"})
# The Store API's answers nest about five deep.
_MAX_DEPTH = 32

LIMITS = MallLimits(push_batch=PUSH_BATCH, read_batch=READ_BATCH, min_poll_interval=60.0)

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------
# Wire formats (decoded from XML via a dict; unknown elements are ignored)
# --------------------------------------------------------------------------------------


class _OrderSummary(msgspec.Struct, frozen=True, rename="pascal"):
    order_id: str
    order_time: str | None = None
    order_status: str | None = None
    last_update_time: str | None = None


class _OrderSearch(msgspec.Struct, frozen=True, rename="pascal"):
    total_count: int
    order_info: list[_OrderSummary] = msgspec.field(default_factory=list)


class _OrderItem(msgspec.Struct, frozen=True, rename="pascal"):
    line_id: str
    item_id: str
    quantity: int
    sub_code: str | None = None
    title: str | None = None


class _OrderDetail(msgspec.Struct, frozen=True, rename="pascal"):
    order_id: str
    order_status: str
    order_time: str | None = None
    last_update_time: str | None = None
    is_active: bool = True
    item: list[_OrderItem] = msgspec.field(default_factory=list)


class _StockRow(msgspec.Struct, frozen=True, rename="pascal"):
    item_code: str
    sub_code: str | None = None
    status: str | None = None
    quantity: int | None = None  # empty element: unlimited
    allow_overdraft: int | None = None


def _row_attrs(row: _StockRow) -> ListingAttrs:
    return ListingAttrs(
        allow_overdraft=None if row.allow_overdraft is None else bool(row.allow_overdraft)
    )


class _StockResultSet(msgspec.Struct, frozen=True):
    result: list[_StockRow] = msgspec.field(name="Result", default_factory=list)


class _ItemRow(msgspec.Struct, frozen=True, rename="pascal"):
    item_code: str
    name: str | None = None
    has_sub_code: int | None = None
    quantity: int | None = None


class _ItemList(msgspec.Struct, frozen=True):
    total: int = msgspec.field(name="totalResultsAvailable")
    returned: int = msgspec.field(name="totalResultsReturned", default=0)
    result: list[_ItemRow] = msgspec.field(name="Result", default_factory=list)


class _Category(msgspec.Struct, frozen=True, rename="pascal"):
    page_key: str
    name: str | None = None


class _CategoryList(msgspec.Struct, frozen=True):
    result: list[_Category] = msgspec.field(name="Result", default_factory=list)


# --------------------------------------------------------------------------------------
# In memory between polls
# --------------------------------------------------------------------------------------


class _SeenOrder(msgspec.Struct, frozen=True):
    """An order's ``orderInfo`` answer as of one ``orderList`` (LastUpdateTime, OrderStatus)."""

    marker: tuple[str | None, str | None]
    detail: _OrderDetail


_SEEN_KEY = "order/"


# --------------------------------------------------------------------------------------
# Private errors
# --------------------------------------------------------------------------------------


class _InvalidToken(Exception):
    """401 with error="invalid_token": refresh the access token and retry once."""


class _StaleSignature(Exception):
    """An auth refusal while Yahoo's clock is far from goqd's: sign again with Yahoo's
    time (measured from that very answer) once; ``error`` is raised if that fails too."""

    def __init__(self, error: MallError) -> None:
        super().__init__(str(error))
        self.error = error


class _Rejected(MallProtocolError):
    """The mall refused the request (4xx with an ``<Error>`` body).

    ``push_stock`` catches it to blame one item of a batch; anywhere else it is an
    ordinary ``MallProtocolError``.
    """

    def __init__(self, message: str, *, mall_code: str, mall_message: str, store: str) -> None:
        super().__init__(message, mall=MALL, store=store, code=mall_code or "mall_protocol")
        self.mall_code = mall_code
        self.mall_message = mall_message


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _element_to_obj(elem: ET.Element, depth: int = 0) -> Any:
    """An element as plain data: leaf → text (empty → None), else a dict of children.

    Attributes become keys (``totalResultsAvailable``); tags in ``_LIST_TAGS`` always
    become lists so one result and many results decode the same way. Nesting deeper
    than ``_MAX_DEPTH`` is no Store API answer (``ValueError``): it would otherwise
    exhaust the interpreter's recursion limit.
    """
    if depth > _MAX_DEPTH:
        raise ValueError(f"elements nested deeper than {_MAX_DEPTH}")
    children = list(elem)
    if not children and not elem.attrib:
        text = (elem.text or "").strip()
        return text or None
    out: dict[str, Any] = dict(elem.attrib)
    for child in children:
        value = _element_to_obj(child, depth + 1)
        if child.tag in _LIST_TAGS:
            out.setdefault(child.tag, []).append(value)
        else:
            out[child.tag] = value
    return out


def parse_time(text: str | None) -> float | None:
    """Yahoo datetimes: ISO 8601 with offset, or ``YYYYMMDDHHMMSS`` in JST."""
    if not text:
        return None
    text = text.strip()
    try:
        if re.fullmatch(r"\d{14}", text):
            dt = datetime.strptime(text, "%Y%m%d%H%M%S").replace(tzinfo=JST)
        else:
            dt = datetime.fromisoformat(text)
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=JST)
    except ValueError:
        return None
    return dt.timestamp()


def format_condition_time(epoch: float) -> str:
    """orderList Condition times: ``YYYYMMDDHHMMSS`` in JST [V]."""
    return datetime.fromtimestamp(epoch, JST).strftime("%Y%m%d%H%M%S")


def _parse_issued_at(text: str) -> float | None:
    """``refresh_token_issued_at``: an ISO date or datetime; a bare date is JST midnight."""
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=JST)
    return dt.timestamp()


def _token_url(configured: str) -> str:
    """``urls["token"]`` may be a base (``https://auth.login.yahoo.co.jp``) or the full
    endpoint URL; a bare host gets ``/yconnect/v2/token`` appended."""
    if urllib.parse.urlsplit(configured).path.strip("/"):
        return configured
    return configured.rstrip("/") + TOKEN_PATH


def _batched(seq: Sequence[_T], size: int) -> list[Sequence[_T]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def _blamed_index(message: str, keys: Sequence[str]) -> int | None:
    """The position of the one item code a mall error message names, if any.

    [I] The sim (and, we assume, the mall) names the offending code in ``<Message>``;
    codes are matched as whole tokens so ``A-1`` does not blame ``A-10``.
    """
    for i, key in enumerate(keys):
        if re.search(rf"(?<![A-Za-z0-9:_-]){re.escape(key)}(?![A-Za-z0-9:_-])", message):
            return i
    return None


def _push_problem(item: PushItem) -> str:
    """Why an item cannot go into a setStock list at all, or "" if it can.

    Only what would corrupt the comma list or break the documented number range is
    refused here; the character set is left to the mall, which names the code it
    refuses (handled by blaming that item).
    """
    key = item.listing_key
    if not key or "," in key or key.count(":") > 1 or any(c.isspace() for c in key):
        return "item code is empty or contains ',', whitespace or more than one ':'"
    if any(len(part) > 99 for part in key.split(":")):
        return "item code part longer than 99 characters"
    if not 0 <= item.quantity <= MAX_QUANTITY:
        return f"quantity {item.quantity} outside 0..{MAX_QUANTITY}"
    return ""


# --------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------


class YahooAdapter:
    """One store's Yahoo!ショッピング client. Holds the access token in memory only."""

    mall = MALL
    limits = LIMITS

    def __init__(self, ctx: StoreContext) -> None:
        self._ctx = ctx
        opts = read_options(SPEC, ctx)
        self._overlap: float = opts["overlap_s"]
        self._initial_lookback: float = opts["initial_lookback_s"]
        self._change_lookback: float = opts["change_lookback_days"] * 86400.0
        self._page_size: int = opts["order_page_size"]
        self._link_field: str = opts["link_field"]
        self._sub_code_key: str = opts["sub_code_key"]
        # [I] How long the mall locks a URL after a burst is not documented.
        self._lockout_s: float = opts["lockout_s"]
        self._live = ctx.live_statuses or LIVE_STATUSES
        self._cancel = ctx.cancel_statuses or CANCEL_STATUSES
        self._store_base = ctx.base_url.rstrip("/") + STORE_API
        self._token_url = _token_url(ctx.urls.get("token", ctx.base_url))
        self._buckets: dict[str, TokenBucket] = {}
        self._client = MallClient(ctx, MALL, is_secret=SPEC.is_secret_field)
        self._auth = TokenAuth(self._client, self._mint)
        self._public_key: RSAPublicKey | None = None
        # orderInfo answers of the orders in the last poll's window, by OrderId; each
        # also in the state as "order/<OrderId>".
        self._seen = SeenOrders(ctx.state, _SEEN_KEY, _SeenOrder)

    # -- errors and credentials --------------------------------------------------------

    def _cred(self, name: str) -> Secret:
        value = self._ctx.credentials.get(name)
        if value is None or not value.reveal():
            raise self._client.error(MallAuthError, f"credential field {name!r} is missing")
        return value

    def _key(self) -> RSAPublicKey:
        if self._public_key is None:
            pem = self._cred("public_key_pem").reveal().encode()
            try:
                key = load_pem_public_key(pem)
            except ValueError as exc:
                raise self._client.error(
                    MallAuthError, "public_key_pem is not a PEM public key"
                ) from exc
            if not isinstance(key, RSAPublicKey):
                raise self._client.error(MallAuthError, "public_key_pem is not an RSA public key")
            self._public_key = key
        return self._public_key

    def _signature_offset(self) -> float:
        """Yahoo's clock minus goqd's as last measured: Yahoo checks a signature's
        unixtime against its own clock, so goqd signs with Yahoo's time."""
        wall = self._ctx.clock()
        return self._ctx.mall_clock.to_mall(wall) - wall

    def _signature_headers(self, offset: float | None = None) -> dict[str, str]:
        if offset is None:
            offset = self._signature_offset()
        unixtime = int(self._ctx.clock() + offset)
        plain = f"{self._cred('seller_id').reveal()}:{unixtime}".encode()
        sealed = self._key().encrypt(plain, padding.PKCS1v15())
        return {
            "X-sws-signature": base64.b64encode(sealed).decode("ascii"),
            "X-sws-signature-version": self._cred("public_key_version").reveal(),
        }

    def _bucket(self, name: str) -> TokenBucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = shared_bucket(
                self._ctx.rate_buckets, name, RATE_PER_URL * RATE_MARGIN, 1.0
            )
        return bucket

    # -- HTTP --------------------------------------------------------------------------

    def _parse_xml(self, api: str, body: bytes) -> ET.Element:
        try:
            root: ET.Element = SafeET.fromstring(body)
        except (ET.ParseError, defusedxml.DefusedXmlException, ValueError) as exc:
            raise self._client.error(
                MallProtocolError, f"{api}: response is not well-formed XML"
            ) from exc
        return root

    def _mall_error(self, api: str, status: int, body: bytes) -> tuple[str, str]:
        """``<Error><Message/><Code/></Error>`` [V] → (code, message); best effort."""
        try:
            root: ET.Element = SafeET.fromstring(body)
        except (ET.ParseError, defusedxml.DefusedXmlException, ValueError):
            return "", f"HTTP {status}"
        code = (root.findtext(".//Code") or "").strip()
        message = (root.findtext(".//Message") or "").strip()[:300]
        return code, message or f"HTTP {status}"

    def _raise_for_status(self, api: str, reply: Reply, *, signed_offset: float) -> None:
        status = reply.status
        if status == 200:
            return
        code, message = self._mall_error(api, status, reply.body)
        text = f"{api}: {code} {message}".strip() if code else f"{api}: {message}"
        if status == 401 and "invalid_token" in reply.headers.get("www-authenticate", ""):
            raise _InvalidToken()
        cls = error_class(TABLE, status)
        if cls is MallAuthError:
            # 403: not approved for this API, store not granted to this app, signature
            # refused. A clock off makes every signature stale: that is a temporary error
            # (fix the clock), never a key to renew. The refusal's own Date is the newest
            # sample.
            skew = self._ctx.mall_clock.latest_offset()
            if skew is not None:
                error = self._client.error(
                    MallUnavailable,
                    f"{api}: clock skew: Yahoo refused the signed request ({text}) while its "
                    f"clock is {describe_skew(skew)} goqd's; a signature carries the time, so "
                    "set this host's clock right (NTP) before renewing the key",
                    "clock_skew",
                )
                if abs(skew - signed_offset) > SIGNATURE_SKEW_S:
                    # Signed by a clock Yahoo has left (either way): sign again.
                    raise _StaleSignature(error)
                if abs(skew) > SIGNATURE_SKEW_S:
                    raise error
        if cls is MallProtocolError:
            raise _Rejected(text, mall_code=code, mall_message=message, store=self._ctx.store)
        raise self._client.reply_error(
            cls,
            text,
            code,
            reply=reply,
            bucket=self._bucket(api),
            retry_default=self._lockout_s,
        )

    async def _store_call(
        self,
        api: str,
        *,
        method: str = "POST",
        form: dict[str, str] | None = None,
        xml: bytes | None = None,
        params: dict[str, str] | None = None,
    ) -> ET.Element:
        """One Store API call: rate, auth, signature, status mapping, XML parse.

        An expired access token is refreshed and the call retried exactly once; a call
        refused while Yahoo's clock is far from goqd's is signed again once with Yahoo's
        time, and if refused again is a ``clock_skew`` error (temporary), not a rejected
        key.
        """
        if form is not None:
            content: bytes | None = urllib.parse.urlencode(form).encode()
            ctype = "application/x-www-form-urlencoded"
        else:
            content, ctype = xml, "application/xml; charset=utf-8"
        resigned = False
        attempt = 0
        while True:
            token, _ = await self._auth.token()
            offset = 0.0

            def signed(bearer: Secret = token) -> dict[str, str]:
                # Made once the rate token is held (Yahoo counts a call on arrival and
                # locks the URL out for a minute if two come too close), so the time in
                # the signature is the time the call leaves.
                nonlocal offset
                offset = self._signature_offset()
                headers = {
                    "Authorization": f"Bearer {bearer.reveal()}",
                    **self._signature_headers(offset),
                }
                if content is not None:
                    headers["Content-Type"] = ctype
                return headers

            reply = await self._client.send(
                api,
                method,
                f"{self._store_base}/{api}",
                headers=signed,
                bucket=self._bucket(api),
                content=content,
                params=params,
                # POSTs that only read may be sent again on a fresh connection.
                read=api in _READ_POSTS,
            )
            try:
                self._raise_for_status(api, reply, signed_offset=offset)
            except _InvalidToken:
                if attempt:
                    raise self._client.error(
                        MallAuthError, f"{api}: access token refused right after refresh"
                    ) from None
                attempt += 1
                await self._auth.refresh(stale=token)
                continue
            except _StaleSignature as stale:
                # The refusal's own Date measured Yahoo's clock: the next signature
                # carries Yahoo's time. Once; a second refusal is reported as it is.
                if resigned:
                    raise stale.error from None
                resigned = True
                continue
            return self._parse_xml(api, reply.body)

    def _decode(self, api: str, elem: ET.Element | None, type_: type[_T]) -> _T:
        if elem is None:
            raise self._client.error(MallProtocolError, f"{api}: expected element missing")
        try:
            return msgspec.convert(_element_to_obj(elem), type_, strict=False)
        except (msgspec.ValidationError, ValueError) as exc:
            raise self._client.error(MallProtocolError, f"{api}: {exc}") from exc

    def _result_set(self, api: str, root: ET.Element) -> ET.Element:
        if root.tag != "ResultSet":
            raise self._client.error(MallProtocolError, f"{api}: root element is <{root.tag}>")
        return root

    # -- tokens ------------------------------------------------------------------------

    async def _mint(self) -> TokenResponse:
        sent = self._ctx.credentials.get("refresh_token")
        try:
            return await self._grant(sent)
        except MallAuthError:
            # Another adapter of the store may have used the same refresh token meanwhile
            # and been handed the one Yahoo takes now: that one, once.
            current = self._ctx.credentials.get("refresh_token")
            if current is None or current == sent:
                raise
            return await self._grant(current)

    async def _grant(self, refresh_token: Secret | None) -> TokenResponse:
        """One refresh at the token endpoint; a rotated refresh token is kept."""
        api = "token"
        if refresh_token is None or not refresh_token.reveal():
            raise self._client.error(MallAuthError, "credential field 'refresh_token' is missing")
        form = {
            "grant_type": "refresh_token",
            "client_id": self._cred("client_id").reveal(),
            "client_secret": self._cred("client_secret").reveal(),
            "refresh_token": refresh_token.reveal(),
        }
        token = await self._client.request_token(
            api,
            self._token_url,
            form,
            headers=lambda: {
                "Content-Type": "application/x-www-form-urlencoded",
                # Yahoo grants a 28-day refresh token only to apps that sign (docs/malls.md §2.2).
                **self._signature_headers(),
            },
            bucket=self._bucket(api),
            table=TOKEN_TABLE,
            retry_default=self._lockout_s,
        )
        rotated = token.refresh_token or ""
        if rotated == refresh_token.reveal():
            rotated = ""
        if rotated and (not header_safe(rotated) or len(rotated) > MAX_REFRESH_TOKEN):
            raise self._client.error(MallProtocolError, "token: unusable new refresh token")
        if rotated:
            # The old one may stop working, and the 28 days restart: kept as a renewed
            # key is, so a restart does not read the old one.
            register_secret(rotated, transient=True)
            issued = datetime.fromtimestamp(self._ctx.clock(), JST).isoformat(timespec="seconds")
            await replace_credentials(self._ctx, {"refresh_token": rotated, ISSUED_FIELD: issued})
        return token

    # -- keys --------------------------------------------------------------------------

    def _stock_key(self, item_code: str, sub_code: str | None) -> str:
        if not sub_code:
            return item_code
        if self._sub_code_key == "sub" or ":" in sub_code:
            return sub_code
        return f"{item_code}:{sub_code}"

    def _link_code(self, item_code: str, sub_code: str | None) -> str:
        if self._link_field == "SubCode" and sub_code:
            return sub_code.rsplit(":", 1)[-1]
        return item_code

    # -- MallAdapter -------------------------------------------------------------------

    async def check_credentials(self) -> None:
        """Refresh now (proves the refresh token), then one signed ``orderCount`` call.

        ``orderCount`` is the cheapest order API, and order APIs are the ones that need
        Yahoo's extra approval, so a pass here means polling will work.
        """
        await self._auth.refresh()
        # orderCount is a GET order API: its parameter is ``sellerId``, as in Yahoo's
        # other GET order APIs (orderChangeHistory's page) and the public clients that
        # call it; the form posts of the stock APIs are the ones that take ``seller_id``.
        root = await self._store_call(
            "orderCount", method="GET", params={"sellerId": self._cred("seller_id").reveal()}
        )
        self._result_set("orderCount", root)

    async def credential_expiry(self) -> float | None:
        # Read from the store's credential: a rotation by any of its adapters moves it.
        issued = self._ctx.credentials.get(ISSUED_FIELD)
        obtained = _parse_issued_at(issued.reveal()) if issued else None
        if obtained is None:
            return None
        return obtained + REFRESH_TOKEN_LIFETIME_S

    async def fetch_orders(self, cursor: str | None) -> OrderPage:
        # Every time here is Yahoo's (its clock as its responses show it), so a skew
        # between the clocks never moves the window past orders (goqd.malls.clock).
        began = self._ctx.clock()
        clock = self._ctx.mall_clock
        cursor_at: float | None = None
        if cursor is not None:
            # A cursor that is not one of ours starts over from the initial look-back.
            with contextlib.suppress(ValueError):
                cursor_at = float(cursor)
        span = clock.window(
            began, cursor_at, overlap=self._overlap, initial_lookback=self._initial_lookback
        )
        since, now = span.start, span.end
        search_from = min(since, now - self._change_lookback)
        summaries = await self._search_orders(search_from, now)
        lines: list[OrderLine] = []
        window: set[str] = set()
        seen = 0
        for summary in summaries:
            if not self._needs_detail(summary, since):
                continue
            detail = await self._order_detail(summary, window)
            seen += 1
            lines.extend(self._order_lines(detail))
        self._seen.keep_only(window)
        # Never later than Yahoo's time when the search ran.
        done = clock.cursor_after(began, now)
        return OrderPage(lines=tuple(lines), cursor=repr(done), orders_seen=seen)

    async def _order_detail(self, summary: _OrderSummary, window: set[str]) -> _OrderDetail:
        """The order's ``orderInfo`` answer: remembered while ``orderList`` shows the
        order unchanged, else read (and remembered once settled). ``window`` collects
        the orders this poll remembers."""
        marker = (summary.last_update_time, summary.order_status)
        previous = self._seen.get(summary.order_id)
        if previous is not None and previous.marker == marker:
            window.add(summary.order_id)
            return previous.detail
        # LastUpdateTime is on Yahoo's clock: the settling is measured on it too (a goqd
        # clock ahead of Yahoo's would keep answers read in the second of the change).
        # Yahoo's clock had certainly reached ``read_at`` when it answered.
        read_at = self._ctx.mall_clock.floor(self._ctx.clock())
        detail = await self._order_info(summary.order_id)
        updated = parse_time(summary.last_update_time)
        if updated is not None and read_at >= updated + SETTLE_S:
            window.add(summary.order_id)
            self._seen.put(summary.order_id, _SeenOrder(marker, detail))
        else:
            self._seen.forget(summary.order_id)
        return detail

    def _needs_detail(self, summary: _OrderSummary, since: float) -> bool:
        status = summary.order_status
        if status is not None and status not in self._live and status not in self._cancel:
            return False  # e.g. 0 / 8: neither books nor restores (docs/design.md §4)
        created = parse_time(summary.order_time)
        updated = parse_time(summary.last_update_time)
        if created is None or updated is None:
            return True  # cannot tell whether it changed: look
        return max(created, updated) >= since

    async def _search_orders(self, start: float, end: float) -> list[_OrderSummary]:
        api = "orderList"
        seller = self._cred("seller_id").reveal()
        out: list[_OrderSummary] = []
        position = 1
        while True:
            req = ET.Element("Req")
            search = ET.SubElement(req, "Search")
            ET.SubElement(search, "Result").text = str(self._page_size)
            ET.SubElement(search, "Start").text = str(position)
            ET.SubElement(search, "Sort").text = "+order_time"
            cond = ET.SubElement(search, "Condition")
            ET.SubElement(cond, "OrderTimeFrom").text = format_condition_time(start)
            ET.SubElement(cond, "OrderTimeTo").text = format_condition_time(end)
            ET.SubElement(search, "Field").text = "OrderId,OrderTime,OrderStatus,LastUpdateTime"
            ET.SubElement(req, "SellerId").text = seller
            root = await self._store_call(api, xml=ET.tostring(req, encoding="utf-8"))
            node = root if root.tag == "Search" else root.find("Search")
            page = self._decode(api, node, _OrderSearch)
            out.extend(page.order_info)
            position += len(page.order_info)
            if not page.order_info or position > page.total_count:
                return out

    async def _order_info(self, order_id: str) -> _OrderDetail:
        api = "orderInfo"
        req = ET.Element("Req")
        target = ET.SubElement(req, "Target")
        ET.SubElement(target, "OrderId").text = order_id
        ET.SubElement(target, "Field").text = (
            "OrderId,OrderTime,LastUpdateTime,OrderStatus,IsActive,"
            "LineId,ItemId,SubCode,Title,Quantity"
        )
        ET.SubElement(req, "SellerId").text = self._cred("seller_id").reveal()
        root = await self._store_call(api, xml=ET.tostring(req, encoding="utf-8"))
        detail = self._decode(api, self._result_set(api, root).find(".//OrderInfo"), _OrderDetail)
        if detail.order_id != order_id:
            raise self._client.error(
                MallProtocolError, f"{api}: asked for {order_id}, got {detail.order_id}"
            )
        return detail

    def _order_lines(self, detail: _OrderDetail) -> list[OrderLine]:
        status = detail.order_status
        if status in self._cancel:
            cancelled = True
        elif status in self._live:
            cancelled = not detail.is_active  # 無効注文 gives its stock back
        else:
            return []
        updated_at = parse_time(detail.last_update_time) or parse_time(detail.order_time)
        if updated_at is None:
            raise self._client.error(
                MallProtocolError, f"orderInfo: {detail.order_id} has no usable time"
            )
        return [
            OrderLine(
                order_id=detail.order_id,
                line_id=item.line_id,
                listing_key=self._stock_key(item.item_id, item.sub_code),
                link_code=self._link_code(item.item_id, item.sub_code),
                quantity=item.quantity,
                # A line the shop edited down to 0 books nothing (orderChange).
                cancelled=cancelled or item.quantity <= 0,
                terminal=status == CANCELLED_FINAL,
                updated_at=updated_at,
                status=status,
            )
            for item in detail.item
        ]

    async def push_stock(self, items: Sequence[PushItem]) -> list[PushOutcome]:
        outcomes: dict[int, PushOutcome] = {}
        groups: dict[bool, list[tuple[int, PushItem]]] = {False: [], True: []}
        for i, item in enumerate(items):
            problem = _push_problem(item)
            if problem:
                outcomes[i] = push_outcome(
                    item,
                    accepted=False,
                    code="invalid_item",
                    message=problem,
                    quantity=item.quantity,
                )
                continue
            groups[bool(item.attrs.allow_overdraft)].append((i, item))
        for flag, members in groups.items():
            for chunk in _batched(members, PUSH_BATCH):
                await self._push_chunk(list(chunk), flag, outcomes)
        return [outcomes[i] for i in range(len(items))]

    async def _push_chunk(
        self, chunk: list[tuple[int, PushItem]], overdraft: bool, outcomes: dict[int, PushOutcome]
    ) -> None:
        remaining = chunk
        while remaining:
            try:
                await self._set_stock([item for _, item in remaining], overdraft)
            except _Rejected as exc:
                blamed = _blamed_index(exc.mall_message, [it.listing_key for _, it in remaining])
                if blamed is None:
                    raise
                i, item = remaining.pop(blamed)
                outcomes[i] = push_outcome(
                    item,
                    accepted=False,
                    code=exc.mall_code,
                    message=exc.mall_message,
                    quantity=item.quantity,
                )
                continue
            for i, item in remaining:
                outcomes[i] = push_outcome(item, accepted=True, quantity=item.quantity)
            return

    async def _set_stock(self, items: Sequence[PushItem], overdraft: bool) -> None:
        api = "setStock"
        form = {
            "seller_id": self._cred("seller_id").reveal(),
            "item_code": ",".join(item.listing_key for item in items),
            "quantity": ",".join(str(item.quantity) for item in items),
            "allow_overdraft": "1" if overdraft else "0",
        }
        root = await self._store_call(api, form=form)
        # Unknown codes are accepted silently [V/I]; the body only proves the format.
        self._decode(api, self._result_set(api, root), _StockResultSet)

    async def _get_stock(self, codes: Sequence[str]) -> list[_StockRow]:
        api = "getStock"
        form = {"seller_id": self._cred("seller_id").reveal(), "item_code": ",".join(codes)}
        root = await self._store_call(api, form=form)
        return self._decode(api, self._result_set(api, root), _StockResultSet).result

    async def read_stock(self, listing_keys: Sequence[str]) -> dict[str, int | None]:
        found = await self.read_listings(listing_keys)
        return {key: count.quantity for key, count in found.items()}

    async def read_listings(self, listing_keys: Sequence[str]) -> dict[str, MallCount]:
        """``getStock``'s count and 超過購入設定 (``AllowOverdraft``) for each key it knows."""
        out: dict[str, MallCount] = {}
        for chunk in _batched(list(dict.fromkeys(listing_keys)), READ_BATCH):
            wanted = set(chunk)
            for row in await self._get_stock(chunk):
                key = self._stock_key(row.item_code, row.sub_code)
                if row.status == "1" and key in wanted:  # Status 1 = found [V]
                    out[key] = MallCount(quantity=row.quantity, attrs=_row_attrs(row))
        return out

    async def iter_listings(self) -> AsyncIterator[MallListing]:
        """Every listing: categories → ``myItemList`` → ``getStock``.

        [V, public client code] ``myItemList`` needs ``query`` or ``stcat_key`` (an empty
        query is refused), so the store categories are walked with ``stCategoryList``
        and listed one by one; an item in no store category is not seen. [I] ``getStock``
        asked for a bare 商品コード returns one row per 個別商品コード with ``SubCode``
        and ``AllowOverdraft`` (超過購入設定), which is how allow_overdraft is taken in.
        """
        names: dict[str, str] = {}
        for key in await self._walk_categories():
            async for item in self._item_list(key):
                names.setdefault(item.item_code, item.name or "")
        codes = list(names)
        for chunk in _batched(codes, READ_BATCH):
            rows = await self._get_stock(chunk)
            found: set[str] = set()
            for row in rows:
                if row.status != "1":
                    continue
                found.add(row.item_code)
                yield MallListing(
                    listing_key=self._stock_key(row.item_code, row.sub_code),
                    link_code=self._link_code(row.item_code, row.sub_code),
                    name=names.get(row.item_code, ""),
                    quantity=row.quantity,
                    attrs=_row_attrs(row),
                )
            for code in chunk:
                if code not in found:
                    # Listed but without a stock row: keep it importable, count unknown.
                    yield MallListing(
                        listing_key=code, link_code=code, name=names[code], quantity=None
                    )

    async def _walk_categories(self) -> list[str]:
        api = "stCategoryList"
        seller = self._cred("seller_id").reveal()
        keys: list[str] = []
        seen: set[str] = set()
        todo: list[str | None] = [None]
        while todo:
            parent = todo.pop()
            params = {"seller_id": seller}
            if parent is not None:
                params["page_key"] = parent
            root = await self._store_call(api, method="GET", params=params)
            cats = self._decode(api, self._result_set(api, root), _CategoryList).result
            fresh = [c.page_key for c in cats if c.page_key not in seen]  # a cyclic tree ends
            seen.update(fresh)
            keys.extend(fresh)
            todo.extend(reversed(fresh))
        return keys

    async def _item_list(self, stcat_key: str) -> AsyncIterator[_ItemRow]:
        api = "myItemList"
        seller = self._cred("seller_id").reveal()
        start = 1
        while True:
            params = {
                "seller_id": seller,
                "stcat_key": stcat_key,
                "stock": "true",
                "start": str(start),
                "results": str(ITEM_LIST_PAGE),
            }
            root = await self._store_call(api, method="GET", params=params)
            page = self._decode(api, self._result_set(api, root), _ItemList)
            for row in page.result:
                yield row
            start += len(page.result)
            if not page.result or start > page.total:
                return


SPEC = MallSpec(
    name=MALL,
    title="Yahoo!ショッピング",
    open_adapter=YahooAdapter,
    limits=LIMITS,
    credential_fields=CREDENTIAL_FIELDS,
    optional_fields=(ISSUED_FIELD,),
    # The client id, seller id and the store's *public* key are not secrets.
    secret_fields=("client_secret", "refresh_token"),
    options={
        "overlap_s": opt_number(600, 0, 30 * 86400),
        "initial_lookback_s": opt_number(86400, 0, 730 * 86400),
        "change_lookback_days": opt_number(14, 0, 365),
        # orderList's Result has no documented upper bound; clients use 1000-2000.
        "order_page_size": opt_integer(1000, 1, 2000),
        "link_field": opt_choice("SubCode", "SubCode", "ItemId"),
        "sub_code_key": opt_choice("joined", "joined", "sub"),
        "lockout_s": opt_number(60, 0, 3600),
    },
    default_live_statuses=LIVE_STATUSES,
    default_cancel_statuses=CANCEL_STATUSES,
    expiry=KeyExpiry(
        credential="refresh token (リフレッシュトークン, 28 days)",
        field=ISSUED_FIELD,
        lifetime_s=REFRESH_TOKEN_LIFETIME_S,
        renewal=(
            "re-authorise goqd for the store with Yahoo! ID連携 (the refresh token lasts 28 "
            "days), write the new refresh_token and refresh_token_issued_at with the other "
            "fields to a JSON file and run `goqctl key set {store} --file new.json`"
        ),
    ),
)
