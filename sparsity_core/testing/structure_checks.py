"""Checks for structures: validation, budgets, selection (fill), the drop (keep), satisfied().

Every check takes the structure and ``max_examples``. A neuron-level structure (one that wraps
another, such as ``neuron_ablation``) is checked wrapped around every registered weight-level
structure that counts per neuron. Layer specs come from
:func:`~sparsity_core.testing.strategies.structured_specs` (a plugin can supply its own through a
``"specs.<name>"`` strategy).

``satisfied()`` is the structure's own judgement, so a bug shared by ``fill`` and ``satisfied``
would hide from it. For N:M (the registered ``nm`` structure and its subclasses) the kit
therefore also counts every group of M itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st

from ..errors import LayerError
from ..layers import LayerSpec
from ..structures import (
    active_rows_of,
    budget_step,
    describe,
    realized_budget,
    structure_capabilities,
)
from ._common import (
    FAST,
    Draw,
    _call,
    _check_mask_value,
    _count,
    _fail,
    _unchanged,
    run_examples,
)
from ._component_strategies import variants
from ._registered import is_coarse
from ._structure_strategies import structure_densities, structured_masks, structured_specs
from ._tensor_strategies import fractions, layer_specs, scores

__all__ = [
    "check_structure_budget",
    "check_structure_budget_step",
    "check_structure_keep",
    "check_structure_satisfied_rejects_violations",
    "check_structure_select",
    "check_structure_select_idempotent",
    "check_structure_validate",
    "nm_violation",
]


def _where(spec: LayerSpec, budget: int | None = None) -> str:
    extra = "" if budget is None else f" with budget {budget}"
    return f"layer {spec.fqn!r} {tuple(spec.shape)}{extra}"


def _fine(structure: Any) -> tuple[Any, bool]:
    """``(weight-level structure, whether a neuron-level one wraps it)``."""
    coarse = False
    while getattr(structure, "inner", None) is not None:
        structure, coarse = structure.inner, True
    return structure, coarse


def nm_violation(structure: Any, spec: LayerSpec, mask: torch.Tensor, budget: int) -> str | None:
    """The kit's own N:M count: ``None`` if ``mask`` keeps the N:M rule, else what breaks it.

    Applies to every structure that declares ``StructureCapabilities(nm=(n, m))`` (alone or
    wrapped); other structures always pass. Each group of M consecutive fan-in positions of an
    active neuron holds N (all M in a dense layer, whose budget is its size); a partial last
    group under ``pad`` holds ``min(N, its real positions)``; a neuron with no weight is allowed
    only under a neuron-level structure.
    """
    caps = structure_capabilities(structure)
    if caps.nm is None:
        return None
    coarse = _fine(structure)[1] or caps.ablates
    n, m = (int(v) for v in caps.nm)
    rows = mask.reshape(spec.fan_out, spec.fan_in)
    groups = -(-spec.fan_in // m)
    padded = F.pad(rows.long(), (0, groups * m - spec.fan_in))
    counts = padded.reshape(spec.fan_out, groups, m).sum(dim=-1)
    real = torch.full((groups,), m, dtype=torch.long, device=mask.device)
    real[-1] = spec.fan_in - (groups - 1) * m
    pattern = real if budget == spec.numel else real.clamp(max=n)
    active = rows.any(dim=1)
    if not coarse and not bool(active.all()):
        row = int(torch.nonzero(~active)[0])
        return f"neuron {row} holds no weight, though no neuron-level structure ablates it"
    expected = active.long().unsqueeze(1) * pattern
    bad = torch.nonzero(counts != expected)
    if bad.numel():
        row, group = (int(v) for v in bad[0])
        return (
            f"group {group} of neuron {row} (fan-in positions {group * m}..{group * m + m - 1}) "
            f"holds {int(counts[row, group])} active weights, not {int(expected[row, group])} "
            f"({len(bad)} such groups)"
        )
    return None


def _assert_satisfies(check: str, s: Any, spec: LayerSpec, mask: torch.Tensor, budget: int) -> None:
    where = _where(spec, budget)
    if not _call(check, s, where, "satisfied()", lambda: s.satisfied(mask, spec, budget)):
        _fail(check, s, where, "the selected mask is rejected by the structure's satisfied()")
    broken = nm_violation(s, spec, mask, budget)
    if broken is not None:
        _fail(check, s, where, f"the selected mask breaks N:M: {broken}")


def _assert_selection(check: str, s: Any, spec: LayerSpec, mask: torch.Tensor, budget: int) -> None:
    """A selection holds exactly the (realized) budget and satisfies the structure."""
    expected = realized_budget(s, spec, budget, mask)
    if expected > budget or _count(mask) != expected:
        _fail(
            check,
            s,
            _where(spec, budget),
            f"fill() holds {_count(mask)} weights, not the (realized) budget {expected}",
        )
    _assert_satisfies(check, s, spec, mask, budget)


def _draw_case(check: str, draw: Draw, structure: Any) -> tuple[Any, LayerSpec, int]:
    """A structure variant, a layer it accepts and a budget it allows there."""
    s = draw(st.sampled_from(variants(structure)), label="structure")
    spec = draw(structured_specs(s), label="spec")
    density = draw(structure_densities(s, spec), label="density")
    budget = _call(
        check, s, _where(spec), f"budget(spec, {density})", lambda: s.budget(spec, density)
    )
    return s, spec, int(budget)


def _initial(
    check: str, s: Any, spec: LayerSpec, values: torch.Tensor, budget: int
) -> torch.Tensor:
    empty = torch.zeros(spec.shape, dtype=torch.bool)
    where = _where(spec, budget)
    mask = _call(check, s, where, "fill()", lambda: s.fill(values, empty, ~empty, budget, spec))
    return _check_mask_value(check, s, spec, mask, "fill()")


def check_structure_budget_step(structure: Any, *, max_examples: int | None = None) -> None:
    """A structure that declares ``budget_step`` (it takes part in the global budget) holds the
    budgets one step either side of its own on the same active neurons: from its initial mask,
    ``fill(..., active_rows=...)`` to ``budget + step`` keeps the mask and adds only candidates,
    to ``budget - step`` keeps a subset, each with exactly that many weights and satisfying the
    structure. A step of ``n > 1`` is one weight per active neuron. Structures without a step
    pass (their budget is their own)."""
    check = "check_structure_budget_step"

    def example(draw: Draw) -> None:
        s, spec, budget = _draw_case(check, draw, structure)
        where = _where(spec, budget)
        step = _call(check, s, where, "budget_step(spec)", lambda: budget_step(s, spec))
        if step is None or budget < 1:
            return
        values = draw(scores(spec.shape, nonfinite=st.booleans()), label="scores")
        mask = _initial(check, s, spec, values, budget)
        step = _call(check, s, where, "budget_step(spec, mask)", lambda: budget_step(s, spec, mask))
        if step is None:
            return
        rows = active_rows_of(mask)
        free = (~mask).reshape(spec.fan_out, -1).any(dim=1)
        empty = torch.zeros_like(mask)
        moves = []
        if budget + step <= spec.numel and (bool(free[rows].all()) if step > 1 else True):
            moves.append((budget + step, mask, ~mask, "grow"))
        if budget - step >= max(step, 1):
            moves.append((budget - step, empty, mask, "shrink"))
        for target, base, candidates, name in moves:
            label = f"fill(..., {target}, active_rows=...) ({name} by the step {step})"
            new = _call(
                check,
                s,
                where,
                label,
                lambda t=target, b=base, c=candidates: s.fill(
                    values, b, c, t, spec, active_rows=rows
                ),
            )
            new = _check_mask_value(check, s, spec, new, label)
            if bool((base & ~new).any()) or bool((new & ~(base | candidates)).any()):
                _fail(check, s, where, f"{label} dropped a base weight or added a non-candidate")
            same_rows = step == 1 or bool((active_rows_of(new) == rows).all())
            if _count(new) != target or not same_rows:
                _fail(
                    check,
                    s,
                    where,
                    f"{label} holds {_count(new)} weights on {_count(active_rows_of(new))} "
                    f"neurons, not {target} on the {_count(rows)} given: budget_step() "
                    f"declares a step the structure cannot take",
                )
            _assert_satisfies(check, s, spec, new, target)

    run_examples(check, example, cost=FAST, max_examples=max_examples)


def check_structure_validate(structure: Any, *, max_examples: int | None = None) -> None:
    """``validate`` rejects a layer it cannot hold with a LayerError naming it, else the layer
    works: its budget is an integer and the initial selection satisfies the structure."""
    check = "check_structure_validate"

    def example(draw: Draw) -> None:
        s = draw(st.sampled_from(variants(structure)), label="structure")
        spec = draw(layer_specs(fqn=st.sampled_from(["fc", "blocks.3.conv"])), label="spec")
        where = _where(spec)
        try:
            s.validate(spec)
        except LayerError as exc:
            if spec.fqn not in str(exc):
                _fail(
                    check, s, where, f"validate() raised a LayerError not naming the layer: {exc}"
                )
            return
        except Exception as exc:
            _fail(
                check,
                s,
                where,
                f"validate() raised {type(exc).__name__}, not "
                f"sparsity_core.errors.LayerError: {exc}",
            )
        density = draw(structure_densities(s, spec), label="density")
        values = draw(scores(spec.shape), label="scores")
        try:
            budget = int(_call(check, s, where, "budget()", lambda: s.budget(spec, density)))
            _assert_selection(check, s, spec, _initial(check, s, spec, values, budget), budget)
        except AssertionError as exc:
            _fail(check, s, where, f"validate() accepted the layer, which cannot hold it: {exc}")

    run_examples(check, example, cost=FAST, max_examples=max_examples)


def _rounding_groups(s: Any, spec: LayerSpec) -> int:
    """How many groups a budget is rounded over (one rounding error of up to 1/2 each)."""
    fine, _ = _fine(s)
    shape = getattr(fine, "group_shape", None)
    return int(shape(spec)[0]) if callable(shape) else spec.fan_out


def check_structure_budget(structure: Any, *, max_examples: int | None = None) -> None:
    """``budget`` is a deterministic integer in ``[0, numel]``, ``numel`` at density 1, and within
    half a weight per rounding group (1 group unstructured, a row per neuron) of
    ``density * numel``; a neuron-level structure's is exactly the budget of the one it wraps."""
    check = "check_structure_budget"

    def example(draw: Draw) -> None:
        s = draw(st.sampled_from(variants(structure)), label="structure")
        spec = draw(structured_specs(s, max_side=12), label="spec")
        density = draw(structure_densities(s, spec), label="density")
        where = f"{_where(spec)} at density {density!r}"
        budget = _call(check, s, where, "budget()", lambda: s.budget(spec, density))
        if isinstance(budget, bool) or not isinstance(budget, int):
            _fail(check, s, where, f"budget() returned {budget!r}, not an int")
        if not 0 <= budget <= spec.numel:
            _fail(check, s, where, f"budget() returned {budget}, outside [0, {spec.numel}]")
        if density == 1.0 and budget != spec.numel:
            _fail(
                check, s, where, f"budget() returned {budget}, not numel {spec.numel} at density 1"
            )
        fine, wrapped = _fine(s)
        if wrapped:
            # A neuron-level structure takes its weight-level one's budget; how that one rounds
            # is its own check (so a third-party fine structure's rule is not blamed on it).
            inner = fine.budget(spec, density)
            if budget != inner:
                _fail(
                    check,
                    s,
                    where,
                    f"budget() returned {budget}, not the {inner} of the structure it wraps "
                    f"({describe(fine)}); a neuron-level structure keeps the inner budget",
                )
        tolerance = _rounding_groups(s, spec) / 2 + 1e-9
        if not wrapped and abs(budget - density * spec.numel) > tolerance:
            _fail(
                check,
                s,
                where,
                f"budget() returned {budget}, {abs(budget - density * spec.numel):.3g} weights "
                f"from density * numel = {density * spec.numel:.6g} (at most {tolerance:.3g}: "
                f"half a weight per rounding group)",
            )
        again = s.budget(spec, density)
        if again != budget:
            _fail(check, s, where, f"budget() is not deterministic ({budget} then {again})")

    run_examples(check, example, cost=FAST, max_examples=max_examples)


def check_structure_select(structure: Any, *, max_examples: int | None = None) -> None:
    """Selection satisfies the structure for any scores and budget, holding exactly the budget.

    Two selections are drawn: the initial one (``fill`` from an empty mask) and an update (a
    mask satisfying the structure, ``keep`` at any fraction, then ``fill`` from the kept mask
    with only the previously inactive positions as candidates, as the engine does). The update
    may add only candidates; it may remove kept weights only by emptying whole neurons (neuron
    ablation), and then holds the structure's ``realized_budget``. Scores hold ties, zeros, NaN
    and Inf. Inputs must not be modified.
    """
    check = "check_structure_select"

    def example(draw: Draw) -> None:
        s, spec, budget = _draw_case(check, draw, structure)
        where = _where(spec, budget)
        if draw(st.booleans(), label="initial selection"):
            values = draw(scores(spec.shape, nonfinite=st.booleans()), label="scores")
            _assert_selection(check, s, spec, _initial(check, s, spec, values, budget), budget)
            return
        previous = draw(
            structured_masks(s, spec, budget=budget, ablate=st.booleans()), label="mask"
        )
        # Drawn with the structure's own fill: it must already hold before the update.
        _assert_selection(check, s, spec, previous, budget)
        prune = draw(scores(spec.shape, nonfinite=st.booleans()), label="prune scores")
        fraction = draw(fractions(), label="fraction")
        keep = _call(check, s, where, "keep()", lambda: s.keep(prune, previous, fraction, spec))
        keep = _check_mask_value(check, s, spec, keep, "keep()")
        grow = draw(scores(spec.shape, nonfinite=st.booleans()), label="grow scores")
        candidates = ~previous
        inputs = {"scores": grow, "base": keep, "candidates": candidates, "previous": previous}
        before = {name: t.clone() for name, t in inputs.items()}
        new = _call(
            check,
            s,
            where,
            "fill()",
            lambda: s.fill(grow, keep, candidates, budget, spec, previous=previous),
        )
        new = _check_mask_value(check, s, spec, new, "fill()")
        _unchanged(check, s, where, before, inputs)
        stray = new & ~keep & ~candidates
        if stray.any():
            _fail(
                check,
                s,
                where,
                f"fill() added {_count(stray)} positions that are not candidates (regrowing "
                f"weights dropped in the same update)",
            )
        lost = keep & ~new
        if lost.any():
            emptied = lost.reshape(spec.fan_out, -1).any(dim=1)
            if not is_coarse_structure(s) or bool((emptied & active_rows_of(new)).any()):
                _fail(
                    check,
                    s,
                    where,
                    f"fill() removed {_count(lost)} kept weights from neurons that stay active",
                )
        _assert_selection(check, s, spec, new, budget)

    run_examples(check, example, cost=FAST, max_examples=max_examples)


def is_coarse_structure(s: Any) -> bool:
    """A composed structure whose outer level removes whole neurons."""
    return _fine(s)[1] or is_coarse(s)


def check_structure_select_idempotent(structure: Any, *, max_examples: int | None = None) -> None:
    """Selecting again changes nothing: the same inputs give the same mask, filling a full
    selection adds nothing, and selecting the budget from the selection returns it."""
    check = "check_structure_select_idempotent"

    def example(draw: Draw) -> None:
        s, spec, budget = _draw_case(check, draw, structure)
        where = _where(spec, budget)
        values = draw(scores(spec.shape, nonfinite=st.booleans()), label="scores")
        first = _initial(check, s, spec, values, budget)
        if not torch.equal(first, _initial(check, s, spec, values, budget)):
            _fail(check, s, where, "fill() gave two different masks for the same inputs")
        other = draw(scores(spec.shape), label="other scores")
        empty = torch.zeros_like(first)
        again = _call(check, s, where, "fill()", lambda: s.fill(other, first, ~first, budget, spec))
        if not torch.equal(again, first):
            _fail(check, s, where, "fill() of a mask already at its budget changed it")
        within = _call(check, s, where, "fill()", lambda: s.fill(other, empty, first, budget, spec))
        if not torch.equal(within, first):
            _fail(
                check,
                s,
                where,
                "fill() from an empty mask with the selection as the only candidates did not "
                "return the selection",
            )

    run_examples(check, example, cost=FAST, max_examples=max_examples)


def check_structure_keep(structure: Any, *, max_examples: int | None = None) -> None:
    """``keep`` returns a deterministic subset of the mask, the mask itself at fraction 0, and
    never drops more than can be regrown from the positions inactive before the update."""
    check = "check_structure_keep"

    def example(draw: Draw) -> None:
        s, spec, budget = _draw_case(check, draw, structure)
        mask = draw(structured_masks(s, spec, budget=budget, ablate=st.booleans()), label="mask")
        values = draw(scores(spec.shape, nonfinite=st.booleans()), label="scores")
        fraction = draw(fractions(), label="fraction")
        where = f"{_where(spec, budget)} at fraction {fraction!r}"
        inputs = {"scores": values, "mask": mask}
        before = {name: t.clone() for name, t in inputs.items()}
        keep = _call(check, s, where, "keep()", lambda: s.keep(values, mask, fraction, spec))
        keep = _check_mask_value(check, s, spec, keep, "keep()")
        _unchanged(check, s, where, before, inputs)
        stray = keep & ~mask
        if stray.any():
            _fail(check, s, where, f"keep() kept {_count(stray)} inactive positions")
        active = _count(mask)
        dropped = active - _count(keep)
        if fraction == 0.0 and dropped:
            _fail(check, s, where, f"keep() dropped {dropped} weights at fraction 0")
        if dropped > spec.numel - active:
            _fail(
                check,
                s,
                where,
                f"keep() dropped {dropped} of {active} active weights, more than the "
                f"{spec.numel - active} inactive positions they could be regrown from",
            )
        if not torch.equal(keep, s.keep(values, mask, fraction, spec)):
            _fail(check, s, where, "keep() gave two different masks for the same inputs")

    run_examples(check, example, cost=FAST, max_examples=max_examples)


def _positions(where: torch.Tensor) -> list[int]:
    return torch.nonzero(where.reshape(-1)).flatten().tolist()


def check_structure_satisfied_rejects_violations(
    structure: Any, *, max_examples: int | None = None
) -> None:
    """``satisfied`` is not vacuous: one weight more, or one fewer, in an active neuron of a
    valid selection is rejected; under N:M, moving one weight is judged as the kit counts."""
    check = "check_structure_satisfied_rejects_violations"

    def example(draw: Draw) -> None:
        s, spec, budget = _draw_case(check, draw, structure)
        values = draw(scores(spec.shape), label="scores")
        mask = _initial(check, s, spec, values, budget)
        where = _where(spec, budget)
        rows = active_rows_of(mask).reshape(-1, *([1] * (mask.dim() - 1))).expand_as(mask)
        per_row = mask.reshape(spec.fan_out, -1).sum(dim=1)
        crowded = (per_row >= 2).reshape(-1, *([1] * (mask.dim() - 1))).expand_as(mask)
        removable = mask & (crowded if is_coarse_structure(s) else torch.ones_like(mask))
        changes = {
            "one weight more": _positions(rows & ~mask),
            "one weight fewer": _positions(removable),
        }
        assume(any(changes.values()))
        for what, options in changes.items():
            if not options:
                continue
            flat = mask.clone().reshape(-1)
            flat[draw(st.sampled_from(options), label=what)] ^= True
            bad = flat.reshape(spec.shape)
            if _call(
                check, s, where, "satisfied()", lambda bad=bad: s.satisfied(bad, spec, budget)
            ):
                _fail(
                    check, s, where, f"satisfied() accepts a mask with {what} in an active neuron"
                )
        active = _positions(mask)
        inactive = _positions(rows & ~mask)
        if nm_violation(s, spec, mask, budget) is None and active and inactive:
            moved = mask.clone().reshape(-1)
            moved[draw(st.sampled_from(active), label="move from")] = False
            moved[draw(st.sampled_from(inactive), label="move to")] = True
            moved = moved.reshape(spec.shape)
            ours = nm_violation(s, spec, moved, budget)
            if ours is not None and s.satisfied(moved, spec, budget):
                _fail(check, s, where, f"satisfied() accepts a mask that breaks N:M: {ours}")

    run_examples(check, example, cost=FAST, max_examples=max_examples)
