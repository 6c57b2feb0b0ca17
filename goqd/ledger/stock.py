"""A product's total: every change of it is a movement, and queues its pushes.

``move`` is the one place a total changes: it records the movement, counts oversold
units, and marks the SKU so that ``outbox.flush_dirty`` queues a push to each of its
linked listings when the batch commits.
"""

from __future__ import annotations

from goqd import messages as m
from goqd.errors import CountUnknown, LedgerError, UnknownSku
from goqd.ledger.tx import Tx, bump_meta


def move(
    tx: Tx,
    sku: str,
    delta: int,
    cause: str,
    *,
    store: str = "",
    order_id: str = "",
    line_id: str = "",
    reason: str = "",
) -> tuple[int, int]:
    """Change a SKU's total by ``delta``, record the movement, queue the pushes.

    Returns the total after and the movement's id."""
    row = tx.conn.execute(
        "UPDATE products SET total = total + ? WHERE sku = ? RETURNING total, held, count_known",
        (delta, sku),
    ).fetchone()
    if row is None:
        raise UnknownSku(f"unknown SKU {sku!r}")
    after, held, count_known = int(row[0]), int(row[1]), row[2]
    before = after - delta
    oversold = 0
    # A product without a known count has no stock to sell below: its total only
    # keeps the movements until `goqctl stock set` gives the count.
    if cause in ("order", "correction") and delta < 0 and count_known:
        oversold = max(0, -after) - max(0, -before)
    if oversold:
        tx.oversold += oversold
        bump_meta(tx.conn, "oversold_units", oversold)
    cur = tx.conn.execute(
        "INSERT INTO movements (sku, delta, total_after, cause, store, order_id, line_id, "
        "reason, oversold, at, held_after) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            sku,
            delta,
            after,
            cause,
            store,
            order_id,
            line_id,
            reason,
            oversold,
            tx.now(),
            held,
        ),
    )
    tx.dirty.add(sku)
    return after, int(cur.lastrowid or 0)


def total(tx: Tx, sku: str) -> int:
    """The SKU's total; ``UnknownSku`` for a SKU goqd has no product of."""
    row = tx.conn.execute("SELECT total FROM products WHERE sku = ?", (sku,)).fetchone()
    if row is None:
        raise UnknownSku(f"unknown SKU {sku!r}: see `goqctl products`")
    return int(row[0])


def set_stock(tx: Tx, sku: str, quantity: int, reason: str) -> m.StockChanged:
    if quantity < 0:
        raise LedgerError(f"stock for {sku!r} cannot be set below 0 (got {quantity})")
    delta = quantity - total(tx, sku)
    # A count given by the operator is known from now on: its pushes go out (a move
    # of 0 still marks the SKU, so every linked listing is queued).
    tx.conn.execute("UPDATE products SET count_known = 1 WHERE sku = ? AND count_known = 0", (sku,))
    return _changed(tx, sku, delta, "set", reason)


def adjust_stock(tx: Tx, sku: str, delta: int, reason: str) -> m.StockChanged:
    total(tx, sku)
    row = tx.conn.execute("SELECT count_known FROM products WHERE sku = ?", (sku,)).fetchone()
    if row is None or not row[0]:
        raise CountUnknown(
            f"{sku!r} has no known count to adjust (it was imported without one: "
            f"unlimited or untracked at its mall); set it: `goqctl stock set {sku} N`"
        )
    return _changed(tx, sku, delta, "adjust", reason)


def _changed(tx: Tx, sku: str, delta: int, cause: str, reason: str) -> m.StockChanged:
    after, movement_id = move(tx, sku, delta, cause, reason=reason)
    return m.StockChanged(sku=sku, total=after, delta=delta, movement_id=movement_id)


def set_stocks(tx: Tx, msg: m.SetStocks) -> m.Done:
    for sku, n in msg.items:
        if msg.mode == "set":
            set_stock(tx, sku, n, msg.reason)
        else:
            adjust_stock(tx, sku, n, msg.reason)
    return m.Done(changed=len(msg.items))
