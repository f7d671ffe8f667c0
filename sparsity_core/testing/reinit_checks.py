"""Checks for re-initialisations (``DSTConfig.reinit``): what ``apply_`` may change.

A re-initialisation runs once, on the dense initial weights under the initial mask. It may
change the active weights only, must keep them finite, must be reproducible from its
generator alone, and must not draw from the global random generators.
"""

from __future__ import annotations

from typing import Any

import torch

from ..layers import LayerSpec
from ._common import FAST, Draw, _call, _fail, run_examples
from ._tensor_strategies import _generator, layer_specs, masks, seeds, weights
from .criterion_checks import _global_rng_states, moved_rngs

__all__ = [
    "check_reinit_deterministic",
    "check_reinit_finite",
    "check_reinit_only_active",
]


def _case(draw: Draw) -> tuple[LayerSpec, torch.Tensor, torch.Tensor, int]:
    spec = draw(layer_specs(), label="spec")
    mask = draw(masks(spec), label="mask")
    weight = draw(weights(spec.shape, inactive="random"), label="weight")
    return spec, mask, weight, draw(seeds(), label="seed")


def _where(spec: LayerSpec, mask: torch.Tensor) -> str:
    return f"layer {spec.fqn!r} {tuple(spec.shape)} with {int(mask.sum())} active"


def _apply(check: str, reinit: Any, spec, mask, weight, seed) -> torch.Tensor:
    out = weight.clone()
    _call(
        check,
        reinit,
        _where(spec, mask),
        "apply_(weight, mask, spec, generator)",
        lambda: reinit.apply_(out, mask.clone(), spec, _generator(seed)),
    )
    return out


def check_reinit_only_active(reinit: Any, *, max_examples: int | None = None) -> None:
    """``apply_`` changes the weight in place, only where the mask is set."""
    check = "check_reinit_only_active"

    def example(draw: Draw) -> None:
        spec, mask, weight, seed = _case(draw)
        out = _apply(check, reinit, spec, mask, weight, seed)
        if out.shape != weight.shape or out.dtype != weight.dtype:
            _fail(check, reinit, _where(spec, mask), "apply_() changed the weight's shape/dtype")
        changed = ~mask & ~((out == weight) | (out.isnan() & weight.isnan()))
        if bool(changed.any()):
            _fail(
                check,
                reinit,
                _where(spec, mask),
                f"apply_() changed {int(changed.sum())} inactive weight(s); change only the "
                f"positions the mask keeps",
            )

    run_examples(check, example, cost=FAST, max_examples=max_examples)


def check_reinit_finite(reinit: Any, *, max_examples: int | None = None) -> None:
    """Finite active weights stay finite (no 0/0 on a neuron without active inputs)."""
    check = "check_reinit_finite"

    def example(draw: Draw) -> None:
        spec, mask, weight, seed = _case(draw)
        out = _apply(check, reinit, spec, mask, weight, seed)
        if not bool(out[mask].isfinite().all()):
            _fail(check, reinit, _where(spec, mask), "apply_() produced a NaN or Inf weight")

    run_examples(check, example, cost=FAST, max_examples=max_examples)


def check_reinit_deterministic(reinit: Any, *, max_examples: int | None = None) -> None:
    """The same inputs and generator seed give the same weights, and the global RNGs (torch,
    ``random``, numpy) are left untouched."""
    check = "check_reinit_deterministic"

    def example(draw: Draw) -> None:
        spec, mask, weight, seed = _case(draw)
        before = _global_rng_states()
        first = _apply(check, reinit, spec, mask, weight, seed)
        moved = moved_rngs(before)
        if moved:
            _fail(
                check,
                reinit,
                _where(spec, mask),
                f"apply_() drew from the global {' and '.join(moved)} RNG; draw only from the "
                f"generator it is given",
            )
        second = _apply(check, reinit, spec, mask, weight, seed)
        same = (first == second) | (first.isnan() & second.isnan())
        if not bool(same.all()):
            _fail(check, reinit, _where(spec, mask), "two calls with the same seed differ")

    run_examples(check, example, cost=FAST, max_examples=max_examples)
