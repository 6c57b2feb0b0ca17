"""The control socket protocol: framing, the request envelope, every request and reply.

One frame is a 4-byte big-endian length followed by that many bytes of msgspec JSON. A
connection carries any number of request/reply pairs, strictly in turn::

    client -> Envelope(v=1, id="<uuid4 hex>", request=SetStock(sku="A-1", quantity=5))
    server -> ReplyEnvelope(v=1, id="<same id>", reply=Ok(result=StockChanged(...)))
           or ReplyEnvelope(v=1, id="<same id>", reply=Err(code="not_found", ...))

A request that sets ``progress`` in its envelope may get progress frames before its
reply, on the same connection; a request that does not gets its one reply, as ever::

    client -> Envelope(v=1, id="<id>", progress=True, request=StockImport(...))
    server -> ProgressEnvelope(v=1, id="<id>", progress=Progress(phase="apply", done=40000,
                                                                 total=100000, unit="rows"))
    server -> ... (zero or more of them, a few a second at most)
    server -> ReplyEnvelope(v=1, id="<id>", reply=Ok(result=Done(...)))

Progress is best-effort: the daemon sends only the latest when the reader is slow, and
stops sending it (never the work) when the reader stalls.

``id`` is chosen by the client, once per command: a retry of the same command sends the
same id, so a mutating request applied before the connection broke is not applied twice
(docs/reliability.md X1). The server copies it into the request's ``request_id`` field, which is
what the ledger deduplicates on.

Requests are tagged frozen Structs with ``forbid_unknown_fields``: a typo or a field from
a newer goqctl is refused with ``bad_request``, never guessed at. Tags are snake_case and
stable: renaming one breaks every goqctl in the field. A request that is a ledger request
as it stands is decoded straight into that Struct of ``goqd.messages`` (which carries
this socket's tag and constraints); the others are defined here. Results reuse the
ledger's reply Structs from ``goqd.messages``; the few that only the control socket
needs live here.

This module must never carry a credential anywhere but ``KeySet.credentials`` (which no
reply ever echoes), and it must never read more than the announced, capped frame length.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec
import trio
from msgspec import Meta

from goqd import limits
from goqd import messages as m
from goqd.errors import BadEnvelope as BadEnvelope
from goqd.errors import ConnectionClosed as ConnectionClosed
from goqd.errors import ControlError
from goqd.errors import FrameTooLarge as FrameTooLarge

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
# Requests
#
# A request that maps one-to-one onto a ledger request is that ledger request: its
# Struct in ``goqd.messages`` carries this socket's tag and constraints, and the daemon
# hands it to the ledger as decoded (``goqd.control.operator`` has one table row for
# it). The requests here are the others: they need the daemon's configuration, a mall
# session, the supervisor or several ledger requests.
# --------------------------------------------------------------------------------------

# Caps of the fields only these requests have. The shared ones (``m.StoreName``,
# ``m.Sku``, ...) are goqd.messages', which takes them from goqd.limits, shared with the
# CSV readers.
CredentialField = Annotated[str, Meta(min_length=1, max_length=100)]
CredentialValue = Annotated[str, Meta(max_length=8192)]
CsvText = Annotated[str, Meta(max_length=MAX_REQUEST_BYTES)]


class _Request(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    pass


class _Mutating(_Request, frozen=True, kw_only=True):
    """A request that changes something. The server fills ``request_id`` from the envelope."""

    request_id: m.RequestId = ""


class Status(_Request, frozen=True, kw_only=True, tag="status"):
    """Daemon version, uptime, every store and the ledger's counters."""


class Stores(_Request, frozen=True, kw_only=True, tag="stores"):
    """Every store's state, error level, last good poll/push, outbox and key expiry."""


class KeySet(_Mutating, frozen=True, kw_only=True, tag="key_set"):
    """A renewed credential. Never logged and never echoed in a reply."""

    store: m.StoreName
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
    store: m.StoreName


class Resume(_Mutating, frozen=True, kw_only=True, tag="resume"):
    store: m.StoreName


class PollNow(_Mutating, frozen=True, kw_only=True, tag="poll_now"):
    store: m.StoreName


class LinkAuto(_Mutating, frozen=True, kw_only=True, tag="link_auto"):
    """Link what the store's link condition now matches ("" = every store)."""

    store: m.OptStoreName = ""


class Import(_Mutating, frozen=True, kw_only=True, tag="import"):
    """Import a store's listings from its mall, or from a goqd CSV when ``csv_text`` is set.

    ``create_products``: a listing no product matches creates one, in any store (the
    base store's always do)."""

    store: m.StoreName
    csv_text: CsvText | None = None
    create_products: bool = False


class ProductAdd(_Mutating, frozen=True, kw_only=True, tag="product_add"):
    """Register a product by hand with its 総在庫数, then link the listings of every store
    that the link condition matches to it. An existing SKU is a ``conflict``."""

    sku: m.Sku
    quantity: m.Quantity
    name: Annotated[str, Meta(max_length=limits.MAX_NAME)] = ""

    def __post_init__(self) -> None:
        # A CSV may not hold NUL either; a SKU no CSV could name is one no file can fix.
        if "\x00" in self.sku or "\x00" in self.name:
            raise ValueError("sku and name must not contain NUL characters")


class Diff(_Request, frozen=True, kw_only=True, tag="diff"):
    """差異商品: linked listings whose mall count differs from the ledger's."""

    store: m.StoreName


class Reflect(_Mutating, frozen=True, kw_only=True, tag="reflect"):
    """反映: push the ledger's counts. An empty ``listing_keys`` means every listing;
    ``differing``: the listings the store's last diff found 差異."""

    store: m.StoreName
    listing_keys: Annotated[tuple[m.ListingKey, ...], Meta(max_length=100_000)] = ()
    differing: bool = False

    def __post_init__(self) -> None:
        if self.differing and self.listing_keys:
            raise ValueError("reflect takes listing keys or differing, not both")


class StockImport(_Mutating, frozen=True, kw_only=True, tag="stock_import"):
    """Set or adjust totals in bulk from a goqd stock CSV (already decoded to text)."""

    csv_text: CsvText


ControlRequest = (
    Status
    | Stores
    | KeySet
    | Pause
    | Resume
    | PollNow
    | LinkAuto
    | ProductAdd
    | Import
    | Diff
    | Reflect
    | StockImport
    | m.OperatorLedgerRequest
)


def is_mutating(req: ControlRequest) -> bool:
    """True for requests that change state (logged with their peer, deduplicated by id):
    those with a ``request_id``, which the server fills from the envelope."""
    return "request_id" in req.__struct_fields__


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
    # What the last reload (SIGHUP) found: keys changed in the config file that take
    # effect only when goqd is restarted, and why a refused reload was refused ("" once
    # a reload succeeds).
    restart_needed: tuple[str, ...] = ()
    reload_error: str = ""


# DiffRow.status: "differs" is 差異 (what `reflect --differing` pushes); "pending": a
# push to the listing was queued or in flight, or its count moved, while the mall was
# read; "held": the difference is within the units the sale watch holds for the
# product; "no_count": goqd has no count for the product, so nothing is pushed.
# "attrs": the count is right, a mall attribute goqd pushes is not (the next push
# overwrites what was changed at the mall); `reflect --differing` pushes these too.
DiffStatus = Literal["differs", "attrs", "pending", "held", "no_count"]
AttrName = Literal["lead_time", "restock_date", "allow_overdraft"]


class AttrDiff(_Result, frozen=True, kw_only=True, tag="attr_diff"):
    """One mall attribute of a listing that is not what goqd pushes."""

    name: AttrName
    ledger: int | str | bool  # goqd's value
    mall: int | str | bool  # the mall's


class DiffRow(_Result, frozen=True, kw_only=True, tag="diff_row"):
    listing_key: str
    sku: str
    ledger_quantity: int  # what goqd has the malls show: total less held units
    mall_quantity: int | None  # None: the mall does not count this listing (unlimited)
    pending_quantity: int | None = None  # the push queued or in flight for the listing
    held: int = 0  # units the sale watch holds for the product
    status: DiffStatus = "differs"
    # Compared only where both goqd and the mall hold a value.
    attrs_differ: tuple[AttrDiff, ...] = ()


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
    | m.ProductAdded
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


class Envelope(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    v: int
    id: Annotated[str, Meta(min_length=1, max_length=128)]
    request: ControlRequest
    # The client reads ``ProgressEnvelope`` frames before the reply. Omitted when false,
    # so a request without it is the same bytes an older goqctl sends.
    progress: bool = False


class ReplyEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    v: int
    id: str
    reply: Reply


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    """How far a long request has got: ``done`` of ``total`` (``None``: not known yet)
    ``unit`` in its current ``phase`` (``"apply"``, 40000, 100000, ``"rows"``).

    ``done`` counts up within a phase and starts again in the next one. Unknown fields
    are ignored, so a newer daemon can say more without breaking this goqctl."""

    phase: Annotated[str, Meta(max_length=100)]
    done: Annotated[int, Meta(ge=0)]
    total: Annotated[int, Meta(ge=0)] | None = None
    unit: Annotated[str, Meta(max_length=100)] = ""


# How the work reports progress to whoever asked: called often and never blocks.
ReportProgress = Callable[[Progress], None]


def no_progress(progress: Progress) -> None:
    """A ``ReportProgress`` for work nobody follows."""


class ProgressEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    """A progress frame of request ``id``, sent only if its envelope asked for them."""

    v: int
    id: str
    progress: Progress


class _ServerFrame(msgspec.Struct, frozen=True, kw_only=True):
    # A reply frame or a progress frame, told apart by which field is set.
    v: int
    id: str = ""
    reply: Reply | None = None
    progress: Progress | None = None


class _Header(msgspec.Struct, frozen=True):
    """Read first, leniently, so a newer client gets ``unsupported_version``, not a
    complaint about a request type this daemon has never heard of."""

    v: int
    id: str = ""


_request_decoder = msgspec.json.Decoder(Envelope)
_header_decoder = msgspec.json.Decoder(_Header)
_reply_decoder = msgspec.json.Decoder(ReplyEnvelope)
_server_frame_decoder = msgspec.json.Decoder(_ServerFrame)
_encoder = msgspec.json.Encoder()


def encode_frame(obj: Envelope | ReplyEnvelope | ProgressEnvelope) -> bytes:
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


def decode_server_frame(body: bytes) -> ReplyEnvelope | ProgressEnvelope:
    """Decode a frame of a request that asked for progress: its reply, or one of its
    progress frames. ``ControlError`` if it is neither or cannot be read."""
    try:
        frame = _server_frame_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ControlError(_clip(f"the daemon sent a reply goqctl cannot read: {exc}")) from exc
    except Exception as exc:
        raise ControlError(f"the daemon sent a reply goqctl cannot read: {_problem(exc)}") from exc
    if frame.reply is not None and frame.progress is None:
        return ReplyEnvelope(v=frame.v, id=frame.id, reply=frame.reply)
    if frame.progress is not None and frame.reply is None:
        return ProgressEnvelope(v=frame.v, id=frame.id, progress=frame.progress)
    raise ControlError("the daemon sent a frame that is neither a reply nor progress")


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
