"""差異商品 and 反映 at scale: `goqctl diff` tells a push in flight and held units apart
from a real difference, `goqctl reflect --differing` pushes exactly what the last diff
found (kept in the ledger across restarts), and `goqctl listings` filters by link state
and searches.

The ledger-level tests use a real SQLite file; the rest run a real daemon with two
Rakuten simulators on loopback HTTP in a thread of its own, and goqctl (which runs its
own trio loop) in the test's thread over the real control socket.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from goqd import messages as m
from goqd.control import protocol as p
from goqd.control.client import RemoteError
from goqd.errors import LedgerError
from goqd.ledger import Ledger, open_db, queries
from tests.helpers.shop import (
    Shop,
    make_one_of_each,
    open_shop,
    three_products,
)

# --------------------------------------------------------------------------------------
# Ledger level
# --------------------------------------------------------------------------------------


def ask(ledger: Ledger, msg: m.LedgerRequest) -> Any:
    reply = ledger.apply_batch([msg]).replies[0]
    if isinstance(reply, Exception):
        raise reply
    return reply


def listing(key: str, code: str, qty: int = 10, name: str = "") -> m.MallListing:
    return m.MallListing(listing_key=key, link_code=code, name=name or f"name {code}", quantity=qty)


def outbox(ledger: Ledger, store: str) -> dict[str, int]:
    return {p.listing_key: p.quantity for p in queries.outbox(ledger.conn, store)}


def seeded(path: str) -> Ledger:
    """Products A, B, C (10 each) from the base store; store s has a1, b1, c1 linked to
    them, u1 unlinked with a parked order line, and two listings of D (ambiguous)."""
    ledger = Ledger(open_db(path), now=time.time)
    ask(
        ledger,
        m.ImportListings(
            store="base",
            base=True,
            listings=(
                listing("A-base", "A", name="Tシャツ 赤"),
                listing("B-base", "B", name="マグカップ"),
                listing("C-base", "C", name="100% cotton_towel"),
                listing("D-base", "D"),
            ),
        ),
    )
    ask(
        ledger,
        m.ImportListings(
            store="s",
            listings=(
                listing("a1", "A", name="Tシャツ 赤"),
                listing("b1", "B", name="マグカップ"),
                listing("c1", "C", name="100% cotton_towel"),
                listing("u1", "NOPE", name="未登録の商品"),
                listing("d1", "D"),
                listing("d2", "d"),
            ),
            rules=("casefold",),
        ),
    )
    ask(
        ledger,
        m.OrderLinesSeen(
            store="s",
            lines=(
                m.OrderLine(
                    order_id="o1", line_id="1", listing_key="u1", quantity=1, updated_at=1.0
                ),
            ),
        ),
    )
    # The link and import pushes went out: nothing is pending.
    ask(
        ledger,
        m.PushesDone(
            store="s",
            outcomes=tuple(
                m.PushOutcome(
                    listing_key=p.listing_key, version=p.version, accepted=True, quantity=p.quantity
                )
                for p in queries.outbox(ledger.conn, "s")
            ),
        ),
    )
    ledger.conn.execute("DELETE FROM outbox")
    return ledger


@pytest.fixture
def ledger_path(sock_dir: str) -> str:
    return os.path.join(sock_dir, "ledger.db")


def keys(ledger: Ledger, **kw: Any) -> list[str]:
    page = ask(ledger, m.ListListings(store="s", **kw))
    return [x.listing_key for x in page.listings]


def test_listings_filter_by_link_state_parked_and_search(ledger_path: str) -> None:
    ledger = seeded(ledger_path)
    assert keys(ledger) == ["a1", "b1", "c1", "d1", "d2", "u1"]
    assert keys(ledger, state="linked") == ["a1", "b1", "c1"]
    assert keys(ledger, state="unlinked") == ["u1"]
    assert keys(ledger, state="ambiguous") == ["d1", "d2"]
    assert keys(ledger, state="parked") == ["u1"]
    # Search: listing key, the listing's code, its product's SKU, its name; ASCII
    # letters in any case; % and _ are literal, not LIKE wildcards.
    assert keys(ledger, search="B1") == ["b1"]
    assert keys(ledger, search="nope") == ["u1"]
    assert keys(ledger, search="マグ") == ["b1"]
    assert keys(ledger, search="100%") == ["c1"]
    assert keys(ledger, search="t_n") == []  # as a LIKE pattern it matches "cotton"
    assert keys(ledger, search="n_t") == ["c1"]
    assert keys(ledger, search="%") == ["c1"]
    assert keys(ledger, state="ambiguous", search="d2") == ["d2"]
    # Filters apply before the limit: a page is full while more match.
    assert keys(ledger, state="linked", limit=2) == ["a1", "b1"]
    assert keys(ledger, state="linked", after="b1", limit=2) == ["c1"]
    assert keys(ledger, state="parked", after="u1") == []
    # Given keys, only those (a filter still applies to them).
    assert keys(ledger, keys=("c1", "a1", "zz")) == ["a1", "c1"]
    assert keys(ledger, state="parked", keys=("a1",)) == []
    assert keys(ledger, state="parked", keys=("a1", "u1")) == ["u1"]


def test_listing_records_carry_the_pending_push_product_count_and_parked_lines(
    ledger_path: str,
) -> None:
    ledger = seeded(ledger_path)
    ask(ledger, m.SetStock(sku="A", quantity=4))
    ask(
        ledger,
        m.SetListingAttrs(store="s", listing_key="b1", lead_time_days=3, restock_date="2027-01-05"),
    )
    page = ask(ledger, m.ListListings(store="s"))
    by_key = {x.listing_key: x for x in page.listings}
    a1, b1, c1, u1 = by_key["a1"], by_key["b1"], by_key["c1"], by_key["u1"]
    assert (a1.pending_quantity, a1.pending_sent, a1.product_total) == (4, False, 4)
    assert (b1.pending_quantity, b1.attrs.lead_time_days, b1.attrs.restock_date) == (
        10,
        3,
        "2027-01-05",
    )
    assert (c1.pending_quantity, c1.product_total, c1.parked) == (None, 10, 0)
    assert (u1.sku, u1.product_total, u1.parked) == (None, None, 1)
    ask(ledger, m.TakePushes(store="s", limit=10))  # handed to the store: in flight
    again = ask(ledger, m.ListListings(store="s", keys=("a1", "zz")))
    assert [(x.listing_key, x.pending_sent) for x in again.listings] == [("a1", True)]


def test_an_unknown_listing_state_is_refused_and_changes_nothing(ledger_path: str) -> None:
    ledger = seeded(ledger_path)
    before = queries.listings(ledger.conn)
    with pytest.raises(LedgerError, match="unknown listing state 'bogus'"):
        ask(ledger, m.ListListings(store="s", state="bogus"))
    assert queries.listings(ledger.conn) == before


def test_reflect_differing_needs_a_diff_first(ledger_path: str) -> None:
    ledger = seeded(ledger_path)
    with pytest.raises(LedgerError, match=r"no diff yet: run `goqctl diff s` first"):
        ask(ledger, m.ReflectDiffering(store="s", request_id="r1"))
    assert outbox(ledger, "s") == {}


def test_reflect_differing_pushes_exactly_the_last_diff_across_a_reopened_ledger(
    ledger_path: str,
) -> None:
    ledger = seeded(ledger_path)
    found = ask(ledger, m.DiffFound(store="s", listing_keys=("a1", "c1", "a1"), checked=3))
    assert found.changed == 2
    # A later diff replaces the earlier one; a diff of another store is its own.
    ask(ledger, m.DiffFound(store="s", listing_keys=("a1", "b1"), checked=3))
    ask(ledger, m.DiffFound(store="base", listing_keys=("A-base",), checked=4))
    ledger.conn.close()

    ledger = Ledger(open_db(ledger_path), now=time.time)
    ask(ledger, m.Unlink(store="s", listing_key="b1"))  # no longer linked: left out
    ledger.conn.execute("DELETE FROM outbox")
    ask(ledger, m.SetStock(sku="A", quantity=7))
    ledger.conn.execute("DELETE FROM outbox")  # the SetStock's push went out
    result = ledger.apply_batch([m.ReflectDiffering(store="s", request_id="r2")])
    (done,) = result.replies
    assert isinstance(done, m.Done)
    # a1 goes out with goqd's count now (7), whatever it showed at the diff; b1 (unlinked
    # since) and the listings the diff did not find stay as they are.
    assert outbox(ledger, "s") == {"a1": 7}
    assert outbox(ledger, "base") == {}
    assert done.changed == 1
    assert "the 2 listing(s) the diff of s at" in done.detail
    assert "1 left out: no longer linked" in done.detail
    assert result.woken == {"s"}
    # The same request id again: answered, not applied twice.
    ledger.conn.execute("DELETE FROM outbox")
    again = ask(ledger, m.ReflectDiffering(store="s", request_id="r2"))
    assert again == done and outbox(ledger, "s") == {}
    # An empty diff is a diff: reflect --differing then pushes nothing, and says so.
    ask(ledger, m.DiffFound(store="s", listing_keys=(), checked=3))
    empty = ask(ledger, m.ReflectDiffering(store="s", request_id="r3"))
    assert empty.changed == 0 and outbox(ledger, "s") == {}


class Counted(msgspec.Struct):
    reply: Any
    steps: int


def ask_counting(ledger: Ledger, msg: m.LedgerRequest) -> Counted:
    """``msg``'s reply and about how many SQLite VM instructions applying it took."""
    ticks = 0

    def tick() -> int:
        nonlocal ticks
        ticks += 1
        return 0  # go on

    ledger.conn.set_progress_handler(tick, 100)
    try:
        reply = ask(ledger, msg)
    finally:
        ledger.conn.set_progress_handler(None, 0)
    return Counted(reply=reply, steps=ticks * 100)


def as_schema_7(path: str) -> None:
    """Make the ledger at ``path`` what schema 7 wrote: undo migration 8."""
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in (
        "DROP INDEX listings_by_state",
        "DROP TABLE diff_listings",
        "DROP TABLE diff_runs",
        "PRAGMA user_version=7",
    ):
        conn.execute(statement)
    conn.close()


def snapshot(path: str) -> dict[str, list[Any]]:
    with queries.open_read_only(path) as conn:
        return {
            table: queries.table(conn, table)
            for table in ("products", "listings", "outbox", "parked_lines", "errors")
        }


def test_a_schema_7_ledger_with_data_migrates_and_answers_the_new_requests(
    ledger_path: str,
) -> None:
    seeded(ledger_path).conn.close()
    as_schema_7(ledger_path)
    before = snapshot(ledger_path)

    ledger = Ledger(open_db(ledger_path), now=time.time)
    assert queries.schema_version(ledger.conn) == 8
    assert snapshot(ledger_path) == before  # nothing of the data changed
    # The new index serves the old rows, and there is no diff until one runs.
    assert keys(ledger, state="ambiguous") == ["d1", "d2"]
    assert ask(ledger, m.CountListings(store="s")).count == 3
    with pytest.raises(LedgerError, match="no diff yet"):
        ask(ledger, m.ReflectDiffering(store="s"))
    ask(ledger, m.DiffFound(store="s", listing_keys=("a1",), checked=3))
    assert ask(ledger, m.ReflectDiffering(store="s")).changed == 1


def test_a_crash_during_migration_8_leaves_schema_7_and_the_next_start_migrates(
    ledger_path: str,
) -> None:
    seeded(ledger_path).conn.close()
    as_schema_7(ledger_path)
    before = snapshot(ledger_path)
    # SIGKILL once every statement of migration 8 ran, before its COMMIT.
    child = (
        "import os, signal, sys\n"
        "from goqd.ledger import schema\n"
        "real = schema._split_sql\n"
        "def killing(script):\n"
        "    yield from real(script)\n"
        "    if 'diff_runs' in script:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "schema._split_sql = killing\n"
        "schema.open_db(sys.argv[1])\n"
    )
    done = subprocess.run([sys.executable, "-c", child, ledger_path], timeout=60, check=False)
    assert done.returncode == -signal.SIGKILL

    with queries.open_read_only(ledger_path) as conn:
        tables = queries.schema_names(conn)
        assert queries.schema_version(conn) == 7
    assert not tables & {"diff_runs", "diff_listings", "listings_by_state"}
    assert snapshot(ledger_path) == before

    ledger = Ledger(open_db(ledger_path), now=time.time)
    assert queries.schema_version(ledger.conn) == 8
    assert keys(ledger, state="unlinked") == ["u1"]
    assert snapshot(ledger_path) == before


def test_listing_filters_and_reflect_use_indexes_at_100000_listings(ledger_path: str) -> None:
    """100,000 listings of one store: the filters read their own index ranges, and a
    reflect of a 100,000-listing diff is one statement (no query scans the store)."""
    from tests.bench_listings_scale import STORE, build

    ledger = build(ledger_path, 100_000)
    ambiguous = ask(ledger, m.ListListings(store=STORE, state="ambiguous", limit=10_000))
    assert len(ambiguous.listings) == 20
    assert all(x.link_state == "ambiguous" for x in ambiguous.listings)
    parked = ask(ledger, m.ListListings(store=STORE, state="parked", limit=10_000))
    assert [x.parked for x in parked.listings] == [1] * 100
    linked = ask(ledger, m.ListListings(store=STORE, state="linked", after="item-099990"))
    assert [x.listing_key for x in linked.listings] == [f"item-0999{i}" for i in range(91, 100)]
    every = tuple(f"item-{i:06d}" for i in range(100_000))
    ask(ledger, m.DiffFound(store=STORE, listing_keys=every, checked=100_000))
    statements: list[str] = []
    ledger.conn.set_trace_callback(statements.append)
    ask(ledger, m.ListListings(store=STORE, state="ambiguous"))
    ask(ledger, m.ListListings(store=STORE, state="parked"))
    done = ask(ledger, m.ReflectDiffering(store=STORE))
    ledger.conn.set_trace_callback(None)
    assert done.changed == 100_000 - 100 - 20  # the unlinked and ambiguous left out
    # A small diff, and a product added by hand, read a few rows, not the store: a walk
    # of its 100,000 listings is millions of SQLite VM steps, these a few thousand.
    few = ("item-000001", "item-050001", "item-099999")
    ask(ledger, m.DiffFound(store=STORE, listing_keys=few, checked=100_000))
    small = ask_counting(ledger, m.ReflectDiffering(store=STORE))
    assert (small.reply.changed, small.steps < 20_000) == (3, True), small.steps
    for rules in ((), ("casefold",)):
        added = ask_counting(
            ledger, m.AddProduct(sku=f"NEW-{len(rules)}", quantity=1, stores=((STORE, rules),))
        )
        assert (added.reply.linked, added.steps < 20_000) == ((), True), (rules, added.steps)
    plans = [
        row[3]
        for sql in statements
        if sql.lstrip().upper().startswith(("SELECT", "INSERT"))
        for row in ledger.conn.execute("EXPLAIN QUERY PLAN " + sql)
    ]
    assert any("listings_by_state" in x for x in plans), plans
    # Scans only of a subquery's rows (pk) or a JSON argument, never of a table.
    scans = [x for x in plans if x.startswith("SCAN")]
    assert all(x.split()[1] in ("pk", "json_each") for x in scans), plans


# --------------------------------------------------------------------------------------
# A real daemon in a thread of its own, goqctl in the test's thread
# --------------------------------------------------------------------------------------


def raw_request(path: str, request: dict[str, Any]) -> p.Err:
    """Send ``request`` as the wire carries it (no client-side checks); the refusal."""
    body = msgspec.json.encode({"v": p.PROTOCOL_VERSION, "id": "raw-1", "request": request})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(p.HEADER.pack(len(body)) + body)
        data = b""
        while (
            len(data) < p.HEADER.size
            or len(data) < p.HEADER.size + p.HEADER.unpack(data[: p.HEADER.size])[0]
        ):
            chunk = sock.recv(65536)
            assert chunk, "the daemon closed the connection without a reply"
            data += chunk
    reply = p.decode_reply(data[p.HEADER.size :]).reply
    assert isinstance(reply, p.Err), reply
    return reply


@pytest.fixture
def shop() -> Iterator[Shop]:
    with open_shop(three_products()) as s:
        s.call(p.Import(store="base"))
        s.call(p.Import(store="other"))
        s.wait(s.settled, "the import's pushes")
        yield s


def test_diff_reports_pending_pushes_and_held_units_apart_from_differences(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    make_one_of_each(shop)
    report = shop.call(p.Diff(store="other"), timeout=60)
    assert isinstance(report, p.DiffReport) and report.checked == 3
    got = [
        (r.listing_key, r.status, r.ledger_quantity, r.mall_quantity, r.pending_quantity, r.held)
        for r in report.rows
    ]
    assert got == [
        ("a/2", "differs", 8, 10, None, 0),
        ("b/2", "held", 9, 10, None, 1),
        ("c/2", "pending", 5, 10, 5, 0),
    ]
    capsys.readouterr()
    assert shop.goqctl("diff", "other") == 0
    out = capsys.readouterr().out
    assert "other: 3 linked listing(s) checked, 1 差異 (not 差異: 1 push pending, 1 held)" in out
    lines = out.splitlines()
    assert lines[1].split() == ["LISTING", "SKU", "GOQD", "MALL", "HELD", "PUSHING", "STATUS"]
    assert lines[2].split() == ["a/2", "A", "8", "10", "-", "-", "差異"]
    assert lines[3].split() == ["b/2", "B", "9", "10", "1", "-", "held"]
    assert lines[4].split() == ["c/2", "C", "5", "10", "-", "5", "push", "pending"]
    assert "goqctl reflect other --differing" in out


def test_reflect_differing_queues_exactly_what_the_last_diff_found(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    make_one_of_each(shop)
    assert shop.goqctl("reflect", "other", "--differing") == 1
    err = capsys.readouterr().err
    assert "has no diff yet: run `goqctl diff other` first" in err
    assert shop.goqctl("diff", "other") == 0
    capsys.readouterr()
    assert shop.goqctl("reflect", "other", "--differing") == 0
    out = capsys.readouterr().out
    assert "1 listing(s) queued for a push: the 1 listing(s) the diff of other at" in out
    # The store is paused, so the queue shows what was queued: a/2 (the 差異) beside
    # c/2's push from before; b/2 (held, not 差異) was not queued.
    pending = shop.call(m.ListListings(store="other", state="linked"))
    assert {x.listing_key: x.pending_quantity for x in pending.listings} == {
        "a/2": 8,
        "b/2": None,
        "c/2": 5,
    }


def test_the_last_diff_survives_a_daemon_restart(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    make_one_of_each(shop)
    other = shop.sims["other"]
    assert shop.goqctl("diff", "other") == 0
    pushes_to_b = len(other.listings["b/2"].set_history)
    shop.restart_daemon()  # a new daemon on the same ledger; its stores run (not paused)
    capsys.readouterr()
    assert shop.goqctl("reflect", "other", "--differing") == 0
    assert "1 listing(s) queued" in capsys.readouterr().out
    shop.wait(shop.settled, "the pushes after the restart")
    assert (other.stock("a/2"), other.stock("c/2")) == (8, 5)
    assert other.stock("b/2") == 10 and len(other.listings["b/2"].set_history) == pushes_to_b
    report = shop.call(p.Diff(store="other"), timeout=60)
    assert [(r.listing_key, r.status) for r in report.rows] == [("b/2", "held")]


def test_reflect_arguments_are_one_of_listings_all_or_differing(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    for args in (("a/2", "--differing"), ("--all", "--differing"), ()):
        assert shop.goqctl("reflect", "other", *args) == 2
        assert "one of them" in capsys.readouterr().err
    # Sent past goqctl's own checks: the daemon refuses it too, and queues nothing.
    err = raw_request(
        shop.socket,
        {"type": "reflect", "store": "other", "listing_keys": ["a/2"], "differing": True},
    )
    assert err.code == "bad_request" and "not both" in err.message
    assert shop.settled()


def test_listings_filter_search_and_show_push_attributes(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    other = shop.sims["other"]
    other.place_order([("x/2", 1)])
    shop.call(p.PollNow(store="other"))
    shop.wait(lambda: shop.call(p.Status()).ledger.parked == 1, "the order line of x/2 parked")
    assert (
        shop.goqctl(
            "listing",
            "set",
            "other",
            "a/2",
            "--lead-time",
            "3",
            "--restock-date",
            "2027-01-05",
            "--allow-overdraft",
            "yes",
        )
        == 0
    )
    capsys.readouterr()

    def listed(*args: str) -> list[list[str]]:
        """The table's header and rows (the → hints after it left out)."""
        assert shop.goqctl("listings", "other", *args) == 0
        lines = capsys.readouterr().out.splitlines()
        return [line.split() for line in lines if not line.startswith("→")]

    def hints(*args: str) -> list[str]:
        assert shop.goqctl("listings", "other", *args) == 0
        return [x for x in capsys.readouterr().out.splitlines() if x.startswith("→")]

    table = listed()
    assert table[0] == [
        "LISTING",
        "SKU",
        "LINK",
        "NAME",
        "PUSHED",
        "SEEN",
        "PENDING",
        "PARKED",
        "LEAD",
        "TIME",
        "RESTOCK",
        "超過購入",
    ]
    a_row = next(r for r in table if r[0] == "a/2")
    assert a_row[-3:] == ["3", "2027-01-05", "yes"]
    assert [r[0] for r in listed("--state", "unlinked")[1:]] == ["x/2"]
    parked = listed("--state", "parked")
    assert [(r[0], r[7]) for r in parked[1:]] == [("x/2", "1")]
    assert any("goqctl parked --store other" in x for x in hints("--state", "parked"))
    assert [r[0] for r in listed("--search", "マグ")[1:]] == ["b/2"]
    assert [r[0] for r in listed("--state", "linked", "--search", "c")[1:]] == ["c/2"]
    assert listed("--state", "ambiguous") == [["no", "listings", "match"]]
    # Paging keeps the filter.
    assert hints("--state", "linked", "--limit", "2") == [
        "→ more: goqctl listings other --state linked --limit 2 --after b/2"
    ]


def test_hostile_listing_filters_are_refused_and_change_nothing(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    before = shop.call(m.ListListings(store="other"))
    assert shop.goqctl("listings", "other", "--state", "bogus") == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    assert shop.goqctl("listings", "other", "--search", "x" * 10_000) == 2
    err = capsys.readouterr().err
    assert "invalid argument" in err and "search" in err and len(err) < 1000
    # Past goqctl: the daemon's decoder refuses both, naming the field.
    err = raw_request(shop.socket, {"type": "listings", "store": "other", "state": "bogus"})
    assert err.code == "bad_request" and "$.request.state" in err.message
    with pytest.raises(RemoteError, match=r"bad_request.*search"):
        shop.call(m.ListListings(store="other", search="y" * 201))
    assert shop.call(m.ListListings(store="other")) == before
