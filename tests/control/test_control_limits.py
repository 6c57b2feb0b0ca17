"""Control socket limits over real Unix sockets: one operator cannot lock the others out.

Every test connection comes from this process, so ``SO_PEERCRED`` reports one user for
all of them. The server's ``peer_credentials`` hook stands in for it here: a client
socket bound to ``.../uid<N>-<n>`` before connecting counts as user N, an unbound one as
this process's own user. Everything else (framing, limits, timeouts) is the real server.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from goqd import messages as m
from goqd.control import protocol as p
from goqd.control.client import RemoteError, call
from goqd.control.server import SMALL_FRAME_BYTES, PeerInfo, serve_control

MiB = 1 << 20


def peer_from_bound_name(stream: trio.SocketStream) -> PeerInfo:
    name = stream.socket.getpeername()
    base = os.path.basename(name) if isinstance(name, str) else ""
    if base.startswith("uid"):
        uid = int(base[3:].split("-")[0])
        return PeerInfo(pid=os.getpid(), uid=uid, gid=uid)
    return PeerInfo(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())


class Recorder:
    """A handler that answers everything with ``Done`` and records the request types."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, req: p.ControlRequest, peer: PeerInfo) -> p.Ok | p.Err:
        self.seen.append(p.request_tag(req))
        if isinstance(req, m.ListProducts):
            await trio.sleep(100)  # longer than any frame deadline in these tests
        return p.Ok(result=m.Done(changed=1))


async def admit_everyone(peer: PeerInfo) -> bool:
    return True


@contextlib.asynccontextmanager
async def serving(sock_dir: str, **kw: Any) -> AsyncIterator[tuple[str, Recorder]]:
    path = os.path.join(sock_dir, "c.sock")
    handler = Recorder()
    kw.setdefault("peer_check", admit_everyone)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                serve_control,
                path,
                handler,
                allowed_uids=frozenset(),
                allowed_gids=frozenset(),
                peer_credentials=peer_from_bound_name,
                **kw,
            )
        )
        yield path, handler
        nursery.cancel_scope.cancel()


_counter = iter(range(1_000_000))


async def connect_as(uid: int, path: str) -> trio.SocketStream:
    # The stdlib's blocking bind and connect (both immediate on a local Unix socket):
    # trio's bind runs in a worker thread, which the autojump clock would jump over.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.path.join(os.path.dirname(path), f"uid{uid}-{next(_counter)}"))
    sock.connect(path)
    await trio.lowlevel.checkpoint()
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


def frame(request: dict[str, Any], rid: str = "r") -> bytes:
    body = json.dumps({"v": 1, "id": rid, "request": request}).encode()
    return struct.pack(">I", len(body)) + body


async def reply_of(stream: trio.SocketStream) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads(await p.receive_frame(stream, p.MAX_REPLY_BYTES))["reply"]
    return reply


async def admitted(stream: trio.SocketStream) -> trio.SocketStream:
    """Prove ``stream`` holds a connection slot: a status request on it is answered."""
    await stream.send_all(frame({"type": "status"}))
    assert (await reply_of(stream))["type"] == "ok"
    return stream


# --------------------------------------------------------------------------------------
# Connections per peer user and in total
# --------------------------------------------------------------------------------------


async def test_a_user_holding_its_connection_limit_stalled_cannot_lock_out_another(
    sock_dir: str,
) -> None:
    async with serving(sock_dir, max_connections=10, max_connections_per_peer=4) as (path, _):
        with trio.fail_after(20):
            hog = [await admitted(await connect_as(1001, path)) for _ in range(4)]
            for stream in hog:  # each stalls mid-frame, holding its slot
                await stream.send_all(struct.pack(">I", 100) + b'{"v":1,')
            await trio.testing.wait_all_tasks_blocked()
            fifth = await connect_as(1001, path)
            refused = await reply_of(fifth)
            assert refused["code"] == "unavailable"
            assert "user id 1001" in refused["message"] and "per user" in refused["message"]
            assert refused["hint"] == "try again in a moment"
            assert await fifth.receive_some(100) == b""  # and closed
            # Another operator is served while the hog keeps its four connections.
            assert await call(path, p.Status()) == m.Done(changed=1)
            other = [await admitted(await connect_as(1002, path)) for _ in range(4)]
            # The global cap still holds: a third user takes the last two slots, a
            # fourth is told the daemon is full.
            third = [await admitted(await connect_as(1003, path)) for _ in range(2)]
            full = await reply_of(await connect_as(1004, path))
            assert full["code"] == "unavailable"
            assert "serving 10 control connections" in full["message"]
            for stream in hog + other + third:
                await stream.aclose()
            await trio.testing.wait_all_tasks_blocked()
            # Slots come back when connections close.
            assert await call(path, p.Status()) == m.Done(changed=1)


async def test_root_and_the_daemons_own_user_are_not_capped_per_user(sock_dir: str) -> None:
    # Unbound test sockets count as this process's user, which is the daemon's own.
    async with serving(sock_dir, max_connections=10, max_connections_per_peer=2) as (path, _):
        with trio.fail_after(20):
            mine = [await admitted(await trio.open_unix_socket(path)) for _ in range(5)]
            assert await call(path, p.Status()) == m.Done(changed=1)
            # ...but the global cap holds for them too.
            more = [await admitted(await trio.open_unix_socket(path)) for _ in range(5)]
            full = await reply_of(await trio.open_unix_socket(path))
            assert full["code"] == "unavailable"
            for stream in mine + more:
                await stream.aclose()


async def test_a_client_turned_away_for_a_full_daemon_waits_and_is_served_once_a_slot_frees(
    sock_dir: str,
) -> None:
    async with serving(sock_dir, max_connections=3, max_connections_per_peer=3) as (path, h):
        with trio.fail_after(20):
            hog = [await admitted(await connect_as(1001, path)) for _ in range(3)]
            served: list[object] = []

            async def operator() -> None:
                served.append(await call(path, m.SetStock(sku="A", quantity=1), timeout=10))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(operator)
                await trio.sleep(0.3)  # refused at least once meanwhile
                assert served == [] and "stock_set" not in h.seen
                await hog[0].aclose()
            assert served == [m.Done(changed=1)]
            assert h.seen.count("stock_set") == 1
            for stream in hog[1:]:
                await stream.aclose()


# --------------------------------------------------------------------------------------
# Memory of frames in flight
# --------------------------------------------------------------------------------------


async def test_frames_in_flight_are_bounded_per_user_and_in_total_and_small_requests_pass(
    sock_dir: str,
) -> None:
    big = 1 * MiB
    async with serving(
        sock_dir, max_buffered_bytes=3 * big, max_buffered_bytes_per_peer=2 * big
    ) as (path, handler):
        with trio.fail_after(20):
            # User 1001 announces two 1 MiB frames and stalls half-way through each.
            stalled = []
            for _ in range(2):
                stream = await connect_as(1001, path)
                await stream.send_all(struct.pack(">I", big) + b"x" * 1000)
                stalled.append(stream)
            await trio.testing.wait_all_tasks_blocked()
            # A third would take 1001 past its 2 MiB: refused before its body is read.
            third = await connect_as(1001, path)
            await third.send_all(struct.pack(">I", big) + b"x" * 1000)
            refused = await reply_of(third)
            assert refused["code"] == "unavailable"
            assert "per user" in refused["message"] and str(big) in refused["message"]
            # User 1002 gets the last 1 MiB of the 3 MiB in total, user 1003 nothing.
            stalled.append(await connect_as(1002, path))
            await stalled[-1].send_all(struct.pack(">I", big) + b"x" * 1000)
            await trio.testing.wait_all_tasks_blocked()
            late = await connect_as(1003, path)
            await late.send_all(struct.pack(">I", big))
            full = await reply_of(late)
            assert full["code"] == "unavailable" and "its 3145728-byte limit" in full["message"]
            # Small requests never wait for the budget: another operator is served...
            assert await call(path, p.Status()) == m.Done(changed=1)
            # ...and a large one from them is told to try again, with nothing applied.
            csv = "sku,quantity\n" + "A,1\n" * (2 * SMALL_FRAME_BYTES // 4)
            with pytest.raises(RemoteError) as info:
                # goqctl waits and sends again while the daemon is full (nothing was
                # read): within its timeout it is told to try again later.
                await call(path, p.StockImport(csv_text=csv), timeout=1)
            assert info.value.code == "unavailable" and "try again" in info.value.hint
            assert "stock_import" not in handler.seen
            # The budget comes back when the stalled senders go away.
            for stream in stalled:
                await stream.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert await call(path, p.StockImport(csv_text=csv)) == m.Done(changed=1)
            assert handler.seen.count("stock_import") == 1


# --------------------------------------------------------------------------------------
# Slow senders
# --------------------------------------------------------------------------------------


async def test_a_sender_trickling_bytes_is_cut_off_at_the_frame_deadline(
    autojump_clock: trio.testing.MockClock, sock_dir: str
) -> None:
    async with serving(sock_dir, idle_timeout=30.0, frame_timeout=10.0) as (path, _):
        stream = await trio.open_unix_socket(path)
        closed_at: list[float] = []

        async def watch_close() -> None:
            assert await stream.receive_some(100) == b""
            closed_at.append(trio.current_time())

        with trio.fail_after(1000):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_close)
                start = trio.current_time()
                await stream.send_all(struct.pack(">I", 200))
                # One byte every 9 s: never idle for the 30 s idle timeout, never
                # silent for 10 s, but the frame is not done 10 s after it began.
                with contextlib.suppress(trio.BrokenResourceError):
                    while not closed_at:
                        await trio.sleep(9)
                        await stream.send_all(b"x")
            await stream.aclose()
            assert 10.0 <= closed_at[0] - start <= 10.5
            assert await call(path, p.Status()) == m.Done(changed=1)


async def test_a_handler_slower_than_the_frame_deadline_is_still_answered(
    autojump_clock: trio.testing.MockClock, sock_dir: str
) -> None:
    async with serving(sock_dir, idle_timeout=30.0, frame_timeout=10.0) as (path, handler):
        with trio.fail_after(1000):
            start = trio.current_time()
            assert await call(path, m.ListProducts(), timeout=500) == m.Done(changed=1)
            assert trio.current_time() - start >= 100  # the handler's own time
        assert handler.seen == ["products"]


# --------------------------------------------------------------------------------------
# Refusals are logged without flooding
# --------------------------------------------------------------------------------------


async def test_refused_peers_are_logged_once_then_as_a_summary_a_minute(
    autojump_clock: trio.testing.MockClock, sock_dir: str
) -> None:
    async def refuse_strangers(peer: PeerInfo) -> bool:
        return peer.uid not in (4242, 4343)

    with structlog.testing.capture_logs() as logs:
        async with serving(sock_dir, peer_check=refuse_strangers) as (path, _):
            with trio.fail_after(1000):
                for _ in range(30):
                    refused = await reply_of(await connect_as(4242, path))
                    assert refused["code"] == "not_allowed"
                await reply_of(await connect_as(4343, path))
                mid = [e for e in logs if e["event"] == "control_peer_refused"]
                await trio.sleep(61)  # the summary is written without a new refusal
    lines = [e for e in logs if e["event"] == "control_peer_refused"]
    # 31 refusals, three lines: the first of each user at once, then 4242's summary.
    assert [(e["peer_uid"], e["count"]) for e in mid] == [(4242, 1), (4343, 1)]
    assert [(e["peer_uid"], e["count"]) for e in lines] == [(4242, 1), (4343, 1), (4242, 29)]
    assert all(e["log_level"] == "warning" for e in lines)
    assert lines[-1]["refused_total"] == 31


async def test_connections_refused_over_the_limit_are_logged_once_per_user(
    sock_dir: str,
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with serving(sock_dir, max_connections_per_peer=1) as (path, _):
            with trio.fail_after(20):
                holder = await admitted(await connect_as(1001, path))
                for _ in range(20):
                    assert (await reply_of(await connect_as(1001, path)))["code"] == "unavailable"
                await holder.aclose()
    refused = [e for e in logs if e["event"] == "control_connection_refused"]
    assert len(refused) == 1 and refused[0]["peer_uid"] == 1001
