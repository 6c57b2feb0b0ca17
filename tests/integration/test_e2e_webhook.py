"""Shopify's webhook fast path, end to end over real HTTP: a signed order webhook makes
the daemon poll that store at once, and the webhook is answered 200 only after the
order is booked in the ledger (nothing acknowledged before a durable commit)."""

from __future__ import annotations

import time

import httpx
import trio

from goqd import messages as m
from goqd.app import Daemon, run_daemon
from goqd.ledger import queries
from goqd.sim.shopify import SimShopify
from goqd.tools.fleet import open_fleet


def _booked(daemon: Daemon) -> set[str]:
    with queries.open_read_only(daemon.config.daemon.ledger_path) as conn:
        return {line.order_id for line in queries.order_lines(conn)}


async def test_order_webhook_triggers_a_poll_and_is_acknowledged_after_booking(
    sock_dir: str,
) -> None:
    tmp = sock_dir
    with trio.fail_after(60):
        shops = {n: SimShopify(shop_id=f"shop{n}", clock=time.time, seed=n) for n in "ab"}
        async with open_fleet(shops) as fleet, trio.open_nursery() as nursery:
            # A long poll interval: only the webhook can explain a quick booking.
            config = fleet.config(tmp, poll_interval="1h", push_retry="1s")
            daemon: Daemon = await nursery.start(run_daemon, config)
            await daemon.ledger.call(m.UpsertProduct(sku="MUG", total=5))
            keys = {}
            for name, sim in shops.items():
                keys[name] = sim.add_variant("MUG", 5).listing_key
                await daemon.ledger.call(
                    m.UpsertListing(store=name, listing_key=keys[name], sku="MUG")
                )
            # Let the first (start-up) polls finish.
            while daemon.handles["a"].polls < 1 or daemon.handles["b"].polls < 1:
                await trio.sleep(0.02)

            a = shops["a"]
            a.webhook_url = f"{daemon.http_url}/webhooks/a"
            order = a.place_order([(keys["a"], 2)])
            assert order is not None
            async with httpx.AsyncClient(timeout=30) as http:
                started = trio.current_time()
                # The delivery returns only when the daemon answered.
                assert len(a.pending_webhooks) == 1
                delivered = await a.deliver_webhooks(http)
                assert delivered == 1, a.pending_webhooks
                elapsed = trio.current_time() - started
                assert order.order_id in _booked(daemon)  # booked before the 200
                assert elapsed < 30
                while shops["b"].stock(keys["b"]) != 3:
                    await trio.sleep(0.02)

                # A forged webhook is refused and triggers nothing.
                forged = await http.post(
                    f"{daemon.http_url}/webhooks/a",
                    content=b'{"id": 1}',
                    headers={
                        "X-Shopify-Topic": "orders/create",
                        "X-Shopify-Hmac-Sha256": "AAAA",
                    },
                )
                assert forged.status_code == 401
                unknown = await http.post(f"{daemon.http_url}/webhooks/nope", content=b"{}")
                assert unknown.status_code == 404
            nursery.cancel_scope.cancel()
