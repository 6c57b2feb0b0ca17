"""Frozen tagged messages passed between actors, and the ledger's replies.

Facts are named in the past tense (``OrderLinesSeen``, ``PushesDone``), requests in the
imperative (``TakePushes``, ``SetStock``). Tags are snake_case and stable: replies travel
over the control socket and some messages are persisted, so never rename a tag.

Internal messages are not validated at runtime (msgspec validates only on decode);
mypy checks them. Anything that comes from outside (mall responses, control requests)
is decoded into a Struct before it becomes one of these.

This module must never import trio, httpx or sqlite3: it is the shared vocabulary.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class _Msg(msgspec.Struct, frozen=True, kw_only=True):
    pass


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
    """Mall attributes that go out with every stock push (DESIGN §2 item 3).

    ``extra`` holds mall-specific identifiers resolved at import (Shopify inventory
    item and location ids, au PAY choice codes) as strings.
    """

    allow_overdraft: bool | None = None  # Yahoo 超過購入設定
    lead_time_days: int | None = None  # Amazon lead_time_to_ship_max_days
    restock_date: str | None = None  # Amazon 入荷予定日, YYYY-MM-DD
    extra: dict[str, str] = msgspec.field(default_factory=dict)


class PushItem(_Msg, frozen=True, kw_only=True, tag="push_item"):
    """Set ``listing_key`` to ``quantity`` at the mall. ``version`` orders pushes."""

    listing_key: str
    sku: str
    quantity: int
    version: int
    attrs: ListingAttrs = msgspec.field(default_factory=ListingAttrs)
    # The count goqd last saw accepted for this listing; compare-and-set malls use it.
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
    holds older than ``hold_expiry`` seconds (DESIGN §4, the sale watch).
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


class SetListingAttrs(_Msg, frozen=True, kw_only=True, tag="set_listing_attrs"):
    """Operator change of push attributes; queues a push with the new values."""

    store: str
    listing_key: str
    allow_overdraft: bool | None = None
    lead_time_days: int | None = None
    restock_date: str | None = None
    request_id: str = ""


class Link(_Msg, frozen=True, kw_only=True, tag="link"):
    store: str
    listing_key: str
    sku: str
    request_id: str = ""


class Unlink(_Msg, frozen=True, kw_only=True, tag="unlink"):
    store: str
    listing_key: str
    request_id: str = ""


class DeleteProduct(_Msg, frozen=True, kw_only=True, tag="delete_product"):
    """Stop syncing a product. Never deletes anything at a mall."""

    sku: str
    request_id: str = ""


class SetStock(_Msg, frozen=True, kw_only=True, tag="set_stock"):
    sku: str
    quantity: int
    reason: str = ""
    request_id: str = ""


class AdjustStock(_Msg, frozen=True, kw_only=True, tag="adjust_stock"):
    sku: str
    delta: int
    reason: str = ""
    request_id: str = ""


class GetHistory(_Msg, frozen=True, kw_only=True, tag="get_history"):
    sku: str
    limit: int = 100


class RecordError(_Msg, frozen=True, kw_only=True, tag="record_error"):
    """Record (or bump the count of) an open error for a store or one listing."""

    store: str
    level: int
    code: str
    message: str
    listing_key: str = ""


class ClearErrors(_Msg, frozen=True, kw_only=True, tag="clear_errors"):
    """Clear errors by id, or every open error of ``store`` (optionally one level)."""

    ids: tuple[int, ...] = ()
    store: str = ""
    level: int | None = None
    request_id: str = ""


class ListErrors(_Msg, frozen=True, kw_only=True, tag="list_errors"):
    store: str = ""
    include_cleared: bool = False
    limit: int = 500


class ListProducts(_Msg, frozen=True, kw_only=True, tag="list_products"):
    after: str = ""
    limit: int = 500


class ListListings(_Msg, frozen=True, kw_only=True, tag="list_listings"):
    store: str
    after: str = ""
    limit: int = 500


class ImportListings(_Msg, frozen=True, kw_only=True, tag="import_listings"):
    """Listings read from a store (API or CSV), applied as one chunk.

    ``base``: the store is the 基本モール, so unmatched listings create products.
    ``rules``: the store's link normalisation (``goqd.linking``). ``default_lead_time``
    applies only to listings new to goqd (DESIGN §2 item 3).
    """

    store: str
    listings: tuple[MallListing, ...]
    base: bool = False
    rules: tuple[str, ...] = ()
    default_lead_time: int | None = None


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
    | SetStock
    | AdjustStock
    | GetHistory
    | RecordError
    | ClearErrors
    | ListErrors
    | ListProducts
    | ListListings
    | ImportListings
    | AutoLink
    | QueuePushes
    | SetStocks
    | GetLedgerStatus
    | GetStoreStats
    | Ping
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
    """Generic acknowledgement. ``changed`` counts rows the request changed."""

    changed: int = 0
    released: int = 0  # parked lines booked because of this request
    detail: str = ""


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


class ErrorList(_Msg, frozen=True, kw_only=True, tag="error_list"):
    errors: tuple[ErrorRecord, ...]


class ProductRecord(_Msg, frozen=True, kw_only=True, tag="product_record"):
    sku: str
    name: str
    total: int
    first_store: str
    listings: int
    held: int = 0  # units held back for sales seen at a mall, not booked yet


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


class ListingList(_Msg, frozen=True, kw_only=True, tag="listing_list"):
    listings: tuple[ListingRecord, ...]


class StoreLedgerStatus(_Msg, frozen=True, kw_only=True, tag="store_ledger_status"):
    store: str
    cursor: str | None
    outbox: int
    parked: int
    open_errors: int
    max_error_level: int
    open_errors_by_level: dict[int, int] = msgspec.field(default_factory=dict)
    held: int = 0  # units the sale watch holds at this store's listings


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
    created: int = 0  # products created (base store)
    new_listings: int = 0
    updated: int = 0  # existing listings whose data changed
    linked: int = 0  # listings linked by this request
    unlinked: int = 0  # listings left without a product
    ambiguous: int = 0
    released: int = 0  # parked order lines booked because of new links
    problems: tuple[str, ...] = ()


LedgerReply = (
    OrderLinesBooked
    | Cursor
    | WatchList
    | PushBatch
    | Done
    | StockChanged
    | History
    | ErrorList
    | ProductList
    | ListingList
    | LedgerStatus
    | Pong
    | LinkReport
    | StoreStats
)
