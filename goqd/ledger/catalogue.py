"""Products, listings and the links between them; importing a store's listings.

A listing is linked to at most one product, and a product has at most one listing per
store: several listings of one product in one store are ambiguous (複数の商品が紐づいて
います), all of them are marked so, and their orders park until one is left. Linking a
listing books its parked lines and queues a push of its product's count.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec

from goqd import limits
from goqd import messages as m
from goqd.errors import LEVEL_TEMPORARY, LedgerError, UnknownListing
from goqd.ledger.booking import parked_error, release_for_sku, release_parked
from goqd.ledger.error_rows import MULTIPLE_LINKS, mark_resolved, record_error
from goqd.ledger.outbox import queue_listing
from goqd.ledger.queries import listings_of
from goqd.ledger.rows import EMPTY_ATTRS, KnownListing, decode_attrs, encode_attrs, fetch_one
from goqd.ledger.stock import move, total
from goqd.ledger.tx import Tx
from goqd.ledger.watch import release_hold
from goqd.linking import Rule, fold, normalize

# ------------------------------------------------------------------ products and listings


def upsert_product(tx: Tx, msg: m.UpsertProduct) -> m.Done:
    row = tx.conn.execute("SELECT name FROM products WHERE sku = ?", (msg.sku,)).fetchone()
    if row is not None:
        if msg.name and msg.name != row[0]:
            tx.conn.execute("UPDATE products SET name = ? WHERE sku = ?", (msg.name, msg.sku))
            return m.Done(changed=1)
        return m.Done(changed=0)
    count = (msg.total or 0) if msg.count_known else 0
    if count < 0:
        raise LedgerError(f"initial stock for {msg.sku!r} cannot be negative")
    tx.conn.execute(
        "INSERT INTO products (sku, name, total, first_store, created_at, code_fold, "
        "count_known) VALUES (?, ?, 0, ?, ?, ?, ?)",
        (msg.sku, msg.name, msg.store, tx.now(), fold(msg.sku), int(msg.count_known)),
    )
    move(tx, msg.sku, count, "import", store=msg.store)
    released = release_for_sku(tx, msg.sku)
    return m.Done(changed=1, released=released)


def upsert_listing(tx: Tx, msg: m.UpsertListing) -> m.Done:
    conn = tx.conn
    row = fetch_one(
        conn,
        KnownListing,
        "SELECT sku, link_state, attrs, name, link_code FROM listings "
        "WHERE store = ? AND listing_key = ?",
        (msg.store, msg.listing_key),
    )
    attrs_blob = encode_attrs(msg.attrs) if msg.attrs is not None else None
    if row is None:
        conn.execute(
            "INSERT INTO listings (store, listing_key, link_code, name, attrs, last_seen_qty) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (msg.store, msg.listing_key, msg.link_code, msg.name, attrs_blob, msg.seen_quantity),
        )
    else:
        conn.execute(
            "UPDATE listings SET link_code = CASE WHEN ? = '' THEN link_code ELSE ? END, "
            "name = CASE WHEN ? = '' THEN name ELSE ? END, attrs = coalesce(?, attrs), "
            "last_seen_qty = coalesce(?, last_seen_qty) WHERE store = ? AND listing_key = ?",
            (
                msg.link_code,
                msg.link_code,
                msg.name,
                msg.name,
                attrs_blob,
                msg.seen_quantity,
                msg.store,
                msg.listing_key,
            ),
        )
    released = 0
    warnings: tuple[str, ...] = ()
    if msg.sku is not None and (row is None or row.sku != msg.sku):
        done = link(tx, msg.store, msg.listing_key, msg.sku)
        released, warnings = done.released, done.warnings
    elif (
        row is not None
        and row.link_state == "linked"
        and attrs_blob is not None
        and attrs_blob != row.attrs
    ):
        # Mall attributes go out with the next push; queue one so they do.
        queue_listing(tx, msg.store, msg.listing_key)
    return m.Done(changed=1, released=released, warnings=warnings)


def set_listing_attrs(tx: Tx, msg: m.SetListingAttrs) -> m.Done:
    row = tx.conn.execute(
        "SELECT attrs FROM listings WHERE store = ? AND listing_key = ?",
        (msg.store, msg.listing_key),
    ).fetchone()
    if row is None:
        raise LedgerError(f"no listing {msg.listing_key!r} in store {msg.store!r}")
    attrs = decode_attrs(row[0])
    changes: dict[str, Any] = {}
    if msg.allow_overdraft is not None:
        changes["allow_overdraft"] = msg.allow_overdraft
    if msg.lead_time_days is not None:
        if not 0 <= msg.lead_time_days <= 365:
            raise LedgerError("lead time must be between 0 and 365 days")
        changes["lead_time_days"] = msg.lead_time_days
    if msg.restock_date is not None:
        changes["restock_date"] = msg.restock_date or None
    new = msgspec.structs.replace(attrs, **changes)
    tx.conn.execute(
        "UPDATE listings SET attrs = ? WHERE store = ? AND listing_key = ?",
        (encode_attrs(new), msg.store, msg.listing_key),
    )
    queue_listing(tx, msg.store, msg.listing_key)
    return m.Done(changed=1)


def delete_product(tx: Tx, sku: str) -> m.Done:
    """Stop syncing ``sku``: unlink its listings. Nothing is deleted at any mall."""
    total(tx, sku)
    found = tx.conn.execute(
        "SELECT store, listing_key FROM listings WHERE sku = ?", (sku,)
    ).fetchall()
    for store, key in found:
        unlink(tx, store, key)
    tx.conn.execute("DELETE FROM products WHERE sku = ?", (sku,))
    return m.Done(changed=1 + len(found), detail="listings unlinked; nothing deleted at malls")


# ------------------------------------------------------------------ links


def _listing_sku(tx: Tx, store: str, listing_key: str, hint: str) -> str | None:
    """The SKU a listing is linked to (None: none); ``UnknownListing`` (its message
    ending with ``hint``) for a listing goqd has never seen."""
    row = tx.conn.execute(
        "SELECT sku FROM listings WHERE store = ? AND listing_key = ?", (store, listing_key)
    ).fetchone()
    if row is None:
        raise UnknownListing(f"no listing {listing_key!r} in store {store!r}{hint}")
    return cast(str | None, row[0])


def _link_state(tx: Tx, store: str, listing_key: str) -> str | None:
    row = tx.conn.execute(
        "SELECT link_state FROM listings WHERE store = ? AND listing_key = ?",
        (store, listing_key),
    ).fetchone()
    return None if row is None else str(row[0])


def link(tx: Tx, store: str, listing_key: str, sku: str) -> m.Done:
    """Link a listing goqd has seen (imported, or named by a polled order) to a product.

    A listing nobody has shown is refused, never created: a mistyped key would
    otherwise become a second listing of the product, make both ambiguous and park
    their orders.
    """
    old_sku = _listing_sku(
        tx,
        store,
        listing_key,
        f": goqd links only listings an import or the mall has shown; run `goqctl import "
        f"{store}` first (see `goqctl listings {store}`)",
    )
    total(tx, sku)
    tx.conn.execute(
        "UPDATE listings SET sku = ?, link_state = 'linked' WHERE store = ? AND listing_key = ?",
        (sku, store, listing_key),
    )
    released = _resolve_links(tx, store, sku)
    if old_sku is not None and old_sku != sku:
        released += _resolve_links(tx, store, old_sku)
    return m.Done(
        changed=1, released=released, warnings=_ambiguity_warnings(tx, store, listing_key)
    )


def _ambiguity_warnings(tx: Tx, store: str, listing_key: str) -> tuple[str, ...]:
    """What to tell the operator when a link left ``listing_key`` ambiguous."""
    row = tx.conn.execute(
        "SELECT sku, link_state FROM listings WHERE store = ? AND listing_key = ?",
        (store, listing_key),
    ).fetchone()
    if row is None:
        return ()
    sku, state = row
    if state != "ambiguous":
        return ()
    keys = listings_of(tx.conn, store, sku)
    other = next(k for k in keys if k != listing_key)
    return (
        f"複数の商品が紐づいています: product {sku!r} now has {len(keys)} listings in "
        f"store {store!r} ({', '.join(keys)}): orders for them are parked and none of "
        f"them is pushed until one is left. Unlink the wrong one: "
        f"`goqctl unlink {shlex.quote(store)} {shlex.quote(other)}` (or "
        f"`goqctl unlink {shlex.quote(store)} {shlex.quote(listing_key)}`), then check "
        f"差異商品: `goqctl diff {shlex.quote(store)}`",
    )


def unlink(tx: Tx, store: str, listing_key: str) -> m.Done:
    sku = _listing_sku(tx, store, listing_key, f"; see `goqctl listings {store}`")
    release_hold(tx, store, listing_key)
    tx.conn.execute(
        "UPDATE listings SET sku = NULL, link_state = 'unlinked', watch_qty = NULL "
        "WHERE store = ? AND listing_key = ?",
        (store, listing_key),
    )
    tx.conn.execute("DELETE FROM outbox WHERE store = ? AND listing_key = ?", (store, listing_key))
    released = _resolve_links(tx, store, sku) if sku is not None else 0
    if store in tx.parked_stores:
        parked_error(tx, store, listing_key, bump=False)
    return m.Done(changed=1, released=released)


def _resolve_links(tx: Tx, store: str, sku: str) -> int:
    """Apply the one-listing-per-product-per-store rule for ``sku`` in ``store``.

    Several listings of one product in one store are ambiguous (複数の商品が紐づいて
    います): all of them are marked so, an error names them, and their orders park.
    When one remains, it is linked again, its error cleared, its parked lines booked
    and its count queued for a push.
    """
    conn = tx.conn
    keys = listings_of(conn, store, sku)
    if len(keys) > 1:
        _mark_ambiguous(tx, store, sku, keys)
        return 0
    released = 0
    for key in keys:
        if _link_state(tx, store, key) == "ambiguous":
            conn.execute(
                "UPDATE listings SET link_state = 'linked' WHERE store = ? AND listing_key = ?",
                (store, key),
            )
        mark_resolved(tx, store, MULTIPLE_LINKS, key)
        released += release_parked(tx, store, key)
        queue_listing(tx, store, key)
    # Listings that were ambiguous with this one but now point elsewhere.
    # Per open error row (few), a primary-key lookup: never a scan of the store's
    # listings, which made a 100,000-listing import quadratic.
    conn.execute(
        "UPDATE errors SET cleared_at = ?, cleared_by = 'resolved' WHERE store = ? "
        "AND code = ? AND cleared_at IS NULL "
        "AND EXISTS (SELECT 1 FROM listings l WHERE l.store = errors.store "
        "AND l.listing_key = errors.listing_key "
        "AND (l.sku IS NULL OR l.link_state = 'linked'))",
        (tx.now(), store, MULTIPLE_LINKS),
    )
    return released


def _mark_ambiguous(tx: Tx, store: str, sku: str, keys: Sequence[str]) -> None:
    """Mark every listing of ``sku`` in ``store`` ambiguous; nothing is pushed to them."""
    tx.conn.execute(
        "UPDATE listings SET link_state = 'ambiguous' WHERE store = ? AND sku = ?", (store, sku)
    )
    tx.conn.execute("DELETE FROM outbox WHERE store = ? AND sku = ?", (store, sku))
    for key in keys:
        _multiple_links(
            tx,
            store,
            key,
            f"複数の商品が紐づいています: product {sku!r} has {len(keys)} listings "
            f"in store {store!r} ({', '.join(keys)}); unlink the wrong ones with "
            f"`goqctl unlink {store} LISTING`; orders for them are parked",
        )
        if store in tx.parked_stores:
            parked_error(tx, store, key, bump=False)


# ------------------------------------------------------------------ import and link by code


@dataclass
class _Report:
    """What an import, an auto-link or a product add did, as it goes."""

    seen: int = 0
    created: int = 0
    new_listings: int = 0
    updated: int = 0
    linked: int = 0
    unlinked: int = 0
    ambiguous: int = 0
    released: int = 0
    count_unknown: int = 0
    problems: list[str] = field(default_factory=list)

    def reply(self, store: str) -> m.LinkReport:
        return m.LinkReport(
            store=store,
            seen=self.seen,
            created=self.created,
            new_listings=self.new_listings,
            updated=self.updated,
            linked=self.linked,
            unlinked=self.unlinked,
            ambiguous=self.ambiguous,
            released=self.released,
            count_unknown=self.count_unknown,
            problems=tuple(self.problems[:100]),
        )


def _candidates(tx: Tx, code: str, rules: Sequence[str]) -> list[str]:
    """Products whose SKU matches ``code`` under the store's link condition."""
    if not code:
        return []
    rs = cast(Sequence[Rule], rules)
    want = normalize(code, rs)
    return [
        sku
        for (sku,) in tx.conn.execute(
            "SELECT sku FROM products WHERE code_fold = ? ORDER BY sku", (fold(code),)
        )
        if normalize(sku, rs) == want
    ]


def link_by_code(
    tx: Tx, store: str, key: str, code: str, rules: Sequence[str], report: _Report
) -> None:
    """Link a listing to the one product its code matches; an ambiguous match is said."""
    candidates = _candidates(tx, code, rules)
    if len(candidates) == 1:
        done = link(tx, store, key, candidates[0])
        report.linked += 1
        report.released += done.released
        if _link_state(tx, store, key) == "ambiguous":
            report.ambiguous += 1
            report.problems.append(
                f"{store}/{key}: product {candidates[0]} has another listing in this store"
            )
    elif not candidates:
        report.unlinked += 1
    else:
        report.ambiguous += 1
        problem = (
            f"複数の商品が紐づいています: listing {key!r} in store {store!r} matches "
            f"{len(candidates)} products ({', '.join(candidates)}); link it by hand with "
            f"`goqctl link {store} {key} SKU`"
        )
        report.problems.append(problem)
        _multiple_links(tx, store, key, problem)


def _multiple_links(tx: Tx, store: str, listing_key: str, message: str) -> None:
    """Record (or count again) the 複数の商品が紐づいています error of a listing."""
    record_error(
        tx,
        m.RecordError(
            store=store,
            level=LEVEL_TEMPORARY,
            code=MULTIPLE_LINKS,
            listing_key=listing_key,
            message=message,
        ),
    )


def import_listings(tx: Tx, msg: m.ImportListings) -> m.LinkReport:
    report = _Report()
    for listing in msg.listings:
        _import_one(tx, msg, listing, report)
    return report.reply(msg.store)


def _import_one(tx: Tx, msg: m.ImportListings, listing: m.MallListing, report: _Report) -> None:
    report.seen += 1
    known = fetch_one(
        tx.conn,
        KnownListing,
        "SELECT sku, link_state, attrs, name, link_code FROM listings "
        "WHERE store = ? AND listing_key = ?",
        (msg.store, listing.listing_key),
    )
    attrs = listing.attrs
    if known is None:
        report.new_listings += 1
    # As GoQSystem's 在庫連携 does (在庫連携へ未登録の商品のみ…置き換わります): a
    # listing new to goqd (never imported: no attributes yet, even if an order
    # named it) takes the store's default lead time instead of the mall's; a
    # lead time goqd already knows is never changed by an import. Either way the
    # mall gets goqd's value with the next push.
    if known is None or known.attrs is None:
        if msg.default_lead_time is not None:
            attrs = msgspec.structs.replace(attrs, lead_time_days=msg.default_lead_time)
    elif (old := decode_attrs(known.attrs)).lead_time_days is not None:
        attrs = msgspec.structs.replace(attrs, lead_time_days=old.lead_time_days)
    if known is not None and (
        encode_attrs(attrs) != (known.attrs or encode_attrs(EMPTY_ATTRS))
        or listing.name != known.name
        or listing.link_code != known.link_code
    ):
        report.updated += 1
    upsert_listing(
        tx,
        m.UpsertListing(
            store=msg.store,
            listing_key=listing.listing_key,
            link_code=listing.link_code,
            name=listing.name,
            attrs=attrs,
            seen_quantity=listing.quantity,
        ),
    )
    if known is not None and known.sku is not None:
        return  # re-import never relinks: `goqctl unlink` / `link` do that
    creates = msg.base or msg.create_products
    unmatched = creates and not _candidates(tx, listing.link_code, msg.rules)
    if unmatched and not _create(tx, msg, listing, report):
        return
    link_by_code(tx, msg.store, listing.listing_key, listing.link_code, msg.rules, report)


def _create(tx: Tx, msg: m.ImportListings, listing: m.MallListing, report: _Report) -> bool:
    """Create the product an unmatched listing of the base store (or of an import with
    ``create_products``) stands for; False when it cannot be one, said in ``report``."""
    if not msg.base and (problem := sku_problem(listing.link_code)):
        # Said, not skipped in silence: the operator asked for every listing.
        report.unlinked += 1
        report.problems.append(
            f"{msg.store}/{listing.listing_key}: no product created: its link "
            f"code {problem}; link it by hand: goqctl link "
            f"{shlex.quote(msg.store)} {shlex.quote(listing.listing_key)} SKU"
        )
        return False
    if not listing.link_code:
        report.unlinked += 1
        return False
    known = listing.quantity is not None
    upsert_product(
        tx,
        m.UpsertProduct(
            sku=listing.link_code,
            name=listing.name,
            total=max(0, listing.quantity or 0),
            store=msg.store,
            count_known=known,
        ),
    )
    report.created += 1
    if not known:
        # Unlimited (or untracked) at the base mall: 0 pushed everywhere would
        # show it sold out at every mall. Out of sync until given a count.
        report.count_unknown += 1
        report.problems.append(
            f"{msg.store}/{listing.listing_key}: product {listing.link_code} was "
            "created without a count (unlimited or not tracked at the mall); "
            "nothing is pushed for it until you set one: "
            f"goqctl stock set {shlex.quote(listing.link_code)} N"
        )
    return True


def auto_link(tx: Tx, store: str, rules: Sequence[str]) -> m.LinkReport:
    report = _Report()
    rows = tx.conn.execute(
        "SELECT listing_key, link_code FROM listings WHERE store = ? AND sku IS NULL "
        "ORDER BY listing_key",
        (store,),
    ).fetchall()
    for key, code in rows:
        report.seen += 1
        link_by_code(tx, store, key, code, rules, report)
    return report.reply(store)


def add_product(tx: Tx, msg: m.AddProduct) -> m.ProductAdded:
    """`goqctl product add`: a product no store's import made, at the operator's count.

    An existing SKU is refused and nothing changes. Then each store's unlinked
    listings whose code matches the SKU under that store's rules are linked as an
    import links them (``link_by_code``: one that matches another product too, or a
    second listing of it in one store, is ambiguous and said so), which books their
    parked lines and queues their pushes. One request: all of it or none.
    """
    sku = msg.sku
    if problem := sku_problem(sku):
        raise LedgerError(f"SKU {sku!r} cannot be used: it {problem}; nothing was changed")
    if not 0 <= msg.quantity <= limits.MAX_QUANTITY:
        raise LedgerError(
            f"quantity {msg.quantity} for {sku!r} is out of range "
            f"(0 to {limits.MAX_QUANTITY}); nothing was changed"
        )
    row = tx.conn.execute(
        "SELECT total, count_known FROM products WHERE sku = ?", (sku,)
    ).fetchone()
    if row is not None:
        total_now, known = row
        count = str(total_now) if known else "unknown"
        raise LedgerError(
            f"product {sku!r} already exists (total {count}); nothing was changed. "
            f"To change its count: goqctl stock set {shlex.quote(sku)} N"
        )
    # No first store: the operator's count is nobody's mall count, so no store's
    # earlier sales are taken as already in it.
    tx.conn.execute(
        "INSERT INTO products (sku, name, total, first_store, created_at, code_fold, "
        "count_known) VALUES (?, ?, 0, '', ?, ?, 1)",
        (sku, msg.name, tx.now(), fold(sku)),
    )
    move(tx, sku, msg.quantity, "set", reason="goqctl product add")
    report = _Report()
    for store, rules in msg.stores:
        for key, code in _unlinked_matching(tx, store, sku, rules):
            link_by_code(tx, store, key, code, rules, report)
    linked: list[tuple[str, str]] = []
    ambiguous: list[tuple[str, str]] = []
    for store, key, state in tx.conn.execute(
        "SELECT store, listing_key, link_state FROM listings WHERE sku = ? "
        "ORDER BY store, listing_key",
        (sku,),
    ):
        (linked if state == "linked" else ambiguous).append((store, key))
    return m.ProductAdded(
        sku=sku,
        name=msg.name,
        total=total(tx, sku),  # parked sales the new links booked are off it
        linked=tuple(linked[:100]),
        ambiguous=tuple(ambiguous[:100]),
        released=report.released,
        problems=tuple(report.problems[:100]),
    )


def _unlinked_matching(tx: Tx, store: str, sku: str, rules: Sequence[str]) -> list[tuple[str, str]]:
    """``(listing_key, link_code)`` of the unlinked listings of ``store`` whose code
    matches ``sku`` under ``rules``. Exact codes read the (store, link_code) index; a
    store with rules has its unlinked listings folded, as no index holds that.

    INDEXED BY: for ``ORDER BY listing_key`` SQLite otherwise walks the primary key,
    every listing of the store (linked or not) for one code."""
    if not rules:
        return tx.conn.execute(
            "SELECT listing_key, link_code FROM listings INDEXED BY listings_by_code "
            "WHERE store = ? AND link_code = ? AND sku IS NULL ORDER BY listing_key",
            (store, sku),
        ).fetchall()
    rs = cast(Sequence[Rule], rules)
    want = normalize(sku, rs)
    rows = tx.conn.execute(
        "SELECT listing_key, link_code FROM listings INDEXED BY listings_by_state "
        "WHERE store = ? AND link_state = 'unlinked' AND link_code != '' "
        "AND goqd_fold(link_code) = ? ORDER BY listing_key",
        (store, fold(sku)),
    ).fetchall()
    return [(key, code) for key, code in rows if normalize(code, rs) == want]


def sku_problem(code: str) -> str | None:
    """Why ``code`` cannot be a product's SKU, by the rules a CSV's sku column follows
    (``goqd.csvio``): ``None`` when it can."""
    if not code:
        return "is empty"
    if len(code) > limits.MAX_SKU:
        return f"is {len(code)} characters long; a SKU has at most {limits.MAX_SKU}"
    if "\x00" in code:
        return "contains a NUL character"
    return None
