"""Metrics definitions and the /metrics, /healthz, webhook HTTP server over loopback."""

from __future__ import annotations

import errno
import functools
import re
import tomllib
from collections.abc import Mapping

import httpx
import pytest
import trio
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import goqd
from goqd.config import is_loopback, listen_address
from goqd.errors import ConfigError
from goqd.http import MAX_WEBHOOK_BODY, serve_http
from goqd.metrics import STATES, Metrics
from tests.helpers.paths import ROOT


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


# -- metrics ---------------------------------------------------------------------------


def test_touch_store_creates_every_per_store_series_at_zero() -> None:
    reg = CollectorRegistry()
    metrics = Metrics(reg, version="1.2.3")
    metrics.touch_store("rakuten-a", "rakuten")
    assert value(reg, "goqd_store_up", store="rakuten-a", mall="rakuten") == 0
    for state in STATES:
        assert value(reg, "goqd_store_state", store="rakuten-a", state=state) == 0
    assert value(reg, "goqd_store_error_level", store="rakuten-a") == 0
    assert value(reg, "goqd_poll_last_success_timestamp_seconds", store="rakuten-a") == 0
    assert value(reg, "goqd_push_last_success_timestamp_seconds", store="rakuten-a") == 0
    for outcome in ("ok", "unavailable", "rate_limited", "auth", "protocol", "error"):
        assert value(reg, "goqd_polls_total", store="rakuten-a", outcome=outcome) == 0
        assert (
            value(
                reg, "goqd_mall_requests_total", store="rakuten-a", mall="rakuten", outcome=outcome
            )
            == 0
        )
    for outcome in ("booked", "duplicate", "stale", "parked", "rejected"):
        assert value(reg, "goqd_order_lines_total", store="rakuten-a", outcome=outcome) == 0
    for outcome in ("accepted", "rejected", "failed"):
        assert value(reg, "goqd_pushes_total", store="rakuten-a", outcome=outcome) == 0
    assert value(reg, "goqd_poll_duration_seconds_count", store="rakuten-a") == 0
    assert value(reg, "goqd_outbox_pending", store="rakuten-a") == 0
    assert value(reg, "goqd_parked_lines", store="rakuten-a") == 0
    assert value(reg, "goqd_held_units", store="rakuten-a") == 0
    assert value(reg, "goqd_errors_open", store="rakuten-a", level="9") == 0
    # Unknown expiry stays absent rather than reading as "expired in 1970".
    assert value(reg, "goqd_credential_expiry_timestamp_seconds", store="rakuten-a") is None
    assert value(reg, "goqd_build_info", version="1.2.3") == 1
    assert value(reg, "goqd_oversold_units_total") == 0


def test_set_state_leaves_exactly_one_state_at_one() -> None:
    reg = CollectorRegistry()
    metrics = Metrics(reg)
    metrics.touch_store("a", "rakuten")
    metrics.set_state("a", "degraded")
    metrics.set_state("a", "stopped")
    states = {s: value(reg, "goqd_store_state", store="a", state=s) for s in STATES}
    assert states == {"running": 0, "degraded": 0, "stopped": 1, "paused": 0, "down": 0}
    with pytest.raises(ValueError):
        metrics.set_state("a", "sleepy")


def test_ledger_batch_and_restart_helpers_feed_their_metrics() -> None:
    reg = CollectorRegistry()
    metrics = Metrics(reg)
    metrics.observe_ledger_batch(40, 0.004, 0)
    metrics.observe_ledger_batch(2, 0.002, 3)
    metrics.count_restart("store:a", RuntimeError("x"), 1)
    assert value(reg, "goqd_ledger_batch_size_count") == 2
    assert value(reg, "goqd_ledger_batch_size_sum") == 42
    assert value(reg, "goqd_ledger_commit_duration_seconds_count") == 2
    assert value(reg, "goqd_oversold_units_total") == 3
    assert value(reg, "goqd_supervisor_restarts_total", child="store:a") == 1


def test_every_metric_is_prefixed_and_carries_no_sku_label() -> None:
    reg = CollectorRegistry()
    metrics = Metrics(reg)
    metrics.touch_store("a", "rakuten")
    metrics.touch_child("a")
    metrics.credential_expiry_timestamp_seconds.labels("a").set(1.9e9)
    allowed = {"store", "mall", "outcome", "state", "level", "child", "version", "le"}
    families = list(reg.collect())
    assert len(families) == 28
    for family in families:
        assert family.name.startswith("goqd_"), family.name
        for sample in family.samples:
            assert set(sample.labels) <= allowed, (family.name, sample.labels)


def test_build_info_reports_the_version_pyproject_declares() -> None:
    # pyproject.toml is the one place the version is written; the package, and so the
    # build-info metric, read it from the installed distribution.
    with (ROOT / "pyproject.toml").open("rb") as f:
        declared = tomllib.load(f)["project"]["version"]
    assert goqd.__version__ == declared, "installed metadata is stale: pip install -e ."
    reg = CollectorRegistry()
    Metrics(reg)
    assert value(reg, "goqd_build_info", version=declared) == 1


# -- HTTP ------------------------------------------------------------------------------


class Server:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.metrics.touch_store("rakuten-a", "rakuten")
        self.healthy = True
        self.webhook_calls: list[tuple[bytes, dict[str, str]]] = []

    async def health(self) -> dict[str, object]:
        return {"ok": self.healthy, "stores": {"rakuten-a": "running"}}

    async def shopify_hook(self, body: bytes, headers: Mapping[str, str]) -> int:
        self.webhook_calls.append((body, dict(headers)))
        return 202

    async def broken_hook(self, body: bytes, headers: Mapping[str, str]) -> int:
        raise RuntimeError("handler bug")


async def start(nursery: trio.Nursery, server: Server, listen: str = "127.0.0.1:0") -> str:
    url: str = await nursery.start(
        functools.partial(
            serve_http,
            listen,
            server.registry,
            health=server.health,
            webhooks={"shopify": server.shopify_hook, "broken": server.broken_hook},
        )
    )
    return url


async def test_two_daemons_in_one_process_keep_their_metrics_apart() -> None:
    # Two daemons (or two tests) in one process: each registers every goqd_ name on its
    # own registry. Neither may see the other's values, and both must expose without
    # prometheus_client's "Duplicated timeseries" refusal (which registering on the
    # global registry would raise at the second daemon).
    first, second = Server(), Server()
    second.metrics.touch_store("yahoo-b", "yahoo")
    first.metrics.set_state("rakuten-a", "stopped")
    first.metrics.observe_ledger_batch(5, 0.001, 4)
    second.metrics.set_state("rakuten-a", "degraded")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            urls = [await start(nursery, server) for server in (first, second)]
            async with httpx.AsyncClient() as client:
                texts = [(await client.get(f"{url}/metrics")).text for url in urls]
            nursery.cancel_scope.cancel()

    def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    one, two = (samples(text) for text in texts)
    state = "goqd_store_state"
    assert one[(state, frozenset({("store", "rakuten-a"), ("state", "stopped")}))] == 1
    assert one[(state, frozenset({("store", "rakuten-a"), ("state", "degraded")}))] == 0
    assert two[(state, frozenset({("store", "rakuten-a"), ("state", "stopped")}))] == 0
    assert two[(state, frozenset({("store", "rakuten-a"), ("state", "degraded")}))] == 1
    assert one[("goqd_oversold_units_total", frozenset())] == 4
    assert two[("goqd_oversold_units_total", frozenset())] == 0
    assert not any(labels and ("store", "yahoo-b") in labels for _n, labels in one)
    assert any(("store", "yahoo-b") in labels for _n, labels in two)
    # Nothing leaked onto the process-wide registry either.
    assert REGISTRY.get_sample_value("goqd_oversold_units_total") is None


async def test_metrics_endpoint_exposes_touched_store_series() -> None:
    server = Server()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await start(nursery, server)
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url) and not url.endswith(":0")
            async with httpx.AsyncClient() as client:
                response = await client.get(f"{url}/metrics")
            nursery.cancel_scope.cancel()
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    text = response.text
    assert 'goqd_store_up{mall="rakuten",store="rakuten-a"} 0.0' in text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"goqd_store_up", "goqd_polls", "goqd_outbox_pending"} <= names
    assert 'goqd_build_info{version="' in text


async def test_healthz_is_200_when_ok_and_503_when_not() -> None:
    server = Server()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await start(nursery, server)
            async with httpx.AsyncClient() as client:
                ok = await client.get(f"{url}/healthz")
                server.healthy = False
                bad = await client.get(f"{url}/healthz")
            nursery.cancel_scope.cancel()
    assert ok.status_code == 200
    assert ok.json() == {"ok": True, "stores": {"rakuten-a": "running"}}
    assert bad.status_code == 503 and bad.json()["ok"] is False


async def test_healthz_is_503_when_the_check_itself_fails() -> None:
    server = Server()

    async def failing() -> dict[str, object]:
        raise RuntimeError("ledger timeout")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(
                functools.partial(serve_http, "127.0.0.1:0", server.registry, health=failing)
            )
            async with httpx.AsyncClient() as client:
                response = await client.get(f"{url}/healthz")
            nursery.cancel_scope.cancel()
    assert response.status_code == 503
    assert response.json() == {"ok": False, "error": "health check failed"}


async def test_webhooks_route_by_name_and_unknown_paths_are_404() -> None:
    server = Server()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await start(nursery, server)
            async with httpx.AsyncClient() as client:
                hook = await client.post(
                    f"{url}/webhooks/shopify",
                    content=b'{"id": 1}',
                    headers={"X-Shopify-Topic": "orders/create"},
                )
                unknown_hook = await client.post(f"{url}/webhooks/amazon", content=b"{}")
                unknown_path = await client.get(f"{url}/admin")
                wrong_method = await client.get(f"{url}/webhooks/shopify")
                post_metrics = await client.post(f"{url}/metrics")
                broken = await client.post(f"{url}/webhooks/broken", content=b"x")
                too_big = await client.post(
                    f"{url}/webhooks/shopify", content=b"x" * (MAX_WEBHOOK_BODY + 1)
                )
                at_cap = await client.post(
                    f"{url}/webhooks/shopify", content=b"y" * MAX_WEBHOOK_BODY
                )
            nursery.cancel_scope.cancel()
    assert hook.status_code == 202
    assert server.webhook_calls[0][0] == b'{"id": 1}'
    assert server.webhook_calls[0][1]["x-shopify-topic"] == "orders/create"
    assert unknown_hook.status_code == 404
    assert unknown_path.status_code == 404
    assert wrong_method.status_code == 405
    assert post_metrics.status_code == 405
    assert broken.status_code == 500
    assert too_big.status_code == 413
    assert at_cap.status_code == 202
    assert len(server.webhook_calls) == 2 and len(server.webhook_calls[1][0]) == MAX_WEBHOOK_BODY


async def test_serves_on_ipv6_loopback() -> None:
    server = Server()
    try:
        with trio.socket.socket(trio.socket.AF_INET6) as probe:
            await probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await start(nursery, server, "[::1]:0")
            async with httpx.AsyncClient() as client:
                response = await client.get(f"{url}/healthz")
            nursery.cancel_scope.cancel()
    assert url.startswith("http://[::1]:")
    assert response.status_code == 200


async def test_refuses_non_loopback_address_unless_allowed() -> None:
    server = Server()
    for listen in ("0.0.0.0:0", "[::]:0", "192.0.2.10:9464", "example.com:9464"):
        with pytest.raises(ConfigError, match="is not loopback; set http-public = true"):
            await serve_http(listen, server.registry, health=server.health)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(
                functools.partial(
                    serve_http,
                    "0.0.0.0:0",
                    server.registry,
                    health=server.health,
                    allow_public=True,
                )
            )
            assert url.startswith("http://0.0.0.0:")
            nursery.cancel_scope.cancel()


async def test_bind_failure_surfaces_from_start() -> None:
    server = Server()
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}") as info:
            await serve_http(f"127.0.0.1:{port}", server.registry, health=server.health)
        assert info.value.errno == errno.EADDRINUSE


def test_listen_address_forms() -> None:
    assert listen_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert listen_address("[::1]:0") == ("::1", 0)
    assert listen_address("[::1]:9100") == ("::1", 9100)
    assert listen_address("localhost:65535") == ("localhost", 65535)
    assert listen_address("metrics-1.example.com.:9100") == ("metrics-1.example.com.", 9100)
    for bad in (
        "-metrics:9100",
        "metrics..example.com:9100",
        "metrics_1:9100",
        "ホスト:9100",
        "a" * 254 + ":9100",
        "9464",
        "::1:9464",
        "127.0.0.1:http",
        "127.0.0.1:70000",
        ":9464",
        "[::1]",
        "[::1]9464",
        "[::1:9464",
        "[127.0.0.1]:9464",
        "[nope]:9464",
        "127.0.0.1: 80",
        "127.0.0.1:8_0",
        "bad host:80",
        "x" * 100_000 + ":80x",
        "[" + "1" * 100_000 + "]:80",
        "127.0.0.1:" + "9" * 100_000,
    ):
        with pytest.raises(ValueError) as info:
            listen_address(bad)
        # One short line, whatever was passed in.
        assert "\n" not in str(info.value) and len(str(info.value)) < 200, str(info.value)


def test_is_loopback_knows_every_loopback_spelling() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.0.2.1", "::ffff:192.0.2.1", "example.com"):
        assert not is_loopback(host), host


async def test_metrics_output_passes_promtool_check_metrics(promtool: str) -> None:
    server = Server()
    server.metrics.touch_store("yahoo-b", "yahoo")
    server.metrics.touch_child("rakuten-a")
    server.metrics.set_state("rakuten-a", "running")
    server.metrics.poll_duration_seconds.labels("rakuten-a").observe(0.7)
    server.metrics.credential_expiry_timestamp_seconds.labels("yahoo-b").set(1.9e9)
    server.metrics.observe_ledger_batch(10, 0.003, 1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await start(nursery, server)
            async with httpx.AsyncClient() as client:
                body = (await client.get(f"{url}/metrics")).content
            nursery.cancel_scope.cancel()
    result = await trio.run_process(
        [promtool, "check", "metrics"],
        stdin=body,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    output = (result.stdout + result.stderr).decode()
    # promtool exits 0 even for lint warnings in some versions: require silence too.
    assert result.returncode == 0, output
    assert output.strip() == "", output
