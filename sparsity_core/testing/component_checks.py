"""Invariant checks for single components: structures, criteria, distributions, schedules.

Each check raises :class:`AssertionError` (never through ``assert``, which ``python -O``
strips) with a message naming the check, the component, the layer and what broke. Misuse of a
check itself (inputs that do not meet its preconditions) raises :class:`ValueError`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from ..context import ScoreContext
from ..layers import LayerSpec
from ..registry import ComponentType, get_registry
from ._common import _check_mask_value, _count, _fail, _same, _unchanged

__all__ = [
    "check_criterion_scores",
    "check_distribution",
    "check_drop_schedule",
    "check_structure_budget",
    "check_structure_fill",
    "check_structure_keep",
]
_GLOBAL_DENSITY_RTOL = 1e-9


# -- structures ------------------------------------------------------------------------------------


def check_structure_fill(
    structure: Any,
    spec: LayerSpec,
    scores: torch.Tensor,
    base: torch.Tensor,
    candidates: torch.Tensor,
    budget: int,
) -> torch.Tensor:
    """``fill`` keeps ``base``, adds only ``candidates``, holds exactly ``budget`` and is satisfied.

    Returns the filled mask. ``budget`` must lie between ``base.sum()`` and that plus the
    candidates outside ``base`` (otherwise no fill exists and ``ValueError`` is raised).
    """
    check, where = "check_structure_fill", f"layer {spec.fqn!r}"
    have, room = _count(base), _count(candidates & ~base)
    if not have <= budget <= have + room:
        raise ValueError(
            f"check_structure_fill: budget {budget} cannot be filled from a base of {have} and "
            f"{room} further candidates on layer {spec.fqn!r}; draw a budget in "
            f"[{have}, {have + room}]."
        )
    inputs = {"scores": scores, "base": base, "candidates": candidates}
    before = {name: t.clone() for name, t in inputs.items()}
    result = structure.fill(scores, base, candidates, budget, spec)
    result = _check_mask_value(check, structure, spec, result, "fill()")
    _unchanged(check, structure, where, before, inputs)
    lost = base & ~result
    if lost.any():
        _fail(check, structure, where, f"fill() removed {_count(lost)} positions of the base")
    stray = result & ~base & ~candidates
    if stray.any():
        _fail(
            check,
            structure,
            where,
            f"fill() added {_count(stray)} positions that are not candidates (e.g. regrowing "
            f"weights dropped in the same update)",
        )
    if _count(result) != budget:
        _fail(
            check,
            structure,
            where,
            f"fill() returned {_count(result)} active positions, not the budget {budget}",
        )
    if not structure.satisfied(result, spec, budget):
        _fail(check, structure, where, "fill() returned a mask that satisfied() rejects")
    return result


def check_structure_keep(
    structure: Any,
    spec: LayerSpec,
    scores: torch.Tensor,
    mask: torch.Tensor,
    fraction: float,
) -> torch.Tensor:
    """``keep`` returns a subset of ``mask``, is the identity at fraction 0 and never over-drops.

    Over-dropping means dropping more weights than there are inactive positions to regrow from
    (``numel - mask.sum()``). Returns the kept mask.
    """
    check = "check_structure_keep"
    where = f"layer {spec.fqn!r} at fraction {fraction!r}"
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"check_structure_keep: fraction {fraction!r} is outside [0, 1].")
    inputs = {"scores": scores, "mask": mask}
    before = {name: t.clone() for name, t in inputs.items()}
    keep = structure.keep(scores, mask, fraction, spec)
    keep = _check_mask_value(check, structure, spec, keep, "keep()")
    _unchanged(check, structure, where, before, inputs)
    stray = keep & ~mask
    if stray.any():
        _fail(check, structure, where, f"keep() kept {_count(stray)} inactive positions")
    active = _count(mask)
    dropped = active - _count(keep)
    if fraction == 0.0 and dropped:
        _fail(check, structure, where, f"keep() dropped {dropped} weights at fraction 0")
    if dropped > spec.numel - active:
        _fail(
            check,
            structure,
            where,
            f"keep() dropped {dropped} of {active} active weights, more than the "
            f"{spec.numel - active} inactive positions they could be regrown from",
        )
    return keep


def check_structure_budget(
    structure: Any, spec: LayerSpec, density: float, *, tolerance: float | None = 1.0
) -> int:
    """``budget`` is an integer in ``[0, numel]`` near ``density * numel`` and ``numel`` at 1.

    Args:
        tolerance: the largest allowed ``|budget - density * numel|`` in weights (1 suits
            unstructured sparsity; pass a structure's group size, or None to skip).
    """
    check, where = "check_structure_budget", f"layer {spec.fqn!r} at density {density!r}"
    budget = structure.budget(spec, density)
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        _fail(check, structure, where, f"budget() returned {budget!r}, not an integer")
    budget = int(budget)
    if not 0 <= budget <= spec.numel:
        _fail(check, structure, where, f"budget() returned {budget}, outside [0, {spec.numel}]")
    if tolerance is not None and abs(budget - density * spec.numel) > tolerance:
        _fail(
            check,
            structure,
            where,
            f"budget() returned {budget}, more than {tolerance} from density * numel = "
            f"{density * spec.numel:.6g}",
        )
    if density == 1.0 and budget != spec.numel:
        _fail(check, structure, where, f"budget() returned {budget} < numel at density 1")
    again = structure.budget(spec, density)
    if again != budget:
        _fail(check, structure, where, f"budget() is not deterministic ({budget} then {again})")
    return budget


# -- criteria ----------------------------------------------------------------------------------


def _context_tensors(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Every tensor a context holds, by the name a criterion reads it under."""
    out: dict[str, torch.Tensor] = {}
    for field in attrs.fields(type(ctx)):
        value = getattr(ctx, field.name)
        name = "ctx." + field.name.lstrip("_")
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(item, torch.Tensor):
                    out[f"{name}[{key!r}]"] = item
    return out


def _rng_states(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def check_criterion_scores(criterion: Any, ctx: ScoreContext) -> torch.Tensor:
    """``scores(ctx)`` is shaped like the weight, mutates nothing, and is seeded by the context.

    Checks: a tensor of the weight's shape, dtype and device; no tensor of ``ctx`` modified;
    the global RNG untouched; the same generator state gives the same scores. Returns the
    scores.
    """
    check, where = "check_criterion_scores", f"layer {ctx.spec.fqn!r} at step {ctx.step}"
    tensors = _context_tensors(ctx)
    before = {name: t.clone() for name, t in tensors.items()}
    generator_state = ctx.generator.get_state()
    rng_before = _rng_states(ctx.weight.device)
    first = criterion.scores(ctx)
    rng_after = _rng_states(ctx.weight.device)
    if any(not torch.equal(a, b) for a, b in zip(rng_before, rng_after, strict=True)):
        _fail(
            check,
            criterion,
            where,
            "scores() drew from the global torch RNG; draw only from ctx.generator",
        )
    _unchanged(check, criterion, where, before, tensors)
    weight = ctx.weight
    if not isinstance(first, torch.Tensor):
        _fail(check, criterion, where, f"scores() returned {type(first).__name__}, not a tensor")
    if first.shape != weight.shape:
        _fail(
            check,
            criterion,
            where,
            f"scores() returned shape {tuple(first.shape)}, not the weight's {tuple(weight.shape)}",
        )
    if first.dtype != weight.dtype:
        _fail(
            check,
            criterion,
            where,
            f"scores() returned dtype {first.dtype}, not the weight's {weight.dtype}",
        )
    if first.device != weight.device:
        _fail(
            check,
            criterion,
            where,
            f"scores() returned device {first.device}, not the weight's {weight.device}",
        )
    ctx.generator.set_state(generator_state)
    second = criterion.scores(ctx)
    if not isinstance(second, torch.Tensor) or not _same(first, second):
        _fail(
            check,
            criterion,
            where,
            "scores() differ between two calls with the same generator state (not "
            "reproducible from ctx.generator)",
        )
    return first


# -- distributions and schedules ---------------------------------------------------------------


def check_distribution(
    distribution: Any, layers: Sequence[LayerSpec], density: float, *, structure: Any = None
) -> dict[str, float]:
    """Every layer gets a density in (0, 1] and the parameter-weighted mean is ``density``.

    Also, after rounding each layer to an integer budget with ``structure`` (default:
    ``unstructured``), the total is within one weight per layer of ``density * total``.
    Returns the densities.
    """
    check, where = "check_distribution", f"{len(layers)} layers at density {density!r}"
    layers = list(layers)
    result = distribution.densities(layers, density)
    if not isinstance(result, Mapping):
        _fail(check, distribution, where, f"densities() returned {type(result).__name__}")
    result = dict(result)
    names = {spec.fqn for spec in layers}
    missing, extra = sorted(names - set(result)), sorted(set(result) - names)
    if missing or extra:
        _fail(
            check,
            distribution,
            where,
            f"densities() has no density for {missing} and unknown layers {extra}",
        )
    for spec in layers:
        value = result[spec.fqn]
        if not isinstance(value, numbers.Real) or not 0.0 < float(value) <= 1.0:
            _fail(
                check,
                distribution,
                f"layer {spec.fqn!r} ({where})",
                f"density {value!r} is outside (0, 1]",
            )
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
    if structure is None:
        structure = get_registry().create(ComponentType.STRUCTURE, "unstructured")
    budgets = sum(int(structure.budget(spec, float(result[spec.fqn]))) for spec in layers)
    if abs(budgets - round(target)) > len(layers):
        _fail(
            check,
            distribution,
            where,
            f"integer budgets total {budgets} weights, more than one per layer from "
            f"round(density * total) = {round(target)}",
        )
    again = dict(distribution.densities(layers, density))
    if again != result:
        _fail(check, distribution, where, "densities() differ between two identical calls")
    return result


def check_drop_schedule(schedule: Any, t_end: int) -> list[float]:
    """``fraction(step, t_end)`` is a real number in [0, 1] for steps 0..t_end, and pure.

    Whether the topology stops changing after ``t_end`` is the scheduler's job (see
    :func:`check_method_run`), so a constant schedule may return its rate at any step.
    """
    check, where = "check_drop_schedule", f"t_end={t_end}"
    values: list[float] = []
    for step in range(t_end + 1):
        value = schedule.fraction(step, t_end)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            _fail(check, schedule, where, f"fraction({step}) returned {value!r}, not a number")
        if not 0.0 <= float(value) <= 1.0:  # NaN fails here too
            _fail(check, schedule, where, f"fraction({step}) = {value!r} is outside [0, 1]")
        values.append(float(value))
    for step in reversed(range(t_end + 1)):
        if float(schedule.fraction(step, t_end)) != values[step]:
            _fail(check, schedule, where, f"fraction({step}) differs between calls")
    return values
