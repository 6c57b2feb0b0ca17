"""End to end, on real parts: two simulated Rakuten shops over real HTTP on loopback,
the real daemon (ledger on a real SQLite file, store actors, control socket, HTTP),
and goqctl's client over the real Unix socket.

These run on the real clock (the ledger's worker thread and hypercorn's sockets do not
follow a fake one); each waits for a condition, bounded by ``trio.fail_after``, and
triggers polls with poll-now instead of waiting for the interval.
"""

from __future__ import annotations

import os

import httpx
import pytest

from goqd import messages as m
from goqd.control import protocol as p
from goqd.control.client import call
from tests.helpers.daemon import (
    Rig,
    eventually,
    key,
)


async def test_an_order_at_one_store_lowers_the_other(rig: Rig) -> None:
    a, b = rig.sims["ra"], rig.sims["rb"]
    assert a.place_order([(key("TS-RED-S"), 2)]) is not None
    assert a.stock(key("TS-RED-S")) == 8  # the mall lowered its own count
    await rig.booked("ra")
    await eventually(lambda: b.stock(key("TS-RED-S")) == 8)
    assert await rig.total("TS-RED-S") == 8
    assert a.stock(key("TS-RED-S")) == 8  # pushed back to A as well: no double decrement


async def test_a_cancellation_restores_stock_everywhere(rig: Rig) -> None:
    a, b = rig.sims["ra"], rig.sims["rb"]
    order = a.place_order([(key("MUG-WHT"), 2)])
    assert order is not None
    await rig.booked("ra")
    await eventually(lambda: b.stock(key("MUG-WHT")) == 1)
    assert await rig.total("MUG-WHT") == 1
    a.cancel_order(order.order_id)
    await rig.booked("ra")
    await eventually(lambda: b.stock(key("MUG-WHT")) == 3)
    assert await rig.total("MUG-WHT") == 3
    history = await rig.daemon.ledger.ask(m.GetHistory(sku="MUG-WHT"), m.History)
    assert [mv.cause for mv in history.movements][:2] == ["cancel", "order"]


async def test_expired_key_stops_one_store_and_key_set_resumes_it_without_loss(rig: Rig) -> None:
    a, b = rig.sims["ra"], rig.sims["rb"]
    a.expire_credentials()
    order_a = a.place_order([(key("TS-RED-S"), 1)])  # placed while A's key is dead
    assert order_a is not None
    await rig.poll("ra")
    await eventually(lambda: rig.daemon.handles["ra"].state == "stopped")
    assert rig.daemon.handles["ra"].error_level == 9
    errors = (await rig.daemon.ledger.ask(m.ListErrors(store="ra"), m.ErrorList)).errors
    assert any(e.level == 9 and "GA0001" in e.message for e in errors)
    # The fault shows in the metrics too.
    await rig.daemon.update_gauges()
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(rig.daemon.http_url + "/metrics")).text
    assert 'goqd_errors_open{level="9",store="ra"} 1.0' in metrics
    assert 'goqd_store_state{state="stopped",store="ra"} 1.0' in metrics
    assert 'goqd_store_up{mall="rakuten",store="ra"} 0.0' in metrics

    # B keeps syncing while A is stopped.
    assert b.place_order([(key("MUG-WHT"), 1)]) is not None
    await rig.poll("rb")
    await eventually(lambda: b.stock(key("MUG-WHT")) == 2)
    assert await rig.total("TS-RED-S") == 10  # A's order not seen yet

    reply = await call(rig.socket, p.KeySet(store="ra", credentials=a.issue_credentials()))
    assert isinstance(reply, m.Done)
    await eventually(lambda: rig.daemon.handles["ra"].state == "running")
    await eventually(lambda: b.stock(key("TS-RED-S")) == 9)
    await eventually(lambda: a.stock(key("MUG-WHT")) == 2)  # A's backlog flushed
    errors = (await rig.daemon.ledger.ask(m.ListErrors(store="ra"), m.ErrorList)).errors
    assert not any(e.level == 9 for e in errors)
    stored = os.path.join(rig.tmp, "state", "credentials", "ra.json")
    assert os.stat(stored).st_mode & 0o777 == 0o600


async def test_a_rejected_key_is_not_stored_and_the_store_stays_stopped(rig: Rig) -> None:
    a = rig.sims["ra"]
    a.expire_credentials()
    await rig.poll("ra")
    await eventually(lambda: rig.daemon.handles["ra"].state == "stopped")
    with pytest.raises(Exception, match="rejected the credential"):
        await call(rig.socket, p.KeySet(store="ra", credentials=a.credentials()))
    assert rig.daemon.handles["ra"].state == "stopped"
    assert not os.path.exists(os.path.join(rig.tmp, "state", "credentials", "ra.json"))


async def test_maintenance_degrades_then_recovers_by_itself(rig: Rig) -> None:
    a, b = rig.sims["ra"], rig.sims["rb"]
    a.faults.maintenance = True
    await rig.poll("ra")
    await eventually(lambda: rig.daemon.handles["ra"].state == "degraded")
    assert rig.daemon.handles["ra"].error_level == 8
    assert rig.daemon.handles["rb"].state == "running"
    a.faults.maintenance = False
    assert a.place_order([(key("TS-RED-S"), 3)]) is not None
    await rig.poll("ra")
    await eventually(lambda: rig.daemon.handles["ra"].state == "running", seconds=60)
    await eventually(lambda: b.stock(key("TS-RED-S")) == 7)
    # The episode healed: its level-8 error is resolved by itself, kept in history.
    await eventually(lambda: _open_errors(rig, "ra", []))
    history = await rig.daemon.ledger.ask(
        m.ListErrors(store="ra", include_cleared=True), m.ErrorList
    )
    assert [(e.level, e.code, e.cleared_by) for e in history.errors] == [
        (8, "mall_unavailable", "healed")
    ]


async def _open_errors(rig: Rig, store: str, want: list[str]) -> bool:
    errors = (await rig.daemon.ledger.ask(m.ListErrors(store=store), m.ErrorList)).errors
    return [e.code for e in errors] == want


async def test_metrics_and_health_are_served(rig: Rig) -> None:
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(rig.daemon.http_url + "/metrics")).text
        health = await client.get(rig.daemon.http_url + "/healthz")
    assert 'goqd_store_up{mall="rakuten",store="ra"} 1.0' in metrics
    assert health.status_code == 200
    for sim in rig.sims.values():
        for secret in sim.credentials().values():
            assert secret not in metrics


async def test_status_over_the_control_socket(rig: Rig) -> None:
    status = await call(rig.socket, p.Status())
    assert isinstance(status, p.DaemonStatus)
    assert {s.name: s.state for s in status.stores} == {"ra": "running", "rb": "running"}
    assert status.ledger.products == 2
