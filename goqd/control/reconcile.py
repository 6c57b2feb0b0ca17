"""差異 and 反映: compare a store's listings at its mall with the ledger, push its counts.

``Reconciler.diff`` reads a store's linked listings a page at a time, from the ledger,
at the mall and from the ledger again, and says which differ and why; ``reflect``
queues the ledger's counts for pushing (every linked listing in chunks, the named ones,
or those the last diff found 差異). Both tell the request's ``ReportProgress`` how far
they have got.

This module must never write a count at a mall itself: pushes go out through the store
actor like any other, within the mall's batch limit.
"""

from __future__ import annotations

import hashlib

import msgspec

from goqd import messages as m
from goqd.control import protocol as p
from goqd.control.state import DaemonView
from goqd.malls.base import read_listings
from goqd.malls.registry import MALLS

# `reflect --all`: linked listings queued per ledger request (about 0.1 s each).
REFLECT_CHUNK = 2000


class Reconciler(DaemonView):
    """差異 (``diff``) and 反映 (``reflect``) for the operator."""

    async def diff(self, store: str, *, report: p.ReportProgress = p.no_progress) -> p.DiffReport:
        """差異商品: linked listings whose mall count is not what goqd has the malls show.

        Each page of the store's linked listings is read from the ledger, then at the
        mall, then from the ledger again: a listing with a push queued or in flight, or
        whose count or last push moved while the mall was read, is ``pending``, not 差異
        (the push will settle it); one whose difference is within the units the sale
        watch holds for its product is ``held``; one whose product has no count is
        ``no_count``; one whose count is right but a mall attribute goqd pushes (lead
        time, restock date, 超過購入) is not is ``attrs``, since the next push overwrites
        what was changed at the mall. The 差異 and ``attrs`` listings are kept
        (``DiffFound``) for `reflect --differing`, and only once the whole store was
        read: a diff cut short by the mall keeps the last one. ``report`` hears the
        linked listings compared so far, of those the store had when the diff began.
        """
        handle = self.handle(store)
        cfg = self.config.store(store)
        spec = MALLS[cfg.mall]
        rows: list[p.DiffRow] = []
        checked = 0
        after = ""
        linked_total = await self.ledger.ask(m.CountListings(store=store), m.ListingCount)
        compared = 0
        report(p.Progress(phase="compare", done=0, total=linked_total.count, unit="listings"))
        async with self.adapter(cfg, handle.credentials) as adapter:
            while True:
                page = await self.ledger.ask(
                    m.ListListings(
                        store=store, after=after, limit=spec.limits.read_batch, state="linked"
                    ),
                    m.ListingList,
                )
                if not page.listings:
                    break
                after = page.listings[-1].listing_key
                linked = [x for x in page.listings if x.sku]
                if not linked:
                    continue
                keys = tuple(x.listing_key for x in linked)
                counts = await read_listings(adapter, keys)
                now = await self.ledger.ask(
                    m.ListListings(store=store, keys=keys, limit=len(keys)), m.ListingList
                )
                later = {x.listing_key: x for x in now.listings}
                for before in linked:
                    current = later.get(before.listing_key)
                    if current is None or current.link_state != "linked" or not current.sku:
                        continue  # unlinked meanwhile: not goqd's to compare any more
                    checked += 1
                    row = _diff_row(before, current, counts.get(before.listing_key))
                    if row is not None:
                        rows.append(row)
                # Listings linked since the diff began may take it past the total.
                compared += len(linked)
                report(
                    p.Progress(
                        phase="compare",
                        done=compared,
                        total=max(compared, linked_total.count),
                        unit="listings",
                    )
                )
        differing = tuple(r.listing_key for r in rows if r.status in ("differs", "attrs"))
        await self.ledger.ask(
            m.DiffFound(store=store, listing_keys=differing, checked=checked), m.Done
        )
        return p.DiffReport(store=store, rows=tuple(rows), checked=checked)

    async def reflect(
        self,
        store: str,
        keys: tuple[str, ...],
        request_id: str,
        differing: bool = False,
        *,
        report: p.ReportProgress = p.no_progress,
    ) -> m.Done:
        """反映: queue the ledger's count for the given listings (every linked one if none;
        with ``differing``, those the store's last diff found 差異).

        The pushes go out through the store actor like any other, within the mall's
        batch limit, so the operator never pages.
        """
        self.handle(store)
        if differing:
            return await self.ledger.ask(
                m.ReflectDiffering(store=store, request_id=request_id), m.Done
            )
        if not keys:
            return await self._reflect_all(store, request_id, report)
        return await self.ledger.ask(
            m.QueuePushes(store=store, listing_keys=keys, request_id=request_id), m.Done
        )

    async def _reflect_all(self, store: str, request_id: str, report: p.ReportProgress) -> m.Done:
        """`reflect --all`: every linked listing, ``REFLECT_CHUNK`` a ledger request.

        One request for 100,000 listings would hold the ledger for seconds (the watchdog
        and every store's bookings wait behind it); a chunk holds it about 0.1 s. Each
        chunk's request id is the request's id and the chunk's listings, so a retry with
        the same id that finds the same listings gets the chunks already queued answered
        from the ledger, not queued again, and the same reply. A chunk queued twice
        (listings changed between the runs) pushes the same counts again, which changes
        nothing at the mall; a run cut short leaves pushes queued that are as right as
        any push goqd queues.
        """
        total = (await self.ledger.ask(m.CountListings(store=store), m.ListingCount)).count
        report(p.Progress(phase="queue", done=0, total=total, unit="listings"))
        queued = seen = 0
        after = ""
        while True:
            page = await self.ledger.ask(
                m.ListListings(store=store, after=after, limit=REFLECT_CHUNK, state="linked"),
                m.ListingList,
            )
            if not page.listings:
                break
            after = page.listings[-1].listing_key
            chunk = tuple(x.listing_key for x in page.listings)
            done = await self.ledger.ask(
                m.QueuePushes(
                    store=store,
                    listing_keys=chunk,
                    strict=False,  # unlinked since the page was read: left out
                    request_id=_chunk_request_id(request_id, chunk),
                ),
                m.Done,
            )
            queued += done.changed
            seen += len(chunk)
            report(p.Progress(phase="queue", done=seen, total=max(seen, total), unit="listings"))
        return m.Done(changed=queued, detail=f"{queued} listing(s) queued for a push")


def _shown(x: m.ListingRecord) -> int:
    """What goqd has the malls show for the listing's product: its total less held units."""
    return max(0, (x.product_total or 0) - x.product_held)


def _diff_row(
    before: m.ListingRecord, now: m.ListingRecord, mall: m.MallCount | None
) -> p.DiffRow | None:
    """One listing's diff row, ``None`` when the mall shows what goqd does.

    ``before`` and ``now`` are the ledger's view of the listing just before and just
    after the mall was read.
    """
    assert now.sku is not None
    want = _shown(now)
    quantity = mall.quantity if mall is not None else None
    attrs = _attrs_differ(now.attrs, mall.attrs) if mall is not None else ()
    if quantity == want and now.count_known and not attrs:
        return None
    moved = (
        before.pending_quantity is not None
        or now.pending_quantity is not None
        or before.last_pushed_version != now.last_pushed_version
        or _shown(before) != want
    )
    if not now.count_known:
        status: p.DiffStatus = "no_count"
    elif moved:
        status = "pending"
    # Held units are sales goqd takes off every mall before their orders arrive: a mall
    # not lowered yet shows up to that many more, never fewer.
    elif now.product_held and quantity is not None and 0 < quantity - want <= now.product_held:
        # The held units settle on their own; changed attributes only with a push.
        status = "attrs" if attrs else "held"
    elif quantity == want:
        status = "attrs"
    else:
        status = "differs"
    return p.DiffRow(
        listing_key=now.listing_key,
        sku=now.sku,
        ledger_quantity=want,
        mall_quantity=quantity,
        pending_quantity=now.pending_quantity
        if now.pending_quantity is not None
        else before.pending_quantity,
        held=now.product_held,
        status=status,
        attrs_differ=attrs,
    )


def _attrs_differ(ledger: m.ListingAttrs, mall: m.ListingAttrs) -> tuple[p.AttrDiff, ...]:
    """The attributes goqd pushes that the mall holds otherwise. A lead time or restock
    date goqd holds no value for is not pushed, and one the mall reports none for has
    nothing to compare. 超過購入 is different: Yahoo's every push sends it, and sends
    "no value" as off, so an operator's "on" at the mall is a difference either way."""
    pairs: tuple[tuple[p.AttrName, int | str | bool | None, int | str | bool | None], ...] = (
        ("lead_time", ledger.lead_time_days, mall.lead_time_days),
        ("restock_date", ledger.restock_date, mall.restock_date),
        ("allow_overdraft", bool(ledger.allow_overdraft), mall.allow_overdraft),
    )
    return tuple(
        p.AttrDiff(name=name, ledger=ours, mall=theirs)
        for name, ours, theirs in pairs
        if ours is not None and theirs is not None and ours != theirs
    )


def _chunk_request_id(request_id: str, keys: tuple[str, ...]) -> str:
    """The ledger request id of one chunk of a request's work: "" (no deduplication)
    for a request without an id."""
    if not request_id:
        return ""
    return f"{request_id}/{hashlib.sha256(msgspec.json.encode(keys)).hexdigest()[:32]}"
