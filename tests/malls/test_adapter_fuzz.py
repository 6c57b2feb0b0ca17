"""Fuzz every mall adapter's response parsing (Hypothesis, over ``httpx.MockTransport``).

Each example opens one adapter of one mall on a fresh virtual clock and runs one of its
calls (fetch_orders, read_stock, push_stock, iter_listings, credential_expiry,
check_credentials). Every request the adapter makes is answered with the real-shaped
fixture body for that API, as is or mutated: fields dropped, types changed, huge and
negative numbers, deep nesting, elements duplicated or renamed, truncated or foreign
bodies (HTML, bytes, an XML entity bomb), random status codes and headers (Retry-After
among them, content types, a lying Content-Length, a broken Content-Encoding).

The property: the call returns goqd's types or raises a ``goqd.errors.MallError``,
never anything else, and never hangs (a fail_after of one virtual hour: rate buckets
and a capped Retry-After need minutes at most). The adapters are the mall modules' own,
not the registry's guarded ones: the guard is a second line, this tests the first.

``GOQD_FUZZ_EXAMPLES`` (default 200) sets the examples per mall and call;
``GOQD_FUZZ_RANDOM=1`` explores new examples instead of the same derandomized ones.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from goqd.errors import MallError, MallProtocolError, MallRateLimited, MallUnavailable
from goqd.malls import amazon
from goqd.malls.base import RETRY_AFTER_CAP_S, OrderPage
from goqd.messages import ListingAttrs, MallListing, OrderLine, PushItem, PushOutcome
from tests.helpers.canned import (
    MALLS,
    Canned,
    Mall,
    fixture,
)
from tests.helpers.fuzz import fuzz_settings

REQUEST_BUDGET = 40  # per example; then the "network" fails, which ends any paging loop

FUZZ = fuzz_settings(200)


# --------------------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------------------

JUNK_TEXT = [
    "",
    " ",
    "-1",
    "0",
    "1e400",
    "NaN",
    "9" * 40,
    "２０２６-０９-２１",
    "2026-02-30T00:00:00+09:00",
    "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+14:00",
    "99991231235959",
    "\x00",
    "\ud7ff\ue000",
    "<b>",
    "a,b,c",
    "gid://shopify/InventoryItem/",
    "x" * 3000,
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30]),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(JUNK_TEXT),
    st.text(max_size=12),
)
STATUSES = [200, 200, 200, 201, 204, 301, 400, 401, 403, 404, 409, 413, 423, 429, 500, 502, 503]
RETRY_AFTER = [
    "inf",
    "-inf",
    "nan",
    "-5",
    "1e9",
    "0",
    "2.5",
    "99999999999999999999",
    "Fri, 31 Dec 9999 23:59:59 GMT",
    "Mon, 01 Jan 0001 00:00:00 +2359",
    "Tue, 22 Sep 2026 00:00:00 GMT",
    "soon",
]
CONTENT_TYPES = ["application/json", "application/xml", "text/html", "text/plain", ""]
BOMB = (
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa">'
    b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><ResultSet>&b;</ResultSet>'
)


def _json_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(value, dict):
        for key, child in value.items():
            out += _json_paths(child, (*path, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            out += _json_paths(child, (*path, i))
    return out


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        value = value[part]
    return value


def mutate_json(data: st.DataObject, doc: Any) -> bytes:
    """Up to four structural mutations at places Hypothesis picks, encoded.

    Deep nesting is spliced into the encoded text (``_DEEP`` tokens): built as Python
    lists it would exhaust the encoder's own recursion first.
    """
    root = {"": copy.deepcopy(doc)}
    deep: list[tuple[str, int, Any]] = []
    raw: dict[str, str] = {}
    for _ in range(data.draw(st.integers(1, 4))):
        paths = _json_paths(root[""], ("",))
        path = data.draw(st.sampled_from(paths))
        parent, key = (_get(root, path[:-1]), path[-1])
        value = parent[key]
        action = data.draw(
            st.sampled_from(
                ["drop", "scalar", "wrap_list", "wrap_dict", "deep", "dup", "empty", "number"]
            )
        )
        if action == "drop" and len(path) > 1:
            if isinstance(parent, dict):
                del parent[key]
            else:
                parent.pop(key)
        elif action == "scalar":
            parent[key] = data.draw(SCALARS)
        elif action == "wrap_list":
            parent[key] = [value]
        elif action == "wrap_dict":
            parent[key] = {"value": value}
        elif action == "deep":
            token = f"_DEEP{len(deep)}_"
            deep.append((token, data.draw(st.sampled_from([50, 2000, 20_000])), value))
            parent[key] = token
        elif action == "dup" and isinstance(value, list) and value:
            parent[key] = value * data.draw(st.integers(2, 30))
        elif action == "empty":
            parent[key] = type(value)() if isinstance(value, dict | list | str) else None
        elif action == "number":
            # Raw number tokens too: "1e400" is valid JSON and decodes to infinity.
            number = data.draw(
                st.sampled_from(["-1", "-1000000", "9223372036854775808", "1e400", "-1e400"])
                | st.sampled_from(["1e-400", "1e-300", "0.0", "1.5", "-0.0", "1" + "0" * 400])
            )
            token = f"_NUM{len(raw)}_"
            raw[token] = number
            parent[key] = token
    ascii_only = data.draw(st.booleans())
    text = json.dumps(root[""], ensure_ascii=ascii_only)
    for token, levels, inner in reversed(deep):  # a later one may hold an earlier one
        nested = "[" * levels + json.dumps(inner, ensure_ascii=ascii_only) + "]" * levels
        text = text.replace(json.dumps(token), nested)
    for token, number in raw.items():
        text = text.replace(json.dumps(token), number)
    return text.encode("utf-8", "surrogatepass")


def mutate_xml(data: st.DataObject, body: bytes) -> bytes:
    root = ET.fromstring(body)
    deep: dict[str, int] = {}
    for _ in range(data.draw(st.integers(1, 4))):
        elements = list(root.iter())
        parents = {child: parent for parent in elements for child in parent}
        elem = data.draw(st.sampled_from(elements))
        action = data.draw(
            st.sampled_from(["drop", "text", "dup", "rename", "deep", "attr", "clear"])
        )
        parent = parents.get(elem)
        if action == "drop" and parent is not None:
            parent.remove(elem)
        elif action == "text":
            elem.text = data.draw(st.sampled_from(JUNK_TEXT).filter(_xml_text_ok))
        elif action == "dup" and parent is not None:
            for _ in range(data.draw(st.integers(1, 20))):
                parent.append(copy.deepcopy(elem))
        elif action == "rename":
            elem.tag = data.draw(st.sampled_from(["Result", "response", "Error", "x", "Search"]))
        elif action == "deep":
            # Spliced in after serializing: ElementTree's writer recurses too.
            token = f"_DEEP{len(deep)}_"
            deep[token] = data.draw(st.sampled_from([50, 3000]))
            ET.SubElement(elem, "Result").text = token
        elif action == "attr":
            elem.set(
                data.draw(st.sampled_from(["totalResultsAvailable", "Status", "x"])),
                data.draw(st.sampled_from(JUNK_TEXT[:10])),
            )
        elif action == "clear":
            elem.clear()
    text = ET.tostring(root, encoding="unicode")
    for token, levels in deep.items():
        text = text.replace(token, "<Result>" * levels + "1" + "</Result>" * levels)
    return ('<?xml version="1.0" encoding="UTF-8"?>\n' + text).encode()


def _xml_text_ok(text: str) -> bool:
    return "\x00" not in text and "\ud7ff" not in text


def fuzz_response(
    data: st.DataObject, canned: Canned, errors: tuple[Canned, ...] = ()
) -> httpx.Response:
    canned = data.draw(st.sampled_from((canned, *canned.alternatives, *errors)))
    mode = data.draw(st.sampled_from(["as_is", "as_is", "mutate", "mutate", "mutate", "raw"]))
    body = canned.body
    if mode == "mutate" and body.strip():
        if canned.kind == "json":
            body = mutate_json(data, json.loads(body))
        else:
            body = mutate_xml(data, body)
    elif mode == "raw":
        body = data.draw(
            st.sampled_from(
                [
                    b"",
                    b"<html><body>maintenance</body></html>",
                    body[: len(body) // 2],
                    b"\xff\xfe\x00garbage",
                    b"null",
                    b"[]",
                    b'"text"',
                    b"[" * 100_000,
                    BOMB,
                    body.decode("utf-8", "replace").encode("utf-16"),
                ]
            )
            | st.binary(max_size=64)
        )
    status = canned.status
    if data.draw(st.integers(0, 3)) == 0:
        status = data.draw(st.sampled_from(STATUSES) | st.integers(100, 599))
    headers = dict(canned.headers)
    for _ in range(data.draw(st.integers(0, 2))):
        name = data.draw(st.sampled_from(["retry-after", "content-type", "content-length", "x"]))
        if name == "retry-after":
            headers[name] = data.draw(st.sampled_from(RETRY_AFTER) | st.text(max_size=20))
        elif name == "content-type":
            headers[name] = data.draw(st.sampled_from(CONTENT_TYPES))
        elif name == "content-length":
            headers[name] = data.draw(st.sampled_from(["99999999999", "abc", "-1"]))
        else:
            headers["www-authenticate"] = 'Bearer error="invalid_token"'
    headers = {k: v for k, v in headers.items() if _header_ok(v)}
    return httpx.Response(status, content=body, headers=headers)


def _header_ok(value: str) -> bool:
    # What httpx can put on the wire: printable ASCII.
    return value.isascii() and value.isprintable()


# --------------------------------------------------------------------------------------
# The malls: credentials, options and what each API answers
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# The calls and what they may return
# --------------------------------------------------------------------------------------


def _items(mall: Mall) -> list[PushItem]:
    return [
        PushItem(
            listing_key=key,
            sku=f"SKU{i}",
            quantity=[3, 0, 7][i % 3],
            version=i + 1,
            previous_quantity=5 if i == 0 else None,
            attrs=ListingAttrs(allow_overdraft=i == 1),
        )
        for i, key in enumerate(mall.keys)
    ]


async def _fetch_orders(adapter: Any, mall: Mall) -> None:
    cursor = None
    for _ in range(2):  # a first poll, then the next one from its cursor
        page = await adapter.fetch_orders(cursor)
        assert isinstance(page, OrderPage) and isinstance(page.cursor, str)
        assert all(isinstance(line, OrderLine) for line in page.lines)
        cursor = page.cursor


async def _read_stock(adapter: Any, mall: Mall) -> None:
    counts = await adapter.read_stock(list(mall.keys))
    assert isinstance(counts, dict)
    assert all(isinstance(k, str) and (v is None or type(v) is int) for k, v in counts.items())


async def _push_stock(adapter: Any, mall: Mall) -> None:
    items = _items(mall)
    outcomes = await adapter.push_stock(items)
    assert isinstance(outcomes, list) and len(outcomes) == len(items)
    assert all(isinstance(o, PushOutcome) for o in outcomes)


async def _iter_listings(adapter: Any, mall: Mall) -> None:
    async for listing in adapter.iter_listings():
        assert isinstance(listing, MallListing)
        assert listing.quantity is None or type(listing.quantity) is int


async def _credentials(adapter: Any, mall: Mall) -> None:
    await adapter.check_credentials()
    expiry = await adapter.credential_expiry()
    assert expiry is None or (isinstance(expiry, float | int) and math.isfinite(expiry))


CALLS: dict[str, Callable[[Any, Mall], Awaitable[None]]] = {
    "fetch_orders": _fetch_orders,
    "read_stock": _read_stock,
    "push_stock": _push_stock,
    "iter_listings": _iter_listings,
    "credentials": _credentials,
}


def run_call(data: st.DataObject, mall: Mall, call: str) -> None:
    """One example: the adapter against the fuzzed mall, on a fresh virtual clock; then
    the same call once more against the mall answering normally, which must end too
    (nothing the fuzzed answers did, a poisoned rate bucket say, may stall the store)."""
    spent = 0
    fuzzing = True

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal spent
        spent += 1
        if spent > REQUEST_BUDGET:
            raise httpx.ConnectError("fuzz: request budget spent", request=request)
        canned = mall.route(request)
        if not fuzzing:
            return httpx.Response(canned.status, content=canned.body, headers=canned.headers)
        return fuzz_response(data, canned, mall.errors)

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            ctx = mall.context(
                http,
                options=dict(mall.options),
                live_statuses=mall.spec.default_live_statuses,
                cancel_statuses=mall.spec.default_cancel_statuses,
            )
            # The module's own factory, not the registry's guarded one.
            adapter = mall.spec.open_adapter(ctx)
            with trio.fail_after(3600):
                try:
                    await CALLS[call](adapter, mall)
                except MallRateLimited as exc:
                    # The store waits this long: it must be a real, bounded wait.
                    assert exc.retry_after is None or 0 <= exc.retry_after <= RETRY_AFTER_CAP_S
                except MallError:
                    pass  # a clear refusal is the other allowed outcome
            nonlocal fuzzing, spent
            fuzzing, spent = False, 0
            with trio.fail_after(3600):
                with contextlib.suppress(MallError):
                    await CALLS[call](adapter, mall)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("mall", list(MALLS))
def test_adapter_returns_goqd_types_or_raises_mall_error(mall: str, call: str) -> None:
    @FUZZ
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        run_call(data, MALLS[mall], call)

    fuzz()


@pytest.mark.parametrize("mall", list(MALLS))
def test_unmutated_fixtures_are_answered_with_goqd_types(mall: str) -> None:
    """The harness itself: with every response as the mall documents it, every call
    succeeds (so the fuzz above starts from bodies the adapters really parse)."""

    spent = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal spent
        spent += 1
        canned = MALLS[mall].route(request)
        return httpx.Response(canned.status, content=canned.body, headers=canned.headers)

    async def main() -> None:
        m = MALLS[mall]
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            for call in CALLS:
                ctx = m.context(
                    http,
                    live_statuses=m.spec.default_live_statuses,
                    cancel_statuses=m.spec.default_cancel_statuses,
                )
                with trio.fail_after(3600):
                    await CALLS[call](m.spec.open_adapter(ctx), m)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert spent > 0


# --------------------------------------------------------------------------------------
# What the fuzz found, kept as plain examples
# --------------------------------------------------------------------------------------


def _run_with(mall: str, answer: Callable[[httpx.Request, Canned], httpx.Response | None]) -> Any:
    """Open ``mall``'s adapter against its canned answers, ``answer`` overriding some;
    return a runner for one call on the virtual clock."""
    m = MALLS[mall]

    def handler(request: httpx.Request) -> httpx.Response:
        canned = m.route(request)
        special = answer(request, canned)
        if special is not None:
            return special
        return httpx.Response(canned.status, content=canned.body, headers=canned.headers)

    def run(body: Callable[[Any], Awaitable[None]]) -> None:
        async def main() -> None:
            async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
                with trio.fail_after(3600):
                    await body(m.spec.open_adapter(m.context(http)))

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    return run


@pytest.mark.parametrize("mall", ["yahoo", "aupay"])
def test_xml_nested_thousands_deep_is_a_protocol_error(mall: str) -> None:
    # Converting the tree to dicts recursed once per level: RecursionError.
    def deep(request: httpx.Request, canned: Canned) -> httpx.Response | None:
        if canned.kind != "xml":
            return None
        root = "ResultSet" if mall == "yahoo" else "response"
        body = f"<{root}>" + "<Result>" * 5000 + "1" + "</Result>" * 5000 + f"</{root}>"
        return httpx.Response(200, content=body.encode())

    async def body(adapter: Any) -> None:
        with pytest.raises(MallProtocolError):
            await adapter.read_stock(list(MALLS[mall].keys))

    _run_with(mall, deep)(body)


@pytest.mark.parametrize("mall", ["rakuten", "amazon", "shopify"])
def test_json_nested_thousands_deep_is_a_protocol_error(mall: str) -> None:
    # Skipping a field nobody asked for, msgspec (and json) recurse once per level and
    # raise RecursionError, not a DecodeError.
    def deep(request: httpx.Request, canned: Canned) -> httpx.Response | None:
        if request.url.path == amazon.LWA_PATH:
            return None
        return httpx.Response(400, content=b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}")

    async def body(adapter: Any) -> None:
        with pytest.raises(MallError):
            await adapter.read_stock(list(MALLS[mall].keys))

    _run_with(mall, deep)(body)


@pytest.mark.parametrize("mall", ["amazon", "yahoo"])
def test_an_access_token_that_cannot_be_a_header_is_a_protocol_error(mall: str) -> None:
    # It went into every later request's header: UnicodeEncodeError at each call.
    def token(request: httpx.Request, canned: Canned) -> httpx.Response | None:
        if request.url.path in (amazon.LWA_PATH, "/yconnect/v2/token"):
            return httpx.Response(200, json={"access_token": "\x80tok\u00e9n", "expires_in": 3600})
        return None

    async def body(adapter: Any) -> None:
        with pytest.raises(MallProtocolError, match="usable token"):
            await adapter.read_stock(list(MALLS[mall].keys))

    _run_with(mall, token)(body)


def test_a_shopify_throttle_status_no_plan_has_never_stalls_the_next_call() -> None:
    # A restore rate of 1e-300 points/s made the computed wait, and the local cost
    # bucket's next wait, about 1e300 seconds.
    answers = 0

    def throttle(request: httpx.Request, canned: Canned) -> httpx.Response | None:
        nonlocal answers
        answers += 1
        if answers > 1:
            return None
        status = {"maximumAvailable": 1e-300, "currentlyAvailable": -1e300, "restoreRate": 1e-300}
        doc = json.loads(fixture("shopify/throttled.json"))
        doc["extensions"]["cost"]["throttleStatus"] = status
        return httpx.Response(200, json=doc)

    async def body(adapter: Any) -> None:
        with pytest.raises(MallRateLimited) as info:
            await adapter.read_stock(list(MALLS["shopify"].keys))
        assert info.value.retry_after is not None
        assert info.value.retry_after <= RETRY_AFTER_CAP_S
        with trio.fail_after(RETRY_AFTER_CAP_S + 60):
            assert await adapter.read_stock(list(MALLS["shopify"].keys))

    _run_with("shopify", throttle)(body)


@pytest.mark.parametrize("mall", list(MALLS))
def test_a_body_its_content_encoding_cannot_decode_is_a_protocol_error(mall: str) -> None:
    # httpx raises DecodingError while reading such a body. Three adapters called it a
    # protocol error and two (au PAY, Shopify) "unavailable", which sent an operator
    # looking for an outage while the mall was answering: one mapping, in the client core.
    def garbled(request: httpx.Request, canned: Canned) -> httpx.Response | None:
        if request.url.path in (amazon.LWA_PATH, "/yconnect/v2/token"):
            return None
        return httpx.Response(
            200, content=b"\x00not gzip at all", headers={"Content-Encoding": "gzip"}
        )

    async def body(adapter: Any) -> None:
        with pytest.raises(MallProtocolError, match="undecodable response body") as info:
            await adapter.read_stock(list(MALLS[mall].keys))
        assert not isinstance(info.value, MallUnavailable)
        assert (info.value.mall, info.value.store) == (mall, "fuzz")

    _run_with(mall, garbled)(body)
