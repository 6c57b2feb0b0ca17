"""Logging: JSON lines, stdlib routing, and the redaction canary."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import structlog

from goqd.logs import MASK, configure_logging, redact, register_secret
from goqd.secret import Secret

CANARY = "SP338528_canary_K3y_9f2d1e"  # a fake Rakuten-style licenseKey
B64_CANARY = "Zm9v+YmFy/canary=="  # a token with characters that URL encoding changes


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Leave the process's logging as it was: other test files share it."""
    root = logging.getLogger()
    names = ("httpx", "httpcore", "hypercorn.access")
    levels = {name: logging.getLogger(name).level for name in names}
    root_level, handlers = root.level, list(root.handlers)
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(root_level)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture
def stream() -> io.StringIO:
    out = io.StringIO()
    configure_logging("debug", json=True, stream=out)
    register_secret(CANARY)
    return out


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def test_json_lines_have_level_utc_timestamp_and_context(stream: io.StringIO) -> None:
    structlog.contextvars.bind_contextvars(store="rakuten-a")
    try:
        structlog.get_logger("goqd.test").info("poll_failed", mall="rakuten", count=3)
    finally:
        structlog.contextvars.clear_contextvars()
    [entry] = lines(stream)
    assert entry["event"] == "poll_failed"
    assert entry["level"] == "info"
    assert entry["store"] == "rakuten-a" and entry["mall"] == "rakuten" and entry["count"] == 3
    assert str(entry["timestamp"]).endswith("Z")
    assert entry["logger"] == "goqd.test"


def test_level_filter_drops_debug_at_info() -> None:
    out = io.StringIO()
    configure_logging("info", json=True, stream=out)
    structlog.get_logger("goqd.test").debug("noisy")
    structlog.get_logger("goqd.test").warning("kept")
    assert [e["event"] for e in lines(out)] == ["kept"]


def test_stdlib_logging_is_routed_through_structlog(stream: io.StringIO) -> None:
    logging.getLogger("hypercorn.error").warning("Running on %s", "http://127.0.0.1:1")
    [entry] = lines(stream)
    assert entry["event"] == "Running on http://127.0.0.1:1"
    assert entry["level"] == "warning" and entry["logger"] == "hypercorn.error"
    assert "timestamp" in entry


def test_httpx_info_chatter_is_quiet(stream: io.StringIO) -> None:
    logging.getLogger("httpx").info("HTTP Request: GET https://api.example/ 200")
    assert lines(stream) == []


def test_registered_canary_never_appears_anywhere(stream: io.StringIO) -> None:
    log = structlog.get_logger("goqd.test")
    log.info(f"key is {CANARY}")
    log.info("nested", data={"a": [{"b": ("x", f"prefix-{CANARY}-suffix")}]}, n=1)
    log.info("headers", headers={"Authorization": "ESA abc", "X-Other": CANARY})
    log.info("bytes", body=f'{{"licenseKey":"{CANARY}"}}'.encode())
    log.info("secret_obj", cred=Secret(CANARY), creds={"licenseKey": Secret(CANARY)})
    register_secret(B64_CANARY)
    log.info("url", url=f"https://api.example/?key={quote(B64_CANARY, safe='')}&x=1")
    try:
        raise RuntimeError(f"mall said: bad key {CANARY}")
    except RuntimeError:
        log.exception("push_failed")
    try:
        raise ValueError(f"stdlib path {CANARY}")
    except ValueError:
        logging.getLogger("hypercorn.error").exception("Error in ASGI app %s", CANARY)
    log.error("exc_value", error=KeyError(CANARY))

    text = stream.getvalue()
    assert CANARY not in text
    assert quote(B64_CANARY, safe="") not in text and "Zm9v" not in text
    entries = lines(stream)
    assert len(entries) == 9
    # Masked, not dropped: the surrounding text is still there to debug with.
    assert entries[0]["event"] == f"key is {MASK}"
    assert entries[1]["data"] == {"a": [{"b": ["x", f"prefix-{MASK}-suffix"]}]}
    assert entries[2]["headers"] == {"Authorization": MASK, "X-Other": MASK}
    assert "RuntimeError: mall said: bad key ***" in str(entries[6]["exception"])
    assert "ValueError: stdlib path ***" in str(entries[7]["exception"])


def test_secret_looking_keys_are_masked_even_if_unregistered(stream: io.StringIO) -> None:
    structlog.get_logger("goqd.test").info(
        "loaded",
        license_key="abc-unregistered-1",
        token="t0k3n-unregistered",
        nested={
            "client_secret": "cs-unregistered",
            "refreshToken": "rt-unregistered",
            "service-secret": "ss-unregistered",
        },
        password="pw-unregistered",
        store="a",
    )
    text = stream.getvalue()
    assert "unregistered" not in text
    [entry] = lines(stream)
    assert entry["license_key"] == MASK and entry["store"] == "a"
    assert entry["nested"] == {"client_secret": MASK, "refreshToken": MASK, "service-secret": MASK}


def test_console_renderer_is_redacted_too() -> None:
    out = io.StringIO()
    configure_logging("info", json=False, stream=out)
    register_secret(CANARY)
    structlog.get_logger("goqd.test").info("console", value=f"x{CANARY}x")
    text = out.getvalue()
    assert "console" in text and CANARY not in text and f"x{MASK}x" in text


def test_redact_processor_alone_masks_registered_values() -> None:
    register_secret("another-canary-4242")
    with structlog.testing.capture_logs(processors=[redact]) as logs:
        structlog.get_logger().info("x", v=["another-canary-4242"], m={"k": "another-canary-4242"})
    assert logs == [{"event": "x", "v": [MASK], "m": {"k": MASK}, "log_level": "info"}]


def test_a_value_registered_after_lines_were_masked_is_masked_from_then_on() -> None:
    # The pattern is compiled lazily, once per change: a registration between two lines
    # must not be missed by the second.
    register_secret("first-canary-1111")
    with structlog.testing.capture_logs(processors=[redact]) as logs:
        structlog.get_logger().info("a first-canary-1111 second-canary-2222")
        register_secret("second-canary-2222")
        structlog.get_logger().info("b first-canary-1111 second-canary-2222")
    assert logs[0]["event"] == f"a {MASK} second-canary-2222"
    assert logs[1]["event"] == f"b {MASK} {MASK}"


def test_short_values_are_not_registered() -> None:
    register_secret("abc")
    with structlog.testing.capture_logs(processors=[redact]) as logs:
        structlog.get_logger().info("abc abcd")
    assert logs[0]["event"] == "abc abcd"


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError):
        configure_logging("loud", stream=io.StringIO())


def test_configuring_twice_does_not_duplicate_lines() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", json=True, stream=first)
    configure_logging("info", json=True, stream=second)
    structlog.get_logger("goqd.test").info("once")
    logging.getLogger("hypercorn.error").warning("stdlib once")
    assert first.getvalue() == ""
    assert [e["event"] for e in lines(second)] == ["once", "stdlib once"]
