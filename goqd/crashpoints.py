"""Named crash points for the reliability harness (RELIABILITY.md, "Crash points").

``crashpoint("ledger.after_commit")`` kills the process on the spot (SIGKILL, no
cleanup, no flush) when the environment variable ``GOQD_CRASHPOINT`` names that point.
``GOQD_CRASHPOINT=name@N`` crashes on the N-th time the point is reached. Outside the
harness the variable is unset and a crash point costs one set lookup.

Never use this for anything but tests: it exists to prove that a crash at any point
loses nothing.
"""

from __future__ import annotations

import os
import signal

_PLAN: dict[str, int] = {}
for _item in filter(None, os.environ.get("GOQD_CRASHPOINT", "").split(",")):
    _name, _, _nth = _item.partition("@")
    _PLAN[_name.strip()] = int(_nth) if _nth else 1

_hits: dict[str, int] = {}


def crashpoint(name: str) -> None:
    """Die here, abruptly, if the harness asked for it."""
    if not _PLAN or name not in _PLAN:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= _PLAN[name]:
        os.kill(os.getpid(), signal.SIGKILL)
