"""Credential expiry: days left, the warning state and what the operator does next, per mall.

Every mall's credential dies on a schedule: Rakuten's licenseKey and the au PAY API key
after 90 days, Yahoo's refresh token after 28 days, Amazon's app authorisation after a
year, some Shopify tokens when their ``expires_at`` passes. The adapters say *when*
(``MallAdapter.credential_expiry``); this module turns that into what ``goqctl stores``
shows, what the store actor's expiry loop logs, and the sentence that tells an operator
how to renew before the store stops with エラーレベル9. What each mall's credential is
called, the field its expiry is read from and how it is renewed are the mall's own facts,
on its ``MallSpec.expiry`` (``goqd.malls.base.KeyExpiry``): adding a mall adds nothing
here.

Pure functions of their arguments and the mall registry: no clock of their own (``now``
is passed in, epoch seconds, from ``ctx.clock()`` or the CLI's clock), no I/O. They must
never see or print a credential: they get an expiry time, a store name and a mall name,
nothing else.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from goqd.malls.base import MallSpec

__all__ = [
    "DAY",
    "ExpiryState",
    "days_left",
    "expiry_field",
    "expiry_state",
    "renewal_action",
    "warning_message",
]

DAY: Final = 86400.0
# Operators read dates in Japan time: the malls show key dates in JST.
JST: Final = timezone(timedelta(hours=9), "JST")

ExpiryState = Literal["ok", "warning", "expired", "unknown"]

_GENERIC_ACTION: Final = (
    "renew the credential at the mall, write it to a JSON file and run "
    "`goqctl key set {store} --file new.json`"
)


def _spec(mall: str) -> MallSpec | None:
    # The registry imports every adapter: imported when first asked, not with this module,
    # which the CLI loads to print days left.
    from goqd.malls.registry import MALLS

    return MALLS.get(mall)


def expiry_field(mall: str) -> str:
    """The credential-file field ``mall``'s adapter reads the expiry from ("" when the
    mall itself is asked, or goqd cannot tell)."""
    spec = _spec(mall)
    return spec.expiry.field if spec is not None and spec.expiry is not None else ""


def days_left(expires_at: float | None, now: float) -> int | None:
    """Whole days until ``expires_at``, rounded down; negative once expired.

    Rounded down so that "0 days" means "expires within 24 hours" and "-1" means
    "expired less than a day ago". ``None`` when the expiry is unknown.
    """
    if expires_at is None:
        return None
    return math.floor((expires_at - now) / DAY)


def expiry_state(expires_at: float | None, now: float, warning_days: int) -> ExpiryState:
    """``ok``, ``warning`` (``warning_days`` days or less left), ``expired`` or ``unknown``.

    The boundaries: exactly ``warning_days`` days left is already ``warning`` (the config
    says "warn this many days before"); the instant of expiry is ``expired``.
    """
    if expires_at is None:
        return "unknown"
    left = expires_at - now
    if left <= 0:
        return "expired"
    if left <= warning_days * DAY:
        return "warning"
    return "ok"


def renewal_action(store: str, mall: str) -> str:
    """What to do to renew ``store``'s credential at ``mall``, ending in `goqctl key set`."""
    spec = _spec(mall)
    action = spec.expiry.renewal if spec is not None and spec.expiry is not None else ""
    # Not str.format: a mall's renewal text may show a JSON object, braces and all.
    return (action or _GENERIC_ACTION).replace("{store}", store)


def warning_message(store: str, mall: str, expires_at: float | None, now: float) -> str:
    """One sentence for logs and ``goqctl stores``: when the credential expires, and how to
    renew it before the store stops with エラーレベル9."""
    spec = _spec(mall)
    title = spec.title if spec is not None else mall
    credential = spec.expiry.credential if spec is not None and spec.expiry else "credential"
    action = renewal_action(store, mall)
    if expires_at is None:
        field = expiry_field(mall)
        hint = (
            f"; add {field} to its credential file so goqd can warn before it expires"
            if field
            else ""
        )
        return f"{store} ({title}): goqd cannot tell when the {credential} expires{hint}"
    when = _jst(expires_at)
    left = expires_at - now
    if left <= 0:
        ago = days_left(now, expires_at)  # whole days since expiry, rounded down
        since = "today" if not ago else f"{ago} day{'s' if ago != 1 else ''} ago"
        head = f"{store} ({title}): the {credential} expired {since} ({when}); sync is stopped"
        return f"{head} (エラーレベル9): {action}"
    days = days_left(expires_at, now)
    within = f"in {days} day{'s' if days != 1 else ''}" if days else "within 24 hours"
    return f"{store} ({title}): the {credential} expires {within} ({when}): {action}"


def _jst(ts: float) -> str:
    return datetime.fromtimestamp(ts, JST).strftime("%Y-%m-%d %H:%M JST")
