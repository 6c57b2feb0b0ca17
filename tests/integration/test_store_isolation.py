"""One store's trouble stays that store's: no mall response, no run of failed polls and
no bad option crash-loops a store or keeps a webhook from its answer.

* A response that makes an adapter's parsing raise something it did not mean to
  (``IndexError`` here) fails that poll as a level-8 ``MallProtocolError``: the store
  goes degraded, retries and recovers; the supervisor restarts nothing.
* A signed Shopify webhook after N failed polls is answered 200 as soon as the next poll
  commits, and 503 as soon as that poll fails (before, each failed poll since start was
  one more poll to wait for, until the webhook timed out).
* Adapter options are checked by ``check-config``: an unknown name (with the closest
  known one suggested) or a bad value is refused naming ``$.stores[i].options.<name>``.

The daemon runs in process under the deterministic rig (``tests.helpers.rig.run_dst``:
MockClock, simulators behind the HTTP transport, a real SQLite ledger).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
import structlog
import trio

from goqd import app
from goqd.config import Config, ConfigError, StoreConfig, check_config
from goqd.errors import MallProtocolError, MallUnavailable
from goqd.ledger import queries
from goqd.malls import rakuten
from goqd.malls.base import GuardedAdapter, StoreContext
from goqd.malls.registry import MALLS
from goqd.malls.shopify import sign_webhook
from goqd.messages import MallListing
from goqd.secret import Secret
from tests.helpers import checker, rig


def _metric(run: rig.Running, name: str, **labels: str) -> float:
    samples = checker.metric_samples(run.metrics_text())
    return sum(
        v for (n, lab), v in samples.items() if n == name and labels.items() <= dict(lab).items()
    )


def _errors(run: rig.Running, store: str) -> list[tuple[Any, ...]]:
    return [
        (e.level, e.code, e.message) for e in queries.read(run.ledger_path, queries.errors, store)
    ]


def _booked(run: rig.Running, store: str) -> set[str]:
    return {r.order_id for r in queries.read(run.ledger_path, queries.order_lines, store)}


async def _failed_polls(handle: Any, n: int) -> None:
    """Ask for polls until ``n`` more have failed."""
    for _ in range(n):
        target = handle.last_failed_started + 1
        handle.request_poll()
        await rig.wait_for(
            lambda: handle.last_failed_started >= target,  # noqa: B023 (awaited here)
            timeout=900,
            every=0.5,
            what="a failed poll",
        )


# --------------------------------------------------------------------------------------
# A response the adapter cannot parse
# --------------------------------------------------------------------------------------


def test_an_unparseable_response_degrades_the_store_without_a_restart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken = False
    real_parse = rakuten.parse_jst

    def parse_jst(text: str) -> float:
        if broken:
            # What a parsing bug looks like to the store actor: not a goqd error.
            raise IndexError("list index out of range")
        return real_parse(text)

    monkeypatch.setattr(rakuten, "parse_jst", parse_jst)

    async def body(run: rig.Running) -> None:
        nonlocal broken
        ra, sb = run.daemon.handles["ra"], run.daemon.handles["sb"]
        order = run.fleet.sims["ra"].place_order([(run.fleet.keys["ra"]["TEA-SEN"], 1)])
        assert order is not None
        sb_polls = sb.polls
        broken = True
        await _failed_polls(ra, 4)

        assert (ra.state, ra.error_level) == ("degraded", 8)
        [(level, code, message)] = _errors(run, "ra")
        # goqd's code for it; the parser's own ("unreadable_response") is kept beside it.
        assert (level, code) == (8, "mall_protocol")
        assert "fetch_orders" in message and "IndexError" in message
        assert "rakuten" in message and "ra" in message
        # The actor never died: nothing was restarted, and the other store went on.
        assert _metric(run, "goqd_supervisor_restarts_total") == 0
        sb.request_poll()
        await rig.wait_for(lambda: sb.polls > sb_polls, timeout=300, every=0.5, what="sb")
        assert sb.state == "running"

        broken = False
        ra.request_poll()
        await rig.wait_for(lambda: ra.state == "running", timeout=900, every=0.5, what="recovery")
        assert order.order_id in _booked(run, "ra")
        assert _metric(run, "goqd_supervisor_restarts_total") == 0

    with structlog.testing.capture_logs() as logs:
        rig.run_dst(body, seed=41, stores=(("ra", "rakuten"), ("sb", "shopify")))
    unexpected = [e for e in logs if e["event"] == "adapter_raised_unexpected"]
    # Logged once with its traceback, though four polls failed the same way.
    assert len(unexpected) == 1
    assert unexpected[0]["store"] == "ra" and unexpected[0]["error"] == "IndexError"
    assert unexpected[0]["log_level"] == "error" and "exc_info" in unexpected[0]


# --------------------------------------------------------------------------------------
# Shopify webhooks after failed polls
# --------------------------------------------------------------------------------------

SHOPIFY = (("sa", "shopify"), ("ra", "rakuten"))


def _webhook(run: rig.Running, store: str) -> tuple[Any, bytes, dict[str, str]]:
    handler = app._webhook_handler(run.daemon, store, MALLS["shopify"].webhook)  # type: ignore[arg-type]
    secret = run.fleet.sims[store].credentials()["webhook_secret"]
    payload = json.dumps({"id": 1, "name": "#1001"}).encode()
    headers = {
        "X-Shopify-Topic": "orders/create",
        "X-Shopify-Hmac-Sha256": sign_webhook(Secret(secret), payload),
    }
    return handler, payload, headers


def test_after_failed_polls_a_webhook_is_answered_once_the_next_poll_commits() -> None:
    async def body(run: rig.Running) -> None:
        sim = run.fleet.sims["sa"]
        handle = run.daemon.handles["sa"]
        webhook, payload, headers = _webhook(run, "sa")
        sim.faults.maintenance = True
        await _failed_polls(handle, 5)
        # The state that used to trap webhooks: five more polls started than committed.
        assert handle.polls_started - handle.polls >= 5
        sim.faults.maintenance = False

        order = sim.place_order([(run.fleet.keys["sa"]["MUG-WHT"], 1)])
        assert order is not None
        committed = handle.polls
        with trio.fail_after(app.WEBHOOK_WAIT_S * 2):
            status = await webhook(payload, headers)
        assert status == 200
        # One poll was enough, and it had booked the order before the 200.
        assert handle.polls == committed + 1
        assert order.order_id in _booked(run, "sa")

    rig.run_dst(body, seed=42, stores=SHOPIFY)


def test_a_webhook_whose_poll_fails_is_answered_503_at_once() -> None:
    async def body(run: rig.Running) -> None:
        sim = run.fleet.sims["sa"]
        handle = run.daemon.handles["sa"]
        webhook, payload, headers = _webhook(run, "sa")
        sim.faults.maintenance = True
        await _failed_polls(handle, 3)
        started_before = handle.polls_started
        started = trio.current_time()
        status = await webhook(payload, headers)
        assert status == 503  # the mall redelivers
        # Answered because the poll started for it failed, not by the wait running out
        # (virtual time: the rig's clock only moves when everything waits).
        assert handle.last_failed_started == started_before + 1
        assert trio.current_time() - started < app.WEBHOOK_WAIT_S

    rig.run_dst(body, seed=43, stores=SHOPIFY)


# --------------------------------------------------------------------------------------
# Adapter options are check-config's business
# --------------------------------------------------------------------------------------


def _config(*options: dict[str, Any], mall: str = "rakuten") -> Config:
    stores = tuple(
        StoreConfig(
            name=f"s{i}",
            mall=mall,
            base_url="https://example.invalid",
            credentials=f"s{i}.json",
            options=opts,
        )
        for i, opts in enumerate(options)
    )
    return Config(stores=stores, source="/etc/goqd/goqd.toml")


@pytest.mark.parametrize(
    ("mall", "options", "key", "words"),
    [
        ("rakuten", {"overlap": 600}, "overlap", ["unknown option", "did you mean 'overlap_s'"]),
        ("rakuten", {"link_field": "janCode"}, "link_field", ["merchantDefinedSkuId"]),
        ("rakuten", {"page_size": 5000}, "page_size", ["between 1 and 1000"]),
        ("rakuten", {"overlap_s": 1.5}, "overlap_s", ["whole number"]),
        ("yahoo", {"lockout_s": "60"}, "lockout_s", ["number"]),
        ("yahoo", {"link_feild": "ItemId"}, "link_feild", ["did you mean 'link_field'"]),
        ("aupay", {"fetch_names": "yes"}, "fetch_names", ["true or false"]),
        ("aupay", {"rate_per_s": 0}, "rate_per_s", ["between"]),
        ("shopify", {"default_location_id": "1234"}, "default_location_id", ["gid://"]),
        ("amazon", {"lag_s": -1}, "lag_s", ["between 0"]),
        ("amazon", {"sku_field": "asin"}, "sku_field", ["unknown option", "known: "]),
    ],
)
def test_a_bad_or_misspelt_option_is_refused_by_check_config(
    mall: str, options: dict[str, Any], key: str, words: list[str]
) -> None:
    config = _config({}, options, mall=mall)
    with pytest.raises(ConfigError) as info:
        check_config(config)
    assert info.value.path == f"$.stores[1].options.{key}"
    assert info.value.file == "/etc/goqd/goqd.toml"
    for word in words:
        assert word in info.value.reason


def test_good_options_pass_and_every_declared_default_is_a_valid_value() -> None:
    check_config(_config({"overlap_s": 900, "link_field": "variantId"}))
    check_config(
        _config({"auth_error_codes": "PME0106,PME0107", "fetch_names": False}, mall="aupay")
    )
    for spec in MALLS.values():
        for name, option in spec.options.items():
            if option.default is not None:
                assert option.parse(option.default) == option.default, (spec.name, name)


def test_the_adapter_reads_the_same_checked_options() -> None:
    # Opened outside check-config (a tool, a test), the adapter refuses the same way.
    from goqd.malls.base import read_options

    ctx = StoreContext(
        store="y",
        mall="yahoo",
        base_url="https://x",
        credentials={},
        http=None,  # type: ignore[arg-type]
        clock=lambda: 0.0,
        options={"order_page_size": 0},
    )
    with pytest.raises(ConfigError) as info:
        read_options(MALLS["yahoo"], ctx)
    assert info.value.path == "options.order_page_size"
    ok = read_options(MALLS["yahoo"], msgspec.structs.replace(ctx, options={}))
    assert ok["order_page_size"] == 1000 and ok["link_field"] == "SubCode"


# --------------------------------------------------------------------------------------
# The guard itself
# --------------------------------------------------------------------------------------


class _Broken:
    """An adapter whose parsing goes wrong in the ways the guard is for."""

    mall = "rakuten"
    limits = rakuten.SPEC.limits

    def __init__(self) -> None:
        self.closed = False

    async def check_credentials(self) -> None:
        raise KeyError("Results")

    async def fetch_orders(self, cursor: str | None) -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    async def push_stock(self, items: Any) -> Any:
        raise MallUnavailable("mall down", mall="rakuten", store="r")

    async def read_stock(self, listing_keys: Any) -> dict[str, int | None]:
        return {"a/b": 2**63, "c/d": None}

    async def iter_listings(self) -> Any:
        try:
            yield MallListing(listing_key="a/b", quantity=1)
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        finally:
            self.closed = True

    async def credential_expiry(self) -> float | None:
        return float("nan")


async def test_the_guard_turns_every_unexpected_failure_into_a_protocol_error() -> None:
    inner = _Broken()
    adapter = GuardedAdapter(inner, store="r", mall="rakuten")  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        for call in (adapter.check_credentials(), adapter.fetch_orders(None)):
            with pytest.raises(MallProtocolError) as info:
                await call
            assert info.value.level == 8 and info.value.store == "r"
        with pytest.raises(MallProtocolError, match="not a plausible count"):
            await adapter.read_stock(["a/b"])
        with pytest.raises(MallProtocolError, match="credential_expiry"):
            await adapter.credential_expiry()
        seen = []
        with pytest.raises(MallProtocolError, match=r"iter_listings.*UnicodeDecodeError"):
            async for listing in adapter.iter_listings():
                seen.append(listing.listing_key)
        # goqd's own errors pass through as they are.
        with pytest.raises(MallUnavailable, match="mall down"):
            await adapter.push_stock([])
        with pytest.raises(MallProtocolError):
            await adapter.check_credentials()
    assert seen == ["a/b"] and inner.closed
    # One traceback per call and exception type, however often it happens.
    events = [(e["api"], e["error"]) for e in logs if e["event"] == "adapter_raised_unexpected"]
    assert events == [
        ("check_credentials", "KeyError"),
        ("fetch_orders", "RecursionError"),
        ("iter_listings", "UnicodeDecodeError"),
    ]


async def test_every_registered_mall_opens_a_guarded_adapter() -> None:
    import httpx

    async with httpx.AsyncClient() as http:
        for name, spec in MALLS.items():
            creds = {f: Secret(f"{f}-value-123") for f in spec.credential_fields}
            ctx = StoreContext(
                store="s",
                mall=name,
                base_url="https://x",
                credentials=creds,
                http=http,
                clock=lambda: 0.0,
            )
            assert isinstance(spec.open_adapter(ctx), GuardedAdapter), name
