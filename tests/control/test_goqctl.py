"""goqctl against a real control server (in a background thread with its own trio loop)."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
import trio

from goqd import messages as m
from goqd.cli import goqctl as goqctl_module
from goqd.cli.goqctl import _cell_width, main
from goqd.control import protocol as p
from goqd.control.server import PeerInfo, serve_control
from tests.helpers.paths import ROOT

CANARY = "CANARY-key-7f3a9c1e5b"
NOW = time.time()


class FakeDaemon:
    """Answers like a daemon with two Rakuten stores, one of them stopped (level 9)."""

    def __init__(self) -> None:
        self.seen: list[p.ControlRequest] = []
        self.logs: list[MutableMapping[str, Any]] = []

    async def __call__(self, req: p.ControlRequest, peer: PeerInfo) -> p.Ok | p.Err:
        self.seen.append(req)
        match req:
            case p.Stores():
                return p.Ok(result=p.StoreList(stores=STORES))
            case m.ListProducts():
                return p.Ok(result=m.ProductList(products=PRODUCTS))
            case m.SetStock(sku="NOPE"):
                return p.Err(code="not_found", message="unknown SKU 'NOPE'")
            case p.Pause(store="locked"):
                return p.Err(code="not_allowed", message="nope")
            case m.SetStock() | m.AdjustStock():
                delta = req.delta if isinstance(req, m.AdjustStock) else 0
                return p.Ok(result=m.StockChanged(sku=req.sku, total=9, delta=delta, movement_id=1))
            case p.Diff(store="slow"):
                await trio.sleep(3600)  # a catalogue read at the mall's pace
        return p.Ok(result=m.Done(changed=1))


STORES = (
    p.StoreInfo(
        name="rakuten-a",
        mall="rakuten",
        state="running",
        error_level=0,
        last_poll_ok_at=NOW - 65,
        last_push_ok_at=None,
        outbox=0,
        parked=0,
        cursor=None,
        credential_expires_at=NOW + 40 * 86400,
    ),
    p.StoreInfo(
        name="rakuten-b",
        mall="rakuten",
        state="stopped",
        error_level=9,
        last_poll_ok_at=None,
        last_push_ok_at=None,
        outbox=3,
        parked=0,
        cursor=None,
        credential_expires_at=None,
        message="licenseKey expired",
    ),
)

PRODUCTS = (
    m.ProductRecord(
        sku="TEA-500", name="緑茶 500ml ケース", total=120, first_store="r", listings=3
    ),
    m.ProductRecord(sku="CUP-1", name="mug", total=7, first_store="r", listings=1),
    m.ProductRecord(sku="ﾊﾝｶｸ-1", name="ﾊﾝｶｸ ｶﾅ", total=1234, first_store="r", listings=2),
)


@pytest.fixture
def server() -> Iterator[tuple[str, FakeDaemon]]:
    """A control server on its own trio loop in a thread, so goqctl's own trio.run works."""
    d = tempfile.mkdtemp(dir="/tmp", prefix="goqt")
    path = os.path.join(d, "c.sock")
    daemon = FakeDaemon()
    ready = threading.Event()
    state: dict[str, object] = {}

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            state["scope"] = nursery.cancel_scope
            state["token"] = trio.lowlevel.current_trio_token()
            await nursery.start(
                functools.partial(
                    serve_control,
                    path,
                    daemon,
                    allowed_uids=frozenset(),
                    allowed_gids=frozenset(),
                )
            )
            ready.set()

    # The server's log lines are captured rather than printed into goqctl's stdout.
    with structlog.testing.capture_logs() as logs:
        daemon.logs = logs
        thread = threading.Thread(target=trio.run, args=(run,), daemon=True)
        thread.start()
        assert ready.wait(10)
        try:
            yield path, daemon
        finally:
            scope = state["scope"]
            assert isinstance(scope, trio.CancelScope)
            trio.from_thread.run_sync(scope.cancel, trio_token=state["token"])  # type: ignore[arg-type]
            thread.join(10)
            shutil.rmtree(d, ignore_errors=True)


def goqctl(path: str, *args: str) -> int:
    return main(["--socket", path, *args])


# --------------------------------------------------------------------------------------
# Exit codes
# --------------------------------------------------------------------------------------


def test_missing_socket_exits_3_and_says_what_to_check(
    sock_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert goqctl(os.path.join(sock_dir, "none.sock"), "status") == 3
    err = capsys.readouterr().err
    assert "cannot reach goqd" in err and "systemctl status goqd" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["link", "store-only"],
        ["link", "--auto", "a", "b"],
        ["errors", "clear"],
        ["errors", "clear", "1", "--store", "s"],
        ["errors", "clear", "not-a-number"],
        ["reflect", "s"],
        ["reflect", "s", "K1", "--all"],
        ["listing", "set", "s", "k"],
        ["listing", "set", "s", "k", "--restock-date", "2025-02-30"],
        ["listing", "set", "s", "k", "--lead-time", "999"],
        ["stock", "set", "A", "-1"],
        ["stock", "set", "A", "many"],
        ["pause", ""],
    ],
)
def test_usage_errors_exit_2_without_contacting_the_daemon(
    server: tuple[str, FakeDaemon], argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    path, daemon = server
    assert goqctl(path, *argv) == 2
    assert daemon.seen == []
    assert "usage:" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "exit codes" in capsys.readouterr().out


def test_error_reply_exits_1_with_message_and_hint(
    server: tuple[str, FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = server
    assert goqctl(path, "stock", "set", "NOPE", "3") == 1
    err = capsys.readouterr().err
    assert "unknown SKU 'NOPE'" in err
    assert "goqctl products" in err  # what to do next


def test_not_allowed_without_a_hint_points_at_the_configured_groups_not_goqd(
    server: tuple[str, FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = server
    assert goqctl(path, "pause", "locked") == 1
    err = capsys.readouterr().err
    # goqctl cannot know the daemon's group: it must not guess "goqd".
    assert "control-groups" in err and "-aG goqd" not in err


def test_error_reply_with_json_prints_the_error_as_json(
    server: tuple[str, FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = server
    assert goqctl(path, "--json", "stock", "set", "NOPE", "3") == 1
    out = json.loads(capsys.readouterr().out)
    assert out["code"] == "not_found" and "NOPE" in out["message"]


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def test_stores_table_shows_states_and_next_step_for_a_stopped_store(
    server: tuple[str, FakeDaemon],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, _ = server
    monkeypatch.setattr(goqctl_module, "_now", lambda: NOW)
    assert goqctl(path, "stores") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["STORE", "MALL", "STATE"]
    a = next(x for x in lines if x.startswith("rakuten-a"))
    b = next(x for x in lines if x.startswith("rakuten-b"))
    assert "running" in a and "1m 5s ago" in a and "40d" in a
    assert "stopped" in b and "licenseKey expired" in b
    assert "→ goqctl key set rakuten-b" in b
    assert "key set" not in a


def test_products_table_aligns_japanese_names_by_display_width(
    server: tuple[str, FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = server
    assert goqctl(path, "products") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    # TOTAL is right-aligned: every row's total ends in the same terminal column, which
    # only holds if the wide characters before it were counted as two columns each.
    total_end = {
        _cell_width(line[: line.index(total) + len(total)])
        for line, total in zip(lines, ["TOTAL", "120", "7", "1234"], strict=True)
    }
    assert len(total_end) == 1, lines
    assert "緑茶 500ml ケース" in lines[1]


def test_json_output_is_the_result_and_works_after_the_command(
    server: tuple[str, FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = server
    assert main(["products", "--json", "--socket", path]) == 0
    out = capsys.readouterr().out
    decoded = msgspec.json.decode(out.encode(), type=m.ProductList)
    assert decoded.products == PRODUCTS


def test_socket_defaults_to_goqd_socket_env(
    server: tuple[str, FakeDaemon],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, daemon = server
    monkeypatch.setenv("GOQD_SOCKET", path)
    assert main(["poll-now", "rakuten-a"]) == 0
    assert daemon.seen == [p.PollNow(store="rakuten-a", request_id=daemon.seen[0].request_id)]  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------
# Requests sent
# --------------------------------------------------------------------------------------


def test_commands_build_the_right_requests_with_fresh_request_ids(
    server: tuple[str, FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    path, daemon = server
    assert goqctl(path, "stock", "adjust", "TEA-500", "-3", "--reason", "破損") == 0
    assert goqctl(path, "stock", "adjust", "TEA-500", "+2") == 0
    assert goqctl(path, "errors", "clear", "3", "4") == 0
    assert goqctl(path, "errors", "--store", "rakuten-a", "--all") == 0
    assert goqctl(path, "link", "rakuten-a", "item-1:v1", "TEA-500") == 0
    assert goqctl(path, "link", "--auto") == 0
    assert goqctl(path, "reflect", "rakuten-a", "--all") == 0
    assert goqctl(path, "reflect", "rakuten-a", "K1", "K2") == 0
    assert (
        goqctl(
            path, "listing", "set", "amz", "SKU-1", "--lead-time", "3", "--allow-overdraft", "no"
        )
        == 0
    )
    assert goqctl(path, "history", "TEA-500", "--limit", "5") == 0
    assert goqctl(path, "delete", "CUP-1") == 0
    strip = [
        msgspec.structs.replace(r, request_id="") if p.is_mutating(r) else r for r in daemon.seen
    ]
    assert strip == [
        m.AdjustStock(sku="TEA-500", delta=-3, reason="破損"),
        m.AdjustStock(sku="TEA-500", delta=2),
        m.ClearErrors(ids=(3, 4)),
        m.ListErrors(store="rakuten-a", include_cleared=True),
        m.Link(store="rakuten-a", listing_key="item-1:v1", sku="TEA-500"),
        p.LinkAuto(store=""),
        p.Reflect(store="rakuten-a", listing_keys=()),
        p.Reflect(store="rakuten-a", listing_keys=("K1", "K2")),
        m.SetListingAttrs(
            store="amz", listing_key="SKU-1", lead_time_days=3, allow_overdraft=False
        ),
        m.GetHistory(sku="TEA-500", limit=5),
        m.DeleteProduct(sku="CUP-1"),
    ]
    ids = [r.request_id for r in daemon.seen if p.is_mutating(r)]  # type: ignore[union-attr]
    assert len(ids) == len(set(ids)) and all(len(i) == 32 for i in ids)
    out = capsys.readouterr().out
    assert "TEA-500: total 9 (-3)" in out


def test_key_set_sends_the_credential_from_a_file_and_never_prints_it(
    server: tuple[str, FakeDaemon], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, daemon = server
    cred = tmp_path / "cred.json"
    cred.write_text(json.dumps({"license_key": CANARY, "service_secret": "SP-" + CANARY}))
    assert goqctl(path, "key", "set", "rakuten-b", "--file", str(cred)) == 0
    req = daemon.seen[0]
    assert isinstance(req, p.KeySet) and req.credentials["license_key"] == CANARY
    out, err = capsys.readouterr()
    assert CANARY not in out + err
    assert CANARY not in repr(daemon.logs)
    assert any(e["event"] == "control_request" for e in daemon.logs)


def test_key_set_reads_stdin_and_rejects_bad_json_without_echoing_it(
    server: tuple[str, FakeDaemon],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, daemon = server
    body = json.dumps({"license_key": CANARY}).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(body)))
    assert goqctl(path, "key", "set", "rakuten-b") == 0
    assert isinstance(daemon.seen[0], p.KeySet)
    bad = b'{"license_key": "' + CANARY.encode() + b'", "n": 5}'
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(bad)))
    assert goqctl(path, "key", "set", "rakuten-b") == 1
    assert len(daemon.seen) == 1  # the bad one never left goqctl
    out, err = capsys.readouterr()
    assert "JSON object of strings" in err
    assert CANARY not in out + err


def test_stock_import_decodes_shift_jis_and_utf8_csv(
    server: tuple[str, FakeDaemon], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, daemon = server
    text = "sku,name,quantity\nTEA-500,緑茶 500ml ケース,12\n"
    sjis = tmp_path / "sjis.csv"
    sjis.write_bytes(text.encode("cp932"))
    utf8 = tmp_path / "utf8.csv"
    utf8.write_bytes(text.encode("utf-8-sig"))
    assert goqctl(path, "stock", "import", str(sjis)) == 0
    assert goqctl(path, "stock", "import", str(utf8)) == 0
    assert goqctl(path, "import", "rakuten-a", "--csv", str(sjis)) == 0
    texts = [getattr(r, "csv_text", None) for r in daemon.seen]
    assert texts == [text, text, text]


def test_stock_import_refuses_a_file_that_is_neither_utf8_nor_shift_jis(
    server: tuple[str, FakeDaemon], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, daemon = server
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"sku,quantity\nA,\x81\x7f\xff\n")
    binary = tmp_path / "x.xlsx"
    binary.write_bytes(b"PK\x03\x04\x00\x00")
    assert goqctl(path, "stock", "import", str(bad)) == 1
    assert "neither UTF-8 nor Shift_JIS" in capsys.readouterr().err
    assert goqctl(path, "stock", "import", str(binary)) == 1
    assert "not a CSV text file" in capsys.readouterr().err
    assert goqctl(path, "stock", "import", str(tmp_path / "missing.csv")) == 1
    assert "cannot read" in capsys.readouterr().err
    assert daemon.seen == []


def test_shell_completion_lists_every_command_and_is_valid_bash(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import subprocess

    from goqd.cli.goqctl import main

    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    for command in ("status", "stores", "errors", "key", "import", "diff", "reflect", "stock"):
        assert f"{command}) words=" in script
    assert 'stock) words="adjust import list set' in script
    path = tmp_path / "goqctl.bash"
    path.write_text(script)
    # Ask bash itself: the script parses, and completing "goqctl st" offers the commands.
    probe = (
        f'source {path}; COMP_WORDS=(goqctl st); COMP_CWORD=1; _goqctl; echo "${{COMPREPLY[@]}}"'
    )
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["status", "stock", "stores"]
    assert main(["completion", "fish"]) == 2


# --------------------------------------------------------------------------------------
# Hostile input on either side: no tracebacks
# --------------------------------------------------------------------------------------


def goqctl_process(
    *args: str | bytes, stdout: int = subprocess.PIPE
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "goqd.cli.goqctl", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=60,
        cwd=ROOT,
    )


def test_a_non_utf8_argument_is_a_usage_error_naming_it_not_a_traceback(
    server: tuple[str, FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    path, daemon = server
    # As the shell passes it: the bytes \xff\xfe, surrogate-escaped by Python.
    out = goqctl_process("--socket", path, "history", b"A-\xff\xfe")
    assert out.returncode == 2, out.stderr
    err = out.stderr.decode("utf-8", "replace")
    assert "sku 'A-\\xff\\xfe' is not valid UTF-8" in err and "Traceback" not in err
    # The same in process, in each kind of field (a name in a list, a reason).
    assert goqctl(path, "reflect", "s", "K1", "K\udcff") == 2
    assert "listing_keys 'K\\xff'" in capsys.readouterr().err
    assert goqctl(path, "stock", "set", "A", "1", "--reason", "\udc81") == 2
    assert daemon.seen == []


def test_a_file_name_that_is_not_utf8_is_still_opened(
    server: tuple[str, FakeDaemon], tmp_path: Path
) -> None:
    path, daemon = server
    name = os.path.join(os.fsencode(tmp_path), b"st\xff.csv")
    with open(name, "wb") as f:
        f.write(b"sku,quantity\nA,1\n")
    assert goqctl(path, "stock", "import", os.fsdecode(name)) == 0
    (sent,) = daemon.seen
    assert isinstance(sent, p.StockImport) and sent.csv_text == "sku,quantity\nA,1\n"


def test_a_closed_stdout_ends_goqctl_quietly(server: tuple[str, FakeDaemon]) -> None:
    path, _ = server
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `goqctl products | head` once head has exited
    try:
        out = goqctl_process("--socket", path, "products", stdout=write_end)
    finally:
        os.close(write_end)
    assert out.stderr == b""
    assert out.returncode == 1


def test_ctrl_c_during_diff_csv_exits_130_and_leaves_the_file_as_it_was(
    server: tuple[str, FakeDaemon], tmp_path: Path
) -> None:
    path, daemon = server
    target = tmp_path / "diff.csv"
    target.write_bytes(b"the last diff\r\n")
    argv = ["--socket", path, "diff", "slow", "--csv", str(target)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "goqd.cli.goqctl", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while not any(isinstance(r, p.Diff) for r in daemon.seen):  # goqctl waits now
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        partial = [f for f in os.listdir(tmp_path) if f.endswith(".part")]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    message = err.decode()
    assert proc.returncode == 130, message
    assert partial  # the CSV was being written to a temporary file ...
    assert os.listdir(tmp_path) == ["diff.csv"]  # ... which is gone
    assert target.read_bytes() == b"the last diff\r\n"
    assert "Traceback" not in message
    assert f"interrupted: nothing was written to {target}" in message
    assert "run `goqctl diff` again" in message
    assert out == b""


@contextlib.contextmanager
def hostile_daemon(payload: bytes) -> Iterator[str]:
    """A socket that reads one request per connection and answers with ``payload``."""
    d = tempfile.mkdtemp(dir="/tmp", prefix="goqh")
    path = os.path.join(d, "c.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                try:
                    size = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))[0]
                    conn.recv(size, socket.MSG_WAITALL)
                    conn.sendall(payload)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join(10)
        listener.close()
        shutil.rmtree(d, ignore_errors=True)


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


_ODD_STORE = {
    "type": "store_info",
    "name": "r\x1b[2J",
    "mall": "rakuten",
    "state": "running",
    "error_level": 2**70,
    "last_poll_ok_at": 1e300,
    "last_push_ok_at": -1e300,
    "outbox": -(2**63),
    "parked": 0,
    "cursor": None,
    "credential_expires_at": 1e300,
}
_ODD_HISTORY = {
    "type": "history",
    "sku": "A",
    "total": 1,
    "movements": [
        {
            "type": "movement",
            "id": 1,
            "sku": "A",
            "delta": -(2**63),
            "total_after": 2**64,
            "cause": "set",
            "at": 1e300,  # no calendar has this year
        }
    ],
}


@pytest.mark.parametrize(
    ("payload", "code", "fragment"),
    [
        pytest.param(_frame(b"\xff\xfe not json"), 1, "cannot read", id="garbage"),
        pytest.param(
            _frame(b'{"v":1,"id":"","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
            1,
            "nested too deeply",
            id="deep-nesting",
        ),
        pytest.param(struct.pack(">I", 2**32 - 1), 1, "larger than goqctl accepts", id="huge"),
        pytest.param(
            struct.pack(">I", 100) + b'{"v":1', 3, "closed before the reply", id="truncated"
        ),
        pytest.param(b"", 3, "closed before the reply", id="closed"),
        pytest.param(
            _frame(json.dumps({"v": 1, "id": "x" * 100_000, "reply": {"type": "ok"}}).encode()),
            1,
            "cannot read",
            id="bad-reply-long-id",
        ),
        pytest.param(
            _frame(
                json.dumps(
                    {
                        "v": 1,
                        "id": "y" * 100_000,
                        "reply": {"type": "err", "code": "x", "message": ""},
                    }
                ).encode()
            ),
            1,
            "the daemon answered request 'yyy",
            id="foreign-id",
        ),
        pytest.param(
            _frame(
                json.dumps(
                    {
                        "v": 1,
                        "id": "",
                        "reply": {
                            "type": "ok",
                            "result": {"type": "store_list", "stores": [_ODD_STORE]},
                        },
                    }
                ).encode()
            ),
            0,
            "",
            id="odd-stores",
        ),
        pytest.param(
            _frame(
                json.dumps(
                    {
                        "v": 1,
                        "id": "",
                        "reply": {"type": "ok", "result": _ODD_HISTORY},
                    }
                ).encode()
            ),
            0,
            "",
            id="odd-history",
        ),
    ],
)
def test_a_hostile_reply_is_reported_not_a_traceback(
    payload: bytes, code: int, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with hostile_daemon(payload) as path:
        assert goqctl(path, "stores", "--timeout", "20") == code
    out, err = capsys.readouterr()
    assert fragment in err
    assert len(err) < 2000  # a hostile id or message is clipped, not echoed in full
    if code == 0:
        # Times out of any calendar and a terminal escape in a name: shown, defused.
        assert ("rakuten" in out or "A: total 1" in out) and "\x1b" not in out
