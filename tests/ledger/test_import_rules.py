"""What an import may and may not change: lead time as GoQSystem's manual has it (the
store's default replaces the mall's only for listings new to goqd; a lead time goqd knows
is never changed by an import), and counts goqd does not know (unlimited or untracked at
the base mall) are never turned into 0 and pushed everywhere.

The ledger rules run on a real SQLite ledger; the last test imports from a simulated
Rakuten shop over real HTTP into the real daemon, through its control socket.
"""

from __future__ import annotations

import argparse

import pytest

from goqd import messages as m
from goqd.cli import goqctl
from goqd.control import protocol as p
from goqd.control.client import call
from goqd.errors import CountUnknown, InputError
from goqd.ledger import Ledger, open_db
from tests.helpers.catalogue import (
    Shop,
)
from tests.helpers.daemon import eventually, outbox_empty
from tests.helpers.paths import ROOT


@pytest.fixture
def ledger() -> Ledger:
    return Ledger(open_db(":memory:"), now=lambda: 1_000.0)


def one(ledger: Ledger, msg: m.LedgerRequest) -> m.LedgerReply:
    result = ledger.apply_batch([msg]).replies[0]
    if isinstance(result, Exception):
        raise result
    return result


def listing(key: str, qty: int | None = 5, lead: int | None = None) -> m.MallListing:
    return m.MallListing(
        listing_key=key,
        link_code=key.upper(),
        name=f"name {key}",
        quantity=qty,
        attrs=m.ListingAttrs(lead_time_days=lead),
    )


def imp(
    ledger: Ledger,
    store: str,
    *items: m.MallListing,
    default: int | None = None,
    base: bool = False,
) -> m.LinkReport:
    reply = one(
        ledger,
        m.ImportListings(store=store, listings=items, default_lead_time=default, base=base),
    )
    assert isinstance(reply, m.LinkReport)
    return reply


def lead(ledger: Ledger, store: str, key: str) -> int | None:
    reply = one(ledger, m.ListListings(store=store))
    assert isinstance(reply, m.ListingList)
    return next(x.attrs.lead_time_days for x in reply.listings if x.listing_key == key)


def pushes(ledger: Ledger, store: str) -> dict[str, int]:
    reply = one(ledger, m.TakePushes(store=store, limit=1000, peek=True))
    assert isinstance(reply, m.PushBatch)
    return {i.listing_key: i.quantity for i in reply.items}


# ------------------------------------------------------------------ lead time


def test_the_default_lead_time_replaces_the_malls_for_a_listing_new_to_goqd(
    ledger: Ledger,
) -> None:
    imp(ledger, "base", listing("a"), listing("b"), base=True)
    imp(ledger, "amazon", listing("a", lead=5), default=3)
    assert lead(ledger, "amazon", "a") == 3  # the mall said 5; goqd's setting wins
    imp(ledger, "amazon-2", listing("b", lead=5))
    assert lead(ledger, "amazon-2", "b") == 5  # no default: the mall's is kept


def test_a_lead_time_goqd_knows_is_never_changed_by_an_import(ledger: Ledger) -> None:
    imp(ledger, "base", listing("a"), listing("b"), base=True)
    imp(ledger, "amazon", listing("a", lead=4), listing("b"))
    one(ledger, m.SetListingAttrs(store="amazon", listing_key="b", lead_time_days=9))
    report = imp(ledger, "amazon", listing("a", lead=7), listing("b", lead=1), default=2)
    assert (lead(ledger, "amazon", "a"), lead(ledger, "amazon", "b")) == (4, 9)
    assert report.new_listings == 0


def test_goqd_takes_the_malls_lead_time_when_it_knows_none(ledger: Ledger) -> None:
    imp(ledger, "base", listing("a"), base=True)
    imp(ledger, "amazon", listing("a"))  # imported without a lead time
    imp(ledger, "amazon", listing("a", lead=6), default=2)
    assert lead(ledger, "amazon", "a") == 6  # known to goqd already: not the default


def test_a_listing_only_an_order_named_is_still_new_to_goqd(ledger: Ledger) -> None:
    one(
        ledger,
        m.OrderLinesSeen(
            store="amazon",
            lines=(
                m.OrderLine(
                    order_id="o1", line_id="1", listing_key="a", quantity=1, updated_at=900.0
                ),
            ),
        ),
    )
    report = imp(ledger, "amazon", listing("a", lead=8), default=3)
    assert lead(ledger, "amazon", "a") == 3
    assert report.new_listings == 0  # goqd had registered it from the order


def test_the_example_config_and_both_guides_say_what_the_import_does() -> None:
    example = (ROOT / "config" / "goqd.example.toml").read_text(encoding="utf-8")
    assert "replaces the" in example and "never changed by an import" in example
    assert "在庫連携へ未登録の商品のみ" in example
    for guide in ("operator-guide.md", "operator-guide.ja.md"):
        text = (ROOT / "docs" / guide).read_text(encoding="utf-8")
        assert "在庫連携へ未登録の商品のみ" in text, guide
        # The manual's warning: values changed at the mall are overwritten by a push.
        assert "超過購入" in text and "入荷予定日" in text, guide
    assert "the next push overwrites them" in (ROOT / "docs" / "operator-guide.md").read_text(
        encoding="utf-8"
    )
    assert "次の反映で goqd の値に上書きされます" in (
        ROOT / "docs" / "operator-guide.ja.md"
    ).read_text(encoding="utf-8")


# ------------------------------------------------------------------ unknown counts


def test_a_base_listing_without_a_count_makes_a_product_nothing_is_pushed_for(
    ledger: Ledger,
) -> None:
    report = imp(ledger, "base", listing("free", qty=None), listing("tea", qty=4), base=True)
    assert (report.created, report.count_unknown) == (2, 1)
    assert any("FREE" in x and "goqctl stock set FREE N" in x for x in report.problems)
    other = imp(ledger, "yahoo", listing("free"), listing("tea"))
    assert other.linked == 2
    assert pushes(ledger, "base") == {"tea": 4}
    assert pushes(ledger, "yahoo") == {"tea": 4}  # never a 0 for the unlimited one
    products = one(ledger, m.ListProducts())
    assert isinstance(products, m.ProductList)
    assert {(x.sku, x.count_known) for x in products.products} == {
        ("FREE", False),
        ("TEA", True),
    }
    # A sale of it is recorded but is no oversell, and still pushes nothing.
    booked = one(
        ledger,
        m.OrderLinesSeen(
            store="yahoo",
            lines=(
                m.OrderLine(
                    order_id="o1", line_id="1", listing_key="free", quantity=2, updated_at=2e3
                ),
            ),
        ),
    )
    assert isinstance(booked, m.OrderLinesBooked)
    assert (booked.booked, booked.oversold_units) == (1, 0)
    assert pushes(ledger, "base") == {"tea": 4}
    # The operator gives a count: from now on it is synced everywhere.
    one(ledger, m.SetStock(sku="FREE", quantity=7))
    assert pushes(ledger, "base") == {"tea": 4, "free": 7}
    assert pushes(ledger, "yahoo") == {"tea": 4, "free": 7}


def test_a_count_goqd_does_not_know_cannot_be_adjusted(ledger: Ledger) -> None:
    imp(ledger, "base", listing("free", qty=None), base=True)
    with pytest.raises(CountUnknown, match="goqctl stock set FREE N"):
        one(ledger, m.AdjustStock(sku="FREE", delta=3))
    with pytest.raises(CountUnknown):
        one(ledger, m.SetStocks(items=(("FREE", 1),), mode="adjust"))
    job = one(ledger, m.BeginStockImport(digest=b"x", mode="adjust"))
    assert isinstance(job, m.StockImportJob)
    with pytest.raises(InputError, match="line 2: sku 'FREE' has no known count"):
        one(ledger, m.StageStockRows(import_id=job.import_id, rows=((2, "FREE", 3),)))


def test_goqctl_shows_unknown_counts_and_says_what_to_do() -> None:
    products = m.ProductList(
        products=(
            m.ProductRecord(
                sku="FREE", name="x", total=0, first_store="b", listings=2, count_known=False
            ),
        )
    )
    text = goqctl._render(products, m.ListProducts(), argparse.Namespace())
    assert "unknown" in text and "goqctl stock set SKU N" in text
    report = m.LinkReport(store="b", seen=1, created=1, count_unknown=1, problems=("b/free: …",))
    text = goqctl._render(report, p.Import(store="b"), argparse.Namespace())
    assert "1 product(s) created without a count" in text
    assert "goqctl stock set SKU N" in text


async def test_an_unlimited_rakuten_item_is_imported_without_a_count_and_not_zeroed(
    shop: Shop,
) -> None:
    shop.base.add_listing("free/x", link_code="FREE-1", name="無制限", quantity=None)
    shop.other.add_listing("f01/x", link_code="FREE-1", name="無制限", quantity=5)
    report = await call(shop.socket, p.Import(store="base"))
    assert isinstance(report, m.LinkReport)
    assert report.count_unknown == 1 and any("FREE-1" in x for x in report.problems)
    other = await call(shop.socket, p.Import(store="other"))
    assert isinstance(other, m.LinkReport)
    await eventually(lambda: outbox_empty(shop.daemon))
    assert shop.other.stock("f01/x") == 5  # left alone, not set to 0
    changed = await call(shop.socket, m.SetStock(sku="FREE-1", quantity=3))
    assert isinstance(changed, m.StockChanged)
    await eventually(lambda: shop.other.stock("f01/x") == 3)
