"""Start-up refusals as an operator meets them.

``goqd run`` refuses, before READY and before creating anything, a ledger it could read
but not write, a state directory it cannot write in, a credential file it may not read,
an ``http-listen`` that is no address and a control group the host does not have; each
refusal is one line naming the file and the key, exit code 1, no traceback. ``goqd
check-config`` refuses the same things (and a damaged ledger) without changing anything.

File modes do not bind root, and these tests often run as root: a refusal that depends on
a mode runs the real CLI in a child without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
(``setpriv``), where root is held to the modes like any user.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from goqd.cli.goqd import main as goqd_main
from goqd.errors import LedgerError
from goqd.ledger.schema import _probe_write, open_db
from tests.helpers.daemon import notify_listener, received
from tests.helpers.paths import ROOT

SECRET = "SL1_canary_never_printed"


def _unprivileged() -> list[str]:
    """A command prefix under which file modes bind the child, root or not."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    prefix = [setpriv or "setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    # Dropping from the bounding set needs CAP_SETPCAP, which some containers lack.
    if setpriv is None or subprocess.run([*prefix, "true"], capture_output=True).returncode:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE: modes do not bind")
    return prefix


def _setup(tmp: Path, daemon: str = "") -> Path:
    """A valid config with one Rakuten store (nothing listens at its URL). ``daemon``:
    ``key = value`` lines that replace or add to the [daemon] table."""
    cred = tmp / "ra.json"
    cred.write_text(json.dumps({"service_secret": "SP1_abcdefgh", "license_key": SECRET}))
    cred.chmod(0o600)
    table = {
        "state-dir": f'"{tmp}/state"',
        "control-socket": f'"{tmp}/ctl.sock"',
        "http-listen": '"127.0.0.1:0"',
    }
    for line in daemon.splitlines():
        key, _, value = line.partition(" = ")
        table[key] = value
    body = "\n".join(f"{k} = {v}" for k, v in table.items())
    path = tmp / "goqd.toml"
    path.write_text(
        f"[daemon]\n{body}\n\n"
        '[[stores]]\nname = "ra"\nmall = "rakuten"\nbase-url = "http://127.0.0.1:9"\n'
        'credentials = "ra.json"\npoll-interval = "60s"\n',
        encoding="utf-8",
    )
    return path


def _goqd(
    *args: str, unprivileged: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    prefix = _unprivileged() if unprivileged else []
    return subprocess.run(
        [*prefix, sys.executable, "-m", "goqd.cli.goqd", *args],
        capture_output=True,
        text=True,
        timeout=30,  # a daemon that was not refused runs until killed: that is a failure
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def _refused_in_one_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert SECRET not in result.stderr + result.stdout
    return lines[0]


def _make_ledger(path: Path) -> bytes:
    """A current, cleanly closed ledger (no -wal, no -shm beside it); its bytes."""
    path.parent.mkdir(exist_ok=True)
    open_db(str(path)).close()
    assert not _journal_files(path)
    return path.read_bytes()


def _journal_files(ledger: Path) -> list[str]:
    return [s for s in ("-wal", "-shm", "-journal") if os.path.exists(f"{ledger}{s}")]


def test_a_read_only_ledger_file_is_refused_before_ready_and_left_as_it_was(
    tmp_path: Path,
) -> None:
    config = _setup(tmp_path)
    ledger = tmp_path / "state" / "goqd.db"
    before = _make_ledger(ledger)
    ledger.chmod(0o444)
    with notify_listener() as (sock, address):
        env = {"NOTIFY_SOCKET": address}
        run = _goqd("run", "--config", str(config), unprivileged=True, env=env)
        _refused_in_one_line(run, str(ledger), "cannot open the ledger for writing", "mode 0600")
        # Never READY: systemd sees a failed start, not a sick daemon.
        assert received(sock) == []
    assert not (tmp_path / "ctl.sock").exists()
    assert _journal_files(ledger) == []  # no -wal/-shm left beside it
    assert ledger.read_bytes() == before

    check = _goqd("check-config", str(config), unprivileged=True)
    _refused_in_one_line(check, str(config), "$.daemon.state-dir", str(ledger), "for writing")
    assert _journal_files(ledger) == [] and ledger.read_bytes() == before


@pytest.mark.parametrize("ledger_exists", [True, False])
def test_a_read_only_state_directory_is_reported_as_cannot_write_in_it(
    tmp_path: Path, ledger_exists: bool
) -> None:
    config = _setup(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    if ledger_exists:
        _make_ledger(state / "goqd.db")
    state.chmod(0o555)
    try:
        for command in ("run", "check-config"):
            args = ["run", "--config", str(config)] if command == "run" else [command, str(config)]
            line = _refused_in_one_line(
                _goqd(*args, unprivileged=True),
                str(config),
                "$.daemon.state-dir",
                f"cannot write in {state}: Permission denied",
            )
            assert "unreadable" not in line
        assert sorted(os.listdir(state)) == (["goqd.db"] if ledger_exists else [])
    finally:
        state.chmod(0o755)


def test_an_unreadable_credential_file_is_refused_as_permission_denied(tmp_path: Path) -> None:
    config = _setup(tmp_path)
    cred = tmp_path / "ra.json"
    cred.chmod(0o000)  # passes the "readable by others" rule; the daemon cannot read it
    for args in (("run", "--config", str(config)), ("check-config", str(config))):
        line = _refused_in_one_line(
            _goqd(*args, unprivileged=True),
            str(cred),
            "permission denied reading the credential file of store 'ra'",
        )
        assert "JSON" not in line
    assert not (tmp_path / "state").exists()


# Each is refused by `run` and by `check-config` alike, naming the key.
_BAD_DAEMON = [
    ('http-listen = "127.0.0.1:99999"', "$.daemon.http-listen", "0 to 65535"),
    ('http-listen = "::1:9100"', "$.daemon.http-listen", "in brackets, e.g. [::1]:9464"),
    ('http-listen = "[::1]:99999"', "$.daemon.http-listen", "0 to 65535"),
    ('http-listen = "[no-such-address]:80"', "$.daemon.http-listen", "not an IPv6 address"),
    ('http-listen = "127.0.0.1"', "$.daemon.http-listen", "not host:port"),
    ('http-listen = "127.0.0.1:-1"', "$.daemon.http-listen", "0 to 65535"),
    ('control-groups = ["goqd-no-such-group"]', "$.daemon.control-groups[0]", "no group"),
    ('control-groups = ["root", "goqd-no-such-group"]', "$.daemon.control-groups[1]", "no group"),
    (f'control-socket = "/tmp/{"s" * 120}.sock"', "$.daemon.control-socket", "Unix socket"),
    ('stop-timeout = "1' + "0" * 400 + 's"', "$.daemon.stop-timeout", "too long"),
    ('control-socket = "/dev/null"', "$.daemon.control-socket", "/dev/null exists and is not"),
    ('control-socket = "/proc/goqd/c.sock"', "$.daemon.control-socket", "cannot create dir"),
]


@pytest.mark.parametrize(("line", "key", "reason"), _BAD_DAEMON)
def test_check_config_refuses_bad_daemon_settings_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, key: str, reason: str
) -> None:
    config = _setup(tmp_path, line)
    assert goqd_main(["check-config", str(config)]) == 1
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert len(lines) == 1 and str(config) in lines[0], out.err
    assert key in lines[0] and reason in lines[0], lines[0]
    assert out.out == ""
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("line", "key", "reason"), _BAD_DAEMON[:2] + _BAD_DAEMON[6:7] + _BAD_DAEMON[-2:]
)
def test_run_refuses_what_check_config_refuses_in_one_line(
    tmp_path: Path, line: str, key: str, reason: str
) -> None:
    config = _setup(tmp_path, line)
    _refused_in_one_line(_goqd("run", "--config", str(config)), str(config), key, reason)
    assert not (tmp_path / "state").exists() and not (tmp_path / "ctl.sock").exists()


def test_loopback_means_any_loopback_address_and_existing_groups_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for listen, loopback in [
        ("127.0.0.2:0", True),
        ("[::1]:0", True),
        ("localhost:0", True),
        ("[::ffff:10.0.0.1]:9100", False),
        ("0.0.0.0:9100", False),
        ("example.com:9100", False),
    ]:
        config = _setup(tmp_path, f'control-groups = ["root"]\nhttp-listen = "{listen}"')
        code = goqd_main(["check-config", str(config)])
        out = capsys.readouterr()
        if loopback:
            assert code == 0 and "ok (1 stores)" in out.out, (listen, out.err)
        else:
            assert code == 1 and "$.daemon.http-listen" in out.err, (listen, out.err)
            assert "not loopback" in out.err, (listen, out.err)


@pytest.mark.parametrize("damage", ["not-sqlite", "newer-schema", "foreign-sqlite"])
def test_check_config_refuses_a_ledger_run_would_refuse_and_leaves_it_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    config = _setup(tmp_path)
    ledger = tmp_path / "state" / "goqd.db"
    if damage == "not-sqlite":
        ledger.parent.mkdir()
        ledger.write_bytes(b"not a ledger at all" * 100)
        reason = "not an SQLite database"
    else:
        _make_ledger(ledger)
        conn = sqlite3.connect(ledger)
        if damage == "newer-schema":
            conn.execute("PRAGMA user_version=999")
            reason = "newer goqd"
        else:
            conn.execute("PRAGMA application_id=1")
            reason = "not a goqd ledger"
        conn.close()
    before = ledger.read_bytes()
    assert goqd_main(["check-config", str(config)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert str(config) in lines[0] and "$.daemon.state-dir" in lines[0] and reason in lines[0]
    assert ledger.read_bytes() == before and _journal_files(ledger) == []


def test_check_config_reads_a_good_ledger_without_writing_or_creating_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _setup(tmp_path)
    # No ledger yet: it is not created, nor is the state directory.
    assert goqd_main(["check-config", str(config)]) == 0
    assert "will be created" in capsys.readouterr().out
    assert not (tmp_path / "state").exists()
    # A cleanly closed ledger: checked, and no -wal/-shm appear beside it.
    ledger = tmp_path / "state" / "goqd.db"
    before = _make_ledger(ledger)
    assert goqd_main(["check-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"ledger {ledger} checked" in out and SECRET not in out
    assert ledger.read_bytes() == before and _journal_files(ledger) == []
    # A ledger in use (a connection holds changes in its WAL): read through the WAL,
    # and the writer carries on.
    live = open_db(str(ledger))
    live.execute("CREATE TABLE scratch (x)")
    assert _journal_files(ledger) == ["-wal", "-shm"]
    assert goqd_main(["check-config", str(config)]) == 0, capsys.readouterr().err
    live.execute("INSERT INTO scratch VALUES (1)")
    live.close()


def test_the_sqlite_write_probe_refuses_a_connection_that_cannot_write(tmp_path: Path) -> None:
    # The probe behind the file checks: a read-only SQLite connection (what SQLite opens,
    # silently, for a file it may not write) is refused at start, not at the first booking.
    path = tmp_path / "goqd.db"
    open_db(str(path)).close()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        with pytest.raises(
            LedgerError, match=r"goqd\.db: SQLite cannot write the ledger.*readonly"
        ):
            _probe_write(conn, str(path))
    finally:
        conn.close()
    _probe_write(sqlite3.connect(path, isolation_level=None), str(path))  # a writable one passes
