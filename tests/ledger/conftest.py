"""Fixtures of the ledger room.

* ``now``: the ledger's clock, a ``FakeNow`` the test sets.
* ``ledger``: a ledger on a real SQLite file on that clock, holding the three-store
  catalogue of ``tests.helpers.ledger.setup_catalogue`` (SKU A 10 units, B 5, each listed
  in r1, r2, r3).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from goqd.ledger import LedgerClient, open_ledger
from tests.helpers.ledger import FakeNow, setup_catalogue


@pytest.fixture
def now() -> FakeNow:
    return FakeNow()


@pytest.fixture
async def ledger(tmp_path: Path, now: FakeNow) -> AsyncIterator[LedgerClient]:
    async with open_ledger(str(tmp_path / "goqd.db"), now=now) as client:
        await setup_catalogue(client)
        yield client
