"""goqd's own HTTP listener: ``/metrics``, ``/healthz`` and mall webhooks.

A minimal ASGI app (no framework), spoken over HTTP/1.1 by hypercorn's connection
handler under trio, behind goqd's own accept loop:

* ``GET /metrics``  the registry in Prometheus text format;
* ``GET /healthz``  ``health()`` as JSON, 200 when its ``"ok"`` is true, else 503;
* ``POST /webhooks/<name>``  the body (at most 1 MiB) and headers handed to the
  handler registered under ``name``, whose return value is the status code.

It listens on loopback unless the caller passes ``allow_public=True`` (the config's
``http-public``): ``/metrics`` names every store and its health. Loopback is still open
to every local user, so what one client may hold is bounded (``HttpLimits``): a cap on
open connections, well below the process's open-files limit so the ledger, the control
socket and the mall clients always have file handles left; idle connections and slow
senders are dropped after seconds. This module must never log request bodies or
headers (webhooks carry signatures and shop tokens) and must never let a failing
handler, a hostile client or a flood of connections take the daemon down.
"""

from __future__ import annotations

import contextvars
import importlib.metadata
import inspect
import logging
import resource
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from goqd.config import is_loopback, listen_address
from goqd.control.server import accept_retrying
from goqd.errors import ConfigError

log = structlog.get_logger("goqd.http")

MAX_WEBHOOK_BODY = 1024 * 1024

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Health = Callable[[], Awaitable[Mapping[str, object]]]
Webhook = Callable[[bytes, Mapping[str, str]], Awaitable[int]]

_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"

# A request head larger than this is refused by h11 (431) before the app sees it.
_MAX_HEAD_BYTES = 16 * 1024
# Repeated warnings about the same kind of bad request are logged at most this often:
# any local user can send them, and the journal must not become the flood.
_WARN_EVERY_S = 60.0
# Sending a reply to a client that has hung up: hypercorn closes its side of the socket
# (send_eof) as soon as it reads the end of the stream, which can race our reply.
_CLIENT_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError)


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """How much of the daemon one HTTP client may hold, and for how long.

    ``max_connections``: connections open at once. ``serve_http`` lowers it to a quarter
    of the open-files limit so the rest stays for the ledger, the control socket and
    the mall clients. At the cap a new connection pushes out the connection that has
    been idle longest (so a pile of idle connections never locks out a scrape); if every
    connection is answering a request, the new one is closed at once.

    ``idle_timeout``: a connection without a request in progress is closed after this
    many seconds, whether it is between keep-alive requests or has not yet sent a whole
    request head (a client trickling header bytes is dropped too).

    ``read_timeout``: the longest silence allowed while a request is arriving.

    ``body_timeout``: a webhook body must arrive whole within this (408 otherwise).
    """

    max_connections: int = 256
    idle_timeout: float = 5.0
    read_timeout: float = 10.0
    body_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        for name in ("idle_timeout", "read_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be more than 0")


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard limit; return the soft limit now.

    The soft limit is often 1024 while the hard one is far higher: the soft limit only
    protects programs that use ``select()``, which goqd (epoll, through trio) does not.
    Where the limit cannot be raised, the current one is returned and used.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            # An infinite hard limit above the kernel's nr_open: keep the soft one.
            pass
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return soft


class _Throttle:
    """Logs a warning the first time, then at most once per ``every`` seconds per event,
    counting in ``suppressed`` the ones it did not log."""

    def __init__(self, every: float = _WARN_EVERY_S) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, event: str, **fields: object) -> None:
        now = trio.current_time()
        last = self._last.get(event)
        if last is not None and now - last < self.every:
            self._suppressed[event] = self._suppressed.get(event, 0) + 1
            return
        self._last[event] = now
        suppressed = self._suppressed.pop(event, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        log.warning(event, **fields)


@dataclass(eq=False)
class _Connection:
    """One accepted connection: its socket, the scope its task runs in, and whether the
    app is answering a request on it right now."""

    stream: trio.SocketStream
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    busy: int = 0
    idle_since: float = field(default_factory=trio.current_time)

    def close_now(self) -> None:
        # Closing the socket frees its file handle at once (the task blocked reading it
        # wakes with ClosedResourceError); cancelling ends hypercorn's timers with it.
        self.scope.cancel()
        self.stream.socket.close()


# The connection a request arrived on, seen by the app: hypercorn starts the app's task
# from the connection's own task, and trio copies the context into child tasks.
_current_connection: contextvars.ContextVar[_Connection | None] = contextvars.ContextVar(
    "goqd_http_connection", default=None
)


class _Connections:
    """The open connections and the cap on them (see ``HttpLimits.max_connections``).

    Logs once when the cap is first reached and once when fewer than half of it are
    open again, with how many connections were pushed out or refused meanwhile.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open: set[_Connection] = set()
        self.saturated = False
        self.evicted = 0
        self.refused = 0

    def admit(self, stream: trio.SocketStream) -> _Connection | None:
        if len(self.open) >= self.cap:
            idle = [c for c in self.open if not c.busy]
            if not idle:
                self._saturate()
                self.refused += 1
                stream.socket.close()
                return None
            oldest = min(idle, key=lambda c: c.idle_since)
            self._saturate()
            self.evicted += 1
            self.open.discard(oldest)
            oldest.close_now()
        conn = _Connection(stream)
        self.open.add(conn)
        return conn

    def release(self, conn: _Connection) -> None:
        self.open.discard(conn)
        if self.saturated and len(self.open) <= self.cap // 2:
            log.info(
                "http_connections_recovered",
                open=len(self.open),
                evicted=self.evicted,
                refused=self.refused,
            )
            self.saturated = False
            self.evicted = self.refused = 0

    def _saturate(self) -> None:
        if not self.saturated:
            self.saturated = True
            log.warning("http_connections_saturated", max_connections=self.cap)


class _App:
    """The ASGI application: three routes, no framework."""

    def __init__(
        self,
        registry: CollectorRegistry,
        health: Health,
        webhooks: Mapping[str, Webhook],
        limits: HttpLimits,
    ) -> None:
        self.registry = registry
        self.health = health
        self.webhooks = dict(webhooks)
        self.limits = limits
        self.warnings = _Throttle()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        conn = _current_connection.get()
        if conn is not None:
            conn.busy += 1
        try:
            await self._route(scope, receive, send)
        finally:
            if conn is not None:
                conn.busy -= 1
                conn.idle_since = trio.current_time()

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
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
            self.warnings.warning("webhook_body_too_large", webhook=name, limit=MAX_WEBHOOK_BODY)
            await _respond(send, 413, b"body too large\n", _TEXT, close=True)
            return
        body = await self._read_body(receive, name)
        if isinstance(body, int):
            if body:
                reason = b"body too large\n" if body == 413 else b"body too slow\n"
                await _respond(send, body, reason, _TEXT, close=True)
            return
        try:
            status = int(await handler(body, headers))
        except Exception as exc:
            # The handler's bug must not become the daemon's: answer 500 (the mall
            # retries the delivery) and log the error type, never the body.
            log.error("webhook_failed", webhook=name, error=type(exc).__name__)
            status = 500
        if not 100 <= status <= 599:
            status = 500
        await _respond(send, status, b"", _TEXT)

    async def _read_body(self, receive: Receive, name: str) -> bytes | int:
        """The whole body, or the status to refuse it with (0: the client left)."""
        chunks: list[bytes] = []
        size = 0
        with trio.move_on_after(self.limits.body_timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return 0
                chunk: bytes = message.get("body", b"")
                size += len(chunk)
                if size > MAX_WEBHOOK_BODY:
                    # Chunked uploads declare no length: the cap is found only here.
                    self.warnings.warning(
                        "webhook_body_too_large", webhook=name, limit=MAX_WEBHOOK_BODY
                    )
                    return 413
                chunks.append(chunk)
                if not message.get("more_body"):
                    return b"".join(chunks)
        self.warnings.warning(
            "webhook_body_too_slow", webhook=name, timeout_s=self.limits.body_timeout
        )
        return 408


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
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else body})
    except _CLIENT_GONE:
        # The client hung up before its answer went out: nobody is left to tell, and a
        # client's leaving is not goqd's error.
        pass


# _serve_connection drives hypercorn's per-connection handler, which is not its public
# API (pyproject.toml pins the versions it was written for). A release that changed the
# handler's signature would fail every connection, one log line at a time, while the
# daemon looked healthy; serve_http checks it before binding instead.
_TCP_SERVER_PARAMETERS = ("self", "app", "config", "context", "state", "stream")


def _check_hypercorn() -> None:
    found = tuple(inspect.signature(TCPServer.__init__).parameters)
    if found != _TCP_SERVER_PARAMETERS:
        raise RuntimeError(
            f"hypercorn {importlib.metadata.version('hypercorn')} is not a version goqd.http "
            f"works with: its TCPServer takes {found[1:]}, not {_TCP_SERVER_PARAMETERS[1:]}; "
            "install the hypercorn version pyproject.toml names"
        )


def _hypercorn_config(limits: HttpLimits) -> Config:
    config = Config()
    # Per-request access logs would drown the journal (one line per scrape); errors
    # still go through the stdlib logger that goqd.logs routes into structlog.
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    # hypercorn's idle timer runs from the accept until a whole request head has
    # arrived, and again between keep-alive requests.
    config.keep_alive_timeout = limits.idle_timeout
    config.read_timeout = limits.read_timeout  # type: ignore[assignment]  # a float works
    config.h11_max_incomplete_size = _MAX_HEAD_BYTES
    return config


async def _open_listener(host: str, port: int, listen: str) -> trio.SocketListener:
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    try:
        sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {listen}: {exc.strerror}") from exc
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        await sock.bind((host, port))
        # Connections waiting here cost goqd no file handle; the loop accepts promptly.
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {listen}: {exc.strerror}") from exc
    return trio.SocketListener(sock)


async def _serve_connection(
    conn: _Connection,
    connections: _Connections,
    app: Any,
    config: Config,
    context: WorkerContext,
) -> None:
    _current_connection.set(conn)
    try:
        with conn.scope:
            # hypercorn's per-connection HTTP/1.1 (and h2c) handler, the same one its
            # own serve() runs for each accepted stream; no lifespan state to share.
            # (Typed for its TLS stream; a plain SocketStream takes its non-TLS path.)
            stream: Any = conn.stream
            server = TCPServer(app, config, context, ConnectionState({}), stream)
            await server.run()
    except Exception as exc:
        # One connection's failure ends that connection, never the listener.
        log.warning("http_connection_failed", error=f"{type(exc).__name__}: {exc}")
    finally:
        connections.release(conn)
        # hypercorn's own close is skipped when the task is cancelled mid-way.
        conn.stream.socket.close()


async def _accept_loop(
    listener: trio.SocketListener,
    connections: _Connections,
    handle: Callable[[_Connection], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    while True:
        stream = await accept_retrying(listener, log, "http")
        conn = connections.admit(stream)
        if conn is not None:
            nursery.start_soon(handle, conn)


async def serve_http(
    listen: str,
    registry: CollectorRegistry,
    *,
    health: Health,
    webhooks: Mapping[str, Webhook] | None = None,
    allow_public: bool = False,
    limits: HttpLimits | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics``, ``/healthz`` and webhooks on ``listen`` until cancelled.

    ``listen`` is ``host:port`` or ``[v6]:port``; port 0 picks a free port.
    ``task_status.started()`` gets the base URL with the real port, e.g.
    ``"http://127.0.0.1:40123"``.

    Resource handling: raises the process's soft open-files limit to its hard limit
    (``raise_open_files_limit``) and caps connections at the smaller of
    ``limits.max_connections`` and a quarter of that limit. Owns the listening socket
    and one task per connection (all closed on cancellation); borrows ``registry`` and
    the callables.

    Error handling: an installed hypercorn whose connection handler is not the one this
    module drives raises ``RuntimeError``, and a malformed ``listen``, or a non-loopback
    one without ``allow_public``, raises ``ConfigError``, both before binding; a bind
    failure (address in use) raises ``OSError`` naming the address. All surface from
    ``nursery.start``. Exceptions from ``health`` or a webhook handler are answered
    (503 / 500) and logged, never propagated; a connection that fails is closed and
    logged. Running out of file handles delays new connections (``http_accept_failed``,
    logged once) and never ends the listener.
    """
    limits = limits or HttpLimits()
    _check_hypercorn()
    try:
        host, port = listen_address(listen)
    except ValueError as exc:
        raise ConfigError("daemon", "http-listen", str(exc)) from None
    if not allow_public and not is_loopback(host):
        raise ConfigError(
            "daemon",
            "http-listen",
            f"{host} is not loopback; set http-public = true to expose /metrics there",
        )
    open_files = raise_open_files_limit()
    connections = _Connections(min(limits.max_connections, max(1, open_files // 4)))
    listener = await _open_listener(host, port, listen)
    config = _hypercorn_config(limits)
    # hypercorn's ASGI types are TypedDicts; _App works on plain dicts of the same shape.
    app = wrap_app(
        _App(registry, health, webhooks or {}, limits),  # type: ignore[arg-type]
        config.wsgi_max_body_size,
        "asgi",
    )
    context = WorkerContext(None)

    async def handle(conn: _Connection) -> None:
        await _serve_connection(conn, connections, app, config, context)

    name = listener.socket.getsockname()
    url = f"http://[{name[0]}]:{name[1]}" if ":" in name[0] else f"http://{name[0]}:{name[1]}"
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_accept_loop, listener, connections, handle, nursery)
            log.info(
                "http_listening",
                url=url,
                max_connections=connections.cap,
                open_files_limit=open_files,
            )
            task_status.started(url)
    finally:
        # Each connection's task closed its own socket when the nursery cancelled it.
        listener.socket.close()
