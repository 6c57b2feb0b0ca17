"""`goqctl diff` reports listings whose mall attributes (Amazon's lead time and restock
date, Yahoo's 超過購入) differ from what goqd pushes with every count, and `reflect
--differing` puts goqd's back.

A real daemon runs a Rakuten base store, an Amazon, a Yahoo and a second Rakuten store,
each against its simulator on loopback HTTP (the rig of tests/helpers/shop.py);
goqctl talks to it over the real control socket.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator, Sequence
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import trio

from goqd import messages as m
from goqd.control import protocol as p
from goqd.errors import MallProtocolError
from goqd.malls.base import GuardedAdapter, MallLimits
from goqd.sim.amazon import SimAmazon
from goqd.sim.rakuten import SimRakuten
from goqd.sim.yahoo import SimYahoo
from tests.helpers.shop import Shop, open_shop

LIMITS = MallLimits(push_batch=10, read_batch=10, min_poll_interval=60)


def malls() -> dict[str, Any]:
    base = SimRakuten(shop_id="500001", clock=time.time, seed=1)
    other = SimRakuten(shop_id="500002", clock=time.time, seed=2)
    amazon = SimAmazon(shop_id="A2SELLERJP0001", clock=time.time, seed=3)
    yahoo = SimYahoo(shop_id="mystore", clock=time.time, seed=4)
    for code in ("A", "B"):
        base.add_listing(f"{code.lower()}/1", link_code=code, name=f"商品 {code}", quantity=10)
        other.add_listing(f"{code.lower()}/2", link_code=code, name=f"商品 {code}", quantity=10)
        yahoo.add_item(code, name=f"商品 {code}", quantity=10, allow_overdraft=False)
    amazon.add_item("A", name="商品 A", quantity=10, lead_time_days=3, restock_date="2027-01-15")
    amazon.add_item("B", name="商品 B", quantity=10)  # no lead time: goqd takes in none
    return {"base": base, "other": other, "amazon": amazon, "yahoo": yahoo}


@pytest.fixture
def shop() -> Iterator[Shop]:
    with open_shop(malls()) as s:
        for store in ("base", "other", "amazon", "yahoo"):
            s.call(p.Import(store=store), timeout=60)
        s.wait(s.settled, "the imports' pushes")
        yield s


def rows(shop: Shop, store: str) -> list[tuple[str, str, int, int | None, tuple[Any, ...]]]:
    report = shop.call(p.Diff(store=store), timeout=60)
    assert isinstance(report, p.DiffReport) and report.checked == 2
    return [
        (
            r.listing_key,
            r.status,
            r.ledger_quantity,
            r.mall_quantity,
            tuple((a.name, a.ledger, a.mall) for a in r.attrs_differ),
        )
        for r in report.rows
    ]


def goqctl_out(shop: Shop, *args: str) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert shop.goqctl(*args) == 0
    return buf.getvalue()


def test_attributes_changed_at_the_mall_show_in_diff_and_reflect_puts_goqds_back(
    shop: Shop, tmp_path: Path
) -> None:
    amazon: SimAmazon = shop.sims["amazon"]
    yahoo: SimYahoo = shop.sims["yahoo"]
    assert rows(shop, "amazon") == [] and rows(shop, "yahoo") == []
    # An operator edits the listings at the malls, counts untouched.
    amazon.listings["A"].attrs["lead_time_to_ship_max_days"] = "7"
    # goqd holds no lead time for B: it sends none, so the mall's own is no difference.
    amazon.listings["B"].attrs["lead_time_to_ship_max_days"] = "9"
    yahoo.listings["A"].allow_overdraft = True

    assert rows(shop, "amazon") == [("A", "attrs", 10, 10, (("lead_time", 3, 7),))]
    assert rows(shop, "yahoo") == [("A", "attrs", 10, 10, (("allow_overdraft", False, True),))]

    out = goqctl_out(shop, "diff", "amazon")
    assert "amazon: 2 linked listing(s) checked, 0 差異 (not 差異: 1 attributes differ)" in out
    lines = out.splitlines()
    assert lines[1].split()[-2:] == ["ATTRS", "(goqd→mall)"]
    want = ["A", "A", "10", "10", "-", "-", "attributes", "differ", "lead_time", "3→7"]
    assert lines[2].split() == want
    assert "goqctl reflect amazon --differing" in out
    csv_path = tmp_path / "diff.csv"
    goqctl_out(shop, "diff", "yahoo", "--csv", str(csv_path))
    assert csv_path.read_text(encoding="utf-8-sig").splitlines() == [
        "store,listing_key,sku,status,goqd,mall,pending,held,attrs",
        "yahoo,A,A,attrs,10,10,,0,allow_overdraft off→on",
    ]

    # reflect --differing pushes count and attributes; the next diff is clean.
    for store in ("amazon", "yahoo"):
        assert "1 listing(s) queued" in goqctl_out(shop, "reflect", store, "--differing")
    shop.wait(shop.settled, "the reflected pushes")
    shop.wait(lambda: amazon.lead_time("A") == 3, "Amazon applying the patch")
    assert yahoo.listings["A"].allow_overdraft is False
    assert amazon.restock_date("A") == "2027-01-15"
    assert rows(shop, "amazon") == [] and rows(shop, "yahoo") == []


def test_a_count_and_an_attribute_both_changed_is_a_差異_with_the_attribute(shop: Shop) -> None:
    amazon: SimAmazon = shop.sims["amazon"]
    amazon.listings["A"].quantity = 4
    amazon.listings["A"].attrs["restock_date"] = "2027-02-01"
    assert rows(shop, "amazon") == [
        ("A", "differs", 10, 4, (("restock_date", "2027-01-15", "2027-02-01"),))
    ]


def test_rakuten_listings_are_compared_by_count_as_before(shop: Shop) -> None:
    other: SimRakuten = shop.sims["other"]
    other.listings["a/2"].quantity = 4
    assert rows(shop, "other") == [("a/2", "differs", 10, 4, ())]
    out = goqctl_out(shop, "diff", "other")
    assert "ATTRS" not in out  # no mall attribute to show: no empty column
    assert out.splitlines()[2].split() == ["a/2", "A", "10", "4", "-", "-", "差異"]


# --------------------------------------------------------------------------------------
# The guard: read_listings fails one call like read_stock, and serves every mall
# --------------------------------------------------------------------------------------


class CountsOnly:
    """An adapter of a mall without attributes: ``read_stock`` only."""

    mall = "rakuten"
    limits = LIMITS

    async def read_stock(self, listing_keys: Sequence[str]) -> dict[str, int | None]:
        return {key: 5 for key in listing_keys} | {"unlimited": None}


class Broken:
    mall = "amazon"
    limits = LIMITS

    def __init__(self, answer: dict[str, m.MallCount] | None) -> None:
        self.answer = answer

    async def read_listings(self, listing_keys: Sequence[str]) -> dict[str, m.MallCount]:
        if self.answer is None:
            raise KeyError("fulfillment_availability")  # a response nobody expected
        return self.answer


def test_the_guard_reads_counts_of_malls_without_attributes_and_refuses_broken_answers() -> None:
    async def main() -> None:
        plain = GuardedAdapter(CountsOnly(), store="r", mall="rakuten")  # type: ignore[arg-type]
        assert await plain.read_listings(["x"]) == {
            "x": m.MallCount(quantity=5),
            "unlimited": m.MallCount(quantity=None),
        }
        for answer, what in (
            (None, "could not be read (KeyError)"),
            ({"x": m.MallCount(quantity=10**13)}, "x: quantity"),
            (
                {"x": m.MallCount(quantity=1, attrs=m.ListingAttrs(lead_time_days=-1))},
                "x: lead time -1",
            ),
        ):
            guarded = GuardedAdapter(Broken(answer), store="a", mall="amazon")  # type: ignore[arg-type]
            with pytest.raises(MallProtocolError, match=r"\] read_listings: ") as err:
                await guarded.read_listings(["x"])
            assert what in str(err.value)

    trio.run(main)


def test_yahoo_overdraft_on_at_the_mall_differs_though_goqd_holds_no_value() -> None:
    # Yahoo's pushes send 超過購入 "no value" as off: the next push would turn the mall's
    # "on" off, so diff must say so. A lead time goqd does not hold is never pushed.
    from goqd.control.reconcile import _attrs_differ

    found = _attrs_differ(m.ListingAttrs(), m.ListingAttrs(allow_overdraft=True, lead_time_days=5))
    assert [(d.name, d.ledger, d.mall) for d in found] == [("allow_overdraft", False, True)]
    assert _attrs_differ(m.ListingAttrs(), m.ListingAttrs(allow_overdraft=False)) == ()
    assert _attrs_differ(m.ListingAttrs(), m.ListingAttrs()) == ()
