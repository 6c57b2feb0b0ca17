"""Every exception goqd raises on purpose, in one tree.

::

    GoqdError
      ConfigError              bad config file: names the file and "$.stores[2].mall"
        CredentialError        credential file missing, unreadable, or readable by others
      MallError                raised by adapters only; carries mall and store
        MallUnavailable        timeout, connect error, 5xx, maintenance  -> level 8
          MallRateLimited      429 or the mall's own throttle; retry_after -> level 8
        MallAuthError          credential expired or rejected           -> level 9
        MallProtocolError      response did not match the mall's format -> level 8
        ListingRejected        one listing refused; the rest of the batch goes on
      LedgerError              the ledger refuses to open or to apply something
        LedgerCorrupt          file unreadable / not a goqd ledger / quick_check failed
        LedgerTooNew           written by a newer schema than this goqd knows
        UnknownSku             an operator named a SKU the ledger does not have
      ControlError             bad control request; answered, never fatal

Rules: adapters translate ``httpx`` and ``msgspec`` errors at their boundary
(``raise MallUnavailable(...) from exc``); nothing above ``goqd/malls`` imports httpx
exceptions. Messages never contain credentials: an adapter builds its message from
the mall's error code and text, never from request headers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from goqd.messages import PushOutcome

LEVEL_TEMPORARY = 8
LEVEL_CREDENTIAL = 9


class GoqdError(Exception):
    """Root of every error goqd raises on purpose."""


class ConfigError(GoqdError):
    """A config file is invalid. ``str()`` names the file, the key path and the reason."""

    def __init__(self, file: str, path: str, reason: str) -> None:
        self.file = file
        self.path = path
        self.reason = reason
        super().__init__(f"{file}: {path}: {reason}")


class CredentialError(ConfigError):
    """A credential file is missing, unreadable, malformed or readable by group/others."""


class MallError(GoqdError):
    """Raised by a mall adapter. ``level`` is the GoQSystem error level it maps to.

    ``done``: when the error cut a push batch short (an adapter that makes one call per
    listing), the outcomes of the listings the mall had already answered. The store
    reports them, so they are not sent again with the rest.
    """

    level: int = LEVEL_TEMPORARY
    code: str = "mall_error"

    def __init__(self, message: str, *, mall: str = "", store: str = "", code: str = "") -> None:
        self.mall = mall
        self.store = store
        if code:
            self.code = code
        self.message = message
        self.done: tuple[PushOutcome, ...] = ()
        super().__init__(message)

    def __str__(self) -> str:
        where = "/".join(p for p in (self.mall, self.store) if p)
        return f"[{where}] {self.message}" if where else self.message


class MallUnavailable(MallError):
    """Timeout, connection failure, 5xx or maintenance: retry with backoff (level 8)."""

    code = "mall_unavailable"


class MallRateLimited(MallUnavailable):
    """The mall throttled us. ``retry_after`` is seconds to wait, when the mall said."""

    code = "mall_rate_limited"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        mall: str = "",
        store: str = "",
        code: str = "",
    ) -> None:
        super().__init__(message, mall=mall, store=store, code=code)
        self.retry_after = retry_after


class MallAuthError(MallError):
    """Credential expired or rejected: the store stops until it is renewed (level 9)."""

    level = LEVEL_CREDENTIAL
    code = "mall_auth"


class MallProtocolError(MallError):
    """The response did not match the mall's documented format (level 8)."""

    code = "mall_protocol"


class ListingRejected(MallError):
    """The mall refused one listing of a batch; the rest went through."""

    code = "listing_rejected"

    def __init__(
        self, message: str, *, listing_key: str, mall: str = "", store: str = "", code: str = ""
    ) -> None:
        super().__init__(message, mall=mall, store=store, code=code)
        self.listing_key = listing_key


class LedgerError(GoqdError):
    """The ledger refused an operation or refused to open."""


class LedgerCorrupt(LedgerError):
    """The database file is unreadable or is not a goqd ledger. It is never replaced."""


class LedgerTooNew(LedgerError):
    """The database was written by a newer goqd schema than this one understands."""


class UnknownSku(LedgerError):
    """An operator named a SKU the ledger does not have."""


class ControlError(GoqdError):
    """A control request was malformed, too large, or not allowed. Answered, never fatal."""


class InputError(GoqdError):
    """Operator input (a CSV file, a row) that cannot be applied. Names the place; nothing
    of that input is applied."""
