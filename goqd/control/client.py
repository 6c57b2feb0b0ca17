"""The control client: send one request to the daemon's socket and return the result.

``call`` is for trio code (tests, tools); ``call_sync`` runs it under ``trio.run`` for
goqctl. Every failure is a ``ControlError``: ``DaemonUnreachable`` when there is no
daemon to talk to (or it went away mid-request), ``RemoteError`` when the daemon
answered with an ``Err``.

A request carries one id for its whole life: if the connection breaks after the request
was sent, ``call`` reconnects and sends it again with the same id, so the daemon applies
a mutating request at most once (docs/reliability.md X1).

This module must never put a request's content (a ``KeySet`` credential above all) into
an exception message.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import os
import uuid

import trio

from goqd.control.protocol import (
    HEADER,
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    PROTOCOL_VERSION,
    ConnectionClosed,
    ControlRequest,
    ControlResult,
    Envelope,
    Err,
    FrameTooLarge,
    Reply,
    decode_reply,
    encode_frame,
    receive_frame,
)
from goqd.errors import ControlError


class DaemonUnreachable(ControlError):
    """No daemon answered on the socket: missing, refused, not permitted, or gone."""

    def __init__(self, path: str, reason: str, *, hint: str = "") -> None:
        self.path = path
        self.reason = reason
        self.hint = hint
        super().__init__(f"cannot reach goqd at {path}: {reason}")


class RemoteError(ControlError):
    """The daemon refused the request with an ``Err`` reply."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        self.code = code
        self.message = message
        self.hint = hint
        super().__init__(f"{code}: {message}")


class _ConnectionLost(Exception):
    """The connection broke after the request went out and before the reply came."""


_MAYBE = (
    "the request may or may not have been applied: check (`goqctl status`, `goqctl "
    "history SKU`) before repeating it"
)


_BUSY_FIRST_WAIT = 0.05
_BUSY_MAX_WAIT = 1.0


def _refused_before_reading(reply_id: str, reply: Reply) -> bool:
    """A connection-level refusal: answered with no request id, before any request was
    read, because the daemon was at a connection or memory limit."""
    return isinstance(reply, Err) and reply.code == "unavailable" and not reply_id


def new_request_id() -> str:
    return uuid.uuid4().hex


async def call(
    path: str,
    request: ControlRequest,
    *,
    # A parameter rather than the caller's fail_after: running out of time must become
    # DaemonUnreachable with its "may still be applied" hint, not a bare TooSlowError.
    timeout: float = 30.0,  # noqa: ASYNC109
    request_id: str | None = None,
    attempts: int = 2,
) -> ControlResult:
    """Send ``request`` and return the ``Ok`` result; raise ``ControlError`` otherwise.

    ``timeout`` bounds the whole call, retries included. ``attempts`` counts sends of the
    same request (same id) over fresh connections when one breaks mid-request; a
    connection the daemon refused unread (``unavailable``, no request id) is not a send,
    and is retried after a growing wait until ``timeout``.
    """
    rid = request_id or new_request_id()
    frame = encode_frame(Envelope(v=PROTOCOL_VERSION, id=rid, request=request))
    size = len(frame) - HEADER.size
    if size > MAX_REQUEST_BYTES:
        raise ControlError(
            f"the request is {size} bytes; the control socket accepts at most "
            f"{MAX_REQUEST_BYTES} bytes per request"
        )
    reply: Reply | None = None
    lost = 0  # sends whose connection broke before the reply: each may have been applied
    busy_wait = _BUSY_FIRST_WAIT
    with trio.move_on_after(timeout):
        while True:
            try:
                reply_id, reply = await _exchange(path, frame, rid)
            except _ConnectionLost:
                lost += 1
                if lost >= attempts:
                    raise DaemonUnreachable(
                        path, "the connection closed before the reply arrived", hint=_MAYBE
                    ) from None
                continue  # send it again, same id: the daemon applies it at most once
            except DaemonUnreachable as exc:
                if not lost:
                    raise
                # An earlier send may have been applied before the daemon went away.
                raise DaemonUnreachable(path, exc.reason, hint=_MAYBE) from None
            if not _refused_before_reading(reply_id, reply):
                break
            # The daemon turned the connection away before reading the request (too many
            # connections of this user, or the frame budget is spent): nothing was
            # applied, so waiting and sending again is safe, and it is what a script that
            # runs many goqctl at once needs. Only the timeout bounds these retries; when
            # it runs out, the refusal itself is the answer.
            await trio.sleep(busy_wait)
            busy_wait = min(busy_wait * 2, _BUSY_MAX_WAIT)
    if reply is None:
        raise DaemonUnreachable(
            path,
            f"no reply within {timeout:g} seconds",
            hint="the daemon may be busy or stuck (`systemctl status goqd`); a change you "
            "asked for may still be applied, so check before repeating it",
        )
    if isinstance(reply, Err):
        raise RemoteError(reply.code, reply.message, reply.hint)
    return reply.result


def call_sync(
    path: str,
    request: ControlRequest,
    *,
    timeout: float = 30.0,
    request_id: str | None = None,
    attempts: int = 2,
) -> ControlResult:
    """``call`` for synchronous code (goqctl): runs its own trio loop."""
    return trio.run(
        functools.partial(
            call, path, request, timeout=timeout, request_id=request_id, attempts=attempts
        )
    )


async def _exchange(path: str, frame: bytes, rid: str) -> tuple[str, Reply]:
    stream = await _connect(path)
    async with stream:
        # The daemon may have answered before reading everything (not_allowed,
        # too_large) and closed; its reply is still queued for us to read.
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(frame)
        try:
            body = await _receive_frame(stream)
        except trio.BrokenResourceError:
            raise _ConnectionLost from None
    envelope = decode_reply(body)
    if envelope.id not in (rid, ""):
        other = envelope.id if len(envelope.id) <= 128 else envelope.id[:127] + "…"
        raise ControlError(f"the daemon answered request {other!r}, not {rid!r}")
    return envelope.id, envelope.reply


async def _receive_frame(stream: trio.SocketStream) -> bytes:
    try:
        return await receive_frame(stream, MAX_REPLY_BYTES)
    except ConnectionClosed:
        raise _ConnectionLost from None
    except FrameTooLarge as exc:
        raise ControlError(
            f"the daemon's reply ({exc.size} bytes) is larger than goqctl accepts"
        ) from None


async def _connect(path: str) -> trio.SocketStream:
    try:
        return await trio.open_unix_socket(path)
    except FileNotFoundError:
        raise DaemonUnreachable(
            path,
            "no control socket there",
            hint="is goqd running? (`systemctl status goqd`); otherwise point goqctl at "
            "its socket with --socket PATH or GOQD_SOCKET",
        ) from None
    except ConnectionRefusedError:
        raise DaemonUnreachable(
            path,
            "nothing is listening (a socket left behind by a stopped daemon)",
            hint="start goqd (`systemctl start goqd`)",
        ) from None
    except PermissionError:
        raise DaemonUnreachable(path, "permission denied", hint=_permission_hint(path)) from None
    except OSError as exc:
        raise DaemonUnreachable(path, exc.strerror or str(exc)) from None


def _permission_hint(path: str) -> str:
    # The socket's group is the one the daemon admits (daemon.control-groups); naming
    # it beats naming a default the administrator may have changed.
    try:
        group = grp.getgrgid(os.stat(path).st_gid).gr_name
    except (OSError, KeyError):
        return (
            "ask an administrator to add your user to the group the daemon admits "
            "(daemon.control-groups) and log in again, or run goqctl as root"
        )
    return (
        f"add your user to the {group!r} group (sudo usermod -aG {group} $USER) and log "
        "in again, or run goqctl as root"
    )
