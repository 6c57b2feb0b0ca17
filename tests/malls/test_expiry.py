"""Credential expiry: the pure computations in goqd.expiry (boundaries included), and each
adapter's ``credential_expiry()`` against its simulator over loopback, with the fake clock
carried past the predicted expiry to prove the mall then refuses the credential."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import httpx
import pytest
import trio
import trio.testing

from goqd.errors import MallAuthError
from goqd.expiry import (
    DAY,
    JST,
    days_left,
    expiry_field,
    expiry_state,
    renewal_action,
    warning_message,
)
from goqd.malls.base import MallAdapter, StoreContext
from goqd.malls.registry import MALLS
from goqd.secret import Secret
from goqd.sim.http import App, serve_sim

NOW = 1_790_000_000.0  # 2026-09-21 23:13:20 JST
BOUND_S = 400 * DAY  # fake seconds; the autojump clock reaches it only on a deadlock


def wall() -> float:
    return NOW + trio.current_time()


# --------------------------------------------------------------------------------------
# days_left / expiry_state / warning_message
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (30 * DAY, 30),
        (14 * DAY, 14),
        (14 * DAY - 1, 13),  # rounded down: 13 days and 23:59:59 is "13 days left"
        (DAY, 1),
        (DAY - 1, 0),  # under a day: 0, "expires within 24 hours"
        (0.0, 0),
        (-1.0, -1),  # a second past: expired less than a day ago
        (-DAY, -1),
        (-DAY - 1, -2),
    ],
)
def test_days_left_rounds_down_to_whole_days(offset: float, expected: int) -> None:
    assert days_left(NOW + offset, NOW) == expected


def test_days_left_of_an_unknown_expiry_is_none() -> None:
    assert days_left(None, NOW) is None


@pytest.mark.parametrize(
    ("offset", "state"),
    [
        (90 * DAY, "ok"),
        (14 * DAY + 1, "ok"),  # one second more than the warning window
        (14 * DAY, "warning"),  # exactly warning_days left already warns
        (DAY, "warning"),
        (1.0, "warning"),
        (0.0, "expired"),  # the instant of expiry
        (-3 * DAY, "expired"),
    ],
)
def test_expiry_state_boundaries_with_14_warning_days(offset: float, state: str) -> None:
    assert expiry_state(NOW + offset, NOW, 14) == state


def test_expiry_state_unknown_without_an_expiry_and_zero_warning_days_never_warns() -> None:
    assert expiry_state(None, NOW, 14) == "unknown"
    assert expiry_state(NOW + 1, NOW, 0) == "ok"
    assert expiry_state(NOW, NOW, 0) == "expired"


def test_expiry_state_follows_the_configured_warning_days() -> None:
    expires = NOW + 20 * DAY
    assert expiry_state(expires, NOW, 14) == "ok"
    assert expiry_state(expires, NOW, 20) == "warning"
    assert expiry_state(expires, NOW, 30) == "warning"


@pytest.mark.parametrize(
    ("mall", "must_say"),
    [
        ("rakuten", ("licenseKey", "RMS", "ライセンスキー")),
        ("aupay", ("API key", "Wow!manager", "issued_at")),
        ("yahoo", ("refresh token", "28 days", "re-authorise", "refresh_token_issued_at")),
        ("amazon", ("Seller Central", "re-authorise", "authorized_at")),
        ("shopify", ("rotate the access token", "expires_at")),
    ],
)
def test_warning_message_says_what_to_do_next_for_each_mall(
    mall: str, must_say: tuple[str, ...]
) -> None:
    text = warning_message("shop-1", mall, NOW + 9 * DAY + 3600, NOW)
    assert "in 9 days" in text
    assert "`goqctl key set shop-1 --file new.json`" in text
    for phrase in must_say:
        assert phrase in text, (mall, phrase, text)


def test_warning_message_dates_are_in_japan_time() -> None:
    # 2026-11-28 23:59:59 JST is 14:59:59 UTC: the operator sees the mall's own date.
    expires = datetime(2026, 11, 28, 23, 59, 59, tzinfo=JST).timestamp()
    text = warning_message("r1", "rakuten", expires, expires - 5 * DAY)
    assert "(2026-11-28 23:59 JST)" in text
    assert "in 5 days" in text


def test_warning_message_for_less_than_a_day_and_for_one_day() -> None:
    assert "expires within 24 hours" in warning_message("r1", "rakuten", NOW + 3600, NOW)
    assert "expires in 1 day (" in warning_message("r1", "rakuten", NOW + DAY, NOW)


def test_warning_message_after_expiry_says_sync_is_stopped_with_level_9() -> None:
    today = warning_message("y1", "yahoo", NOW - 60, NOW)
    assert "expired today" in today
    assert "エラーレベル9" in today
    assert "`goqctl key set y1 --file new.json`" in today
    assert "expired 3 days ago" in warning_message("y1", "yahoo", NOW - 3 * DAY - 5, NOW)


def test_warning_message_for_an_unknown_expiry_names_the_field_to_add() -> None:
    text = warning_message("au1", "aupay", None, NOW)
    assert "cannot tell when" in text
    assert "add issued_at to its credential file" in text
    # Rakuten is asked through its API: there is no field to add.
    assert "add " not in warning_message("r1", "rakuten", None, NOW)


def test_every_registered_mall_has_its_own_renewal_action() -> None:
    generic = renewal_action("s", "no-such-mall")
    assert "`goqctl key set s --file new.json`" in generic
    for name in MALLS:
        action = renewal_action("s", name)
        assert action != generic, f"mall {name!r} has no renewal action in goqd.expiry"
        assert action.endswith("`goqctl key set s --file new.json`")


# Malls whose key expiry is read from a credential field (Rakuten's is asked of the mall).
_FIELD_MALLS = sorted(n for n, s in MALLS.items() if s.expiry is not None and s.expiry.field)


def test_most_malls_date_their_key_by_a_credential_field() -> None:
    assert _FIELD_MALLS == ["amazon", "aupay", "shopify", "yahoo"]


@pytest.mark.parametrize("mall", _FIELD_MALLS)
async def test_the_expiry_field_a_spec_names_is_the_one_its_adapter_reads(mall: str) -> None:
    # The operator is told to add this field: the adapter must read exactly it, so the
    # date written there is the date goqd warns by.
    spec = MALLS[mall]
    assert spec.expiry is not None
    field = spec.expiry.field
    assert expiry_field(mall) == field
    assert field in spec.optional_fields + spec.credential_fields
    assert not spec.is_secret_field(field)  # a date, not a secret to mask in every log
    base = {name: "x" * 12 for name in spec.credential_fields}
    issued = "2026-09-21T00:00:00+09:00"
    async with httpx.AsyncClient(transport=httpx.MockTransport(_no_requests)) as http:
        with_field = spec.open_adapter(
            _ctx("s1", mall, "https://mall.invalid", {**base, field: issued}, http)
        )
        without = spec.open_adapter(_ctx("s1", mall, "https://mall.invalid", base, http))
        assert await with_field.credential_expiry() == (
            datetime(2026, 9, 21, tzinfo=JST).timestamp() + spec.expiry.lifetime_s
        )
        # Only that field: without it goqd cannot tell, and says which field to add.
        assert await without.credential_expiry() is None
    assert f"add {field} to its credential file" in warning_message("s1", mall, None, NOW)


def test_titles_and_credential_names_come_from_the_mall_spec() -> None:
    for name, spec in MALLS.items():
        text = warning_message("s1", name, NOW + 9 * DAY, NOW)
        assert text.startswith(f"s1 ({spec.title}): the ")
        assert spec.expiry is not None, name
        assert f"the {spec.expiry.credential} expires" in text


# --------------------------------------------------------------------------------------
# Adapters against their simulators (loopback, autojump clock)
# --------------------------------------------------------------------------------------


def _ctx(
    store: str, mall: str, url: str, creds: dict[str, str], http: httpx.AsyncClient
) -> StoreContext:
    return StoreContext(
        store=store,
        mall=mall,
        base_url=url,
        credentials={k: Secret(v) for k, v in creds.items()},
        http=http,
        clock=wall,
        urls={"token": url, "lwa": url},
    )


@asynccontextmanager
async def serving(app: App) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(serve_sim, app)
        async with httpx.AsyncClient(timeout=10.0) as http:
            yield url, http
        nursery.cancel_scope.cancel()


async def sleep_until(epoch: float) -> None:
    await trio.sleep(max(0.0, epoch - wall()))


async def _refused_after(adapter: MallAdapter, expires: float) -> None:
    """Just before ``expires`` the mall takes the credential; just after, it refuses it."""
    await sleep_until(expires - 60)
    await adapter.check_credentials()
    await sleep_until(expires + 60)
    with pytest.raises(MallAuthError):
        await adapter.check_credentials()


async def test_rakuten_expiry_comes_from_the_license_expiry_date_api(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from goqd.malls import rakuten
    from goqd.sim.rakuten import KEY_EXPIRY, SimRakuten

    sim = SimRakuten(shop_id="123456", clock=wall)
    with trio.fail_after(BOUND_S):
        async with serving(sim.app) as (url, http):
            creds = sim.credentials()
            adapter = rakuten.SPEC.open_adapter(_ctx("r1", "rakuten", url, creds, http))
            # A freshly issued key: 90 days, as RMS issues them.
            issued = await adapter.credential_expiry()
            assert issued is not None
            assert issued == pytest.approx(wall() + 90 * DAY, abs=1.0)
            assert expiry_state(issued, wall(), 14) == "ok"
            # The mall says another date: goqd believes the mall, not the 90-day rule.
            target = float(int(NOW + 10 * DAY + 7 * 3600))
            sim.set_key_expiry(creds["license_key"], target)
            expires = await adapter.credential_expiry()
            assert expires == target
            assert days_left(expires, wall()) == 10
            assert expiry_state(expires, wall(), 14) == "warning"
            assert any(r.api == KEY_EXPIRY and r.status == 200 for r in sim.requests)
            await _refused_after(adapter, expires)
            # Expired: the expiry API refuses too, so the loop reports "unknown", and
            # the store's エラーレベル9 (from polling) is what the operator sees.
            with pytest.raises(MallAuthError):
                await adapter.credential_expiry()


async def test_aupay_expiry_is_the_issue_date_plus_90_days_and_never_late(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from goqd.malls.aupay import AupayAdapter
    from goqd.sim.aupay import SimAupay

    sim = SimAupay(shop_id="12345678", clock=wall)
    with trio.fail_after(BOUND_S):
        async with serving(sim.app) as (url, http):
            creds = sim.credentials()
            adapter = AupayAdapter(_ctx("au1", "aupay", url, creds, http))
            expires = await adapter.credential_expiry()
            # Issued on 2026-09-21 (JST): the day counts from midnight JST, so goqd's
            # date is at most a day earlier than the key's real end, never later.
            midnight = datetime(2026, 9, 21, tzinfo=JST).timestamp()
            assert creds["issued_at"] == "2026-09-21"
            assert expires == midnight + 90 * DAY
            assert wall() + 89 * DAY <= expires <= wall() + 90 * DAY
            await sleep_until(expires - 14 * DAY)
            assert expiry_state(expires, wall(), 14) == "warning"
            await _refused_after(adapter, NOW + 90 * DAY)
            # Without issued_at goqd cannot know: "unknown", and the message says why.
            bare = {k: v for k, v in creds.items() if k != "issued_at"}
            unknown = AupayAdapter(_ctx("au1", "aupay", url, bare, http))
            assert await unknown.credential_expiry() is None


async def test_yahoo_expiry_is_refresh_token_age_plus_28_days_and_restarts_on_rotation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from goqd.malls.yahoo import YahooAdapter
    from goqd.sim.yahoo import SimYahoo

    plain = SimYahoo(shop_id="mystore", clock=wall)
    rotating = SimYahoo(shop_id="rotstore", clock=wall, rotate_refresh_token=True)
    with trio.fail_after(BOUND_S):
        async with serving(plain.app) as (url, http), serving(rotating.app) as (url2, http2):
            adapter = YahooAdapter(_ctx("y1", "yahoo", url, plain.credentials(), http))
            expires = await adapter.credential_expiry()
            assert expires is not None
            assert expires == pytest.approx(NOW + 28 * DAY, abs=1.0)
            # A refresh that keeps the token does not extend its 28 days.
            await trio.sleep(5 * DAY)
            await adapter.check_credentials()
            assert await adapter.credential_expiry() == expires

            rot = YahooAdapter(_ctx("y2", "yahoo", url2, rotating.credentials(), http2))
            await trio.sleep(10 * DAY)
            await rot.check_credentials()  # the mall hands out a new refresh token
            renewed = await rot.credential_expiry()
            assert renewed is not None
            assert renewed == pytest.approx(wall() + 28 * DAY, abs=60.0)

            # About 13 days left of the first token: inside the 14-day window.
            assert 12 <= (days_left(expires, wall()) or 0) <= 13
            assert expiry_state(expires, wall(), 14) == "warning"
            await _refused_after(adapter, expires)


async def test_shopify_expiry_is_the_tokens_expires_at(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from goqd.malls.shopify import ShopifyAdapter
    from goqd.sim.shopify import SimShopify

    expiring = SimShopify(shop_id="tokyo", clock=wall, token_ttl=2 * DAY)
    forever = SimShopify(shop_id="osaka", clock=wall)
    with trio.fail_after(BOUND_S):
        async with serving(expiring.app) as (url, http):
            adapter = ShopifyAdapter(_ctx("sh1", "shopify", url, expiring.credentials(), http))
            expires = await adapter.credential_expiry()
            assert expires == NOW + 2 * DAY
            assert expiry_state(expires, wall(), 14) == "warning"
            assert days_left(expires, wall()) == 2
            await _refused_after(adapter, expires)
        async with serving(forever.app) as (url, http):
            assert "expires_at" not in forever.credentials()
            adapter = ShopifyAdapter(_ctx("sh2", "shopify", url, forever.credentials(), http))
            assert await adapter.credential_expiry() is None
            assert expiry_state(None, wall(), 14) == "unknown"


@pytest.mark.skipif(
    importlib.util.find_spec("goqd.malls.amazon") is None, reason="Amazon adapter not present"
)
async def test_amazon_expiry_is_the_authorisation_date_plus_a_year(
    autojump_clock: trio.testing.MockClock,  # the sim dates its authorisation by wall()
) -> None:
    from goqd.malls.amazon import AmazonAdapter
    from goqd.sim.amazon import SimAmazon

    sim = SimAmazon(shop_id="A2SELLERJP0001", clock=wall)
    creds = sim.credentials()
    assert creds["authorized_at"] == "2026-09-21"
    # The yearly authorisation is a date in the credential file: no request needed.
    async with httpx.AsyncClient(transport=httpx.MockTransport(_no_requests)) as http:
        adapter = AmazonAdapter(_ctx("amz", "amazon", "https://sp.invalid", creds, http))
        expires = await adapter.credential_expiry()
    assert expires == datetime(2026, 9, 21, tzinfo=JST).timestamp() + 365 * DAY
    assert expiry_state(expires, NOW, 14) == "ok"
    assert expiry_state(expires, NOW + 352 * DAY, 14) == "warning"
    assert "Seller Central" in warning_message("amz", "amazon", expires, NOW + 352 * DAY)


def _no_requests(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"unexpected request {request.method} {request.url}")
