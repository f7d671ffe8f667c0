"""Built-in method presets: ``static``, ``set`` and ``rigl``.

RigL and SET differ only in the growth criterion; ``static`` keeps its random initial mask.
"""

from __future__ import annotations

from typing import Any

import attrs

from sparsity_core import DSTConfig, hookimpl


def static(**overrides: Any) -> DSTConfig:
    """A fixed random ERK mask (the baseline every DST method must beat)."""
    base = DSTConfig(
        prune="magnitude", grow="random", distribution="erk", drop={"kind": "constant", "rate": 0.0}
    )
    return attrs.evolve(base, **overrides)


def set_(**overrides: Any) -> DSTConfig:
    """SET: drop smallest magnitudes, regrow at random (cosine-decayed fraction, ERK)."""
    base = DSTConfig(
        prune="magnitude",
        grow="random",
        distribution="erk",
        drop={"kind": "cosine", "alpha": 0.3},
        delta_t=100,
    )
    return attrs.evolve(base, **overrides)


def rigl(**overrides: Any) -> DSTConfig:
    """RigL: drop smallest magnitudes, regrow largest dense gradients (cosine, ERK, ΔT=100)."""
    base = DSTConfig(
        prune="magnitude",
        grow="gradient",
        distribution="erk",
        drop={"kind": "cosine", "alpha": 0.3},
        delta_t=100,
    )
    return attrs.evolve(base, **overrides)


@hookimpl
def sparsity_register_presets(register) -> None:
    register("static", static, summary="fixed random ERK mask, no topology updates")
    register("set", set_, summary="magnitude prune + random growth (SET)")
    register("rigl", rigl, summary="magnitude prune + gradient growth (RigL)")
