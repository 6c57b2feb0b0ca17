"""The stock ledger: the single writer of goqd's SQLite file (docs/design.md §4–§5)."""

from goqd.ledger.actor import LedgerClient, Wakeups, open_ledger, open_ledger_channel, run_ledger
from goqd.ledger.db import SCHEMA_VERSION, Ledger, open_db

__all__ = [
    "SCHEMA_VERSION",
    "Ledger",
    "LedgerClient",
    "Wakeups",
    "open_db",
    "open_ledger",
    "open_ledger_channel",
    "run_ledger",
]
