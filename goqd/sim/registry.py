"""Every simulated mall, by mall name, with what the demo and the benchmark need to
set one up: the simulator class, the listing key a SKU gets there, and the config
``urls`` the adapter needs besides its base URL (token endpoints on the same host).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from goqd.sim.aupay import SimAupay
from goqd.sim.base import SimMall
from goqd.sim.rakuten import SimRakuten
from goqd.sim.yahoo import SimYahoo


@dataclass(frozen=True)
class SimSpec:
    mall: str
    cls: type[SimMall]
    listing_key: Callable[[str], str]
    # name -> path on the simulator's host (e.g. {"token": "/yconnect/v2/token"})
    url_paths: dict[str, str] = field(default_factory=dict)
    options: dict[str, str | int | float | bool] = field(default_factory=dict)


def _rakuten_key(sku: str) -> str:
    return f"{sku.lower()}/{sku}"


SIMS: dict[str, SimSpec] = {
    "rakuten": SimSpec("rakuten", SimRakuten, _rakuten_key),
    "aupay": SimSpec("aupay", SimAupay, lambda sku: sku),
    "yahoo": SimSpec("yahoo", SimYahoo, lambda sku: sku, {"token": "/yconnect/v2/token"}),
}
