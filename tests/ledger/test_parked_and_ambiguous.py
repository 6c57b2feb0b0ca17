"""Nothing unsynced is silent: parked order lines (連携できない商品) and ambiguous links
(複数の商品が紐づいています) are errors, a list, store levels, metrics and alerts.

The ledger parts run on a real SQLite ledger; the daemon parts on the real daemon in
process under the deterministic rig (``tests.helpers.rig.run_dst``), over its real
control socket, with goqctl's own ``main()`` where the output matters.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import httpx
import pytest
import trio

from goqd import messages as m
from goqd.cli import goqctl
from goqd.control import protocol as p
from goqd.control.client import call
from goqd.errors import LEVEL_TEMPORARY
from goqd.ledger import queries
from goqd.ledger.db import Ledger
from goqd.ledger.schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, open_db
from goqd.linking import fold
from tests.helpers.daemon import (
    Rig,
    key,
)
from tests.helpers.ledger import (
    FakeNow,
    one,
)
from tests.helpers.paths import ROOT

RULES_DIR = ROOT / "config" / "prometheus"


@pytest.fixture
def clock() -> FakeNow:
    now = FakeNow()
    now.t = 1_000.0
    return now


@pytest.fixture
def ledger(clock: FakeNow) -> Ledger:
    led = Ledger(open_db(":memory:"), now=clock)
    for sku, total in (("A", 10), ("B", 5)):
        one(led, m.UpsertProduct(sku=sku, total=total, store="r1"))
        for store in ("r1", "r2"):
            one(led, m.UpsertListing(store=store, listing_key=f"{store}-{sku}", sku=sku))
    return led


def line(order: str, key: str, qty: int = 1, line_id: str = "1") -> m.OrderLine:
    return m.OrderLine(
        order_id=order, line_id=line_id, listing_key=key, quantity=qty, updated_at=2_000.0
    )


def see(ledger: Ledger, store: str, *lines: m.OrderLine) -> m.OrderLinesBooked:
    reply = one(ledger, m.OrderLinesSeen(store=store, lines=lines))
    assert isinstance(reply, m.OrderLinesBooked)
    return reply


def errors(ledger: Ledger, **kw: object) -> list[m.ErrorRecord]:
    reply = one(ledger, m.ListErrors(**kw))  # type: ignore[arg-type]
    assert isinstance(reply, m.ErrorList)
    return list(reply.errors)


def parked(ledger: Ledger, **kw: object) -> m.ParkedList:
    reply = one(ledger, m.ListParked(**kw))  # type: ignore[arg-type]
    assert isinstance(reply, m.ParkedList)
    return reply


def stats(ledger: Ledger, store: str) -> m.StoreLedgerStatus:
    reply = one(ledger, m.GetStoreStats())
    assert isinstance(reply, m.StoreStats)
    return next(s for s in reply.stores if s.store == store)


# ------------------------------------------------------------------ parked lines


def test_a_parked_line_opens_one_error_per_listing_with_the_count_and_the_command(
    ledger: Ledger,
) -> None:
    see(ledger, "r1", line("o1", "r1-NEW", 2), line("o2", "r1-NEW"), line("o3", "r1-X y"))
    open_ = {e.listing_key: e for e in errors(ledger, store="r1")}
    assert set(open_) == {"r1-NEW", "r1-X y"}
    new = open_["r1-NEW"]
    assert (new.level, new.code, new.count) == (8, "listing_not_linked", 2)
    assert "連携できない商品" in new.message
    assert "2 order line(s) of listing 'r1-NEW' in store 'r1'" in new.message
    assert "goqctl import r1" in new.message and "goqctl link r1 r1-NEW SKU" in new.message
    assert "goqctl link r1 'r1-X y' SKU" in open_["r1-X y"].message  # quoted for a shell
    # Seeing a parked line again adds nothing: it is the same sale.
    see(ledger, "r1", line("o1", "r1-NEW", 2))
    assert {e.listing_key: e.count for e in errors(ledger, store="r1")}["r1-NEW"] == 2
    s = stats(ledger, "r1")
    assert (s.parked, s.parked_listings, s.max_error_level) == (3, 2, 8)


def test_booking_the_parked_lines_resolves_their_error_and_keeps_it_in_history(
    ledger: Ledger, clock: FakeNow
) -> None:
    see(ledger, "r1", line("o1", "r1-NEW", 2))
    one(ledger, m.UpsertProduct(sku="NEW", total=6))
    clock.t = 1_500.0
    done = one(ledger, m.Link(store="r1", listing_key="r1-NEW", sku="NEW"))
    assert isinstance(done, m.Done) and done.released == 1
    assert errors(ledger, store="r1") == []
    [gone] = errors(ledger, store="r1", include_cleared=True)
    assert (gone.code, gone.cleared_by, gone.cleared_at) == ("listing_not_linked", "resolved", 1500)
    assert stats(ledger, "r1").parked_listings == 0


def test_a_deleted_products_listing_parks_its_sales_visibly(ledger: Ledger) -> None:
    one(ledger, m.DeleteProduct(sku="B"))
    assert see(ledger, "r2", line("o9", "r2-B", 1)).parked == 1
    [error] = errors(ledger, store="r2", code="listing_not_linked")
    assert error.listing_key == "r2-B" and "not linked to a product" in error.message
    [row] = parked(ledger, store="r2").lines
    assert (row.order_id, row.listing_key, row.quantity, row.link_state) == (
        "o9",
        "r2-B",
        1,
        "unlinked",
    )
    assert row.sku is None and "goqctl link r2 r2-B SKU" in row.action


def test_the_parked_list_names_every_line_and_pages_in_key_order(
    ledger: Ledger, clock: FakeNow
) -> None:
    clock.t = 1_234.0
    see(ledger, "r1", *(line(f"o{n:03}", "r1-NEW", n + 1) for n in range(7)))
    see(ledger, "r2", line("p1", "r2-NEW", 4, line_id="L2"))
    first = parked(ledger, limit=5)
    assert first.total == 8 and len(first.lines) == 5
    row = first.lines[0]
    assert (row.store, row.order_id, row.line_id, row.listing_key, row.quantity) == (
        "r1",
        "o000",
        "1",
        "r1-NEW",
        1,
    )
    assert row.parked_at == 1_234.0 and not row.cancelled
    last = first.lines[-1]
    rest = parked(ledger, limit=5, after=(last.store, last.order_id, last.line_id))
    keys = [(x.store, x.order_id) for x in first.lines + rest.lines]
    assert keys == [("r1", f"o{n:03}") for n in range(7)] + [("r2", "p1")]
    only_r2 = parked(ledger, store="r2")
    assert only_r2.total == 1 and [x.line_id for x in only_r2.lines] == ["L2"]


def test_a_migrated_ledger_shows_lines_parked_before_as_errors(tmp_path: Path) -> None:
    # Lines parked by a goqd that kept no error for them must not stay invisible.
    path = str(tmp_path / "v6.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.create_function("goqd_fold", 1, fold, deterministic=True)
    for script in MIGRATIONS[:6]:
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
    for order in ("o1", "o2"):
        conn.execute(
            "INSERT INTO parked_lines VALUES ('ra', ?, '1', 'k/1', x'00', 'unknown_listing', 5)",
            (order,),
        )
    conn.execute("PRAGMA user_version=6")
    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
    conn.close()
    migrated = open_db(path)
    assert queries.schema_version(migrated) == SCHEMA_VERSION
    [error] = queries.errors(migrated, open_only=True)
    assert (error.store, error.level, error.code, error.listing_key, error.first_seen) == (
        "ra",
        LEVEL_TEMPORARY,
        "listing_not_linked",
        "k/1",
        5,
    )
    assert "2 order line(s)" in error.message and "goqctl parked --store ra" in error.message


# ------------------------------------------------------------------ ambiguity


def test_a_link_that_makes_a_product_ambiguous_warns_and_names_what_to_unlink(
    ledger: Ledger,
) -> None:
    one(ledger, m.UpsertListing(store="r2", listing_key="r2-A2", link_code="A"))
    done = one(ledger, m.Link(store="r2", listing_key="r2-A2", sku="A"))
    assert isinstance(done, m.Done)
    [warning] = done.warnings
    assert "複数の商品が紐づいています" in warning
    assert "r2-A, r2-A2" in warning and "store 'r2'" in warning
    assert "goqctl unlink r2 r2-A`" in warning and "goqctl diff r2" in warning
    s = stats(ledger, "r2")
    assert (s.ambiguous_listings, s.max_error_level) == (2, 8)
    # An order for either parks, and its error says to unlink one of the two.
    see(ledger, "r2", line("o1", "r2-A", 1))
    [error] = errors(ledger, store="r2", code="listing_not_linked")
    assert "r2-A, r2-A2" in error.message and "goqctl unlink r2 LISTING" in error.message
    [row] = parked(ledger, store="r2").lines
    assert (row.link_state, row.sku) == ("ambiguous", "A")
    # Unlinking the wrong one: no warning, the parked line booked, both errors resolved.
    undone = one(ledger, m.Unlink(store="r2", listing_key="r2-A2"))
    assert isinstance(undone, m.Done) and undone.warnings == () and undone.released == 1
    assert errors(ledger, store="r2") == []
    assert {(e.code, e.cleared_by) for e in errors(ledger, store="r2", include_cleared=True)} == {
        ("multiple_links", "resolved"),
        ("listing_not_linked", "resolved"),
    }


def test_an_unambiguous_link_has_no_warning(ledger: Ledger) -> None:
    one(ledger, m.UpsertListing(store="r3", listing_key="r3-A", link_code="A"))
    done = one(ledger, m.Link(store="r3", listing_key="r3-A", sku="A"))
    assert isinstance(done, m.Done) and done.warnings == ()


def test_goqctl_prints_the_link_warning() -> None:
    done = m.Done(changed=1, warnings=("複数の商品が紐づいています: unlink one",))
    text = goqctl._render_done(done, m.Link(store="s", listing_key="k", sku="A"))
    assert text.splitlines() == [
        "link listing: 1 changed",
        "warning: 複数の商品が紐づいています: unlink one",
    ]


# ------------------------------------------------------------------ the daemon, end to end


async def test_parked_lines_and_an_ambiguous_link_show_in_goqctl_stores_metrics_and_errors(
    rig: Rig,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ra, rb = rig.sims["ra"], rig.sims["rb"]

    async def cli(*args: str) -> str:
        # goqctl's own main(), in a thread (it runs its own trio loop), over the socket.
        code = await trio.to_thread.run_sync(goqctl.main, ["--socket", rig.socket, *args])
        assert code == 0
        return capsys.readouterr().out

    async def levels() -> dict[str, p.StoreInfo]:
        stores = await call(rig.socket, p.Stores())
        assert isinstance(stores, p.StoreList)
        return {s.name: s for s in stores.stores}

    new_key = "new-item/1"
    ra.add_listing(new_key, link_code="NEW-1", name="新商品", quantity=4)
    order = ra.place_order([(new_key, 2)])
    assert order is not None
    await rig.booked("ra")
    info = await levels()
    assert (info["ra"].state, info["ra"].error_level, info["ra"].parked) == ("running", 8, 1)
    assert info["rb"].error_level == 0
    listed = await call(rig.socket, m.ListParked(store="ra"))
    assert isinstance(listed, m.ParkedList)
    [row] = listed.lines
    assert (row.order_id, row.listing_key, row.quantity) == (order.order_id, new_key, 2)
    errors_ = await call(rig.socket, m.ListErrors(store="ra", code="listing_not_linked"))
    assert isinstance(errors_, m.ErrorList) and len(errors_.errors) == 1
    await rig.daemon.update_gauges()
    async with httpx.AsyncClient() as client:
        text = (await client.get(rig.daemon.http_url + "/metrics")).text
    assert 'goqd_parked_listings{store="ra"} 1.0' in text
    assert 'goqd_parked_lines{store="ra"} 1.0' in text
    out = await cli("parked", "--store", "ra")
    assert order.order_id in out and new_key in out and "goqctl link ra new-item/1 SKU" in out
    assert "→ goqctl parked --store ra" in await cli("stores")

    # Linking books the sale: its error is resolved and the store's level goes back.
    await rig.daemon.ledger.call(m.UpsertProduct(sku="NEW-1", total=9, store="ra"))
    done = await call(rig.socket, m.Link(store="ra", listing_key=new_key, sku="NEW-1"))
    assert isinstance(done, m.Done) and done.released == 1
    assert await rig.total("NEW-1") == 7
    assert (await levels())["ra"].error_level == 0

    # A second listing of MUG-WHT in rb, linked by hand: warned, level 8, metric.
    rb.add_listing("mug2/x", link_code="MUG-WHT-2", quantity=1)
    await rig.daemon.ledger.call(
        m.UpsertListing(store="rb", listing_key="mug2/x", link_code="MUG-WHT-2")
    )
    out = await cli("link", "rb", "mug2/x", "MUG-WHT")
    assert "warning: 複数の商品が紐づいています" in out
    assert f"goqctl unlink rb {key('MUG-WHT')}" in out
    rb_info = (await levels())["rb"]
    assert (rb_info.state, rb_info.error_level, rb_info.ambiguous) == ("running", 8, 2)
    await rig.daemon.update_gauges()
    async with httpx.AsyncClient() as client:
        text = (await client.get(rig.daemon.http_url + "/metrics")).text
    assert 'goqd_ambiguous_listings{store="rb"} 2.0' in text


# ------------------------------------------------------------------ the alerts


def _promtool_with(tmp_path: Path, old: str, new: str) -> subprocess.CompletedProcess[str]:
    rules = (RULES_DIR / "goqd.rules.yml").read_text(encoding="utf-8")
    assert rules.count(old) == 1
    (tmp_path / "goqd.rules.yml").write_text(rules.replace(old, new), encoding="utf-8")
    shutil.copy(RULES_DIR / "goqd.rules.test.yml", tmp_path / "goqd.rules.test.yml")
    return subprocess.run(
        ["promtool", "test", "rules", "goqd.rules.test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# tests/conftest.py's fixture: skipped without promtool, failed without it in CI.
needs_promtool = pytest.mark.usefixtures("promtool")


@needs_promtool
@pytest.mark.parametrize(
    ("alert", "old", "new"),
    [
        # Never firing, and firing at once instead of after 10 minutes.
        ("GoqdOrderLinesParked", "goqd_parked_listings > 0", "goqd_parked_listings > 5"),
        (
            "GoqdOrderLinesParked",
            "goqd_parked_listings > 0\n        for: 10m\n",
            "goqd_parked_listings > 0\n        for: 0m\n",
        ),
        ("GoqdAmbiguousListings", "goqd_ambiguous_listings > 0", "goqd_ambiguous_listings < 0"),
    ],
)
def test_the_unit_tests_catch_a_broken_parked_or_ambiguity_alert(
    tmp_path: Path, alert: str, old: str, new: str
) -> None:
    result = _promtool_with(tmp_path, old, new)
    assert result.returncode != 0
    assert alert in result.stdout + result.stderr
