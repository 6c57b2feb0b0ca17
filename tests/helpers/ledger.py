"""Ledger test helpers: a settable fake clock, the three-store catalogue most ledger
tests start from (SKU A 10 units, B 5, each listed in r1, r2, r3), and short ways to
feed order lines and read totals through a ``LedgerClient`` or a bare ``Ledger``."""

from __future__ import annotations

from goqd import messages as m
from goqd.ledger import LedgerClient
from goqd.ledger.db import Ledger


class FakeNow:
    def __init__(self) -> None:
        self.t = 0.0  # products are created at 0; order lines come later

    def __call__(self) -> float:
        return self.t


async def setup_catalogue(client: LedgerClient) -> None:
    """SKU A (10 units) and B (5) listed in stores r1, r2, r3."""
    for sku, total in (("A", 10), ("B", 5)):
        await client.call(m.UpsertProduct(sku=sku, name=f"product {sku}", total=total, store="r1"))
        for store in ("r1", "r2", "r3"):
            await client.call(m.UpsertListing(store=store, listing_key=f"{store}-{sku}", sku=sku))
    # Drain the link pushes so tests see only what they cause.
    for store in ("r1", "r2", "r3"):
        await drain(client, store)


async def drain(client: LedgerClient, store: str) -> list[m.PushItem]:
    batch = await client.ask(m.TakePushes(store=store, limit=1000), m.PushBatch)
    await client.call(
        m.PushesDone(
            store=store,
            outcomes=tuple(
                m.PushOutcome(
                    listing_key=i.listing_key, version=i.version, accepted=True, quantity=i.quantity
                )
                for i in batch.items
            ),
        )
    )
    return list(batch.items)


def line(
    order: str = "o1",
    ln: str = "1",
    key: str = "r1-A",
    qty: int = 1,
    *,
    cancelled: bool = False,
    terminal: bool = False,
    at: float = 100.0,
) -> m.OrderLine:
    return m.OrderLine(
        order_id=order,
        line_id=ln,
        listing_key=key,
        link_code=key.split("-")[-1],
        quantity=qty,
        cancelled=cancelled,
        terminal=terminal,
        updated_at=at,
        status="x",
    )


async def see(
    client: LedgerClient, *lines: m.OrderLine, store: str = "r1", cursor: str | None = None
) -> m.OrderLinesBooked:
    return await client.ask(
        m.OrderLinesSeen(store=store, lines=lines, cursor=cursor), m.OrderLinesBooked
    )


async def total(client: LedgerClient, sku: str) -> int:
    return (await client.ask(m.GetHistory(sku=sku, limit=1), m.History)).total


def one(ledger: Ledger, msg: m.LedgerRequest) -> m.LedgerReply:
    result = ledger.apply_batch([msg]).replies[0]
    if isinstance(result, Exception):
        raise result
    return result
