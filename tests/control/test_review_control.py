"""The operator requests decoded straight into ledger messages keep the control socket's
limits, and what a request id stored by an earlier goqd answers.

* Every limit the control socket put on these requests before they became ledger
  messages (lengths, ranges, counts, the rules between fields) still refuses a
  hostile value with ``bad_request`` before anything reaches the ledger, and the
  largest value each allows still decodes: a loosened or a tightened cap fails here.
* The fields the socket takes for each of them are pinned: a field added to a ledger
  message becomes something any peer of the socket may send, so it must be added here
  on purpose.
* A request applied by the goqd before the tags changed, retried with the same id
  after the upgrade, must get its stored reply, not "already used for a different
  request" (whose advice, a new id, applies a ``stock adjust`` twice).
"""

from __future__ import annotations

import json
import os
import stat
import typing
from pathlib import Path
from typing import Any

import msgspec
import pytest

from goqd import limits
from goqd import messages as m
from goqd.control import protocol as p
from goqd.errors import LedgerError
from goqd.ledger import open_db
from goqd.ledger.db import Ledger
from goqd.tools.fleet import write_credentials

INT64_MAX = 2**63 - 1


def _decode(request: dict[str, Any]) -> p.Envelope:
    body = json.dumps({"v": 1, "id": "rid-1", "request": request}).encode()
    return p.decode_request(body)


def _refused(request: dict[str, Any]) -> str:
    with pytest.raises(p.BadEnvelope) as exc:
        _decode(request)
    assert exc.value.err.code == "bad_request"
    return exc.value.err.message


LISTING = {"store": "s", "listing_key": "k"}

# One hostile value per limit the deleted protocol classes had (and the two fields the
# ledger messages add to the socket), each next to the largest value it lets through.
LIMITS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # (what, refused, accepted)
    (
        "sku empty",
        {"type": "stock_set", "sku": "", "quantity": 1},
        {"type": "stock_set", "sku": "x" * limits.MAX_SKU, "quantity": 1},
    ),
    (
        "quantity over the cap",
        {"type": "stock_set", "sku": "A", "quantity": limits.MAX_QUANTITY + 1},
        {"type": "stock_set", "sku": "A", "quantity": limits.MAX_QUANTITY},
    ),
    (
        "quantity negative",
        {"type": "stock_set", "sku": "A", "quantity": -1},
        {"type": "stock_set", "sku": "A", "quantity": 0},
    ),
    (
        "reason too long",
        {"type": "stock_set", "sku": "A", "quantity": 1, "reason": "x" * 1001},
        {"type": "stock_set", "sku": "A", "quantity": 1, "reason": "x" * 1000},
    ),
    (
        "request_id too long",
        {"type": "stock_set", "sku": "A", "quantity": 1, "request_id": "x" * 129},
        {"type": "stock_set", "sku": "A", "quantity": 1, "request_id": "x" * 128},
    ),
    (
        "delta over the cap",
        {"type": "stock_adjust", "sku": "A", "delta": limits.MAX_DELTA + 1},
        {"type": "stock_adjust", "sku": "A", "delta": limits.MAX_DELTA},
    ),
    (
        "delta under the cap",
        {"type": "stock_adjust", "sku": "A", "delta": -limits.MAX_DELTA - 1},
        {"type": "stock_adjust", "sku": "A", "delta": -limits.MAX_DELTA},
    ),
    (
        "history limit",
        {"type": "history", "sku": "A", "limit": 10_001},
        {"type": "history", "sku": "A", "limit": 10_000},
    ),
    (
        "history limit negative",
        {"type": "history", "sku": "A", "limit": -1},
        {"type": "history", "sku": "A", "limit": 0},
    ),
    (
        "errors level",
        {"type": "errors", "level": 10},
        {"type": "errors", "level": 9},
    ),
    (
        "errors level zero",
        {"type": "errors", "level": 0},
        {"type": "errors", "level": 1},
    ),
    (
        "errors code",
        {"type": "errors", "code": "x" * 101},
        {"type": "errors", "code": "x" * 100},
    ),
    (
        "errors after beyond int64",
        {"type": "errors", "after": INT64_MAX + 1},
        {"type": "errors", "after": INT64_MAX},
    ),
    (
        "errors store",
        {"type": "errors", "store": "x" * (limits.MAX_STORE_NAME + 1)},
        {"type": "errors", "store": "x" * limits.MAX_STORE_NAME},
    ),
    (
        "errors page limit",
        {"type": "errors", "limit": 0},
        {"type": "errors", "limit": 1},
    ),
    (
        "parked cursor",
        {"type": "parked", "after": ["s", "x" * 513, ""]},
        {"type": "parked", "after": ["s", "x" * 512, "x" * 512]},
    ),
    (
        "parked cursor shape",
        {"type": "parked", "after": ["s", "o", "l", "extra"]},
        {"type": "parked", "after": ["s", "o", "l"]},
    ),
    (
        "errors_clear needs ids or a store",
        {"type": "errors_clear"},
        {"type": "errors_clear", "store": "s"},
    ),
    (
        "errors_clear id beyond int64",
        {"type": "errors_clear", "ids": [INT64_MAX + 1]},
        {"type": "errors_clear", "ids": [INT64_MAX]},
    ),
    (
        "errors_clear id zero",
        {"type": "errors_clear", "ids": [0]},
        {"type": "errors_clear", "ids": [1]},
    ),
    (
        "errors_clear ids count",
        {"type": "errors_clear", "ids": list(range(1, 10_002))},
        {"type": "errors_clear", "ids": list(range(1, 10_001))},
    ),
    (
        "errors_clear level",
        {"type": "errors_clear", "store": "s", "level": 10},
        {"type": "errors_clear", "store": "s", "level": 9},
    ),
    (
        "products cursor",
        {"type": "products", "after": "x" * 513},
        {"type": "products", "after": "x" * 512},
    ),
    (
        "products limit",
        {"type": "products", "limit": 10_001},
        {"type": "products", "limit": 10_000},
    ),
    (
        "listings store",
        {"type": "listings", "store": ""},
        {"type": "listings", "store": "s"},
    ),
    (
        "listings state",
        {"type": "listings", "store": "s", "state": "gone"},
        {"type": "listings", "store": "s", "state": "parked"},
    ),
    (
        "listings search",
        {"type": "listings", "store": "s", "search": "x" * (m.MAX_SEARCH + 1)},
        {"type": "listings", "store": "s", "search": "x" * m.MAX_SEARCH},
    ),
    (
        "listings keys count",
        {"type": "listings", "store": "s", "keys": ["k"] * 10_001},
        {"type": "listings", "store": "s", "keys": ["k"] * 10_000},
    ),
    (
        "listing key too long",
        {
            "type": "link_listing",
            "store": "s",
            "listing_key": "x" * (limits.MAX_LISTING_KEY + 1),
            "sku": "A",
        },
        {
            "type": "link_listing",
            "store": "s",
            "listing_key": "x" * limits.MAX_LISTING_KEY,
            "sku": "A",
        },
    ),
    (
        "link sku empty",
        {"type": "link_listing", **LISTING, "sku": ""},
        {"type": "link_listing", **LISTING, "sku": "A"},
    ),
    (
        "unlink listing key empty",
        {"type": "unlink_listing", "store": "s", "listing_key": ""},
        {"type": "unlink_listing", **LISTING},
    ),
    (
        "lead time over the cap",
        {"type": "listing_set", **LISTING, "lead_time_days": limits.MAX_LEAD_TIME_DAYS + 1},
        {"type": "listing_set", **LISTING, "lead_time_days": limits.MAX_LEAD_TIME_DAYS},
    ),
    (
        "restock date not a calendar date",
        {"type": "listing_set", **LISTING, "restock_date": "2026-02-30"},
        {"type": "listing_set", **LISTING, "restock_date": "2028-02-29"},
    ),
    (
        "restock date shape",
        {"type": "listing_set", **LISTING, "restock_date": "2026/03/01"},
        {"type": "listing_set", **LISTING, "restock_date": "2026-03-01"},
    ),
    (
        "delete sku empty",
        {"type": "delete_product", "sku": ""},
        {"type": "delete_product", "sku": "A"},
    ),
]


@pytest.mark.parametrize(
    ("refused", "accepted"), [c[1:] for c in LIMITS], ids=[c[0] for c in LIMITS]
)
def test_every_limit_of_the_old_protocol_still_refuses_and_its_edge_still_passes(
    refused: dict[str, Any], accepted: dict[str, Any]
) -> None:
    _refused(refused)
    assert _decode(accepted).request is not None


# The fields the control socket takes for each ledger request goqctl sends as it is:
# what the deleted protocol classes took, plus ``level`` on errors_clear (clearing one
# level of a store's errors is a subset of clearing them all) and ``keys`` on listings
# (a capped read). A new field here is new input from every peer of the socket.
SOCKET_FIELDS = {
    "errors": {"store", "include_cleared", "level", "code", "after", "limit"},
    "parked": {"store", "after", "limit"},
    "errors_clear": {"ids", "store", "level", "request_id"},
    "products": {"after", "limit"},
    "listings": {"store", "after", "limit", "state", "search", "keys"},
    "link_listing": {"store", "listing_key", "sku", "request_id"},
    "unlink_listing": {"store", "listing_key", "request_id"},
    "stock_set": {"sku", "quantity", "reason", "request_id"},
    "stock_adjust": {"sku", "delta", "reason", "request_id"},
    "history": {"sku", "limit"},
    "listing_set": {
        "store",
        "listing_key",
        "lead_time_days",
        "restock_date",
        "allow_overdraft",
        "request_id",
    },
    "delete_product": {"sku", "request_id"},
}


def test_the_fields_each_ledger_request_takes_from_the_socket_are_the_ones_listed() -> None:
    taken = {
        cls.__struct_config__.tag: set(cls.__struct_fields__)
        for cls in typing.get_args(m.OperatorLedgerRequest)
    }
    assert taken == SOCKET_FIELDS
    for tag in SOCKET_FIELDS:
        assert "oops" in _refused({"type": tag, "oops": 1})


# ---------------------------------------------------------------- across an upgrade

# ``request_digest`` of each request as the goqd before the ledger messages took the
# control socket's tags stored it (tags ``adjust_stock``, ``set_stock``,
# ``clear_errors``; every field encoded, defaults included).
DIGESTS_BEFORE = [
    (
        m.AdjustStock(sku="A", delta=2),
        "165b6742ebe5b580f10c6a9b31fa534a1bb1faca36ade93aa11a12e16a6f8bf0",
    ),
    (
        m.SetStock(sku="A", quantity=4, reason="棚卸"),
        "882687a30441c20f21e8d10e05b9e046e735113cdc72c0ad87b4f0d1cff4e3eb",
    ),
    (m.ClearErrors(store="r1"), "027d6b49769ac7ae90c7b41995397c426e723882e0154d33ef69697d3f6bdc3a"),
]


@pytest.mark.parametrize(
    ("request_", "before"), DIGESTS_BEFORE, ids=[type(r).__name__ for r, _ in DIGESTS_BEFORE]
)
def test_a_request_applied_before_the_upgrade_is_answered_not_refused_when_retried(
    tmp_path: Path, request_: m.LedgerRequest, before: str
) -> None:
    ledger = Ledger(open_db(str(tmp_path / "goqd.db")), now=lambda: 1.0)
    ledger.apply_batch([m.UpsertProduct(sku="A", name="A", total=10, store="r1")])
    sent = msgspec.structs.replace(request_, request_id="rid-old")
    (stored,) = ledger.apply_batch([sent]).replies
    # The row as the goqd before the upgrade wrote it.
    ledger.conn.execute(
        "UPDATE requests SET digest = ? WHERE request_id = 'rid-old'", (bytes.fromhex(before),)
    )
    total = ledger.conn.execute("SELECT total FROM products WHERE sku = 'A'").fetchone()
    (again,) = ledger.apply_batch([sent]).replies
    assert not isinstance(again, LedgerError), again
    assert again == stored
    assert ledger.conn.execute("SELECT total FROM products WHERE sku = 'A'").fetchone() == total


# ---------------------------------------------------------------- the fleet's credential files


def test_the_fleets_credential_file_is_0600_even_over_a_wider_one(tmp_path: Path) -> None:
    path = tmp_path / "ra.json"
    path.write_text("{}")
    path.chmod(0o644)
    assert write_credentials(str(path), {"license_key": "new"}) == str(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text()) == {"license_key": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["ra.json"]  # no temporary file left
