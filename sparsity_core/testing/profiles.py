"""Hypothesis profiles for sparsity-core tests: ``dev`` (fast) and ``ci`` (thorough)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from hypothesis import HealthCheck, settings

from . import _common

__all__ = ["PROFILES", "check_settings", "load_profile"]

# deadline=None: the first torch call in a process is slow, and timings vary on shared runners.
PROFILES = {"dev": 15, "ci": 40}


def load_profile(name: str | None = None) -> str:
    """Register the ``dev`` and ``ci`` profiles and load ``name`` (default: the
    ``HYPOTHESIS_PROFILE`` environment variable, else ``dev``); returns the name loaded.

    Run checks (those that train a model) run an eighth of ``max_examples``, at least 2. The
    ``ci`` profile is derandomized: a CI run draws the same examples every time, so it cannot
    pass on one run and fail on the next (``dev`` explores new examples at every run).
    """
    for profile, examples in PROFILES.items():
        settings.register_profile(
            profile,
            max_examples=examples,
            deadline=None,
            derandomize=profile == "ci",
            suppress_health_check=[HealthCheck.too_slow],
        )
    chosen = name or os.environ.get("HYPOTHESIS_PROFILE", "dev")
    settings.load_profile(chosen)
    return chosen


@contextlib.contextmanager
def check_settings(**overrides: Any) -> Iterator[None]:
    """Extra hypothesis settings for the kit's checks inside the block, e.g.
    ``check_settings(derandomize=True)`` or ``check_settings(phases=[Phase.generate])`` (no
    shrinking: faster when only pass or fail matters). ``max_examples`` here sets every check's
    count; one given to a check itself wins."""
    token = _common._OVERRIDES.set({**_common._OVERRIDES.get(), **overrides})
    try:
        yield
    finally:
        _common._OVERRIDES.reset(token)
