"""The malls goqd supports, by the name used in config (``mall = "rakuten"``).

Adding a mall: write ``goqd/malls/<mall>.py`` (exporting ``SPEC``) and
``goqd/sim/<mall>.py`` (exporting ``SIM``), then add its name below. This is the one
line: the mall registry (``goqd.malls.registry``) and the simulator registry
(``goqd.sim.registry``) both read it. It lives outside both packages because a simulator
stands for the mall and never imports an adapter, so the simulator side cannot read the
list from the mall registry.
"""

from __future__ import annotations

MALL_NAMES: tuple[str, ...] = ("rakuten", "yahoo", "aupay", "shopify", "amazon")
