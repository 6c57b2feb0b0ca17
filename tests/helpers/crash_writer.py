"""Books a deterministic stream of order lines through the real ledger actor and
prints ``acked N`` after each acknowledged request, flushing, so a parent that kills
this process knows which lines were acknowledged (committed) before the kill.

Usage: python -m tests.helpers.crash_writer DB_PATH LINES [BATCH]
"""

from __future__ import annotations

import sys

import trio

from goqd import messages as m
from goqd.ledger import open_ledger

SKUS = 50


def line_for(n: int) -> m.OrderLine:
    # Every 7th order is later cancelled (a second observation below).
    return m.OrderLine(
        order_id=f"o{n}",
        line_id="1",
        listing_key=f"s1-{n % SKUS}",
        quantity=1 + n % 3,
        updated_at=4e9 + n,  # after the catalogue was set up (see before_import)
    )


async def main(path: str, lines: int, batch: int) -> None:
    async with open_ledger(path) as ledger:
        status = await ledger.ask(m.GetLedgerStatus(), m.LedgerStatus)
        if status.products == 0:
            for s in range(SKUS):
                await ledger.call(m.UpsertProduct(sku=str(s), total=1000, request_id=f"p{s}"))
                for store in ("s1", "s2", "s3"):
                    await ledger.call(
                        m.UpsertListing(
                            store=store,
                            listing_key=f"{store}-{s}",
                            sku=str(s),
                            request_id=f"l{store}{s}",
                        )
                    )
        print("ready", flush=True)
        for start in range(0, lines, batch):
            chunk = [line_for(n) for n in range(start, min(lines, start + batch))]
            chunk += [
                m.OrderLine(
                    order_id=ln.order_id,
                    line_id="1",
                    listing_key=ln.listing_key,
                    quantity=ln.quantity,
                    cancelled=True,
                    terminal=True,
                    updated_at=ln.updated_at + 0.5,
                )
                for ln in chunk
                if int(ln.order_id[1:]) % 7 == 0
            ]
            await ledger.call(
                m.OrderLinesSeen(store="s1", lines=tuple(chunk), cursor=str(start + len(chunk)))
            )
            print(f"acked {min(lines, start + batch)}", flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 20)
