"""Logging: JSON lines, stdlib routing, and the redaction canary."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import structlog
import trio
import trio.testing

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


# --------------------------------------------------------------------------------------
# What is registered: the secret fields of a credential, their wire forms, and tokens
# minted at run time; not seller ids, shop ids or dates.
# --------------------------------------------------------------------------------------


def test_only_secret_credential_fields_are_masked_not_ids_or_dates(stream: io.StringIO) -> None:
    from goqd.config import parse_credentials
    from goqd.malls.registry import MALLS

    aupay_key = "aupay-api-key-4d1c9e77"
    parse_credentials(
        "aupay.json",
        "aupay",
        {"api_key": aupay_key, "shop_id": "70012345", "issued_at": "2026-07-14"},
        MALLS["aupay"].credential_fields,
    )
    amazon_secret = "amzn1.oa2-cs.v1.f00dfeed1234"
    parse_credentials(
        "amazon.json",
        "amazon",
        {
            "client_id": "amzn1.application-oa2-client.77aa",
            "client_secret": amazon_secret,
            "refresh_token": "Atzr|refresh-5e5e5e5e",
            "seller_id": "A3SELLER9QX",
            "authorized_at": "2026-03-02",
        },
        MALLS["amazon"].credential_fields,
    )
    log = structlog.get_logger("goqd.test")
    log.info("order 70012345-20260714-01 seen at 2026-07-14T06:25:45Z", store="aupay-a")
    log.info("amazon", seller="A3SELLER9QX", app="amzn1.application-oa2-client.77aa")
    log.info("authorized 2026-03-02", leaked=f"{aupay_key} {amazon_secret}")

    entries = lines(stream)
    # Before, every credential value was registered: the date masked the whole day's
    # timestamps (***T06:25:45Z) and the shop id cut the order id.
    assert entries[0]["event"] == "order 70012345-20260714-01 seen at 2026-07-14T06:25:45Z"
    assert entries[1]["seller"] == "A3SELLER9QX"
    assert entries[1]["app"] == "amzn1.application-oa2-client.77aa"
    assert entries[2]["event"] == "authorized 2026-03-02"
    assert entries[2]["leaked"] == f"{MASK} {MASK}"


def test_a_field_the_mall_does_not_know_is_treated_as_secret(stream: io.StringIO) -> None:
    from goqd.config import parse_credentials

    parse_credentials(
        "shop.json",
        "shopify",
        {
            "access_token": "shpat_abc123def456",
            "webhook_secret": "whs-0a0b0c0d",
            "pin": "p1n-c0de-77",
        },
        ("access_token", "webhook_secret"),
    )
    structlog.get_logger("goqd.test").info("x p1n-c0de-77 y")
    assert lines(stream)[0]["event"] == f"x {MASK} y"


def test_a_secret_too_short_to_mask_is_warned_about_by_name_not_value() -> None:
    from goqd.config import parse_credentials

    with structlog.testing.capture_logs() as logs:
        parse_credentials(
            "r.json", "rakuten", {"service_secret": "SP1", "license_key": "SLkey-7788"}, ()
        )
    [warning] = [e for e in logs if e["event"] == "credential_too_short_to_mask"]
    assert warning["field"] == "service_secret" and warning["log_level"] == "warning"
    assert "SP1" not in str(logs)


async def test_rakuten_esa_header_base64_is_masked() -> None:
    import base64

    import httpx

    from goqd.malls.base import StoreContext
    from goqd.malls.rakuten import RakutenAdapter

    secret, key = "SP338528_esa_canary", "SL338528_esa_canary_key"
    wire = base64.b64encode(f"{secret}:{key}".encode()).decode()
    async with httpx.AsyncClient() as http:
        RakutenAdapter(
            StoreContext(
                store="r",
                mall="rakuten",
                base_url="https://api.rms.rakuten.co.jp",
                credentials={"service_secret": Secret(secret), "license_key": Secret(key)},
                http=http,
                clock=lambda: 0.0,
            )
        )
    with structlog.testing.capture_logs(processors=[redact]) as logs:
        # As a mall or a proxy might echo it back, without the header's name.
        structlog.get_logger().warning(f"gateway said: bad credential {wire}")
    assert logs[0]["event"] == f"gateway said: bad credential {MASK}"


async def test_access_tokens_minted_at_run_time_are_masked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    import httpx

    from goqd.malls.amazon import AmazonAdapter
    from goqd.malls.base import StoreContext

    token = "Atza|IwEBIRuntimeCanary-91f3c2"

    def lwa(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/o2/token":
            return httpx.Response(200, json={"access_token": token, "expires_in": 3600})
        return httpx.Response(200, json={"numberOfResults": 0, "items": []})

    async with httpx.AsyncClient(transport=httpx.MockTransport(lwa)) as http:
        adapter = AmazonAdapter(
            StoreContext(
                store="am",
                mall="amazon",
                base_url="https://sellingpartnerapi-fe.amazon.com",
                credentials={
                    "client_id": Secret("amzn1.application-oa2-client.1"),
                    "client_secret": Secret("amzn1.oa2-cs.v1.runtime-test"),
                    "refresh_token": Secret("Atzr|runtime-test-refresh"),
                    "seller_id": Secret("A1SELLER"),
                },
                http=http,
                clock=lambda: 1_790_000_000.0 + trio.current_time(),
                urls={"lwa": "https://api.amazon.co.jp"},
            )
        )
        assert await adapter.read_stock(["SKU-1"]) == {}
    with structlog.testing.capture_logs(processors=[redact]) as logs:
        structlog.get_logger().error("request failed", detail=f"token {token} refused")
    assert logs[0]["detail"] == f"token {MASK} refused"


def test_bearer_tokens_in_header_like_text_are_masked_unregistered() -> None:
    with structlog.testing.capture_logs(processors=[redact]) as logs:
        try:
            raise RuntimeError("sent Authorization: Bearer eyJhbGciOi.unregistered.9x8y")
        except RuntimeError as exc:
            structlog.get_logger().error("failed", error=exc)
        structlog.get_logger().info(
            'echo {"x-amz-access-token": "Atza|never-registered-77"}'
            " and access_token=tok-never-reg-1"
        )
    assert logs[0]["error"] == f"sent Authorization: Bearer {MASK}"
    assert "never-registered" not in logs[1]["event"] and "tok-never-reg" not in logs[1]["event"]
    assert logs[1]["event"].startswith('echo {"x-amz-access-token": "***"}')


def test_run_time_tokens_are_kept_for_a_bounded_number_of_registrations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from goqd import logs as goqd_logs

    monkeypatch.setattr(goqd_logs, "TRANSIENT_SECRETS_MAX", 3)
    for n in range(4):
        register_secret(f"transient-token-{n:04d}", transient=True)
    with structlog.testing.capture_logs(processors=[redact]) as logs:
        structlog.get_logger().info(
            "transient-token-0000 transient-token-0001 transient-token-0003"
        )
    # Three kept (URL-encoding changes nothing here): the oldest went first.
    assert logs[0]["event"] == f"transient-token-0000 {MASK} {MASK}"
