"""The stock ledger: the single writer of goqd's SQLite file.

docs/design.md says why it is built so ("Exactly once, nothing lost", "Persistence").
``queries`` is how anything else reads it.
"""

from goqd.ledger.actor import LedgerClient, Wakeups, open_ledger, open_ledger_channel, run_ledger
from goqd.ledger.db import Ledger
from goqd.ledger.schema import SCHEMA_VERSION, open_db

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
