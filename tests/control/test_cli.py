"""The `goqd` command as an operator meets it: bad config and a refused ledger give one
clear line and exit 1, never a traceback; check-config accepts a good setup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.paths import ROOT


def goqd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "goqd.cli.goqd", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def config(tmp: Path, extra: str = "") -> Path:
    path = tmp / "goqd.toml"
    path.write_text(
        f'[daemon]\nstate-dir = "{tmp}"\ncontrol-socket = "{tmp}/ctl.sock"\n'
        f'http-listen = "127.0.0.1:0"\n{extra}'
    )
    return path


def test_a_corrupt_ledger_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "goqd.db").write_bytes(b"garbage" * 100)
    result = goqd("run", "--config", str(config(tmp_path)), cwd=tmp_path)
    assert result.returncode == 1
    assert "not an SQLite database" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "goqd.db").read_bytes() == b"garbage" * 100  # left alone


def test_check_config_names_file_and_key(tmp_path: Path) -> None:
    bad = config(
        tmp_path,
        '\n[[stores]]\nname = "r"\nmall = "rakuten"\n'
        'base-url = "http://127.0.0.1:9"\ncredentials = "r.json"\npoll-interval = 5\n',
    )
    result = goqd("check-config", str(bad), cwd=tmp_path)
    assert result.returncode == 1
    assert "goqd.toml" in result.stderr and "$.stores[0].poll-interval" in result.stderr


def test_check_config_accepts_a_good_setup_and_checks_credentials(tmp_path: Path) -> None:
    good = config(
        tmp_path,
        '\n[[stores]]\nname = "r"\nmall = "rakuten"\n'
        'base-url = "http://127.0.0.1:9"\ncredentials = "r.json"\n',
    )
    cred = tmp_path / "r.json"
    cred.write_text(json.dumps({"service_secret": "s", "license_key": "k"}))
    cred.chmod(0o644)
    refused = goqd("check-config", str(good), cwd=tmp_path)
    assert refused.returncode == 1 and "chmod 600" in refused.stderr
    cred.chmod(0o600)
    ok = goqd("check-config", str(good), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "ok (1 stores)" in ok.stdout
