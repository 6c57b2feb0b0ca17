"""Large imports (issue 14, item 2): a stock CSV is read off the event loop, checked whole,
staged, then applied a bounded chunk a transaction while the ledger goes on answering;
a crash mid-apply finishes the import after the restart with every row applied exactly
once; a retry of the same request gets the same reply. The listings CSV is read off the
event loop too. Speed is not asserted here: ``python -m goqd.tools.importbench`` measures it.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from goqd import messages as m
from goqd.app import Daemon, run_daemon
from goqd.config import Config
from goqd.control import imports as goqd_app
from goqd.control import protocol as p
from goqd.control.client import RemoteError, call
from goqd.csvio import ListingsReader, StockReader
from goqd.errors import ControlError, InputError
from goqd.ledger import Ledger, open_db, queries
from goqd.ledger.rows import StockImport
from goqd.linking import fold
from goqd.tools.fleet import daemon_config
from tests.helpers import rig


@pytest.fixture
def tmp(sock_dir: str) -> str:
    return sock_dir


def seed_products(config: Config, totals: dict[str, int]) -> None:
    os.makedirs(config.daemon.state_dir, exist_ok=True)
    conn = open_db(config.daemon.ledger_path)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO products (sku, total, first_store, created_at, code_fold) "
        "VALUES (?, ?, '', 0, ?)",
        ((sku, total, fold(sku)) for sku, total in totals.items()),
    )
    conn.execute("COMMIT")
    conn.close()


def catalogue(n: int) -> dict[str, int]:
    return {f"P{i:05d}": 10 for i in range(n)}


def stock_csv(column: str, values: dict[str, int]) -> str:
    return f"sku,{column}\n" + "".join(f"{sku},{n}\n" for sku, n in values.items())


@asynccontextmanager
async def open_bare_daemon(config: Config) -> AsyncIterator[Daemon]:
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(run_daemon, config)
        yield daemon
        nursery.cancel_scope.cancel()


def totals_of(config: Config) -> dict[str, int]:
    return queries.read(config.daemon.ledger_path, queries.totals)


def moves_of(config: Config) -> list[m.Movement]:
    return queries.read(config.daemon.ledger_path, queries.movements)


def imports_of(config: Config) -> list[StockImport]:
    return queries.read(config.daemon.ledger_path, queries.stock_imports)


def staged_rows(config: Config) -> int:
    return queries.read(config.daemon.ledger_path, queries.staged_rows)


def imported_moves(config: Config) -> int:
    return sum(mv.reason == "stock import" for mv in moves_of(config))


# ------------------------------------------------------------------ in one process


async def test_a_large_stock_import_commits_bounded_chunks_while_the_ledger_answers(
    tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(goqd_app, "STAGE_CHUNK", 300)
    monkeypatch.setattr(goqd_app, "APPLY_CHUNK", 100)
    readers: set[threading.Thread] = set()
    read = StockReader.read

    def spy(self: StockReader, limit: int) -> list[tuple[int, str, int]]:
        readers.add(threading.current_thread())
        return read(self, limit)

    monkeypatch.setattr(StockReader, "read", spy)
    config = daemon_config(tmp, ())  # no stores: ledger, socket, HTTP
    totals = catalogue(1000)
    seed_products(config, totals)
    wanted = {sku: i % 50 for i, sku in enumerate(totals)}
    seen: set[int] = set()
    with trio.fail_after(60):
        async with open_bare_daemon(config) as daemon:
            done = trio.Event()
            result: list[object] = []

            async def run_import() -> None:
                result.append(
                    await call(
                        config.daemon.control_socket,
                        p.StockImport(csv_text=stock_csv("quantity", wanted)),
                        timeout=60,
                    )
                )
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_import)
                # The watchdog's probe: answered throughout, and between answers the
                # import's progress is committed a whole chunk at a time.
                while not done.is_set():
                    await daemon.ledger.ask(m.Ping(), m.Pong)
                    seen.add(imported_moves(config))
    [reply] = result
    assert isinstance(reply, m.Done) and reply.changed == 1000
    assert totals_of(config) == wanted
    assert {(mv.cause, mv.reason) for mv in moves_of(config) if mv.reason == "stock import"} == {
        ("set", "stock import")
    }
    partial = {n for n in seen if 0 < n < 1000}
    assert len(partial) >= 2, seen  # one transaction for the file would show 0 or 1000
    assert all(n % 100 == 0 for n in seen), seen
    assert readers and threading.main_thread() not in readers  # parsed in worker threads
    assert staged_rows(config) == 0


async def test_a_bad_row_after_staged_chunks_applies_nothing_and_names_its_line(
    tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(goqd_app, "STAGE_CHUNK", 100)
    config = daemon_config(tmp, ())  # no stores: ledger, socket, HTTP
    totals = catalogue(500)
    seed_products(config, totals)
    deltas = dict.fromkeys(totals, 1)
    deltas["NOT-A-PRODUCT"] = 1  # line 502, after five staged chunks
    with trio.fail_after(60):
        async with open_bare_daemon(config):
            with pytest.raises(RemoteError) as refused:
                await call(
                    config.daemon.control_socket,
                    p.StockImport(csv_text=stock_csv("delta", deltas)),
                    timeout=60,
                )
    assert refused.value.code == "bad_request"
    assert "line 502: sku 'NOT-A-PRODUCT' is not a product goqd has" in refused.value.message
    assert moves_of(config) == []
    assert set(totals_of(config).values()) == {10}
    assert [(job.state, job.staged) for job in imports_of(config)] == [("discarded", 500)]
    assert staged_rows(config) == 0


async def test_a_retry_gets_the_same_reply_and_another_file_under_its_id_is_refused(
    tmp: str,
) -> None:
    config = daemon_config(tmp, ())  # no stores: ledger, socket, HTTP
    seed_products(config, catalogue(3))
    sock = config.daemon.control_socket
    text = stock_csv("delta", {"P00000": 5, "P00001": -2})
    with trio.fail_after(30):
        async with open_bare_daemon(config):
            first = await call(sock, p.StockImport(csv_text=text), request_id="req-a")
            again = await call(sock, p.StockImport(csv_text=text), request_id="req-a")
            with pytest.raises(RemoteError) as conflict:
                await call(
                    sock,
                    p.StockImport(csv_text=stock_csv("delta", {"P00002": 1})),
                    request_id="req-a",
                )
    assert first == again == m.Done(changed=2)
    assert conflict.value.code == "conflict"
    assert "already used for a different stock CSV" in conflict.value.message
    assert totals_of(config) == {"P00000": 15, "P00001": 8, "P00002": 10}
    assert imported_moves(config) == 2


async def test_an_import_left_half_staged_by_a_stop_is_discarded_at_start(tmp: str) -> None:
    config = daemon_config(tmp, ())  # no stores: ledger, socket, HTTP
    seed_products(config, catalogue(4))
    text = stock_csv("delta", {"P00000": 1, "P00001": 1, "P00002": 1})
    ledger = Ledger(open_db(config.daemon.ledger_path), now=lambda: 0.0)
    digest = goqd_app._digest(text)
    [job] = ledger.apply_batch(
        [m.BeginStockImport(request_id="req-b", digest=digest, mode="adjust")]
    ).replies
    assert isinstance(job, m.StockImportJob)
    ledger.apply_batch(
        [m.StageStockRows(import_id=job.import_id, rows=((2, "P00000", 1), (3, "P00001", 1)))]
    )
    ledger.conn.close()  # stopped before the last row was staged, so never sealed
    with trio.fail_after(30):
        async with open_bare_daemon(config):
            await rig.wait_for(
                lambda: staged_rows(config) == 0,
                timeout=10,
                what="the half-staged rows purged",
            )
            assert [job.state for job in imports_of(config)] == ["discarded"]
            assert imported_moves(config) == 0
            # The retry of that request stages the whole file again, and applies it once.
            done = await call(
                config.daemon.control_socket, p.StockImport(csv_text=text), request_id="req-b"
            )
    assert done == m.Done(changed=3)
    assert list(totals_of(config).values()) == [11, 11, 11, 10]  # in SKU order


def test_a_product_deleted_after_staging_is_skipped_and_named(tmp: str) -> None:
    config = daemon_config(tmp, ())  # no stores: ledger, socket, HTTP
    seed_products(config, catalogue(3))
    ledger = Ledger(open_db(config.daemon.ledger_path), now=lambda: 0.0)

    def one(msg: m.LedgerRequest) -> object:
        [reply] = ledger.apply_batch([msg]).replies
        if isinstance(reply, Exception):
            raise reply
        return reply

    job = one(m.BeginStockImport(digest=b"x", mode="set", reason="stock import"))
    assert isinstance(job, m.StockImportJob)
    rows = ((2, "P00000", 1), (3, "P00001", 2), (4, "P00002", 3))
    one(m.StageStockRows(import_id=job.import_id, rows=rows))
    with pytest.raises(InputError, match=r"CSV: line 5: sku 'P00001' already on line 3"):
        one(m.StageStockRows(import_id=job.import_id, rows=((5, "P00001", 9),)))
    one(m.SealStockImport(import_id=job.import_id, rows=3))
    one(m.DeleteProduct(sku="P00001"))
    first = one(m.ApplyStockImport(import_id=job.import_id, limit=2))
    assert isinstance(first, m.StockImportJob) and first.state == "applying"
    last = one(m.ApplyStockImport(import_id=job.import_id, limit=2))
    assert isinstance(last, m.StockImportJob) and last.state == "done"
    assert last.result == m.Done(
        changed=2,
        detail="2 stock count(s) imported; 1 row(s) skipped: their product was deleted "
        "while the import ran",
    )
    # Done is done: asking again applies nothing more.
    assert one(m.ApplyStockImport(import_id=job.import_id, limit=2)) == last
    assert queries.totals(ledger.conn) == {"P00000": 1, "P00002": 3}
    ledger.conn.close()


async def test_a_listings_csv_is_read_off_the_event_loop_and_checked_whole(
    tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    readers: set[threading.Thread] = set()
    read = ListingsReader.read

    def spy(self: ListingsReader, limit: int) -> list[m.MallListing]:
        readers.add(threading.current_thread())
        return read(self, limit)

    monkeypatch.setattr(ListingsReader, "read", spy)
    monkeypatch.setattr(goqd_app, "IMPORT_CHUNK", 2)
    fleet = rig.build_fleet((("ra", "rakuten"),), clock=time.time)
    router, urls = rig.router_for(fleet)
    good = "listing_key,sku_code,name\n" + "".join(f"new/{i},NEW-{i},品 {i}\n" for i in range(5))
    with trio.fail_after(60):
        async with rig.open_daemon(fleet, tmp, urls, transport=router, clock=time.time) as run:
            sock = run.socket
            with pytest.raises(RemoteError, match=r"line 7: restock_date '2026-02-30'"):
                await call(
                    sock,
                    p.Import(
                        store="ra",
                        csv_text="listing_key,restock_date\n"
                        + "".join(f"bad/{i},2026-02-2{i}\n" for i in range(5))
                        + "bad/x,2026-02-30\n",
                    ),
                )
            report = await call(sock, p.Import(store="ra", csv_text=good))
            keys = [
                row.listing_key
                for row in queries.read(run.config.daemon.ledger_path, queries.listings)
                if row.listing_key.startswith("bad/")
            ]
    assert keys == []  # the bad file's first chunks were never applied
    assert isinstance(report, m.LinkReport) and (report.seen, report.new_listings) == (5, 5)
    assert readers and threading.main_thread() not in readers


# ------------------------------------------------------------------ across a crash


async def test_an_import_cut_off_mid_apply_is_finished_after_restart_exactly_once(
    tmp: str,
) -> None:
    config = daemon_config(tmp, ())  # no stores: ledger, socket, HTTP
    totals = catalogue(9000)  # five apply chunks of goqd.control.imports.APPLY_CHUNK (2000)
    seed_products(config, totals)
    path = rig.write_toml(config)
    deltas = {sku: 1 + i % 7 for i, sku in enumerate(totals)}
    text = stock_csv("delta", deltas)
    daemon = rig.DaemonProcess(path, config.daemon.control_socket, os.path.join(tmp, "log"))
    try:
        with trio.fail_after(120):
            # Killed (SIGKILL) while the third chunk's transaction is open.
            await daemon.start(crashpoint="stock_import.chunk_applied@3")
            await daemon.wait_ready()
            with pytest.raises(ControlError):
                await call(
                    config.daemon.control_socket,
                    p.StockImport(csv_text=text),
                    request_id="req-c",
                    timeout=60,
                    attempts=1,
                )
            assert await daemon.wait_exit() != 0
            assert imported_moves(config) == 2 * goqd_app.APPLY_CHUNK
            await daemon.start()
            await daemon.wait_ready()
            # The import resumed at start; the retry of its request waits for it.
            done = await call(
                config.daemon.control_socket,
                p.StockImport(csv_text=text),
                request_id="req-c",
                timeout=60,
            )
            assert done == m.Done(changed=9000)
            await daemon.stop()
    finally:
        if daemon.running:
            await daemon.kill()
    assert imported_moves(config) == 9000
    moved = collections.Counter(mv.sku for mv in moves_of(config))
    assert set(moved.values()) == {1}  # each row applied exactly once
    final = totals_of(config)
    assert final == {sku: 10 + deltas[sku] for sku in totals}
    assert "stock_import_resumed" in daemon.log_text()
