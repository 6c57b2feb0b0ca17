"""Retry-After: one parser for all five adapters (``goqd.malls.base.parse_retry_after``),
and one throttle path in the client core (``goqd.malls.client``).

Only finite, non-negative delta-seconds or an HTTP date count; the wait is capped at
``RETRY_AFTER_CAP_S``; anything else is the adapter's default. Before, three of the five
adapters' own parsers returned ``inf`` for ``Retry-After: inf`` and the store's rate
bucket was blocked for ever.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import format_datetime

import httpx
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from goqd.errors import (
    MallAuthError,
    MallProtocolError,
    MallRateLimited,
    MallUnavailable,
)
from goqd.malls.base import RETRY_AFTER_CAP_S, StoreContext, parse_retry_after
from goqd.malls.client import MallClient, error_class
from goqd.malls.ratelimit import TokenBucket
from tests.helpers.canned import MALLS, Canned

NOW = 1_790_000_000.0
DEFAULT = 7.0


def http_date(epoch: float) -> str:
    return format_datetime(datetime.fromtimestamp(epoch, UTC), usegmt=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 30 ", 30.0),
        ("1.5", 1.5),
        ("600", 600.0),
        ("601", RETRY_AFTER_CAP_S),
        ("999999999999", RETRY_AFTER_CAP_S),
        (None, DEFAULT),
        ("", DEFAULT),
        ("inf", DEFAULT),
        ("Infinity", DEFAULT),
        ("-inf", DEFAULT),
        ("nan", DEFAULT),
        ("-5", DEFAULT),
        ("+5", DEFAULT),
        ("1e3", DEFAULT),
        ("1e999", DEFAULT),
        ("0x10", DEFAULT),
        ("5 seconds", DEFAULT),
        ("99999999999999999999", DEFAULT),  # more digits than any wait a mall means
        ("9" * 5000, DEFAULT),
        ("soon", DEFAULT),
        ("\x00", DEFAULT),
        (http_date(NOW + 90), 90.0),
        (http_date(NOW - 90), 0.0),  # a date already past: now
        (http_date(NOW + 86400), RETRY_AFTER_CAP_S),
        ("Fri, 31 Dec 9999 23:59:59 GMT", RETRY_AFTER_CAP_S),
        ("Mon, 21 Sep 2026 14:18:20 -0000", 300.0),  # "-0000": UTC, not local time
        ("1 Jan 99999999999 00:00:00", DEFAULT),  # overflows the date parser
        ("Mon, 32 Foo 2026 99:99:99 GMT", DEFAULT),
    ],
)
def test_only_finite_delta_seconds_or_a_date_count_and_the_wait_is_capped(
    value: str | None, expected: float
) -> None:
    assert parse_retry_after(value, now=NOW, default=DEFAULT) == pytest.approx(expected)


def test_a_default_that_is_not_a_usable_wait_is_bounded_too() -> None:
    assert parse_retry_after("inf", now=NOW, default=math.inf) == RETRY_AFTER_CAP_S
    assert parse_retry_after("inf", now=NOW, default=-3.0) == 0.0
    assert parse_retry_after("9000", now=NOW, default=DEFAULT, cap=60.0) == 60.0


@settings(max_examples=500, derandomize=True, database=None)
@given(st.one_of(st.text(max_size=80), st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_any_header_value_gives_a_finite_wait_within_the_cap(value: str) -> None:
    wait = parse_retry_after(value, now=NOW, default=DEFAULT)
    assert math.isfinite(wait) and 0.0 <= wait <= RETRY_AFTER_CAP_S


@settings(max_examples=300, derandomize=True, database=None)
@given(st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False, allow_infinity=False))
def test_delta_seconds_are_taken_as_given_up_to_the_cap(seconds: object) -> None:
    text = str(seconds)
    assert parse_retry_after(text, now=NOW, default=DEFAULT) == pytest.approx(
        min(float(text), RETRY_AFTER_CAP_S)
    )


@settings(max_examples=300, derandomize=True, database=None)
@given(st.integers(min_value=-(10**8), max_value=10**8))
def test_a_date_is_relative_to_the_adapters_clock(offset: int) -> None:
    wait = parse_retry_after(http_date(NOW + offset), now=NOW, default=DEFAULT)
    assert wait == pytest.approx(min(max(offset, 0), RETRY_AFTER_CAP_S))


# --------------------------------------------------------------------------------------
# Every adapter, end to end: a 429 with a hostile Retry-After never parks the store
# --------------------------------------------------------------------------------------

HOSTILE = ["inf", "1e999", "nan", "-1", "Fri, 31 Dec 9999 23:59:59 GMT", "99999999999"]


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("mall", list(MALLS))
def test_a_hostile_retry_after_is_bounded_and_the_next_call_goes_out(mall: str, value: str) -> None:
    spec = MALLS[mall]
    throttled = 0
    token_paths = ("/auth/o2/token", "/yconnect/v2/token")

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal throttled
        canned: Canned = spec.route(request)
        if request.url.path not in token_paths and throttled == 0:
            throttled += 1
            return httpx.Response(429, headers={"Retry-After": value}, content=b"")
        return httpx.Response(canned.status, content=canned.body, headers=canned.headers)

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            adapter = spec.spec.open_adapter(spec.context(http))
            with pytest.raises(MallRateLimited) as info:
                await adapter.read_stock(list(spec.keys))
            wait = info.value.retry_after
            assert wait is not None and 0.0 <= wait <= RETRY_AFTER_CAP_S
            # The adapter blocked its bucket for that long, and no longer: the store's
            # next read goes out (before, "inf" blocked three of the five for ever).
            started = trio.current_time()
            with trio.fail_after(RETRY_AFTER_CAP_S + 60):
                counts = await adapter.read_stock(list(spec.keys))
            assert isinstance(counts, dict)
            assert trio.current_time() - started <= RETRY_AFTER_CAP_S + 5

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert throttled == 1


# --------------------------------------------------------------------------------------
# The client core: one throttle path, whatever the wait came from
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("wait", [math.inf, math.nan, -math.inf, 1e300, -5.0])
def test_a_throttle_blocks_the_bucket_no_longer_than_the_cap(wait: float) -> None:
    # A wait computed from a mall's numbers (Shopify's throttle status) is bounded like
    # a Retry-After header: the same bound, in the same place.
    async def main() -> None:
        async with httpx.AsyncClient() as http:
            ctx = StoreContext(
                store="s1",
                mall="test",
                base_url="http://x.invalid",
                credentials={},
                http=http,
                clock=lambda: NOW + trio.current_time(),
            )
            bucket = TokenBucket(1.0, 1.0)
            error = MallClient(ctx, "test").throttled(
                "429", bucket=bucket, wait=wait, default=DEFAULT
            )
            assert error.retry_after is not None
            assert 0.0 <= error.retry_after <= RETRY_AFTER_CAP_S
            assert (error.mall, error.store) == ("test", "s1")
            started = trio.current_time()
            with trio.fail_after(RETRY_AFTER_CAP_S + 60):
                await bucket.acquire()
            assert trio.current_time() - started <= RETRY_AFTER_CAP_S + 1

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_reply_table_gives_the_graver_class_when_status_and_code_disagree() -> None:
    table = {
        401: MallAuthError,
        429: MallRateLimited,
        "AUTH1": MallAuthError,
        "BUSY": MallUnavailable,
    }
    assert error_class(table, 429, "AUTH1") is MallAuthError
    assert error_class(table, 429, "BUSY") is MallRateLimited
    assert error_class(table, 500, "BUSY") is MallUnavailable
    assert error_class(table, 503) is MallUnavailable
    assert error_class(table, 400, "OTHER") is MallProtocolError
    assert error_class(table, 200, "OTHER", otherwise=MallUnavailable) is MallUnavailable
