"""Hypothesis over the control protocol, against a real daemon on a real Unix socket.

One daemon (``run_daemon`` with simulated Rakuten and Shopify stores, its real ledger
file, its real control server) runs in a background thread for the whole module; every
example talks to it over the socket with plain blocking sockets, as a hostile local
client would. The properties, for random frames, random envelopes and every request type
with hostile field values:

* every complete frame is answered with a well-formed ``Ok`` or ``Err`` (never
  ``internal``), and anything else ends in a clean close, never a hang;
* the daemon keeps serving: a ``status`` request after each example is answered;
* nothing changed on refusal: when every reply was an ``Err``, the ledger's products,
  links, movements, errors and parked lines, and every credential file, are as before.

The stores are paused (so no poll or push changes the ledger behind the test's back)
and paused again after any request that succeeded. ``GOQD_FUZZ_EXAMPLES`` scales the
number of examples (CI can run more than the default; ``tests.helpers.fuzz``).

The client side is fuzzed too, without a daemon: whatever reply bytes come back,
goqctl reports an error or prints a result, and never raises.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import socket
import struct
import tempfile
import time
import typing
import uuid
from collections.abc import Iterator
from typing import Any
from unittest import mock

import msgspec
import msgspec.inspect as mi
import pytest
import structlog
from hypothesis import event, given
from hypothesis import strategies as st

from goqd import messages as m
from goqd.cli import goqctl
from goqd.control import protocol as p
from goqd.control.client import RemoteError
from goqd.errors import ControlError
from goqd.ledger import queries
from tests.helpers import rig
from tests.helpers.daemon_thread import daemon_in_thread
from tests.helpers.fuzz import fuzz_settings

FUZZ = fuzz_settings(300)
STORES = (("ra", "rakuten"), ("sh", "shopify"))
REQUEST_TYPES: tuple[type[Any], ...] = typing.get_args(p.ControlRequest)
# A reply must come within this; the server's own deadlines are 10 s (frame) and 30 s.
REPLY_TIMEOUT = 60.0


# --------------------------------------------------------------------------------------
# The daemon, in a thread of its own
# --------------------------------------------------------------------------------------


class LiveDaemon:
    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.socket = ""
        self.ledger = ""
        self.skus: list[str] = []
        self.keys: list[str] = []
        self.logs: list[Any] = []


@pytest.fixture(scope="module")
def live() -> Iterator[LiveDaemon]:
    tmp = tempfile.mkdtemp(prefix="gqf-", dir="/tmp")
    daemon = LiveDaemon(tmp)
    fleet = rig.build_fleet(STORES, clock=time.time)
    daemon.skus = list(fleet.initial)
    daemon.keys = [key for keys in fleet.keys.values() for key in keys.values()]
    try:
        with structlog.testing.capture_logs() as logs, daemon_in_thread(fleet, tmp) as run:
            daemon.logs = logs
            daemon.socket = run.socket
            daemon.ledger = run.ledger_path
            pause_all(daemon)
            yield daemon
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # No request, however hostile, reached an unhandled exception anywhere.
    crashes = [
        e for e in logs if e["event"] in ("control_connection_failed", "control_request_failed")
    ]
    assert not crashes, crashes[:3]


# --------------------------------------------------------------------------------------
# A hostile client's tools
# --------------------------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def envelope_bytes(request: Any, *, v: Any = 1, rid: Any = None) -> bytes:
    return json.dumps({"v": v, "id": rid or uuid.uuid4().hex, "request": request}).encode()


def exchange(path: str, data: bytes) -> list[p.Reply]:
    """Send ``data``, end the sending side and read every reply until the daemon closes.

    Fails the test if a reply is malformed, if the stream ends mid-frame, or if the
    daemon neither answers nor closes within ``REPLY_TIMEOUT``.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(REPLY_TIMEOUT)
        s.connect(path)
        # The daemon may refuse and close before reading everything (too_large,
        # unavailable): its reply is still there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        received = bytearray()
        while True:
            try:
                chunk = s.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    replies: list[p.Reply] = []
    while received:
        assert len(received) >= 4, f"a partial reply header: {bytes(received)!r}"
        (size,) = struct.unpack(">I", received[:4])
        assert len(received) >= 4 + size, "a partial reply"
        envelope = p.decode_reply(bytes(received[4 : 4 + size]))
        replies.append(envelope.reply)
        del received[: 4 + size]
    for reply in replies:
        assert not (isinstance(reply, p.Err) and reply.code == "internal"), reply
        if isinstance(reply, p.Err):
            assert reply.code in p.ERROR_CODES and reply.message, reply
    return replies


def request(path: str, req: p.ControlRequest) -> p.Reply:
    replies = exchange(
        path, frame(msgspec.json.encode(p.Envelope(v=1, id=uuid.uuid4().hex, request=req)))
    )
    assert len(replies) == 1
    return replies[0]


def assert_serving(live: LiveDaemon) -> None:
    reply = request(live.socket, p.Status())
    assert isinstance(reply, p.Ok) and isinstance(reply.result, p.DaemonStatus), reply


def pause_all(live: LiveDaemon) -> None:
    for store, _ in STORES:
        assert isinstance(request(live.socket, p.Pause(store=store)), p.Ok)


def snapshot(live: LiveDaemon) -> dict[str, Any]:
    """What a refused request must leave alone (fields only requests change)."""
    with queries.open_read_only(live.ledger) as conn:
        moves = queries.movements(conn)
        pages = [
            queries.list_listings(conn, m.ListListings(store=store, limit=10_000))
            for store, _ in STORES
        ]
        snap: dict[str, Any] = {
            "products": [(r.sku, r.name, r.total, r.first_store) for r in queries.products(conn)],
            "listings": [
                (r.store, r.listing_key, r.link_code, r.sku, r.link_state, r.attrs)
                for page in pages
                for r in page.listings
            ],
            "movements": (len(moves), max((mv.id for mv in moves), default=None)),
            "errors": [(e.id, e.cleared_at) for e in queries.errors(conn)],
            "parked": [(r.store, r.order_id, r.line_id) for r in queries.parked_lines(conn)],
        }
    files = {}
    for root, _, names in os.walk(live.tmp):
        for name in names:
            full = os.path.join(root, name)
            if name.endswith(".json") and os.path.isfile(full):
                with open(full, "rb") as f:
                    files[full] = hashlib.sha256(f.read()).hexdigest()
    snap["credential_files"] = files
    return snap


def check(live: LiveDaemon, data: bytes) -> list[p.Reply]:
    """The three properties for one example."""
    before = snapshot(live)
    replies = exchange(live.socket, data)
    if all(isinstance(r, p.Err) for r in replies):
        assert snapshot(live) == before
    else:
        pause_all(live)  # a Resume or a KeySet that succeeded must not start polling
    assert_serving(live)
    return replies


# --------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------

EDGE_INTS = [
    0,
    -1,
    1,
    2**31 - 1,
    2**31,
    2**53 + 1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64,
    10**30,
    -(10**30),
    10**400,
]
EDGE_TEXT = ["ra", "sh", "", "\x00", "a\x00b", "\x1b[2J", "\u202e", "商品", "%s%n"]
hostile_ints = st.one_of(st.integers(-5, 5), st.integers(), st.sampled_from(EDGE_INTS))
hostile_floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e308, -1e308, 5e-324])
)
hostile_text = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(codec="utf-8"), max_size=30),
    st.sampled_from(
        [
            "",
            "\x00",
            "a\x00b",
            "\x1b[2J",
            "\u202e",
            "\ud800",  # a lone surrogate: sent as a JSON escape
            "../../etc/passwd",
            "ra",
            "sh",
            "商品",
            "ｶﾅ",
            "'; DROP TABLE products; --",
            "%s%n",
        ]
    ),
    st.integers(0, 6).map(lambda n: "x" * (10**n)),  # up to a megabyte
    st.sampled_from([100, 101, 128, 129, 255, 256, 512, 513, 1000, 1001, 8192, 8193]).map(
        lambda n: "k" * n
    ),
)
json_scalars = st.one_of(st.none(), st.booleans(), hostile_ints, hostile_floats, hostile_text)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(hostile_text, children, max_size=4)
    ),
    max_leaves=12,
)
DEEP = "__deep_nesting__"
deep_nesting = st.sampled_from([50, 1000, 100_000]).map(lambda n: (DEEP, n))


def with_deep_nesting(body: str, depth: int) -> bytes:
    return body.replace(json.dumps(DEEP), "[" * depth + "]" * depth, 1).encode()


@st.composite
def csv_texts(draw: st.DrawFn, live_skus: list[str]) -> str:
    """Stock or listing CSVs: mostly the right shape, with hostile cells."""
    header = draw(
        st.sampled_from(
            [
                "sku,quantity",
                "sku,delta",
                "sku,quantity,quantity",
                "store,listing_key,sku",
                "",
                "\ufeffsku,quantity",
            ]
        )
        | hostile_text
    )
    cells = st.one_of(
        hostile_text,
        hostile_ints.map(str),
        st.sampled_from(live_skus),
        st.sampled_from(["2026-02-30", "1", "-1", "1e3", '"', '"a,b"']),
    )
    rows = draw(st.lists(st.lists(cells, min_size=0, max_size=4), max_size=6))
    ending = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return ending.join([header, *(",".join(r) for r in rows)])


def for_type(t: mi.Type, live: LiveDaemon, *, valid: bool) -> st.SearchStrategy[Any]:
    """Values for a field of type ``t``. ``valid``: within the protocol's constraints but
    at their edges (NUL bytes, control characters, the longest allowed string, the
    largest allowed number, real store and SKU names), so that the request reaches the
    daemon's handlers; otherwise anything at all."""
    if not valid:
        return st.one_of(for_type(t, live, valid=True), hostile_by_type(t), json_values)
    match t:
        case mi.IntType():
            low = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else None)
            high = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else None)
            edges = [
                i
                for i in [*EDGE_INTS, low, high]
                if i is not None
                and (low is None or i >= low)
                and (high is None or i <= high)
                and abs(i) < 2**63
            ]
            return st.one_of(st.integers(low, high), st.sampled_from(edges))
        case mi.StrType() if t.pattern:
            return st.from_regex(t.pattern, fullmatch=True)
        case mi.StrType():
            low, high = t.min_length or 0, t.max_length if t.max_length is not None else 10**6
            known = [x for x in [*EDGE_TEXT, *live.skus, *live.keys] if low <= len(x) <= high]
            return st.one_of(
                st.text(min_size=low, max_size=min(high, 40)),
                st.sampled_from(known),
                st.just("k" * min(high, 10**6)),
            )
        case mi.BoolType():
            return st.booleans()
        case mi.NoneType():
            return st.none()
        case mi.UnionType():
            return st.one_of(*(for_type(member, live, valid=True) for member in t.types))
        case mi.VarTupleType() | mi.ListType():
            return st.lists(
                for_type(t.item_type, live, valid=True),
                min_size=t.min_length or 0,
                max_size=min(t.max_length if t.max_length is not None else 5, 5),
            )
        case mi.DictType():
            return st.dictionaries(
                for_type(t.key_type, live, valid=True),
                for_type(t.value_type, live, valid=True),
                min_size=t.min_length or 0,
                max_size=min(t.max_length if t.max_length is not None else 5, 5),
            )
        case _:
            return json_values


def hostile_by_type(t: mi.Type) -> st.SearchStrategy[Any]:
    """Values of the right JSON type but outside the constraints."""
    match t:
        case mi.IntType():
            return hostile_ints
        case mi.StrType():
            return hostile_text
        case mi.VarTupleType() | mi.ListType():
            return st.one_of(
                st.lists(hostile_by_type(t.item_type), max_size=5),
                st.integers(0, 5).map(lambda n: ["x"] * (10**n)),
            )
        case mi.DictType():
            return st.dictionaries(hostile_text, hostile_text, max_size=5)
        case mi.UnionType():
            return st.one_of(*(hostile_by_type(member) for member in t.types))
        case _:
            return json_scalars


@st.composite
def hostile_requests(draw: st.DrawFn, live: LiveDaemon) -> dict[str, Any]:
    """A request of any type: every field at the edge of valid, or one field (or all)
    hostile; sometimes a required field is missing or an unknown one added."""
    cls = draw(st.sampled_from(REQUEST_TYPES))
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    names = [f.name for f in info.fields]
    mode = draw(st.sampled_from(["valid", "valid", "one", "all"]))
    bad = draw(st.sampled_from(names)) if names and mode == "one" else None
    req: dict[str, Any] = {"type": info.tag}
    for f in info.fields:
        valid = mode == "valid" or (mode == "one" and f.name != bad)
        if f.name == "csv_text" and draw(st.booleans()):
            req[f.name] = draw(csv_texts(live.skus))
        elif f.required or draw(st.booleans()):
            req[f.name] = draw(for_type(f.type, live, valid=valid))
    if names and draw(st.integers(0, 9)) == 0:
        req.pop(draw(st.sampled_from(names)), None)
    if draw(st.integers(0, 9)) == 0:
        req[draw(hostile_text)] = draw(json_values)
    return req


# --------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------


def test_the_fixture_daemon_answers_and_refuses_as_expected(live: LiveDaemon) -> None:
    # The harness itself: an unknown SKU is refused and changes nothing.
    before = snapshot(live)
    reply = request(live.socket, m.SetStock(sku="no-such-sku-\x00", quantity=1))
    assert isinstance(reply, p.Err) and "no-such-sku" in reply.message
    assert snapshot(live) == before
    assert_serving(live)


@FUZZ
@given(
    pieces=st.lists(
        st.one_of(
            json_values.map(lambda v: frame(json.dumps(v).encode())),
            st.binary(max_size=64).map(frame),
            st.tuples(
                st.one_of(
                    st.integers(0, 2**32 - 1),
                    st.sampled_from([0, 1, 64 << 10, (64 << 10) + 1, p.MAX_REQUEST_BYTES + 1]),
                ),
                st.binary(max_size=64),
            ).map(lambda t: struct.pack(">I", t[0]) + t[1]),
            st.binary(max_size=3),
            st.just(frame(envelope_bytes({"type": "status"}))),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_random_frames_get_a_reply_or_a_clean_close(live: LiveDaemon, pieces: list[bytes]) -> None:
    check(live, b"".join(pieces))


@FUZZ
@given(data=st.data())
def test_random_envelopes_get_a_clear_error(live: LiveDaemon, data: st.DataObject) -> None:
    request_part = data.draw(
        st.one_of(hostile_requests(live), json_values, deep_nesting), label="request"
    )
    v = data.draw(st.one_of(st.just(1), st.sampled_from([0, 2, -1, 2**64, "1", 1.0, None])))
    rid = data.draw(st.one_of(st.text(min_size=1, max_size=40), json_values), label="id")
    body: dict[str, Any] = {"v": v, "id": rid, "request": request_part}
    depth = 0
    if isinstance(request_part, tuple):  # deep nesting, in the request or elsewhere
        depth = request_part[1]
        body["request"] = DEEP
        if data.draw(st.booleans()):
            body["request"] = {"type": "status"}
            body[data.draw(st.sampled_from(["extra", "id", "v"]))] = DEEP
    elif data.draw(st.integers(0, 4)) == 0:
        body[data.draw(hostile_text, label="extra key")] = data.draw(json_values)
    text = json.dumps(body)
    raw = with_deep_nesting(text, depth) if depth else text.encode()
    replies = check(live, frame(raw))
    assert len(replies) == 1  # one complete frame, one reply


@FUZZ
@given(data=st.data())
def test_every_request_type_with_hostile_values_is_answered_and_refusals_change_nothing(
    live: LiveDaemon, data: st.DataObject
) -> None:
    req = data.draw(hostile_requests(live), label="request")
    replies = check(live, frame(envelope_bytes(req)))
    assert len(replies) == 1
    (reply,) = replies
    # --hypothesis-show-statistics: how far into the daemon the examples got.
    event(f"{req['type']}: {reply.code if isinstance(reply, p.Err) else 'ok'}")


def test_every_request_type_is_generated() -> None:
    # hostile_requests draws from REQUEST_TYPES: a new request type is fuzzed as well.
    tags = {mi.type_info(cls).tag for cls in REQUEST_TYPES}  # type: ignore[union-attr]
    assert len(tags) == len(REQUEST_TYPES) >= 22


# --------------------------------------------------------------------------------------
# The client side: whatever comes back, goqctl does not crash
# --------------------------------------------------------------------------------------

reply_types = mi.type_info(p.ReplyEnvelope)


def hostile_reply_bodies() -> st.SearchStrategy[bytes]:
    assert isinstance(reply_types, mi.StructType)
    shaped = st.fixed_dictionaries(
        {"v": st.just(1), "id": st.just(""), "reply": for_reply(reply_types.fields[2].type)}
    ).map(lambda d: json.dumps(d).encode())
    return st.one_of(
        shaped,
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=64),
        st.sampled_from([50, 100_000]).map(
            lambda n: b'{"v":1,"id":"","x":' + b"[" * n + b"]" * n + b"}"
        ),
    )


def for_reply(t: mi.Type) -> st.SearchStrategy[Any]:
    """Replies the daemon could send, with hostile values in every field."""
    match t:
        case mi.StructType():
            fields = {f.encode_name: for_reply(f.type) for f in t.fields if f.required}
            optional = {f.encode_name: for_reply(f.type) for f in t.fields if not f.required}
            tag = {t.tag_field: st.just(t.tag)} if t.tag_field else {}
            return st.fixed_dictionaries({**tag, **fields}, optional=optional)
        case mi.UnionType():
            return st.one_of(*(for_reply(member) for member in t.types))
        case mi.IntType():
            return st.one_of(st.integers(-5, 5), hostile_ints.filter(lambda i: abs(i) < 2**64))
        case mi.FloatType():
            return st.one_of(st.floats(-1e10, 3e9), hostile_floats)
        case mi.StrType():
            return hostile_text
        case mi.LiteralType():
            return st.sampled_from(t.values)
        case mi.BoolType():
            return st.booleans()
        case mi.NoneType():
            return st.none()
        case mi.VarTupleType() | mi.ListType():
            return st.lists(for_reply(t.item_type), max_size=3)
        case mi.DictType():
            return st.dictionaries(hostile_text, for_reply(t.value_type), max_size=3)
        case _:
            return json_values


@FUZZ
@given(body=hostile_reply_bodies(), command=st.sampled_from(["status", "stores", "products"]))
def test_goqctl_never_crashes_on_a_hostile_reply(body: bytes, command: str) -> None:
    def fake_call(path: str, req: p.ControlRequest, **kw: Any) -> p.ControlResult:
        # What call_sync does with the reply it received.
        envelope = p.decode_reply(body)
        if isinstance(envelope.reply, p.Err):
            raise RemoteError(envelope.reply.code, envelope.reply.message, envelope.reply.hint)
        return envelope.reply.result

    out = []
    with (
        mock.patch.object(goqctl, "call_sync", fake_call),
        mock.patch("builtins.print", lambda *a, **k: out.append(a)),
    ):
        code = goqctl.main(["--socket", "/nonexistent", command])
    assert code in (goqctl.EXIT_OK, goqctl.EXIT_ERROR)


@FUZZ
@given(body=hostile_reply_bodies())
def test_decode_reply_raises_only_control_error(body: bytes) -> None:
    try:
        envelope = p.decode_reply(body)
    except ControlError:
        return
    assert isinstance(envelope.reply, p.Ok | p.Err)
    # And the renderer takes any result that decoded.
    if isinstance(envelope.reply, p.Ok):
        args = argparse.Namespace(json=False)
        # goqctl.main reports these three as "cannot show the daemon's reply".
        with contextlib.suppress(ValueError, OverflowError, OSError):
            goqctl._render(envelope.reply.result, p.Status(), args)
