"""Products from any store: `goqctl product add SKU --quantity N` and
`goqctl import STORE --create-products`, linking by each store's link condition.

The ledger rules run on a real SQLite ledger; the rest on the real daemon in process,
with simulated Rakuten shops served over loopback HTTP, through its real control socket
(and goqctl's own ``main()`` where the output matters).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from goqd import limits
from goqd import messages as m
from goqd.app import Daemon, run_daemon
from goqd.cli import goqctl
from goqd.control import protocol as p
from goqd.control.client import RemoteError, call
from goqd.errors import LedgerError, LedgerRequestFailed
from goqd.ledger import Ledger, catalogue, open_db, queries
from goqd.sim.rakuten import SimRakuten
from tests.helpers import rig
from tests.helpers.control import envelope, raw_exchange
from tests.helpers.daemon import eventually
from tests.helpers.paths import ROOT

# Each store under its own link condition, as the daemon passes them.
STORES = (("yahoo", ("casefold",)), ("amazon", ()), ("au", ()))


class Clock:
    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def ledger() -> Ledger:
    return Ledger(open_db(":memory:"), now=Clock())


def one(ledger: Ledger, msg: m.LedgerRequest) -> Any:
    result = ledger.apply_batch([msg]).replies[0]
    if isinstance(result, Exception):
        raise result
    return result


def listing(key: str, code: str, qty: int | None = 5) -> m.MallListing:
    return m.MallListing(listing_key=key, link_code=code, name=f"name {key}", quantity=qty)


def imp(
    ledger: Ledger,
    store: str,
    *items: m.MallListing,
    base: bool = False,
    create: bool = False,
    rules: tuple[str, ...] = (),
) -> m.LinkReport:
    reply = one(
        ledger,
        m.ImportListings(
            store=store, listings=items, base=base, create_products=create, rules=rules
        ),
    )
    assert isinstance(reply, m.LinkReport)
    return reply


def add(ledger: Ledger, sku: str, quantity: int, **kw: Any) -> m.ProductAdded:
    reply = one(ledger, m.AddProduct(sku=sku, quantity=quantity, stores=STORES, **kw))
    assert isinstance(reply, m.ProductAdded)
    return reply


def pushes(ledger: Ledger, store: str) -> dict[str, int]:
    reply = one(ledger, m.TakePushes(store=store, limit=1000, peek=True))
    assert isinstance(reply, m.PushBatch)
    return {i.listing_key: i.quantity for i in reply.items}


def links(ledger: Ledger, store: str) -> dict[str, tuple[str | None, str]]:
    reply = one(ledger, m.ListListings(store=store, limit=1000))
    assert isinstance(reply, m.ListingList)
    return {x.listing_key: (x.sku, x.link_state) for x in reply.listings}


def products(ledger: Ledger) -> dict[str, tuple[int, bool, str]]:
    reply = one(ledger, m.ListProducts(limit=1000))
    assert isinstance(reply, m.ProductList)
    return {x.sku: (x.total, x.count_known, x.first_store) for x in reply.products}


def movements(ledger: Ledger) -> int:
    return len(queries.movements(ledger.conn))


# ------------------------------------------------------------------ product add (ledger)


def test_product_add_creates_it_and_links_each_stores_match_under_its_own_rules(
    ledger: Ledger,
) -> None:
    imp(ledger, "yahoo", listing("y-tea", "tea-1"), rules=("casefold",))
    imp(ledger, "amazon", listing("a-tea", "TEA-1"), listing("a-lower", "tea-1"))
    # An order for a listing with no product yet parks; the new link books it.
    booked = one(
        ledger,
        m.OrderLinesSeen(
            store="amazon",
            lines=(
                m.OrderLine(
                    order_id="o1", line_id="1", listing_key="a-tea", quantity=1, updated_at=2e3
                ),
            ),
        ),
    )
    assert booked.parked == 1

    added = add(ledger, "TEA-1", 5, name="緑茶")

    assert added.linked == (("amazon", "a-tea"), ("yahoo", "y-tea"))
    assert (added.total, added.released, added.ambiguous) == (4, 1, ())  # 5 less the sale
    # Exact condition in amazon: "tea-1" is another code there and stays unlinked.
    assert links(ledger, "amazon")["a-lower"] == (None, "unlinked")
    assert products(ledger) == {"TEA-1": (4, True, "")}  # 5 less the parked sale
    # Pushes follow as for any linked listing.
    assert pushes(ledger, "yahoo") == {"y-tea": 4}
    assert pushes(ledger, "amazon") == {"a-tea": 4}


def test_product_add_with_no_matching_listing_creates_only_the_product(ledger: Ledger) -> None:
    added = add(ledger, "SOLO", 0)
    assert (added.linked, added.total) == ((), 0)
    assert products(ledger) == {"SOLO": (0, True, "")}
    # A listing imported later links to it like to any product.
    report = imp(ledger, "au", listing("au-solo", "SOLO"))
    assert report.linked == 1 and pushes(ledger, "au") == {"au-solo": 0}


def test_product_add_of_an_existing_sku_is_refused_naming_it_and_changes_nothing(
    ledger: Ledger,
) -> None:
    add(ledger, "TEA-1", 5)
    imp(ledger, "au", listing("au-tea", "TEA-1"))
    one(ledger, m.Unlink(store="au", listing_key="au-tea"))
    before = (products(ledger), links(ledger, "au"), movements(ledger))
    with pytest.raises(LedgerError, match=r"product 'TEA-1' already exists.*nothing was changed"):
        add(ledger, "TEA-1", 99, name="other")
    # Not even the matching listing an import left unlinked got linked.
    assert (products(ledger), links(ledger, "au"), movements(ledger)) == before


def test_a_retried_product_add_gets_its_first_reply_not_a_conflict(ledger: Ledger) -> None:
    first = add(ledger, "TEA-1", 5, request_id="rid-1")
    assert add(ledger, "TEA-1", 5, request_id="rid-1") == first
    assert movements(ledger) == 1


def test_a_listing_matching_two_products_stays_unlinked_and_is_reported(ledger: Ledger) -> None:
    add(ledger, "tea-1", 3)
    imp(ledger, "yahoo", listing("y-tea", "Tea-1"), rules=("casefold",))
    assert links(ledger, "yahoo")["y-tea"] == ("tea-1", "linked")
    one(ledger, m.Unlink(store="yahoo", listing_key="y-tea"))
    added = add(ledger, "TEA-1", 5)
    assert added.linked == () and links(ledger, "yahoo")["y-tea"] == (None, "unlinked")
    assert any("複数の商品が紐づいています" in x and "y-tea" in x for x in added.problems)


def test_two_listings_of_the_new_product_in_one_store_are_ambiguous(ledger: Ledger) -> None:
    imp(ledger, "yahoo", listing("y-1", "TEA-1"), listing("y-2", "tea-1"), rules=("casefold",))
    added = add(ledger, "TEA-1", 5)
    assert added.ambiguous == (("yahoo", "y-1"), ("yahoo", "y-2")) and added.linked == ()
    assert pushes(ledger, "yahoo") == {}


def test_a_product_add_failing_half_way_leaves_nothing_and_the_batch_goes_on(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    imp(ledger, "yahoo", listing("y-tea", "TEA-1"), rules=("casefold",))
    imp(ledger, "amazon", listing("a-tea", "TEA-1"))
    add(ledger, "OTHER", 1)
    real = catalogue.link_by_code
    calls = []

    def flaky(*args: Any) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("disk says no")  # after the product and one link exist
        real(*args)

    monkeypatch.setattr(catalogue, "link_by_code", flaky)
    result = ledger.apply_batch(
        [
            m.AddProduct(sku="TEA-1", quantity=5, stores=STORES),
            m.SetStock(sku="OTHER", quantity=7),
        ]
    )
    assert len(calls) == 2
    assert isinstance(result.replies[0], LedgerRequestFailed)
    assert isinstance(result.replies[1], m.StockChanged)  # only the failed request failed
    assert products(ledger) == {"OTHER": (7, True, "")}
    assert links(ledger, "yahoo")["y-tea"] == (None, "unlinked")
    assert links(ledger, "amazon")["a-tea"] == (None, "unlinked")
    assert pushes(ledger, "yahoo") == {} and pushes(ledger, "amazon") == {}


@pytest.mark.parametrize(
    ("sku", "quantity", "problem"),
    [
        ("", 1, "is empty"),
        ("X" * (limits.MAX_SKU + 1), 1, "characters long"),
        ("A\x00B", 1, "NUL"),
        ("A-1", -1, "out of range"),
        ("A-1", limits.MAX_QUANTITY + 1, "out of range"),
    ],
)
def test_the_ledger_refuses_a_product_add_no_control_request_could_carry(
    ledger: Ledger, sku: str, quantity: int, problem: str
) -> None:
    imp(ledger, "au", listing("au-1", "A-1"))
    with pytest.raises(LedgerError, match=problem):
        add(ledger, sku, quantity)
    assert products(ledger) == {} and movements(ledger) == 0


# ------------------------------------------------------------------ import --create-products


def test_import_create_products_makes_a_product_for_each_unmatched_listing(
    ledger: Ledger,
) -> None:
    add(ledger, "KNOWN", 2)
    report = imp(
        ledger,
        "yahoo",
        listing("y-new", "NEW-1", qty=4),
        listing("y-free", "FREE-1", qty=None),  # unlimited at the mall
        listing("y-known", "known"),  # matches KNOWN under casefold: linked, not created
        listing("y-nocode", ""),
        create=True,
        rules=("casefold",),
    )
    assert (report.created, report.linked, report.count_unknown, report.unlinked) == (2, 3, 1, 1)
    assert any("FREE-1" in x and "goqctl stock set FREE-1 N" in x for x in report.problems)
    assert any("y-nocode" in x and "no product created" in x for x in report.problems)
    assert products(ledger) == {
        "KNOWN": (2, True, ""),
        "NEW-1": (4, True, "yahoo"),
        "FREE-1": (0, False, "yahoo"),
    }
    assert links(ledger, "yahoo") == {
        "y-new": ("NEW-1", "linked"),
        "y-free": ("FREE-1", "linked"),
        "y-known": ("KNOWN", "linked"),
        "y-nocode": (None, "unlinked"),
    }
    # The unknown count is kept out of sync: never pushed as 0.
    assert pushes(ledger, "yahoo") == {"y-new": 4, "y-known": 2}
    # Another store's listing links to a created product by its own condition.
    assert imp(ledger, "amazon", listing("a-new", "NEW-1")).linked == 1
    assert pushes(ledger, "amazon") == {"a-new": 4}


def test_import_create_products_again_creates_nothing_new(ledger: Ledger) -> None:
    items = (listing("y-new", "NEW-1", qty=4), listing("y-free", "FREE-1", qty=None))
    imp(ledger, "yahoo", *items, create=True)
    state = (products(ledger), links(ledger, "yahoo"), movements(ledger))
    again = imp(ledger, "yahoo", *items, create=True)
    assert (again.created, again.count_unknown, again.linked) == (0, 0, 0)
    assert (products(ledger), links(ledger, "yahoo"), movements(ledger)) == state


def test_import_without_the_flag_creates_no_product(ledger: Ledger) -> None:
    report = imp(ledger, "yahoo", listing("y-new", "NEW-1", qty=4))
    assert (report.created, report.unlinked) == (0, 1)
    assert products(ledger) == {}


def test_the_flag_changes_nothing_on_the_base_store() -> None:
    items = (listing("b-1", "A", qty=3), listing("b-2", "B", qty=None), listing("b-3", ""))
    outcomes = []
    for create in (False, True):
        led = Ledger(open_db(":memory:"), now=Clock())
        report = imp(led, "base", *items, base=True, create=create)
        outcomes.append((report, products(led), links(led, "base"), pushes(led, "base")))
    assert outcomes[0] == outcomes[1]


# ------------------------------------------------------------------ goqctl, no daemon


def test_goqctl_builds_the_requests_and_refuses_bad_arguments_before_sending(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = goqctl._build_parser()
    args = parser.parse_args(["product", "add", "A-1", "--quantity", "3", "--name", "緑茶"])
    assert goqctl._request_from(args) == p.ProductAdd(sku="A-1", quantity=3, name="緑茶")
    args = parser.parse_args(["import", "yahoo", "--create-products"])
    assert goqctl._request_from(args) == p.Import(store="yahoo", create_products=True)
    assert goqctl._request_from(parser.parse_args(["import", "yahoo"])) == p.Import(store="yahoo")
    # Nothing is sent (no daemon at this socket): each is a usage error naming the field.
    for argv, field in (
        (["product", "add", "", "--quantity", "1"], "$.sku"),
        (["product", "add", "A", "--quantity", "-1"], "$.quantity"),
        (["product", "add", "A", "--quantity", str(limits.MAX_QUANTITY + 1)], "$.quantity"),
        (["product", "add", "A" * (limits.MAX_SKU + 1), "--quantity", "1"], "$.sku"),
        (["product", "add", "A\x00", "--quantity", "1"], "NUL"),
    ):
        code = goqctl.main(["--socket", "/nonexistent/goqd.sock", *argv])
        err = capsys.readouterr().err
        assert code == goqctl.EXIT_USAGE and field in err, (argv, err)
    assert goqctl.main(["product", "add", "A"]) == goqctl.EXIT_USAGE  # --quantity required
    assert "--quantity" in capsys.readouterr().err


def test_goqctl_says_what_a_product_add_created_and_linked() -> None:
    added = m.ProductAdded(
        sku="TEA-1",
        total=4,
        linked=(("yahoo", "y-tea"), ("amazon", "a-tea")),
        released=1,
    )
    text = goqctl._render(added, p.ProductAdd(sku="TEA-1", quantity=5), argparse.Namespace())
    assert "product TEA-1 created: total 4 (the 5 given, less 1 sold while unlinked)" in text
    assert "linked 2 listing(s): yahoo/y-tea, amazon/a-tea" in text
    assert "1 parked order line(s) booked" in text
    lonely = goqctl._render(
        m.ProductAdded(sku="X", total=0), p.ProductAdd(sku="X", quantity=0), argparse.Namespace()
    )
    assert "no listing matched" in lonely and "goqctl link STORE LISTING X" in lonely
    assert "sold while unlinked" not in lonely


def test_the_import_help_says_the_flag_changes_nothing_on_the_base_store(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert goqctl.main(["import", "--help"]) == goqctl.EXIT_OK
    out = " ".join(capsys.readouterr().out.split())
    assert "--create-products" in out and "base store" in out and "changes nothing" in out


# ------------------------------------------------------------------ the daemon, over its socket


@dataclass
class Shop:
    daemon: Daemon
    sims: dict[str, SimRakuten]
    socket: str

    async def total(self, sku: str) -> int:
        return (await self.daemon.ledger.ask(m.GetHistory(sku=sku, limit=0), m.History)).total

    async def outbox_empty(self) -> bool:
        status = await self.daemon.ledger.ask(m.GetLedgerStatus(), m.LedgerStatus)
        return status.outbox == 0

    async def products(self) -> dict[str, tuple[int, bool, str]]:
        reply = await call(self.socket, m.ListProducts())
        assert isinstance(reply, m.ProductList)
        return {x.sku: (x.total, x.count_known, x.first_store) for x in reply.products}


@pytest.fixture
async def shop(sock_dir: str) -> AsyncIterator[Shop]:
    """Three Rakuten shops: ``base`` (the base store), ``other`` (casefold link condition)
    and ``third`` (exact). Only ``other`` and ``third`` sell NEW-ITEM."""
    tmp = sock_dir
    async with trio.open_nursery() as nursery:
        sims = {
            name: SimRakuten(shop_id=f"50010{n}", clock=time.time, seed=n)
            for n, name in enumerate(("base", "other", "third"))
        }
        sims["base"].add_listing("mug/white", link_code="MUG-WHT", name="マグ", quantity=3)
        sims["other"].add_listing("x01/x", link_code="new-item", name="新商品", quantity=4)
        sims["other"].add_listing("f01/x", link_code="FREE-1", name="無制限", quantity=None)
        sims["third"].add_listing("n01/n", link_code="NEW-ITEM", name="新商品", quantity=6)
        stores = [
            await rig.serve_store(
                nursery,
                tmp,
                name,
                sim,
                poll_interval="60s",
                push_retry="1s",
                link_normalize=("casefold",) if name == "other" else (),
            )
            for name, sim in sims.items()
        ]
        config = rig.loopback_config(tmp, stores, base_store="base")
        daemon = await nursery.start(run_daemon, config)
        yield Shop(daemon, sims, config.daemon.control_socket)
        nursery.cancel_scope.cancel()


async def test_product_add_over_the_socket_links_every_store_and_pushes(shop: Shop) -> None:
    with trio.fail_after(60):
        for store in ("other", "third"):
            report = await call(shop.socket, p.Import(store=store))
            assert isinstance(report, m.LinkReport) and report.created == 0
        # A sale of the unlinked listing parks.
        assert shop.sims["other"].place_order([("x01/x", 1)]) is not None
        assert await shop.daemon.handles["other"].poll_and_wait()

        added = await call(shop.socket, p.ProductAdd(sku="NEW-ITEM", quantity=9, name="新商品"))
        assert isinstance(added, m.ProductAdded)
        assert added.linked == (("other", "x01/x"), ("third", "n01/n"))
        assert (added.released, added.total) == (1, 8)
        # Pushed to both malls, as for any linked listing.
        await eventually(
            lambda: (
                shop.sims["other"].stock("x01/x") == 8 and shop.sims["third"].stock("n01/n") == 8
            )
        )

        with pytest.raises(RemoteError) as refused:
            await call(shop.socket, p.ProductAdd(sku="NEW-ITEM", quantity=1))
        assert refused.value.code == "conflict" and "'NEW-ITEM' already exists" in str(
            refused.value
        )
        assert await shop.total("NEW-ITEM") == 8


async def test_goqctl_product_add_prints_what_it_created_and_linked(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(60):
        await call(shop.socket, p.Import(store="third"))
        argv = ["--socket", shop.socket, "product", "add", "NEW-ITEM", "--quantity", "5"]
        code = await trio.to_thread.run_sync(goqctl.main, argv)
        out = capsys.readouterr().out
        assert code == goqctl.EXIT_OK, out
        assert "product NEW-ITEM created: total 5" in out and "third/n01/n" in out
        code = await trio.to_thread.run_sync(goqctl.main, [*argv, "--json"])
        captured = capsys.readouterr()
        assert code == goqctl.EXIT_ERROR
        # stdout also has the in-process daemon's log lines; goqctl's is the JSON one.
        [reply] = [json.loads(x) for x in captured.out.splitlines() if x.startswith("{")]
        assert reply["code"] == "conflict"
        assert "'NEW-ITEM' already exists" in captured.err


async def test_import_create_products_over_the_socket(shop: Shop) -> None:
    with trio.fail_after(60):
        base = await call(shop.socket, p.Import(store="base", create_products=True))
        assert isinstance(base, m.LinkReport) and (base.created, base.linked) == (1, 1)

        report = await call(shop.socket, p.Import(store="other", create_products=True))
        assert isinstance(report, m.LinkReport)
        assert (report.created, report.linked, report.count_unknown) == (2, 2, 1)
        assert any("FREE-1" in x for x in report.problems)
        assert await shop.products() == {
            "MUG-WHT": (3, True, "base"),
            "new-item": (4, True, "other"),
            "FREE-1": (0, False, "other"),
        }
        # The third store's NEW-ITEM is another code there (exact condition): not linked.
        third = await call(shop.socket, p.Import(store="third"))
        assert isinstance(third, m.LinkReport) and (third.linked, third.unlinked) == (0, 1)

        again = await call(shop.socket, p.Import(store="other", create_products=True))
        assert isinstance(again, m.LinkReport)
        assert (again.created, again.linked, again.count_unknown) == (0, 0, 0)
        assert len(await shop.products()) == 3
        # The unlimited listing was kept out of sync: never set to 0.
        await eventually(shop.outbox_empty)
        assert shop.sims["other"].stock("f01/x") is None


@pytest.mark.parametrize(
    ("request_", "where"),
    [
        ({"type": "product_add", "sku": "", "quantity": 1}, "$.request.sku"),
        ({"type": "product_add", "sku": "A", "quantity": -1}, "$.request.quantity"),
        ({"type": "product_add", "sku": "A", "quantity": 10**12}, "$.request.quantity"),
        ({"type": "product_add", "sku": "A" * 256, "quantity": 1}, "$.request.sku"),
        ({"type": "product_add", "sku": "A\u0000", "quantity": 1}, "NUL"),
        ({"type": "product_add", "sku": "A"}, "quantity"),
        ({"type": "import", "store": "other", "create_products": "yes"}, "create_products"),
    ],
)
async def test_hostile_requests_are_refused_naming_the_field_and_change_nothing(
    shop: Shop, request_: dict[str, Any], where: str
) -> None:
    with trio.fail_after(30):
        reply = await raw_exchange(shop.socket, envelope(request_))
        err = reply["reply"]
        assert err["type"] == "err" and err["code"] == "bad_request", err
        assert where in err["message"], err
        assert await shop.products() == {}
        # The daemon still answers.
        assert isinstance(await call(shop.socket, p.Status()), p.DaemonStatus)


def test_both_guides_say_how_to_register_products_from_any_store() -> None:
    root = ROOT / "docs"
    for name in ("operator-guide.md", "operator-guide.ja.md"):
        text = (root / name).read_text(encoding="utf-8")
        assert "goqctl import STORE --create-products" in text, name
        assert "goqctl product add SKU --quantity N" in text, name
