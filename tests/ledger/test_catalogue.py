"""Catalogue operations: import from the base store and others, link conditions,
複数の商品が紐づいています, auto-link, 反映, bulk stock CSV, and the CSV formats."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec
import pytest

from goqd import limits
from goqd import messages as m
from goqd.cli import goqctl
from goqd.csvio import decode_csv_bytes, parse_listings_csv, parse_stock_csv
from goqd.errors import InputError, UnknownSku
from goqd.ledger import queries
from goqd.ledger.db import Ledger
from goqd.ledger.schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, open_db
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
    for statement in MIGRATIONS[0].split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("INSERT INTO products VALUES ('ＡＢ-1', '', 3, 'x', 0)")
    conn.execute("PRAGMA user_version=1")
    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
    conn.close()
    migrated = open_db(path)
    assert queries.schema_version(migrated) == SCHEMA_VERSION
    # The column the migration computed: schema-internal, so read here, not in queries.
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


# ------------------------------------------------------------------ CSV: hostile and careless files

PRODUCT_NAMES = [
    "Tシャツ 赤 S",
    "マグカップ 白",
    "セット",
    "ほうじ茶 100g",
    "今治タオル バスタオル 2枚組",
    "【送料無料】訳あり 信州りんご 5kg",
    "有田焼 湯呑み 5客セット",
    "南部鉄器 急須 0.6L",
    "日本酒 大吟醸 720ml",
]
HALF_WIDTH_NAMES = ["ｺｰﾋｰｶｯﾌﾟ", "ﾃｨｰｼｬﾂ ｱｶ", "ﾏｸﾞｶｯﾌﾟ ｼﾛ", "ｾｯﾄ", "ｼｬﾂ", "ｺｰﾋｰ･ｶｯﾌﾟ", "ﾌﾞﾙｰ"]
# Four bytes each in cp932, so valid EUC-JP as well: only the script rules let them in.
HALF_WIDTH_NAMES += ["ｸｨｰﾝ", "ｸｫｰﾂ", "ｽｨｰﾂ", "ｼｰﾂ ｸｨｰﾝ"]
# Characters only cp932 has (NEC and IBM extensions), as Windows exports write them.
CP932_ONLY_NAMES = ["①ｾｯﾄ", "㈱ﾀﾅｶ", "Ⅱ型 ﾌｨﾙﾀｰ", "№1 ｺｰﾋｰ", "髙橋農園 ～ 新茶", "﨑陽 ｼｭｳﾏｲ ㍻"]


def names_csv(names: list[str]) -> str:
    return "listing_key,name\n" + "".join(f"k{i},{n}\n" for i, n in enumerate(names))


@pytest.mark.parametrize("name", PRODUCT_NAMES)
def test_an_euc_jp_file_is_refused_not_read_as_shift_jis(name: str) -> None:
    # "セット" in EUC-JP is valid cp932 too ("･ｻ･ﾃ･ﾈ"): it used to be imported garbled.
    with pytest.raises(InputError, match="looks like EUC-JP"):
        decode_csv_bytes(names_csv([name]).encode("euc_jp"))


def test_a_whole_euc_jp_catalogue_is_refused() -> None:
    with pytest.raises(InputError, match="EUC-JP"):
        decode_csv_bytes(names_csv(PRODUCT_NAMES).encode("euc_jp"))


@pytest.mark.parametrize(
    "names",
    [PRODUCT_NAMES, HALF_WIDTH_NAMES, PRODUCT_NAMES + HALF_WIDTH_NAMES, CP932_ONLY_NAMES],
)
def test_shift_jis_names_with_half_width_katakana_are_read_as_written(names: list[str]) -> None:
    text = names_csv(names)
    assert decode_csv_bytes(text.encode("cp932")) == text
    assert decode_csv_bytes(text.encode("utf-8")) == text


@pytest.mark.parametrize("name", HALF_WIDTH_NAMES + CP932_ONLY_NAMES)
def test_a_single_half_width_name_in_shift_jis_is_read_as_written(name: str) -> None:
    text = names_csv([name])
    assert decode_csv_bytes(text.encode("cp932")) == text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("sku,quantity\nA,1\n".encode("utf-16"), "UTF-16"),
        (b"sku,quantity\nA,\xf0\x40\n", r"line 2, column 3: .*not a Shift_JIS character"),
        (b"sku,quantity\nA,1\n\x81\x7f", r"line 3, column 1: byte 0x81 is neither"),
    ],
)
def test_bytes_that_are_not_utf8_or_shift_jis_text_are_refused_with_their_place(
    data: bytes, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        decode_csv_bytes(data)


def test_goqctl_refuses_an_euc_jp_file_before_sending_it(tmp_path: Path) -> None:
    path = tmp_path / "stock.csv"
    path.write_bytes(("sku,quantity\nA,1\n# " + "セット\n").encode("euc_jp"))
    with pytest.raises(goqctl._LocalError, match="EUC-JP"):
        goqctl._read_csv(str(path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sku,quantity,quantity\nA,1,2\n", "line 1: column 'quantity' appears twice"),
        ("sku,,quantity\nA,,1\n", "line 1, column 2: a column with no name"),
        ("sku,quantity\nA,1\nB,2,3\n", "line 3: 3 field.s., but the header has 2"),
        ("sku,quantity\nA,1\nB\n", "line 3: 1 field.s., but the header has 2"),
        ('sku,quantity\nA,"' + "x" * 140_000 + '"\n', "line 2: a field is longer than"),
        ('sku,quantity\nA,1\n"B,2\nC,3\n', "line 3: a quoted field is never closed"),
        ('sku,quantity\nA,1\n"B"x,2\n', "line 3: a quote inside a quoted field"),
        ("sku,quantity\nA,1\nB\x00,2\n", "line 3, column 1: a NUL character"),
        ("sku,quantity\nA,1\nB,1_000\n", "line 3: quantity '1_000' is not a whole number"),
        ("sku,quantity\n" + "S" * 256 + ",1\n", "line 2: sku is 256 characters; at most 255"),
        ("sku,delta\nA,-1000000001\n", "line 2: delta -1000000001 is outside"),
        ("sku,quantity\nA,1\nA,2\n", "line 3: sku 'A' already on line 2"),
    ],
)
def test_a_malformed_stock_csv_is_refused_naming_line_and_column(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as refused:
        parse_stock_csv(text)
    assert len(str(refused.value)) < 300  # a huge field is never echoed back whole


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listing_key,restock_date\nk,2026-02-30\n", "line 2: restock_date '2026-02-30'"),
        ("listing_key,name,name\nk,a,b\n", "line 1: column 'name' appears twice"),
        ("listing_key,restock_date\nk,２０２６-０１-０１\n", "line 2: restock_date"),
        ("listing_key\n" + "k" * 100_000 + "\n", "line 2: listing_key is 100000 characters"),
        ("listing_key,sku_code\nk," + "s" * 256 + "\n", "line 2: sku_code is 256 characters"),
        ("listing_key,name\nk," + "n" * 1001 + "\n", "line 2: name is 1001 characters"),
    ],
)
def test_listing_csv_values_are_held_to_the_protocols_limits(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_listings_csv(text)


def test_what_the_listing_csv_accepts_listing_set_accepts_too() -> None:
    key = "k" * limits.MAX_LISTING_KEY
    [row] = parse_listings_csv(f"listing_key,restock_date\n{key},2028-02-29\n")
    request = msgspec.json.encode(
        {
            "type": "listing_set",
            "store": "s",
            "listing_key": row.listing_key,
            "restock_date": row.attrs.restock_date,
        }
    )
    assert msgspec.json.decode(request, type=m.SetListingAttrs).restock_date == "2028-02-29"
    for bad in ("2026-02-30", "2026-02-30\n"):
        with pytest.raises(msgspec.ValidationError, match="calendar date"):
            msgspec.json.decode(
                msgspec.json.encode(
                    {"type": "listing_set", "store": "s", "listing_key": "k", "restock_date": bad}
                ),
                type=m.SetListingAttrs,
            )


def test_old_mac_line_endings_blank_rows_and_a_bom_are_read() -> None:
    text = '\ufeffsku,quantity\r\rA,1\r,\r"B\rC",2\r'
    assert parse_stock_csv(text) == ("set", [("A", 1), ("B\rC", 2)])
