"""The control client: send one request to the daemon's socket and return the result.

``call`` is for trio code (tests, tools); ``call_sync`` runs it under ``trio.run`` for
goqctl. Every failure is a ``ControlError``: ``DaemonUnreachable`` when there is no
daemon to talk to (or it went away mid-request), ``RemoteError`` when the daemon
answered with an ``Err``.

A request carries one id for its whole life: if the connection breaks after the request
was sent, ``call`` reconnects and sends it again with the same id, so the daemon applies
a mutating request at most once (docs/reliability.md X1).

A long request can ask for progress (``on_progress``): the daemon's progress frames are
handed to the callback as they come, and the timeout then bounds the wait for the next
frame that moved rather than the whole call, so work that goes on advancing is never cut
short.

This module must never put a request's content (a ``KeySet`` credential above all) into
an exception message.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import os
import uuid
from collections.abc import Callable

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
    Progress,
    ProgressEnvelope,
    Reply,
    decode_reply,
    decode_server_frame,
    encode_frame,
    receive_frame,
)
from goqd.errors import ControlError
from goqd.errors import DaemonUnreachable as DaemonUnreachable
from goqd.errors import RemoteError as RemoteError


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


def _progress_unknown(reply_id: str, reply: Reply) -> bool:
    """A daemon older than progress frames refused the envelope's ``progress`` field:
    it read nothing else of the request, so sending it without the field is safe."""
    return (
        isinstance(reply, Err)
        and reply.code == "bad_request"
        and bool(reply_id)
        and "`progress`" in reply.message
    )


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
    on_progress: Callable[[Progress], None] | None = None,
) -> ControlResult:
    """Send ``request`` and return the ``Ok`` result; raise ``ControlError`` otherwise.

    ``timeout`` bounds the whole call, retries included. ``attempts`` counts sends of the
    same request (same id) over fresh connections when one breaks mid-request; a
    connection the daemon refused unread (``unavailable``, no request id) is not a send,
    and is retried after a growing wait until ``timeout``.

    ``on_progress``: ask the daemon for progress and hand each progress frame to it.
    Then every frame that moved (another phase, count or total than the last) starts
    ``timeout`` again: it bounds the time without progress, not the whole call. A send
    that breaks after progress came is sent again like any other (the daemon's work did
    not stop; the same id finds it).
    """
    rid = request_id or new_request_id()
    frame = encode_frame(
        Envelope(v=PROTOCOL_VERSION, id=rid, request=request, progress=on_progress is not None)
    )
    size = len(frame) - HEADER.size
    if size > MAX_REQUEST_BYTES:
        raise ControlError(
            f"the request is {size} bytes; the control socket accepts at most "
            f"{MAX_REQUEST_BYTES} bytes per request"
        )
    reply: Reply | None = None
    lost = 0  # sends whose connection broke before the reply: each may have been applied
    busy_wait = _BUSY_FIRST_WAIT
    with trio.move_on_after(timeout) as waiting:
        heard: Callable[[Progress], None] | None = None
        if on_progress is not None:
            report = on_progress
            last: Progress | None = None

            def heard(progress: Progress) -> None:
                nonlocal last
                # Only progress that moved starts the timeout again: a daemon repeating
                # where it stands (stuck, or a loop that reports each retry) must not
                # keep goqctl waiting for ever.
                if progress != last:
                    last = progress
                    waiting.deadline = trio.current_time() + timeout
                report(progress)

        while True:
            try:
                reply_id, reply = await _exchange(path, frame, rid, heard)
            except _ConnectionLost:
                lost += 1
                if lost >= attempts:
                    raise DaemonUnreachable(
                        path,
                        "the connection closed before the reply arrived",
                        hint=_MAYBE,
                        sent=True,
                    ) from None
                continue  # send it again, same id: the daemon applies it at most once
            except DaemonUnreachable as exc:
                if not lost:
                    raise
                # An earlier send may have been applied before the daemon went away.
                raise DaemonUnreachable(path, exc.reason, hint=_MAYBE, sent=True) from None
            if heard is not None and _progress_unknown(reply_id, reply):
                heard = None
                frame = encode_frame(Envelope(v=PROTOCOL_VERSION, id=rid, request=request))
                continue
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
        silence = (
            "no progress from the daemon for" if on_progress is not None else "no reply within"
        )
        raise DaemonUnreachable(
            path,
            f"{silence} {timeout:g} seconds",
            hint="the daemon may be busy or stuck (`systemctl status goqd`); a change you "
            "asked for may still be applied, so check before repeating it",
            sent=True,
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
    on_progress: Callable[[Progress], None] | None = None,
) -> ControlResult:
    """``call`` for synchronous code (goqctl): runs its own trio loop."""
    return trio.run(
        functools.partial(
            call,
            path,
            request,
            timeout=timeout,
            request_id=request_id,
            attempts=attempts,
            on_progress=on_progress,
        )
    )


async def _exchange(
    path: str, frame: bytes, rid: str, on_progress: Callable[[Progress], None] | None
) -> tuple[str, Reply]:
    stream = await _connect(path)
    async with stream:
        # The daemon may have answered before reading everything (not_allowed,
        # too_large) and closed; its reply is still queued for us to read.
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(frame)
        while True:
            try:
                body = await _receive_frame(stream)
            except trio.BrokenResourceError:
                raise _ConnectionLost from None
            if on_progress is None:
                envelope = decode_reply(body)
                break
            frame_in = decode_server_frame(body)
            _check_id(frame_in.id, rid)
            if isinstance(frame_in, ProgressEnvelope):
                on_progress(frame_in.progress)
                continue
            envelope = frame_in
            break
    _check_id(envelope.id, rid)
    return envelope.id, envelope.reply


def _check_id(got: str, rid: str) -> None:
    if got not in (rid, ""):
        other = got if len(got) <= 128 else got[:127] + "…"
        raise ControlError(f"the daemon answered request {other!r}, not {rid!r}")


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
