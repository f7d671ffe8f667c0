"""Shared test configuration: hypothesis profiles (choose with HYPOTHESIS_PROFILE=dev|ci)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# deadline=None: the first torch call in a process is slow, and timings vary on shared runners.
settings.register_profile(
    "dev", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
