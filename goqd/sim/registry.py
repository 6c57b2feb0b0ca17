"""Every simulated mall, by mall name: the ``SIM`` (a ``goqd.sim.base.SimSpec``) that
``goqd/sim/<mall>.py`` exports, for each name in ``goqd.mallnames.MALL_NAMES``.

A mall whose simulator module does not exist yet is left out rather than failing the
import: the contract test (``tests/malls/test_mall_contract.py``) then names what the
new mall lacks, instead of every test that loads a simulator failing to start.
"""

from __future__ import annotations

import importlib

from goqd.mallnames import MALL_NAMES
from goqd.sim.base import SimSpec

SIMS: dict[str, SimSpec] = {}

for _name in MALL_NAMES:
    try:
        _module = importlib.import_module(f"goqd.sim.{_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"goqd.sim.{_name}":
            raise  # the module exists and something it imports does not
        continue
    _sim = getattr(_module, "SIM", None)
    if not isinstance(_sim, SimSpec) or _sim.mall != _name:
        raise ImportError(f"goqd/sim/{_name}.py must export SIM, a SimSpec for {_name!r}")
    SIMS[_name] = _sim
