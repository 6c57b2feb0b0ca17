"""The control socket protocol: framing, the request envelope, every request and reply.

One frame is a 4-byte big-endian length followed by that many bytes of msgspec JSON. A
connection carries any number of request/reply pairs, strictly in turn::

    client -> Envelope(v=1, id="<uuid4 hex>", request=StockSet(sku="A-1", quantity=5))
    server -> ReplyEnvelope(v=1, id="<same id>", reply=Ok(result=StockChanged(...)))
           or ReplyEnvelope(v=1, id="<same id>", reply=Err(code="not_found", ...))

``id`` is chosen by the client, once per command: a retry of the same command sends the
same id, so a mutating request applied before the connection broke is not applied twice
(docs/reliability.md X1). The server copies it into the request's ``request_id`` field, which is
what the ledger deduplicates on.

Requests are tagged frozen Structs with ``forbid_unknown_fields``: a typo or a field from
a newer goqctl is refused with ``bad_request``, never guessed at. Tags are snake_case and
stable: renaming one breaks every goqctl in the field. Results reuse the ledger's reply
Structs from ``goqd.messages``; the few that only the control socket needs live here.

This module must never carry a credential anywhere but ``KeySet.credentials`` (which no
reply ever echoes), and it must never read more than the announced, capped frame length.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any, Literal

import msgspec
import trio
from msgspec import Meta

from goqd import limits
from goqd import messages as m
from goqd.errors import ControlError

PROTOCOL_VERSION = 1
# 32 MiB: enough for a 100,000-row catalogue or stock CSV in one all-or-nothing request.
# Only peers that passed the SO_PEERCRED check get to send that much.
MAX_REQUEST_BYTES = 32 << 20
MAX_REPLY_BYTES = 64 << 20  # replies may list a whole catalogue page or a long history

HEADER = struct.Struct(">I")

# Err codes. ``code`` is a plain str on the wire so an older goqctl can still show a
# code a newer daemon adds.
ERROR_CODES = frozenset(
    {
        "bad_request",  # undecodable, unknown request type, wrong field type or value
        "too_large",  # request frame over MAX_REQUEST_BYTES, or reply over MAX_REPLY_BYTES
        "unsupported_version",  # envelope ``v`` is not PROTOCOL_VERSION
        "not_allowed",  # the peer is not root, the daemon's user or in the admin group
        "not_found",  # no such store, SKU, listing or error id
        "conflict",  # the request is valid but the current state refuses it
        "unavailable",  # the mall or the daemon cannot do it right now; retry later
        "internal",  # a bug: the daemon logged it as control_request_failed
    }
)

# --------------------------------------------------------------------------------------
# Field constraints. Limits are generous for real catalogues and small enough that one
# request cannot make the daemon allocate much more than its frame.
# --------------------------------------------------------------------------------------

# The caps and the date rule are goqd.limits', shared with the CSV readers.
StoreName = Annotated[str, Meta(min_length=1, max_length=limits.MAX_STORE_NAME)]
OptStoreName = Annotated[str, Meta(max_length=limits.MAX_STORE_NAME)]  # "" means every store
Sku = Annotated[str, Meta(min_length=1, max_length=limits.MAX_SKU)]
ListingKey = Annotated[str, Meta(min_length=1, max_length=limits.MAX_LISTING_KEY)]
Reason = Annotated[str, Meta(max_length=1000)]
Cursor = Annotated[str, Meta(max_length=512)]
PageLimit = Annotated[int, Meta(ge=1, le=10_000)]
HistoryLimit = Annotated[int, Meta(ge=0, le=10_000)]
Quantity = Annotated[int, Meta(ge=0, le=limits.MAX_QUANTITY)]
Delta = Annotated[int, Meta(ge=-limits.MAX_DELTA, le=limits.MAX_DELTA)]
LeadTimeDays = Annotated[int, Meta(ge=0, le=limits.MAX_LEAD_TIME_DAYS)]
IsoDate = Annotated[str, Meta(pattern=limits.DATE_PATTERN)]
# A row id. SQLite binds only signed 64-bit integers, so every int in this block has an
# upper bound: a bigger value is a bad_request here, never an error inside the ledger.
ErrorId = Annotated[int, Meta(ge=1, le=2**63 - 1)]
RequestId = Annotated[str, Meta(max_length=128)]
CredentialField = Annotated[str, Meta(min_length=1, max_length=100)]
CredentialValue = Annotated[str, Meta(max_length=8192)]
CsvText = Annotated[str, Meta(max_length=MAX_REQUEST_BYTES)]


# --------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------


class _Request(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    pass


class _Mutating(_Request, frozen=True, kw_only=True):
    """A request that changes something. The server fills ``request_id`` from the envelope."""

    request_id: RequestId = ""


class Status(_Request, frozen=True, kw_only=True, tag="status"):
    """Daemon version, uptime, every store and the ledger's counters."""


class Stores(_Request, frozen=True, kw_only=True, tag="stores"):
    """Every store's state, error level, last good poll/push, outbox and key expiry."""


class Errors(_Request, frozen=True, kw_only=True, tag="errors"):
    """Errors, highest level first, then newest first; filtered by store, level and code
    (goqd's, or the mall's own such as ``IE0003``), paged by ``after`` (the last id shown)."""

    store: OptStoreName = ""
    include_cleared: bool = False
    level: Annotated[int, Meta(ge=1, le=9)] | None = None
    code: Annotated[str, Meta(max_length=100)] = ""
    after: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0
    limit: PageLimit = 500


class Parked(_Request, frozen=True, kw_only=True, tag="parked"):
    """Parked order lines (連携できない商品): store, order, line, listing, quantity, since
    when, and what to run. ``after`` is the last (store, order, line) of the page before."""

    store: OptStoreName = ""
    after: tuple[OptStoreName, Cursor, Cursor] = ("", "", "")
    limit: PageLimit = 500


class ErrorsClear(_Mutating, frozen=True, kw_only=True, tag="errors_clear"):
    """Clear errors by id, or every open error of ``store``."""

    ids: Annotated[tuple[ErrorId, ...], Meta(max_length=10_000)] = ()
    store: OptStoreName = ""

    def __post_init__(self) -> None:
        if not self.ids and not self.store:
            raise ValueError("errors_clear needs error ids or a store")


class KeySet(_Mutating, frozen=True, kw_only=True, tag="key_set"):
    """A renewed credential. Never logged and never echoed in a reply."""

    store: StoreName
    credentials: Annotated[
        dict[CredentialField, CredentialValue], Meta(min_length=1, max_length=32)
    ]

    def __repr__(self) -> str:
        # The default repr would print the credential in any traceback that shows it.
        return f"KeySet(store={self.store!r}, credentials=***)"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        # rich (pretty tracebacks with locals) asks for this instead of __repr__.
        return [("store", self.store), ("credentials", "***")]


class Pause(_Mutating, frozen=True, kw_only=True, tag="pause"):
    store: StoreName


class Resume(_Mutating, frozen=True, kw_only=True, tag="resume"):
    store: StoreName


class PollNow(_Mutating, frozen=True, kw_only=True, tag="poll_now"):
    store: StoreName


class Products(_Request, frozen=True, kw_only=True, tag="products"):
    after: Cursor = ""
    limit: PageLimit = 500


class Listings(_Request, frozen=True, kw_only=True, tag="listings"):
    store: StoreName
    after: Cursor = ""
    limit: PageLimit = 500


class LinkListing(_Mutating, frozen=True, kw_only=True, tag="link_listing"):
    store: StoreName
    listing_key: ListingKey
    sku: Sku


class UnlinkListing(_Mutating, frozen=True, kw_only=True, tag="unlink_listing"):
    store: StoreName
    listing_key: ListingKey


class LinkAuto(_Mutating, frozen=True, kw_only=True, tag="link_auto"):
    """Link what the store's link condition now matches ("" = every store)."""

    store: OptStoreName = ""


class StockSet(_Mutating, frozen=True, kw_only=True, tag="stock_set"):
    sku: Sku
    quantity: Quantity
    reason: Reason = ""


class StockAdjust(_Mutating, frozen=True, kw_only=True, tag="stock_adjust"):
    sku: Sku
    delta: Delta
    reason: Reason = ""


class History(_Request, frozen=True, kw_only=True, tag="history"):
    """A product's total and its latest movements (the reply is ``messages.History``)."""

    sku: Sku
    limit: HistoryLimit = 100


class ListingSet(_Mutating, frozen=True, kw_only=True, tag="listing_set"):
    """Change push attributes of one listing; ``None`` leaves a value as it is."""

    store: StoreName
    listing_key: ListingKey
    lead_time_days: LeadTimeDays | None = None
    restock_date: IsoDate | None = None
    allow_overdraft: bool | None = None

    def __post_init__(self) -> None:
        if self.restock_date is not None and not limits.is_calendar_date(self.restock_date):
            raise ValueError(
                f"restock_date {self.restock_date!r} is not a calendar date (YYYY-MM-DD)"
            )


class DeleteProduct(_Mutating, frozen=True, kw_only=True, tag="delete_product"):
    """Stop syncing a product. Never deletes anything at a mall."""

    sku: Sku


class Import(_Mutating, frozen=True, kw_only=True, tag="import"):
    """Import a store's listings from its mall, or from a goqd CSV when ``csv_text`` is set."""

    store: StoreName
    csv_text: CsvText | None = None


class Diff(_Request, frozen=True, kw_only=True, tag="diff"):
    """差異商品: linked listings whose mall count differs from the ledger's."""

    store: StoreName


class Reflect(_Mutating, frozen=True, kw_only=True, tag="reflect"):
    """反映: push the ledger's counts. An empty ``listing_keys`` means every listing."""

    store: StoreName
    listing_keys: Annotated[tuple[ListingKey, ...], Meta(max_length=100_000)] = ()


class StockImport(_Mutating, frozen=True, kw_only=True, tag="stock_import"):
    """Set or adjust totals in bulk from a goqd stock CSV (already decoded to text)."""

    csv_text: CsvText


ControlRequest = (
    Status
    | Stores
    | Errors
    | Parked
    | ErrorsClear
    | KeySet
    | Pause
    | Resume
    | PollNow
    | Products
    | Listings
    | LinkListing
    | UnlinkListing
    | LinkAuto
    | StockSet
    | StockAdjust
    | History
    | ListingSet
    | DeleteProduct
    | Import
    | Diff
    | Reflect
    | StockImport
)


def is_mutating(req: ControlRequest) -> bool:
    """True for requests that change state (logged with their peer, deduplicated by id)."""
    return isinstance(req, _Mutating)


def request_tag(req: ControlRequest) -> str:
    """The stable wire tag of a request, e.g. ``"stock_set"``."""
    return str(req.__struct_config__.tag)


# --------------------------------------------------------------------------------------
# Results that only the control socket needs (the rest are goqd.messages replies)
# --------------------------------------------------------------------------------------


class _Result(msgspec.Struct, frozen=True, kw_only=True):
    pass


StoreState = Literal["running", "degraded", "stopped", "paused", "down"]


class StoreInfo(_Result, frozen=True, kw_only=True, tag="store_info"):
    name: str
    mall: str
    state: StoreState
    error_level: int
    last_poll_ok_at: float | None
    last_push_ok_at: float | None
    outbox: int
    parked: int
    cursor: str | None
    credential_expires_at: float | None
    message: str = ""
    # Units held back because this mall's counter showed sales its orders do not yet.
    held: int = 0
    # Set when the credential expires within daemon.key-warning-days (or has expired):
    # one sentence saying when and how to renew it.
    key_warning: str = ""
    # Listings of this store marked 複数の商品が紐づいています (their orders park).
    ambiguous: int = 0


class StoreList(_Result, frozen=True, kw_only=True, tag="store_list"):
    stores: tuple[StoreInfo, ...]


class DaemonStatus(_Result, frozen=True, kw_only=True, tag="daemon_status"):
    version: str
    started_at: float
    uptime_s: float
    stores: tuple[StoreInfo, ...]
    ledger: m.LedgerStatus


class DiffRow(_Result, frozen=True, kw_only=True, tag="diff_row"):
    listing_key: str
    sku: str
    ledger_quantity: int
    mall_quantity: int | None  # None: the mall does not count this listing (unlimited)


class DiffReport(_Result, frozen=True, kw_only=True, tag="diff_report"):
    store: str
    rows: tuple[DiffRow, ...]
    checked: int


ControlResult = (
    m.Done
    | m.StockChanged
    | m.History
    | m.ErrorList
    | m.ParkedList
    | m.ProductList
    | m.ListingList
    | m.LedgerStatus
    | StoreList
    | DaemonStatus
    | DiffReport
    | m.LinkReport
)


# --------------------------------------------------------------------------------------
# Envelopes and replies
# --------------------------------------------------------------------------------------


class Ok(msgspec.Struct, frozen=True, kw_only=True, tag="ok"):
    result: ControlResult


class Err(msgspec.Struct, frozen=True, kw_only=True, tag="err"):
    """A refusal. ``hint`` tells the operator what to do next."""

    code: str  # one of ERROR_CODES
    message: str
    hint: str = ""


Reply = Ok | Err


class Envelope(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    v: int
    id: Annotated[str, Meta(min_length=1, max_length=128)]
    request: ControlRequest


class ReplyEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    v: int
    id: str
    reply: Reply


class _Header(msgspec.Struct, frozen=True):
    """Read first, leniently, so a newer client gets ``unsupported_version``, not a
    complaint about a request type this daemon has never heard of."""

    v: int
    id: str = ""


_request_decoder = msgspec.json.Decoder(Envelope)
_header_decoder = msgspec.json.Decoder(_Header)
_reply_decoder = msgspec.json.Decoder(ReplyEnvelope)
_encoder = msgspec.json.Encoder()


class FrameTooLarge(ControlError):
    """The peer announced a frame bigger than this side accepts."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")


class ConnectionClosed(ControlError):
    """The peer closed the connection, cleanly between frames (``partial=False``) or not."""

    def __init__(self, *, partial: bool) -> None:
        self.partial = partial
        super().__init__("connection closed mid-frame" if partial else "connection closed")


class BadEnvelope(ControlError):
    """A request frame that could not be decoded. Carries the ready-made ``Err``."""

    def __init__(self, err: Err, request_id: str) -> None:
        self.err = err
        self.request_id = request_id
        super().__init__(err.message)


def encode_frame(obj: Envelope | ReplyEnvelope) -> bytes:
    body = _encoder.encode(obj)
    return HEADER.pack(len(body)) + body


def decode_request(body: bytes) -> Envelope:
    """Decode one request body, or raise ``BadEnvelope`` with the reply to send.

    Whatever the bytes, the outcome is an ``Envelope`` or a ``BadEnvelope``: the body
    comes from another user's process and is the first thing the daemon parses.
    """
    try:
        header = _header_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadEnvelope(
            Err(code="bad_request", message=_clip(f"not a goqd request: {exc}")), ""
        ) from exc
    except Exception as exc:
        raise BadEnvelope(_bad_request(f"not a goqd request: {_problem(exc)}"), "") from exc
    rid = header.id[:128]
    if header.v != PROTOCOL_VERSION:
        raise BadEnvelope(
            Err(
                code="unsupported_version",
                message=f"protocol version {header.v} is not supported; "
                f"this goqd speaks version {PROTOCOL_VERSION}",
                hint="use the goqctl installed with this goqd",
            ),
            rid,
        )
    try:
        return _request_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # msgspec's messages name the path and the rule ("Expected `int`, got `str` - at
        # `$.request.quantity`"), never the offending value: safe to send back and log.
        raise BadEnvelope(
            Err(code="bad_request", message=_clip(f"invalid request: {exc}")), rid
        ) from exc
    except Exception as exc:
        raise BadEnvelope(_bad_request(f"not a goqd request: {_problem(exc)}"), rid) from exc


def _problem(exc: Exception) -> str:
    # msgspec raises RecursionError for deeply nested JSON (even inside a field it would
    # skip); anything else it raises is answered the same way rather than dropping the
    # connection without a reply. The text names the problem, never the content.
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    return f"undecodable ({type(exc).__name__})"


def _bad_request(message: str) -> Err:
    return Err(code="bad_request", message=message)


def _clip(text: str, limit: int = 400) -> str:
    # An unknown tag is quoted in msgspec's message; a hostile one may be a megabyte.
    return text if len(text) <= limit else text[: limit - 1] + "…"


def decode_reply(body: bytes) -> ReplyEnvelope:
    """Decode one reply body, or raise ``ControlError`` saying it could not be read."""
    try:
        return _reply_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ControlError(_clip(f"the daemon sent a reply goqctl cannot read: {exc}")) from exc
    except Exception as exc:
        # Whatever is on the other end of the socket, goqctl reports, never crashes.
        raise ControlError(f"the daemon sent a reply goqctl cannot read: {_problem(exc)}") from exc


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int, *, started: bool) -> bytes:
    """Read exactly ``n`` bytes; ``ConnectionClosed`` if the stream ends first
    (``partial`` when ``started`` or when some of the ``n`` bytes had come)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(min(n - len(buf), 1 << 16))
        if not chunk:
            raise ConnectionClosed(partial=started or bool(buf))
        buf += chunk
    return bytes(buf)


async def receive_frame(stream: trio.abc.ReceiveStream, max_bytes: int) -> bytes:
    """Read one frame body. Raises ``ConnectionClosed`` or ``FrameTooLarge`` (before
    reading the body, so an oversized announcement costs no memory)."""
    header = await receive_exactly(stream, HEADER.size, started=False)
    (size,) = HEADER.unpack(header)
    if size > max_bytes:
        raise FrameTooLarge(size, max_bytes)
    return await receive_exactly(stream, size, started=True)
