"""Config and credential files: good ones load; bad ones name the file, key and reason."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from goqd.config import load_config, load_credentials, seconds, write_credentials
from goqd.errors import ConfigError, CredentialError
from tests.helpers.paths import ROOT

GOOD = """
[daemon]
state-dir = "{state}"
base-store = "r1"

[[stores]]
name = "r1"
mall = "rakuten"
base-url = "http://127.0.0.1:9"
credentials = "r1.json"
poll-interval = "90s"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "goqd.toml"
    path.write_text(text.replace("{state}", str(tmp_path / "state")))
    return path


def test_the_example_config_is_valid() -> None:
    config = load_config(ROOT / "config" / "goqd.example.toml")
    assert [s.name for s in config.stores] == ["rakuten-main", "rakuten-outlet"]
    assert config.stores[0].poll_seconds == 180.0
    assert config.daemon.ledger_path == "/var/lib/goqd/goqd.db"


def test_a_good_config_loads_with_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    store = config.store("r1")
    assert store.poll_seconds == 90.0 and store.push_retry_seconds == 30.0
    assert config.daemon.synchronous == "full"


@pytest.mark.parametrize(
    ("edit", "key", "reason"),
    [
        (
            ('poll-interval = "90s"', 'poll-interval = "soon"'),
            "$.stores[0].poll-interval",
            "not a duration",
        ),
        (('mall = "rakuten"', 'mall = "ebay"'), "$.stores[0].mall", "unknown mall 'ebay'"),
        (('poll-interval = "90s"', 'pol-interval = "90s"'), "$.stores[0]", "unknown field"),
        (('base-store = "r1"', 'base-store = "nope"'), "$.daemon.base-store", "no store named"),
        (
            ('poll-interval = "90s"', 'poll-interval = "100ms"'),
            "$.stores[0].poll-interval",
            "rate limit",
        ),
        (
            ('base-store = "r1"', 'base-store = "r1"\nhttp-listen = "0.0.0.0:9464"'),
            "$.daemon.http-listen",
            "not loopback",
        ),
        (
            ('base-url = "http://127.0.0.1:9"', "base-url = 42"),
            "$.stores[0].base-url",
            "Expected `str`, got `int`",
        ),
        (('name = "r1"', 'name = "bad name!"'), "$.stores[0].name", "1-64 characters"),
    ],
)
def test_bad_config_names_file_key_and_reason(
    tmp_path: Path, edit: tuple[str, str], key: str, reason: str
) -> None:
    path = write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file.endswith("goqd.toml")
    assert info.value.path == key
    assert reason in info.value.reason
    assert str(path) in str(info.value) or "goqd.toml" in str(info.value)


def test_duplicate_store_names_are_refused(tmp_path: Path) -> None:
    text = GOOD + GOOD[GOOD.index("[[stores]]") :]
    with pytest.raises(ConfigError, match=r"stores\[1\]\.name.*used twice"):
        load_config(write(tmp_path, text))


def test_unparseable_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"goqd\.toml"):
        load_config(write(tmp_path, "[daemon\nstate-dir = 1"))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file is missing: no such file"):
        load_config(tmp_path / "absent.toml")


def _creds(tmp_path: Path, data: object, mode: int = 0o600) -> None:
    path = tmp_path / "r1.json"
    path.write_text(json.dumps(data))
    os.chmod(path, mode)


def test_credentials_load_as_secrets(tmp_path: Path) -> None:
    _creds(tmp_path, {"service_secret": "SP-canary-secret", "license_key": "SL-canary-key"})
    config = load_config(write(tmp_path, GOOD))
    creds = load_credentials(config, config.store("r1"))
    assert creds["license_key"].reveal() == "SL-canary-key"
    assert "SL-canary-key" not in repr(creds) and "SL-canary-key" not in str(creds)


def test_group_readable_credentials_are_refused_naming_the_file(tmp_path: Path) -> None:
    _creds(tmp_path, {"service_secret": "s", "license_key": "k"}, mode=0o640)
    config = load_config(write(tmp_path, GOOD))
    with pytest.raises(CredentialError, match=r"r1\.json.*readable by group or others.*0640"):
        load_credentials(config, config.store("r1"))


def test_missing_credentials_file_is_refused_naming_it(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    with pytest.raises(CredentialError, match=r"r1\.json.*missing"):
        load_credentials(config, config.store("r1"))


def test_credentials_missing_a_field_name_it(tmp_path: Path) -> None:
    _creds(tmp_path, {"service_secret": "s"})
    config = load_config(write(tmp_path, GOOD))
    with pytest.raises(CredentialError, match=r"\$\.license_key"):
        load_credentials(config, config.store("r1"))


def test_malformed_credentials_never_echo_the_file(tmp_path: Path) -> None:
    (tmp_path / "r1.json").write_text('{"license_key": "SL-canary-key", ')
    os.chmod(tmp_path / "r1.json", 0o600)
    config = load_config(write(tmp_path, GOOD))
    with pytest.raises(CredentialError) as info:
        load_credentials(config, config.store("r1"))
    assert "SL-canary-key" not in str(info.value)


def test_renewed_credentials_are_written_0600_and_take_precedence(tmp_path: Path) -> None:
    _creds(tmp_path, {"service_secret": "s", "license_key": "old"})
    config = load_config(write(tmp_path, GOOD))
    path = write_credentials(config, "r1", {"service_secret": "s", "license_key": "new"})
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_credentials(config, config.store("r1"))["license_key"].reveal() == "new"


def test_environment_overrides_state_dir_and_socket(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, GOOD),
        env={"GOQD_STATE_DIR": "/var/lib/goqd/shop2", "GOQD_CONTROL_SOCKET": "/run/goqd/s2.sock"},
    )
    assert config.daemon.ledger_path == "/var/lib/goqd/shop2/goqd.db"
    assert config.daemon.control_socket == "/run/goqd/s2.sock"


def test_durations() -> None:
    assert seconds("3m") == 180 and seconds("500ms") == 0.5 and seconds("1.5h") == 5400
    with pytest.raises(ValueError):
        seconds("3 minutes")


def _problem_credentials(tmp_path: Path, problem: str) -> None:
    path = tmp_path / "r1.json"
    if problem == "directory":
        path.mkdir(mode=0o700)
        return
    if problem == "fifo":  # reading one would wait for a writer for ever
        os.mkfifo(path, 0o600)
        return
    content = {
        "invalid-utf8": b'{"service_secret": "s\xff\xfe", "license_key": "k"}',
        "invalid-json": b'{"service_secret": "SP-canary-secret",\n "license_key": }',
        "too-large": b'{"service_secret": "' + b"x" * 70_000 + b'", "license_key": "k"}',
        "deeply-nested": b"[" * 20_000 + b"]" * 20_000,
        "huge-number": b'{"service_secret": ' + b"9" * 5000 + b"}",
    }[problem]
    path.write_bytes(content)
    path.chmod(0o600)


@pytest.mark.parametrize(
    ("problem", "reason"),
    [
        ("missing", "credential file of store 'r1' is missing: no such file"),
        ("directory", "cannot read the credential file of store 'r1': it is a directory"),
        ("fifo", "cannot read the credential file of store 'r1': not a regular file"),
        ("invalid-utf8", "is not UTF-8 text (invalid byte at offset 21)"),
        ("invalid-json", "is not valid JSON: Expecting value (line 2, column 17)"),
        ("too-large", "larger than 64 KiB"),
        ("deeply-nested", "is not valid JSON"),
        ("huge-number", "is not valid JSON"),
    ],
)
def test_each_credential_file_problem_is_named_for_what_it_is(
    tmp_path: Path, problem: str, reason: str
) -> None:
    if problem != "missing":
        _problem_credentials(tmp_path, problem)
    config = load_config(write(tmp_path, GOOD))
    with pytest.raises(CredentialError) as info:
        load_credentials(config, config.store("r1"))
    assert info.value.file == str(tmp_path / "r1.json")
    assert reason in info.value.reason, info.value.reason
    assert "canary" not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.mkdir(), "cannot read the config file: it is a directory"),
        (lambda p: os.mkfifo(p), "cannot read the config file: not a regular file"),
        (lambda p: p.write_bytes(b"#" * (5 << 20)), "larger than 4096 KiB"),
        (lambda p: p.write_bytes(b"a = " + b"[" * 50_000), "nested too deeply"),
    ],
)
def test_a_config_path_that_is_no_config_file_is_refused_without_reading_it_whole(
    tmp_path: Path, make: Any, reason: str
) -> None:
    path = tmp_path / "goqd.toml"
    make(path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == "$" and reason in info.value.reason, info.value.reason


def test_a_nul_in_a_credential_path_is_refused_not_raised(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD.replace('"r1.json"', '"r1\\u0000.json"')))
    with pytest.raises(CredentialError, match="NUL character"):
        load_credentials(config, config.store("r1"))
    with pytest.raises(ConfigError, match=r"\$\.daemon\.state-dir.*NUL"):
        load_config(write(tmp_path, GOOD.replace("{state}", "{state}\\u0000x")))


def test_durations_that_overflow_are_refused(tmp_path: Path) -> None:
    huge = "1" + "0" * 400 + "s"  # a valid duration string that parses to infinity
    with pytest.raises(ConfigError, match=r"\$\.stores\[0\]\.poll-interval.*too long"):
        load_config(write(tmp_path, GOOD.replace('"90s"', f'"{huge}"')))
