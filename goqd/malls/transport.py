"""The HTTP transport under every mall client: the one place each request and response
of a store passes through, whatever the mall.

``MallTransport`` wraps the real transport (httpx's connection pool, or a test's) and

* reads every response's ``Date`` into the store's ``MallClock`` (``goqd.malls.clock``),
  with goqd's wall time when the request left and when the answer arrived;
* turns a ``Retry-After`` given as a date into seconds by the response's own ``Date``:
  the date is on the mall's clock, and measured against goqd's a nine-hour skew read as
  "wait ten minutes" (the cap) or "go now";
* sends an idempotent read once more, on a fresh connection, when the pooled connection
  it went out on turns out to be closed (``ReadError``, ``WriteError``,
  ``RemoteProtocolError`` before any answer). A mall that closes idle connections after
  5 s (hypercorn's default) closes them at the moment goqd's every-5-s watch reuses
  them; that race is not an outage. A read is a GET or HEAD, or a POST the adapter
  marked with ``extensions=READ`` (Yahoo's orderList, Rakuten's searchOrder, a GraphQL
  query); a write is never sent twice here, and the resend waits for a rate token of its
  own (``goqd.malls.ratelimit.take_again``).

``mall_transport`` builds one over a pool whose idle connections are dropped before a
mall drops them (``KEEPALIVE_EXPIRY_S``); ``open_mall_client`` a store's
``httpx.AsyncClient`` on it.

This module never logs a request or response (headers carry credentials) and never
retries anything but a read, once.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Callable
from typing import Any

import httpx

from goqd.malls.base import DELTA_SECONDS
from goqd.malls.clock import MallClock, parse_http_date
from goqd.malls.ratelimit import take_again
from goqd.wallclock import WallClock

# A POST that only reads: ``client.stream("POST", url, extensions=READ, ...)``.
READ: dict[str, Any] = {"goqd_read": True}
# Idle pooled connections are closed after this long: under the 5 s after which
# hypercorn (its default) closes an idle connection, the shortest idle timeout goqd has
# met. Dropping ours first means a request rarely goes out on one the mall is closing at
# that instant (the retry below handles the rest).
KEEPALIVE_EXPIRY_S = 4.0
# httpx's own defaults otherwise.
POOL_LIMITS = httpx.Limits(
    max_connections=100, max_keepalive_connections=20, keepalive_expiry=KEEPALIVE_EXPIRY_S
)
# The retry's connection is used once and closed: "fresh" means it was never idle.
_FRESH_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=0)
# What a pooled connection the peer already closed raises, before any answer.
_STALE = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_read(request: httpx.Request) -> bool:
    """Whether ``request`` may be sent twice: a read, with a body that can be replayed."""
    if request.method not in _READ_METHODS and request.extensions.get("goqd_read") is not True:
        return False
    # A streamed body (an async generator) is gone once sent; bytes can go again.
    return isinstance(request.stream, httpx.ByteStream)


class MallTransport(httpx.AsyncBaseTransport):
    """See the module docstring. ``fresh`` sends the retry (a pool that keeps no idle
    connection); ``on_retry`` is told the exception type of each retried failure."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        *,
        clock: WallClock,
        mall_clock: MallClock,
        fresh: httpx.AsyncBaseTransport | None = None,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.inner = inner
        self.fresh = fresh or inner
        self.clock = clock
        self.mall_clock = mall_clock
        self.on_retry = on_retry
        # The last request the mall answered 404 Not Found ("GET /path", no query: a query
        # may carry a key). A mall says so for an API not enabled for the shop.
        self.not_found: str | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        sent = self.clock()
        try:
            response = await self.inner.handle_async_request(request)
        except _STALE as exc:
            if not is_read(request):
                raise
            if self.on_retry is not None:
                self.on_retry(type(exc).__name__)
            # A pooled connection the mall closed before reading the request (the race
            # this retry is for) means the mall saw nothing; one it dropped after reading
            # it (a crash, a proxy's reset) means the resend is a second call the mall
            # counts. goqd cannot tell the two apart, so the resend pays like one: it
            # waits for a token of the rate bucket the adapter's call holds.
            await take_again()
            sent = self.clock()
            response = await self.fresh.handle_async_request(request)
        received = self.clock()
        if response.status_code == 404:
            self.not_found = f"{request.method} {request.url.path}"
        date = response.headers.get("date")
        self.mall_clock.observe_date(date, sent=sent, received=received)
        _retry_after_in_seconds(response, date)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()
        if self.fresh is not self.inner:
            await self.fresh.aclose()


def _retry_after_in_seconds(response: httpx.Response, date: str | None) -> None:
    value = response.headers.get("retry-after")
    if not value or DELTA_SECONDS.fullmatch(value):
        return
    when = parse_http_date(value)
    now = parse_http_date(date)
    if when is None or now is None:
        return  # left as it is: the adapter's parser falls back to its default
    response.headers["retry-after"] = str(max(0, math.ceil(when - now)))


def mall_transport(
    *,
    clock: WallClock,
    mall_clock: MallClock,
    verify: ssl.SSLContext | bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
    on_retry: Callable[[str], None] | None = None,
) -> MallTransport:
    """A store's ``MallTransport`` over httpx's pool (``POOL_LIMITS``, TLS checked by
    ``verify``), or over ``transport`` when one is given (tests, the simulation)."""
    if transport is None:
        inner: httpx.AsyncBaseTransport = httpx.AsyncHTTPTransport(
            verify=verify, limits=POOL_LIMITS
        )
        fresh: httpx.AsyncBaseTransport = httpx.AsyncHTTPTransport(
            verify=verify, limits=_FRESH_LIMITS
        )
    else:
        inner = fresh = transport
    return MallTransport(inner, clock=clock, mall_clock=mall_clock, fresh=fresh, on_retry=on_retry)


def open_mall_client(transport: MallTransport, *, timeout: float) -> httpx.AsyncClient:
    """A store's mall client on ``transport``. Close it (``async with``) to close its
    connections."""
    return httpx.AsyncClient(
        timeout=timeout, transport=transport, headers={"User-Agent": "goqd/0.1"}
    )
