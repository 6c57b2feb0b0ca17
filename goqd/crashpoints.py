"""Named crash points for the reliability harness (docs/reliability.md, "Crash points").

``crashpoint("ledger.after_commit")`` kills the process on the spot (SIGKILL, no
cleanup, no flush) when the environment variable ``GOQD_CRASHPOINT`` names that point.
``GOQD_CRASHPOINT=name@N`` crashes on the N-th time the point is reached. Outside the
harness the variable is unset and a crash point costs one set lookup. With
``GOQD_CRASHPOINT_ARM=SIGUSR2`` the points count only once the process has received
SIGUSR2: the harness checks a restarted daemon first, then arms it.

One point sits in the HTTP layer instead of goqd's code: ``store.push_sent``, reached
inside a request made by an adapter's ``push_stock`` once the mall has applied it and
its answer has begun to arrive (the status line is in), before the adapter reads the
answer: the push was sent and goqd never learns its outcome. (Right after the request
is written would be earlier still, but the mall then may or may not get to apply it
before the connection drops, and the harness could not tell which.) Only when the
harness names it is httpx's transport wrapped, with httpcore's documented ``trace``
extension, to reach it.

Never use this for anything but tests: it exists to prove that a crash at any point
loses nothing.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

PUSH_SENT = "store.push_sent"
# Every point, for the harness: a run at scale checks it reached each of them.
POINTS = (
    "store.poll_received",
    "ledger.in_transaction",
    "ledger.after_commit",
    "store.before_push",
    PUSH_SENT,
    "store.after_push",
    "stock_import.chunk_applied",
)

_PLAN: dict[str, int] = {}
for _item in filter(None, os.environ.get("GOQD_CRASHPOINT", "").split(",")):
    _name, _, _nth = _item.partition("@")
    _PLAN[_name.strip()] = int(_nth) if _nth else 1

_hits: dict[str, int] = {}
_armed = True


def _arm(signum: int, frame: Any) -> None:
    global _armed
    _armed = True


if _PLAN and os.environ.get("GOQD_CRASHPOINT_ARM") == "SIGUSR2":
    _armed = False
    signal.signal(signal.SIGUSR2, _arm)


def crashpoint(name: str) -> None:
    """Die here, abruptly, if the harness asked for it."""
    if not _PLAN or name not in _PLAN or not _armed:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= _PLAN[name]:
        os.kill(os.getpid(), signal.SIGKILL)


def _in_push_stock() -> bool:
    """Is the running task inside an adapter's ``push_stock``? (While a coroutine runs,
    the coroutines awaiting it are its frame's callers.)"""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "push_stock":
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _arm_push_sent() -> None:
    import httpx

    original = httpx.AsyncHTTPTransport.handle_async_request

    async def trace(event: str, info: dict[str, Any]) -> None:
        if event == "http11.receive_response_headers.complete" and _in_push_stock():
            crashpoint(PUSH_SENT)

    async def handle_async_request(
        self: httpx.AsyncHTTPTransport, request: httpx.Request
    ) -> httpx.Response:
        request.extensions = {**request.extensions, "trace": trace}
        return await original(self, request)

    httpx.AsyncHTTPTransport.handle_async_request = handle_async_request  # type: ignore[method-assign]


if PUSH_SENT in _PLAN:
    _arm_push_sent()
