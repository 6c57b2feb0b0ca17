"""Progress of long control requests (issue 17): the daemon streams progress frames
before the reply to a request that asks for them; a slow, stalled, vanished or hostile
client changes nothing about the work or anyone else's requests; a retry with the same
request id gets the same result; goqctl shows a rich bar on a terminal, plain lines on
stderr otherwise, and nothing extra on stdout.

The protocol tests run ``serve_control`` with a scripted handler on a real Unix socket
and trio's fake clock; the rest run a real daemon (ledger file, control socket, for
listings a Rakuten simulator on loopback HTTP) on the wall clock, because the ledger
works in a thread, which a fake clock would jump over.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from goqd import app as goqd_app
from goqd import messages as m
from goqd.app import Daemon, run_daemon
from goqd.cli import progress
from goqd.cli.goqctl import main as goqctl_main
from goqd.config import Config
from goqd.control import imports, reconcile
from goqd.control import protocol as p
from goqd.control import server as server_mod
from goqd.control.client import DaemonUnreachable, call
from goqd.control.server import PeerInfo, WithProgress, serve_control
from goqd.ledger import open_db, queries
from goqd.linking import fold
from goqd.sim.rakuten import SimRakuten
from goqd.tools.fleet import daemon_config
from tests.helpers import rig

# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


@pytest.fixture
def tmp(sock_dir: str) -> str:
    return sock_dir


def seeded_config(tmp: str, n: int) -> tuple[Config, str]:
    """A bare daemon whose ledger has products P00000.. (10 units each), and a stock CSV
    setting each of them to a new count."""
    config = daemon_config(tmp, ())  # no stores: ledger, socket, HTTP
    os.makedirs(config.daemon.state_dir, exist_ok=True)
    conn = open_db(config.daemon.ledger_path)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO products (sku, total, first_store, created_at, code_fold) "
        "VALUES (?, 10, '', 0, ?)",
        ((f"P{i:06d}", fold(f"P{i:06d}")) for i in range(n)),
    )
    conn.execute("COMMIT")
    conn.close()
    text = "sku,quantity\n" + "".join(f"P{i:06d},{i % 50}\n" for i in range(n))
    return config, text


@asynccontextmanager
async def open_bare_daemon(config: Config) -> AsyncIterator[Daemon]:
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(run_daemon, config)
        yield daemon
        nursery.cancel_scope.cancel()


def import_states(config: Config) -> list[str]:
    return [x.state for x in queries.read(config.daemon.ledger_path, queries.stock_imports)]


def outbox(config: Config) -> list[queries.Push]:
    return queries.read(config.daemon.ledger_path, queries.outbox)


def latest_version(config: Config) -> int:
    """The newest version in the outbox (0 when it is empty)."""
    return max((x.version for x in outbox(config)), default=0)


def imported_moves(config: Config) -> int:
    moves = queries.read(config.daemon.ledger_path, queries.movements)
    return sum(mv.reason == "stock import" for mv in moves)


async def wait_until(check: Any, what: str) -> None:
    """Poll a real daemon's ledger file (its work runs in a thread: no fake clock); the
    test's own fail_after bounds the wait."""
    while not check():
        await trio.sleep(0.02)


def frame(request: p.ControlRequest, rid: str, *, progress: bool = True) -> bytes:
    return p.encode_frame(
        p.Envelope(v=p.PROTOCOL_VERSION, id=rid, request=request, progress=progress)
    )


async def send_raw(path: str, data: bytes) -> trio.SocketStream:
    stream = await trio.open_unix_socket(path)
    await stream.send_all(data)
    return stream


async def read_json(stream: trio.SocketStream) -> dict[str, Any]:
    body = await p.receive_frame(stream, p.MAX_REPLY_BYTES)
    decoded: dict[str, Any] = json.loads(body)
    return decoded


async def read_until_reply(
    stream: trio.SocketStream,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every progress frame, then the reply frame."""
    seen: list[dict[str, Any]] = []
    while True:
        got = await read_json(stream)
        if "reply" in got:
            return seen, got
        seen.append(got)


def rising(values: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))


# --------------------------------------------------------------------------------------
# The protocol, with a scripted handler
# --------------------------------------------------------------------------------------


@pytest.fixture
def sock_path(sock_dir: str) -> str:
    return os.path.join(sock_dir, "c.sock")


async def scripted(req: p.ControlRequest, peer: PeerInfo, report: p.ReportProgress) -> p.Ok | p.Err:
    """SetStock: 10,000 reports over 10 s (of SKU STUCK: the same report every 0.5 s
    for 60 s). AdjustStock: 10 s without a word. StockImport: a report every 0.5 s for
    10 s."""
    match req:
        case m.SetStock(sku="STUCK"):
            for _ in range(120):
                report(p.Progress(phase="work", done=5, total=10, unit="steps"))
                await trio.sleep(0.5)
            return p.Ok(result=m.Done(changed=1))
        case m.SetStock():
            for i in range(1, 10_001):
                report(p.Progress(phase="work", done=i, total=10_000, unit="steps"))
                await trio.sleep(0.001)
            return p.Ok(result=m.Done(changed=10_000))
        case m.AdjustStock():
            await trio.sleep(10)
            return p.Ok(result=m.Done(changed=1))
        case p.StockImport():
            for i in range(1, 21):
                report(p.Progress(phase="work", done=i, total=20, unit="steps"))
                await trio.sleep(0.5)
            return p.Ok(result=m.Done(changed=20))
    return p.Err(code="bad_request", message="not scripted")


@asynccontextmanager
async def serving_scripted(path: str) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                serve_control,
                path,
                WithProgress(scripted),
                allowed_uids=frozenset(),
                allowed_gids=frozenset(),
            )
        )
        yield
        nursery.cancel_scope.cancel()


async def test_progress_is_coalesced_to_a_few_frames_a_second_and_the_reply_follows(
    autojump_clock: trio.testing.MockClock, sock_path: str
) -> None:
    seen: list[p.Progress] = []
    async with serving_scripted(sock_path):
        with trio.fail_after(60):
            result = await call(
                sock_path, m.SetStock(sku="A", quantity=1), on_progress=seen.append, timeout=30
            )
    assert result == m.Done(changed=10_000)
    dones = [x.done for x in seen]
    assert rising(dones), dones  # the latest each time: never stale, never twice
    assert {(x.phase, x.total, x.unit) for x in seen} == {("work", 10_000, "steps")}
    # 10,000 reports in 10 s, at most one frame per PROGRESS_INTERVAL (0.25 s).
    assert 20 <= len(seen) <= 10 / server_mod.PROGRESS_INTERVAL + 2, len(seen)


async def test_a_request_that_does_not_ask_for_progress_gets_its_one_reply_only(
    autojump_clock: trio.testing.MockClock, sock_path: str
) -> None:
    async with serving_scripted(sock_path):
        with trio.fail_after(60):
            stream = await send_raw(
                sock_path, frame(m.SetStock(sku="A", quantity=1), "r1", progress=False)
            )
            async with stream:
                first = await read_json(stream)
                extra = None
                with trio.move_on_after(5):
                    extra = await stream.receive_some()
    assert first["id"] == "r1" and first["reply"]["result"]["changed"] == 10_000
    assert extra is None  # nothing came after the reply


async def test_progress_keeps_a_call_alive_past_its_timeout_and_silence_does_not(
    autojump_clock: trio.testing.MockClock, sock_path: str
) -> None:
    seen: list[p.Progress] = []
    async with serving_scripted(sock_path):
        with trio.fail_after(120):
            # 10 s of work reporting every 0.5 s: a 2 s timeout is never reached.
            done = await call(
                sock_path, p.StockImport(csv_text="x"), timeout=2, on_progress=seen.append
            )
            # The same without asking for progress: the timeout bounds the whole call.
            with pytest.raises(DaemonUnreachable) as whole:
                await call(sock_path, p.StockImport(csv_text="x"), timeout=2)
            # Asking for progress but hearing nothing for 2 s.
            with pytest.raises(DaemonUnreachable) as silent:
                await call(
                    sock_path, m.AdjustStock(sku="A", delta=1), timeout=2, on_progress=seen.append
                )
    assert done == m.Done(changed=20)
    assert len(seen) >= 15
    assert "no reply within 2 seconds" in str(whole.value)
    assert "no progress from the daemon for 2 seconds" in str(silent.value)
    assert silent.value.sent


async def test_a_daemon_repeating_the_same_progress_does_not_keep_the_client_waiting(
    autojump_clock: trio.testing.MockClock, sock_path: str
) -> None:
    seen: list[p.Progress] = []
    async with serving_scripted(sock_path):
        with trio.fail_after(120):
            start = trio.current_time()
            with pytest.raises(DaemonUnreachable) as stuck:
                await call(
                    sock_path,
                    m.SetStock(sku="STUCK", quantity=1),
                    timeout=2,
                    on_progress=seen.append,
                )
            waited = trio.current_time() - start
    # Frames kept coming (each shown), but none moved: the 2 s ran from the first one.
    assert len(seen) >= 3, seen
    assert waited < 3, waited
    assert "no progress from the daemon for 2 seconds" in str(stuck.value)


# --------------------------------------------------------------------------------------
# Stock import on a real daemon
# --------------------------------------------------------------------------------------


async def test_a_100000_row_stock_import_streams_rising_progress_with_its_total_then_its_reply(
    tmp: str,
) -> None:
    n = 100_000
    config, text = seeded_config(tmp, n)
    seen: list[p.Progress] = []
    with trio.fail_after(300), structlog.testing.capture_logs():
        async with open_bare_daemon(config):
            result = await call(
                config.daemon.control_socket,
                p.StockImport(csv_text=text),
                timeout=60,
                on_progress=seen.append,
            )
    assert result == m.Done(changed=n)
    assert len(seen) >= 3, seen
    phases = [x.phase for x in seen]
    assert phases == sorted(phases, key=["stage", "apply"].index)  # staged, then applied
    staged = [x for x in seen if x.phase == "stage"]
    applied = [x for x in seen if x.phase == "apply"]
    assert applied, seen
    assert all(x.total is None and x.unit == "rows" for x in staged)
    assert all(x.total == n and x.unit == "rows" for x in applied)
    assert rising([x.done for x in staged]) and rising([x.done for x in applied])
    assert all(x.done <= n for x in seen)
    assert imported_moves(config) == n


def shrunk_peer(stream: trio.SocketStream) -> PeerInfo:
    # The smallest send buffer the kernel allows: a few unread frames fill it, and the
    # daemon's next send waits, as it would for a terminal that was suspended (Ctrl-Z).
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    return server_mod._peer_of(stream)


async def test_a_reader_that_stops_reading_stalls_neither_the_daemon_nor_the_import(
    tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 20_000
    monkeypatch.setattr(imports, "STAGE_CHUNK", 500)
    monkeypatch.setattr(imports, "APPLY_CHUNK", 200)
    monkeypatch.setattr(
        goqd_app,
        "serve_control",
        functools.partial(
            serve_control, idle_timeout=2.0, peer_credentials=shrunk_peer, progress_interval=0.0
        ),
    )
    config, text = seeded_config(tmp, n)
    sock = config.daemon.control_socket
    request = p.StockImport(csv_text=text)
    answered = 0
    with trio.fail_after(120), structlog.testing.capture_logs() as logs:
        async with open_bare_daemon(config):
            stalled = await send_raw(sock, frame(request, "stall-1"))
            first = await read_json(stalled)  # then never read again until the end
            assert first["progress"]["phase"] == "stage"

            def finished() -> bool:
                return import_states(config) == ["done"]

            while not finished():
                status = await call(sock, p.Status(), timeout=10)
                assert isinstance(status, p.DaemonStatus)
                answered += 1
                await trio.sleep(0.02)
            again = await call(sock, request, request_id="stall-1", timeout=30)
            # The daemon gives up on the reader that never reads (its idle timeout is
            # 2 s here), rather than waiting for it.
            await wait_until(
                lambda: any(e["event"] == "control_progress_timed_out" for e in logs),
                "the daemon gives up on the stalled reader",
            )
            late: list[dict[str, Any]] = []
            with pytest.raises(p.ConnectionClosed):
                while True:
                    late.append(await read_json(stalled))
            await stalled.aclose()
    assert answered >= 1
    assert again == m.Done(changed=n)
    assert imported_moves(config) == n  # applied once
    # No reply after a frame the timeout may have cut short: the connection closed.
    assert all("progress" in f for f in late), late


async def test_a_client_gone_mid_import_leaves_it_to_finish_and_a_retry_gets_the_same_reply(
    tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 20_000
    monkeypatch.setattr(imports, "STAGE_CHUNK", 500)
    monkeypatch.setattr(imports, "APPLY_CHUNK", 200)
    config, text = seeded_config(tmp, n)
    sock = config.daemon.control_socket
    request = p.StockImport(csv_text=text)
    seen: list[p.Progress] = []
    with trio.fail_after(120), structlog.testing.capture_logs():
        async with open_bare_daemon(config):
            gone = await send_raw(sock, frame(request, "gone-1"))
            await read_json(gone)
            await gone.aclose()  # goqctl killed, or the terminal closed
            # A retry at once joins the import under way and hears how it goes.
            joined = await call(sock, request, request_id="gone-1", on_progress=seen.append)
            later = await call(sock, request, request_id="gone-1")
    assert joined == later == m.Done(changed=n)
    assert imported_moves(config) == n  # applied once, not once per request
    assert seen and seen[-1].done <= n


async def test_garbage_while_a_progress_stream_is_open_is_refused_and_harms_no_one(
    tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 20_000
    monkeypatch.setattr(imports, "STAGE_CHUNK", 500)
    monkeypatch.setattr(imports, "APPLY_CHUNK", 200)
    config, text = seeded_config(tmp, n)
    sock = config.daemon.control_socket
    garbage = b"\xff{not json!"
    junk = p.HEADER.pack(len(garbage)) + garbage
    with trio.fail_after(120), structlog.testing.capture_logs():
        async with open_bare_daemon(config):
            # The streaming connection itself sends garbage after its request.
            streaming = await send_raw(
                sock, frame(p.StockImport(csv_text=text), "hostile-1") + junk
            )
            first = await read_json(streaming)
            # Another connection sends garbage meanwhile, and another asks for status.
            other = await send_raw(sock, junk)
            other_reply = await read_json(other)
            await other.aclose()
            status = await call(sock, p.Status(), timeout=10)
            _, reply = await read_until_reply(streaming)
            after = await read_json(streaming)
            await streaming.aclose()
    assert "progress" in first
    assert other_reply["reply"]["type"] == "err"
    assert other_reply["reply"]["code"] == "bad_request"
    assert "not a goqd request" in other_reply["reply"]["message"]
    assert isinstance(status, p.DaemonStatus)
    assert reply["id"] == "hostile-1"
    assert reply["reply"]["type"] == "ok" and reply["reply"]["result"]["changed"] == n
    # The garbage on the streaming connection is answered after its reply, never
    # mixed into the stream.
    assert after["reply"]["type"] == "err" and after["reply"]["code"] == "bad_request"
    assert imported_moves(config) == n


# --------------------------------------------------------------------------------------
# Listing import, diff and reflect --all on a real daemon with a mall
# --------------------------------------------------------------------------------------


async def test_import_diff_and_reflect_all_report_progress_and_retries_get_the_same_result(
    tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 600
    monkeypatch.setattr(server_mod, "PROGRESS_INTERVAL", 0.0)  # every report a frame
    monkeypatch.setattr(reconcile, "REFLECT_CHUNK", 100)
    sim = SimRakuten(shop_id="500001", clock=time.time, seed=1, enforce_rate_limits=False)
    for i in range(n):
        sim.add_listing(f"item{i:05d}/v1", link_code=f"SKU{i:05d}", quantity=i % 7)
    with trio.fail_after(240), structlog.testing.capture_logs():
        async with trio.open_nursery() as nursery:
            store = await rig.serve_store(
                nursery, tmp, "base", sim, poll_interval="1h", watch_interval="0s"
            )
            config = rig.loopback_config(tmp, [store], base_store="base")
            await nursery.start(run_daemon, config)
            sock = config.daemon.control_socket

            # Import: the client goes away after the first frame; a retry with the same
            # id joins it, and one after it finished gets the same reply again.
            gone = await send_raw(sock, frame(p.Import(store="base"), "imp-1"))
            first = await read_json(gone)
            await gone.aclose()
            heard: list[p.Progress] = []
            joined = await call(
                sock, p.Import(store="base"), request_id="imp-1", on_progress=heard.append
            )
            later = await call(sock, p.Import(store="base"), request_id="imp-1")
            heard_again: list[p.Progress] = []
            fresh = await call(sock, p.Import(store="base"), on_progress=heard_again.append)

            compared: list[p.Progress] = []
            report = await call(sock, p.Diff(store="base"), on_progress=compared.append)

            await wait_until(lambda: outbox(config) == [], "the pushes")
            await call(sock, p.Pause(store="base"))  # the outbox stays as queued
            queued: list[p.Progress] = []
            reflected = await call(
                sock, p.Reflect(store="base"), request_id="ref-1", on_progress=queued.append
            )
            versions, count = latest_version(config), len(outbox(config))
            again = await call(sock, p.Reflect(store="base"), request_id="ref-1")
            versions_again = latest_version(config)
            await call(sock, p.Reflect(store="base"))
            versions_new = latest_version(config)
            nursery.cancel_scope.cancel()

    assert first["progress"]["phase"] == "import" and first["progress"]["unit"] == "listings"
    assert isinstance(joined, m.LinkReport)
    assert joined.created == joined.new_listings == n  # the first run's reply
    assert later == joined
    assert isinstance(fresh, m.LinkReport) and fresh.created == fresh.new_listings == 0
    assert heard and rising([x.done for x in heard]) and heard[-1].done <= n

    assert isinstance(report, p.DiffReport) and report.checked == n
    assert {(x.phase, x.total, x.unit) for x in compared} == {("compare", n, "listings")}
    assert rising([x.done for x in compared]) and compared[-1].done == n

    assert reflected == again == m.Done(changed=n, detail=f"{n} listing(s) queued for a push")
    assert {(x.phase, x.total, x.unit) for x in queued} == {("queue", n, "listings")}
    # A chunk at a time; the last may give way to the reply.
    assert [x.done for x in queued][:6] == [0, 100, 200, 300, 400, 500]
    assert rising([x.done for x in queued]) and queued[-1].done <= n
    assert count == n
    assert versions_again == versions  # the retry queued nothing again
    assert versions_new > versions  # (a new request does, which the check above would see)


# --------------------------------------------------------------------------------------
# goqctl
# --------------------------------------------------------------------------------------

_LINE = re.compile(r"^(stage: \d+ rows|apply: \d+/(\d+) rows)$")


async def test_goqctl_prints_plain_progress_lines_on_stderr_and_only_the_json_on_stdout(
    tmp: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 20_000
    monkeypatch.setattr(imports, "STAGE_CHUNK", 500)
    monkeypatch.setattr(imports, "APPLY_CHUNK", 200)
    config, text = seeded_config(tmp, n)
    path = os.path.join(tmp, "stock.csv")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    argv = ["--socket", config.daemon.control_socket, "--json", "stock", "import", path]
    with trio.fail_after(120), structlog.testing.capture_logs():
        async with open_bare_daemon(config):
            code = await trio.to_thread.run_sync(goqctl_main, argv)
    out, err = capsys.readouterr()
    assert code == 0
    assert len(out.splitlines()) == 1  # the result, nothing else
    assert json.loads(out)["changed"] == n
    lines = err.splitlines()
    assert lines, "no progress on stderr"
    assert all(_LINE.match(line) for line in lines), lines
    assert all(int(mt.group(2)) == n for line in lines if (mt := _LINE.match(line)) and mt.group(2))


def test_progress_is_a_rich_bar_on_a_terminal_and_plain_lines_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("TERM", "xterm-256color")
    tty = Terminal()
    with progress.shown_on(tty) as show:
        assert isinstance(show, progress.Bar)
        show(p.Progress(phase="apply", done=40_000, total=100_000, unit="rows"))
    drawn = tty.getvalue()
    assert "apply" in drawn and "40000/100000" in drawn and "━" in drawn  # rich's bar
    assert "\x1b[" in drawn  # drawn in place with terminal control sequences

    # A terminal that cannot draw in place gets lines, as a log does.
    monkeypatch.setenv("TERM", "dumb")
    dumb = Terminal()
    with progress.shown_on(dumb) as show:
        show(p.Progress(phase="apply", done=40_000, total=100_000, unit="rows"))
    assert dumb.getvalue() == "apply: 40000/100000 rows\n"

    log = io.StringIO()
    clock = iter([0.0, 1.0, 6.0, 7.0]).__next__
    lines = progress.PlainLines(log, clock=clock)
    lines(p.Progress(phase="stage", done=0, unit="rows"))
    lines(p.Progress(phase="stage", done=5000, unit="rows"))  # 1 s later: not a line
    lines(p.Progress(phase="stage", done=9000, unit="rows"))  # 6 s: a line
    lines(p.Progress(phase="apply", done=0, total=9000, unit="rows"))  # new phase: a line
    assert log.getvalue().splitlines() == [
        "stage: 0 rows",
        "stage: 9000 rows",
        "apply: 0/9000 rows",
    ]
    # The daemon's words reach a terminal: no escape sequences get through.
    assert progress.progress_line(p.Progress(phase="\x1b[2Jx", done=1)) == "?[2Jx: 1"


async def test_ctrl_c_leaves_the_import_running_and_the_printed_command_gets_its_result(
    tmp: str,
) -> None:
    n = 50_000
    config, text = seeded_config(tmp, n)
    path = os.path.join(tmp, "stock.csv")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    sock = config.daemon.control_socket
    script = "import sys; from goqd.cli.goqctl import main; sys.exit(main())"
    with trio.fail_after(180), structlog.testing.capture_logs():
        async with open_bare_daemon(config):
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-c", script, "--socket", sock, "stock", "import", path],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert proc.stderr is not None and proc.stdout is not None
            err = b""
            while b"stage: " not in err:  # goqctl is following the import now
                chunk = await proc.stderr.receive_some()
                assert chunk, err
                err += chunk
            proc.send_signal(signal.SIGINT)
            async for chunk in proc.stderr:
                err += chunk
            code = await proc.wait()
            stopped_early = import_states(config)
            message = err.decode()
            [again] = re.findall(r"(goqctl --request-id \S+ .*)$", message, re.MULTILINE)
            argv = shlex.split(again)[1:]
            rerun = await trio.to_thread.run_sync(goqctl_main, ["--json", *argv])
    assert code == 130, message
    assert "interrupted" in message and "goes on with it" in message
    assert stopped_early != ["done"]  # goqctl stopped before the import did
    assert rerun == 0
    assert imported_moves(config) == n  # finished, and applied once
