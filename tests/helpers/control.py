"""Control-socket helpers: serve a handler on a real Unix socket, and speak the wire
protocol by hand (a framed envelope, a raw exchange) to test what goqctl never sends."""

from __future__ import annotations

import contextlib
import functools
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import trio
import trio.testing

from goqd.control import protocol as p
from goqd.control.server import serve_control


@contextlib.asynccontextmanager
async def serving(path: str, handler: Any, **kw: Any) -> AsyncIterator[None]:
    """``serve_control`` at ``path`` for the block (no users or groups listed unless
    ``kw`` says so), stopped when the block ends."""
    kw.setdefault("allowed_uids", frozenset())
    kw.setdefault("allowed_gids", frozenset())
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(serve_control, path, handler, **kw))
        yield
        nursery.cancel_scope.cancel()


async def raw_exchange(path: str, body: bytes, *, announce: int | None = None) -> Any:
    """Send one hand-made frame and return the decoded reply envelope as a dict."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        size = len(body) if announce is None else announce
        # The server may refuse and close before reading everything; read its reply.
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(struct.pack(">I", size) + body)
        reply = await p.receive_frame(stream, p.MAX_REPLY_BYTES)
    return json.loads(reply)


def envelope(request: dict[str, Any], *, v: int = 1, rid: str = "r1") -> bytes:
    return json.dumps({"v": v, "id": rid, "request": request}).encode()
