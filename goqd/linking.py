"""The link condition (紐づけ条件): how a listing's code is compared with product SKUs.

A store's adapter decides which listing field gives the code (Rakuten
システム連携用SKU番号 by default, Yahoo SubCode, …: the ``link_field`` option); this
module decides how two codes are compared. The rules are per store in config
(``link-normalize``); with none the comparison is exact, like GoQSystem's default.

``fold`` applies every rule at once. The ledger indexes products by their folded code
and then compares candidates under the store's own rules, so a rule never has to scan
the catalogue.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from typing import Literal

Rule = Literal["casefold", "nfkc", "strip-spaces", "strip-hyphens"]
RULES: tuple[Rule, ...] = ("nfkc", "casefold", "strip-spaces", "strip-hyphens")

# Dashes merchants type for "-"; NFKC already maps the full-width one. The katakana
# prolonged sound mark (ー) is a letter, not a dash, and is kept.
_HYPHENS = dict.fromkeys(map(ord, "-‐‑‒–—―−﹣－"), None)
_SPACES = dict.fromkeys(map(ord, " \t\u3000\u00a0"), None)


def normalize(code: str, rules: Iterable[Rule]) -> str:
    """``code`` under ``rules``, applied in a fixed order (NFKC first)."""
    wanted = set(rules)
    if "nfkc" in wanted:
        code = unicodedata.normalize("NFKC", code)
    if "casefold" in wanted:
        code = code.casefold()
    if "strip-spaces" in wanted:
        code = code.translate(_SPACES)
    if "strip-hyphens" in wanted:
        code = code.translate(_HYPHENS)
    return code


def fold(code: str) -> str:
    """Every rule at once: the coarsest key, used to find candidates."""
    return normalize(code, RULES)
