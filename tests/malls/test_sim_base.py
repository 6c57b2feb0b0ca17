"""The simulator base: one guard pipeline for every simulated mall, each fault answered
in that mall's own wire format; simulators independent of the adapters; Shopify's
query cost computed by the simulator from the query text it receives.

Real parts: each simulator is served by hypercorn on 127.0.0.1 and asked over HTTP.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from goqd.sim.base import SimMall
from goqd.sim.http import serve_sim
from goqd.sim.registry import SIMS
from goqd.sim.shopify import MUTATION_COST, UNAUTHORIZED_BODY, SimShopify, query_cost

EPOCH = 1_800_000_000.0
SHOP = "shop1"


def wall() -> float:
    return EPOCH + trio.current_time()


# --------------------------------------------------------------------------------------
# Independence from the adapters
# --------------------------------------------------------------------------------------


def test_no_simulator_imports_an_adapter() -> None:
    # A fresh interpreter: this test process has imported the adapters already.
    code = (
        "import pkgutil, importlib, sys, goqd.sim\n"
        "names = [m.name for m in pkgutil.iter_modules(goqd.sim.__path__)]\n"
        "for name in names: importlib.import_module('goqd.sim.' + name)\n"
        "print(len(names), sorted(m for m in sys.modules if m.startswith('goqd.malls')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split(" ", 1)
    assert int(out[0]) >= len(SIMS) + 3  # base, http, registry and every simulator
    assert out[1].strip() == "[]"


# --------------------------------------------------------------------------------------
# The guard pipeline, per mall in the registry
# --------------------------------------------------------------------------------------


@dataclass
class Probe:
    """How to call one guarded API of a mall, and how to read its error replies."""

    # (sim, http, base url) -> (method, path, request kwargs) of an authorised call
    call: Callable[[Any, httpx.AsyncClient, str], Awaitable[tuple[str, str, dict[str, Any]]]]
    code: Callable[[httpx.Response], str]  # the error code in the mall's format
    # fault -> (HTTP status, code) the mall answers with
    replies: dict[str, tuple[int, str]]
    sim_options: dict[str, Any] = field(default_factory=dict)


def _json_errors_code(response: httpx.Response) -> str:
    return str(response.json()["errors"][0]["code"])


def _xml_code(path: str) -> Callable[[httpx.Response], str]:
    def read(response: httpx.Response) -> str:
        assert "xml" in response.headers["content-type"]
        return ET.fromstring(response.content).findtext(path) or ""

    return read


def _rakuten_code(response: httpx.Response) -> str:
    return str(response.json()["Results"]["errorCode"])


def _aupay_code(response: httpx.Response) -> str:
    if response.headers["content-type"].startswith("text/html"):
        return "html"
    return _xml_code("result/error/code")(response)


def _shopify_code(response: httpx.Response) -> str:
    errors = response.json()["errors"]
    return errors if isinstance(errors, str) else str(errors[0]["extensions"]["code"])


async def _amazon_call(
    sim: Any, http: httpx.AsyncClient, url: str
) -> tuple[str, str, dict[str, Any]]:
    creds = sim.credentials()
    token = await http.post(
        url + "/auth/o2/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": creds["refresh_token"],
            "client_id": creds["client_id"],
            "client_secret": creds["client_secret"],
        },
    )
    access = token.json()["access_token"]
    return (
        "GET",
        f"/listings/2021-08-01/items/{SHOP}",
        {
            "params": {"marketplaceIds": "A1VC38T7YXB528"},
            "headers": {"x-amz-access-token": access},
        },
    )


async def _yahoo_call(
    sim: Any, http: httpx.AsyncClient, url: str
) -> tuple[str, str, dict[str, Any]]:
    creds = sim.credentials()
    token = await http.post(
        url + "/yconnect/v2/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": creds["refresh_token"],
            "client_id": creds["client_id"],
            "client_secret": creds["client_secret"],
        },
    )
    access = token.json()["access_token"]
    return (
        "GET",
        "/ShoppingWebService/V1/orderCount",
        {"params": {"sellerId": SHOP}, "headers": {"authorization": f"Bearer {access}"}},
    )


async def _rakuten_call(
    sim: Any, http: httpx.AsyncClient, url: str
) -> tuple[str, str, dict[str, Any]]:
    creds = sim.credentials()
    esa = base64.b64encode(f"{creds['service_secret']}:{creds['license_key']}".encode()).decode()
    return (
        "GET",
        "/es/2.0/items/search",
        {"params": {"hits": "1"}, "headers": {"authorization": f"ESA {esa}"}},
    )


async def _aupay_call(
    sim: Any, http: httpx.AsyncClient, url: str
) -> tuple[str, str, dict[str, Any]]:
    return (
        "GET",
        "/wmshopapi/searchStocks",
        {
            "params": {"shopId": SHOP},
            "headers": {"authorization": f"Bearer {sim.credentials()['api_key']}"},
        },
    )


async def _shopify_call(
    sim: Any, http: httpx.AsyncClient, url: str
) -> tuple[str, str, dict[str, Any]]:
    return (
        "POST",
        sim.path,
        {
            "json": {
                "query": "query GoqdPing { shop { id name } location { id } }",
                "operationName": "GoqdPing",
                "variables": {},
            },
            "headers": {"x-shopify-access-token": sim.credentials()["access_token"]},
        },
    )


# What each mall answers, in its own format (docs/malls.md; [I] codes are the
# simulators' documented assumptions).
PROBES: dict[str, Probe] = {
    "amazon": Probe(
        _amazon_call,
        _json_errors_code,
        {
            "route": (404, "NotFound"),
            "maintenance": (503, "ServiceUnavailable"),
            "server_error": (500, "InternalFailure"),
            "auth": (403, "Unauthorized"),
            "throttle": (429, "QuotaExceeded"),
        },
    ),
    "yahoo": Probe(
        _yahoo_call,
        _xml_code("Code"),
        {
            "route": (404, "ed-00404"),
            "maintenance": (503, "ed-00503"),
            "server_error": (500, "ed-00500"),
            "auth": (401, "px-04102"),
            "throttle": (429, "rl-00001"),
        },
        {"require_signature": False},
    ),
    "rakuten": Probe(
        _rakuten_call,
        _rakuten_code,
        {
            "route": (404, "ES02-01"),
            "maintenance": (503, "ES03-01"),
            "server_error": (500, "ES03-00"),
            "auth": (401, "GA0001"),
            "throttle": (429, "ES05-01"),
        },
    ),
    "aupay": Probe(
        _aupay_call,
        _aupay_code,
        {
            "route": (404, "PME0201"),
            "maintenance": (503, "PME9001"),
            "server_error": (500, "html"),
            "auth": (401, "PME0106"),
            "throttle": (429, "PME9002"),
        },
    ),
    "shopify": Probe(
        _shopify_call,
        _shopify_code,
        {
            "route": (404, "Not Found"),
            "maintenance": (503, "Service Unavailable"),
            "server_error": (500, "Internal Server Error"),
            "auth": (401, UNAUTHORIZED_BODY["errors"]),
            "throttle": (200, "THROTTLED"),
        },
    ),
}


def test_every_registered_mall_has_a_probe() -> None:
    assert set(PROBES) == set(SIMS)


@asynccontextmanager
async def _served(mall: str) -> AsyncIterator[tuple[SimMall, httpx.AsyncClient, str]]:
    spec = SIMS[mall]
    sim = spec.cls(shop_id=SHOP, clock=wall, seed=3, **{**spec.options, **PROBES[mall].sim_options})
    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(serve_sim, sim.app)
        async with httpx.AsyncClient(base_url=url) as http:
            yield sim, http, url
        nursery.cancel_scope.cancel()


# The faults each step switches on: everything from that step down the pipeline is on
# too, so the answer shows which check came first.
_LAYERS = ["maintenance", "server_error", "auth", "throttle"]


def _switch(sim: SimMall, first: str) -> None:
    on = _LAYERS[_LAYERS.index(first) :]
    sim.faults.maintenance = "maintenance" in on
    sim.faults.error_rate = 1.0 if "server_error" in on else 0.0
    sim.faults.expired_credential = "auth" in on
    sim.faults.throttle_rate = 1.0 if "throttle" in on else 0.0


@pytest.mark.parametrize("mall", sorted(PROBES))
async def test_guards_run_in_one_order_and_answer_in_the_malls_format(
    mall: str, autojump_clock: trio.testing.MockClock
) -> None:
    """route, then maintenance, then 5xx, then auth, then rate limit, for every mall."""
    probe = PROBES[mall]
    with trio.fail_after(60):
        async with _served(mall) as (sim, http, url):
            method, path, kwargs = await probe.call(sim, http, url)
            ok = await http.request(method, path, **kwargs)
            assert ok.status_code == 200, ok.text  # the probe is a good call
            seen: dict[str, tuple[int, str]] = {}
            _switch(sim, "maintenance")
            missing = await http.request(method, "/no/such/api", **kwargs)
            seen["route"] = (missing.status_code, probe.code(missing))
            for first in _LAYERS:
                _switch(sim, first)
                reply = await http.request(method, path, **kwargs)
                seen[first] = (reply.status_code, probe.code(reply))
    assert seen == probe.replies


@pytest.mark.parametrize("mall", sorted(PROBES))
async def test_the_malls_own_limit_refuses_after_auth_and_is_counted_apart(
    mall: str, autojump_clock: trio.testing.MockClock
) -> None:
    """A caller without a valid credential is refused for that even once the mall's
    own bucket is empty; the refusals of the bucket count in ``throttled_requests``,
    forced throttles in ``forced_throttles``."""
    probe = PROBES[mall]
    with trio.fail_after(60):
        async with _served(mall) as (sim, http, url):
            method, path, kwargs = await probe.call(sim, http, url)
            assert (await http.request(method, path, **kwargs)).status_code == 200
            (bucket,) = sim.buckets.values()  # the probed API's: the mall limits it
            bucket.tokens = -1e9  # spent for a long while
            sim.faults.expired_credential = True
            denied = await http.request(method, path, **kwargs)
            sim.faults.expired_credential = False
            limited = await http.request(method, path, **kwargs)
            sim.faults.throttle_rate = 1.0
            forced = await http.request(method, path, **kwargs)
    assert (denied.status_code, probe.code(denied)) == probe.replies["auth"]
    assert (limited.status_code, probe.code(limited)) == probe.replies["throttle"]
    assert (forced.status_code, probe.code(forced)) == probe.replies["throttle"]
    assert (sim.throttled_requests, sim.forced_throttles) == (1, 1)


# --------------------------------------------------------------------------------------
# Shopify's requested query cost, from the query text
# --------------------------------------------------------------------------------------


def test_query_cost_follows_shopifys_published_rules() -> None:
    # Worked by hand: object 1, scalar 0, connection 2 + first * one node's cost.
    nested = """query { products(first: 10) { edges { node { title
        variants(first: 5) { edges { node { price } } } } } } }"""
    # 2 + 10 * (1 product + (2 + 5 * (1 variant + 0)))
    assert query_cost(nested, {}) == 82
    # An object of scalars is 1; two top-level objects are 2.
    assert query_cost("query Q { shop { id name } location { id } }", {}) == 2
    # Sizes come from the variables the query is sent with.
    orders = """query GoqdOrders($first: Int!, $lineFirst: Int!) {
      orders(first: $first, sortKey: UPDATED_AT) {
        nodes { id name lineItems(first: $lineFirst) {
          nodes { id sku variant { id inventoryItem { id } } }
          pageInfo { hasNextPage endCursor } } }
        pageInfo { hasNextPage endCursor } } }"""
    # 2 + 25 * (1 order + (2 + 10 * (1 line + 1 variant + 1 inventory item)))
    assert query_cost(orders, {"first": 25, "lineFirst": 10}) == 2 + 25 * (1 + 2 + 10 * 3)
    # A list sized by its ids, each element an interface priced by its fragment.
    levels = """query L($ids: [ID!]!) { nodes(ids: $ids) { ... on InventoryItem { id
        inventoryLevel(locationId: "gid://shopify/Location/1") { id } } } }"""
    assert query_cost(levels, {"ids": ["a", "b", "c"]}) == 3 * (1 + 1)
    # A mutation is a flat 10 whatever it selects.
    assert query_cost("mutation M { a(input: {x: 1}) { b { c { d } } } }", {}) == 10
    assert MUTATION_COST == 10


async def test_the_shop_charges_the_cost_of_the_query_it_received(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A query that selects more costs more: the simulator prices what it is sent, so
    a client whose own cost formula is wrong sees another requestedQueryCost (or a
    refusal) instead of its own number echoed back."""
    base_lines = "nodes { id sku quantity currentQuantity variant { id inventoryItem { id } } }"
    query = """query GoqdOrders($first: Int!, $after: String, $query: String!, $lineFirst: Int!) {
      orders(first: $first, after: $after, query: $query, sortKey: UPDATED_AT) {
        nodes { id name updatedAt cancelledAt closed lineItems(first: $lineFirst) { LINES
          pageInfo { hasNextPage endCursor } } }
        pageInfo { hasNextPage endCursor } } }"""
    variables = {"first": 25, "query": "updated_at:>='2020-01-01T00:00:00Z'", "lineFirst": 10}
    with trio.fail_after(60):
        async with _served("shopify") as (sim, http, _):
            assert isinstance(sim, SimShopify)
            path = sim.path
            headers = {"x-shopify-access-token": sim.credentials()["access_token"]}

            async def send(lines: str) -> dict[str, Any]:
                body = {
                    "query": query.replace("LINES", lines),
                    "operationName": "GoqdOrders",
                    "variables": variables,
                }
                reply = await http.post(path, json=body, headers=headers)
                return dict(json.loads(reply.content))

            plain = await send(base_lines)
            richer = await send(
                base_lines.replace("inventoryItem { id }", "inventoryItem { id product { id } }")
            )
    assert plain["extensions"]["cost"]["requestedQueryCost"] == 827  # 2 + 25 * (3 + 10 * 3)
    # One more object per line: 2 + 25 * (3 + 10 * 4) = 1077, over the single query
    # limit, so refused before running.
    assert richer["errors"][0]["extensions"]["code"] == "MAX_COST_EXCEEDED"
    assert richer["errors"][0]["extensions"]["cost"] == 1077


# ----------------------------------------------------------------- documented limits


def test_each_simulator_states_its_malls_documented_limit() -> None:
    # What the benchmark holds goqd's request rate against: the mall's published figure,
    # stated by its simulator, not the looser plan a simulator may enforce for jitter.
    from goqd.tools.fleet import make_sims

    stores = [(f"s-{mall}", mall) for mall in sorted(SIMS)]
    sims = make_sims(stores, clock=lambda: 0.0, seeds=range(len(stores)))
    by_mall = {sim.mall: sim for sim in sims.values()}
    assert by_mall["amazon"].documented_limit("getOrders") == (0.0167, 20.0)
    assert by_mall["amazon"].documented_limit("lwa") is None  # another host's endpoint
    assert by_mall["rakuten"].documented_limit("inventories.bulk.get") == (5.0, 1.0)
    yahoo = by_mall["yahoo"]
    assert yahoo.documented_limit("/ShoppingWebService/V1/orderList") == (1.0, 1.0)
    assert yahoo.documented_limit("/yconnect/v2/token") is None
    assert by_mall["aupay"].documented_limit("stock") == (1.0, 2.0)  # assumed: unpublished
    assert by_mall["shopify"].documented_limit("GoqdOrders") is None  # cost, not count


def test_a_malls_own_order_delay_is_the_one_its_adapter_waits_for() -> None:
    # The benchmark adds this to Amazon's latency target; the adapter's lag is the same
    # fact seen from goqd's side.
    from goqd.malls.registry import MALLS

    for mall, spec in SIMS.items():
        lag = MALLS[mall].options.get("lag_s")
        assert spec.order_delay_s == (lag.default if lag is not None else 0.0), mall


def test_both_registries_read_the_one_list_of_malls() -> None:
    # The one line a new mall adds is its name in goqd/mallnames.py: the mall registry
    # then requires its adapter module, the simulator registry picks its simulator up
    # when it exists (the contract test names it while it does not).
    from goqd.mallnames import MALL_NAMES
    from goqd.malls.registry import MALLS

    assert list(MALLS) == list(MALL_NAMES) and set(SIMS) == set(MALL_NAMES)
    code = (
        "import goqd.mallnames as n\n"
        "n.MALL_NAMES += ('kaimono',)\n"
        "import goqd.sim.registry as s\n"
        "print(sorted(s.SIMS))\n"
        "try:\n"
        "    import goqd.malls.registry\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(exc.name)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    assert out == [repr(sorted(MALL_NAMES)), "goqd.malls.kaimono"]
