"""Bad input of every kind, end to end (docs/reliability.md K1–K3, S1, X1–X3, M3, and the
"before import" booking rule).

The config and ledger refusals run the real CLI (``goqd run`` as a subprocess, or its
``main()`` in process where only the exit code and message matter); the rest run the
real daemon in process under the deterministic rig (``tests.helpers.rig.run_dst``).

Already covered elsewhere at a lower level, not repeated here: config decoding errors
(tests/runtime/test_config.py), the ledger's refusals of corrupt / too-new files
(tests/ledger/test_ledger.py), and the control server's frame handling
(tests/control/test_control.py).
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from goqd import messages as m
from goqd.cli.goqd import main as goqd_main
from goqd.control import protocol as p
from goqd.control.client import call
from goqd.errors import LEVEL_TEMPORARY
from goqd.ledger import SCHEMA_VERSION, queries
from goqd.sim.rakuten import SimRakuten
from tests.helpers import checker, rig
from tests.helpers.checker import check
from tests.helpers.paths import ROOT

clock = rig.mock_wall_clock
TWO = (("ra", "rakuten"), ("rb", "rakuten"))


def _config(tmp: Path, **store_overrides: str) -> Path:
    """A valid config with one Rakuten store (nothing listens at its URL)."""
    cred = tmp / "ra.json"
    rig.write_credentials(
        str(cred), {"service_secret": "SP1_abcdefgh", "license_key": "SL1_ijklmnop"}
    )
    store = {
        "name": '"ra"',
        "mall": '"rakuten"',
        "base-url": '"http://127.0.0.1:9"',
        "credentials": '"ra.json"',
        "poll-interval": '"60s"',
    }
    store.update(store_overrides)
    body = "\n".join(f"{k} = {v}" for k, v in store.items())
    path = tmp / "goqd.toml"
    path.write_text(
        f'[daemon]\nstate-dir = "{tmp}/state"\ncontrol-socket = "{tmp}/ctl.sock"\n'
        f'http-listen = "127.0.0.1:0"\n\n[[stores]]\n{body}\n',
        encoding="utf-8",
    )
    return path


def _run_cli(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "goqd.cli.goqd", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


# ------------------------------------------------------------------------ K1 K2 K3


@pytest.fixture
def restore_logging() -> Any:
    """``main()`` configures logging onto pytest's captured stream; put it back after."""
    import logging

    import structlog

    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(
    ("override", "key", "reason"),
    [
        ({"pol-interval": '"60s"'}, "$.stores[0]", "pol-interval"),
        ({"poll-interval": '"soon"'}, "$.stores[0].poll-interval", "duration"),
        ({"mall": '"rakuteen"'}, "$.stores[0].mall", "unknown mall"),
        ({"poll-interval": '"5s"'}, "$.stores[0].poll-interval", "rate limit"),
        ({"base-url": '"ftp://x"'}, "$.stores[0].base-url", "http"),
    ],
)
@pytest.mark.usefixtures("restore_logging")
def test_k1_invalid_config_refuses_to_start_naming_file_key_and_reason(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    override: dict[str, str],
    key: str,
    reason: str,
) -> None:
    path = _config(tmp_path, **override)
    assert goqd_main(["run", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and key in err and reason in err, err
    assert not (tmp_path / "state").exists()  # nothing started, nothing created


def test_k1_the_real_process_exits_non_zero_on_a_bad_config(tmp_path: Path) -> None:
    out = _run_cli(_config(tmp_path, mall='"nosuchmall"'))
    assert out.returncode == 1
    assert "$.stores[0].mall" in out.stderr and "goqd.toml" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("problem", ["missing", "group-readable", "world-readable", "not-json"])
def test_k2_credential_file_problems_refuse_the_start_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str
) -> None:
    path = _config(tmp_path)
    cred = tmp_path / "ra.json"
    if problem == "missing":
        cred.unlink()
    elif problem == "group-readable":
        cred.chmod(0o640)
    elif problem == "world-readable":
        cred.chmod(0o604)
    else:
        cred.write_text('{"license_key": "SL1_ijklmnop", oops', encoding="utf-8")
    assert goqd_main(["run", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(cred) in err, err
    assert "SL1_ijklmnop" not in err  # the refusal never quotes the file's content
    assert not (tmp_path / "ctl.sock").exists()


def _ledger_file(tmp: Path) -> Path:
    state = tmp / "state"
    state.mkdir(exist_ok=True)
    return state / "goqd.db"


@pytest.mark.parametrize(
    "damage",
    ["not-sqlite", "newer-schema", "foreign-sqlite", "torn-page"],
)
def test_k3_a_bad_ledger_refuses_the_start_and_is_left_untouched(
    tmp_path: Path, damage: str
) -> None:
    config = _config(tmp_path)
    db = _ledger_file(tmp_path)
    if damage == "not-sqlite":
        db.write_bytes(b"PK\x03\x04 this is a zip, not a ledger" * 100)
    elif damage == "torn-page":
        _torn(db)
    else:
        from goqd.ledger import open_db

        conn = open_db(str(db))
        conn.execute("INSERT INTO meta VALUES ('marker', 42)")
        if damage == "newer-schema":
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        if damage == "foreign-sqlite":
            conn.execute("PRAGMA application_id = 1234")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    out = _run_cli(config)
    assert out.returncode == 1, out.stderr
    assert str(db) in out.stderr and "Traceback" not in out.stderr
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before  # never replaced
    assert not (tmp_path / "ctl.sock").exists()


def test_k3_a_torn_ledger_page_refuses_the_start_and_is_left_untouched(tmp_path: Path) -> None:
    config = _config(tmp_path)
    db = _ledger_file(tmp_path)
    _torn(db)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    out = _run_cli(config)
    assert out.returncode == 1
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert not (tmp_path / "ctl.sock").exists()


def _torn(db: Path) -> None:
    """A ledger whose movements b-tree root page is garbage (a torn write)."""
    from goqd.ledger import open_db

    conn = open_db(str(db))
    conn.execute("INSERT INTO meta VALUES ('marker', 42)")
    page = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'movements'").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    raw = bytearray(db.read_bytes())
    raw[(page - 1) * size : page * size] = random.Random(5).randbytes(size)
    db.write_bytes(bytes(raw))


# ------------------------------------------------------------------------ S1


def test_s1_disk_full_during_commit_acknowledges_nothing_degrades_and_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ledger's connection gets ``PRAGMA max_page_count`` at its current size: SQLite
    then fails every commit that needs a new page with SQLITE_FULL ("database or disk is
    full"), exactly as on a full filesystem, without root or a loop mount."""
    import goqd.ledger.actor as actor

    conns: list[sqlite3.Connection] = []
    real_open = actor.open_db

    def capture(*args: Any, **kw: Any) -> sqlite3.Connection:
        conn = real_open(*args, **kw)
        conns.append(conn)
        return conn

    monkeypatch.setattr(actor, "open_db", capture)

    async def body(run: rig.Running) -> None:
        conn = conns[0]
        handle = run.daemon.handles["ra"]
        market = run.fleet.market(random.Random(31))
        cursor = queries.read(run.ledger_path, queries.cursors).get("ra")
        booked = queries.read(run.ledger_path, queries.order_lines)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        for _ in range(300):  # enough lines that the next commit needs new pages
            market.place("ra", random.choice(sorted(run.fleet.initial)), 1, clock())
        run.poll_all()
        await rig.wait_for(lambda: handle.state == "degraded", timeout=120, what="degraded")
        assert "ledger" in handle.message or "disk" in handle.message, handle.message
        await trio.sleep(60)
        # Nothing acknowledged: no line booked, the cursor where it was.
        assert queries.read(run.ledger_path, queries.order_lines) == booked
        assert queries.read(run.ledger_path, queries.cursors).get("ra") == cursor
        assert (await call(run.socket, p.Status())).stores  # the daemon still answers
        conn.execute("PRAGMA max_page_count = 1073741823")  # space freed
        await rig.wait_for(
            lambda: rig.converged(run.fleet, run.ledger_path),
            timeout=900,
            every=1.0,
            what="catch-up after the disk has room again",
        )
        report = check(
            run.fleet.sims, run.ledger_path, initial=run.fleet.initial, keys=run.fleet.keys
        )
        assert report.ok and report.booked >= 300, report.summary()

    rig.run_dst(body, seed=31, stores=TWO, catalogue={k: 1000 for k in rig.CATALOGUE})


# ------------------------------------------------------------------------ X1 X2 X3


def test_x1_the_same_mutating_request_twice_is_applied_once_with_the_same_reply() -> None:
    async def body(run: rig.Running) -> None:
        req = m.AdjustStock(sku="TEA-SEN", delta=7, reason="delivery")
        first = await call(run.socket, req, request_id="req-x1-0001")
        again = await call(run.socket, req, request_id="req-x1-0001")
        assert first == again
        history = await run.daemon.ledger.ask(m.GetHistory(sku="TEA-SEN"), m.History)
        assert [mv.delta for mv in history.movements if mv.cause == "adjust"] == [7]
        other = await call(run.socket, req, request_id="req-x1-0002")
        assert other != first  # a new id is a new request

    rig.run_dst(body, seed=32, stores=TWO)


def test_x2_operator_stock_changes_racing_bookings_lose_no_update() -> None:
    async def body(run: rig.Running) -> None:
        market = run.fleet.market(random.Random(33))
        async with trio.open_nursery() as nursery:

            async def operator(i: int) -> None:
                await call(run.socket, m.AdjustStock(sku="TS-RED-S", delta=1, reason=f"op{i}"))

            for i in range(30):
                nursery.start_soon(operator, i)
                market.place(random.choice(("ra", "rb")), "TS-RED-S", 1, clock())
                if i % 5 == 0:
                    run.poll_all()
                    nursery.start_soon(
                        call, run.socket, m.SetStock(sku="MUG-WHT", quantity=50 + i, reason="count")
                    )
        run.poll_all()
        await rig.wait_for(
            lambda: rig.converged(run.fleet, run.ledger_path), timeout=900, every=1.0
        )
        report = check(
            run.fleet.sims, run.ledger_path, initial=run.fleet.initial, keys=run.fleet.keys
        )
        assert report.ok, report.summary()
        history = await run.daemon.ledger.ask(m.GetHistory(sku="TS-RED-S", limit=1000), m.History)
        assert sum(1 for mv in history.movements if mv.cause == "adjust") == 30
        mug = await run.daemon.ledger.ask(m.GetHistory(sku="MUG-WHT", limit=1000), m.History)
        last_set = next(mv for mv in mug.movements if mv.cause == "set")
        after = sum(mv.delta for mv in mug.movements if mv.id > last_set.id)
        # Whichever count the ledger applied last holds, plus only what came after it.
        assert last_set.total_after in {50 + i for i in range(0, 30, 5)}
        assert mug.total == last_set.total_after + after
        assert sum(1 for mv in mug.movements if mv.cause == "set") == 6

    rig.run_dst(body, seed=33, stores=TWO)


def _raw_exchange(path: str, payload: bytes, *, read: bool = True) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(payload)
        if not read:
            return b""
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                data = b"".join(chunks)
                if len(data) >= 4 and len(data) >= 4 + struct.unpack(">I", data[:4])[0]:
                    break
        except TimeoutError:
            pass
        return b"".join(chunks)


async def test_x3_malformed_oversized_and_hostile_control_requests_leave_the_daemon_unaffected(
    tmp_path: Path,
) -> None:
    """Real time (raw sockets from worker threads): garbage, a 2 GiB announcement, an
    unknown request type, a wrong field type, a foreign protocol version, a half frame
    and 40 idle connections; afterwards the daemon still answers and still syncs."""
    fleet = rig.build_fleet(TWO, clock=__import__("time").time, seed=34)
    router, urls = rig.router_for(fleet)
    with trio.fail_after(60):
        async with rig.open_daemon(
            fleet,
            str(tmp_path),
            urls,
            transport=router,
            clock=__import__("time").time,
            push_retry="1s",
        ) as run:
            sock = run.socket

            def frame(body: bytes) -> bytes:
                return struct.pack(">I", len(body)) + body

            cases = {
                "garbage": frame(b"\xff\xfe not json at all"),
                "unknown": frame(b'{"v":1,"id":"a","request":{"type":"format_disk"}}'),
                "wrong_type": frame(
                    b'{"v":1,"id":"b","request":{"type":"stock_set","sku":"A","quantity":"x"}}'
                ),
                "version": frame(b'{"v":99,"id":"c","request":{"type":"status"}}'),
                "huge": struct.pack(">I", 2**31) + b"{",
            }
            codes = {}
            for name, payload in cases.items():
                raw = await trio.to_thread.run_sync(_raw_exchange, sock, payload)
                reply = p.decode_reply(raw[4:])
                assert isinstance(reply.reply, p.Err), name
                codes[name] = reply.reply.code
            assert codes == {
                "garbage": "bad_request",
                "unknown": "bad_request",
                "wrong_type": "bad_request",
                "version": "unsupported_version",
                "huge": "too_large",
            }
            # A half frame, then gone; and idle connections parked on the socket.
            await trio.to_thread.run_sync(
                lambda: _raw_exchange(sock, struct.pack(">I", 100) + b"{", read=False)
            )
            idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(40)]
            try:
                for s in idle:
                    s.connect(sock)
                status = await call(sock, p.Status(), timeout=10)
                assert isinstance(status, p.DaemonStatus)
                market = fleet.market(random.Random(34))
                market.place("ra", "TS-RED-S", 1, __import__("time").time())
                run.poll_all()
                await rig.wait_for(lambda: rig.converged(fleet, run.ledger_path), timeout=20)
            finally:
                for s in idle:
                    s.close()
            report = check(fleet.sims, run.ledger_path, initial=fleet.initial)
            assert report.ok, report.summary()


# ------------------------------------------------------------------------ M3


def test_m3_an_absurd_quantity_is_rejected_naming_the_order_and_the_rest_is_booked() -> None:
    async def body(run: rig.Running) -> None:
        ra = run.fleet.sims["ra"]
        key = run.fleet.keys["ra"]["TEA-SEN"]
        ra.listings[key].allow_overdraft = True  # let the mall take the absurd order
        absurd = ra.place_order([(key, 200_000)])
        fine = ra.place_order([(run.fleet.keys["ra"]["MUG-WHT"], 1)])
        assert absurd is not None and fine is not None
        ra.listings[key].quantity = 20  # the mall's own counter is not the point here
        run.poll_all()
        await rig.wait_for(
            lambda: len(queries.read(run.ledger_path, queries.order_lines)) == 1,
            timeout=120,
            what="the plausible line booked",
        )
        errors = queries.read(run.ledger_path, queries.errors, "ra")
        assert any(
            e.code == "bad_order_line"
            and absurd.order_id in e.message
            and e.level == LEVEL_TEMPORARY
            for e in errors
        ), errors
        totals = await run.totals()
        assert totals["TEA-SEN"] == 20 and totals["MUG-WHT"] == 2
        with queries.open_read_only(run.ledger_path) as conn:
            assert not any(x.order_id == absurd.order_id for x in queries.order_lines(conn))
            assert not any(mv.order_id == absurd.order_id for mv in queries.movements(conn))

    rig.run_dst(body, seed=35, stores=TWO)


# ------------------------------------------------------------------------ before_import


def test_a_sale_right_after_the_import_is_taken_off_the_total() -> None:
    async def body(run: rig.Running) -> None:
        ra = run.fleet.sims["ra"]
        await trio.sleep(0.4)  # the import happened at t≈0.0x; RMS shows whole seconds
        await run.daemon.ledger.call(m.UpsertProduct(sku="NEW-9", total=10, store="ra"))
        ra.add_listing("new9/NEW-9", link_code="NEW-9", quantity=10)
        await run.daemon.ledger.call(
            m.UpsertListing(store="ra", listing_key="new9/NEW-9", sku="NEW-9")
        )
        await trio.sleep(0.3)  # 0.3 s after the import, same second on RMS's clock
        assert ra.place_order([("new9/NEW-9", 2)]) is not None
        run.poll_all()
        await trio.sleep(30)
        assert (await run.totals())["NEW-9"] == 8
        report = check(run.fleet.sims, run.ledger_path, invariants=("I1", "I2"))
        assert report.ok, report.summary()

    rig.run_dst(body, seed=36, stores=TWO)


def test_the_checker_explains_a_before_import_booking(tmp_path: Path) -> None:
    """A base-store sale that really is older than the import is fine (I1, I2 hold)."""
    from goqd.ledger import Ledger, open_db

    sim = SimRakuten(shop_id="600002", clock=lambda: 1_790_000_000.0)
    sim.add_listing("aa/A", quantity=5)
    order = sim.place_order([("aa/A", 2)])
    assert order is not None
    ledger = Ledger(open_db(str(tmp_path / "l.db")), now=lambda: 1_790_000_100.0)
    ledger.apply_batch(
        [
            m.UpsertProduct(sku="A", total=3, store="ra"),  # imported after the sale: 5 - 2
            m.UpsertListing(store="ra", listing_key="aa/A", sku="A"),
        ]
    )
    line = order.lines[0]
    ledger.apply_batch(
        [
            m.OrderLinesSeen(
                store="ra",
                lines=(
                    m.OrderLine(
                        order_id=order.order_id,
                        line_id=line.line_id,
                        listing_key="aa/A",
                        quantity=2,
                        updated_at=1_790_000_000.0,
                    ),
                ),
            )
        ]
    )
    report = check({"ra": sim}, str(tmp_path / "l.db"), invariants=("I1", "I2"))
    assert report.ok, report.summary()
    checker_mod = checker
    assert checker_mod.ORDER_CAUSES  # the module's vocabulary is what the ledger writes
