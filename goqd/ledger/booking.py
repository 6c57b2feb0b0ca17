"""Order lines: booking them, correcting them, and parking the ones that cannot book.

An order line is ``(store, order_id, line_id)``. Its ``booked_qty`` moves to the
observed target (``qty`` live, ``0`` cancelled) and the product's total moves by the
difference, so a duplicate is a no-op and an edit or a cancellation is a correction. An
observation older (by the mall's update time) than the booked one changes nothing; a
terminal cancellation is never undone. The store's cursor commits with its lines. Lines
for unknown, unlinked or ambiguous listings are parked, and booked when the listing
links.
"""

from __future__ import annotations

import shlex

from goqd import messages as m
from goqd.errors import LEVEL_TEMPORARY
from goqd.ledger.error_rows import NOT_LINKED, mark_resolved, record_error
from goqd.ledger.outbox import queue_listing
from goqd.ledger.queries import listings_of, park_action, park_reason
from goqd.ledger.rows import (
    ListingToBook,
    decode_line,
    encode_line,
    fetch_one,
)
from goqd.ledger.stock import move
from goqd.ledger.tx import Tx, bump_meta
from goqd.ledger.watch import sale_booked

MAX_LINE_QUANTITY = 100_000  # a line above this is a data error, not an order
# A base-store sale counts as "before the import" only if the mall's time for it is this
# much older than the product's creation: mall clocks have whole seconds and skew, and
# booking a sale twice undersells, while missing one oversells.
BEFORE_IMPORT_MARGIN_S = 300.0


def book_lines(tx: Tx, msg: m.OrderLinesSeen) -> m.OrderLinesBooked:
    store = msg.store
    bad_orders = {
        line.order_id: line
        for line in msg.lines
        if line.quantity < 0
        or line.quantity > MAX_LINE_QUANTITY
        or (line.quantity == 0 and not line.cancelled)
    }
    rejected: list[m.RejectedLine] = []
    for order_id, line in bad_orders.items():
        reason = (
            f"order {order_id} line {line.line_id}: quantity {line.quantity} is not a "
            f"plausible order quantity (1..{MAX_LINE_QUANTITY}); the order was not booked"
        )
        rejected.append(m.RejectedLine(order_id=order_id, line_id=line.line_id, reason=reason))
        record_error(
            tx,
            m.RecordError(
                store=store,
                level=LEVEL_TEMPORARY,
                code="bad_order_line",
                message=reason,
                listing_key=line.listing_key,
            ),
        )
    counts = {"booked": 0, "duplicates": 0, "stale": 0, "parked": 0, "before_import": 0}
    oversold_before = tx.oversold
    for line in msg.lines:
        if line.order_id in bad_orders:
            continue
        outcome = book_one(tx, store, line)
        counts[outcome] += 1
    tx.lines += len(msg.lines)
    bump_meta(tx.conn, "duplicates", counts["duplicates"])
    if msg.cursor is not None:
        tx.conn.execute(
            "INSERT INTO cursors VALUES (?, ?, ?) ON CONFLICT(store) DO UPDATE "
            "SET cursor = excluded.cursor, updated_at = excluded.updated_at",
            (store, msg.cursor, tx.now()),
        )
    return m.OrderLinesBooked(
        booked=counts["booked"],
        duplicates=counts["duplicates"],
        stale=counts["stale"],
        parked=counts["parked"],
        before_import=counts["before_import"],
        rejected=tuple(rejected),
        oversold_units=tx.oversold - oversold_before,
    )


def book_one(tx: Tx, store: str, line: m.OrderLine) -> str:
    """Book one line; returns which of ``OrderLinesBooked``'s counts it adds to."""
    # Read inline into a plain tuple, not through rows.fetch_one: every line polled
    # again comes this way, and at a few hundred thousand duplicates a second a call and
    # an object less are measurable (``_book_again`` unpacks it into names).
    known = tx.conn.execute(
        "SELECT sku, booked_qty, mall_updated_at, terminal, status FROM order_lines "
        "WHERE store = ? AND order_id = ? AND line_id = ?",
        (store, line.order_id, line.line_id),
    ).fetchone()
    target = 0 if line.cancelled else line.quantity
    if known is not None:
        return _book_again(tx, store, line, known, target)
    if store in tx.parked_stores and _update_parked(tx, store, line):
        return "parked"
    listing = fetch_one(
        tx.conn,
        ListingToBook,
        "SELECT l.sku, l.link_state, p.created_at, p.first_store, l.held, l.watch_qty "
        "FROM listings l LEFT JOIN products p ON p.sku = l.sku "
        "WHERE l.store = ? AND l.listing_key = ?",
        (store, line.listing_key),
    )
    if listing is None or listing.link_state != "linked":
        _park(tx, store, line, listing)
        return "parked"
    assert listing.sku is not None  # linking sets the SKU and the state together
    return _book_first(tx, store, line, listing, listing.sku, target)


def _book_again(
    tx: Tx, store: str, line: m.OrderLine, known: tuple[str, int, float, int, str], target: int
) -> str:
    """A line booked before (``known``: its row as booked): a duplicate, an older copy,
    or a correction."""
    sku, booked_qty, mall_updated_at, terminal, status = known
    if terminal or line.updated_at < mall_updated_at:
        # A terminal cancellation is final; an older copy says nothing new.
        return "duplicates" if terminal and line.cancelled else "stale"
    delta = target - booked_qty
    key = (store, line.order_id, line.line_id)
    if delta == 0:
        if line.updated_at != mall_updated_at or line.status != status or line.terminal:
            tx.conn.execute(
                "UPDATE order_lines SET mall_updated_at = ?, status = ?, terminal = ? "
                "WHERE store = ? AND order_id = ? AND line_id = ?",
                (line.updated_at, line.status, int(line.terminal), *key),
            )
        return "duplicates"
    tx.conn.execute(
        "UPDATE order_lines SET booked_qty = ?, mall_updated_at = ?, status = ?, "
        "terminal = ? WHERE store = ? AND order_id = ? AND line_id = ?",
        (target, line.updated_at, line.status, int(line.terminal), *key),
    )
    cause = "cancel" if target == 0 else "correction"
    if delta > 0:
        watch = tx.conn.execute(
            "SELECT held, watch_qty FROM listings WHERE store = ? AND listing_key = ?",
            (store, line.listing_key),
        ).fetchone()
        if watch is not None:
            sale_booked(tx, store, line.listing_key, sku, delta, *watch)
    move(tx, sku, -delta, cause, store=store, order_id=line.order_id, line_id=line.line_id)
    return "booked"


def _update_parked(tx: Tx, store: str, line: m.OrderLine) -> bool:
    """True when the line is parked already; a newer copy of it replaces the parked one."""
    parked = tx.conn.execute(
        "SELECT line FROM parked_lines WHERE store = ? AND order_id = ? AND line_id = ?",
        (store, line.order_id, line.line_id),
    ).fetchone()
    if parked is None:
        return False
    old = decode_line(parked[0])
    if line.updated_at >= old.updated_at and not old.terminal:
        tx.conn.execute(
            "UPDATE parked_lines SET line = ? WHERE store = ? AND order_id = ? AND line_id = ?",
            (encode_line(line), store, line.order_id, line.line_id),
        )
    return True


def _park(tx: Tx, store: str, line: m.OrderLine, listing: ListingToBook | None) -> None:
    """Park a line whose listing is not linked to one product."""
    if listing is None:
        # Register it so the operator sees it in `goqctl listings` and can link it.
        tx.conn.execute(
            "INSERT INTO listings (store, listing_key, link_code, name) VALUES (?, ?, ?, ?)",
            (store, line.listing_key, line.link_code, ""),
        )
    reason = "unknown_listing" if listing is None else f"{listing.link_state}_listing"
    tx.parked_stores.add(store)
    tx.conn.execute(
        "INSERT INTO parked_lines VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            store,
            line.order_id,
            line.line_id,
            line.listing_key,
            encode_line(line),
            reason,
            tx.now(),
        ),
    )
    # A parked sale lowers no other store: it must be seen (an error per listing).
    parked_error(tx, store, line.listing_key)


def _book_first(
    tx: Tx, store: str, line: m.OrderLine, listing: ListingToBook, sku: str, target: int
) -> str:
    """A line seen for the first time, of a linked listing."""
    tx.conn.execute(
        "INSERT INTO order_lines VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            store,
            line.order_id,
            line.line_id,
            line.listing_key,
            sku,
            target,
            line.updated_at,
            int(line.terminal),
            line.status,
            tx.now(),
        ),
    )
    if target == 0:
        # First seen cancelled: books nothing. But the mall counted the sale and has
        # now put the units back, and a push since the sale may have overwritten
        # the counter that had them off: goqd's count goes out again.
        queue_listing(tx, store, line.listing_key)
        return "booked"
    assert listing.created_at is not None  # a linked listing's product exists
    if (
        line.updated_at < listing.created_at - BEFORE_IMPORT_MARGIN_S
        and store == listing.first_store
    ):
        # A sale in the store the product was imported from, older than the import:
        # the imported count already reflects it (a first poll looks back a day).
        # Record the line so later changes (a cancel) correct it, but do not take the
        # units off a second time. Older sales in *other* stores are booked: nothing
        # says the imported count knew them, and booking errs on the side of not
        # overselling.
        return "before_import"
    sale_booked(tx, store, line.listing_key, sku, target, listing.held, listing.watch_qty)
    move(tx, sku, -target, "order", store=store, order_id=line.order_id, line_id=line.line_id)
    return "booked"


def release_parked(tx: Tx, store: str, listing_key: str) -> int:
    """Book the parked lines of a listing that has linked; returns how many."""
    rows = tx.conn.execute(
        "SELECT line FROM parked_lines WHERE store = ? AND listing_key = ?",
        (store, listing_key),
    ).fetchall()
    if not rows:
        return 0
    tx.conn.execute(
        "DELETE FROM parked_lines WHERE store = ? AND listing_key = ?", (store, listing_key)
    )
    for (blob,) in rows:
        book_one(tx, store, decode_line(blob))
    # Booked (a line that parked again has refreshed the error instead): the listing's
    # error is resolved, kept in history.
    if not tx.conn.execute(
        "SELECT 1 FROM parked_lines WHERE store = ? AND listing_key = ? LIMIT 1",
        (store, listing_key),
    ).fetchone():
        mark_resolved(tx, store, NOT_LINKED, listing_key)
    return len(rows)


def release_for_sku(tx: Tx, sku: str) -> int:
    """Book the parked lines of every linked listing of ``sku``; returns how many."""
    released = 0
    rows = tx.conn.execute(
        "SELECT store, listing_key FROM listings WHERE sku = ? AND link_state = 'linked'",
        (sku,),
    ).fetchall()
    for store, key in rows:
        released += release_parked(tx, store, key)
    return released


def parked_error(tx: Tx, store: str, listing_key: str, *, bump: bool = True) -> None:
    """Record (``bump``) or just reword the listing_not_linked error of a listing with
    parked lines: how many, why, and the command that gets them booked."""
    conn = tx.conn
    (n,) = conn.execute(
        "SELECT count(*) FROM parked_lines WHERE store = ? AND listing_key = ?",
        (store, listing_key),
    ).fetchone()
    if not n:
        return
    row = conn.execute(
        "SELECT sku, link_state FROM listings WHERE store = ? AND listing_key = ?",
        (store, listing_key),
    ).fetchone()
    sku, state = row if row is not None else (None, "unlinked")
    others = listings_of(conn, store, sku) if state == "ambiguous" and sku else []
    message = (
        f"連携できない商品: {n} order line(s) of listing {listing_key!r} in store "
        f"{store!r} are parked: {park_reason(state, sku, others)}, so these sales lower "
        f"no other store. To book them: {park_action(store, listing_key, state, others)}"
        f" (list them: goqctl parked --store {shlex.quote(store)})"
    )
    if bump:
        record_error(
            tx,
            m.RecordError(
                store=store,
                level=LEVEL_TEMPORARY,
                code=NOT_LINKED,
                message=message,
                listing_key=listing_key,
            ),
        )
    else:
        conn.execute(
            "UPDATE errors SET message = ? WHERE store = ? AND code = ? AND listing_key = ? "
            "AND cleared_at IS NULL",
            (message, store, NOT_LINKED, listing_key),
        )
