"""The ``dst_ee`` preset: relative-magnitude drop and exploration-bonus growth."""

from __future__ import annotations

from typing import Any

import attrs

from sparsity_core import DSTConfig


def dst_ee(**overrides: Any) -> DSTConfig:
    """RigL's schedule (cosine, ERK, ΔT=100) with ``relative_magnitude`` and ``explore``."""
    base = DSTConfig(
        prune="relative_magnitude",
        grow={"kind": "explore", "c": 0.5},
        distribution="erk",
        drop={"kind": "cosine", "alpha": 0.3},
        delta_t=100,
    )
    return attrs.evolve(base, **overrides)
