"""Canned answers for every mall's APIs, from the real-shaped bodies under
tests/fixtures/: a route per mall that answers an adapter's request, and ``MALLS``, each
mall's spec, credentials, listing keys and error answers on a virtual clock."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from goqd.malls import amazon, aupay, rakuten, shopify, yahoo
from goqd.malls.base import MallSpec, StoreContext
from goqd.secret import Secret
from tests.helpers.paths import FIXTURES

EPOCH = 1_790_000_000.0


BASE_URL = "https://mall.fuzz.invalid"


def fixture(path: str) -> bytes:
    return (FIXTURES / path).read_bytes()


@dataclass
class Canned:
    """What the mall would answer: status, body, and whether the body is JSON or XML."""

    body: bytes
    status: int = 200
    kind: str = "json"
    headers: dict[str, str] = field(default_factory=dict)
    # Other answers the same API gives (an error body, say), fuzzed as often.
    alternatives: tuple[Canned, ...] = ()


Route = Callable[[httpx.Request], Canned]


def _rakuten(request: httpx.Request) -> Canned:
    path = request.url.path
    if path == rakuten.SEARCH_ORDER_PATH:
        return Canned(fixture("rakuten/search_order_page1.json"))
    if path == rakuten.GET_ORDER_PATH:
        return Canned(fixture("rakuten/get_order_v7.json"))
    if path == rakuten.BULK_UPSERT_PATH:
        errors = Canned(fixture("rakuten/bulk_upsert_errors.json"), status=400)
        return Canned(b"", status=204, alternatives=(errors,))
    if path == rakuten.BULK_GET_PATH:
        return Canned(fixture("rakuten/bulk_get.json"))
    if path == rakuten.ITEM_SEARCH_PATH:
        first = request.url.params.get("cursorMark") == "*"
        return Canned(fixture(f"rakuten/items_search{'' if first else '_end'}.json"))
    return Canned(fixture("rakuten/expiry_date.json"))


def _yahoo(request: httpx.Request) -> Canned:
    api = request.url.path.rsplit("/", 1)[-1]
    if api == "token":
        return Canned(fixture("yahoo/token.json"))
    name = {
        "orderList": "orderList.xml",
        "orderInfo": "orderInfo_10000001.xml",
        "getStock": "getStock.xml",
        "setStock": "setStock.xml",
        "myItemList": "myItemList.xml",
        "stCategoryList": (
            "stCategoryList_empty.xml" if "page_key" in request.url.params else "stCategoryList.xml"
        ),
    }.get(api)
    if name is None:  # orderCount
        return Canned(b"<ResultSet><Result><Count>1</Count></Result></ResultSet>", kind="xml")
    return Canned(fixture(f"yahoo/{name}"), kind="xml")


def _aupay(request: httpx.Request) -> Canned:
    api = request.url.path.rsplit("/", 1)[-1]
    name = {
        aupay.API_ORDERS: "orders_page.xml",
        aupay.API_SEARCH_STOCKS: "search_stocks.xml",
        aupay.API_SEARCH_ITEMS: "search_items.xml",
        aupay.API_UPDATE_STOCK: "update_stock_partial.xml",
    }[api]
    return Canned(fixture(f"aupay/{name}"), kind="xml")


def _amazon(request: httpx.Request) -> Canned:
    path = request.url.path
    if path == amazon.LWA_PATH:
        return Canned(fixture("amazon/lwa_token.json"))
    if path == amazon.ORDERS_PATH:
        page = 2 if "NextToken" in request.url.params else 1
        return Canned(fixture(f"amazon/get_orders_page{page}.json"))
    if path.endswith("/orderItems"):
        return Canned(fixture("amazon/get_order_items.json"))
    if request.method == "PATCH":
        invalid = Canned(fixture("amazon/patch_invalid.json"))
        return Canned(fixture("amazon/patch_accepted.json"), alternatives=(invalid,))
    if path.count("/") == 4:  # /listings/2021-08-01/items/{seller}: search
        return Canned(fixture("amazon/search_listings_items.json"))
    return Canned(fixture("amazon/get_listings_item.json"))


_SHOPIFY_COST = {
    "cost": {
        "requestedQueryCost": 10,
        "actualQueryCost": 10,
        "throttleStatus": {
            "maximumAvailable": 1000.0,
            "currentlyAvailable": 990.0,
            "restoreRate": 100.0,
        },
    }
}


_LEVEL = {
    "id": "gid://shopify/InventoryItem/46714324353335",
    "tracked": True,
    "inventoryLevel": {"quantities": [{"name": "available", "quantity": 5}]},
}


_SHOPIFY = {
    "GoqdPing": {
        "data": {
            "shop": {"id": "gid://shopify/Shop/1", "name": "fuzz"},
            "location": {"id": "gid://shopify/Location/1"},
        }
    },
    "GoqdOrderLineItems": {
        "data": {
            "order": {
                "id": "gid://shopify/Order/5960843001911",
                "lineItems": {
                    "nodes": [],
                    "pageInfo": {"hasNextPage": False, "endCursor": None},
                },
            }
        }
    },
    "GoqdInventoryLevels": {"data": {"nodes": [_LEVEL, None, {}]}},
    "GoqdVariants": {
        "data": {
            "productVariants": {
                "nodes": [
                    {
                        "id": "gid://shopify/ProductVariant/1",
                        "sku": "MUG-01",
                        "barcode": None,
                        "displayName": "Mug",
                        "inventoryItem": _LEVEL,
                    }
                ],
                "pageInfo": {"hasNextPage": False, "endCursor": None},
            }
        }
    },
}


def _shopify(request: httpx.Request) -> Canned:
    operation = json.loads(request.content)["operationName"]
    if operation == "GoqdOrders":
        return Canned(fixture("shopify/orders_page.json"))
    if operation == "GoqdSetQuantities":
        stale = Canned(fixture("shopify/set_quantities_stale.json"))
        return Canned(fixture("shopify/set_quantities_ok.json"), alternatives=(stale,))
    return Canned(json.dumps({**_SHOPIFY[operation], "extensions": _SHOPIFY_COST}).encode())


def _yahoo_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode()


@dataclass(frozen=True)
class Mall:
    spec: MallSpec
    route: Route
    credentials: Mapping[str, str]
    keys: tuple[str, ...]  # listing keys to read and push
    # Error answers any of the mall's APIs may give.
    errors: tuple[Canned, ...] = ()
    urls: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def context(self, http: httpx.AsyncClient, **extra: Any) -> StoreContext:
        """A store of this mall on ``http`` and the virtual clock."""
        return StoreContext(
            store="fuzz",
            mall=self.spec.name,
            base_url=BASE_URL,
            credentials={k: Secret(v) for k, v in self.credentials.items()},
            http=http,
            clock=lambda: EPOCH + trio.current_time(),
            urls=dict(self.urls),
            **extra,
        )


MALLS: dict[str, Mall] = {
    "rakuten": Mall(
        rakuten.SPEC,
        _rakuten,
        {"service_secret": "SP123456_fuzz", "license_key": "SL123456_fuzz"},
        ("tshirt/red-s", "tshirt/blue-m", "bad-key"),
        errors=(
            Canned(fixture("rakuten/gateway_401_ga0001.json"), status=401),
            Canned(fixture("rakuten/gateway_es04_01.json")),
            Canned(fixture("rakuten/search_order_error_011.json"), status=400),
            Canned(b'{"Results":{"errorCode":"GA0002","message":"throttled"}}', status=429),
        ),
    ),
    "yahoo": Mall(
        yahoo.SPEC,
        _yahoo,
        {
            "client_id": "cid-fuzz",
            "client_secret": "csecret-fuzz",
            "refresh_token": "rt-fuzz-token",
            "seller_id": "mystore",
            "public_key_pem": _yahoo_pem(),
            "public_key_version": "1",
            "refresh_token_issued_at": "2026-09-01",
        },
        ("tshirt-01:tshirt-01-red-m", "mug-02", "gone-99"),
        errors=(
            Canned(fixture("yahoo/error_param.xml"), status=400, kind="xml"),
            Canned(fixture("yahoo/token_invalid_grant.json"), status=400),
        ),
    ),
    "aupay": Mall(
        aupay.SPEC,
        _aupay,
        {"api_key": "aupay-fuzz-key", "shop_id": "12345678", "issued_at": "2026-09-01"},
        ("TOWEL-01", "ITEM002/red-s", "GONE-99"),
        errors=(Canned(fixture("aupay/error_auth.xml"), kind="xml"),),
    ),
    "amazon": Mall(
        amazon.SPEC,
        _amazon,
        {
            "client_id": "amzn1.application-oa2-client.fuzz",
            "client_secret": "amzn1.oa2-cs.v1.fuzz",
            "refresh_token": "Atzr|fuzz",
            "seller_id": "A2FUZZSELLER",
            "authorized_at": "2026-01-15",
        },
        ("TSHIRT-RED-M", "MUG,01", "NOPE"),
        errors=(
            Canned(fixture("amazon/error_quota_exceeded.json"), status=429),
            Canned(fixture("amazon/error_invalid_input.json"), status=400),
            Canned(fixture("amazon/error_unauthorized.json"), status=403),
            Canned(fixture("amazon/lwa_invalid_grant.json"), status=400),
        ),
        urls={"lwa": BASE_URL},
    ),
    "shopify": Mall(
        shopify.SPEC,
        _shopify,
        {"access_token": "shpat_fuzz_token", "webhook_secret": "whsec-fuzz", "expires_at": ""},
        ("gid://shopify/InventoryItem/46714324353335", "gid://shopify/InventoryItem/1", "x"),
        errors=(
            Canned(fixture("shopify/throttled.json")),
            Canned(fixture("shopify/access_denied.json")),
            Canned(fixture("shopify/unauthorized.json"), status=401),
        ),
    ),
}
