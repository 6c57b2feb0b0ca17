"""A pooled connection the mall has closed is not an outage (issue 20, item 4).

A mall that closes idle connections after 5 s (hypercorn's default, and goqd's watch
reads every 5 s) closes some of them at the instant goqd sends the next request on them:
goqd saw ``ReadError`` / ``RemoteProtocolError`` and logged level-8 errors in bursts.
The store's transport (``goqd.malls.transport``) sends an idempotent read once more on a
fresh connection, never a write, and drops idle connections before 5 s; the resend waits
for a rate token of its own (the mall may have counted the first attempt).

The race is made certain here by a real loopback proxy in front of a real simulator: it
forwards the first request of every connection and, when a second request arrives on the
same connection, closes it without an answer, as a server closing an idle connection at
that instant does. Real sockets, so the real clock, each test bounded by ``fail_after``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import httpx
import pytest
import trio
import trio.testing
from hypercorn.config import Config

from goqd.errors import MallUnavailable
from goqd.malls import transport as mt
from goqd.malls.base import StoreContext, tls_context
from goqd.malls.clock import MallClock
from goqd.malls.rakuten import RakutenAdapter
from goqd.malls.ratelimit import TokenBucket
from goqd.messages import PushItem
from goqd.secret import Secret
from goqd.sim.http import serve_sim
from goqd.sim.rakuten import SimRakuten


@dataclass
class _Dropper:
    """Counts connections, requests forwarded and requests dropped."""

    upstream: tuple[str, int]
    connections: int = 0
    forwarded: list[bytes] = field(default_factory=list)
    dropped: list[bytes] = field(default_factory=list)

    async def serve(self, client: trio.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        upstream: trio.SocketStream | None = None
        try:
            async with trio.open_nursery() as nursery:
                served = 0
                while True:
                    request, buffer = await _read_request(client, buffer)
                    if request is None:
                        break
                    if served:
                        # A second request on this connection: the "idle" connection is
                        # closed as it arrives.
                        self.dropped.append(request.split(b"\r\n", 1)[0])
                        break
                    served += 1
                    self.forwarded.append(request.split(b"\r\n", 1)[0])
                    upstream = await trio.open_tcp_stream(*self.upstream)
                    await upstream.send_all(request)
                    nursery.start_soon(_relay, upstream, client)
                nursery.cancel_scope.cancel()
        finally:
            await client.aclose()
            if upstream is not None:
                await upstream.aclose()


async def _relay(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    with trio.move_on_after(30):
        while data := await source.receive_some(65536):
            await sink.send_all(data)


async def _read_request(stream: trio.SocketStream, buffer: bytes) -> tuple[bytes | None, bytes]:
    """One whole request (head and Content-Length body) and what followed it."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return None, buffer
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        data = await stream.receive_some(65536)
        if not data:
            return None, buffer
        rest += data
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


@asynccontextmanager
async def _mall() -> AsyncIterator[tuple[SimRakuten, _Dropper, str]]:
    sim = SimRakuten(shop_id="shop", clock=trio.current_time, enforce_rate_limits=False)
    sim.add_listing("a/A", link_code="A", quantity=5)
    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(serve_sim, sim.app)
        host, port = url.removeprefix("http://").rsplit(":", 1)
        dropper = _Dropper((host, int(port)))
        listeners = await nursery.start(partial(trio.serve_tcp, dropper.serve, 0, host="127.0.0.1"))
        proxy_port = listeners[0].socket.getsockname()[1]
        yield sim, dropper, f"http://127.0.0.1:{proxy_port}"
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def _adapter(url: str, sim: SimRakuten) -> AsyncIterator[tuple[RakutenAdapter, list[str]]]:
    retried: list[str] = []
    wire = mt.mall_transport(
        verify=tls_context(),
        clock=trio.current_time,
        mall_clock=MallClock(),
        on_retry=retried.append,
    )
    async with mt.open_mall_client(wire, timeout=10.0) as http:
        ctx = StoreContext(
            store="ra",
            mall="rakuten",
            base_url=url,
            credentials={k: Secret(v) for k, v in sim.credentials().items()},
            http=http,
            clock=trio.current_time,
        )
        yield RakutenAdapter(ctx), retried


async def test_a_read_on_a_connection_the_mall_closed_goes_again_on_a_fresh_one() -> None:
    with trio.fail_after(20):
        async with _mall() as (sim, dropper, url), _adapter(url, sim) as (adapter, retried):
            # Reads 2 and 4 go out on the pooled connection of reads 1 and 3, and find it
            # closed as they arrive.
            for _ in range(4):
                assert await adapter.read_stock(["a/A"]) == {"a/A": 5}
    assert len(dropper.dropped) == 2  # the race, twice
    assert retried == ["RemoteProtocolError", "RemoteProtocolError"]
    bulk_gets = [r for r in sim.requests if r.api == "inventories.bulk.get"]
    assert len(bulk_gets) == 4  # each read answered once, none lost, none doubled


async def test_a_write_is_never_sent_twice_and_fails_as_an_outage() -> None:
    with trio.fail_after(20):
        async with _mall() as (sim, dropper, url), _adapter(url, sim) as (adapter, retried):
            assert await adapter.read_stock(["a/A"]) == {"a/A": 5}
            push = PushItem(listing_key="a/A", sku="A", quantity=3, version=1)
            with pytest.raises(MallUnavailable):
                # The mall might have applied it: only the store actor may decide to send
                # it again (with the ledger's newest count), never the transport.
                await adapter.push_stock([push])
    assert retried == []
    assert [r for r in sim.requests if r.api == "inventories.bulk.upsert"] == []
    assert dropper.dropped == [b"POST /es/2.0/inventories/bulk-upsert HTTP/1.1"]


async def test_a_read_refused_twice_counts_as_a_failure_once() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ReadError("connection reset", request=request)

    wire = mt.MallTransport(
        httpx.MockTransport(handler), clock=trio.current_time, mall_clock=MallClock()
    )
    async with mt.open_mall_client(wire, timeout=5.0) as http:
        with pytest.raises(httpx.ReadError):
            await http.get("http://mall.invalid/orders")
    assert calls == 2  # once more on a fresh connection, then it is the mall's failure


def _closed_once_then_answered(sent: list[float]) -> mt.MallTransport:
    """A transport whose first request finds its connection closed with no answer."""

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(trio.current_time())
        if len(sent) == 1:
            raise httpx.RemoteProtocolError("Server disconnected", request=request)
        return httpx.Response(200)

    return mt.MallTransport(
        httpx.MockTransport(handler), clock=trio.current_time, mall_clock=MallClock()
    )


async def test_a_resent_read_waits_for_a_rate_token_of_its_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The mall may have counted the first attempt: the resend is paced like a new call,
    # and the call after it waits a token's time after the resend's answer.
    bucket = TokenBucket(rate=1.0, burst=1.0)
    sent: list[float] = []
    start = trio.current_time()
    async with mt.open_mall_client(_closed_once_then_answered(sent), timeout=5.0) as http:
        async with bucket.slot():
            await http.get("http://mall.invalid/stock")
        await bucket.acquire()
    assert [t - start for t in sent] == [0.0, 1.0]
    assert trio.current_time() - start == 2.0


async def test_a_resend_cancelled_while_waiting_for_its_token_spends_only_the_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(rate=1.0, burst=1.0)
    sent: list[float] = []
    start = trio.current_time()
    async with mt.open_mall_client(_closed_once_then_answered(sent), timeout=5.0) as http:
        with trio.move_on_after(0.5):
            async with bucket.slot():
                await http.get("http://mall.invalid/stock")
        await bucket.acquire()
    assert len(sent) == 1
    # One token, spent by the first attempt at 0: the next is there a second later.
    assert trio.current_time() - start == 1.0


def test_idle_connections_are_dropped_before_a_mall_drops_them() -> None:
    # hypercorn closes an idle connection after keep_alive_timeout (5 s by default): goqd's
    # pool must give its idle connections up before that, or every 5-s watch read races
    # the close.
    assert mt.POOL_LIMITS.keepalive_expiry is not None
    assert mt.POOL_LIMITS.keepalive_expiry < Config().keep_alive_timeout <= 5.0
    wire = mt.mall_transport(clock=lambda: 0.0, mall_clock=MallClock(), verify=tls_context())
    inner = wire.inner
    assert isinstance(inner, httpx.AsyncHTTPTransport)
    assert inner._pool._keepalive_expiry == mt.KEEPALIVE_EXPIRY_S  # what httpcore applies
