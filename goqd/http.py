"""goqd's own HTTP listener: ``/metrics``, ``/healthz`` and mall webhooks.

Served by hypercorn under trio from a minimal ASGI app (no framework):

* ``GET /metrics``  the registry in Prometheus text format;
* ``GET /healthz``  ``health()`` as JSON, 200 when its ``"ok"`` is true, else 503;
* ``POST /webhooks/<name>``  the body (at most 1 MiB) and headers handed to the
  handler registered under ``name``, whose return value is the status code.

It listens on loopback unless the caller passes ``allow_public=True`` (the config's
``http-public``): ``/metrics`` names every store and its health. This module must never
log request bodies or headers (webhooks carry signatures and shop tokens) and must
never let a failing handler take the daemon down.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
import structlog
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = structlog.get_logger("goqd.http")

MAX_WEBHOOK_BODY = 1024 * 1024

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Health = Callable[[], Awaitable[Mapping[str, object]]]
Webhook = Callable[[bytes, Mapping[str, str]], Awaitable[int]]

_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` or ``"[::1]:9464"`` -> (host, port)."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"listen address needs host:port, got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write IPv6 addresses in brackets: [{host}]:{port_text}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port in listen address {listen!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"bad port in listen address {listen!r}")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _App:
    """The ASGI application: three routes, no framework."""

    def __init__(
        self, registry: CollectorRegistry, health: Health, webhooks: Mapping[str, Webhook]
    ) -> None:
        self.registry = registry
        self.health = health
        self.webhooks = dict(webhooks)

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
        method: str = scope["method"]
        path: str = scope["path"]
        if path == "/metrics" or path == "/healthz":
            if method not in ("GET", "HEAD"):
                await _respond(
                    send, 405, b"method not allowed\n", _TEXT, allow="GET, HEAD", close=True
                )
                return
            if path == "/metrics":
                await _respond(
                    send,
                    200,
                    generate_latest(self.registry),
                    CONTENT_TYPE_LATEST,
                    head=method == "HEAD",
                )
            else:
                status, body = await self._healthz()
                await _respond(send, status, body, _JSON, head=method == "HEAD")
            return
        if path.startswith("/webhooks/"):
            await self._webhook(scope, receive, send, path.removeprefix("/webhooks/"))
            return
        await _respond(send, 404, b"not found\n", _TEXT, close=method not in ("GET", "HEAD"))

    async def _healthz(self) -> tuple[int, bytes]:
        try:
            report = dict(await self.health())
        except Exception as exc:
            # A health check that cannot run is itself unhealthy, not a server error.
            log.warning("health_check_failed", error=f"{type(exc).__name__}: {exc}")
            report = {"ok": False, "error": "health check failed"}
        body = msgspec.json.encode(report, enc_hook=str)
        return (200 if report.get("ok") else 503), body

    async def _webhook(self, scope: Scope, receive: Receive, send: Send, name: str) -> None:
        handler = self.webhooks.get(name)
        if handler is None:
            await _respond(send, 404, b"no such webhook\n", _TEXT, close=True)
            return
        if scope["method"] != "POST":
            await _respond(send, 405, b"method not allowed\n", _TEXT, allow="POST", close=True)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            declared = int(headers.get("content-length", "0"))
        except ValueError:
            declared = 0
        if declared > MAX_WEBHOOK_BODY:
            await _respond(send, 413, b"body too large\n", _TEXT, close=True)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > MAX_WEBHOOK_BODY:
                await _respond(send, 413, b"body too large\n", _TEXT, close=True)
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        try:
            status = int(await handler(b"".join(chunks), headers))
        except Exception as exc:
            # The handler's bug must not become the daemon's: answer 500 (the mall
            # retries the delivery) and log the error type, never the body.
            log.error("webhook_failed", webhook=name, error=type(exc).__name__)
            status = 500
        if not 100 <= status <= 599:
            status = 500
        await _respond(send, status, b"", _TEXT)


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    *,
    head: bool = False,
    allow: str = "",
    close: bool = False,
) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if allow:
        headers.append((b"allow", allow.encode()))
    if close:
        # Answered without reading the request body: the connection cannot carry
        # another request, and the client must not try to reuse it.
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def serve_http(
    listen: str,
    registry: CollectorRegistry,
    *,
    health: Health,
    webhooks: Mapping[str, Webhook] | None = None,
    allow_public: bool = False,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics``, ``/healthz`` and webhooks on ``listen`` until cancelled.

    ``listen`` is ``host:port`` or ``[v6]:port``; port 0 picks a free port.
    ``task_status.started()`` gets the base URL with the real port, e.g.
    ``"http://127.0.0.1:40123"``.

    Resource handling: owns the listening socket and hypercorn's connection tasks
    (closed on cancellation); borrows ``registry`` and the callables.

    Error handling: a non-loopback ``listen`` without ``allow_public`` raises
    ``ValueError`` before binding, and a bind failure (address in use) raises
    ``OSError``; both surface from ``nursery.start``. Exceptions from ``health`` or a
    webhook handler are answered (503 / 500) and logged, never propagated.
    """
    host, port = parse_listen(listen)
    if not allow_public and not is_loopback(host):
        raise ValueError(
            f"refusing to serve /metrics on non-loopback address {host!r}; "
            "set http-public = true to allow it"
        )
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    # Per-request access logs would drown the journal (one line per scrape); errors
    # still go through the stdlib logger that goqd.logs routes into structlog.
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 2.0
    config.keep_alive_timeout = 30.0
    # Slow clients must not hold connections forever.
    config.read_timeout = 30
    config.h11_max_incomplete_size = 16 * 1024
    app = _App(registry, health, webhooks or {})

    async def _serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, config, task_status=task_status)  # type: ignore[arg-type]

    started = False
    try:
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(_serve)
            started = True
            log.info("http_listening", url=binds[0])
            task_status.started(binds[0])
    except ExceptionGroup as group:
        # A bind failure arrives wrapped in hypercorn's and our nurseries' groups;
        # give the caller (and the operator) one plain OSError that names the address.
        leaf = _only_leaf(group)
        if started or not isinstance(leaf, OSError):
            raise
        raise OSError(leaf.errno, f"cannot listen on {listen}: {leaf.strerror}") from group


def _only_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
