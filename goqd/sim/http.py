"""A tiny ASGI toolkit for the simulated malls, served by hypercorn under trio.

Each simulator is an ASGI app built from a route table. ``serve_sim`` binds it to a
loopback address (port 0 by default) and reports the base URL through
``task_status.started``. Simulators must never listen on anything but loopback.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MAX_BODY = 8 * 1024 * 1024
JSON_TYPE = "application/json; charset=utf-8"
XML_TYPE = "application/xml; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"


class Request:
    """One HTTP request as a simulator sees it."""

    def __init__(self, scope: Scope, body: bytes) -> None:
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query: dict[str, list[str]] = parse_qs(scope.get("query_string", b"").decode())
        self.headers: dict[str, str] = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
        }
        self.body = body

    def arg(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[0] if values else default

    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.body.decode("utf-8")).items()}

    def json(self) -> Any:
        return json.loads(self.body or b"null")


class Response:
    def __init__(
        self,
        status: int = 200,
        body: bytes | str = b"",
        *,
        content_type: str = JSON_TYPE,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body.encode("utf-8") if isinstance(body, str) else body
        self.headers = {"content-type": content_type, **(headers or {})}

    @classmethod
    def json(
        cls, obj: Any, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> Response:
        return cls(status, json.dumps(obj, ensure_ascii=False), headers=headers)

    @classmethod
    def xml(
        cls, text: str, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> Response:
        return cls(status, text, content_type=XML_TYPE, headers=headers)


Handler = Callable[[Request], Awaitable[Response]]


class App:
    """An ASGI app that passes every request to one async handler."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                await _send(send, Response(413, b"too large", content_type="text/plain"))
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        response = await self._handler(Request(scope, b"".join(chunks)))
        await _send(send, response)


async def _send(send: Send, response: Response) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": [
                (k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()
            ],
        }
    )
    await send({"type": "http.response.body", "body": response.body})


async def serve_sim(
    app: App,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on loopback until cancelled; ``started`` gets the base URL."""
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError(f"simulators listen on loopback only, not {host!r}")
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_timeout = 75.0
    # The simulator dates its responses by its own (possibly skewed, possibly simulated)
    # clock; hypercorn's Date would be this host's real time.
    config.include_date_header = False

    async def _serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, config, task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(_serve)
        task_status.started(binds[0])
