"""Every supported mall, by the name used in config (``mall = "rakuten"``).

Adding a mall: write ``goqd/malls/<mall>.py`` exporting ``SPEC``, and add one line
below. Nothing else in goqd names a mall.

The specs here open *guarded* adapters (``goqd.malls.base.guard_adapter``): whoever gets
an adapter from the registry (store actors, key tests, imports, diffs) sees only
``MallError`` from it, whatever a mall sends.
"""

from __future__ import annotations

import msgspec

from goqd.malls.base import MallSpec, guarded

MALLS: dict[str, MallSpec] = {}


def _register(spec: MallSpec) -> None:
    MALLS[spec.name] = msgspec.structs.replace(spec, open_adapter=guarded(spec.open_adapter))


def get_spec(name: str) -> MallSpec:
    return MALLS[name]


# One line per mall. Imports are here, not at the top, so the registry is the only place
# that knows the list.
from goqd.malls import rakuten as _rakuten  # noqa: E402

_register(_rakuten.SPEC)
from goqd.malls import yahoo as _yahoo  # noqa: E402

_register(_yahoo.SPEC)
from goqd.malls import aupay as _aupay  # noqa: E402

_register(_aupay.SPEC)
from goqd.malls import shopify as _shopify  # noqa: E402

_register(_shopify.SPEC)
from goqd.malls import amazon as _amazon  # noqa: E402

_register(_amazon.SPEC)
