"""The ``errors`` table: open an error or count it again, and close errors.

An error is open until it is cleared: by the operator, healed (its store recovered), or
resolved (the ledger fixed its cause). Closed errors stay as history. Listing them is a
read (``goqd.ledger.queries.list_errors``).
"""

from __future__ import annotations

from typing import Any

from goqd import messages as m
from goqd.errors import LEVEL_CREDENTIAL, LedgerError
from goqd.ledger.queries import MULTIPLE_LINKS, NOT_LINKED
from goqd.ledger.rows import json_list
from goqd.ledger.tx import Tx

__all__ = [
    "MULTIPLE_LINKS",
    "NOT_LINKED",
    "clear_errors",
    "mark_resolved",
    "record_error",
    "resolve_errors",
]


def record_error(tx: Tx, msg: m.RecordError) -> m.Done:
    """Open an error, or bump the open one of the same store, code and listing (its
    count, last time, message and mall code follow the latest occurrence)."""
    now = tx.now()
    cur = tx.conn.execute(
        "UPDATE errors SET last_seen = ?, count = count + 1, message = ?, level = ?, "
        "mall_code = ? WHERE store = ? AND code = ? AND listing_key = ? "
        "AND cleared_at IS NULL",
        (now, msg.message, msg.level, msg.mall_code, msg.store, msg.code, msg.listing_key),
    )
    if cur.rowcount == 0:
        tx.conn.execute(
            "INSERT INTO errors (store, level, code, message, listing_key, first_seen, "
            "last_seen, mall_code) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                msg.store,
                msg.level,
                msg.code,
                msg.message,
                msg.listing_key,
                now,
                now,
                msg.mall_code,
            ),
        )
        return m.Done(changed=1)
    return m.Done(changed=0)


def mark_resolved(tx: Tx, store: str, code: str, listing_key: str) -> None:
    """Close the open ``code`` error of one listing: the ledger fixed its cause."""
    tx.conn.execute(
        "UPDATE errors SET cleared_at = ?, cleared_by = 'resolved' WHERE store = ? "
        "AND code = ? AND listing_key = ? AND cleared_at IS NULL",
        (tx.now(), store, code, listing_key),
    )


def resolve_errors(tx: Tx, msg: m.ResolveErrors) -> m.Done:
    """Mark open errors whose cause went away by itself resolved (``cleared_by``
    "healed"), kept in history. Never a credential error: that needs the operator."""
    sql = (
        "UPDATE errors SET cleared_at = ?, cleared_by = 'healed' WHERE store = ? "
        "AND listing_key = ? AND cleared_at IS NULL AND level < ?"
    )
    args: list[Any] = [tx.now(), msg.store, msg.listing_key, LEVEL_CREDENTIAL]
    if msg.codes:
        sql += " AND code IN (SELECT value FROM json_each(?))"
        args.append(json_list(msg.codes))
    if msg.before is not None:
        sql += " AND last_seen <= ?"
        args.append(msg.before)
    return m.Done(changed=tx.conn.execute(sql, args).rowcount)


def clear_errors(tx: Tx, msg: m.ClearErrors) -> m.Done:
    now = tx.now()
    changed = 0
    if msg.ids:
        for error_id in msg.ids:
            changed += tx.conn.execute(
                "UPDATE errors SET cleared_at = ?, cleared_by = 'operator' "
                "WHERE id = ? AND cleared_at IS NULL",
                (now, error_id),
            ).rowcount
    elif msg.store:
        sql = (
            "UPDATE errors SET cleared_at = ?, cleared_by = 'operator' "
            "WHERE store = ? AND cleared_at IS NULL"
        )
        args: tuple[Any, ...] = (now, msg.store)
        if msg.level is not None:
            sql += " AND level = ?"
            args += (msg.level,)
        changed = tx.conn.execute(sql, args).rowcount
    else:
        raise LedgerError("say which errors to clear: ids or a store")
    return m.Done(changed=changed)
