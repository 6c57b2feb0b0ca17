"""`--csv FILE` on diff, products, listings and stock list: Excel-readable bytes (UTF-8
with BOM or cp932), every row paged from the daemon, written atomically by goqctl, and
clear refusals that change nothing.

The writer is tested on its own (``goqd.cli.csvout``), then goqctl against a real daemon
(``tests.helpers.shop.open_shop``) over the real control socket.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from goqd import messages as m
from goqd.cli import goqctl as goqctl_module
from goqd.cli.csvout import CsvError, CsvOut
from goqd.control import protocol as p
from tests.helpers.shop import Shop, make_one_of_each, open_shop, three_products

NAMES = ["Tシャツ 赤", "ﾊﾝｶｸ ｶﾅ", "①㈱ 珈琲", 'plain, "quoted"\nnext line', "—ダッシュ"]


def read_csv(data: bytes, encoding: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode(encoding), newline="")))


@pytest.fixture
def tmp(sock_dir: str) -> Path:
    return Path(sock_dir)


# --------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------


def test_utf8_sig_starts_with_a_bom_and_round_trips(tmp: Path) -> None:
    target = tmp / "out.csv"
    with CsvOut(str(target), "utf-8-sig", ("sku", "name")) as out:
        out.write([(f"S-{i}", name) for i, name in enumerate(NAMES)])
        out.commit()
    data = target.read_bytes()
    assert data.startswith(b"\xef\xbb\xbfsku,name\r\n")
    assert read_csv(data, "utf-8-sig") == [["sku", "name"]] + [
        [f"S-{i}", name] for i, name in enumerate(NAMES)
    ]
    assert out.rows == len(NAMES)


def test_cp932_decodes_as_shift_jis_and_round_trips(tmp: Path) -> None:
    target = tmp / "out.csv"
    with CsvOut(str(target), "cp932", ("sku", "name")) as out:
        out.write([(f"S-{i}", name) for i, name in enumerate(NAMES)])
        out.commit()
    data = target.read_bytes()
    assert not data.startswith(b"\xef\xbb\xbf")
    rows = read_csv(data, "cp932")
    # EM DASH is written as the JIS character ― (U+2015), the one cp932 has.
    expected = [name.replace("\u2014", "\u2015") for name in NAMES]
    assert rows == [["sku", "name"]] + [[f"S-{i}", n] for i, n in enumerate(expected)]


def test_a_character_cp932_cannot_write_names_row_and_column_and_writes_nothing(
    tmp: Path,
) -> None:
    target = tmp / "out.csv"
    target.write_bytes(b"the operator's old file")
    with pytest.raises(CsvError) as caught, CsvOut(str(target), "cp932", ("sku", "name")) as out:
        out.write([("A-1", "Tシャツ"), ("B-2", "ハート♥")])
        out.commit()
    assert caught.value.message == (
        f"{target}: row 3 (sku 'B-2'), column name: '♥' (U+2665) has no Shift_JIS (cp932) "
        "code; nothing was written"
    )
    assert "--encoding utf-8-sig" in caught.value.hint
    assert target.read_bytes() == b"the operator's old file"
    assert sorted(os.listdir(tmp)) == ["out.csv"]  # no temporary file left


def test_a_failure_before_commit_leaves_no_file(tmp: Path) -> None:
    target = tmp / "out.csv"
    with pytest.raises(RuntimeError), CsvOut(str(target), "utf-8-sig", ("sku",)) as out:
        out.write([("A-1",)])
        raise RuntimeError("the daemon went away mid-way")
    assert os.listdir(tmp) == []


def test_cells_excel_would_run_as_formulas_are_written_as_text(tmp: Path) -> None:
    target = tmp / "out.csv"
    with CsvOut(str(target), "utf-8-sig", ("sku", "name", "n")) as out:
        out.write([("=1+1", "@SUM(A1)", "-5"), ("+81", "-cmd|' /C calc'!A0", "3")])
        out.commit()
    assert read_csv(target.read_bytes(), "utf-8-sig")[1:] == [
        ["'=1+1", "'@SUM(A1)", "-5"],
        ["+81", "'-cmd|' /C calc'!A0", "3"],
    ]


def test_paths_goqctl_cannot_write_are_refused_at_once(tmp: Path) -> None:
    with pytest.raises(CsvError, match="No such file or directory"):
        CsvOut(str(tmp / "missing" / "out.csv"), "utf-8-sig", ("sku",))
    with pytest.raises(CsvError, match="is a directory"):
        CsvOut(str(tmp), "utf-8-sig", ("sku",))
    with pytest.raises(CsvError, match="unknown encoding 'latin-1'"):
        CsvOut(str(tmp / "x.csv"), "latin-1", ("sku",))
    assert os.listdir(tmp) == []


def test_dash_writes_the_bytes_to_stdout_only_when_complete(
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    with pytest.raises(CsvError), CsvOut("-", "cp932", ("name",)) as out:
        out.write([("ok",), ("😀",)])
        out.commit()
    assert capsysbinary.readouterr().out == b""
    with CsvOut("-", "utf-8-sig", ("name",)) as out:
        out.write([("商品",)])
        out.commit()
    assert capsysbinary.readouterr().out == "\ufeffname\r\n商品\r\n".encode()


# --------------------------------------------------------------------------------------
# goqctl --csv against a real daemon
# --------------------------------------------------------------------------------------

MANY = 1_200


@pytest.fixture
def shop(monkeypatch: pytest.MonkeyPatch) -> Iterator[Shop]:
    """The three products of test_diff_reflect and 1,200 more (one named ♥ハート), and
    goqctl asking for 500 rows a request, so a --csv needs several."""
    monkeypatch.setattr(goqctl_module, "CSV_PAGE", 500)
    rows = ["listing_key,sku_code,name,quantity"]
    rows += [f"p{i:04d}/1,P-{i:04d},商品 {i},{i % 7}" for i in range(MANY - 1)]
    rows.append("heart/1,HEART,♥ハート,1")
    with open_shop(three_products()) as s:
        s.call(p.Import(store="base"))
        s.call(p.Import(store="other"))
        report = s.call(p.Import(store="base", csv_text="\n".join(rows) + "\n"), timeout=60)
        assert isinstance(report, m.LinkReport) and report.created == MANY
        s.wait(s.settled, "the imports' pushes")
        yield s


def test_products_stock_and_listings_csv_hold_every_row(
    shop: Shop, tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    products = tmp / "products.csv"
    assert shop.goqctl("products", "--csv", str(products)) == 0
    assert capsys.readouterr().out.strip() == (
        f"{MANY + 3} row(s) written to {products} (utf-8-sig)"
    )
    data = products.read_bytes()
    assert data.startswith(b"\xef\xbb\xbf")
    rows = read_csv(data, "utf-8-sig")
    assert rows[0] == ["sku", "name", "total", "held", "count_known", "listings", "first_store"]
    assert len(rows) == MANY + 4
    assert rows[1:4] == [
        ["A", "Tシャツ 赤", "10", "0", "yes", "2", "base"],
        ["B", "マグカップ", "10", "0", "yes", "2", "base"],
        ["C", "タオル", "10", "0", "yes", "2", "base"],
    ]
    assert ["P-0700", "商品 700", str(700 % 7), "0", "yes", "1", "base"] in rows

    stock = tmp / "stock.csv"
    assert shop.goqctl("stock", "list", "--csv", str(stock), "--encoding", "utf-8-sig") == 0
    srows = read_csv(stock.read_bytes(), "utf-8-sig")
    assert srows[0] == ["sku", "name", "quantity", "held", "shown"]
    assert len(srows) == MANY + 4 and srows[1] == ["A", "Tシャツ 赤", "10", "0", "10"]

    capsys.readouterr()
    assert shop.goqctl("listings", "base", "--csv", "-") == 0
    captured = capsys.readouterr()
    # goqctl writes bytes to stdout's buffer; pytest's text capture decodes them.
    assert captured.out.startswith("\ufeffstore,listing_key,")
    lrows = list(csv.reader(io.StringIO(captured.out.lstrip("\ufeff"), newline="")))
    assert lrows[0][:6] == ["store", "listing_key", "sku", "link_code", "link_state", "name"]
    assert len(lrows) == MANY + 4
    assert f"{MANY + 3} row(s) written to standard output" in captured.err


def test_listings_csv_keeps_the_filters(shop: Shop, tmp: Path) -> None:
    target = tmp / "linked.csv"
    assert shop.goqctl("listings", "other", "--state", "unlinked", "--csv", str(target)) == 0
    rows = read_csv(target.read_bytes(), "utf-8-sig")
    assert [(r[1], r[4]) for r in rows[1:]] == [("x/2", "unlinked")]
    assert shop.goqctl("listings", "base", "--search", "p-070", "--csv", str(target)) == 0
    keys = [r[1] for r in read_csv(target.read_bytes(), "utf-8-sig")[1:]]
    assert keys == [f"p{i:04d}/1" for i in range(700, 710)]


def test_diff_csv_has_the_status_columns(shop: Shop, tmp: Path) -> None:
    make_one_of_each(shop)
    target = tmp / "diff.csv"
    assert shop.goqctl("diff", "other", "--csv", str(target), "--encoding", "cp932") == 0
    assert read_csv(target.read_bytes(), "cp932") == [
        ["store", "listing_key", "sku", "status", "goqd", "mall", "pending", "held", "attrs"],
        ["other", "a/2", "A", "differs", "8", "10", "", "0", ""],
        ["other", "b/2", "B", "held", "9", "10", "", "1", ""],
        ["other", "c/2", "C", "pending", "5", "10", "5", "0", ""],
    ]


def test_an_unencodable_name_refuses_the_csv_and_keeps_the_old_file(
    shop: Shop, tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp / "products.csv"
    target.write_text("old\n")
    assert shop.goqctl("products", "--csv", str(target), "--encoding", "cp932") == 1
    err = capsys.readouterr().err
    assert "(sku 'HEART'), column name: '♥' (U+2665) has no Shift_JIS (cp932) code" in err
    assert "--encoding utf-8-sig" in err
    assert target.read_text() == "old\n" and os.listdir(tmp) == ["products.csv"]


def test_an_unwritable_csv_path_is_refused_before_the_daemon_does_anything(
    shop: Shop, tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_one_of_each(shop)
    assert shop.goqctl("diff", "other", "--csv", str(tmp / "no" / "diff.csv")) == 1
    assert "cannot write" in capsys.readouterr().err
    # No diff ran (none was recorded), and nothing was written anywhere.
    assert shop.goqctl("reflect", "other", "--differing") == 1
    assert "no diff yet" in capsys.readouterr().err
    assert os.listdir(tmp) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("products", "--csv", "F", "--limit", "10"), "--csv writes every row"),
        (("products", "--encoding", "cp932"), "--encoding is for the --csv file"),
        (("--json", "listings", "base", "--csv", "F"), "give one of them"),
        (("stock", "list", "--csv", ""), "--csv needs a file name"),
        (("products", "--csv", "F", "--encoding", "utf-16"), "invalid choice: 'utf-16'"),
    ],
)
def test_csv_usage_errors_exit_2_and_write_nothing(
    tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    message: str,
) -> None:
    monkeypatch.chdir(tmp)
    # Refused before any daemon is asked: there is none at this socket.
    assert goqctl_module.main(["--socket", str(tmp / "none.sock"), *args]) == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp) == []
