"""The control server: goqctl's requests over a Unix socket, answered by the daemon.

``serve_control`` owns the listening socket and one task per connection. It decodes and
checks every request, asks the daemon's handler for the answer and sends it back. It
never interprets a request itself: what a request *does* is the handler's business.

It must never let a client crash or stall the daemon, nor let one operator lock out the
others: a malformed, oversized, slow or unauthorised request gets an ``Err`` reply or a
closed connection, a handler that raises gets ``Err("internal")``, and connections and
the memory of frames being received are limited per peer user as well as in total. It
must never log a credential: ``KeySet`` is logged by its store only.
"""

from __future__ import annotations

import errno
import grp
import math
import os
import pwd
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
import trio

from goqd.control.protocol import (
    HEADER,
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    PROTOCOL_VERSION,
    BadEnvelope,
    ConnectionClosed,
    ControlRequest,
    Envelope,
    Err,
    Ok,
    Progress,
    ProgressEnvelope,
    ReplyEnvelope,
    ReportProgress,
    decode_request,
    encode_frame,
    is_mutating,
    no_progress,
    receive_exactly,
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
# Frames up to this size are received without drawing on the byte budgets: every
# request but a CSV import is far smaller, so `status` gets through however much of
# the budget others hold, and the connection caps bound their memory (64 x 64 KiB).
SMALL_FRAME_BYTES = 64 << 10
# A refused peer is logged once at warning, then as one summary line per period.
REFUSAL_LOG_PERIOD = 60.0
# Peers whose refusals are remembered for the summary; the oldest is forgotten first.
_REFUSAL_LOG_KEYS = 1024
# Progress frames of one request are at least this far apart (seconds): a bar redrawn
# four times a second looks live, and the work may report thousands of times a second.
PROGRESS_INTERVAL = 0.25


@dataclass(frozen=True)
class PeerInfo:
    """Who is on the other end of a connection, from ``SO_PEERCRED`` (kernel-attested)."""

    pid: int
    uid: int
    gid: int

    def log_fields(self) -> dict[str, int]:
        """The peer as every control log line names it."""
        return {"peer_pid": self.pid, "peer_uid": self.uid}


Handler = Callable[[ControlRequest, PeerInfo], Awaitable[Ok | Err]]
# A handler that also takes the request's progress reporter (``no_progress`` when the
# client did not ask for progress). Reporting never blocks: see ``_ProgressOut``.
ProgressHandler = Callable[[ControlRequest, PeerInfo, ReportProgress], Awaitable[Ok | Err]]


@dataclass(frozen=True)
class WithProgress:
    """Hands ``serve_control`` a ``ProgressHandler`` instead of a plain ``Handler``."""

    handler: ProgressHandler


PeerCheck = Callable[[PeerInfo], Awaitable[bool]]
PeerCredentials = Callable[[trio.SocketStream], PeerInfo]


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


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_names(gids: frozenset[int]) -> list[str]:
    return [_group_name(gid) for gid in sorted(gids)]


@dataclass
class _Limits:
    """Connections and buffered frame bytes, in total and per peer user.

    Every limit is checked and taken in one synchronous step (no await in between), so
    concurrent connections cannot both squeeze under the same limit.
    """

    max_connections: int
    max_connections_per_peer: int
    max_buffered_bytes: int
    max_buffered_bytes_per_peer: int
    # Root and the daemon's own user can stop the daemon outright; a per-user cap would
    # protect nobody from them and would only turn away an administrator's script that
    # runs many goqctl at once. They still count against the global caps.
    uncapped_uids: frozenset[int] = frozenset()
    connections: int = 0
    buffered: int = 0
    connections_of: dict[int, int] = field(default_factory=dict)
    buffered_of: dict[int, int] = field(default_factory=dict)

    def admit(self, uid: int) -> str | None:
        """Take a connection slot for ``uid``, or say why not."""
        mine = self.connections_of.get(uid, 0)
        if mine >= self.max_connections_per_peer and uid not in self.uncapped_uids:
            return (
                f"user id {uid} already has {mine} control connections open "
                f"(at most {self.max_connections_per_peer} per user)"
            )
        if self.connections >= self.max_connections:
            return f"the daemon is serving {self.connections} control connections already"
        self.connections += 1
        self.connections_of[uid] = mine + 1
        return None

    def leave(self, uid: int) -> None:
        self.connections -= 1
        _decrement(self.connections_of, uid, 1)

    def reserve(self, uid: int, size: int) -> str | None:
        """Take ``size`` bytes of the frame budgets for ``uid``, or say why not."""
        if size <= SMALL_FRAME_BYTES:
            return None
        mine = self.buffered_of.get(uid, 0)
        if mine + size > self.max_buffered_bytes_per_peer:
            return (
                f"user id {uid} is already sending or running {mine} bytes of other "
                f"requests; this one of {size} bytes would exceed the "
                f"{self.max_buffered_bytes_per_peer}-byte limit per user"
            )
        if self.buffered + size > self.max_buffered_bytes:
            return (
                f"the daemon is already receiving or running {self.buffered} bytes of "
                f"requests; this one of {size} bytes would exceed its "
                f"{self.max_buffered_bytes}-byte limit"
            )
        self.buffered += size
        self.buffered_of[uid] = mine + size
        return None

    def unreserve(self, uid: int, size: int) -> None:
        if size <= SMALL_FRAME_BYTES:
            return
        self.buffered -= size
        _decrement(self.buffered_of, uid, size)


def _decrement(counts: dict[int, int], key: int, n: int) -> None:
    left = counts[key] - n
    if left:
        counts[key] = left
    else:
        del counts[key]  # the dict holds only peers with something open


@dataclass
class _Refusals:
    """Warnings about refused connections, at most one per peer user and period.

    A refused peer that keeps connecting would otherwise write one warning per attempt
    (a local user can flood the journal). The first refusal of a user is logged at once;
    later ones are counted and logged as one line with ``count`` (refusals since the
    previous line) once ``period`` has passed since that line. ``refused_total`` counts
    every refusal since start.
    """

    event: str
    period: float = REFUSAL_LOG_PERIOD
    total: int = 0
    # uid -> (time of its last line, refusals not logged since, fields of the latest)
    _seen: dict[int, tuple[float, int, dict[str, object]]] = field(
        default_factory=dict, init=False, repr=False
    )
    _pending: trio.Event = field(default_factory=trio.Event, init=False, repr=False)

    def note(self, uid: int, **fields: object) -> None:
        self.total += 1
        now = trio.current_time()
        seen = self._seen.get(uid)
        if seen is None:
            if len(self._seen) >= _REFUSAL_LOG_KEYS:
                oldest = next(iter(self._seen))
                self._emit(oldest, now)
                del self._seen[oldest]
            self._seen[uid] = (now, 0, fields)
            log.warning(self.event, count=1, refused_total=self.total, **fields)
            return
        last, pending, _ = seen
        self._seen[uid] = (last, pending + 1, fields)
        if now - last >= self.period:
            self._emit(uid, now)
        else:
            self._pending.set()

    def _emit(self, uid: int, now: float) -> None:
        last, pending, fields = self._seen[uid]
        if pending:
            log.warning(
                self.event,
                count=pending,
                since_s=round(now - last, 1),
                refused_total=self.total,
                **fields,
            )
        self._seen[uid] = (now, 0, fields)

    async def run_summaries(self) -> None:
        """Write each pending summary when its period is up, so the count of a burst
        that stopped is logged too. Sleeps on an event, not a timer, while nothing is
        pending."""
        while True:
            await self._pending.wait()
            self._pending = trio.Event()
            while due := [last + self.period for last, n, _ in self._seen.values() if n]:
                await trio.sleep_until(min(due))
                now = trio.current_time()
                for uid, (last, n, _) in list(self._seen.items()):
                    if n and now - last >= self.period:
                        self._emit(uid, now)


@dataclass
class _Conf:
    handler: ProgressHandler
    check: PeerCheck
    peer_of: PeerCredentials
    idle_timeout: float
    frame_timeout: float
    max_request_bytes: int
    refusal_hint: str
    limits: _Limits
    progress_interval: float = PROGRESS_INTERVAL
    refused_peers: _Refusals = field(default_factory=lambda: _Refusals("control_peer_refused"))
    refused_connections: _Refusals = field(
        default_factory=lambda: _Refusals("control_connection_refused")
    )


async def serve_control(
    path: str,
    handler: Handler | WithProgress,
    *,
    allowed_uids: frozenset[int],
    allowed_gids: frozenset[int],
    socket_gid: int | None = None,
    idle_timeout: float = 30.0,
    frame_timeout: float = 10.0,
    max_connections: int = 64,
    max_connections_per_peer: int = 8,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    max_buffered_bytes: int = 4 * MAX_REQUEST_BYTES,
    max_buffered_bytes_per_peer: int = 2 * MAX_REQUEST_BYTES,
    peer_check: PeerCheck | None = None,
    peer_credentials: PeerCredentials | None = None,
    progress_interval: float | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket at ``path`` until cancelled.

    ``handler`` answers each request; one given as ``WithProgress(h)`` is also handed a
    ``ReportProgress`` for the request, and when the client asked for progress each
    report may go out as a progress frame before the reply: the latest one only, at
    most one per ``progress_interval`` seconds (default ``PROGRESS_INTERVAL``).

    ``started()`` is called once the socket is bound (mode 0660, group ``socket_gid``)
    and listening, so a goqctl started after ``nursery.start(serve_control, ...)``
    returns can connect.

    Resource handling:
        Creates the socket's parent directory if it is missing. Removes a leftover
        socket file at ``path`` only if it is a socket nobody listens on; a live one
        (another daemon) or a non-socket file refuses the start with ``ControlError``.
        The socket file is given to group ``socket_gid`` (default: the lowest of
        ``allowed_gids``; none: the daemon's primary group), so that its members pass
        the file mode. Owns the listening socket and one task per connection, and
        removes the socket file on exit if it is still the one it created.

        At most ``max_connections`` connections are served at once, and at most
        ``max_connections_per_peer`` of one peer user, so one operator cannot take
        every slot; a connection over either limit gets ``Err("unavailable")``. Frames
        over ``SMALL_FRAME_BYTES`` draw their announced size from a budget of
        ``max_buffered_bytes`` in total and ``max_buffered_bytes_per_peer`` per user,
        held until the request has been answered; a frame that does not fit gets
        ``Err("unavailable")`` before its body is read, and the connection is closed.

    Error handling:
        Peers are checked with ``SO_PEERCRED`` (``peer_allowed``; ``peer_check``
        replaces that rule and ``peer_credentials`` the ``SO_PEERCRED`` read, for
        tests); a refused peer gets ``Err("not_allowed")`` with a hint naming the
        group to join. Refusals are logged once per peer user and then as one summary
        line a minute (``control_peer_refused``, ``control_connection_refused``). A
        frame larger than ``max_request_bytes`` gets ``Err("too_large")`` and the
        connection is closed (the stream can no longer be framed). An undecodable
        request, an unknown type or a bad field gets ``Err("bad_request")``, a foreign
        protocol version ``Err("unsupported_version")``; the connection stays usable.
        A connection silent for ``idle_timeout`` seconds between frames, a frame not
        complete ``frame_timeout`` seconds after its first byte (a sender trickling
        bytes), or a reply the peer does not read within ``idle_timeout`` is closed. An
        exception from ``handler`` is logged as ``control_request_failed`` and answered
        with ``Err("internal")``. Nothing a client does ends this function; only bind
        failures and cancellation do.

        A client that reads its progress frames slowly gets fewer of them; one that
        does not take a frame within ``idle_timeout`` gets no more frames and no reply
        (``control_progress_timed_out``), and one that goes away is not written to
        again. Neither stops the request's work or waits for it: the handler runs to
        its end, and a retry with the same request id finds its outcome.
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

    if socket_gid is None and allowed_gids:
        socket_gid = min(allowed_gids)
    conf = _Conf(
        handler=handler.handler if isinstance(handler, WithProgress) else _plain(handler),
        check=peer_check or default_check,
        peer_of=peer_credentials or _peer_of,
        idle_timeout=idle_timeout,
        frame_timeout=frame_timeout,
        max_request_bytes=max_request_bytes,
        refusal_hint=_refusal_hint(socket_gid if allowed_gids else None, own_uid),
        limits=_Limits(
            max_connections=max_connections,
            max_connections_per_peer=max_connections_per_peer,
            max_buffered_bytes=max_buffered_bytes,
            max_buffered_bytes_per_peer=max_buffered_bytes_per_peer,
            uncapped_uids=frozenset({0, own_uid}),
        ),
        progress_interval=PROGRESS_INTERVAL if progress_interval is None else progress_interval,
    )
    sock = _bind(path, socket_gid)
    inode = os.stat(path).st_ino
    try:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(conf.refused_peers.run_summaries)
            nursery.start_soon(conf.refused_connections.run_summaries)
            log.info(
                "control_listening",
                path=path,
                groups=group_names,
                socket_group=_group_name(os.stat(path).st_gid),
            )
            task_status.started()
            while True:
                stream = await accept_retrying(listener, log, "control")
                nursery.start_soon(_connection, stream, conf)
    finally:
        sock.close()
        _unlink_if_ours(path, inode)


async def accept_retrying(
    listener: trio.SocketListener, logger: Any, prefix: str
) -> trio.SocketStream:
    """The next connection on ``listener``; the control and HTTP listeners both use it.

    Out of file handles or memory (``EMFILE`` and the like), it waits 100 ms and tries
    again, as ``trio.serve_listeners`` does, and logs ``<prefix>_accept_failed`` once
    when that starts and ``<prefix>_accept_recovered`` when a connection comes through
    again: while the process is out of file handles every accept fails, and a line
    for each would flood the journal. Any other error is raised.
    """
    failing = False
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                raise
            if not failing:
                logger.warning(f"{prefix}_accept_failed", error=os.strerror(exc.errno or 0))
                failing = True
            await trio.sleep(0.1)
            continue
        if failing:
            logger.info(f"{prefix}_accept_recovered")
        return stream


def _plain(handler: Handler) -> ProgressHandler:
    async def answer(req: ControlRequest, peer: PeerInfo, report: ReportProgress) -> Ok | Err:
        return await handler(req, peer)

    return answer


def _refusal_hint(group: int | None, own_uid: int) -> str:
    if group is None:
        return (
            f"only root and the daemon's user ({_user_name(own_uid)}) may use this control "
            "socket: run goqctl as one of them, or ask an administrator to list a group "
            "in daemon.control-groups"
        )
    name = _group_name(group)
    return (
        f"ask an administrator to add your user to the {name!r} group "
        f"(sudo usermod -aG {name} $USER, then log in again), or run goqctl as root"
    )


def _bind(path: str, gid: int | None) -> socket.socket:
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
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise ControlError(f"cannot listen on control socket {path}: {reason}") from exc
    try:
        if gid is not None:
            _chgrp(path, gid)
        # listen() only after the group is right: nobody connects to a half-set-up socket.
        sock.listen(128)
    except ControlError:
        sock.close()
        os.unlink(path)
        raise
    except OSError as exc:
        sock.close()
        os.unlink(path)
        reason = exc.strerror or str(exc)
        raise ControlError(f"cannot listen on control socket {path}: {reason}") from exc
    return sock


def _chgrp(path: str, gid: int) -> None:
    """Give the socket file to the admin group: the file is created with the daemon's
    primary group, whose members are not the ones the 0660 mode is meant to admit."""
    try:
        os.chown(path, -1, gid)
    except PermissionError as exc:
        name = _group_name(gid)
        user = _user_name(os.geteuid())  # chown checks the effective user
        raise ControlError(
            f"cannot give the control socket {path} to group {name!r} "
            f"(daemon.control-groups): the daemon's user {user!r} is not a member of it; "
            f"add it (sudo usermod -aG {name} {user}) or change daemon.control-groups"
        ) from exc


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
    try:
        async with stream:
            peer = conf.peer_of(stream)
            # Checked before a slot is taken: a refused peer never holds one.
            if not await conf.check(peer):
                conf.refused_peers.note(peer.uid, **peer.log_fields(), peer_gid=peer.gid)
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
            full = conf.limits.admit(peer.uid)
            if full is not None:
                conf.refused_connections.note(peer.uid, **peer.log_fields(), reason=full)
                await _send(
                    stream,
                    conf,
                    "",
                    Err(code="unavailable", message=full, hint="try again in a moment"),
                )
                return
            try:
                await _converse(stream, peer, conf)
            finally:
                conf.limits.leave(peer.uid)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away; nothing to answer
    except Exception:
        log.exception("control_connection_failed")


async def _converse(stream: trio.SocketStream, peer: PeerInfo, conf: _Conf) -> None:
    while True:
        # Between frames a connection may stay quiet up to idle_timeout.
        first: bytes | None = None
        with trio.move_on_after(conf.idle_timeout):
            first = await stream.receive_some(HEADER.size)
        if first is None:
            log.info("control_connection_idle", **peer.log_fields())
            return
        if not first:
            return  # closed cleanly between frames
        # From its first byte, a whole frame must arrive within frame_timeout: a sender
        # that trickles a byte now and then is cut off, however short its pauses.
        with trio.move_on_after(conf.frame_timeout) as frame_deadline:
            if not await _receive_and_answer(stream, peer, conf, first, frame_deadline):
                return
        if frame_deadline.cancelled_caught:
            log.info(
                "control_frame_timed_out",
                timeout_s=conf.frame_timeout,
                **peer.log_fields(),
            )
            return


async def _receive_and_answer(
    stream: trio.SocketStream,
    peer: PeerInfo,
    conf: _Conf,
    first: bytes,
    frame_deadline: trio.CancelScope,
) -> bool:
    """Receive the rest of one frame, answer it; False if the connection must close."""
    try:
        header = first + await receive_exactly(stream, HEADER.size - len(first), started=True)
    except ConnectionClosed:
        log.info("control_frame_truncated", **peer.log_fields())
        return False
    (size,) = HEADER.unpack(header)
    if size > conf.max_request_bytes:
        log.warning(
            "control_request_too_large",
            size=size,
            limit=conf.max_request_bytes,
            **peer.log_fields(),
        )
        # The unread body leaves the stream unframeable: answer, then close.
        await _send(
            stream,
            conf,
            "",
            Err(
                code="too_large",
                message=f"request of {size} bytes exceeds the limit of "
                f"{conf.max_request_bytes} bytes",
                hint="split the input (for CSV files: several smaller files)",
            ),
        )
        return False
    busy = conf.limits.reserve(peer.uid, size)
    if busy is not None:
        conf.refused_connections.note(peer.uid, **peer.log_fields(), reason=busy)
        await _send(
            stream,
            conf,
            "",
            Err(code="unavailable", message=busy, hint="try again in a moment"),
        )
        return False  # the body stays unread: the stream cannot be framed any more
    try:
        try:
            body = await receive_exactly(stream, size, started=True)
        except ConnectionClosed:
            log.info("control_frame_truncated", **peer.log_fields())
            return False
        # The frame is in: answering (the handler may take minutes) is not the
        # sender's slowness, so it runs outside the frame's deadline.
        frame_deadline.deadline = float("inf")
        try:
            envelope = decode_request(body)
        except BadEnvelope as exc:
            log.info(
                "control_request_rejected",
                code=exc.err.code,
                reason=exc.err.message,
                **peer.log_fields(),
            )
            return await _send(stream, conf, exc.request_id, exc.err)
        del body
        if envelope.progress:
            out = _ProgressOut(stream, conf, envelope.id)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(out.run)
                try:
                    reply = await _answer(envelope, peer, conf, out.report)
                finally:
                    out.close()
            if out.broken:
                return False  # the stream stopped mid-frame: no reply can follow
        else:
            reply = await _answer(envelope, peer, conf, no_progress)
    finally:
        conf.limits.unreserve(peer.uid, size)
    return await _send(stream, conf, envelope.id, reply)


class _ProgressOut:
    """The progress frames of one request, sent by a task of their own.

    ``report`` (called by the work) only keeps the latest report and wakes the sender:
    it never waits for the peer, so a reader that is slow or stalled cannot hold up
    the work, the ledger or anyone else. The sender sends the latest report, then waits
    ``progress_interval``; the reports in between are dropped. ``close`` ends the
    sender after the frame it is sending, so the reply never lands mid-frame.

    Error handling: a frame the peer does not take within ``idle_timeout`` ends the
    sending and sets ``broken`` (the stream may hold half a frame, so no reply may
    follow); so does a peer that went away. Nothing here raises into the request.
    """

    def __init__(self, stream: trio.SocketStream, conf: _Conf, request_id: str) -> None:
        self._stream = stream
        self._conf = conf
        self._request_id = request_id
        self._latest: Progress | None = None
        self._changed = trio.Event()
        self._closing = trio.Event()
        self.broken = False

    def report(self, progress: Progress) -> None:
        self._latest = progress
        self._changed.set()

    def close(self) -> None:
        self._closing.set()
        self._changed.set()

    async def run(self) -> None:
        next_at = -math.inf
        while True:
            await self._changed.wait()
            self._changed = trio.Event()
            if self._closing.is_set():
                return
            with trio.move_on_at(next_at):
                await self._closing.wait()
            if self._closing.is_set():
                return
            progress, self._latest = self._latest, None
            if progress is None:
                continue
            if not await self._send(progress):
                self.broken = True
                return
            next_at = trio.current_time() + self._conf.progress_interval

    async def _send(self, progress: Progress) -> bool:
        frame = encode_frame(
            ProgressEnvelope(v=PROTOCOL_VERSION, id=self._request_id, progress=progress)
        )
        try:
            with trio.move_on_after(self._conf.idle_timeout):
                await self._stream.send_all(frame)
                return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False  # the client went away; its request goes on
        log.info("control_progress_timed_out", request_id=self._request_id)
        return False


async def _answer(
    envelope: Envelope, peer: PeerInfo, conf: _Conf, report: ReportProgress
) -> Ok | Err:
    req: ControlRequest = envelope.request
    tag = request_tag(req)
    if is_mutating(req):
        # The envelope id is the idempotency key; the ledger deduplicates on request_id.
        req = msgspec.structs.replace(req, request_id=envelope.id)
        log.info(
            "control_request",
            request=tag,
            request_id=envelope.id,
            **peer.log_fields(),
            **_loggable_fields(req),
        )
    try:
        reply = await conf.handler(req, peer, report)
        if not isinstance(reply, Ok | Err):
            raise TypeError(f"handler returned {type(reply).__name__}, not Ok or Err")
    except Exception:
        # The boundary between the daemon and one operator request: a bug in one
        # request's handling must not take the control server (or the daemon) down.
        log.exception(
            "control_request_failed",
            request=tag,
            request_id=envelope.id,
            **peer.log_fields(),
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
