"""Errors an operator can work with: episodes that heal are resolved (kept in history),
open errors are filtered and paged, every code goqd records is one the guide documents
(the mall's own code beside it), and clearing a level-9 error resumes the store.

Ledger rules run on a real SQLite ledger; the daemon scenarios on the real daemon in
process under the deterministic rig (``tests.helpers.rig.run_dst``: simulated malls,
a simulated clock), over its real control socket.
"""

from __future__ import annotations

import argparse
import random
import re

import pytest
import trio

from goqd import errors as goqd_errors
from goqd import messages as m
from goqd.cli import goqctl
from goqd.control.client import call
from goqd.errors import (
    ERROR_CODES,
    LedgerError,
    MallAuthError,
    MallError,
    MallProtocolError,
    MallRateLimited,
    MallUnavailable,
    recorded_codes,
)
from goqd.ledger import Ledger, open_db, queries
from goqd.sim.rakuten import SimRakuten
from tests.helpers import rig
from tests.helpers.ledger import FakeNow, one
from tests.helpers.paths import ROOT

clock = rig.mock_wall_clock


@pytest.fixture
def now() -> FakeNow:
    now = FakeNow()
    now.t = 1_000.0
    return now


@pytest.fixture
def ledger(now: FakeNow) -> Ledger:
    return Ledger(open_db(":memory:"), now=now)


def record(ledger: Ledger, store: str, code: str, level: int = 8, key: str = "") -> None:
    one(
        ledger,
        m.RecordError(store=store, level=level, code=code, message=f"{code}!", listing_key=key),
    )


def listed(ledger: Ledger, **kw: object) -> list[m.ErrorRecord]:
    reply = one(ledger, m.ListErrors(**kw))  # type: ignore[arg-type]
    assert isinstance(reply, m.ErrorList)
    return list(reply.errors)


# ------------------------------------------------------------------ healing


def test_a_healed_episode_resolves_the_stores_own_level_8_errors_only(
    ledger: Ledger, now: FakeNow
) -> None:
    record(ledger, "ra", "mall_rate_limited")
    record(ledger, "ra", "mall_unavailable")
    record(ledger, "ra", "mall_auth", level=9)  # needs the operator: never healed
    record(ledger, "ra", "listing_rejected", key="k1")  # the listing's own, not the store's
    record(ledger, "rb", "mall_unavailable")  # another store
    now.t = 1_010.0
    done = one(ledger, m.ResolveErrors(store="ra", before=1_005.0))
    assert isinstance(done, m.Done) and done.changed == 2
    assert {(e.store, e.code) for e in listed(ledger)} == {
        ("ra", "mall_auth"),
        ("ra", "listing_rejected"),
        ("rb", "mall_unavailable"),
    }
    healed = [e for e in listed(ledger, store="ra", include_cleared=True) if e.cleared_at]
    assert {(e.code, e.cleared_by, e.cleared_at) for e in healed} == {
        ("mall_rate_limited", "healed", 1_010.0),
        ("mall_unavailable", "healed", 1_010.0),
    }
    # The next failure is a new episode: a new open row, the healed one stays history.
    record(ledger, "ra", "mall_rate_limited")
    assert len(listed(ledger, store="ra", code="mall_rate_limited", include_cleared=True)) == 2


def test_an_error_seen_after_the_recovery_stays_open(ledger: Ledger, now: FakeNow) -> None:
    record(ledger, "ra", "mall_unavailable")
    now.t = 2_000.0
    record(ledger, "ra", "mall_protocol")  # failed again after the store recovered
    one(ledger, m.ResolveErrors(store="ra", before=1_500.0))
    assert [e.code for e in listed(ledger, store="ra")] == ["mall_protocol"]
    one(ledger, m.ResolveErrors(store="ra", codes=("clock_skew",)))
    assert [e.code for e in listed(ledger, store="ra")] == ["mall_protocol"]


def test_a_refused_listing_is_resolved_when_the_mall_takes_its_count(ledger: Ledger) -> None:
    one(ledger, m.UpsertProduct(sku="A", total=4))
    one(ledger, m.UpsertListing(store="ra", listing_key="k1", sku="A"))
    [item] = one(ledger, m.TakePushes(store="ra", limit=5)).items  # type: ignore[union-attr]
    refused = m.PushOutcome(
        listing_key="k1",
        version=item.version,
        accepted=False,
        code="IE1101",
        message="予約商品の在庫は更新できません。",
    )
    one(ledger, m.PushesDone(store="ra", outcomes=(refused,)))
    [error] = listed(ledger, store="ra")
    assert (error.code, error.mall_code, error.listing_key) == ("listing_rejected", "IE1101", "k1")
    assert error.message.startswith("IE1101: 予約商品")
    one(ledger, m.QueuePushes(store="ra", listing_keys=("k1",)))
    [again] = one(ledger, m.TakePushes(store="ra", limit=5)).items  # type: ignore[union-attr]
    ok = m.PushOutcome(listing_key="k1", version=again.version, accepted=True, quantity=4)
    one(ledger, m.PushesDone(store="ra", outcomes=(ok,)))
    assert listed(ledger, store="ra") == []
    [gone] = listed(ledger, store="ra", include_cleared=True)
    assert gone.cleared_by == "resolved"


# ------------------------------------------------------------------ filters and paging


def test_open_errors_filter_by_store_level_and_code_and_page_past_500(ledger: Ledger) -> None:
    for n in range(1_300):
        store = ("ra", "rb")[n % 2]
        level = 9 if n % 50 == 0 else 8
        one(
            ledger,
            m.RecordError(
                store=store,
                level=level,
                code="listing_rejected" if level == 8 else "mall_auth",
                mall_code="IE0003" if n % 3 == 0 else "",
                message="x",
                listing_key=f"k{n:05}",
            ),
        )
    everything = listed(ledger, limit=10_000)
    assert len(everything) == 1_300
    order = [(e.level, e.id) for e in everything]
    assert order == sorted(order, reverse=True)  # level 9 first, then newest
    pages: list[m.ErrorRecord] = []
    after = 0
    while page := listed(ledger, after=after, limit=500):
        assert len(page) <= 500
        pages += page
        after = page[-1].id
    assert [e.id for e in pages] == [e.id for e in everything]
    only = listed(ledger, store="rb", level=8, limit=10_000)
    assert only and all(e.store == "rb" and e.level == 8 for e in only)
    assert len(only) == sum(1 for n in range(1, 1_300, 2) if n % 50)
    by_mall_code = listed(ledger, code="IE0003", limit=10_000)
    assert len(by_mall_code) == len(range(0, 1_300, 3))
    assert all(e.mall_code == "IE0003" for e in by_mall_code)
    assert len(listed(ledger, code="mall_auth", limit=10_000)) == 26
    with pytest.raises(LedgerError, match="no error 999999"):
        listed(ledger, after=999_999)


def test_goqctl_errors_sends_the_filters_and_shows_codes_states_and_the_next_page() -> None:
    parser = goqctl._build_parser()
    args = parser.parse_args(
        ["errors", "--store", "ra", "--level", "8", "--code", "IE0003", "--after", "42"]
    )
    request = goqctl._request_from(args)
    assert request == m.ListErrors(store="ra", level=8, code="IE0003", after=42, limit=500)
    rows = tuple(
        m.ErrorRecord(
            id=41 - n,
            store="ra",
            level=8,
            code="listing_rejected",
            mall_code="IE0003",
            message="refused",
            listing_key=f"k{n}",
            first_seen=0.0,
            last_seen=0.0,
            count=1,
            cleared_at=5.0 if n == 1 else None,
            cleared_by="healed" if n == 1 else "",
        )
        for n in range(3)
    )
    small = m.ListErrors(store="ra", level=8, code="IE0003", include_cleared=True, limit=3)
    text = goqctl._render(m.ErrorList(errors=rows), small, argparse.Namespace())
    assert "listing_rejected (IE0003)" in text
    assert "healed " in text and "open" in text
    assert text.endswith(
        "→ more: goqctl errors --store ra --level 8 --code IE0003 --all --limit 3 --after 39"
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["errors", "--level", "7"])


# ------------------------------------------------------------------ documented codes


def test_mall_codes_are_kept_beside_goqds_documented_code() -> None:
    assert recorded_codes(MallRateLimited("429", code="QuotaExceeded")) == (
        "mall_rate_limited",
        "QuotaExceeded",
    )
    assert recorded_codes(MallUnavailable("maintenance", code="ES05-01")) == (
        "mall_unavailable",
        "ES05-01",
    )
    assert recorded_codes(MallAuthError("expired", code="GA0001")) == ("mall_auth", "GA0001")
    assert recorded_codes(MallProtocolError("bad body")) == ("mall_protocol", "")


def _mall_error_classes() -> list[type[MallError]]:
    found: list[type[MallError]] = []
    todo: list[type[MallError]] = [MallError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


def test_every_code_goqd_records_is_documented_with_its_level_in_both_guides() -> None:
    import goqd.malls.registry  # noqa: F401 - every adapter module and its error classes
    from goqd.ledger import error_rows

    # What the store actor records: goqd's code of each kind of mall failure (the class
    # attribute; a refused listing is a push outcome, and the ledger records it itself).
    recorded = {vars(cls)["code"] for cls in _mall_error_classes() if "code" in vars(cls)}
    recorded.discard("listing_rejected")
    # What anything records with a literal code, and the ledger's named codes.
    source = "\n".join(f.read_text(encoding="utf-8") for f in (ROOT / "goqd").rglob("*.py"))
    recorded |= set(
        re.findall(r'RecordError\((?:(?!RecordError\().){0,300}?\bcode="([a-z_]+)"', source, re.S)
    )
    recorded |= {error_rows.MULTIPLE_LINKS, error_rows.NOT_LINKED}
    assert recorded == ERROR_CODES.keys(), recorded ^ ERROR_CODES.keys()
    for guide in ("operator-guide.md", "operator-guide.ja.md"):
        text = (ROOT / "docs" / guide).read_text(encoding="utf-8")
        table = dict(re.findall(r"^\| `([a-z_]+)` \| ([89]) \|", text, re.M))
        assert {k: int(v) for k, v in table.items()} == ERROR_CODES, guide


def test_the_error_tree_lists_count_unknown() -> None:
    assert "CountUnknown" in (goqd_errors.__doc__ or "")


# ------------------------------------------------------------------ the daemon


def _open(run: rig.Running, store: str) -> list[tuple[int, str, str]]:
    errors = queries.read(run.ledger_path, queries.errors, store, open_only=True)
    return [(e.level, e.code, e.mall_code) for e in errors]


def test_a_throttle_episode_is_healed_when_the_store_recovers() -> None:
    async def body(run: rig.Running) -> None:
        ra = run.fleet.sims["ra"]
        handle = run.daemon.handles["ra"]
        ra.faults.throttle_rate = 1.0
        run.poll_all()
        await rig.wait_for(lambda: handle.state == "degraded", timeout=120, what="degraded")
        [(level, code, mall_code)] = _open(run, "ra")
        assert (level, code) == (8, "mall_rate_limited") and mall_code
        ra.faults.throttle_rate = 0.0
        await rig.wait_for(lambda: handle.state == "running", timeout=600, what="recovery")
        await rig.wait_for(lambda: _open(run, "ra") == [], timeout=60, what="healed")
        history = await call(run.socket, m.ListErrors(store="ra", include_cleared=True))
        assert isinstance(history, m.ErrorList)
        assert {(e.code, e.cleared_by) for e in history.errors} == {("mall_rate_limited", "healed")}

    rig.run_dst(body, seed=81)


def test_clearing_a_level_9_error_resumes_the_store_and_books_what_it_missed() -> None:
    async def body(run: rig.Running) -> None:
        ra = run.fleet.sims["ra"]
        assert isinstance(ra, SimRakuten)
        handle = run.daemon.handles["ra"]
        market = run.fleet.market(random.Random(9))
        ra.faults.expired_credential = True
        run.poll_all()
        await rig.wait_for(lambda: handle.state == "stopped", timeout=120, what="stopped")
        assert [r[:2] for r in _open(run, "ra")] == [(9, "mall_auth")]
        assert market.place("ra", "TEA-SEN", 2, clock()) is not None  # sold while stopped
        await trio.sleep(300)
        assert handle.state == "stopped"  # nothing resumes it by itself
        # The merchant renews the key's permission at the mall (the same key works
        # again), then deletes the error message, as GoQSystem's manual asks.
        ra.faults.expired_credential = False
        done = await call(run.socket, m.ClearErrors(store="ra"))
        assert isinstance(done, m.Done) and done.changed == 1
        assert handle.state == "running"
        await rig.wait_for(
            lambda: rig.converged(run.fleet, run.ledger_path), timeout=900, what="caught up"
        )
        assert run.fleet.stock("rb", "TEA-SEN") == run.fleet.initial["TEA-SEN"] - 2
        assert _open(run, "ra") == []
        # Cleared while the key is still refused: it resumes, and stops again at once.
        ra.faults.expired_credential = True
        run.poll_all()
        await rig.wait_for(lambda: handle.state == "stopped", timeout=120, what="stopped")
        await call(run.socket, m.ClearErrors(store="ra"))
        await rig.wait_for(lambda: handle.state == "stopped", timeout=120, what="stopped again")
        assert [r[:2] for r in _open(run, "ra")] == [(9, "mall_auth")]

    rig.run_dst(body, seed=82)


def test_errors_a_stop_left_open_are_healed_by_the_next_sessions_first_success() -> None:
    # A restart while degraded leaves the episode's error open and the new session
    # starts "running": its first trusted success must heal it all the same.
    async def body(run: rig.Running) -> None:
        handle = run.daemon.handles["ra"]
        await run.daemon.ledger.call(
            m.RecordError(store="ra", level=8, code="mall_unavailable", message="left over")
        )
        # Recorded by the ledger for a line whose order named no listing: not the
        # store's own failure, so no recovery of the store heals them.
        await run.daemon.ledger.call(
            m.OrderLinesSeen(
                store="ra",
                lines=tuple(
                    # Quantity 0, not cancelled: a bad line. Quantity 1: parked.
                    m.OrderLine(
                        order_id=f"bad-{q}", line_id="1", listing_key="", quantity=q, updated_at=0
                    )
                    for q in (0, 1)
                ),
            )
        )
        others = [(8, "bad_order_line", ""), (8, "listing_not_linked", "")]
        assert sorted(_open(run, "ra")) == sorted([(8, "mall_unavailable", ""), *others])
        polls = handle.polls
        handle.renew(handle.credentials)  # a new mall session, as after a restart
        await rig.wait_for(lambda: handle.polls > polls, timeout=120, what="a poll")
        await rig.wait_for(lambda: sorted(_open(run, "ra")) == others, timeout=60, what="healed")
        assert handle.state == "running"

    rig.run_dst(body, seed=83)
