"""Deliberately broken components: each must fail the kit check that guards its invariant."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import attrs
import torch
from sparsity_plugins.distributions import ErdosRenyiKernel
from sparsity_plugins.structure_unstructured import Unstructured

from sparsity_core import LayerSpec, ScoreContext
from sparsity_core.selection import topk_mask


@attrs.frozen
class CandidateBlindFill(Unstructured):
    """fill() ignores ``candidates``, so it can regrow weights dropped in the same update."""

    def fill(self, scores, base, candidates, budget, spec, **kwargs):
        return base | topk_mask(scores, budget - int(base.sum()), ~base)


@attrs.frozen
class DriftingFill(Unstructured):
    """fill() adds one weight more than the budget whenever it can."""

    def fill(self, scores, base, candidates, budget, spec, **kwargs):
        room = candidates & ~base
        need = min(budget - int(base.sum()) + 1, int(room.sum()))
        return base | topk_mask(scores, need, room)


@attrs.frozen
class KeepsInactive(Unstructured):
    """keep() also keeps the first inactive position."""

    def keep(self, scores, mask, fraction, spec):
        keep = super().keep(scores, mask, fraction, spec)
        inactive = torch.nonzero(~mask.reshape(-1))
        if len(inactive):
            keep = keep.clone()
            keep.view(-1)[inactive[0, 0]] = True
        return keep


@attrs.frozen
class OverDroppingKeep(Unstructured):
    """keep() drops ceil(fraction * active) with no cap by the regrowable positions."""

    def keep(self, scores, mask, fraction, spec):
        active = int(mask.sum())
        return topk_mask(scores, active - math.ceil(fraction * active), mask)


@attrs.frozen
class MutatingGrowth:
    """Scores by magnitude after adding 1 to the weight in place."""

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        ctx.weight.add_(1.0)
        return ctx.weight.abs()


@attrs.frozen
class GlobalRngGrowth:
    """Random growth drawn from the global RNG instead of ``ctx.generator``."""

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return torch.rand(ctx.weight.shape, device=ctx.weight.device)


@attrs.frozen
class FlatScoresGrowth:
    """Random growth scores returned flattened (the wrong shape)."""

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return torch.rand(ctx.weight.shape, generator=ctx.generator).reshape(-1)


@attrs.frozen
class TenPercentOver(ErdosRenyiKernel):
    """ERK with every density raised by 10% (capped at 1): the global density is off."""

    def densities(self, layers: Sequence[LayerSpec], density: float) -> Mapping[str, float]:
        return {k: min(1.0, 1.1 * v) for k, v in super().densities(layers, density).items()}


@attrs.frozen
class OverOneDrop:
    """Drops 150% of the active weights."""

    def fraction(self, step: int, t_end: int) -> float:
        return 1.5


@attrs.frozen
class DropsAtZero(Unstructured):
    """keep() drops the lowest-scoring active weight even at fraction 0."""

    def keep(self, scores, mask, fraction, spec):
        active = int(mask.sum())
        return topk_mask(scores, max(active - 1, 0), mask)


@attrs.frozen
class GenerousBudget(Unstructured):
    """budget() rounds up and adds one more weight."""

    def budget(self, spec: LayerSpec, density: float) -> int:
        return min(math.ceil(density * spec.numel) + 1, spec.numel)
