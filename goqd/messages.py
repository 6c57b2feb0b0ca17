"""Frozen tagged messages passed between actors, and the ledger's replies.

Facts are named in the past tense (``OrderLinesSeen``, ``PushesDone``), requests in the
imperative (``TakePushes``, ``SetStock``). Tags are snake_case and stable: replies travel
over the control socket and some messages are persisted, so never rename a tag.

Internal messages are not validated at runtime (msgspec validates only on decode);
mypy checks them. Anything that comes from outside (mall responses, control requests)
is decoded into a Struct before it becomes one of these. The operator requests that
map one-to-one onto a ledger request (``_OperatorRequest``) are decoded from the
control socket straight into it: their tags are the socket's, and their fields carry
the socket's constraints.

This module must never import trio, httpx or sqlite3: it is the shared vocabulary.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from goqd import limits
from goqd.errors import LEVEL_CREDENTIAL


class _Msg(msgspec.Struct, frozen=True, kw_only=True):
    pass


class _OperatorRequest(
    _Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """A ledger request goqctl sends over the control socket exactly as the ledger takes
    it (``goqd.control.protocol.ControlRequest`` decodes it straight into this Struct).

    Its tag is the control socket's (``stock_set``), stable for every goqctl in the
    field; unknown fields are refused, never guessed at; the field constraints below are
    checked when the request is decoded (msgspec validates only then), so a value the
    ledger could not take is a ``bad_request`` at the socket, never an error inside the
    ledger. Defaults are left out when encoding: goqctl sends the bytes it always sent.

    The ledger binds a mutating one to its request id by a digest of its class name and
    fields (``goqd.ledger.db.request_digest``), not of this encoding: the tag and the
    left-out defaults can change without a retry across the upgrade being taken for
    another request. Renaming the class or a field would change the digest.
    """


# --------------------------------------------------------------------------------------
# Field constraints of what the control socket takes. Generous for real catalogues and
# small enough that one request cannot make the daemon allocate much more than its frame.
# The caps and the date rule are goqd.limits', shared with the CSV readers.
# --------------------------------------------------------------------------------------

StoreName = Annotated[str, Meta(min_length=1, max_length=limits.MAX_STORE_NAME)]
OptStoreName = Annotated[str, Meta(max_length=limits.MAX_STORE_NAME)]  # "" means every store
Sku = Annotated[str, Meta(min_length=1, max_length=limits.MAX_SKU)]
ListingKey = Annotated[str, Meta(min_length=1, max_length=limits.MAX_LISTING_KEY)]
Reason = Annotated[str, Meta(max_length=1000)]
PageCursor = Annotated[str, Meta(max_length=512)]
PageLimit = Annotated[int, Meta(ge=1, le=10_000)]
HistoryLimit = Annotated[int, Meta(ge=0, le=10_000)]
Quantity = Annotated[int, Meta(ge=0, le=limits.MAX_QUANTITY)]
Delta = Annotated[int, Meta(ge=-limits.MAX_DELTA, le=limits.MAX_DELTA)]
LeadTimeDays = Annotated[int, Meta(ge=0, le=limits.MAX_LEAD_TIME_DAYS)]
IsoDate = Annotated[str, Meta(pattern=limits.DATE_PATTERN)]
ErrorLevel = Annotated[int, Meta(ge=1, le=LEVEL_CREDENTIAL)]
# A row id. SQLite binds only signed 64-bit integers, so every int here has an upper
# bound: a bigger value is a bad_request at the socket, never an error inside the ledger.
ErrorId = Annotated[int, Meta(ge=1, le=2**63 - 1)]
RequestId = Annotated[str, Meta(max_length=128)]
MAX_SEARCH = 200  # `goqctl listings --search`: characters, ample for a name


# --------------------------------------------------------------------------------------
# Shared domain records
# --------------------------------------------------------------------------------------


class OrderLine(_Msg, frozen=True, kw_only=True, tag="order_line"):
    """One order line as a mall showed it at one moment.

    ``listing_key`` is the mall's identity for the stock counter (Rakuten
    ``manageNumber/variantId``, Yahoo item code, Amazon SellerSKU, ...). ``link_code`` is
    the code the link condition matches against product SKUs. ``updated_at`` is the
    mall's update time in epoch seconds: an observation older than the booked one is
    ignored. ``terminal`` marks a cancellation the mall never undoes (Rakuten 900,
    Yahoo 4).
    """

    order_id: str
    line_id: str
    listing_key: str
    link_code: str = ""
    quantity: int
    cancelled: bool = False
    terminal: bool = False
    updated_at: float
    status: str = ""


class ListingAttrs(_Msg, frozen=True, kw_only=True, tag="listing_attrs"):
    """Mall attributes that go out with every stock push (docs/design.md §2 item 3).

    ``extra`` holds mall-specific identifiers resolved at import (Shopify inventory
    item and location ids, au PAY choice codes) as strings.
    """

    allow_overdraft: bool | None = None  # Yahoo 超過購入設定
    lead_time_days: int | None = None  # Amazon lead_time_to_ship_max_days
    restock_date: str | None = None  # Amazon 入荷予定日, YYYY-MM-DD
    extra: dict[str, str] = msgspec.field(default_factory=dict)


class MallCount(_Msg, frozen=True, kw_only=True, tag="mall_count"):
    """What a mall showed for one listing when read: its count (None: unlimited) and
    the attributes goqd pushes, as the mall holds them. An attribute is ``None`` where
    the mall reported none (a mall without such an attribute, or one not set there):
    nothing to compare goqd's value with.
    """

    quantity: int | None
    attrs: ListingAttrs = msgspec.field(default_factory=ListingAttrs)


class PushItem(_Msg, frozen=True, kw_only=True, tag="push_item"):
    """Set ``listing_key`` to ``quantity`` at the mall. ``version`` orders pushes."""

    listing_key: str
    sku: str
    quantity: int
    version: int
    attrs: ListingAttrs = msgspec.field(default_factory=ListingAttrs)
    # The count goqd last saw accepted for this listing (before any push, the count it
    # last saw at the mall); compare-and-set malls use it.
    previous_quantity: int | None = None


STALE = "stale"  # PushOutcome.code: a compare-and-set found the mall's count had moved


class PushOutcome(_Msg, frozen=True, kw_only=True, tag="push_outcome"):
    """What the mall said about one pushed listing.

    ``code == STALE``: the mall's count was not what goqd last set (a sale goqd has not
    polled yet). The store actor polls, re-reads the count into ``quantity`` and the
    ledger retries shortly with that as the compare value; it is not an error.
    """

    listing_key: str
    version: int
    accepted: bool
    code: str = ""
    message: str = ""
    # The count that was sent; the store actor fills it from the PushItem so the
    # ledger can record what the mall now shows.
    quantity: int | None = None


class MallListing(_Msg, frozen=True, kw_only=True, tag="mall_listing"):
    """A listing read from a mall (import, discrepancy check)."""

    listing_key: str
    link_code: str = ""
    name: str = ""
    quantity: int | None = None  # None: the mall does not track a count (unlimited)
    attrs: ListingAttrs = msgspec.field(default_factory=ListingAttrs)


# --------------------------------------------------------------------------------------
# Ledger requests (the ledger inbox accepts exactly these)
# --------------------------------------------------------------------------------------


class OrderLinesSeen(_Msg, frozen=True, kw_only=True, tag="order_lines_seen"):
    """A store actor saw these lines; ``cursor`` commits in the same transaction."""

    store: str
    lines: tuple[OrderLine, ...]
    cursor: str | None = None


class GetCursor(_Msg, frozen=True, kw_only=True, tag="get_cursor"):
    store: str


class TakePushes(_Msg, frozen=True, kw_only=True, tag="take_pushes"):
    """Give me up to ``limit`` pending pushes for ``store`` (they stay in the outbox).

    The rows handed out count as sent (a counter at their count is no sign of a sale)
    unless ``peek``: the store only wants to know which listings it is about to push.
    """

    store: str
    limit: int
    peek: bool = False


class PushesDone(_Msg, frozen=True, kw_only=True, tag="pushes_done"):
    store: str
    outcomes: tuple[PushOutcome, ...]


class GetWatchList(_Msg, frozen=True, kw_only=True, tag="get_watch_list"):
    """Which of ``store``'s listings the sale watch should read this round, up to
    ``limit``: every listing holding units; for half the rest, linked listings of
    recently sold products, most recently sold first; then listings with at most
    ``below`` units in key order after ``after`` (so every one is read in turn)."""

    store: str
    below: int
    limit: int
    after: str = ""


class SeenCount(_Msg, frozen=True, kw_only=True, tag="seen_count"):
    listing_key: str
    quantity: int


class StockSeen(_Msg, frozen=True, kw_only=True, tag="stock_seen"):
    """What the mall's own counters showed, read at ``read_started`` (wall clock).

    The ledger holds back units a counter lost without a booked order and releases
    holds older than ``hold_expiry`` seconds (docs/design.md §4, the sale watch).
    """

    store: str
    counts: tuple[SeenCount, ...]
    read_started: float
    hold_expiry: float
    # Every sale before this wall time has been booked (a committed poll covered it),
    # so a hold older than that is not a sale: release it.
    explained_before: float = 0.0


class UpsertProduct(_Msg, frozen=True, kw_only=True, tag="upsert_product"):
    """Create a product (with its initial total) or rename an existing one."""

    sku: str
    name: str = ""
    total: int | None = None  # only used when the product is new
    store: str = ""  # the store it was first imported from
    # False: the count is unknown (unlimited or untracked at that store): the product is
    # created at 0 and nothing is pushed for it until a count is set.
    count_known: bool = True
    request_id: str = ""


class UpsertListing(_Msg, frozen=True, kw_only=True, tag="upsert_listing"):
    """Register or update a listing; ``sku`` links it when given."""

    store: str
    listing_key: str
    link_code: str = ""
    name: str = ""
    attrs: ListingAttrs | None = None  # None keeps what is stored
    sku: str | None = None
    seen_quantity: int | None = None
    request_id: str = ""


class SetListingAttrs(_OperatorRequest, frozen=True, kw_only=True, tag="listing_set"):
    """Operator change of push attributes; queues a push with the new values.
    ``None`` leaves a value as it is."""

    store: StoreName
    listing_key: ListingKey
    allow_overdraft: bool | None = None
    lead_time_days: LeadTimeDays | None = None
    restock_date: IsoDate | None = None
    request_id: RequestId = ""

    def __post_init__(self) -> None:
        if self.restock_date is not None and not limits.is_calendar_date(self.restock_date):
            raise ValueError(
                f"restock_date {self.restock_date!r} is not a calendar date (YYYY-MM-DD)"
            )


class Link(_OperatorRequest, frozen=True, kw_only=True, tag="link_listing"):
    store: StoreName
    listing_key: ListingKey
    sku: Sku
    request_id: RequestId = ""


class Unlink(_OperatorRequest, frozen=True, kw_only=True, tag="unlink_listing"):
    store: StoreName
    listing_key: ListingKey
    request_id: RequestId = ""


class DeleteProduct(_OperatorRequest, frozen=True, kw_only=True, tag="delete_product"):
    """Stop syncing a product. Never deletes anything at a mall."""

    sku: Sku
    request_id: RequestId = ""


class AddProduct(_Msg, frozen=True, kw_only=True, tag="add_product"):
    """`goqctl product add`: a product with the operator's count, from no store's import.

    An existing SKU is refused. Then every unlinked listing of ``stores`` (each with its
    link normalisation) whose code matches the SKU is linked, as an import links.
    """

    sku: str
    quantity: int
    name: str = ""
    stores: tuple[tuple[str, tuple[str, ...]], ...] = ()
    request_id: str = ""


class SetStock(_OperatorRequest, frozen=True, kw_only=True, tag="stock_set"):
    sku: Sku
    quantity: Quantity
    reason: Reason = ""
    request_id: RequestId = ""


class AdjustStock(_OperatorRequest, frozen=True, kw_only=True, tag="stock_adjust"):
    sku: Sku
    delta: Delta
    reason: Reason = ""
    request_id: RequestId = ""


class GetHistory(_OperatorRequest, frozen=True, kw_only=True, tag="history"):
    """A product's total and its latest movements (answered with ``History``)."""

    sku: Sku
    limit: HistoryLimit = 100


class RecordError(_Msg, frozen=True, kw_only=True, tag="record_error"):
    """Record (or bump the count of) an open error for a store or one listing.

    ``code`` is one of goqd's documented codes (``goqd.errors.ERROR_CODES``); the code the
    mall itself gave (``IE0003``, ``ES05-01``, ``QuotaExceeded``), if any, goes in
    ``mall_code`` and is shown beside it.
    """

    store: str
    level: int
    code: str
    message: str
    listing_key: str = ""
    mall_code: str = ""


class ResolveErrors(_Msg, frozen=True, kw_only=True, tag="resolve_errors"):
    """The cause of these open errors went away by itself: mark them resolved.

    The store actor sends it when the store recovers (a poll or push went through after
    a failure): the store's own level-8 errors (``listing_key`` "", ``codes`` those of
    its calls' failures) are resolved, kept in history with the time and
    ``cleared_by = "healed"``. ``codes`` narrows it (empty:
    every code); ``before`` leaves alone errors seen after that wall time (a failure
    recorded after the recovery is a new episode). Level 9 never heals by itself.
    """

    store: str
    listing_key: str = ""
    codes: tuple[str, ...] = ()
    before: float | None = None


class ClearErrors(_OperatorRequest, frozen=True, kw_only=True, tag="errors_clear"):
    """Clear errors by id, or every open error of ``store`` (optionally one level)."""

    ids: Annotated[tuple[ErrorId, ...], Meta(max_length=10_000)] = ()
    store: OptStoreName = ""
    level: ErrorLevel | None = None
    request_id: RequestId = ""

    def __post_init__(self) -> None:
        if not self.ids and not self.store:
            raise ValueError("errors_clear needs error ids or a store")


class ListErrors(_OperatorRequest, frozen=True, kw_only=True, tag="errors"):
    """Errors, highest level first, then newest first (by id).

    Filters: ``store``, ``level``, ``code`` (goqd's code or the mall's own, such as
    ``IE0003``). Paging: ``after`` is the id of the last error of the previous page (0:
    from the top).
    """

    store: OptStoreName = ""
    include_cleared: bool = False
    level: ErrorLevel | None = None
    code: Annotated[str, Meta(max_length=100)] = ""
    after: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0
    limit: PageLimit = 500


class ListParked(_OperatorRequest, frozen=True, kw_only=True, tag="parked"):
    """Parked order lines (連携できない商品), by store, order and line: store, order,
    line, listing, quantity, since when, and what to run.

    ``after`` is ``(store, order_id, line_id)`` of the last line of the previous page.
    """

    store: OptStoreName = ""
    after: tuple[OptStoreName, PageCursor, PageCursor] = ("", "", "")
    limit: PageLimit = 500


class ListProducts(_OperatorRequest, frozen=True, kw_only=True, tag="products"):
    after: PageCursor = ""
    limit: PageLimit = 500


class ListListings(_OperatorRequest, frozen=True, kw_only=True, tag="listings"):
    """A store's listings in key order from ``after``.

    ``state``: only ``linked``, ``unlinked`` or ``ambiguous`` listings, or ``parked``
    (those with parked order lines); "" every listing. ``search``: only listings whose
    key, code, SKU or name contains it (ASCII letters in any case). ``keys``: exactly
    these listings (the others are ignored), for a reader that already has a page.
    """

    store: StoreName
    after: PageCursor = ""
    limit: PageLimit = 500
    state: Literal["", "linked", "unlinked", "ambiguous", "parked"] = ""
    search: Annotated[str, Meta(max_length=MAX_SEARCH)] = ""
    keys: Annotated[tuple[ListingKey, ...], Meta(max_length=10_000)] = ()


class CountListings(_Msg, frozen=True, kw_only=True, tag="count_listings"):
    """How many listings of ``store`` are in link ``state``: the total a diff's progress
    counts towards (answered with ``ListingCount``)."""

    store: str
    state: Literal["linked", "unlinked", "ambiguous"] = "linked"


class ImportListings(_Msg, frozen=True, kw_only=True, tag="import_listings"):
    """Listings read from a store (API or CSV), applied as one chunk.

    ``base``: the store is the 基本モール, so unmatched listings create products.
    ``rules``: the store's link normalisation (``goqd.linking``). ``default_lead_time``
    replaces the mall's lead time for listings new to goqd (never imported before); a
    lead time goqd already knows is kept whatever the mall says.
    """

    store: str
    listings: tuple[MallListing, ...]
    base: bool = False
    rules: tuple[str, ...] = ()
    default_lead_time: int | None = None
    # `goqctl import STORE --create-products`: unmatched listings of this (non-base)
    # store create products too, as the base store's do.
    create_products: bool = False


class AutoLink(_Msg, frozen=True, kw_only=True, tag="auto_link"):
    """Link every unlinked listing of ``store`` whose code now matches one product."""

    store: str
    rules: tuple[str, ...] = ()


class QueuePushes(_Msg, frozen=True, kw_only=True, tag="queue_pushes"):
    """反映: queue the ledger's count for these listings (every linked one if empty)."""

    store: str
    listing_keys: tuple[str, ...] = ()
    # False: skip listings that are gone or unlinked instead of refusing (the store
    # actor re-asserting counts after an ambiguous push failure).
    strict: bool = True
    request_id: str = ""


class DiffFound(_Msg, frozen=True, kw_only=True, tag="diff_found"):
    """A diff of ``store`` finished: ``listing_keys`` are the listings it found 差異
    (a push pending or held units explained the others). Replaces the store's last diff,
    which ``ReflectDiffering`` pushes; a diff that did not finish records nothing."""

    store: str
    listing_keys: tuple[str, ...] = ()
    checked: int = 0


class ReflectDiffering(_Msg, frozen=True, kw_only=True, tag="reflect_differing"):
    """反映 the listings the last diff of ``store`` found 差異 (``DiffFound``)."""

    store: str
    request_id: str = ""


class SetStocks(_Msg, frozen=True, kw_only=True, tag="set_stocks"):
    """Bulk stock edit (CSV): all rows or none."""

    items: tuple[tuple[str, int], ...]
    mode: Literal["set", "adjust"] = "set"
    reason: str = ""
    request_id: str = ""


class GetLedgerStatus(_Msg, frozen=True, kw_only=True, tag="get_ledger_status"):
    pass


class GetStoreStats(_Msg, frozen=True, kw_only=True, tag="get_store_stats"):
    """Per-store outbox, parked and error counts only: cheap enough for every scrape."""


class Ping(_Msg, frozen=True, kw_only=True, tag="ping"):
    """Watchdog probe: answered only if the database answers."""


class StockImportStep(_Msg, frozen=True, kw_only=True):
    """One step of a staged stock import (``goqctl stock import``).

    A large file is never applied in one transaction: its checked rows are staged
    (``StageStockRows``, a chunk a request), the import is sealed once every row is
    staged, then applied a chunk a transaction (``ApplyStockImport``) with its progress
    in the same transaction. A sealed import is finished even across a restart; one
    never sealed is discarded. Nothing is applied before every row passed its checks.
    """


class BeginStockImport(StockImportStep, frozen=True, kw_only=True, tag="begin_stock_import"):
    """Open the import for one control request, or find it again.

    ``request_id`` ties the import to the goqctl command, so a retry finds the same
    import (and its reply once applied) instead of staging the file twice; ``digest``
    (SHA-256 of the CSV text) tells a retry from another file sent under the same id.
    An empty ``request_id`` always opens a new import.
    """

    request_id: str = ""
    digest: bytes
    mode: Literal["set", "adjust"]
    reason: str = ""


class StageStockRows(StockImportStep, frozen=True, kw_only=True, tag="stage_stock_rows"):
    """Checked CSV rows ``(line, sku, n)`` of an import that is still staging.

    Refused with an ``InputError`` naming the line (``where`` starts the message) for a
    SKU the ledger does not have or one this import already staged.
    """

    import_id: int
    rows: tuple[tuple[int, str, int], ...]
    where: str = "CSV"


class SealStockImport(StockImportStep, frozen=True, kw_only=True, tag="seal_stock_import"):
    """Every one of ``rows`` rows is staged: from now on the import will be applied."""

    import_id: int
    rows: int


class ApplyStockImport(StockImportStep, frozen=True, kw_only=True, tag="apply_stock_import"):
    """Apply the next ``limit`` staged rows of a sealed import."""

    import_id: int
    limit: int


class DiscardStockImport(StockImportStep, frozen=True, kw_only=True, tag="discard_stock_import"):
    """Drop an import that was never sealed, deleting up to ``limit`` staged rows a call."""

    import_id: int
    limit: int


class ListStockImports(StockImportStep, frozen=True, kw_only=True, tag="list_stock_imports"):
    """Imports with work left: sealed and not finished, or unsealed with staged rows."""


LedgerRequest = (
    OrderLinesSeen
    | GetCursor
    | TakePushes
    | PushesDone
    | GetWatchList
    | StockSeen
    | UpsertProduct
    | UpsertListing
    | SetListingAttrs
    | Link
    | Unlink
    | DeleteProduct
    | AddProduct
    | SetStock
    | AdjustStock
    | GetHistory
    | RecordError
    | ResolveErrors
    | ClearErrors
    | ListErrors
    | ListParked
    | ListProducts
    | ListListings
    | CountListings
    | ImportListings
    | AutoLink
    | QueuePushes
    | DiffFound
    | ReflectDiffering
    | SetStocks
    | GetLedgerStatus
    | GetStoreStats
    | Ping
    | BeginStockImport
    | StageStockRows
    | SealStockImport
    | ApplyStockImport
    | DiscardStockImport
    | ListStockImports
)

# The ledger requests goqctl sends as they are (``_OperatorRequest``): part of the
# control socket's request union.
OperatorLedgerRequest = (
    ListErrors
    | ListParked
    | ClearErrors
    | ListProducts
    | ListListings
    | Link
    | Unlink
    | SetStock
    | AdjustStock
    | GetHistory
    | SetListingAttrs
    | DeleteProduct
)

# --------------------------------------------------------------------------------------
# Ledger replies
# --------------------------------------------------------------------------------------


class RejectedLine(_Msg, frozen=True, kw_only=True, tag="rejected_line"):
    order_id: str
    line_id: str
    reason: str


class OrderLinesBooked(_Msg, frozen=True, kw_only=True, tag="order_lines_booked"):
    booked: int  # lines whose booking changed
    duplicates: int  # lines seen again with nothing new
    stale: int  # observations older than the booked one
    parked: int
    # New lines whose last change predates their product in goqd: recorded, but the
    # imported count already reflected them, so stock did not move.
    before_import: int = 0
    rejected: tuple[RejectedLine, ...] = ()
    oversold_units: int = 0


class Cursor(_Msg, frozen=True, kw_only=True, tag="cursor"):
    store: str
    cursor: str | None


class WatchList(_Msg, frozen=True, kw_only=True, tag="watch_list"):
    store: str
    listing_keys: tuple[str, ...]
    next_after: str = ""  # ``after`` for the next round ("" = start over)


class PushBatch(_Msg, frozen=True, kw_only=True, tag="push_batch"):
    store: str
    items: tuple[PushItem, ...]
    pending: int  # rows left for this store, including these


class Done(_Msg, frozen=True, kw_only=True, tag="done"):
    """Generic acknowledgement. ``changed`` counts rows the request changed.

    ``warnings``: done, but the operator should know (a link that made a product
    ambiguous in a store, 複数の商品が紐づいています), each with what to run next.
    """

    changed: int = 0
    released: int = 0  # parked lines booked because of this request
    detail: str = ""
    warnings: tuple[str, ...] = ()


class StockChanged(_Msg, frozen=True, kw_only=True, tag="stock_changed"):
    sku: str
    total: int
    delta: int
    movement_id: int


class Movement(_Msg, frozen=True, kw_only=True, tag="movement"):
    id: int
    sku: str
    delta: int
    total_after: int
    # "hold": units held back or released by the sale watch (total unchanged).
    cause: Literal["order", "cancel", "correction", "adjust", "set", "import", "hold"]
    store: str = ""
    order_id: str = ""
    line_id: str = ""
    reason: str = ""
    oversold: int = 0
    at: float
    held_after: int = 0


class History(_Msg, frozen=True, kw_only=True, tag="history"):
    sku: str
    total: int
    held: int = 0  # units held back for sales seen at a mall, not booked yet
    movements: tuple[Movement, ...]


class ErrorRecord(_Msg, frozen=True, kw_only=True, tag="error_record"):
    id: int
    store: str
    level: int
    code: str
    message: str
    listing_key: str = ""
    first_seen: float
    last_seen: float
    count: int
    cleared_at: float | None = None
    # Who ended it: "operator" (goqctl errors clear, key set), "healed" (the store
    # recovered by itself), "resolved" (its cause was fixed: lines released, link made
    # unambiguous, the listing's push accepted); "" for errors cleared before goqd said.
    cleared_by: str = ""
    mall_code: str = ""  # the mall's own code for it (IE0003, QuotaExceeded), if any


class ParkedRecord(_Msg, frozen=True, kw_only=True, tag="parked_record"):
    """One parked order line and what to run so it is booked."""

    store: str
    order_id: str
    line_id: str
    listing_key: str
    link_code: str = ""
    quantity: int
    cancelled: bool = False
    # The listing now: "unlinked" (no product, or its product was deleted) or
    # "ambiguous" (its product has another listing in this store).
    link_state: str
    sku: str | None = None
    parked_at: float
    action: str  # the command(s) that get this line booked


class ParkedList(_Msg, frozen=True, kw_only=True, tag="parked_list"):
    lines: tuple[ParkedRecord, ...]
    total: int = 0  # parked lines matching the filter, on every page


class ErrorList(_Msg, frozen=True, kw_only=True, tag="error_list"):
    errors: tuple[ErrorRecord, ...]


class ProductRecord(_Msg, frozen=True, kw_only=True, tag="product_record"):
    sku: str
    name: str
    total: int
    first_store: str
    listings: int
    held: int = 0  # units held back for sales seen at a mall, not booked yet
    # False: created without a count (unlimited or not tracked at the mall it came from);
    # nothing is pushed for it until `goqctl stock set SKU N` gives one.
    count_known: bool = True


class ProductList(_Msg, frozen=True, kw_only=True, tag="product_list"):
    products: tuple[ProductRecord, ...]


class ListingRecord(_Msg, frozen=True, kw_only=True, tag="listing_record"):
    store: str
    listing_key: str
    link_code: str
    name: str
    sku: str | None
    link_state: Literal["linked", "unlinked", "ambiguous"]
    attrs: ListingAttrs
    last_pushed_quantity: int | None
    last_pushed_version: int | None
    last_seen_quantity: int | None
    pending_version: int | None
    held: int = 0
    # The push waiting in the outbox for this listing (queued, or ``pending_sent``: handed
    # to the store and not yet acknowledged), and the linked product's count: what the
    # diff compares the mall with, read in the same transaction.
    pending_quantity: int | None = None
    pending_sent: bool = False
    product_total: int | None = None
    product_held: int = 0
    count_known: bool = True
    parked: int = 0  # order lines of this listing parked (連携できない商品)


class ListingList(_Msg, frozen=True, kw_only=True, tag="listing_list"):
    listings: tuple[ListingRecord, ...]


class ListingCount(_Msg, frozen=True, kw_only=True, tag="listing_count"):
    count: int


class StoreLedgerStatus(_Msg, frozen=True, kw_only=True, tag="store_ledger_status"):
    store: str
    cursor: str | None
    outbox: int
    parked: int
    open_errors: int
    max_error_level: int
    open_errors_by_level: dict[int, int] = msgspec.field(default_factory=dict)
    held: int = 0  # units the sale watch holds at this store's listings
    # Listings with an open listing_not_linked error (their order lines are parked) and
    # with an open multiple_links error (複数の商品が紐づいています).
    parked_listings: int = 0
    ambiguous_listings: int = 0


class StoreStats(_Msg, frozen=True, kw_only=True, tag="store_stats"):
    stores: tuple[StoreLedgerStatus, ...]
    oversold_units: int


class LedgerStatus(_Msg, frozen=True, kw_only=True, tag="ledger_status"):
    products: int
    listings: int
    order_lines: int
    movements: int
    outbox: int
    parked: int
    oversold_units: int
    duplicates: int
    stores: tuple[StoreLedgerStatus, ...]


class Pong(_Msg, frozen=True, kw_only=True, tag="pong"):
    pass


class LinkReport(_Msg, frozen=True, kw_only=True, tag="link_report"):
    """What an import or auto-link did. ``problems`` name ambiguous listings."""

    store: str
    seen: int = 0
    created: int = 0  # products created (base store, or import --create-products)
    new_listings: int = 0
    updated: int = 0  # existing listings whose data changed
    linked: int = 0  # listings linked by this request
    unlinked: int = 0  # listings left without a product
    ambiguous: int = 0
    released: int = 0  # parked order lines booked because of new links
    problems: tuple[str, ...] = ()
    # Products created without a count (the mall's was unlimited or absent): kept out of
    # sync until `goqctl stock set SKU N`; their SKUs are in ``problems``.
    count_unknown: int = 0


class ProductAdded(_Msg, frozen=True, kw_only=True, tag="product_added"):
    """What `goqctl product add` did: the product, and the listings it now has.

    ``linked`` and ``ambiguous`` are ``(store, listing_key)``, at most 100 each;
    ``problems`` name listings that matched but could not be linked, and what to run.
    """

    sku: str
    name: str = ""
    total: int
    linked: tuple[tuple[str, str], ...] = ()
    ambiguous: tuple[tuple[str, str], ...] = ()
    released: int = 0  # parked order lines booked because of the new links
    problems: tuple[str, ...] = ()


class StockImportJob(_Msg, frozen=True, kw_only=True, tag="stock_import_job"):
    """Where one staged stock import stands. ``result`` is its reply once ``done``."""

    import_id: int
    state: Literal["staging", "applying", "done", "discarded"]
    request_id: str = ""
    digest: bytes = b""
    staged: int = 0
    applied: int = 0
    skipped: int = 0  # rows whose product was deleted after they were staged
    result: Done | None = None


class StockImportList(_Msg, frozen=True, kw_only=True, tag="stock_import_list"):
    imports: tuple[StockImportJob, ...]


LedgerReply = (
    OrderLinesBooked
    | Cursor
    | WatchList
    | PushBatch
    | Done
    | StockChanged
    | History
    | ErrorList
    | ParkedList
    | ProductList
    | ListingList
    | ListingCount
    | LedgerStatus
    | Pong
    | LinkReport
    | StoreStats
    | StockImportJob
    | StockImportList
    | ProductAdded
)
