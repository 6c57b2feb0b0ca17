"""A string that never shows itself: ``repr`` and ``str`` are ``***``.

Credentials are held as ``Secret`` from the moment they are read from a file until the
one line of an adapter that builds a request header with ``.reveal()``. Logging,
formatting, msgspec encoding and exceptions therefore never see the value.
"""

from __future__ import annotations

from typing import Any


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:
        # Pickling would write the value somewhere we do not control.
        raise TypeError("Secret values cannot be pickled")
