"""The outbox: the counts waiting to be pushed to each listing, and their outcomes.

Every change of a SKU's total writes, in the same transaction, one outbox row per linked
listing; a newer version overwrites an unpushed older one. The store actor takes rows
(``take_pushes``) and reports what the mall did with them (``pushes_done``); a row is
deleted only when the mall accepted that very version.
"""

from __future__ import annotations

from collections.abc import Sequence

from goqd import messages as m
from goqd.errors import LEVEL_TEMPORARY, LedgerError
from goqd.ledger.error_rows import record_error
from goqd.ledger.rows import decode_attrs, json_list
from goqd.ledger.tx import Tx

REJECT_RETRY_S = 300.0  # a listing the mall refused is retried after this, or on change
STALE_RETRY_S = 2.0  # a stale compare-and-set is retried after the store's next poll


def queue_sql(source: str, where: str = "", returning: str = "store") -> str:
    """The statement that queues a push of goqd's count to the linked listings of
    ``source`` (a FROM clause naming ``listings l`` and ``products p``).

    Its first parameter is the version, then those of ``source`` and ``where``. What is
    pushed is the total less the units held back; a listing whose product has no known
    count gets nothing (it is unlimited at its mall: pushing 0 would show it sold out).
    """
    return (
        "INSERT INTO outbox (store, listing_key, sku, quantity, version, not_before, "
        "attempts) SELECT l.store, l.listing_key, l.sku, max(0, p.total - p.held), ?, 0, 0 "
        f"FROM {source} WHERE {where + ' AND ' if where else ''}"
        "l.link_state = 'linked' AND p.count_known = 1 "
        "ON CONFLICT (store, listing_key) DO UPDATE SET quantity = excluded.quantity, "
        "version = excluded.version, sku = excluded.sku, not_before = 0, attempts = 0 "
        f"RETURNING {returning}"
    )


_QUEUE_SKUS = queue_sql(
    "json_each(?) j JOIN listings l ON l.sku = j.value JOIN products p ON p.sku = l.sku"
)
_QUEUE_LISTING = queue_sql(
    "listings l JOIN products p ON p.sku = l.sku", "l.store = ? AND l.listing_key = ?"
)


def flush_dirty(tx: Tx) -> None:
    """Write one outbox row per linked listing of every SKU changed in this batch.

    Once per transaction, in one statement: a burst of orders for one SKU costs one
    row per listing, and every row written by one batch shares one version (a
    listing gets at most one row per batch, so versions still only grow per listing).
    """
    if not tx.dirty:
        return
    tx.version += 1
    rows = tx.conn.execute(_QUEUE_SKUS, (tx.version, json_list(sorted(tx.dirty)))).fetchall()
    tx.woken.update(r[0] for r in rows)
    tx.dirty.clear()


def queue_listing(tx: Tx, store: str, listing_key: str) -> None:
    """Queue a push of the current total to one listing (after link / attr change)."""
    tx.version += 1
    rows = tx.conn.execute(_QUEUE_LISTING, (tx.version, store, listing_key)).fetchall()
    tx.woken.update(r[0] for r in rows)


def take_pushes(tx: Tx, store: str, limit: int, *, peek: bool = False) -> m.PushBatch:
    # ``previous_quantity`` (compare-and-set malls): the count the mall last accepted
    # from goqd or, before any push, the count goqd last saw there (the watch's
    # expectation, else the import's reading). Without one a first push went blind
    # and could erase a sale made before it; a guess that is off only costs a stale
    # answer, a read and a retry.
    rows = tx.conn.execute(
        "SELECT o.listing_key, o.sku, o.quantity, o.version, l.attrs, "
        "coalesce(l.last_pushed_qty, l.watch_qty, l.last_seen_qty) "
        "FROM outbox o JOIN listings l ON l.store = o.store AND l.listing_key = o.listing_key "
        "WHERE o.store = ? AND o.not_before <= ? ORDER BY o.version LIMIT ?",
        (store, tx.now(), limit),
    ).fetchall()
    pending = tx.conn.execute("SELECT count(*) FROM outbox WHERE store = ?", (store,)).fetchone()[0]
    if rows and not peek:
        tx.conn.execute(
            "UPDATE outbox SET sent_min = min(coalesce(sent_min, quantity), quantity) "
            "WHERE store = ? AND listing_key IN (SELECT value FROM json_each(?))",
            (store, json_list(r[0] for r in rows)),
        )
    items = tuple(
        m.PushItem(
            listing_key=key,
            sku=sku,
            quantity=qty,
            version=version,
            attrs=decode_attrs(attrs),
            previous_quantity=last,
        )
        for key, sku, qty, version, attrs, last in rows
    )
    return m.PushBatch(store=store, items=items, pending=int(pending))


def pushes_done(tx: Tx, msg: m.PushesDone) -> m.Done:
    conn = tx.conn
    changed = 0
    now = tx.now()
    accepted = [o.listing_key for o in msg.outcomes if o.accepted]
    if accepted:
        # The mall took these listings' counts: an earlier refusal of them is over.
        conn.execute(
            "UPDATE errors SET cleared_at = ?, cleared_by = 'resolved' WHERE store = ? "
            "AND code = 'listing_rejected' AND cleared_at IS NULL AND listing_key IN "
            "(SELECT value FROM json_each(?))",
            (now, msg.store, json_list(accepted)),
        )
    for out in msg.outcomes:
        if out.accepted:
            cur = conn.execute(
                "DELETE FROM outbox WHERE store = ? AND listing_key = ? AND version = ?",
                (msg.store, out.listing_key, out.version),
            )
            changed += cur.rowcount
            conn.execute(
                "UPDATE listings SET last_pushed_qty = coalesce(?, last_pushed_qty), "
                # Only listings the watch reads keep an expectation.
                "last_pushed_version = ?, watch_qty = CASE WHEN watch_qty IS NULL "
                "THEN NULL ELSE coalesce(?, watch_qty) END, "
                "watch_at = ? WHERE store = ? AND listing_key = ? "
                "AND (last_pushed_version IS NULL OR last_pushed_version < ?)",
                (
                    out.quantity,
                    out.version,
                    out.quantity,
                    now,
                    msg.store,
                    out.listing_key,
                    out.version,
                ),
            )
        elif out.code == m.STALE:
            # Not an error: retry soon, comparing against what the mall now shows.
            _retry_after(tx, msg.store, out, now + STALE_RETRY_S)
            conn.execute(
                "UPDATE listings SET last_pushed_qty = ?, last_seen_qty = ?, "
                "watch_qty = CASE WHEN watch_qty IS NULL THEN NULL "
                "ELSE coalesce(?, watch_qty) END, watch_at = ? "
                "WHERE store = ? AND listing_key = ?",
                (out.quantity, out.quantity, out.quantity, now, msg.store, out.listing_key),
            )
        else:
            _retry_after(tx, msg.store, out, now + REJECT_RETRY_S)
            mall_code = out.code if out.code != "listing_rejected" else ""
            message = out.message or "the mall refused this listing's stock update"
            if mall_code and mall_code not in message:
                message = f"{mall_code}: {message}"  # read in a log or a mail, too
            record_error(
                tx,
                m.RecordError(
                    store=msg.store,
                    level=LEVEL_TEMPORARY,
                    code="listing_rejected",
                    message=message,
                    listing_key=out.listing_key,
                    mall_code=mall_code,
                ),
            )
    return m.Done(changed=changed)


def _retry_after(tx: Tx, store: str, out: m.PushOutcome, when: float) -> None:
    """Keep the outbox row of a push the mall did not take, to be sent again at ``when``."""
    tx.conn.execute(
        "UPDATE outbox SET not_before = ?, attempts = attempts + 1 "
        "WHERE store = ? AND listing_key = ? AND version = ?",
        (when, store, out.listing_key, out.version),
    )


def queue_pushes(tx: Tx, store: str, keys: Sequence[str], *, strict: bool = True) -> m.Done:
    if not keys:
        keys = [
            r[0]
            for r in tx.conn.execute(
                "SELECT listing_key FROM listings WHERE store = ? AND link_state = 'linked'",
                (store,),
            )
        ]
    queued = 0
    for key in keys:
        state = tx.conn.execute(
            "SELECT link_state FROM listings WHERE store = ? AND listing_key = ?",
            (store, key),
        ).fetchone()
        if not strict and (state is None or state[0] != "linked"):
            continue
        if state is None:
            raise LedgerError(f"no listing {key!r} in store {store!r}")
        if state[0] != "linked":
            raise LedgerError(f"listing {key!r} in store {store!r} is {state[0]}: link it first")
        queue_listing(tx, store, key)
        queued += 1
    return m.Done(changed=queued, detail=f"{queued} listing(s) queued for a push")
