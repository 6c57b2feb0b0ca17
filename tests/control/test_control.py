"""Control socket: protocol, server and client over a real Unix socket.

Covers docs/reliability.md X1 and X3.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import socket
import stat
import struct
import typing
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import structlog
import trio
import trio.testing

from goqd import messages as m
from goqd.control import protocol as p
from goqd.control.client import DaemonUnreachable, RemoteError, call
from goqd.control.server import PeerInfo, accept_retrying, peer_allowed, serve_control
from goqd.errors import ControlError
from tests.helpers.control import (
    envelope,
    raw_exchange,
    serving,
)

CANARY = "CANARY-key-7f3a9c1e5b"


# --------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------


@pytest.fixture
def sock_path(sock_dir: str) -> str:
    return os.path.join(sock_dir, "c.sock")


class FakeDaemon:
    """A handler that answers a few request types and records what it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[p.ControlRequest, PeerInfo]] = []

    async def __call__(self, req: p.ControlRequest, peer: PeerInfo) -> p.Ok | p.Err:
        self.seen.append((req, peer))
        match req:
            case m.SetStock():
                return p.Ok(
                    result=m.StockChanged(sku=req.sku, total=req.quantity, delta=2, movement_id=7)
                )
            case m.ListProducts():
                return p.Ok(
                    result=m.ProductList(
                        products=(
                            m.ProductRecord(
                                sku="A-1", name="緑茶 500ml", total=3, first_store="r1", listings=2
                            ),
                        )
                    )
                )
            case m.GetHistory():
                return p.Ok(result=m.History(sku=req.sku, total=4, movements=()))
            case p.Stores():
                return p.Ok(result=p.StoreList(stores=()))
            case p.KeySet():
                return p.Ok(result=m.Done(changed=1, detail="credential stored"))
            case m.DeleteProduct(sku="boom"):
                raise RuntimeError("handler bug")
            case m.DeleteProduct():
                return p.Err(code="not_found", message=f"unknown SKU {req.sku!r}")
        return p.Ok(result=m.Done())


@pytest.fixture
async def served(sock_path: str) -> AsyncIterator[tuple[str, FakeDaemon]]:
    daemon = FakeDaemon()
    async with serving(sock_path, daemon):
        yield sock_path, daemon


# --------------------------------------------------------------------------------------
# Happy path
# --------------------------------------------------------------------------------------


async def test_round_trip_of_several_request_types_returns_handler_results(
    served: tuple[str, FakeDaemon],
) -> None:
    path, daemon = served
    with trio.fail_after(10):
        changed = await call(path, m.SetStock(sku="A-1", quantity=5, reason="棚卸"))
        products = await call(path, m.ListProducts(limit=10))
        history = await call(path, m.GetHistory(sku="A-1"))
        stores = await call(path, p.Stores())
    assert changed == m.StockChanged(sku="A-1", total=5, delta=2, movement_id=7)
    assert isinstance(products, m.ProductList)
    assert products.products[0].name == "緑茶 500ml"
    assert history == m.History(sku="A-1", total=4, movements=())
    assert stores == p.StoreList(stores=())
    reqs = [r for r, _ in daemon.seen]
    assert isinstance(reqs[0], m.SetStock) and reqs[0].reason == "棚卸"
    assert reqs[1] == m.ListProducts(limit=10)
    peer = daemon.seen[0][1]
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())


async def test_mutating_request_carries_envelope_id_as_request_id(
    served: tuple[str, FakeDaemon],
) -> None:
    path, daemon = served
    with trio.fail_after(10):
        await call(path, m.SetStock(sku="A-1", quantity=1), request_id="abc123")
        await call(path, m.SetStock(sku="A-1", quantity=1), request_id="abc123")
        await call(path, m.GetHistory(sku="A-1"), request_id="def456")
    first, second, read = (r for r, _ in daemon.seen)
    # The same id twice is what lets the ledger apply a retried request once (X1).
    assert isinstance(first, m.SetStock) and first.request_id == "abc123"
    assert isinstance(second, m.SetStock) and second.request_id == "abc123"
    assert not hasattr(read, "request_id")


async def test_socket_is_mode_0660_and_removed_on_exit(sock_path: str) -> None:
    with trio.fail_after(10):
        async with serving(sock_path, FakeDaemon()):
            st = os.stat(sock_path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o660
    assert not await trio.Path(sock_path).exists()


async def test_missing_parent_directory_is_created(sock_path: str) -> None:
    nested = os.path.join(os.path.dirname(sock_path), "run", "c.sock")
    with trio.fail_after(10):
        async with serving(nested, FakeDaemon()):
            assert await call(nested, p.Status()) == m.Done()


async def test_stale_socket_is_replaced(sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # the file stays behind, as after a SIGKILL
    with trio.fail_after(10):
        async with serving(sock_path, FakeDaemon()):
            assert await call(sock_path, p.Status()) == m.Done()


async def test_regular_file_or_live_socket_at_the_path_refuses_the_start(sock_path: str) -> None:
    await trio.Path(sock_path).write_text("not a socket")
    with pytest.raises(ControlError, match="not a socket"):
        await serve_control(
            sock_path, FakeDaemon(), allowed_uids=frozenset(), allowed_gids=frozenset()
        )
    assert await trio.Path(sock_path).read_text() == "not a socket"  # untouched
    os.unlink(sock_path)

    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(sock_path)
    live.listen(1)
    try:
        with pytest.raises(ControlError, match="already serving"):
            await serve_control(
                sock_path, FakeDaemon(), allowed_uids=frozenset(), allowed_gids=frozenset()
            )
        assert await trio.Path(sock_path).exists()
    finally:
        live.close()


# --------------------------------------------------------------------------------------
# Malformed, oversized, hostile (X3)
# --------------------------------------------------------------------------------------

BAD_REQUESTS = [
    pytest.param(b"{not json", "bad_request", "malformed", id="malformed-json"),
    pytest.param(
        envelope({"type": "frobnicate"}), "bad_request", "$.request.type", id="unknown-tag"
    ),
    pytest.param(
        envelope({"type": "stock_set", "sku": "A", "quantity": "5"}),
        "bad_request",
        "$.request.quantity",
        id="wrong-field-type",
    ),
    pytest.param(
        envelope({"type": "stock_set", "sku": "A", "quantity": -1}),
        "bad_request",
        "$.request.quantity",
        id="negative-quantity",
    ),
    pytest.param(
        envelope({"type": "status", "extra": 1}), "bad_request", "unknown field", id="unknown-field"
    ),
    pytest.param(
        envelope({"type": "pause", "store": ""}), "bad_request", "$.request.store", id="empty-name"
    ),
    pytest.param(
        envelope(
            {"type": "listing_set", "store": "s", "listing_key": "k", "restock_date": "2025-02-30"}
        ),
        "bad_request",
        "not a calendar date",
        id="impossible-date",
    ),
    pytest.param(
        envelope({"type": "errors_clear"}), "bad_request", "ids or a store", id="clear-nothing"
    ),
    pytest.param(b"[1, 2]", "bad_request", "not a goqd request", id="not-an-object"),
    pytest.param(
        b'{"v":1,"id":"r1","request":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "bad_request",
        "nested too deeply",
        id="deep-nesting",
    ),
    pytest.param(
        b'{"v":1,"id":"r1","request":{"type":"status","x":'
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}}",
        "bad_request",
        "nested too deeply",
        id="deep-nesting-in-an-unknown-field",
    ),
    pytest.param(
        envelope({"type": "some_future_request"}, v=2),
        "unsupported_version",
        "version 2",
        id="wrong-version",
    ),
]


@pytest.mark.parametrize(("body", "code", "fragment"), BAD_REQUESTS)
async def test_bad_request_gets_error_reply_and_server_keeps_serving(
    served: tuple[str, FakeDaemon], body: bytes, code: str, fragment: str
) -> None:
    path, daemon = served
    with trio.fail_after(10):
        reply = await raw_exchange(path, body)
        assert reply["reply"]["type"] == "err"
        assert reply["reply"]["code"] == code
        assert fragment in reply["reply"]["message"]
        assert daemon.seen == []  # never reached the handler
        assert await call(path, p.Status()) == m.Done()


async def test_bad_request_leaves_the_connection_usable(served: tuple[str, FakeDaemon]) -> None:
    path, _ = served
    with trio.fail_after(10):
        stream = await trio.open_unix_socket(path)
        async with stream:
            for body in (b"{oops", envelope({"type": "status"}, rid="next")):
                await stream.send_all(struct.pack(">I", len(body)) + body)
            first = json.loads(await p.receive_frame(stream, p.MAX_REPLY_BYTES))
            second = json.loads(await p.receive_frame(stream, p.MAX_REPLY_BYTES))
    assert first["reply"]["code"] == "bad_request"
    assert second["id"] == "next" and second["reply"]["type"] == "ok"


async def test_oversized_frame_gets_too_large_and_is_closed(served: tuple[str, FakeDaemon]) -> None:
    path, daemon = served
    with trio.fail_after(10):
        # Announce 2 MiB but send only a little: the server must answer without reading it.
        reply = await raw_exchange(path, b"x" * 1000, announce=2 * p.MAX_REQUEST_BYTES)
        assert reply["reply"]["code"] == "too_large"
        # A real oversized body, sent in full by the client library, is refused locally.
        with pytest.raises(ControlError, match="at most"):
            await call(path, p.StockImport(csv_text="x" * (p.MAX_REQUEST_BYTES + 10)))
        # And one that really goes out over the wire gets the server's refusal.
        big = envelope({"type": "stock_import", "csv_text": "y" * (p.MAX_REQUEST_BYTES + 10)})
        reply = await raw_exchange(path, big)
        assert reply["reply"]["code"] == "too_large"
        assert daemon.seen == []
        assert await call(path, p.Status()) == m.Done()


async def test_handler_exception_yields_internal_and_server_survives(
    served: tuple[str, FakeDaemon],
) -> None:
    path, _ = served
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        with pytest.raises(RemoteError) as info:
            await call(path, m.DeleteProduct(sku="boom"))
        assert await call(path, p.Status()) == m.Done()
    assert info.value.code == "internal"
    assert "journalctl" in info.value.hint
    failed = [e for e in logs if e["event"] == "control_request_failed"]
    assert len(failed) == 1 and failed[0]["request"] == "delete_product"


async def test_err_reply_from_handler_becomes_remote_error(served: tuple[str, FakeDaemon]) -> None:
    path, _ = served
    with trio.fail_after(10), pytest.raises(RemoteError) as info:
        await call(path, m.DeleteProduct(sku="nope"))
    assert info.value.code == "not_found"
    assert "nope" in info.value.message


async def test_idle_connection_is_closed_after_timeout(
    autojump_clock: trio.testing.MockClock, sock_path: str
) -> None:
    async with serving(sock_path, FakeDaemon(), idle_timeout=30.0):
        with trio.fail_after(100):
            start = trio.current_time()
            silent = await trio.open_unix_socket(sock_path)
            assert await silent.receive_some(100) == b""  # closed by the server
            assert trio.current_time() - start >= 30.0
            await silent.aclose()
            # A stalled sender (half a frame, then nothing) is cut off by the frame's
            # own deadline, sooner than an idle connection.
            start = trio.current_time()
            slow = await trio.open_unix_socket(sock_path)
            await slow.send_all(struct.pack(">I", 100) + b'{"v":1')
            assert await slow.receive_some(100) == b""
            assert 10.0 <= trio.current_time() - start < 30.0
            await slow.aclose()
            # And the server still answers.
            assert await call(sock_path, p.Status()) == m.Done()


async def test_connections_over_the_limit_get_unavailable(sock_path: str) -> None:
    async with serving(sock_path, FakeDaemon(), max_connections=1):
        with trio.fail_after(10):
            holder = await trio.open_unix_socket(sock_path)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(RemoteError) as info:
                # The client keeps trying while the daemon is full; past its timeout it
                # reports the refusal.
                await call(sock_path, p.Status(), timeout=0.5)
            assert info.value.code == "unavailable"
            await holder.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert await call(sock_path, p.Status()) == m.Done()


# --------------------------------------------------------------------------------------
# Peer credentials
# --------------------------------------------------------------------------------------


async def test_running_out_of_file_handles_delays_accepts_and_is_logged_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Shared by the control and HTTP listeners: while every accept fails with EMFILE
    (10 a second), one warning, then one line when a connection comes through."""
    accepted = object()

    class ExhaustedListener:
        failures = 50

        async def accept(self) -> object:
            await trio.lowlevel.checkpoint()
            if self.failures:
                self.failures -= 1
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return accepted

    listener: Any = ExhaustedListener()
    log = structlog.get_logger("test")
    with structlog.testing.capture_logs() as logs:
        start = trio.current_time()
        assert await accept_retrying(listener, log, "control") is accepted
    assert trio.current_time() - start == pytest.approx(5.0)
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("control_accept_failed", "warning"),
        ("control_accept_recovered", "info"),
    ]
    assert logs[0]["error"] == "Too many open files"

    class ClosedListener:
        async def accept(self) -> object:
            await trio.lowlevel.checkpoint()
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    # Any other failure is not waited out.
    with pytest.raises(OSError) as info:
        await accept_retrying(typing.cast(Any, ClosedListener()), log, "control")
    assert info.value.errno == errno.EBADF


@pytest.mark.parametrize(
    ("peer", "groups", "allowed"),
    [
        (PeerInfo(pid=1, uid=0, gid=0), frozenset(), True),  # root
        (PeerInfo(pid=1, uid=990, gid=990), frozenset(), True),  # the daemon's own user
        (PeerInfo(pid=1, uid=1001, gid=1001), frozenset(), True),  # listed user
        (PeerInfo(pid=1, uid=1002, gid=500), frozenset(), True),  # primary group listed
        (PeerInfo(pid=1, uid=1003, gid=1003), frozenset({1003, 500}), True),  # supplementary
        (PeerInfo(pid=1, uid=1004, gid=1004), frozenset({1004, 27}), False),  # other groups
        (PeerInfo(pid=1, uid=1005, gid=1005), frozenset(), False),  # nobody in particular
    ],
)
def test_peer_allowed_admits_root_self_listed_users_and_group_members(
    peer: PeerInfo, groups: frozenset[int], allowed: bool
) -> None:
    assert (
        peer_allowed(
            peer,
            own_uid=990,
            allowed_uids=frozenset({1001}),
            allowed_gids=frozenset({500}),
            peer_groups=groups,
        )
        is allowed
    )


async def test_disallowed_peer_gets_not_allowed_and_never_reaches_the_handler(
    sock_path: str,
) -> None:
    daemon = FakeDaemon()
    checked: list[PeerInfo] = []

    async def refuse(peer: PeerInfo) -> bool:
        checked.append(peer)
        # The real rule, deciding as if the peer were another, unlisted user (the test
        # process is root or the daemon's own user, both of which are always admitted).
        stranger = PeerInfo(pid=peer.pid, uid=4242, gid=4242)
        return peer_allowed(
            stranger, own_uid=990, allowed_uids=frozenset({1001}), allowed_gids=frozenset({500})
        )

    async with serving(sock_path, daemon, peer_check=refuse):
        with (
            trio.fail_after(10),
            structlog.testing.capture_logs() as logs,
            pytest.raises(RemoteError) as info,
        ):
            await call(sock_path, m.SetStock(sku="A", quantity=1))
    assert info.value.code == "not_allowed"
    assert "group" in info.value.hint
    assert daemon.seen == []
    assert checked and checked[0].uid == os.getuid()
    assert any(e["event"] == "control_peer_refused" for e in logs)


@pytest.mark.parametrize("configured", [True, False], ids=["group", "no-group"])
async def test_refusal_hint_names_the_configured_group_or_who_may_connect(
    sock_path: str, configured: bool
) -> None:
    # The process's own primary group: one the socket can always be given to.
    gid = os.getgid()
    group = grp.getgrgid(gid).gr_name

    async def refuse(peer: PeerInfo) -> bool:
        return False

    async with serving(
        sock_path,
        FakeDaemon(),
        allowed_gids=frozenset({gid}) if configured else frozenset(),
        peer_check=refuse,
    ):
        with trio.fail_after(10), pytest.raises(RemoteError) as info:
            await call(sock_path, p.Status())
    assert info.value.code == "not_allowed"
    if configured:
        assert f"{group!r} group" in info.value.hint and f"-aG {group} " in info.value.hint
    else:
        # No group admits anyone: joining "goqd" (or any group) would not help.
        assert "only root and the daemon's user" in info.value.hint
        assert "goqd" not in info.value.hint and "usermod" not in info.value.hint


# --------------------------------------------------------------------------------------
# Credentials never leak; every mutating request is logged with its peer
# --------------------------------------------------------------------------------------


async def test_keyset_credentials_never_appear_in_logs_or_replies(
    served: tuple[str, FakeDaemon],
) -> None:
    path, daemon = served
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        done = await call(path, p.KeySet(store="r1", credentials={"license_key": CANARY}))
        # A malformed KeySet (a number among the fields) is refused without echoing it.
        bad = envelope(
            {"type": "key_set", "store": "r1", "credentials": {"license_key": CANARY, "n": 5}}
        )
        reply = await raw_exchange(path, bad)
    assert done == m.Done(changed=1, detail="credential stored")
    assert reply["reply"]["code"] == "bad_request"
    assert CANARY not in json.dumps(reply)
    assert CANARY not in repr(logs) and CANARY not in msgspec.json.encode(done).decode()
    seen = daemon.seen[0][0]
    assert isinstance(seen, p.KeySet) and seen.credentials == {"license_key": CANARY}
    assert CANARY not in repr(seen)
    logged = [e for e in logs if e["event"] == "control_request"]
    assert logged[0]["request"] == "key_set" and logged[0]["store"] == "r1"


async def test_mutating_requests_are_logged_with_their_peer_and_reads_are_not(
    served: tuple[str, FakeDaemon],
) -> None:
    path, _ = served
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        await call(path, m.AdjustStock(sku="A-1", delta=-2, reason="破損"), request_id="rid9")
        await call(path, m.ListProducts())
    logged = [e for e in logs if e["event"] == "control_request"]
    assert len(logged) == 1
    entry = logged[0]
    assert entry["request"] == "stock_adjust" and entry["request_id"] == "rid9"
    assert (entry["sku"], entry["delta"], entry["reason"]) == ("A-1", -2, "破損")
    assert (entry["peer_pid"], entry["peer_uid"]) == (os.getpid(), os.getuid())


def test_is_mutating_covers_every_state_changing_request() -> None:
    mutating: list[p.ControlRequest] = [
        m.ClearErrors(ids=(1,)),
        p.KeySet(store="s", credentials={"a": "b"}),
        p.Pause(store="s"),
        p.Resume(store="s"),
        p.PollNow(store="s"),
        m.Link(store="s", listing_key="k", sku="x"),
        m.Unlink(store="s", listing_key="k"),
        p.LinkAuto(),
        m.SetStock(sku="x", quantity=1),
        m.AdjustStock(sku="x", delta=1),
        m.SetListingAttrs(store="s", listing_key="k"),
        m.DeleteProduct(sku="x"),
        p.ProductAdd(sku="x", quantity=1),
        p.Import(store="s"),
        p.Reflect(store="s"),
        p.StockImport(csv_text=""),
    ]
    reads: list[p.ControlRequest] = [
        p.Status(),
        p.Stores(),
        m.ListErrors(),
        m.ListParked(),
        m.ListProducts(),
        m.ListListings(store="s"),
        m.GetHistory(sku="x"),
        p.Diff(store="s"),
    ]
    assert all(p.is_mutating(r) for r in mutating)
    assert not any(p.is_mutating(r) for r in reads)
    # Every request type is classified here, so a new one cannot slip past this test.
    assert {type(r) for r in mutating + reads} == set(typing.get_args(p.ControlRequest))


def test_every_request_the_socket_decodes_has_one_handler_row() -> None:
    from goqd.control.operator import HANDLERS

    # A request type the daemon decodes but has no row for would be answered "not
    # served by this goqd version"; a row for a type it never decodes is dead.
    assert set(HANDLERS) == set(typing.get_args(p.ControlRequest))


@pytest.mark.parametrize(
    ("request_", "wire"),
    [
        (m.SetStock(sku="A-1", quantity=5), {"type": "stock_set", "sku": "A-1", "quantity": 5}),
        (m.GetHistory(sku="A-1"), {"type": "history", "sku": "A-1"}),
        (m.ListErrors(level=9), {"type": "errors", "level": 9}),
        (
            m.Link(store="s", listing_key="k", sku="x"),
            {"type": "link_listing", "store": "s", "listing_key": "k", "sku": "x"},
        ),
    ],
)
def test_ledger_requests_go_on_the_wire_as_the_socket_always_spelled_them(
    request_: p.ControlRequest, wire: dict[str, Any]
) -> None:
    # These requests are the ledger's own Structs: their tags and left-out defaults are
    # the control socket's, so an older goqctl and this one send the same bytes.
    assert json.loads(msgspec.json.encode(request_)) == wire
    assert msgspec.json.decode(json.dumps(wire), type=p.ControlRequest) == request_


def test_a_field_the_socket_does_not_take_is_refused_on_a_ledger_request() -> None:
    body = json.dumps(
        {"v": 1, "id": "x", "request": {"type": "stock_set", "sku": "A", "quantity": 1, "oops": 1}}
    ).encode()
    with pytest.raises(p.BadEnvelope) as exc:
        p.decode_request(body)
    assert exc.value.err.code == "bad_request" and "oops" in exc.value.err.message


# --------------------------------------------------------------------------------------
# Client behaviour
# --------------------------------------------------------------------------------------


async def test_client_reports_missing_and_refused_sockets_as_unreachable(sock_path: str) -> None:
    with pytest.raises(DaemonUnreachable, match="no control socket"):
        await call(sock_path, p.Status())
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)  # bound, never listening: connect() is refused
    try:
        with pytest.raises(DaemonUnreachable, match="nothing is listening"):
            await call(sock_path, p.Status())
    finally:
        dead.close()


async def test_client_resends_with_the_same_id_after_a_dropped_connection(sock_path: str) -> None:
    """X1 from the client's side: a retry carries the id of the first attempt."""
    listener_sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener_sock.bind(sock_path)
    listener_sock.listen(4)
    listener = trio.SocketListener(listener_sock)
    ids: list[str] = []

    async def flaky_server() -> None:
        for attempt in range(2):
            stream = await listener.accept()
            async with stream:
                body = await p.receive_frame(stream, p.MAX_REQUEST_BYTES)
                env = p.decode_request(body)
                ids.append(env.id)
                if attempt == 0:
                    continue  # "crash" after reading: no reply
                reply = p.ReplyEnvelope(v=1, id=env.id, reply=p.Ok(result=m.Done(changed=1)))
                await stream.send_all(p.encode_frame(reply))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flaky_server)
        with trio.fail_after(10):
            result = await call(sock_path, m.SetStock(sku="A", quantity=1))
    await listener.aclose()
    assert result == m.Done(changed=1)
    assert len(ids) == 2 and ids[0] == ids[1] and len(ids[0]) == 32


async def test_a_send_lost_before_busy_refusals_still_warns_it_may_be_applied(
    sock_path: str,
) -> None:
    """Busy refusals (nothing read) are retried without counting as sends, and do not
    make the client forget that an earlier send was lost after the daemon read it."""
    listener_sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener_sock.bind(sock_path)
    listener_sock.listen(4)
    listener = trio.SocketListener(listener_sock)
    ids: list[str] = []
    busy = p.ReplyEnvelope(v=1, id="", reply=p.Err(code="unavailable", message="full"))

    async def server_that_reads_then_is_busy_then_goes_away() -> None:
        stream = await listener.accept()
        async with stream:  # read it, then "crash": no reply
            ids.append(p.decode_request(await p.receive_frame(stream, p.MAX_REQUEST_BYTES)).id)
        for _ in range(3):
            stream = await listener.accept()
            async with stream:
                await stream.send_all(p.encode_frame(busy))
        await listener.aclose()
        os.unlink(sock_path)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_that_reads_then_is_busy_then_goes_away)
        with trio.fail_after(10), pytest.raises(DaemonUnreachable) as info:
            await call(sock_path, m.SetStock(sku="A", quantity=1), attempts=2)
    assert len(ids) == 1
    assert "no control socket" in info.value.reason
    assert "may or may not have been applied" in info.value.hint


async def test_client_times_out_as_unreachable_with_a_may_be_applied_hint(
    autojump_clock: trio.testing.MockClock, sock_path: str
) -> None:
    async def slow(req: p.ControlRequest, peer: PeerInfo) -> p.Ok | p.Err:
        await trio.sleep(1000)
        return p.Ok(result=m.Done())

    async with serving(sock_path, slow):
        with trio.fail_after(100), pytest.raises(DaemonUnreachable) as info:
            await call(sock_path, m.SetStock(sku="A", quantity=1), timeout=5)
    assert "within 5 seconds" in str(info.value)
    assert "applied" in info.value.hint
