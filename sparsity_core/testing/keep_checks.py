"""Checks for the drop (``keep``): what it keeps, and how many it drops.

``keep(scores, mask, fraction, spec)`` must keep the highest-scored active weights the structure
allows and drop ``fraction`` of them, rounded as the structure rounds. Both are judged from the
structure's own behaviour, so they hold for any structure, not only the built-in grouped ones:

* *Highest scores.* Where a kept position ``p`` scores below a dropped one ``q``, ``keep`` is
  run again with the two scores exchanged. If ``q`` is then kept and ``p`` dropped, the
  structure decides between the two by their scores and prefers the lower one: a violation. A
  structure that cannot trade ``p`` for ``q`` (``p``'s group may drop no more, or they sit in
  blocks kept whole) keeps ``p`` either way, and passes. Non-finite scores are the lowest
  priority. The pairs tried are the layer's widest and narrowest inversions and the widest of
  each group (a row of the structure's ``to_groups`` view where it has one, else an output
  neuron).
* *Count.* ``keep`` drops ``fraction * active`` weights, or what it drops at fraction 1 when
  that is fewer (never more than can be regrown), missing it by less than one weight. The
  shared drop routine of the built-ins rounds the layer's count once. A structure that rounds
  more coarsely (one count per neuron, whole blocks) declares by how many weights it may miss
  with a ``drop_tolerance`` attribute: an int, or a function of the layer spec.

The same two judgements run on every update of a training run in
:func:`~sparsity_core.testing.check_method_drop_keeps_highest` and
:func:`~sparsity_core.testing.check_method_drop_count`.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import assume
from hypothesis import strategies as st

from ..layers import LayerSpec
from ._common import FAST, Draw, _call, _check_mask_value, _count, _fail, run_examples
from ._structure_strategies import structured_masks
from ._tensor_strategies import scores
from .structure_checks import _draw_case, _fine, _where

__all__ = [
    "check_structure_keep_drop_count",
    "check_structure_keep_highest",
    "drop_count_violation",
    "drop_tolerance",
    "keep_highest_violation",
]

# Inversions of single units tried per keep() call, beyond the layer's two.
_PAIRS = 4


def _key(values: torch.Tensor) -> torch.Tensor:
    """Scores as a flat float64 priority: non-finite values lowest (the protocols' rule)."""
    key = values.detach().reshape(-1).double()
    return key.masked_fill(~torch.isfinite(key), float("-inf"))


def _units(structure: Any, spec: LayerSpec) -> torch.Tensor:
    """``[units, size]`` flat positions (-1 for padding): the structure's groups, else rows."""
    flat = torch.arange(spec.numel).reshape(spec.shape)
    fine, _ = _fine(structure)
    to_groups = getattr(fine, "to_groups", None)
    if callable(to_groups):
        try:
            units = to_groups(flat, spec, -1)
            if isinstance(units, torch.Tensor) and units.dim() == 2:
                return units
        except Exception:  # a grouping the kit cannot read: fall back to neurons
            pass
    return flat.reshape(spec.fan_out, -1)


def _inversions_by_row(
    key: torch.Tensor,
    units: torch.Tensor,
    kept: torch.Tensor,
    dropped: torch.Tensor,
    most: int,
    *,
    closest: bool = False,
) -> list[tuple[int, int]]:
    """Up to ``most`` pairs ``(p, q)``, one per row of ``units`` (flat positions, -1 padding), a
    kept ``p`` scoring strictly below a dropped ``q``, largest gap first. Each row's is its
    lowest kept against its highest dropped, or (``closest``) its highest kept against its
    lowest dropped. Vectorised: one pass however many rows."""
    real = units >= 0
    at = units.clamp(min=0)
    values = key[at]
    inf = float("inf")
    kept_at, dropped_at = real & kept[at], real & dropped[at]
    if closest:
        low = torch.where(kept_at, values, -inf).max(dim=1)
        high = torch.where(dropped_at, values, inf).min(dim=1)
    else:
        low = torch.where(kept_at, values, inf).min(dim=1)
        high = torch.where(dropped_at, values, -inf).max(dim=1)
    gap = high.values - low.values
    rows = torch.nonzero((gap > 0) & kept_at.any(dim=1) & dropped_at.any(dim=1)).flatten()
    rows = rows[torch.argsort(gap[rows], descending=True, stable=True)[:most]]
    p, q = at[rows, low.indices[rows]], at[rows, high.indices[rows]]
    return list(zip(p.tolist(), q.tolist(), strict=True))


def _inversions(
    structure: Any, spec: LayerSpec, key: torch.Tensor, kept: torch.Tensor, mask: torch.Tensor
) -> list[tuple[int, int]]:
    """Up to ``2 + _PAIRS`` pairs ``(p, q)``, kept ``p`` scoring strictly below dropped ``q``:
    the layer's widest and narrowest inversion, then the widest of each unit, widest first."""
    kept, dropped = kept.reshape(-1), (mask & ~kept).reshape(-1)
    layer = torch.arange(spec.numel).reshape(1, -1)
    out = _inversions_by_row(key, layer, kept, dropped, 1)
    for pair in [
        *_inversions_by_row(key, layer, kept, dropped, 1, closest=True),
        *_inversions_by_row(key, _units(structure, spec), kept, dropped, _PAIRS + 2),
    ]:
        if pair not in out and len(out) < _PAIRS + 2:
            out.append(pair)
    return out


def keep_highest_violation(
    structure: Any,
    spec: LayerSpec,
    scores: torch.Tensor,
    mask: torch.Tensor,
    fraction: float,
    kept: torch.Tensor,
) -> str | None:
    """``None`` if ``kept = structure.keep(scores, mask, fraction, spec)`` keeps the higher score
    of every pair tried that the structure trades by score, else what breaks it (see the module
    docstring).

    Calls ``structure.keep`` once per pair tried, with the pair's scores exchanged.
    """
    kept = kept & mask
    key = _key(scores)
    for p, q in _inversions(structure, spec, key, kept, mask):
        swapped = scores.clone().reshape(-1)
        swapped[p], swapped[q] = scores.reshape(-1)[q], scores.reshape(-1)[p]
        again = structure.keep(swapped.reshape(scores.shape), mask, fraction, spec).reshape(-1)
        if bool(again[q]) and not bool(again[p]):
            return (
                f"keep() kept position {_position(spec, p)} (score {float(key[p]):.4g}) but "
                f"dropped {_position(spec, q)} (score {float(key[q]):.4g}), and with their scores "
                f"exchanged it keeps the second and drops the first: of the two it keeps the "
                f"lower score (does keep() rank by -scores, or drop the highest?)"
            )
    return None


def _position(spec: LayerSpec, flat: int) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), spec.shape))


def drop_tolerance(structure: Any, spec: LayerSpec) -> int:
    """By less than how many weights ``structure``'s drop may miss ``fraction * active`` on
    ``spec``: its ``drop_tolerance`` attribute (or that of a structure it wraps), else 1."""
    while structure is not None:
        declared = getattr(structure, "drop_tolerance", None)
        if declared is not None:
            value = declared(spec) if callable(declared) else declared
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"{type(structure).__name__}.drop_tolerance gave {value!r} for layer "
                    f"{spec.fqn!r}; it must be an integer >= 1 (the drop may miss fraction * "
                    f"active by less than that many weights)."
                )
            return value
        structure = getattr(structure, "inner", None)
    return 1


def drop_count_violation(
    structure: Any,
    spec: LayerSpec,
    scores: torch.Tensor,
    mask: torch.Tensor,
    fraction: float,
    kept: torch.Tensor,
) -> str | None:
    """``None`` if ``kept`` drops ``fraction`` of ``mask``'s active weights (or, when fewer,
    what ``structure.keep`` drops from it at fraction 1: the cap of what can be regrown) within
    the structure's tolerance, else what is wrong."""
    active = _count(mask)
    most = active - _count(structure.keep(scores, mask, 1.0, spec) & mask)
    dropped = active - _count(kept & mask)
    asked = fraction * active
    target = min(asked, most)
    tolerance = drop_tolerance(structure, spec)
    if abs(dropped - target) < tolerance:
        return None
    capped = f", capped at the {most} it drops at fraction 1" if most < asked else ""
    return (
        f"keep() dropped {dropped} of {active} active weights ({dropped / active:.1%}) at "
        f"fraction {fraction!r}, where {asked:.4g} were asked{capped}: {abs(dropped - target):.4g} "
        f"off, not less than {tolerance} (drop floor(fraction * active) weights; a structure "
        f"that rounds more coarsely, e.g. per neuron, declares drop_tolerance)"
    )


def _draw_drops(check: str, draw: Draw, structure: Any) -> tuple[Any, ...]:
    """A structure variant, a layer with inactive positions, its budget, a mask satisfying the
    structure, scores, and one to three drop fractions in (0, 1] to judge ``keep`` at."""
    s, spec, budget = _draw_case(check, draw, structure)
    assume(budget < spec.numel)  # a full layer can drop nothing: check_structure_keep sees it
    mask = draw(structured_masks(s, spec, budget=budget, ablate=st.booleans()), label="mask")
    values = draw(scores(spec.shape, ties=st.booleans(), nonfinite=st.booleans()), label="scores")
    one = st.sampled_from([0.3, 0.5, 1.0]) | st.floats(0.01, 1.0)
    fractions = draw(st.lists(one, min_size=1, max_size=3), label="fractions")
    return s, spec, budget, mask, values, fractions


def _keep_check(check: str, structure: Any, judge: Any, max_examples: int | None) -> None:
    """Run ``judge(s, spec, scores, mask, fraction, kept)`` (a violation or None) on drawn drops."""

    def example(draw: Draw) -> None:
        s, spec, budget, mask, values, fractions = _draw_drops(check, draw, structure)
        for fraction in fractions:
            where = f"{_where(spec, budget)} at fraction {fraction!r}"
            kept = _call(
                check, s, where, "keep()", lambda f=fraction: s.keep(values, mask, f, spec)
            )
            kept = _check_mask_value(check, s, spec, kept, "keep()")
            broken = _call(
                check,
                s,
                where,
                "keep()",
                lambda f=fraction, k=kept: judge(s, spec, values, mask, f, k),
            )
            if broken is not None:
                _fail(check, s, where, broken)

    run_examples(check, example, cost=FAST, max_examples=max_examples)


def check_structure_keep_highest(structure: Any, *, max_examples: int | None = None) -> None:
    """``keep`` keeps the highest scores the structure allows: where it keeps a weight scoring
    below one it drops, exchanging the two scores must not make it keep the second and drop the
    first (it would be choosing the lower score); non-finite scores count as the lowest."""
    _keep_check("check_structure_keep_highest", structure, keep_highest_violation, max_examples)


def check_structure_keep_drop_count(structure: Any, *, max_examples: int | None = None) -> None:
    """``keep`` drops the requested fraction of the active weights (or, when fewer, what it drops
    at fraction 1), missing it by less than one weight unless the structure declares a larger
    ``drop_tolerance``."""
    _keep_check("check_structure_keep_drop_count", structure, drop_count_violation, max_examples)
