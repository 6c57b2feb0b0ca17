"""Staged stock imports: a large stock CSV applied a chunk a transaction.

The file is staged in chunks, sealed once every row is in, then applied a chunk per
transaction; applied rows are deleted in the transaction that applies them, so what is
left is what is to do, and a step repeated after a crash applies nothing twice. The
import row carries the request id, so a client that reconnects finds its import again.
"""

from __future__ import annotations

import sqlite3

import msgspec

from goqd import messages as m
from goqd.crashpoints import crashpoint
from goqd.csvio import duplicate_sku
from goqd.errors import CountUnknown, InputError, LedgerError, UnknownSku
from goqd.ledger.rows import IMPORT_COLUMNS, StockImport, fetch_all, fetch_one, json_list
from goqd.ledger.stock import adjust_stock, set_stock
from goqd.ledger.tx import Tx


def stock_import(tx: Tx, msg: m.StockImportStep) -> m.LedgerReply:
    """One step of a staged stock import (``messages.StockImportStep``).

    Not deduplicated by request id as other operator requests are: the import row
    itself carries the request id, and every step is safe to repeat (a chunk applied is
    deleted from staging in its own transaction, so it is never applied again).
    """
    match msg:
        case m.BeginStockImport():
            return _begin(tx, msg)
        case m.StageStockRows():
            return _stage(tx, msg)
        case m.SealStockImport():
            return _seal(tx, msg)
        case m.ApplyStockImport():
            return _apply(tx, msg)
        case m.DiscardStockImport():
            return _discard(tx, msg)
        case m.ListStockImports():
            found = fetch_all(
                tx.conn,
                StockImport,
                f"SELECT {IMPORT_COLUMNS} FROM stock_imports i "
                "WHERE state IN ('staging', 'applying') OR (state = 'discarded' AND "
                "EXISTS (SELECT 1 FROM stock_import_rows r WHERE r.import_id = i.id)) "
                "ORDER BY id",
            )
            return m.StockImportList(imports=tuple(r.job() for r in found))
    raise LedgerError(f"unknown stock import step {type(msg).__name__}")


def _import(tx: Tx, import_id: int) -> StockImport:
    row = fetch_one(
        tx.conn,
        StockImport,
        f"SELECT {IMPORT_COLUMNS} FROM stock_imports WHERE id = ?",
        (import_id,),
    )
    if row is None:
        raise LedgerError(f"no stock import {import_id}")
    return row


def _set_state(tx: Tx, import_id: int, state: str) -> None:
    """Move an import to ``state``; a discarded one is stamped when it was discarded."""
    if state == "discarded":
        tx.conn.execute(
            "UPDATE stock_imports SET state = 'discarded', finished_at = ? WHERE id = ?",
            (tx.now(), import_id),
        )
    else:
        tx.conn.execute("UPDATE stock_imports SET state = ? WHERE id = ?", (state, import_id))


def _begin(tx: Tx, msg: m.BeginStockImport) -> m.StockImportJob:
    if msg.request_id:
        row = fetch_one(
            tx.conn,
            StockImport,
            f"SELECT {IMPORT_COLUMNS} FROM stock_imports "
            "WHERE request_id = ? AND state != 'discarded'",
            (msg.request_id,),
        )
        if row is not None:
            if row.digest != msg.digest:
                raise LedgerError(
                    f"request id {msg.request_id!r} was already used for a different "
                    "stock CSV; nothing was applied: send this file with a new id"
                )
            if row.state != "staging":
                return row.job()
            # Left half-staged by a daemon that stopped: its rows may be incomplete,
            # so it is dropped (its rows are purged later, a chunk at a time) and the
            # file is staged again from the top.
            _set_state(tx, row.id, "discarded")
    (import_id,) = tx.conn.execute(
        "INSERT INTO stock_imports (request_id, digest, mode, reason, state, created_at) "
        "VALUES (?, ?, ?, ?, 'staging', ?) RETURNING id",
        (msg.request_id, msg.digest, msg.mode, msg.reason, tx.now()),
    ).fetchone()
    return m.StockImportJob(
        import_id=import_id, state="staging", request_id=msg.request_id, digest=msg.digest
    )


def _first_row_where(tx: Tx, rows: tuple[tuple[int, str, int], ...], condition: str) -> int | None:
    """The index in ``rows`` of the first whose SKU's product meets ``condition``
    (``p`` its product, NULL columns when there is none), or None."""
    (index,) = tx.conn.execute(
        "SELECT min(j.key) FROM json_each(?) j LEFT JOIN products p ON p.sku = j.value "
        f"WHERE {condition}",
        (json_list(r[1] for r in rows),),
    ).fetchone()
    return None if index is None else int(index)


def _stage(tx: Tx, msg: m.StageStockRows) -> m.Done:
    conn = tx.conn
    job = _import(tx, msg.import_id)
    if job.state != "staging":
        raise LedgerError(f"stock import {msg.import_id} is {job.state}, no longer staging")
    rows = msg.rows
    if not rows:
        return m.Done()
    checks = [("p.sku IS NULL", "is not a product goqd has (see `goqctl products`)")]
    if job.mode == "adjust":
        checks.append(
            (
                "p.count_known = 0",
                "has no known count to adjust (imported without one); set it with a "
                "sku,quantity CSV or `goqctl stock set {sku} N`",
            )
        )
    for condition, problem in checks:
        index = _first_row_where(tx, rows, condition)
        if index is not None:
            line, sku, _ = rows[index]
            raise InputError(f"{msg.where}: line {line}: sku {sku!r} {problem.format(sku=sku)}")
    try:
        conn.executemany(
            "INSERT INTO stock_import_rows (import_id, line, sku, n) VALUES (?, ?, ?, ?)",
            ((msg.import_id, line, sku, n) for line, sku, n in rows),
        )
    except sqlite3.IntegrityError:
        # The unique index found a SKU twice; name the first repeat and its first
        # line (the rows before it in this chunk are in, the savepoint drops them).
        for line, sku, _ in rows:
            (first,) = conn.execute(
                "SELECT min(line) FROM stock_import_rows WHERE import_id = ? AND sku = ?",
                (msg.import_id, sku),
            ).fetchone()
            if first is not None and first < line:
                raise duplicate_sku(msg.where, line, sku, first) from None
        raise
    conn.execute(
        "UPDATE stock_imports SET staged = staged + ? WHERE id = ?", (len(rows), msg.import_id)
    )
    return m.Done(changed=len(rows))


def _seal(tx: Tx, msg: m.SealStockImport) -> m.StockImportJob:
    job = _import(tx, msg.import_id)
    if job.state == "discarded":
        raise LedgerError(f"stock import {msg.import_id} was discarded; nothing was applied")
    if job.state == "staging":
        if job.staged != msg.rows:
            raise LedgerError(
                f"stock import {msg.import_id}: {job.staged} rows staged but {msg.rows} "
                "read; nothing was applied"
            )
        _set_state(tx, msg.import_id, "applying")
        job = _import(tx, msg.import_id)
    return job.job()


def _apply(tx: Tx, msg: m.ApplyStockImport) -> m.StockImportJob:
    conn = tx.conn
    job = _import(tx, msg.import_id)
    if job.state != "applying":
        # Done, or discarded: answered, not refused. The caller tells this lasting state
        # from a failed transaction, which it retries.
        return job.job()
    limit = max(1, msg.limit)
    rows = conn.execute(
        "SELECT line, sku, n FROM stock_import_rows WHERE import_id = ? ORDER BY line LIMIT ?",
        (msg.import_id, limit),
    ).fetchall()
    applied = skipped = 0
    for _line, sku, n in rows:
        try:
            if job.mode == "set":
                set_stock(tx, sku, n, job.reason)
            else:
                adjust_stock(tx, sku, n, job.reason)
        except (UnknownSku, CountUnknown):
            # Deleted (`goqctl delete`) after its row was staged, or deleted and
            # imported again without a count: nothing to set or adjust.
            skipped += 1
            continue
        applied += 1
    if rows:
        conn.execute(
            "DELETE FROM stock_import_rows WHERE import_id = ? AND line <= ?",
            (msg.import_id, rows[-1][0]),
        )
    conn.execute(
        "UPDATE stock_imports SET applied = applied + ?, skipped = skipped + ? WHERE id = ?",
        (applied, skipped, msg.import_id),
    )
    if len(rows) < limit:  # nothing left: the import is done
        total, skipped_total = job.applied + applied, job.skipped + skipped
        detail = ""
        if skipped_total:
            detail = (
                f"{total} stock count(s) imported; {skipped_total} row(s) skipped: "
                "their product was deleted while the import ran"
            )
        conn.execute(
            "UPDATE stock_imports SET state = 'done', reply = ?, finished_at = ? WHERE id = ?",
            (
                msgspec.msgpack.encode(m.Done(changed=total, detail=detail)),
                tx.now(),
                msg.import_id,
            ),
        )
    crashpoint("stock_import.chunk_applied")
    return _import(tx, msg.import_id).job()


def _discard(tx: Tx, msg: m.DiscardStockImport) -> m.Done:
    job = _import(tx, msg.import_id)
    if job.state in ("applying", "done"):
        raise LedgerError(f"stock import {msg.import_id} is sealed: it is applied, never discarded")
    if job.state == "staging":
        _set_state(tx, msg.import_id, "discarded")
    cur = tx.conn.execute(
        "DELETE FROM stock_import_rows WHERE import_id = ?1 AND line IN "
        "(SELECT line FROM stock_import_rows WHERE import_id = ?1 ORDER BY line LIMIT ?2)",
        (msg.import_id, max(1, msg.limit)),
    )
    return m.Done(changed=cur.rowcount)
