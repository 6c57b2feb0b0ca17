"""Fuzz the config loader and ``goqd check-config`` (Hypothesis).

Inputs: TOML documents with the daemon and store tables filled with known and unknown
keys and values of every TOML type (strings with control characters and NULs, 70-bit
integers, nan and inf, dates, nested arrays and inline tables, durations that overflow,
listen addresses, group names); the same documents with their bytes mutated; random
bytes and invalid UTF-8; and credential files of random bytes and JSON.

The property: ``load_config`` returns a ``Config`` (whose derived values can be read)
or raises ``ConfigError``, never anything else; ``load_credentials`` returns secrets or
raises ``CredentialError``; and ``goqd check-config`` answers with exit code 0, or 1
and exactly one line on stderr, never a traceback.

``GOQD_FUZZ_EXAMPLES`` (default 800) sets the examples of each loader property (the CLI
one runs a tenth of them); ``GOQD_FUZZ_RANDOM=1`` explores new examples instead of the
same derandomized ones.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from goqd.cli.goqd import main as goqd_main
from goqd.config import Config, DaemonConfig, StoreConfig, load_config, load_credentials
from goqd.errors import ConfigError, CredentialError
from tests.helpers.fuzz import fuzz_settings

# One scratch directory (a function-scoped fixture), rewritten each example.
FUZZ = fuzz_settings(800, suppress=[HealthCheck.function_scoped_fixture])
EXAMPLES = FUZZ.max_examples


def _keys(struct: type[msgspec.Struct]) -> list[str]:
    return [f.encode_name for f in msgspec.structs.fields(struct)]


DAEMON_KEYS = _keys(DaemonConfig)
STORE_KEYS = _keys(StoreConfig)
VALID_STORE = {
    "name": "r1",
    "mall": "rakuten",
    "base-url": "http://127.0.0.1:9",
    "credentials": "r1.json",
    "poll-interval": "90s",
}

# Values chosen to reach the checks behind decoding, not only the decoder.
PLAUSIBLE = st.sampled_from(
    [
        "90s",
        "0s",
        "500ms",
        "1" + "0" * 400 + "s",
        "3 minutes",
        "127.0.0.1:0",
        "[::1]:0",
        "::1:9100",
        "127.0.0.1:99999",
        "[::1]",
        "0.0.0.0:80",
        "localhost:",
        ":9100",
        "rakuten",
        "yahoo",
        "amazon",
        "shopify",
        "aupay",
        "ebay",
        "http://127.0.0.1:9",
        "ftp://x",
        "root",
        "goqd-no-such-group",
        "nfkc",
        "casefold",
        "",
        "\x00",
        "a\nb",
        "r1",
        "../../x",
        "/" + "s" * 200,
        "debug",
        "json",
        "full",
        "normal",
    ]
)
SCALARS = st.one_of(
    PLAUSIBLE,
    st.text(max_size=20),
    st.integers(min_value=-(2**70), max_value=2**70),  # beyond 64 bits: a decode error
    st.integers(min_value=-5, max_value=100_000),
    st.floats(),  # nan and inf included
    st.booleans(),
    st.dates(),
    st.datetimes(),
)
KEY_TEXT = st.text(max_size=12)


def _values(keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.recursive(
        SCALARS,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=3),
        max_leaves=8,
    )


VALUES = _values(KEY_TEXT)


def _table(known: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    # Mostly known keys: one unknown key refuses the whole table before any other check.
    # Values: plausible strings (of the right type for most keys), lists of them, or
    # anything.
    key = st.integers(0, 7).flatmap(lambda n: KEY_TEXT if n == 0 else st.sampled_from(known))
    value = st.one_of(PLAUSIBLE, st.lists(PLAUSIBLE, max_size=3), VALUES)
    return st.dictionaries(key, value, max_size=4)


# A valid store with some keys replaced or added: most examples pass decoding and reach
# the cross-field checks.
STORES = st.lists(
    st.integers(0, 4).flatmap(
        lambda n: (
            _table(STORE_KEYS)
            if n == 0
            else st.builds(lambda extra: {**VALID_STORE, **extra}, _table(STORE_KEYS))
        )
    ),
    max_size=3,
)
DOCUMENTS = st.fixed_dictionaries(
    {"daemon": _table(DAEMON_KEYS), "stores": STORES},
    optional={"extra": st.dictionaries(KEY_TEXT | st.just("source"), VALUES, max_size=1)},
)

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_string(text: str) -> str:
    # JSON's escapes are TOML's, except that TOML also wants DEL escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # inf, -inf and nan are TOML spellings too
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
    return "{ " + items + " }"


def to_toml(document: dict[str, Any]) -> bytes:
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in document.get("extra", {}).items()]
    lines.append("[daemon]")
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in document["daemon"].items()]
    for store in document["stores"]:
        lines.append("[[stores]]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in store.items()]
    # surrogatepass: a lone surrogate in a generated string becomes invalid UTF-8 in the
    # file, which is one more thing the loader must refuse.
    return "\n".join(lines).encode("utf-8", "surrogatepass")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A generated document with bytes replaced, inserted or deleted."""
    data = bytearray(to_toml(draw(DOCUMENTS)))
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        at = draw(st.integers(min_value=0, max_value=len(data)))
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = draw(st.sampled_from([0x00, 0x0A, 0x22, 0x27, 0x5B, 0x5D, 0x3D, 0x80, 0xFF]))
        if op == "insert" or at == len(data):
            data.insert(at, byte)
        elif op == "replace":
            data[at] = byte
        else:
            del data[at]
    return bytes(data)


CONFIG_BYTES = st.one_of(
    DOCUMENTS.map(to_toml),
    mutated(),
    st.binary(max_size=300),
    st.binary(max_size=40).map(lambda b: b'[daemon]\nstate-dir = "' + b + b'"\n'),
    # Nesting: the TOML parser recurses once per level.
    st.integers(min_value=1, max_value=20_000).map(lambda n: b"a = " + b"[" * n + b"]" * n),
    st.integers(min_value=1, max_value=5_000).map(lambda n: b"a = " + b"{b=" * n + b"1" + b"}" * n),
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config-fuzz")


def _load(path: Path, raw: bytes) -> Config | ConfigError:
    path.write_bytes(raw)
    try:
        config = load_config(path, env={})
    except ConfigError as exc:
        assert exc.file == str(path) and exc.path.startswith("$"), exc
        event(f"refused at {re.sub(r'[0-9]+', 'N', exc.path)}")
        return exc
    event("loaded")
    # Everything the daemon derives from a loaded config can be derived.
    assert config.daemon.ledger_path and config.daemon.credentials_dir
    for store in config.stores:
        assert store.poll_seconds > 0 and store.timeout_seconds > 0
        assert store.watch_seconds >= 0 and store.hold_expiry_seconds > 0
    return config


@FUZZ
@given(raw=CONFIG_BYTES)
def test_the_config_loader_returns_a_config_or_a_config_error(scratch: Path, raw: bytes) -> None:
    _load(scratch / "goqd.toml", raw)


@FUZZ
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        VALUES.map(lambda v: json.dumps(v, default=str).encode()),
        st.fixed_dictionaries(
            {"service_secret": VALUES, "license_key": VALUES}, optional={"x": VALUES}
        ).map(lambda v: json.dumps(v, default=str).encode()),
        st.integers(min_value=1, max_value=30_000).map(lambda n: b"[" * n + b"]" * n),
    )
)
def test_the_credential_loader_returns_secrets_or_a_credential_error(
    scratch: Path, raw: bytes
) -> None:
    config_path = scratch / "goqd.toml"
    config_path.write_text(
        '[[stores]]\nname = "r1"\nmall = "rakuten"\nbase-url = "http://127.0.0.1:9"\n'
        'credentials = "r1.json"\n'
    )
    config = load_config(config_path, env={})
    cred = scratch / "r1.json"
    cred.write_bytes(raw)
    cred.chmod(0o600)
    try:
        secrets = load_credentials(config, config.store("r1"), env={})
    except CredentialError as exc:
        assert exc.file == str(cred) and "\n" not in str(exc)
        return
    assert set(secrets) >= {"service_secret", "license_key"}


@settings(FUZZ, max_examples=max(EXAMPLES // 10, 5))
@given(raw=CONFIG_BYTES)
def test_check_config_answers_in_one_line_or_accepts(
    scratch: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    raw: bytes,
) -> None:
    # The host checks of a config that decodes stay inside the scratch directory.
    monkeypatch.setenv("GOQD_STATE_DIR", str(scratch / "state"))
    monkeypatch.setenv("GOQD_CONTROL_SOCKET", str(scratch / "ctl.sock"))
    path = scratch / "goqd.toml"
    loaded = _load(path, raw)
    if isinstance(loaded, Config) and loaded.daemon.ledger:
        return  # a generated ledger path could name any file on the host: not here
    capsys.readouterr()
    code = goqd_main(["check-config", str(path)])
    out = capsys.readouterr()
    if code == 0:
        assert out.err == "" and "ok (" in out.out
    else:
        assert code == 1
        lines = out.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("goqd: "), out.err
        assert out.err.endswith("\n") and "Traceback" not in out.err


def test_a_refusal_stays_one_line_whatever_the_file_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found by the fuzzer: an unknown key is quoted in the refusal, and a TOML key may
    # hold a newline or a terminal escape.
    path = tmp_path / "goqd.toml"
    path.write_text('[daemon]\n"evil\\nkey\\u001b[2J" = 1\n', encoding="utf-8")
    assert goqd_main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err
    assert "$.daemon" in err and "evil\\nkey\\x1b[2J" in err
