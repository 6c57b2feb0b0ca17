"""The wall clock goqd's parts take as a parameter.

Everything that stamps or compares real time (mall clocks, rate buckets, the store
actor, the simulators) takes a ``WallClock`` instead of calling ``time.time`` itself, so
a test can hand it a fake one and a simulated run can hand it trio's clock.
"""

from __future__ import annotations

from collections.abc import Callable

WallClock = Callable[[], float]
