"""goqd: a self-hosted daemon that keeps stock counts in sync across Japanese malls.

``goqd.__version__`` is the installed distribution's version: pyproject.toml is the one
place it is written. It is looked up on first use (PEP 562), because importing
``importlib.metadata`` costs goqctl tens of milliseconds on every command that never
asks for the version.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    __version__: str


@functools.cache
def _installed_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("goqd")
    except metadata.PackageNotFoundError:
        # A source tree on sys.path that was never installed: say so rather than guess.
        return "0+unknown"


def __getattr__(name: str) -> str:
    if name == "__version__":
        return _installed_version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
