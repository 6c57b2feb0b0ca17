"""The mall client core and the Shopify simulator on input nobody means to send: a mint
cancelled half way, a token endpoint quoting the secret it was sent, a GraphQL body
nested past the interpreter's depth, a query priced below zero."""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgspec
import pytest
import trio
import trio.testing

from goqd.errors import MallAuthError
from goqd.expiry import renewal_action
from goqd.malls.amazon import AmazonAdapter
from goqd.malls.client import MallClient, TokenAuth, TokenResponse
from goqd.malls.registry import MALLS
from goqd.sim.shopify import SimShopify
from tests.helpers.malls import serve_mall, store_context

T0 = 1_777_000_000.0


def wall() -> float:
    return T0 + trio.current_time()


# --------------------------------------------------------------------------------------
# TokenAuth: a cancelled mint
# --------------------------------------------------------------------------------------


async def test_a_cancelled_mint_frees_the_lock_and_leaves_no_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    minted = 0

    async def mint() -> TokenResponse:
        nonlocal minted
        await trio.sleep(10)  # the token endpoint is slow
        minted += 1
        return TokenResponse(access_token=f"token-{minted}", expires_in=3600)

    async with httpx.AsyncClient() as http:
        ctx = store_context("amazon", "http://127.0.0.1:9", http, wall, {})
        auth = TokenAuth(MallClient(ctx, "amazon"), mint)
        first, _ = await auth.token()
        # The token goes stale; the task renewing it is cancelled on its way.
        with trio.move_on_after(5) as scope:
            await auth.refresh(stale=first)
        assert scope.cancelled_caught and minted == 1
        # Nothing half done: the lock is free (a held one would hang here), and the
        # stale token is not handed out again, so the next call mints a new one.
        with trio.fail_after(60):
            token, fresh = await auth.token()
    assert (token.reveal(), fresh) == ("token-2", True)


# --------------------------------------------------------------------------------------
# A token endpoint quoting the credential it was sent
# --------------------------------------------------------------------------------------

REFRESH = "Atzr|refresh-token-do-not-leak"


async def test_a_token_refusal_quoting_the_refresh_token_does_not_carry_it() -> None:
    def lwa(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            400,
            json={
                "error": "invalid_grant",
                "error_description": f"The refresh token {REFRESH} is invalid for A1SELLER",
            },
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(lwa)) as http:
        ctx = store_context(
            "amazon",
            "https://sellingpartnerapi-fe.amazon.com",
            http,
            wall,
            {
                "client_id": "amzn1.application-oa2-client.x",
                "client_secret": "client-secret-do-not-leak",
                "refresh_token": REFRESH,
                "seller_id": "A1SELLER",
            },
        )
        with pytest.raises(MallAuthError) as caught:
            await AmazonAdapter(ctx).check_credentials()
    message = str(caught.value)
    # The message is kept in the ledger and shown by goqctl, where no log redactor runs.
    assert REFRESH not in message and "The refresh token *** is invalid" in message
    # Only the secret fields: the seller id is what the operator needs to read.
    assert "A1SELLER" in message


# --------------------------------------------------------------------------------------
# The Shopify simulator on hostile bodies: Shopify's own replies, never a crash
# --------------------------------------------------------------------------------------


def _ping(**extra: Any) -> dict[str, Any]:
    return {"query": "query GoqdPing { shop { id } }", "operationName": "GoqdPing", **extra}


async def _post(body: bytes) -> tuple[SimShopify, httpx.Response]:
    """``body`` sent to a fresh simulated shop over loopback, with a valid token."""
    sim = SimShopify(shop_id="tokyo", clock=wall)
    async with serve_mall(sim) as shop:
        response = await shop.http.post(
            shop.url + sim.path,
            content=body,
            headers={"x-shopify-access-token": sim.credentials()["access_token"]},
        )
    return sim, response


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        json.dumps(_ping()).encode()[:-1] + b', "variables": ' + b"[" * 100_000 + b"}",
    ],
    ids=["body", "variables"],
)
async def test_json_nested_past_the_interpreter_depth_is_a_bad_request(body: bytes) -> None:
    sim, response = await _post(body)
    # Shopify's answer to a body it cannot read, not a 500 from a handler that raised.
    assert response.status_code == 400
    assert response.json() == {"errors": {"query": "Required parameter missing or invalid"}}
    assert [r.status for r in sim.requests] == [400]


async def test_a_negative_page_size_is_refused_and_pays_nothing_into_the_bucket() -> None:
    query = "query GoqdPing { shop { id } o: orders(first: -500) { nodes { id } } }"
    sim, response = await _post(json.dumps(_ping(query=query)).encode())
    assert response.status_code == 200
    assert response.json()["errors"][0]["extensions"]["code"] == "BAD_REQUEST"
    # Neither charged nor credited: a real bucket never holds more than its size, and
    # a query priced below zero would pass an empty one.
    bucket = sim.bucket("GoqdPing")
    assert bucket is not None and bucket.tokens == sim.bucket_size


# --------------------------------------------------------------------------------------
# An operator's typo in a credential that goes into a header
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("typo", ["\n", " ", "ｘ"], ids=["line-break", "space", "full-width"])
async def test_a_credential_no_header_can_carry_is_the_operators_to_fix(typo: str) -> None:
    sim = SimShopify(shop_id="tokyo", clock=wall)
    async with serve_mall(sim) as shop:
        token = sim.credentials()["access_token"]
        credentials = {**sim.credentials(), "access_token": token + typo}
        ctx = shop.context(credentials=credentials, default_location_id=sim.primary_location)
        with pytest.raises(MallAuthError) as caught:
            await MALLS["shopify"].open_adapter(ctx).check_credentials()
    # Not an outage retried for ever, not "the response could not be read": the store
    # stops and says what to check; nothing was sent, and no httpx error quoting the
    # value is chained to it.
    assert caught.value.code == "credential_unsendable" and "credential file" in str(caught.value)
    assert caught.value.__cause__ is None and sim.requests == []
    assert token not in str(caught.value)


# --------------------------------------------------------------------------------------
# A mall's renewal text (``KeyExpiry.renewal``) with braces of its own
# --------------------------------------------------------------------------------------


def test_a_renewal_text_showing_a_json_object_names_the_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = MALLS["aupay"]
    assert spec.expiry is not None
    renewal = 'write {"api_key": "…"} to new.json and run `goqctl key set {store} --file new.json`'
    expiry = msgspec.structs.replace(spec.expiry, renewal=renewal)
    monkeypatch.setitem(MALLS, "aupay", msgspec.structs.replace(spec, expiry=expiry))
    assert renewal_action("shop-1", "aupay") == (
        'write {"api_key": "…"} to new.json and run `goqctl key set shop-1 --file new.json`'
    )
