"""Checks for distributions (densities per layer) and drop schedules (the fraction per step).

Every check takes the component and ``max_examples``; layer lists come from
:func:`~sparsity_core.testing.strategies.layer_lists`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from hypothesis import assume
from hypothesis import strategies as st

from ..layers import LayerSpec
from ..registry import ComponentType
from ._common import FAST, Draw, _call, _fail, run_examples
from ._registered import registry
from ._tensor_strategies import densities, layer_lists

__all__ = [
    "check_distribution_dense_layers",
    "check_distribution_densities_in_range",
    "check_distribution_global_density",
    "check_schedule_fraction_in_range",
]
_GLOBAL_DENSITY_RTOL = 1e-9


def _where(layers: Sequence[LayerSpec], density: float) -> str:
    return f"{len(layers)} layers {[tuple(s.shape) for s in layers]} at density {density!r}"


def _densities(
    check: str, distribution: Any, layers: list[LayerSpec], density: float, **kwargs: Any
) -> dict[str, float]:
    where = _where(layers, density)
    call = f"densities(layers, {density!r}{', fixed=...' if kwargs else ''})"
    result = _call(
        check, distribution, where, call, lambda: distribution.densities(layers, density, **kwargs)
    )
    if not isinstance(result, Mapping):
        _fail(check, distribution, where, f"densities() returned {type(result).__name__}")
    return dict(result)


def _global_error(
    check: str,
    distribution: Any,
    layers: list[LayerSpec],
    density: float,
    result: Mapping[str, float],
) -> None:
    where = _where(layers, density)
    total = sum(spec.numel for spec in layers)
    target = density * total
    achieved = math.fsum(float(result[spec.fqn]) * spec.numel for spec in layers)
    if abs(achieved - target) > _GLOBAL_DENSITY_RTOL * target:
        _fail(
            check,
            distribution,
            where,
            f"the parameter-weighted global density is {achieved / total!r}, not {density!r}",
        )


def check_distribution_global_density(
    distribution: Any, *, max_examples: int | None = None
) -> None:
    """The parameter-weighted mean density is the target, integer budgets (unstructured) are
    within one weight per layer of ``density * total``, and the result is deterministic."""
    check = "check_distribution_global_density"
    unstructured = registry().create(ComponentType.STRUCTURE, "unstructured")

    def example(draw: Draw) -> None:
        layers = draw(layer_lists(), label="layers")
        density = draw(densities(min_value=0.01), label="density")
        where = _where(layers, density)
        result = _densities(check, distribution, layers, density)
        missing = sorted({s.fqn for s in layers} - set(result))
        if missing:
            _fail(check, distribution, where, f"densities() gives no density for {missing}")
        _global_error(check, distribution, layers, density, result)
        total = sum(spec.numel for spec in layers)
        budgets = sum(int(unstructured.budget(s, float(result[s.fqn]))) for s in layers)
        if abs(budgets - round(density * total)) > len(layers):
            _fail(
                check,
                distribution,
                where,
                f"integer budgets total {budgets} weights, more than one per layer from "
                f"round(density * total) = {round(density * total)}",
            )
        if _densities(check, distribution, layers, density) != result:
            _fail(check, distribution, where, "densities() differ between two identical calls")

    run_examples(check, example, cost=FAST, max_examples=max_examples)


def check_distribution_densities_in_range(
    distribution: Any, *, max_examples: int | None = None
) -> None:
    """Every layer gets exactly one real density in (0, 1], and no unknown layer is named."""
    check = "check_distribution_densities_in_range"

    def example(draw: Draw) -> None:
        layers = draw(layer_lists(), label="layers")
        density = draw(densities(min_value=0.01), label="density")
        where = _where(layers, density)
        result = _densities(check, distribution, layers, density)
        names = {spec.fqn for spec in layers}
        missing, extra = sorted(names - set(result)), sorted(set(result) - names)
        if missing or extra:
            _fail(
                check,
                distribution,
                where,
                f"densities() misses {missing} and names unknown layers {extra}",
            )
        for spec in layers:
            value = result[spec.fqn]
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not 0.0 < float(value) <= 1.0
            ):
                _fail(
                    check,
                    distribution,
                    f"layer {spec.fqn!r} ({where})",
                    f"density {value!r} is outside (0, 1]",
                )

    run_examples(check, example, cost=FAST, max_examples=max_examples)


def check_distribution_dense_layers(distribution: Any, *, max_examples: int | None = None) -> None:
    """Layers pinned dense stay at density 1 and the global target still holds.

    Pinned through ``densities(..., fixed={fqn: 1.0})`` (how the scheduler passes densities a
    structure imposes) and, for a distribution with a ``dense`` field of layer-name patterns
    (the built-ins), through that field.
    """
    check = "check_distribution_dense_layers"
    has_dense = attrs.has(type(distribution)) and "dense" in attrs.fields_dict(type(distribution))

    def example(draw: Draw) -> None:
        layers = draw(layer_lists(min_size=2), label="layers")
        names = [s.fqn for s in layers]
        dense = draw(
            st.lists(st.sampled_from(names), min_size=1, max_size=len(names) - 1, unique=True),
            label="dense",
        )
        total = sum(s.numel for s in layers)
        share = sum(s.numel for s in layers if s.fqn in dense) / total
        # A target the dense layers alone do not exceed: the rest share what remains.
        density = share + (1.0 - share) * draw(densities(min_value=0.05), label="rest")
        assume(share < density <= 1.0)
        where = f"{_where(layers, density)} with {dense} dense"
        ways = {"fixed": (distribution, {"fixed": dict.fromkeys(dense, 1.0)})}
        if has_dense:
            ways["dense"] = (attrs.evolve(distribution, dense=tuple(dense)), {})
        for how, (component, kwargs) in ways.items():
            result = _densities(check, component, layers, density, **kwargs)
            wrong = {fqn: result.get(fqn) for fqn in dense if result.get(fqn) != 1.0}
            if wrong:
                _fail(
                    check,
                    distribution,
                    where,
                    f"layers pinned dense via {how!r} got densities {wrong}",
                )
            _global_error(check, distribution, layers, density, result)

    run_examples(check, example, cost=FAST, max_examples=max_examples)


def check_schedule_fraction_in_range(schedule: Any, *, max_examples: int | None = None) -> None:
    """``fraction(step, t_end)`` is a real number in [0, 1] at every step up to ``t_end``, and
    the same on every call."""
    check = "check_schedule_fraction_in_range"

    def example(draw: Draw) -> None:
        t_end = draw(st.integers(min_value=1, max_value=200), label="t_end")
        where = f"t_end={t_end}"
        values = []
        for step in range(t_end + 1):
            value = _call(
                check,
                schedule,
                where,
                f"fraction({step}, {t_end})",
                lambda step=step: schedule.fraction(step, t_end),
            )
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                _fail(check, schedule, where, f"fraction({step}) returned {value!r}, not a number")
            if not 0.0 <= float(value) <= 1.0:  # NaN fails here too
                _fail(check, schedule, where, f"fraction({step}) = {value!r} is outside [0, 1]")
            values.append(float(value))
        for step in reversed(range(t_end + 1)):
            if float(schedule.fraction(step, t_end)) != values[step]:
                _fail(check, schedule, where, f"fraction({step}) differs between calls")

    run_examples(check, example, cost=FAST, max_examples=max_examples)
