"""Hypothesis settings shared by the fuzz tests (control, CSV, config, mall adapters).

``GOQD_FUZZ_EXAMPLES`` sets the examples of each property (.ci/run raises it). The
examples are derandomized, so a run that passed passes again and a failure reproduces;
``GOQD_FUZZ_RANDOM=1`` explores new ones instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from hypothesis import HealthCheck, settings


def fuzz_settings(default_examples: int, *, suppress: Sequence[HealthCheck] = ()) -> settings:
    """Settings for a fuzz property: ``default_examples`` unless ``GOQD_FUZZ_EXAMPLES``
    says otherwise (read it back as ``.max_examples``), no deadline, and the health checks
    that large or slow inputs trip, plus ``suppress``, turned off."""
    return settings(
        max_examples=int(os.environ.get("GOQD_FUZZ_EXAMPLES", str(default_examples))),
        deadline=None,
        derandomize=not os.environ.get("GOQD_FUZZ_RANDOM"),
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, *suppress],
    )
