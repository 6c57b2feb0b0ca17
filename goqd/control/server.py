"""The control server: goqctl's requests over a Unix socket, answered by the daemon.

``serve_control`` owns the listening socket and one task per connection. It decodes and
checks every request, asks the daemon's handler for the answer and sends it back. It
never interprets a request itself: what a request *does* is the handler's business.

It must never let a client crash or stall the daemon (DESIGN §6, RELIABILITY X3): a
malformed, oversized, slow or unauthorised request gets an ``Err`` reply or a closed
connection, and a handler that raises gets ``Err("internal")``. It must never log a
credential: ``KeySet`` is logged by its store only.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
import structlog
import trio

from goqd.control.protocol import (
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    PROTOCOL_VERSION,
    BadEnvelope,
    ConnectionClosed,
    ControlRequest,
    Envelope,
    Err,
    FrameTooLarge,
    Ok,
    ReplyEnvelope,
    decode_request,
    encode_frame,
    is_mutating,
    receive_frame,
    request_tag,
)
from goqd.errors import ControlError

log = structlog.get_logger("goqd.control")

SOCKET_MODE = 0o660
# umask applied around bind(): the kernel creates the socket file 0777 & ~umask = 0660,
# so there is no moment at which the socket exists with a wider mode.
_BIND_UMASK = 0o117
# struct ucred { pid_t pid; uid_t uid; gid_t gid; } on Linux.
_UCRED = struct.Struct("3i")
# accept() failures that mean "out of resources for now", as trio.serve_listeners treats them.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# Fields that never go into a log line: a credential, or a payload too big to be useful.
_UNLOGGED_FIELDS = frozenset({"credentials", "csv_text", "listing_keys", "request_id"})


@dataclass(frozen=True)
class PeerInfo:
    """Who is on the other end of a connection, from ``SO_PEERCRED`` (kernel-attested)."""

    pid: int
    uid: int
    gid: int


Handler = Callable[[ControlRequest, PeerInfo], Awaitable[Ok | Err]]
PeerCheck = Callable[[PeerInfo], Awaitable[bool]]


def peer_allowed(
    peer: PeerInfo,
    *,
    own_uid: int,
    allowed_uids: frozenset[int],
    allowed_gids: frozenset[int],
    peer_groups: frozenset[int] = frozenset(),
) -> bool:
    """The socket's access rule: root, the daemon's own user, a listed user, or a member
    (primary or supplementary, ``peer_groups``) of a listed group."""
    return (
        peer.uid == 0
        or peer.uid == own_uid
        or peer.uid in allowed_uids
        or peer.gid in allowed_gids
        or not allowed_gids.isdisjoint(peer_groups)
    )


def groups_of(uid: int, gid: int) -> frozenset[int]:
    """Supplementary groups of ``uid`` from the group database (blocking NSS lookup).

    [I] This is the membership the system lists now, not the peer process's own group
    list at connect time (that needs SO_PEERGROUPS, which Python does not expose).
    Adding a user to the admin group therefore works without a new login.
    """
    try:
        name = pwd.getpwuid(uid).pw_name
        return frozenset(os.getgrouplist(name, gid))
    except (KeyError, OSError):
        return frozenset({gid})


def _group_names(gids: frozenset[int]) -> list[str]:
    names = []
    for gid in sorted(gids):
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            names.append(str(gid))
    return names


@dataclass
class _Conf:
    handler: Handler
    check: PeerCheck
    idle_timeout: float
    max_connections: int
    max_request_bytes: int
    refusal_hint: str
    active: int = 0


async def serve_control(
    path: str,
    handler: Handler,
    *,
    allowed_uids: frozenset[int],
    allowed_gids: frozenset[int],
    idle_timeout: float = 30.0,
    max_connections: int = 64,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    peer_check: PeerCheck | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket at ``path`` until cancelled.

    ``started()`` is called once the socket is bound (mode 0660) and listening, so a
    goqctl started after ``nursery.start(serve_control, ...)`` returns can connect.

    Resource handling:
        Creates the socket's parent directory if it is missing. Removes a leftover
        socket file at ``path`` only if it is a socket nobody listens on; a live one
        (another daemon) or a non-socket file refuses the start with ``ControlError``.
        Owns the listening socket and one task per connection, and removes the socket
        file on exit if it is still the one it created. At most ``max_connections``
        connections are served at once; the next gets ``Err("unavailable")``.

    Error handling:
        Peers are checked with ``SO_PEERCRED`` (``peer_allowed``; ``peer_check``
        replaces that rule, for tests); a refused peer gets ``Err("not_allowed")``. A
        frame larger than ``max_request_bytes`` gets ``Err("too_large")`` and the
        connection is closed (the stream can no longer be framed). An undecodable
        request, an unknown type or a bad field gets ``Err("bad_request")``, a foreign
        protocol version ``Err("unsupported_version")``; the connection stays usable.
        A connection silent for ``idle_timeout`` seconds (or a reply the peer does not
        read within it) is closed. An exception from ``handler`` is logged as
        ``control_request_failed`` and answered with ``Err("internal")``. Nothing a
        client does ends this function; only bind failures and cancellation do.
    """
    own_uid = os.getuid()
    group_names = _group_names(allowed_gids)

    async def default_check(peer: PeerInfo) -> bool:
        if peer_allowed(
            peer, own_uid=own_uid, allowed_uids=allowed_uids, allowed_gids=allowed_gids
        ):
            return True
        if not allowed_gids:
            return False
        groups = await trio.to_thread.run_sync(groups_of, peer.uid, peer.gid)
        return peer_allowed(
            peer,
            own_uid=own_uid,
            allowed_uids=allowed_uids,
            allowed_gids=allowed_gids,
            peer_groups=groups,
        )

    group = group_names[0] if group_names else "goqd"
    conf = _Conf(
        handler=handler,
        check=peer_check or default_check,
        idle_timeout=idle_timeout,
        max_connections=max_connections,
        max_request_bytes=max_request_bytes,
        refusal_hint=(
            f"ask an administrator to add your user to the {group!r} group "
            f"(sudo usermod -aG {group} $USER), or run goqctl as root"
        ),
    )
    sock = _bind(path)
    inode = os.stat(path).st_ino
    try:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with listener, trio.open_nursery() as nursery:
            log.info("control_listening", path=path, groups=group_names)
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.warning("control_accept_failed", error=os.strerror(exc.errno or 0))
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(_connection, stream, conf)
    finally:
        sock.close()
        _unlink_if_ours(path, inode)


def _bind(path: str) -> socket.socket:
    parent = os.path.dirname(path)
    if parent:
        # 0755, not 0750: members of the admin group must reach the socket even when the
        # directory's group is the daemon's own; the socket's 0660 and SO_PEERCRED guard it.
        os.makedirs(parent, mode=0o755, exist_ok=True)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # The umask is process-wide: no await between set and restore, so no other trio
        # task runs meanwhile. A worker thread creating a file in this instant would get
        # a narrower mode, never a wider one.
        old = os.umask(_BIND_UMASK)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise ControlError(f"cannot listen on control socket {path}: {reason}") from exc
    return sock


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(
            f"control socket path {path} exists and is not a socket; refusing to replace it"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # left behind by a daemon that died: nobody listens on it
        return
    except BlockingIOError:
        pass  # backlog full: very much alive
    finally:
        probe.close()
    raise ControlError(f"another goqd is already serving {path}; stop it first")


def _unlink_if_ours(path: str, inode: int) -> None:
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass  # already gone, or replaced by a newer daemon's socket: leave it


def _peer_of(stream: trio.SocketStream) -> PeerInfo:
    raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerInfo(pid=pid, uid=uid, gid=gid)


async def _connection(stream: trio.SocketStream, conf: _Conf) -> None:
    """One connection. A supervisor boundary: nothing escapes into the server's nursery."""
    conf.active += 1
    try:
        async with stream:
            if conf.active > conf.max_connections:
                log.warning("control_connection_refused", reason="too many connections")
                await _send(
                    stream,
                    conf,
                    "",
                    Err(
                        code="unavailable",
                        message=f"the daemon is serving {conf.max_connections} control "
                        "connections already",
                        hint="try again in a moment",
                    ),
                )
                return
            await _converse(stream, conf)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away; nothing to answer
    except Exception:
        log.exception("control_connection_failed")
    finally:
        conf.active -= 1


async def _converse(stream: trio.SocketStream, conf: _Conf) -> None:
    peer = _peer_of(stream)
    if not await conf.check(peer):
        log.warning("control_peer_refused", peer_pid=peer.pid, peer_uid=peer.uid, peer_gid=peer.gid)
        await _send(
            stream,
            conf,
            "",
            Err(
                code="not_allowed",
                message=f"user id {peer.uid} may not use the goqd control socket",
                hint=conf.refusal_hint,
            ),
        )
        return
    while True:
        body: bytes | None = None
        too_large: FrameTooLarge | None = None
        with trio.move_on_after(conf.idle_timeout):
            try:
                body = await receive_frame(stream, conf.max_request_bytes)
            except ConnectionClosed as exc:
                if exc.partial:
                    log.info("control_frame_truncated", peer_pid=peer.pid, peer_uid=peer.uid)
                return
            except FrameTooLarge as exc:
                too_large = exc
        if too_large is not None:
            log.warning(
                "control_request_too_large",
                size=too_large.size,
                limit=too_large.limit,
                peer_pid=peer.pid,
                peer_uid=peer.uid,
            )
            # The unread body leaves the stream unframeable: answer, then close.
            await _send(
                stream,
                conf,
                "",
                Err(
                    code="too_large",
                    message=f"request of {too_large.size} bytes exceeds the limit of "
                    f"{too_large.limit} bytes",
                    hint="split the input (for CSV files: several smaller files)",
                ),
            )
            return
        if body is None:
            log.info("control_connection_idle", peer_pid=peer.pid, peer_uid=peer.uid)
            return
        try:
            envelope = decode_request(body)
        except BadEnvelope as exc:
            log.info(
                "control_request_rejected",
                code=exc.err.code,
                reason=exc.err.message,
                peer_pid=peer.pid,
                peer_uid=peer.uid,
            )
            if not await _send(stream, conf, exc.request_id, exc.err):
                return
            continue
        reply = await _answer(envelope, peer, conf)
        if not await _send(stream, conf, envelope.id, reply):
            return


async def _answer(envelope: Envelope, peer: PeerInfo, conf: _Conf) -> Ok | Err:
    req: ControlRequest = envelope.request
    tag = request_tag(req)
    if is_mutating(req):
        # The envelope id is the idempotency key; the ledger deduplicates on request_id.
        req = msgspec.structs.replace(req, request_id=envelope.id)
        log.info(
            "control_request",
            request=tag,
            request_id=envelope.id,
            peer_pid=peer.pid,
            peer_uid=peer.uid,
            **_loggable_fields(req),
        )
    try:
        reply = await conf.handler(req, peer)
        if not isinstance(reply, Ok | Err):
            raise TypeError(f"handler returned {type(reply).__name__}, not Ok or Err")
    except Exception:
        # The boundary between the daemon and one operator request: a bug in one
        # request's handling must not take the control server (or the daemon) down.
        log.exception(
            "control_request_failed",
            request=tag,
            request_id=envelope.id,
            peer_pid=peer.pid,
            peer_uid=peer.uid,
        )
        return Err(
            code="internal",
            message=f"the daemon failed to handle {tag!r}",
            hint="this is a bug: see `journalctl -u goqd` (event control_request_failed)",
        )
    return reply


def _loggable_fields(req: ControlRequest) -> dict[str, object]:
    fields: dict[str, object] = {}
    for name in req.__struct_fields__:
        if name in _UNLOGGED_FIELDS:
            continue
        fields[name] = getattr(req, name)
    listing_keys = getattr(req, "listing_keys", None)
    if listing_keys is not None:
        fields["listings"] = len(listing_keys)
    csv_text = getattr(req, "csv_text", None)
    if csv_text is not None:
        fields["csv_chars"] = len(csv_text)
    return fields


async def _send(stream: trio.SocketStream, conf: _Conf, request_id: str, reply: Ok | Err) -> bool:
    """Send one reply; False if the peer did not take it within the idle timeout."""
    try:
        frame = encode_frame(ReplyEnvelope(v=PROTOCOL_VERSION, id=request_id, reply=reply))
    except (msgspec.EncodeError, TypeError, ValueError):
        log.exception("control_request_failed", request_id=request_id, stage="encode")
        frame = encode_frame(
            ReplyEnvelope(
                v=PROTOCOL_VERSION,
                id=request_id,
                reply=Err(code="internal", message="the daemon could not encode its reply"),
            )
        )
    if len(frame) - 4 > MAX_REPLY_BYTES:
        frame = encode_frame(
            ReplyEnvelope(
                v=PROTOCOL_VERSION,
                id=request_id,
                reply=Err(
                    code="too_large",
                    message=f"the reply would be {len(frame) - 4} bytes, over the "
                    f"{MAX_REPLY_BYTES}-byte limit",
                    hint="ask for less at once (use --limit and --after)",
                ),
            )
        )
    with trio.move_on_after(conf.idle_timeout):
        await stream.send_all(frame)
        return True
    log.info("control_reply_timed_out", request_id=request_id)
    return False
