"""Every exception goqd raises on purpose, in one tree.

::

    GoqdError
      ConfigError              bad config file: names the file and "$.stores[2].mall"
        CredentialError        credential file missing, unreadable, or readable by others
      InputError               operator input (a CSV file, a row) that cannot be applied
      CsvError                 (goqctl) a CSV could not be written; the file is as it was
      MallError                raised by adapters only; carries mall and store
        MallUnavailable        timeout, connect error, 5xx, maintenance  -> level 8
          MallRateLimited      429 or the mall's own throttle; retry_after -> level 8
        MallAuthError          credential expired or rejected           -> level 9
        MallProtocolError      response did not match the mall's format -> level 8
      LedgerError              the ledger refuses to open or to apply something
        LedgerCorrupt          file unreadable / not a goqd ledger / quick_check failed
        LedgerTooNew           written by a newer schema than this goqd knows
        UnknownSku             an operator named a SKU the ledger does not have
        UnknownListing         an operator named a listing no import or mall has shown
        CountUnknown           a product has no known count to adjust; set one first
        LedgerRequestFailed    one request failed unexpectedly (a bug); refused alone
        LedgerUnavailable      a whole batch was rolled back (disk full, I/O); try again
      ControlError             bad control request; answered, never fatal
        FrameTooLarge          a peer announced a frame over this side's limit
        ConnectionClosed       the peer closed the connection, between frames or mid-frame
        BadEnvelope            a request frame that does not decode; carries the reply
        NotFound               the store, SKU or listing a request named does not exist
        DaemonUnreachable      (goqctl) no daemon answered on the control socket
        RemoteError            (goqctl) the daemon answered the request with an error
      ChildReturned            a permanent supervised child returned (never raised:
                               handed to the supervisor's callbacks as the reason)

A listing the mall refuses in a push batch is not an exception: the adapter returns
that listing's ``PushOutcome`` with ``accepted=False`` and the rest of the batch goes
on; the ledger records it as ``listing_rejected`` (level 8).

Exceptions outside the tree are private (their names start with an underscore): control
flow inside one adapter, simulator or command, caught in the module that raises it. A
private subclass of a class in the tree (an adapter's ``_Rejected(MallProtocolError)``)
is that class to everyone outside its module.

Rules: adapters translate ``httpx`` and ``msgspec`` errors at their boundary
(``raise MallUnavailable(...) from exc``); nothing above ``goqd/malls`` imports httpx
exceptions. Messages never contain credentials: an adapter builds its message from
the mall's error code and text, never from request headers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from goqd.control.protocol import Err
    from goqd.messages import PushOutcome

LEVEL_TEMPORARY = 8
LEVEL_CREDENTIAL = 9

# Every code goqd records in its error table (``goqctl errors``), with its level; the
# operator guide's table lists exactly these. A mall's own code (IE0003, ES05-01,
# QuotaExceeded) is kept beside one of them (``mall_code``), never instead: an operator
# and an alert rule can rely on a short, fixed list.
ERROR_CODES: dict[str, int] = {
    "mall_auth": LEVEL_CREDENTIAL,
    "mall_unavailable": LEVEL_TEMPORARY,
    "mall_rate_limited": LEVEL_TEMPORARY,
    "mall_protocol": LEVEL_TEMPORARY,
    "mall_error": LEVEL_TEMPORARY,
    "clock_skew": LEVEL_TEMPORARY,
    "listing_rejected": LEVEL_TEMPORARY,
    "listing_not_linked": LEVEL_TEMPORARY,
    "multiple_links": LEVEL_TEMPORARY,
    "bad_order_line": LEVEL_TEMPORARY,
    "count_fell_without_order": LEVEL_TEMPORARY,
    # A credential the mall renewed at run time (a rotated refresh token) could not be
    # written: the store runs on, but a restart would read the old one.
    "credential_not_saved": LEVEL_TEMPORARY,
}


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


class LedgerError(GoqdError):
    """The ledger refused an operation or refused to open."""


class LedgerCorrupt(LedgerError):
    """The database file is unreadable or is not a goqd ledger. It is never replaced."""


class LedgerTooNew(LedgerError):
    """The database was written by a newer goqd schema than this one understands."""


class UnknownSku(LedgerError):
    """An operator named a SKU the ledger does not have."""


class UnknownListing(LedgerError):
    """An operator named a listing the ledger does not have (no import or mall showed it)."""


class CountUnknown(LedgerError):
    """A product was created without a count (unlimited or untracked at its mall): there
    is nothing to adjust until ``goqctl stock set SKU N`` gives one."""


class LedgerRequestFailed(LedgerError):
    """Applying one request raised something other than a refusal: that request alone is
    rolled back and refused; the ledger goes on serving everyone else."""


class LedgerUnavailable(LedgerError):
    """The ledger could not commit the batch a request was in (disk full, an I/O error):
    nothing of it was applied, and the same request may succeed when sent again."""


class ControlError(GoqdError):
    """A control request was malformed, too large, or not allowed. Answered, never fatal."""


class FrameTooLarge(ControlError):
    """The peer announced a frame bigger than this side accepts."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")


class ConnectionClosed(ControlError):
    """The peer closed the connection, cleanly between frames (``partial=False``) or not."""

    def __init__(self, *, partial: bool) -> None:
        self.partial = partial
        super().__init__("connection closed mid-frame" if partial else "connection closed")


class BadEnvelope(ControlError):
    """A request frame that could not be decoded. Carries the ready-made ``Err``."""

    def __init__(self, err: Err, request_id: str) -> None:
        self.err = err
        self.request_id = request_id
        super().__init__(err.message)


class NotFound(ControlError):
    """The store, SKU or listing an operator named does not exist: answered ``not_found``."""


class DaemonUnreachable(ControlError):
    """No daemon answered on the socket: missing, refused, not permitted, or gone.

    ``sent``: the request may have reached the daemon (the connection broke or the time
    ran out after it was sent), so it may have been applied, or be running still."""

    def __init__(self, path: str, reason: str, *, hint: str = "", sent: bool = False) -> None:
        self.path = path
        self.reason = reason
        self.hint = hint
        self.sent = sent
        super().__init__(f"cannot reach goqd at {path}: {reason}")


class RemoteError(ControlError):
    """The daemon refused the request with an ``Err`` reply."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        self.code = code
        self.message = message
        self.hint = hint
        super().__init__(f"{code}: {message}")


class InputError(GoqdError):
    """Operator input (a CSV file, a row) that cannot be applied. Names the place; nothing
    of that input is applied."""


class CsvError(GoqdError):
    """(goqctl) A CSV could not be written; nothing was (the file is as it was)."""

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(message)


class ChildReturned(GoqdError):
    """A permanent child returned although it should run until cancelled.

    Never raised: OTP restarts a permanent child whatever its exit reason, and this
    stands in for the "normal" exit reason so that ``supervise()``'s callbacks always
    receive an exception.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"child {name!r} returned")


def recorded_codes(exc: MallError) -> tuple[str, str]:
    """``(code, mall_code)`` to record ``exc`` under: goqd's documented code for its kind
    (the class's own ``code``), and the mall's code an adapter put on it, if different."""
    code = type(exc).code  # the class attribute: an adapter's code= sets the instance's
    return code, exc.code if exc.code != code else ""
