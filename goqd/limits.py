"""Limits and value rules shared by every way a value enters goqd.

The control protocol (``goqd.control.protocol``) and the CSV readers (``goqd.csvio``)
both take their caps and their date rule from here, so a SKU, key or date one of them
accepts is never refused by the other (a CSV row that ``goqctl listing set`` would refuse
is refused at import, naming its line).

This module must never import anything of goqd's: both sides import it.
"""

from __future__ import annotations

import datetime
import re

MAX_STORE_NAME = 100  # characters
MAX_SKU = 255  # a product code; also a listing's link code, which becomes a SKU on import
MAX_LISTING_KEY = 512
MAX_NAME = 1000  # a product or listing name; malls cap theirs well below this
MAX_QUANTITY = 1_000_000_000
MAX_DELTA = 1_000_000_000
MAX_LEAD_TIME_DAYS = 365
# ASCII digits only: ``\d`` would also match full-width and other scripts' digits.
DATE_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"

_DATE = re.compile(DATE_PATTERN)


def is_calendar_date(value: str) -> bool:
    """True for ``YYYY-MM-DD`` naming a real day (2026-02-28, not 2026-02-30)."""
    # fullmatch: a pattern's ``$`` also matches before a trailing newline.
    if _DATE.fullmatch(value) is None:
        return False
    try:
        datetime.date.fromisoformat(value)
    except ValueError:
        return False
    return True
