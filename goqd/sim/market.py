"""The market generator: customers ordering across simulated malls.

It knows the merchant's *real* stock per product (what is on the shelf), so it can
count what no mall and no daemon can see: **oversold units**, units a mall accepted
when the shelf no longer had them. Malls accept or refuse by their own counters
(``SimMall.place_order``), exactly as real malls do; the market only observes.

Randomness comes from one seeded ``random.Random``, so a seed replays a market.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from goqd.sim.base import SimMall, SimOrder


@dataclass
class Placed:
    store: str
    order: SimOrder
    sku: str
    quantity: int
    at: float


@dataclass
class Market:
    """Products with real stock, listed in simulated stores under per-store keys."""

    sims: dict[str, SimMall]
    keys: dict[str, dict[str, str]]  # store -> sku -> listing key
    real: dict[str, int]  # sku -> units on the shelf (may not go below 0)
    rng: random.Random
    hot: list[str] = field(default_factory=list)
    placed: list[Placed] = field(default_factory=list)
    refused: int = 0
    oversold_units: int = 0
    cancelled_units: int = 0

    def place_random(self, at: float, *, max_quantity: int = 2) -> Placed | None:
        """One customer: a store, a product (hot ones more often), a quantity."""
        store = self.rng.choice(sorted(self.sims))
        pool = self.hot if self.hot and self.rng.random() < 0.6 else sorted(self.real)
        sku = self.rng.choice(pool)
        return self.place(store, sku, self.rng.randint(1, max_quantity), at)

    def place(self, store: str, sku: str, quantity: int, at: float) -> Placed | None:
        key = self.keys[store][sku]
        order = self.sims[store].place_order([(key, quantity)])
        if order is None:
            self.refused += 1
            return None
        shortfall = quantity - max(0, self.real[sku])
        if shortfall > 0:
            self.oversold_units += shortfall
        self.real[sku] = max(0, self.real[sku] - quantity)
        placed = Placed(store, order, sku, quantity, at)
        self.placed.append(placed)
        return placed

    def cancel_random(self) -> Placed | None:
        """A customer cancels a live order: the units go back on the shelf."""
        live = [p for p in self.placed[-200:] if not p.order.cancelled]
        if not live:
            return None
        victim = self.rng.choice(live)
        self.sims[victim.store].cancel_order(victim.order.order_id)
        self.real[victim.sku] += victim.quantity
        self.cancelled_units += victim.quantity
        return victim

    def advance_random(self) -> None:
        """The merchant ships something: an order moves on to its next status."""
        live = [p for p in self.placed[-200:] if not p.order.cancelled]
        if live:
            victim = self.rng.choice(live)
            self.sims[victim.store].advance(victim.order.order_id)

    def mall_lines(self) -> set[tuple[str, str, str]]:
        """Every (store, order id, line id) any mall ever accepted."""
        return {
            (store, order.order_id, line.line_id)
            for store, sim in self.sims.items()
            for order in sim.orders.values()
            for line in order.lines
        }
