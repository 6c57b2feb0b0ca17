"""Catalogue operations end to end over the control socket: import from the base store
(products created with its counts), import from another store (linked by code), CSV
import, link --auto, 差異商品 (diff) finding a silent no-op, and 反映 (reflect)."""

from __future__ import annotations

import pytest

from goqd import messages as m
from goqd.control import protocol as p
from goqd.control.client import call
from tests.helpers.catalogue import (
    Shop,
)
from tests.helpers.daemon import eventually, outbox_empty


async def test_import_link_diff_and_reflect(shop: Shop) -> None:
    sock = shop.socket
    base_report = await call(sock, p.Import(store="base"))
    assert isinstance(base_report, m.LinkReport)
    assert (base_report.created, base_report.linked) == (2, 2)
    products = await call(sock, m.ListProducts())
    assert isinstance(products, m.ProductList)
    assert {(x.sku, x.total) for x in products.products} == {("TS-RED-S", 7), ("MUG-WHT", 3)}

    other = await call(sock, p.Import(store="other"))
    assert isinstance(other, m.LinkReport)
    # "ts-red-s" links to TS-RED-S under this store's casefold rule; NEW-ITEM has no product.
    assert (other.linked, other.unlinked, other.created) == (2, 1, 0)
    # The ledger's counts go out to the other store.
    await eventually(lambda: shop.other.stock("t01/rs") == 7 and shop.other.stock("m01/w") == 3)

    # A product created later (CSV into the base store), then link --auto links it.
    csv_text = "listing_key,sku_code,name,quantity\nnew/item,NEW-ITEM,新商品,4\n"
    shop.base.add_listing("new/item", link_code="NEW-ITEM", quantity=4)
    created = await call(sock, p.Import(store="base", csv_text=csv_text))
    assert isinstance(created, m.LinkReport) and created.created == 1
    auto = await call(sock, p.LinkAuto(store="other"))
    assert isinstance(auto, m.LinkReport) and auto.linked == 1

    # Every count agrees: diff is empty.
    await eventually(lambda: shop.other.stock("x01/x") == 4)
    clean = await call(sock, p.Diff(store="other"))
    assert isinstance(clean, p.DiffReport) and clean.rows == () and clean.checked == 3

    # The mall silently ignores updates: the push is "accepted", nothing changes.
    shop.other.faults.silent_noop = True
    await call(sock, m.SetStock(sku="MUG-WHT", quantity=2))
    await eventually(lambda: outbox_empty(shop.daemon))
    diff = await call(sock, p.Diff(store="other"))
    assert isinstance(diff, p.DiffReport)
    assert [(r.listing_key, r.ledger_quantity, r.mall_quantity) for r in diff.rows] == [
        ("m01/w", 2, 3)
    ]
    shop.other.faults.silent_noop = False
    done = await call(sock, p.Reflect(store="other", listing_keys=("m01/w",)))
    assert isinstance(done, m.Done) and done.changed == 1
    await eventually(lambda: shop.other.stock("m01/w") == 2)


async def test_bulk_stock_csv_over_the_socket(shop: Shop) -> None:
    await call(shop.socket, p.Import(store="base"))
    done = await call(shop.socket, p.StockImport(csv_text="sku,quantity\nTS-RED-S,20\nMUG-WHT,0\n"))
    assert isinstance(done, m.Done) and done.changed == 2
    with pytest.raises(Exception, match="line 3"):
        await call(shop.socket, p.StockImport(csv_text="sku,delta\nTS-RED-S,1\nMUG-WHT,x\n"))
    products = await call(shop.socket, m.ListProducts())
    assert isinstance(products, m.ProductList)
    assert {(x.sku, x.total) for x in products.products} == {("TS-RED-S", 20), ("MUG-WHT", 0)}
