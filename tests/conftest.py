"""Shared test configuration: hypothesis profiles (choose with HYPOTHESIS_PROFILE=dev|ci)."""

from __future__ import annotations

from sparsity_core.testing.profiles import load_profile

load_profile()
