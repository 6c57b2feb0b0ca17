"""Catalogue operations: import from the base store and others, link conditions,
複数の商品が紐づいています, auto-link, 反映, bulk stock CSV, and the CSV formats."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from goqd import messages as m
from goqd.csvio import decode_csv_bytes, parse_listings_csv, parse_stock_csv
from goqd.errors import InputError, UnknownSku
from goqd.ledger.db import _MIGRATIONS, APPLICATION_ID, SCHEMA_VERSION, Ledger, open_db
from goqd.linking import fold, normalize


def listing(key: str, code: str, qty: int | None = 5, **attrs: object) -> m.MallListing:
    return m.MallListing(
        listing_key=key,
        link_code=code,
        name=f"name {code}",
        quantity=qty,
        attrs=m.ListingAttrs(**attrs),  # type: ignore[arg-type]
    )


def one(ledger: Ledger, msg: m.LedgerRequest) -> m.LedgerReply:
    result = ledger.apply_batch([msg]).replies[0]
    if isinstance(result, Exception):
        raise result
    return result


@pytest.fixture
def ledger() -> Ledger:
    return Ledger(open_db(":memory:"), now=lambda: 1000.0)


def imp(ledger: Ledger, store: str, items: list[m.MallListing], **kw: object) -> m.LinkReport:
    reply = one(ledger, m.ImportListings(store=store, listings=tuple(items), **kw))  # type: ignore[arg-type]
    assert isinstance(reply, m.LinkReport)
    return reply


def listings(ledger: Ledger, store: str) -> dict[str, m.ListingRecord]:
    reply = one(ledger, m.ListListings(store=store))
    assert isinstance(reply, m.ListingList)
    return {x.listing_key: x for x in reply.listings}


def test_importing_the_base_store_creates_products_with_its_counts(ledger: Ledger) -> None:
    report = imp(ledger, "base", [listing("b1", "A", 7), listing("b2", "B", 0)], base=True)
    assert (report.created, report.linked, report.new_listings) == (2, 2, 2)
    products = one(ledger, m.ListProducts())
    assert isinstance(products, m.ProductList)
    assert [(p.sku, p.total, p.first_store) for p in products.products] == [
        ("A", 7, "base"),
        ("B", 0, "base"),
    ]


def test_other_stores_link_by_code_and_register_the_rest_unlinked(ledger: Ledger) -> None:
    imp(ledger, "base", [listing("b1", "A")], base=True)
    report = imp(ledger, "other", [listing("o1", "A"), listing("o2", "NOPE")])
    assert (report.created, report.linked, report.unlinked) == (0, 1, 1)
    ls = listings(ledger, "other")
    assert ls["o1"].sku == "A" and ls["o1"].link_state == "linked"
    assert ls["o2"].sku is None and ls["o2"].link_state == "unlinked"


def test_reimport_updates_attributes_without_duplicating(ledger: Ledger) -> None:
    imp(ledger, "base", [listing("b1", "A")], base=True)
    imp(ledger, "yahoo", [listing("y1", "A", allow_overdraft=False)])
    report = imp(ledger, "yahoo", [listing("y1", "A", allow_overdraft=True)])
    assert (report.new_listings, report.updated, report.linked) == (0, 1, 0)
    ls = listings(ledger, "yahoo")
    assert len(ls) == 1 and ls["y1"].attrs.allow_overdraft is True
    # The changed 超過購入設定 goes out with the next push.
    batch = one(ledger, m.TakePushes(store="yahoo", limit=10))
    assert isinstance(batch, m.PushBatch)
    assert batch.items[0].attrs.allow_overdraft is True
    assert one(ledger, m.ListProducts()).products[0].sku == "A"  # type: ignore[union-attr]


def test_default_lead_time_applies_only_to_new_listings(ledger: Ledger) -> None:
    imp(ledger, "base", [listing("b1", "A"), listing("b2", "B")], base=True)
    imp(ledger, "amazon", [listing("A", "A", restock_date="2026-12-01")], default_lead_time=3)
    one(ledger, m.SetListingAttrs(store="amazon", listing_key="A", lead_time_days=9))
    imp(
        ledger,
        "amazon",
        [listing("A", "A", restock_date="2026-12-24"), listing("B", "B")],
        default_lead_time=3,
    )
    ls = listings(ledger, "amazon")
    assert ls["A"].attrs.lead_time_days == 9  # the operator's value, not the default
    assert ls["A"].attrs.restock_date == "2026-12-24"  # taken from the (re-)import
    assert ls["B"].attrs.lead_time_days == 3


def test_link_condition_normalisation(ledger: Ledger) -> None:
    imp(ledger, "base", [listing("b1", "TS-RED-S")], base=True)
    exact = imp(ledger, "s1", [listing("x", "ｔｓ－ｒｅｄ－ｓ")])
    assert exact.linked == 0
    report = imp(ledger, "s2", [listing("x", "ｔｓ－ｒｅｄ－ｓ")], rules=("nfkc", "casefold"))
    assert report.linked == 1
    stripped = imp(ledger, "s3", [listing("x", "ts red s")], rules=("casefold", "strip-spaces"))
    assert stripped.linked == 0  # the hyphens still differ
    assert normalize("TS RED-S", ["casefold", "strip-spaces", "strip-hyphens"]) == "tsreds"
    assert fold("ＴＳ－ＲＥＤ－Ｓ") == "tsreds"
    assert normalize("ロングー", ["strip-hyphens"]) == "ロングー"  # ー is a letter


def test_a_listing_matching_several_products_is_not_linked_by_guess(ledger: Ledger) -> None:
    imp(ledger, "base", [listing("b1", "ab-1"), listing("b2", "AB-1")], base=True)
    report = imp(ledger, "s", [listing("x", "ab-1")], rules=("casefold",))
    assert report.ambiguous == 1 and report.linked == 0
    assert "複数の商品が紐づいています" in report.problems[0] and "AB-1" in report.problems[0]
    errors = one(ledger, m.ListErrors(store="s"))
    assert isinstance(errors, m.ErrorList)
    assert errors.errors[0].code == "multiple_links" and errors.errors[0].listing_key == "x"


def test_auto_link_links_listings_imported_before_their_product(ledger: Ledger) -> None:
    imp(ledger, "s", [listing("x", "LATE")])
    parked = one(
        ledger,
        m.OrderLinesSeen(
            store="s",
            lines=(
                m.OrderLine(order_id="o", line_id="1", listing_key="x", quantity=2, updated_at=1),
            ),
        ),
    )
    assert isinstance(parked, m.OrderLinesBooked) and parked.parked == 1
    imp(ledger, "base", [listing("b", "LATE", 10)], base=True)
    report = one(ledger, m.AutoLink(store="s"))
    assert isinstance(report, m.LinkReport)
    assert report.linked == 1 and report.released == 1
    history = one(ledger, m.GetHistory(sku="LATE"))
    assert isinstance(history, m.History) and history.total == 8


def test_reflect_queues_every_linked_listing_or_the_chosen_ones(ledger: Ledger) -> None:
    imp(ledger, "base", [listing("b1", "A"), listing("b2", "B")], base=True)
    one(ledger, m.TakePushes(store="base", limit=10))
    for item in one(ledger, m.TakePushes(store="base", limit=10)).items:  # type: ignore[union-attr]
        one(
            ledger,
            m.PushesDone(
                store="base",
                outcomes=(
                    m.PushOutcome(
                        listing_key=item.listing_key,
                        version=item.version,
                        accepted=True,
                        quantity=5,
                    ),
                ),
            ),
        )
    assert one(ledger, m.TakePushes(store="base", limit=10)).items == ()  # type: ignore[union-attr]
    done = one(ledger, m.QueuePushes(store="base"))
    assert isinstance(done, m.Done) and done.changed == 2
    one(ledger, m.QueuePushes(store="base", listing_keys=("b1",)))
    with pytest.raises(Exception, match="no listing"):
        one(ledger, m.QueuePushes(store="base", listing_keys=("nope",)))


def test_bulk_stock_edit_is_all_or_nothing(ledger: Ledger) -> None:
    imp(ledger, "base", [listing("b1", "A", 5), listing("b2", "B", 5)], base=True)
    with pytest.raises(UnknownSku):
        one(ledger, m.SetStocks(items=(("A", 1), ("ZZZ", 2))))
    totals = {p.sku: p.total for p in one(ledger, m.ListProducts()).products}  # type: ignore[union-attr]
    assert totals == {"A": 5, "B": 5}
    one(ledger, m.SetStocks(items=(("A", 1), ("B", 2))))
    one(ledger, m.SetStocks(items=(("A", 3),), mode="adjust"))
    totals = {p.sku: p.total for p in one(ledger, m.ListProducts()).products}  # type: ignore[union-attr]
    assert totals == {"A": 4, "B": 2}


def test_a_version_1_ledger_is_migrated_forward(tmp_path: Path) -> None:
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in _MIGRATIONS[0].split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("INSERT INTO products VALUES ('ＡＢ-1', '', 3, 'x', 0)")
    conn.execute("PRAGMA user_version=1")
    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
    conn.close()
    migrated = open_db(path)
    assert migrated.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert migrated.execute("SELECT code_fold FROM products").fetchone()[0] == "ab1"


# ------------------------------------------------------------------ CSV formats


def test_listing_csv_in_shift_jis_is_read() -> None:
    text = "listing_key,sku_code,name,quantity,allow_overdraft\nk1,A,Tシャツ 赤,3,する\n"
    decoded = decode_csv_bytes(text.encode("cp932"))
    [row] = parse_listings_csv(decoded)
    assert (row.listing_key, row.name, row.quantity) == ("k1", "Tシャツ 赤", 3)
    assert row.attrs.allow_overdraft is True
    assert decode_csv_bytes(b"\xef\xbb\xbf" + text.encode()) == text  # UTF-8 with BOM


def test_undecodable_csv_is_refused_clearly() -> None:
    with pytest.raises(InputError, match="neither UTF-8 nor Shift_JIS"):
        decode_csv_bytes(b"sku\n\x81\x7f")  # a cp932 lead byte with no valid trail byte


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sku_code\nA\n", "missing column 'listing_key'"),
        ("listing_key,colour\nk,red\n", "unknown column 'colour'"),
        ("listing_key,quantity\nk,-1\n", "line 2: quantity -1 is outside"),
        ("listing_key,quantity\nk,lots\n", "line 2: quantity 'lots' is not a whole number"),
        ("listing_key\nk\nk\n", "line 3: listing_key 'k' already on line 2"),
        ("listing_key,restock_date\nk,24/12/2026\n", "not YYYY-MM-DD"),
        ("", "empty file"),
    ],
)
def test_bad_listing_csv_names_the_line_and_column(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_listings_csv(text)


def test_stock_csv_set_and_adjust() -> None:
    assert parse_stock_csv("sku,quantity\nA,3\nB,0\n") == ("set", [("A", 3), ("B", 0)])
    assert parse_stock_csv("sku,delta\nA,-2\n") == ("adjust", [("A", -2)])
    with pytest.raises(InputError, match="exactly one of the columns"):
        parse_stock_csv("sku,quantity,delta\nA,1,1\n")
    with pytest.raises(InputError, match="line 2: quantity -1"):
        parse_stock_csv("sku,quantity\nA,-1\n")
