"""Every supported mall, by the name used in config (``mall = "rakuten"``).

Adding a mall: write ``goqd/malls/<mall>.py`` exporting ``SPEC`` and add its name to
``goqd.mallnames.MALL_NAMES``. Nothing else in goqd names a mall.

The specs here open *guarded* adapters (``goqd.malls.base.guard_adapter``): whoever gets
an adapter from the registry (store actors, key tests, imports, diffs) sees only
``MallError`` from it, whatever a mall sends.
"""

from __future__ import annotations

import importlib

import msgspec

from goqd.mallnames import MALL_NAMES
from goqd.malls.base import MallSpec, guarded

MALLS: dict[str, MallSpec] = {}


def _register(spec: MallSpec) -> None:
    MALLS[spec.name] = msgspec.structs.replace(spec, open_adapter=guarded(spec.open_adapter))


def get_spec(name: str) -> MallSpec:
    return MALLS[name]


for _name in MALL_NAMES:
    _module = importlib.import_module(f"goqd.malls.{_name}")
    _spec = getattr(_module, "SPEC", None)
    if not isinstance(_spec, MallSpec) or _spec.name != _name:
        raise ImportError(f"goqd/malls/{_name}.py must export SPEC, a MallSpec named {_name!r}")
    _register(_spec)
