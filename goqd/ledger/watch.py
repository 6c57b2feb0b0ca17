"""The sale watch: units held back when a mall's counter falls without a booked order.

A counter below what goqd expects lost units to sales goqd has not booked yet: they are
held back from every store (a product's pushed count is ``total - held``) until the
order is booked, or released and reported when no poll explains them in time. A
listing's hold is kept as layers, ``[(since, units), ...]`` oldest first, so units held
for a later sale are as old as that sale and not as the first hold.
"""

from __future__ import annotations

import msgspec

from goqd import messages as m
from goqd.errors import LEVEL_TEMPORARY
from goqd.ledger.error_rows import record_error
from goqd.ledger.outbox import queue_listing
from goqd.ledger.rows import Hold, WatchedListing, fetch_one
from goqd.ledger.stock import move
from goqd.ledger.tx import Tx

# The sale watch reads first the listings of products sold within this many of the
# latest movements (and any holding units).
WATCH_RECENT_MOVES = 5000
WATCH_SCAN = 2000  # listings the watch's rotation looks at per round, at most

Layers = list[tuple[float, int]]


def watch_list(tx: Tx, msg: m.GetWatchList) -> m.WatchList:
    """Listings of a store worth reading: every one holding units; then, for half
    of what is left, those of products among the last ``WATCH_RECENT_MOVES``
    movements' sales, the most recently sold first (what sold lately sells again,
    and a mall's read budget should go where the sales are); then the store's
    listings with at most ``below`` units in key order from ``after``, so each of
    those is read in its turn.

    Products at 0 (after holds) are skipped: the mall shows 0 and cannot sell them.
    The recent sales are a rowid range of ``movements`` and the rotation looks at
    most ``WATCH_SCAN`` listings a round: at 500,000 products a round costs about
    what its answer costs, and booking pays nothing for it.
    """
    # INDEXED BY: without statistics SQLite prefers the primary key's store prefix,
    # a scan of every listing of the store (50,000 at Next Engine's size) to find none.
    held = [
        r[0]
        for r in tx.conn.execute(
            "SELECT listing_key FROM listings INDEXED BY listings_holding "
            "WHERE store = ? AND held > 0 LIMIT ?",
            (msg.store, msg.limit),
        )
    ]
    chosen = dict.fromkeys(held)
    _recent_sellers(tx, msg.store, (msg.limit - len(held) + 1) // 2, chosen)
    window = tx.conn.execute(
        "SELECT x.listing_key, p.total - p.held, p.total FROM (SELECT listing_key, sku "
        "FROM listings WHERE store = ? AND listing_key > ? AND link_state = 'linked' "
        "ORDER BY listing_key LIMIT ?) x JOIN products p ON p.sku = x.sku "
        "ORDER BY x.listing_key",
        (msg.store, msg.after, WATCH_SCAN),
    ).fetchall()
    next_after = window[-1][0] if len(window) == WATCH_SCAN else ""
    last = msg.after
    for key, shown, total in window:
        if len(chosen) >= msg.limit:
            next_after = last  # the round is full: go on from here next time
            break
        if shown > 0 and total <= msg.below:
            chosen.setdefault(key)
        last = key
    return m.WatchList(store=msg.store, listing_keys=tuple(chosen), next_after=next_after)


def _recent_sellers(tx: Tx, store: str, want: int, chosen: dict[str, None]) -> None:
    """Add to ``chosen`` up to ``want`` of ``store``'s listings whose products the
    latest ``WATCH_RECENT_MOVES`` movements sold, the most recently sold first.

    Walks the movements newest first (by rowid, no sort) and stops when it has
    enough, so a round costs about what it returns. A GROUP BY over the whole range
    took ~20 ms whatever was asked, at 500,000 products during a burst, with 50
    stores asking ten times a second between them; this stops after ~5 ms for 50.
    """
    if want <= 0:
        return
    top = tx.conn.execute("SELECT coalesce(max(id), 0) FROM movements").fetchone()[0]
    found = 0
    for (key,) in tx.conn.execute(
        "SELECT l.listing_key FROM movements mv "
        "CROSS JOIN listings l ON l.sku = mv.sku AND l.store = ? "
        "JOIN products p ON p.sku = mv.sku "
        "WHERE mv.id > ? AND mv.cause IN ('order', 'correction', 'hold') "
        "AND l.link_state = 'linked' AND l.held = 0 AND p.total - p.held > 0 "
        "ORDER BY mv.id DESC",
        (store, top - WATCH_RECENT_MOVES),
    ):
        if key not in chosen:
            chosen[key] = None
            found += 1
            if found >= want:
                return


def stock_seen(tx: Tx, msg: m.StockSeen) -> m.Done:
    """Compare the mall's counters with what goqd expects them to show.

    A counter below the expectation lost units to sales goqd has not booked: hold
    them back (every store is pushed ``total - held``); one above it gave units
    back (a cancellation at the mall) and releases what it can. A listing that a
    push or a booking moved after the read began is skipped: the reading predates
    it. A hold that a later poll did not explain with an order, or older than
    ``hold_expiry``, is released and reported: the counter fell for another reason
    (an edit at the mall, an increase the mall acknowledged but did not apply).

    Each fall is held as a layer of its own, as old as the reading that found it
    (``hold_layers``): a booked sale explains the oldest layer first and only the
    layers no poll explained are released. One age for the whole hold let units held
    for a second sale inherit the first sale's age and be released as unexplained
    before any poll could have returned their order.
    """
    now = tx.now()
    changed = 0
    for seen in msg.counts:
        if _compare(tx, msg, seen, now):
            changed += 1
    # ``held_since`` is the oldest layer's time: the listings with a layer due.
    due = max(now - msg.hold_expiry, msg.explained_before)
    expired = tx.conn.execute(
        "SELECT listing_key FROM listings INDEXED BY listings_holding "
        "WHERE store = ? AND held > 0 AND held_since < ?",
        (msg.store, due),
    ).fetchall()
    for (key,) in expired:
        released = release_hold(tx, msg.store, key, before=due)
        if not released:
            continue
        changed += 1
        record_error(
            tx,
            m.RecordError(
                store=msg.store,
                level=LEVEL_TEMPORARY,
                code="count_fell_without_order",
                message=(
                    f"listing {key}: the mall's count fell by {released} but no order "
                    "explains it (edited at the mall, or an update the mall did not "
                    "apply); goqd's count is pushed again"
                ),
                listing_key=key,
            ),
        )
    return m.Done(changed=changed)


def _compare(tx: Tx, msg: m.StockSeen, seen: m.SeenCount, now: float) -> bool:
    """Compare one reading with what goqd expects; True when it changed a hold."""
    row = fetch_one(
        tx.conn,
        WatchedListing,
        "SELECT l.sku, l.link_state, l.held, l.last_pushed_qty, "
        "l.watch_at, o.sent_min, o.version IS NOT NULL, l.watch_qty, "
        "l.hold_layers, l.held_since "
        "FROM listings l LEFT JOIN outbox o ON o.store = l.store "
        "AND o.listing_key = l.listing_key WHERE l.store = ? AND l.listing_key = ?",
        (msg.store, seen.listing_key),
    )
    if row is None or row.link_state != "linked" or row.watch_at > msg.read_started:
        return False
    # Expected: the last reading as bookings and pushes moved it since. A listing
    # read for the first time is expected at the last count the mall accepted,
    # unless a push is queued for it: then a booking came after that count
    # (and is not in it), so this reading is only the starting point.
    held = row.held
    expected = (
        row.watch_qty if row.watch_qty is not None else None if row.queued else row.last_pushed_qty
    )
    if expected is not None and row.sent_min is not None:
        # A push sent but not acknowledged may have landed (a timeout after the
        # mall applied it, a crash mid-push): a counter at or above that count is
        # no sign of a sale. Missing a sale here is safe; inventing one is not.
        # (A row still unsent cannot have landed: it does not count.)
        expected = min(expected, row.sent_min)
    new_held = held
    if expected is not None:
        new_held = max(0, held + expected - seen.quantity)
        if seen.quantity - expected > held and not row.queued:
            # More than goqd wants shown and no hold explains it (a lost or
            # late write, an edit at the mall): push goqd's count again.
            queue_listing(tx, msg.store, seen.listing_key)
    if seen.quantity == row.watch_qty and new_held == held:
        return False  # the usual case: nothing moved, nothing to write
    layers = hold_layers(row.hold_layers, held, row.held_since)
    if new_held > held:
        layers.append((now, new_held - held))
    elif new_held < held:
        # Units came back (a cancellation at the mall) and which sale's they were
        # is unknown: off the oldest layers, so what stays held stays longest.
        layers = explain_oldest(layers, held - new_held)
    tx.conn.execute(
        "UPDATE listings SET watch_qty = ?, held = ?, held_since = ?, hold_layers = ? "
        "WHERE store = ? AND listing_key = ?",
        (seen.quantity, new_held, *layer_columns(layers), msg.store, seen.listing_key),
    )
    if new_held == held:
        return False
    tx.conn.execute("UPDATE products SET held = held + ? WHERE sku = ?", (new_held - held, row.sku))
    verb = "fell" if new_held > held else "rose"
    assert row.sku is not None  # a linked listing has a product
    move(
        tx,
        row.sku,
        0,
        "hold",
        store=msg.store,
        reason=f"{seen.listing_key}: the mall's count {verb} to {seen.quantity} "
        f"without a booked order; {new_held} held",
    )
    return True


def sale_booked(
    tx: Tx, store: str, listing_key: str, sku: str, sold: int, held: int, expected: int | None
) -> None:
    """A booked sale explains held units of its listing first, the oldest layer first
    (orders come in the order they were placed); the rest is a sale the watch has not
    seen yet, so its expected counter drops with it. (A listing the watch never read
    has no expectation to move: see ``stock_seen``.) ``held`` and ``expected`` are the
    listing's ``held`` and ``watch_qty``, as the caller read them."""
    if held == 0 and expected is None:
        return  # the watch does not know this listing: nothing to write
    use = min(held, sold)
    watch_qty = None if expected is None else expected - (sold - use)
    if not use:
        tx.conn.execute(
            "UPDATE listings SET watch_qty = ?, watch_at = ? WHERE store = ? AND listing_key = ?",
            (watch_qty, tx.now(), store, listing_key),
        )
        return
    raw, since = tx.conn.execute(
        "SELECT hold_layers, held_since FROM listings WHERE store = ? AND listing_key = ?",
        (store, listing_key),
    ).fetchone()
    layers = explain_oldest(hold_layers(raw, held, since), use)
    tx.conn.execute(
        "UPDATE listings SET held = ?, held_since = ?, hold_layers = ?, watch_qty = ?, "
        "watch_at = ? WHERE store = ? AND listing_key = ?",
        (held - use, *layer_columns(layers), watch_qty, tx.now(), store, listing_key),
    )
    tx.conn.execute("UPDATE products SET held = held - ? WHERE sku = ?", (use, sku))


def release_hold(tx: Tx, store: str, listing_key: str, *, before: float | None = None) -> int:
    """Release the listing's hold layers older than ``before`` (all of them if None);
    returns the units released."""
    row = fetch_one(
        tx.conn,
        Hold,
        "SELECT sku, held, hold_layers, held_since FROM listings "
        "WHERE store = ? AND listing_key = ?",
        (store, listing_key),
    )
    if row is None or not row.held:
        return 0
    layers = hold_layers(row.hold_layers, row.held, row.held_since)
    keep = [] if before is None else [x for x in layers if x[0] >= before]
    released = int(row.held) - sum(units for _, units in keep)
    if not released:
        return 0
    tx.conn.execute(
        "UPDATE listings SET held = ?, held_since = ?, hold_layers = ? "
        "WHERE store = ? AND listing_key = ?",
        (row.held - released, *layer_columns(keep), store, listing_key),
    )
    tx.conn.execute("UPDATE products SET held = held - ? WHERE sku = ?", (released, row.sku))
    move(tx, row.sku, 0, "hold", store=store, reason=f"{listing_key}: {released} released")
    return released


def hold_layers(raw: str | None, held: int, since: float | None) -> Layers:
    """A listing's hold as ``(since, units)`` layers, oldest first, summing to ``held``.

    A hold written before layers existed has none: it reads as one layer as old as
    its ``held_since``, which is what it was.
    """
    if held <= 0:
        return []
    if raw is not None:
        layers = msgspec.json.decode(raw, type=Layers)
        if sum(units for _, units in layers) == held:
            return layers
    return [(since if since is not None else 0.0, held)]


def explain_oldest(layers: Layers, units: int) -> Layers:
    """``layers`` less ``units`` units, taken off the oldest layers first."""
    left: Layers = []
    for since, held in layers:
        use = min(units, held)
        units -= use
        if held > use:
            left.append((since, held - use))
    return left


def layer_columns(layers: Layers) -> tuple[float | None, str | None]:
    """``held_since`` and ``hold_layers`` for ``layers``: both NULL when nothing is held."""
    if not layers:
        return None, None
    return layers[0][0], msgspec.json.encode(layers).decode()
