"""The client core every mall adapter is built on: how a request goes out and how what
comes back becomes goqd's errors, written once for all the malls.

``MallClient`` is one adapter's access to its store's HTTP client:

* ``send`` takes the rate token (``TokenBucket.slot``), sends, and reads the body up
  to ``MAX_BODY_BYTES``; every ``httpx`` failure becomes a ``MallError`` here and only
  here, as httpx maps httpcore's errors in one place;
* ``error`` makes the error, naming the mall and the store, with the value of every
  secret credential field masked (``mask``): a mall may quote what it was sent;
* ``error_class`` looks a reply up in the adapter's own table (HTTP status or the
  mall's error code -> error class), and ``reply_error`` / ``throttled`` turn it into
  the error, a throttle with its bounded Retry-After (``parse_retry_after``, the one
  parser) after blocking the rate bucket for that long;
* ``request_token`` asks an OAuth 2 token endpoint for an access token with the
  store's refresh token, and ``TokenAuth`` keeps that token until shortly before it
  expires and renews it once under a lock (Amazon's LWA, Yahoo's YConnect).

An adapter keeps what is its mall's own: the payload Structs, the table, the URLs and
the order, stock and listing logic.

This module never logs or formats a credential: messages are built from the API name,
the mall's error codes and texts and exception type names, never from a request, and
what a mall's text quotes of a secret field is masked.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast
from urllib.parse import urlencode

import httpx
import msgspec
import trio

from goqd.errors import (
    MallAuthError,
    MallError,
    MallProtocolError,
    MallRateLimited,
    MallUnavailable,
)
from goqd.logs import register_secret
from goqd.malls.base import (
    DECODE_ERRORS,
    StoreContext,
    bounded_wait,
    header_safe,
    parse_retry_after,
)
from goqd.malls.ratelimit import TokenBucket
from goqd.malls.transport import READ
from goqd.secret import Secret

__all__ = [
    "ACCESS_TOKEN_MARGIN_S",
    "MAX_BODY_BYTES",
    "OAUTH_REFUSALS",
    "MallClient",
    "Reply",
    "Table",
    "TokenAuth",
    "TokenResponse",
    "error_class",
    "short",
]

# The most goqd reads of one response. The largest answer a mall documents (a page of
# 1000 orders) is a few megabytes; more is a broken or hostile answer, and reading it
# whole would cost the daemon's memory.
MAX_BODY_BYTES = 16 * 1024 * 1024
# An access token is renewed this long before it expires, so a call never goes out with
# one that runs out on its way.
ACCESS_TOKEN_MARGIN_S = 60.0

E = TypeVar("E", bound=MallError)
T = TypeVar("T")

# How an adapter classifies its mall's replies: an HTTP status or the mall's own error
# code -> the error class. What the table does not name: 5xx is MallUnavailable, the
# rest MallProtocolError (``error_class``).
Table = Mapping[int | str, type[MallError]]

# OAuth 2 token errors (RFC 6749, section 5.2) that mean the credential itself no longer
# works: only an operator with a new one can fix them.
OAUTH_REFUSALS: Table = {
    "invalid_grant": MallAuthError,
    "invalid_client": MallAuthError,
    "unauthorized_client": MallAuthError,
    "access_denied": MallAuthError,
}

# When a status and a code both name a class, the graver one wins: a credential refused
# in a throttled answer still needs the operator, and a throttle in a 5xx is waited out.
_GRAVITY: tuple[type[MallError], ...] = (
    MallAuthError,
    MallRateLimited,
    MallUnavailable,
    MallProtocolError,
)


def error_class(
    table: Table, status: int, code: str = "", *, otherwise: type[MallError] | None = None
) -> type[MallError]:
    """The error class ``table`` gives a reply with HTTP ``status`` and mall ``code``.

    Neither in the table: ``otherwise`` if given, else ``MallUnavailable`` for a 5xx and
    ``MallProtocolError`` for anything else (the request or the answer did not fit).
    """
    found = [cls for cls in (table.get(status), table.get(code) if code else None) if cls]
    if found:
        return min(
            found, key=lambda cls: next(i for i, c in enumerate(_GRAVITY) if issubclass(cls, c))
        )
    if otherwise is not None:
        return otherwise
    return MallUnavailable if status >= 500 else MallProtocolError


def short(text: str | None, limit: int = 200) -> str:
    """A mall's text for a message: stripped and at most ``limit`` characters."""
    text = (text or "").strip()
    return text if len(text) <= limit else text[:limit] + "…"


@dataclass(frozen=True)
class Reply:
    """A whole answer: its status, headers and body (at most ``MAX_BODY_BYTES``)."""

    status: int
    headers: httpx.Headers
    body: bytes


class Blockable(Protocol):
    """A rate bucket a throttle can hold back (``TokenBucket``, Shopify's cost bucket)."""

    def block_for(self, seconds: float) -> None: ...


Headers = Mapping[str, str] | Callable[[], Mapping[str, str]]


class TokenResponse(msgspec.Struct, frozen=True, kw_only=True):
    """An OAuth 2 token endpoint's answer (RFC 6749, section 5.1)."""

    access_token: str
    token_type: str = "bearer"
    expires_in: float = 3600.0
    # Set when the mall rotates the refresh token (Yahoo may).
    refresh_token: str | None = None


class _TokenError(msgspec.Struct, frozen=True, kw_only=True):
    error: str = ""
    error_description: str = ""


def _sendable(value: str) -> bool:
    """Whether HTTP/1.1 can send ``value`` as a header value (h11's rule, and httpx's
    ASCII encoding)."""
    return value.isascii() and value.isprintable() and value == value.strip()


class MallClient:
    """One adapter's access to its store's HTTP client; see the module docstring.

    ``max_body`` bounds every body read (au PAY makes it an option); ``model`` names the
    format the mall's JSON answers are checked against, for messages; ``is_secret``
    tells the credential fields whose values ``mask`` hides (``MallSpec.is_secret_field``;
    by default all of them).
    """

    def __init__(
        self,
        ctx: StoreContext,
        mall: str,
        *,
        max_body: int = MAX_BODY_BYTES,
        model: str = "the documented format",
        is_secret: Callable[[str], bool] = lambda _name: True,
    ) -> None:
        self.ctx = ctx
        self.mall = mall
        self.store = ctx.store
        self.max_body = max_body
        self.model = model
        self._is_secret = is_secret

    # -- errors ------------------------------------------------------------------------

    def mask(self, text: str) -> str:
        """``text`` with the value of every secret credential field as ``***``.

        An error's message is kept in the ledger and shown by ``goqctl``, where the log
        redactor does not reach, and malls quote what they were sent (a token endpoint's
        ``error_description``, a key echoed in a refusal). Read at the time of the error:
        a rotated refresh token is masked too. Mask before cutting text short, or a
        secret across the cut keeps its first part.
        """
        for name, secret in self.ctx.credentials.items():
            value = secret.reveal()
            if len(value) >= 4 and self._is_secret(name):
                text = text.replace(value, "***")
        return text

    def error(self, cls: type[E], message: str, code: str = "", *, api: str = "") -> E:
        """A ``cls`` naming this adapter's mall and store (and the ``api`` called, when
        the message does not start with it already); secrets in it masked."""
        text = f"{api}: {message}" if api else message
        return cls(self.mask(text), mall=self.mall, store=self.store, code=self.mask(code))

    def retry_after(self, headers: httpx.Headers, *, default: float) -> float:
        """The wait a reply's ``Retry-After`` asks for, bounded (``parse_retry_after``)."""
        return parse_retry_after(headers.get("retry-after"), now=self.ctx.clock(), default=default)

    def throttled(
        self, message: str, *, bucket: Blockable, wait: float, default: float, code: str = ""
    ) -> MallRateLimited:
        """A throttle: ``bucket`` gives no token for ``wait`` seconds (``default`` when it
        is no usable wait, and never more than ``RETRY_AFTER_CAP_S``), and the error
        carries the same wait for the store."""
        wait = bounded_wait(wait, default=default)
        bucket.block_for(wait)
        return MallRateLimited(
            self.mask(message),
            retry_after=wait,
            mall=self.mall,
            store=self.store,
            code=self.mask(code),
        )

    def reply_error(
        self,
        cls: type[MallError],
        message: str,
        code: str = "",
        *,
        reply: Reply,
        bucket: Blockable,
        retry_default: float,
    ) -> MallError:
        """The error of class ``cls`` for ``reply``; a throttle takes its Retry-After."""
        if issubclass(cls, MallRateLimited):
            wait = self.retry_after(reply.headers, default=retry_default)
            return self.throttled(
                message, bucket=bucket, wait=wait, default=retry_default, code=code
            )
        return self.error(cls, message, code)

    def decode(self, kind: type[T], body: bytes, api: str) -> T:
        """``body`` as ``kind`` (JSON), or a ``MallProtocolError`` saying what did not fit."""
        try:
            return msgspec.json.decode(body, type=kind)
        except DECODE_ERRORS as exc:
            raise self.error(
                MallProtocolError, f"{api}: response does not match {self.model} ({exc})"
            ) from exc

    # -- HTTP --------------------------------------------------------------------------

    async def send(
        self,
        api: str,
        method: str,
        url: str,
        *,
        headers: Headers,
        bucket: TokenBucket | None = None,
        content: bytes | None = None,
        params: Mapping[str, str] | None = None,
        read: bool = False,
        secret_in_url: bool = False,
    ) -> Reply:
        """One request, its whole answer read; only ``MallError`` escapes.

        ``bucket``: the request goes out holding one of its tokens (``TokenBucket.slot``:
        paced from the answer, since the malls count a call when it arrives). ``headers``
        may be a function, called once the token is held, for headers that carry the
        time (Yahoo's signature). ``read``: a POST that changes nothing, which the
        transport may send again on a fresh connection. ``secret_in_url``: the URL holds
        a credential, so the httpx exception (whose text may quote it) is not chained.
        """
        if bucket is None:
            return await self._send(api, method, url, headers, content, params, read, secret_in_url)
        async with bucket.slot():
            return await self._send(api, method, url, headers, content, params, read, secret_in_url)

    async def _send(
        self,
        api: str,
        method: str,
        url: str,
        headers: Headers,
        content: bytes | None,
        params: Mapping[str, str] | None,
        read: bool,
        secret_in_url: bool,
    ) -> Reply:
        sent = headers() if callable(headers) else headers
        unsendable = next((name for name, value in sent.items() if not _sendable(value)), None)
        if unsendable is not None:
            # Only credentials come from outside into a header: a key pasted with a line
            # break or a full-width character. httpx would fail it as a transport error
            # (an outage, retried for ever) quoting the value; it is the operator's to fix.
            raise self.error(
                MallAuthError,
                f"{api}: the {unsendable} header cannot carry a value with a space or line "
                "break at either end, a control character or a non-ASCII character; check "
                "the store's credential file and run `goqctl key set`",
                code="credential_unsendable",
            )
        try:
            async with self.ctx.http.stream(
                method,
                url,
                headers=sent,
                content=content,
                params=params,
                extensions=READ if read else None,
            ) as response:
                return Reply(
                    response.status_code, response.headers, await self._body(api, response)
                )
        except httpx.HTTPError as exc:
            error = self._transport_error(api, exc)
            if secret_in_url:
                raise error from None
            raise error from exc

    async def _body(self, api: str, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise self.error(MallProtocolError, f"{api}: response larger than {self._cap()}")
        chunks: list[bytes] = []
        size = 0
        # aclosing: leaving early (too large) must not leave the generator open. httpx
        # types aiter_bytes as an AsyncIterator; it is an async generator.
        stream = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
        async with aclosing(stream) as body:
            async for chunk in body:
                size += len(chunk)
                if size > self.max_body:
                    raise self.error(
                        MallProtocolError, f"{api}: response larger than {self._cap()}"
                    )
                chunks.append(chunk)
        return b"".join(chunks)

    def _cap(self) -> str:
        mib = self.max_body / (1024 * 1024)
        return f"{mib:g} MiB" if mib.is_integer() else f"{self.max_body} bytes"

    def _transport_error(self, api: str, exc: httpx.HTTPError) -> MallError:
        """httpx's errors as goqd's. Only the exception's type goes into the message: its
        text may quote the URL, and a URL may hold a shop id or a key."""
        if isinstance(exc, httpx.TimeoutException):
            return self.error(MallUnavailable, f"{api}: timed out")
        if isinstance(exc, httpx.DecodingError):
            # The mall answered, over a connection that works, with a body its own
            # Content-Encoding does not decode: an answer that does not match the format,
            # like garbled JSON, not a mall that is down. Calling it "unavailable" would
            # send the operator looking for an outage that is not there.
            return self.error(MallProtocolError, f"{api}: undecodable response body")
        return self.error(MallUnavailable, f"{api}: {type(exc).__name__}")

    # -- OAuth 2 -----------------------------------------------------------------------

    async def request_token(
        self,
        api: str,
        url: str,
        form: Mapping[str, str],
        *,
        headers: Headers,
        bucket: TokenBucket,
        table: Table,
        retry_default: float,
        auth_hint: str = "",
    ) -> TokenResponse:
        """A refresh-token grant at ``url``; the access token in it fits a header.

        A refusal is classified with ``table`` (statuses and the OAuth error codes); a
        ``MallAuthError`` says ``auth_hint``, what the operator does about it.
        """
        reply = await self.send(
            api, "POST", url, headers=headers, bucket=bucket, content=urlencode(form).encode()
        )
        if reply.status == 200:
            token = self.decode(TokenResponse, reply.body, api)
            if not header_safe(token.access_token) or not token.expires_in > 0:
                raise self.error(MallProtocolError, f"{api}: token response without a usable token")
            return token
        try:
            refused = msgspec.json.decode(reply.body, type=_TokenError)
        except DECODE_ERRORS:
            refused = _TokenError()
        detail = " ".join(
            p for p in (refused.error, short(self.mask(refused.error_description))) if p
        )
        message = f"{api}: {detail or f'HTTP {reply.status}'}"
        cls = error_class(table, reply.status, refused.error)
        if issubclass(cls, MallAuthError) and auth_hint:
            message = f"{message}; {auth_hint}"
        code = refused.error or f"http_{reply.status}"
        raise self.reply_error(
            cls, message, code, reply=reply, bucket=bucket, retry_default=retry_default
        )


class TokenAuth:
    """An access token minted from the store's refresh token, in memory only.

    ``token()`` hands out the current one, minting a new one when there is none or it
    expires within ``ACCESS_TOKEN_MARGIN_S``; ``refresh(stale=...)`` replaces one the
    mall refused. Both mint under one lock, so tasks that find the token stale at the
    same moment mint it once. ``mint`` is the adapter's call to its token endpoint
    (``MallClient.request_token``), which raises ``MallAuthError`` for a refused
    credential. A failed mint leaves no token: the next call mints again.
    """

    def __init__(
        self,
        client: MallClient,
        mint: Callable[[], Awaitable[TokenResponse]],
        *,
        margin_s: float = ACCESS_TOKEN_MARGIN_S,
    ) -> None:
        self._client = client
        self._mint_token = mint
        self._margin_s = margin_s
        self._lock = trio.Lock()
        self._token: Secret | None = None
        self._expires_at = -math.inf

    async def token(self) -> tuple[Secret, bool]:
        """The access token to send, and whether this call had to mint it."""
        async with self._lock:
            if self._token is None or self._client.ctx.clock() + self._margin_s >= self._expires_at:
                return await self._mint(), True
            return self._token, False

    async def refresh(self, *, stale: Secret | None = None) -> None:
        """Mint a new token; with ``stale``, only if no other task replaced that one
        while this one waited for the lock."""
        async with self._lock:
            if stale is not None and self._token is not stale:
                return
            await self._mint()

    async def _mint(self) -> Secret:
        self._token = None
        granted = await self._mint_token()
        # Minted at run time: a secret the credential file never held.
        register_secret(granted.access_token, transient=True)
        self._token = Secret(granted.access_token)
        self._expires_at = self._client.ctx.clock() + granted.expires_in
        return self._token
