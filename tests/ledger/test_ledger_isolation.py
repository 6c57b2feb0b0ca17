"""No request ends the ledger; a request id is bound to its content; link refuses what
goqd has never seen.

* A request whose handling raises anything (an int SQLite cannot bind, a string it
  cannot encode, a constraint, a bug) is refused alone: its caller gets a clear
  ``LedgerError``, it is logged once, the rest of its group-commit batch commits and the
  ledger goes on serving. A failure of the database itself still fails the whole batch.
* The same request id with different content is refused (``conflict`` at the control
  socket) and applies nothing; a ledger written before digests were stored keeps
  answering its old ids.
* ``link`` refuses an unknown store, listing or SKU (``not_found``), creating nothing.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from goqd import messages as m
from goqd.app import Daemon, run_daemon
from goqd.cli.goqctl import main as goqctl_main
from goqd.control import protocol as p
from goqd.control.client import RemoteError, call
from goqd.errors import LedgerError, LedgerRequestFailed, UnknownListing, UnknownSku
from goqd.ledger import SCHEMA_VERSION, LedgerClient, open_db, open_ledger, queries
from goqd.ledger.db import Ledger
from goqd.sim.rakuten import SimRakuten
from tests.helpers import rig
from tests.helpers.ledger import drain, setup_catalogue, total

INT64_MAX = 2**63 - 1


def poisons() -> list[tuple[str, m.LedgerRequest]]:
    """Requests that reach the ledger well-typed for mypy but break while applied."""
    return [
        # OverflowError: the id of `goqctl errors clear 9223372036854775808`.
        ("overflow", m.ClearErrors(ids=(INT64_MAX + 1,), request_id="p-1")),
        # UnicodeEncodeError: a lone surrogate SQLite cannot store as UTF-8.
        ("surrogate", m.SetStock(sku="\ud800", quantity=1)),
        # sqlite3.IntegrityError: NOT NULL constraint on a new listing's name.
        ("integrity", m.UpsertListing(store="r1", listing_key="r1-X", name=None)),  # type: ignore[arg-type]
        # TypeError: a quantity that is not a number.
        ("type", m.SetStock(sku="A", quantity="5")),  # type: ignore[arg-type]
        # sqlite3.ProgrammingError: a value of a type SQLite cannot bind.
        ("binding", m.AdjustStock(sku=["A"], delta=1)),  # type: ignore[arg-type]
    ]


# ---------------------------------------------------------------- one poisoned request


@pytest.mark.parametrize(("kind", "poison"), poisons(), ids=[k for k, _ in poisons()])
async def test_a_request_that_raises_is_refused_alone_and_the_ledger_keeps_serving(
    ledger: LedgerClient, kind: str, poison: m.LedgerRequest
) -> None:
    with structlog.testing.capture_logs() as logs, trio.fail_after(10):
        with pytest.raises(LedgerRequestFailed) as refused:
            await ledger.call(poison)
        # The ledger still answers, reads and writes.
        await ledger.ask(m.Ping(), m.Pong)
        changed = await ledger.ask(m.AdjustStock(sku="A", delta=1), m.StockChanged)
    message = str(refused.value)
    assert type(poison).__name__ in message and "nothing of it was applied" in message
    assert "Traceback" not in message and "\n" not in message
    assert changed.total == 11
    failed = [e for e in logs if e["event"] == "ledger_request_failed"]
    assert len(failed) == 1 and failed[0]["request"] == type(poison).__name__
    assert isinstance(failed[0]["exc_info"], Exception)
    listings = (await ledger.ask(m.ListListings(store="r1"), m.ListingList)).listings
    assert [x.listing_key for x in listings] == ["r1-A", "r1-B"]


async def test_a_bug_in_one_request_type_is_refused_and_logged_not_fatal(
    ledger: LedgerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(conn: sqlite3.Connection, sku: str, limit: int) -> m.History:
        raise KeyError(sku)

    monkeypatch.setattr(queries, "history", broken)
    with structlog.testing.capture_logs() as logs, trio.fail_after(10):
        with pytest.raises(LedgerError, match=r"GetHistory.*KeyError"):
            await ledger.call(m.GetHistory(sku="A"))
        monkeypatch.undo()
        assert await total(ledger, "A") == 10
    assert [e["request"] for e in logs if e["event"] == "ledger_request_failed"] == ["GetHistory"]


# ---------------------------------------------------------------- inside one batch


def _ledger(tmp_path: Path) -> Ledger:
    ledger = Ledger(open_db(str(tmp_path / "goqd.db")), now=lambda: 1.0)
    ledger.apply_batch(
        [
            m.UpsertProduct(sku="A", total=10, store="r1"),
            m.UpsertProduct(sku="B", total=5, store="r1"),
        ]
    )
    return ledger


def test_a_poisoned_request_in_the_middle_of_a_batch_rolls_back_alone(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    batch: list[m.LedgerRequest] = [m.AdjustStock(sku="A", delta=1, reason="before")]
    batch += [poison for _, poison in poisons()]
    batch += [m.AdjustStock(sku="B", delta=2, reason="after"), m.SetStock(sku="A", quantity=20)]
    result = ledger.apply_batch(batch)
    assert isinstance(result.replies[0], m.StockChanged)
    assert all(isinstance(r, LedgerError) for r in result.replies[1:-2])
    assert isinstance(result.replies[-2], m.StockChanged)
    assert isinstance(result.replies[-1], m.StockChanged)
    assert [i for i, _ in result.failures] == list(range(1, len(batch) - 2))
    ledger.conn.close()
    # Committed: a fresh connection sees the good requests and nothing of the poisoned.
    again = Ledger(open_db(str(tmp_path / "goqd.db")), now=lambda: 2.0)
    assert queries.history(again.conn, "A", 10).total == 20
    assert queries.history(again.conn, "B", 10).total == 7
    assert [mv.reason for mv in queries.history(again.conn, "A", 10).movements] == [
        "",
        "before",
        "",
    ]
    assert queries.listings(again.conn) == []
    assert queries.table(again.conn, "requests") == []


def test_a_full_disk_still_fails_the_whole_batch(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    conn = ledger.conn
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        ledger.apply_batch(
            [
                m.AdjustStock(sku="A", delta=1),
                m.UpsertProduct(sku="BIG", name="x" * 400_000),
                m.AdjustStock(sku="B", delta=1),
            ]
        )
    conn.execute("PRAGMA max_page_count=1073741823")
    assert (
        queries.history(ledger.conn, "A", 10).total == 10
        and queries.history(ledger.conn, "B", 10).total == 5
    )
    assert [x.sku for x in queries.products(conn)] == ["A", "B"]
    done = ledger.apply_batch([m.AdjustStock(sku="A", delta=1)])
    assert isinstance(done.replies[0], m.StockChanged) and done.replies[0].total == 11


def test_a_transaction_a_failed_rollback_left_open_is_dropped_by_the_next_batch(
    tmp_path: Path,
) -> None:
    ledger = _ledger(tmp_path)
    # What a batch leaves behind when its ROLLBACK raised too: an open transaction
    # holding writes nobody was told of.
    ledger.conn.execute("BEGIN IMMEDIATE")
    ledger.conn.execute("UPDATE products SET total = 99 WHERE sku = 'A'")
    done = ledger.apply_batch([m.AdjustStock(sku="B", delta=1)])
    assert isinstance(done.replies[0], m.StockChanged) and done.replies[0].total == 6
    assert not ledger.conn.in_transaction
    assert queries.history(ledger.conn, "A", 10).total == 10


class _BatchSizes:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def observe_ledger_batch(self, size: int, seconds: float, oversold: int) -> None:
        self.sizes.append(size)


async def test_concurrent_callers_batched_with_a_poisoned_request_are_all_answered(
    tmp_path: Path,
) -> None:
    gate = threading.Event()
    gate.set()

    def now() -> float:
        # Holds the ledger's worker thread inside one batch while the next one queues up.
        assert gate.wait(10)
        return 1000.0

    metrics = _BatchSizes()
    good = [m.AdjustStock(sku="A", delta=1) for _ in range(3)]
    good += [m.AdjustStock(sku="B", delta=1) for _ in range(3)]
    bad = [poison for _, poison in poisons()]
    answers: dict[int, m.LedgerReply | Exception] = {}

    async def ask(n: int, msg: m.LedgerRequest) -> None:
        try:
            answers[n] = await client.call(msg)
        except LedgerError as exc:
            answers[n] = exc

    with trio.fail_after(20):
        async with open_ledger(str(tmp_path / "goqd.db"), now=now, metrics=metrics) as client:
            await setup_catalogue(client)
            gate.clear()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    client.call, m.RecordError(store="r1", level=8, code="x", message="x")
                )
                await trio.testing.wait_all_tasks_blocked()
                metrics.sizes.clear()
                msgs = good[:3] + bad + good[3:]
                for n, msg in enumerate(msgs):
                    nursery.start_soon(ask, n, msg)
                await trio.testing.wait_all_tasks_blocked()
                gate.set()
            assert metrics.sizes == [1, len(msgs)]  # the held batch, then all of these in one
            assert [type(answers[n]) for n in range(len(msgs))] == (
                [m.StockChanged] * 3 + [LedgerRequestFailed] * len(bad) + [m.StockChanged] * 3
            )
            assert await total(client, "A") == 13 and await total(client, "B") == 8
            # The pushes of the committed changes were queued.
            assert {i.listing_key for i in await drain(client, "r2")} == {"r2-A", "r2-B"}


# ---------------------------------------------------------------- request ids and content


async def test_the_same_request_id_with_different_content_is_refused_and_applies_nothing(
    ledger: LedgerClient,
) -> None:
    first = await ledger.ask(m.SetStock(sku="A", quantity=3, request_id="rid-1"), m.StockChanged)
    for other in (
        m.SetStock(sku="A", quantity=7, request_id="rid-1"),
        m.SetStock(sku="A", quantity=3, reason="typo", request_id="rid-1"),
        m.AdjustStock(sku="A", delta=3, request_id="rid-1"),
        m.DeleteProduct(sku="A", request_id="rid-1"),
    ):
        with pytest.raises(LedgerError, match="request id 'rid-1' was already used"):
            await ledger.call(other)
    history = await ledger.ask(m.GetHistory(sku="A"), m.History)
    assert history.total == 3 and [mv.cause for mv in history.movements] == ["set", "import"]
    # The retry of the original still gets the original reply.
    again = await ledger.ask(m.SetStock(sku="A", quantity=3, request_id="rid-1"), m.StockChanged)
    assert again == first


def test_ids_stored_before_digests_keep_answering_after_the_migration(tmp_path: Path) -> None:
    path = str(tmp_path / "goqd.db")
    ledger = _ledger(tmp_path)
    stored = ledger.apply_batch([m.AdjustStock(sku="A", delta=2, request_id="old-1")]).replies[0]
    # Make the file what schema 3 wrote: undo what migrations 4 and later added.
    for statement in (
        "DROP INDEX listings_by_state",
        "DROP TABLE diff_listings",
        "DROP TABLE diff_runs",
        "DROP INDEX errors_open_by_level",
        "DROP INDEX errors_by_store",
        "ALTER TABLE errors DROP COLUMN mall_code",
        "ALTER TABLE errors DROP COLUMN cleared_by",
        "ALTER TABLE products DROP COLUMN count_known",
        "DROP TABLE stock_import_rows",
        "DROP TABLE stock_imports",
        "ALTER TABLE listings DROP COLUMN hold_layers",
        "ALTER TABLE requests DROP COLUMN digest",
        "PRAGMA user_version=3",
    ):
        ledger.conn.execute(statement)
    ledger.conn.close()
    migrated = Ledger(open_db(path), now=lambda: 2.0)
    assert queries.schema_version(migrated.conn) == SCHEMA_VERSION
    replies = migrated.apply_batch(
        [
            m.AdjustStock(sku="A", delta=2, request_id="old-1"),
            m.SetStock(sku="B", quantity=1, request_id="new-1"),
            m.SetStock(sku="B", quantity=2, request_id="new-1"),
        ]
    ).replies
    assert replies[0] == stored
    assert isinstance(replies[1], m.StockChanged) and isinstance(replies[2], LedgerError)
    assert (
        queries.history(migrated.conn, "A", 10).total == 12
        and queries.history(migrated.conn, "B", 10).total == 1
    )


# ---------------------------------------------------------------- link and unlink


async def test_link_of_a_listing_goqd_has_never_seen_is_refused_and_creates_nothing(
    ledger: LedgerClient,
) -> None:
    with pytest.raises(UnknownListing, match=r"`goqctl import r1` first"):
        await ledger.call(m.Link(store="r1", listing_key="nope", sku="A"))
    listings = (await ledger.ask(m.ListListings(store="r1"), m.ListingList)).listings
    assert [(x.listing_key, x.link_state) for x in listings] == [
        ("r1-A", "linked"),
        ("r1-B", "linked"),
    ]
    assert (await ledger.ask(m.ListErrors(), m.ErrorList)).errors == ()
    with pytest.raises(UnknownListing, match="no listing 'nope' in store 'r1'"):
        await ledger.call(m.Unlink(store="r1", listing_key="nope"))
    with pytest.raises(UnknownSku):
        await ledger.call(m.Link(store="r1", listing_key="r1-A", sku="NOPE"))
    assert (await drain(ledger, "r1")) == []


# ---------------------------------------------------------------- the daemon


@dataclass
class Shop:
    daemon: Daemon
    socket: str
    ledger_path: str


@pytest.fixture
async def shop(sock_dir: str) -> AsyncIterator[Shop]:
    """A daemon with a base store and another store, each on a Rakuten simulator."""
    tmp = sock_dir
    async with trio.open_nursery() as nursery:
        sims = {
            "base": SimRakuten(shop_id="500001", clock=time.time, seed=1),
            "other": SimRakuten(shop_id="500002", clock=time.time, seed=2),
        }
        sims["base"].add_listing("tea/500", link_code="TEA-500", name="緑茶", quantity=7)
        sims["other"].add_listing("t01/500", link_code="TEA-500", name="緑茶", quantity=1)
        stores = [
            await rig.serve_store(nursery, tmp, name, sim, poll_interval="60s")
            for name, sim in sims.items()
        ]
        config = rig.loopback_config(tmp, stores, base_store="base")
        daemon = await nursery.start(run_daemon, config)
        yield Shop(daemon, config.daemon.control_socket, config.daemon.ledger_path)
        nursery.cancel_scope.cancel()


async def _refused(sock: str, req: p.ControlRequest, **kw: Any) -> RemoteError:
    with pytest.raises(RemoteError) as refused:
        await call(sock, req, **kw)
    return refused.value


async def test_errors_clear_beyond_int64_is_a_bad_request_and_the_daemon_goes_on(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(20):
        # An older or hand-made client sends the id; the daemon refuses it at the door.
        err = await _refused(shop.socket, m.ClearErrors(ids=(INT64_MAX + 1,)))
        assert err.code == "bad_request" and "$.request.ids[0]" in err.message
        # The largest id SQLite can hold is a valid request that clears nothing.
        done = await call(shop.socket, m.ClearErrors(ids=(INT64_MAX,)))
        assert done == m.Done(changed=0)
        status = await call(shop.socket, p.Status())
        assert isinstance(status, p.DaemonStatus) and len(status.stores) == 2
        # goqctl itself refuses it as a usage error, then `status` works.
        argv = ["--socket", shop.socket, "errors", "clear", str(INT64_MAX + 1)]
        assert await trio.to_thread.run_sync(goqctl_main, argv) == 2
        assert await trio.to_thread.run_sync(goqctl_main, ["--socket", shop.socket, "status"]) == 0
    out = capsys.readouterr()
    assert "invalid argument" in out.err and "Traceback" not in out.err + out.out


async def test_a_reused_request_id_with_other_content_is_a_conflict_at_the_socket(
    shop: Shop,
) -> None:
    with trio.fail_after(20):
        await call(shop.socket, p.Import(store="base"))
        first = await call(shop.socket, m.SetStock(sku="TEA-500", quantity=5), request_id="rid-7")
        again = await call(shop.socket, m.SetStock(sku="TEA-500", quantity=5), request_id="rid-7")
        assert again == first
        err = await _refused(shop.socket, m.SetStock(sku="TEA-500", quantity=9), request_id="rid-7")
        history = await shop.daemon.ledger.ask(m.GetHistory(sku="TEA-500"), m.History)
    assert err.code == "conflict" and "'rid-7'" in err.message
    assert history.total == 5 and [mv.cause for mv in history.movements] == ["set", "import"]


async def test_a_batch_the_disk_refused_is_unavailable_at_the_socket_and_a_retry_applies(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(self: Ledger, msgs: Any) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    request = m.SetStock(sku="TEA-500", quantity=5)
    with trio.fail_after(20):
        await call(shop.socket, p.Import(store="base"))
        monkeypatch.setattr(Ledger, "apply_batch", disk_full)
        err = await _refused(shop.socket, request, request_id="rid-full")
        monkeypatch.undo()
        # Nothing was applied and the request was fine: the same id goes through.
        done = await call(shop.socket, request, request_id="rid-full")
    assert (err.code, err.hint) == ("unavailable", "try again shortly")
    assert "disk is full" in err.message and "nothing was applied" in err.message
    assert isinstance(done, m.StockChanged) and done.total == 5


async def test_link_refuses_unknown_stores_listings_and_skus_with_not_found(shop: Shop) -> None:
    sock = shop.socket
    with trio.fail_after(30):
        await call(sock, p.Import(store="base"))
        # Not imported yet: the listing is unknown, and the error says what to run.
        err = await _refused(sock, m.Link(store="other", listing_key="t01/500", sku="TEA-500"))
        assert err.code == "not_found" and "`goqctl import other` first" in err.message
        err = await _refused(sock, m.Link(store="no-such-store", listing_key="x", sku="TEA-500"))
        assert err.code == "not_found" and "no store named 'no-such-store'" in err.message
        err = await _refused(sock, m.Link(store="base", listing_key="nope", sku="TEA-500"))
        assert err.code == "not_found" and "`goqctl import base` first" in err.message
        err = await _refused(sock, m.Link(store="base", listing_key="tea/500", sku="NOPE"))
        assert err.code == "not_found" and "unknown SKU 'NOPE'" in err.message
        err = await _refused(sock, m.Unlink(store="base", listing_key="nope"))
        assert err.code == "not_found" and "no listing 'nope'" in err.message
        err = await _refused(sock, m.Unlink(store="no-such-store", listing_key="x"))
        assert err.code == "not_found"
        # Nothing was created and the real listing is still the only, linked one.
        with queries.open_read_only(shop.ledger_path) as conn:
            rows = [(x.store, x.listing_key, x.link_state) for x in queries.listings(conn)]
        assert rows == [("base", "tea/500", "linked")]
        errors = await call(sock, m.ListErrors())
        assert isinstance(errors, m.ErrorList) and errors.errors == ()
        # After the import the same link is accepted.
        await call(sock, p.Import(store="other"))
        done = await call(sock, m.Link(store="other", listing_key="t01/500", sku="TEA-500"))
        assert isinstance(done, m.Done) and done.changed == 1
