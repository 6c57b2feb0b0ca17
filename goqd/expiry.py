"""Credential expiry: days left, the warning state and what the operator does next, per mall.

Every mall's credential dies on a schedule (docs/design.md §2.4): Rakuten's licenseKey and the
au PAY API key after 90 days, Yahoo's refresh token after 28 days, Amazon's app
authorisation after a year, some Shopify tokens when their ``expires_at`` passes. The
adapters say *when* (``MallAdapter.credential_expiry``); this module turns that into what
``goqctl stores`` shows, what the store actor's expiry loop logs, and the sentence that
tells an operator how to renew before the store stops with エラーレベル9.

Pure functions of their arguments: no clock of their own (``now`` is passed in, epoch
seconds, from ``ctx.clock()`` or the CLI's clock), no I/O, no imports of adapters. They
must never see or print a credential: they get an expiry time, a store name and a mall
name, nothing else.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Final, Literal

__all__ = [
    "DAY",
    "EXPIRY_FIELDS",
    "ExpiryState",
    "days_left",
    "expiry_state",
    "renewal_action",
    "warning_message",
]

DAY: Final = 86400.0
# Operators read dates in Japan time: the malls show key dates in JST.
JST: Final = timezone(timedelta(hours=9), "JST")

ExpiryState = Literal["ok", "warning", "expired", "unknown"]

# Human names, as operators know the malls (the same titles as the registry's MallSpec;
# kept here so this module stays free of adapter imports).
_TITLES: Final[dict[str, str]] = {
    "rakuten": "楽天市場",
    "yahoo": "Yahoo!ショッピング",
    "aupay": "au PAY マーケット",
    "amazon": "Amazon",
    "shopify": "Shopify",
}

# What each mall's credential is called, for the message.
_CREDENTIAL: Final[dict[str, str]] = {
    "rakuten": "licenseKey (ライセンスキー, 90 days)",
    "yahoo": "refresh token (リフレッシュトークン, 28 days)",
    "aupay": "API key (APIキー, 90 days)",
    "amazon": "app authorisation (アプリ認可, 1 year)",
    "shopify": "access token",
}

# The credential-file field an adapter reads its expiry from, where the mall itself cannot
# be asked. Without it goqd cannot warn (the state is "unknown"); Rakuten is asked through
# its license expiry-date API, so it needs no field.
EXPIRY_FIELDS: Final[dict[str, str]] = {
    "yahoo": "refresh_token_issued_at",
    "aupay": "issued_at",
    "amazon": "authorized_at",
    "shopify": "expires_at",
}

# The renewal, per mall; "{store}" is replaced by the store's name. Every one ends in
# `goqctl key set`, which tests the new credential, stores it 0600 and clears level 9.
_ACTIONS: Final[dict[str, str]] = {
    "rakuten": (
        "issue a new licenseKey in RMS (WEB APIサービス → ライセンスキー発行), write it with "
        "service_secret and license_key to a JSON file and run "
        "`goqctl key set {store} --file new.json`"
    ),
    "aupay": (
        "re-issue the API key in Wow!manager (各種お申し込み → API利用申請; APIキー再発行), "
        "write api_key, shop_id and issued_at (YYYY-MM-DD) to a JSON file and run "
        "`goqctl key set {store} --file new.json`"
    ),
    "yahoo": (
        "re-authorise goqd for the store with Yahoo! ID連携 (the refresh token lasts 28 days), "
        "write the new refresh_token and refresh_token_issued_at with the other fields to a "
        "JSON file and run `goqctl key set {store} --file new.json`"
    ),
    "amazon": (
        "re-authorise the app in Seller Central (アプリの認可を更新; yearly), write the new "
        "refresh_token and authorized_at (YYYY-MM-DD) with the other fields to a JSON file "
        "and run `goqctl key set {store} --file new.json`"
    ),
    "shopify": (
        "rotate the access token in the Shopify admin (the app's API credentials), write "
        "access_token, webhook_secret and expires_at (if it expires) to a JSON file and run "
        "`goqctl key set {store} --file new.json`"
    ),
}
_GENERIC_ACTION: Final = (
    "renew the credential at the mall, write it to a JSON file and run "
    "`goqctl key set {store} --file new.json`"
)


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
    return _ACTIONS.get(mall, _GENERIC_ACTION).format(store=store)


def warning_message(store: str, mall: str, expires_at: float | None, now: float) -> str:
    """One sentence for logs and ``goqctl stores``: when the credential expires, and how to
    renew it before the store stops with エラーレベル9."""
    title = _TITLES.get(mall, mall)
    credential = _CREDENTIAL.get(mall, "credential")
    action = renewal_action(store, mall)
    if expires_at is None:
        field = EXPIRY_FIELDS.get(mall)
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
