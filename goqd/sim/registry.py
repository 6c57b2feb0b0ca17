"""Every simulated mall, by mall name, with what the demo and the benchmark need to
set one up: the simulator class, the listing key a SKU gets there, and the config
``urls`` the adapter needs besides its base URL (token endpoints on the same host).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from goqd.sim.amazon import SimAmazon
from goqd.sim.aupay import SimAupay
from goqd.sim.base import SimListing, SimMall
from goqd.sim.rakuten import SimRakuten
from goqd.sim.shopify import SimShopify
from goqd.sim.yahoo import SimYahoo


def _add_plain(sim: SimMall, key: str, sku: str, name: str, quantity: int) -> SimListing:
    return sim.add_listing(key, link_code=sku, name=name, quantity=quantity)


def _add_shopify(sim: SimMall, key: str, sku: str, name: str, quantity: int) -> SimListing:
    # Shopify addresses stock by InventoryItem GID, minted by the shop.
    assert isinstance(sim, SimShopify)
    return sim.add_variant(sku, quantity, name=name)


@dataclass(frozen=True)
class SimSpec:
    mall: str
    cls: type[SimMall]
    listing_key: Callable[[str], str]
    # name -> path on the simulator's host (e.g. {"token": "/yconnect/v2/token"})
    url_paths: dict[str, str] = field(default_factory=dict)
    options: dict[str, str | int | float | bool] = field(default_factory=dict)
    # Creates a listing for ``sku``; returns it (its ``listing_key`` is what goqd uses).
    add: Callable[[SimMall, str, str, str, int], SimListing] = _add_plain
    # How long after the market stops this mall can still be catching up: Amazon
    # publishes orders to getOrders about two minutes late [V, docs/malls.md §3.2].
    settle_s: float = 30.0
    # How late the mall itself shows a new order to its order API (Amazon's, as the
    # adapter's lag_s default): the benchmark adds it to its latency targets.
    order_delay_s: float = 0.0


def _rakuten_key(sku: str) -> str:
    return f"{sku.lower()}/{sku}"


SIMS: dict[str, SimSpec] = {
    "amazon": SimSpec(
        "amazon",
        SimAmazon,
        lambda sku: sku,
        {"lwa": "/auth/o2/token"},
        settle_s=240.0,
        order_delay_s=125.0,
    ),
    "rakuten": SimSpec("rakuten", SimRakuten, _rakuten_key),
    "aupay": SimSpec("aupay", SimAupay, lambda sku: sku),
    "shopify": SimSpec("shopify", SimShopify, lambda sku: sku, add=_add_shopify),
    "yahoo": SimSpec("yahoo", SimYahoo, lambda sku: sku, {"token": "/yconnect/v2/token"}),
}
