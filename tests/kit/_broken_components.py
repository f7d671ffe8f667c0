"""Deliberately broken components: each must fail the kit check that guards its invariant."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import attrs
import torch

from sparsity_core import Capabilities, DSTConfig, LayerSpec, ScoreContext
from sparsity_core.compact import CompactLinear
from sparsity_core.selection import topk_mask
from sparsity_formats.condensed import Condensed, CondensedWeight
from sparsity_formats.csr import CSR
from sparsity_formats.dense_masked import DenseMasked, DenseMaskedWeight
from sparsity_plugins.distributions import ErdosRenyiKernel, Uniform, scaled_densities
from sparsity_plugins.structure_fan_in import ConstantFanIn
from sparsity_plugins.structure_nm import NM
from sparsity_plugins.structure_unstructured import Unstructured

# -- criteria -------------------------------------------------------------------------------------


@attrs.frozen
class MutatingGrowth:
    """Scores by magnitude after adding 1 to the weight in place."""

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        ctx.weight.add_(1.0)
        return ctx.weight.abs()


@attrs.frozen
class GlobalRngGrowth:
    """Random growth drawn from the global torch RNG instead of ``ctx.generator``."""

    capabilities: ClassVar[Capabilities] = Capabilities(stochastic=True)

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return torch.rand(ctx.weight.shape, device=ctx.weight.device)


@attrs.frozen
class PythonRandomGrowth:
    """Adds one number from Python's global ``random`` to the gradient magnitude."""

    capabilities: ClassVar[Capabilities] = Capabilities(needs_grad=True)

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.grad.abs() + random.random()


@attrs.frozen
class FlatScoresGrowth:
    """Random growth scores returned flattened (the wrong shape)."""

    capabilities: ClassVar[Capabilities] = Capabilities(stochastic=True)

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return torch.rand(ctx.weight.shape, generator=ctx.generator).reshape(-1)


@attrs.frozen
class DoubleScoresPrune:
    """Magnitude scores in float64 for a float32 weight (the wrong dtype)."""

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.weight.abs().double()


@attrs.frozen
class UndeclaredGradGrowth:
    """Reads the dense gradient without declaring ``needs_grad``."""

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.grad.abs()


@attrs.frozen
class UndeclaredRandomGrowth:
    """Draws from ``ctx.generator`` without declaring ``stochastic``."""

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return torch.rand(ctx.weight.shape, generator=ctx.generator)


@attrs.frozen
class NormalisedGradientGrowth:
    """``|grad| / max |grad|``: 0/0 = NaN everywhere when the gradient is all zero."""

    capabilities: ClassVar[Capabilities] = Capabilities(needs_grad=True)

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.grad.abs() / ctx.grad.abs().max()


@attrs.frozen
class InverseMagnitudePrune:
    """``1 / |w|``: infinite wherever a weight is 0, though every input is finite."""

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return 1.0 / ctx.weight.abs()


# -- structures ----------------------------------------------------------------------------------


@attrs.frozen
class CandidateBlindFill(Unstructured):
    """The grow step ignores ``candidates``: it regrows weights dropped in the same update."""

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
class DropsAtZero(Unstructured):
    """keep() drops the lowest-scoring active weight even at fraction 0."""

    def keep(self, scores, mask, fraction, spec):
        active = int(mask.sum())
        return topk_mask(scores, max(active - 1, 0), mask)


class _KeepsLowest:
    """keep() ranks by the negated scores: it keeps the lowest-scored weights."""

    def keep(self, scores, mask, fraction, spec):
        return super().keep(-scores, mask, fraction, spec)


class _DropsTwice:
    """keep() drops twice the requested fraction (a record still says the requested one)."""

    def keep(self, scores, mask, fraction, spec):
        return super().keep(scores, mask, min(1.0, 2.0 * fraction), spec)


@attrs.frozen
class KeepsLowest(_KeepsLowest, Unstructured):
    """Unstructured, keeping the lowest scores."""


@attrs.frozen
class KeepsLowestNM(_KeepsLowest, NM):
    """N:M, keeping the lowest scores."""


@attrs.frozen
class DropsTwice(_DropsTwice, Unstructured):
    """Unstructured, dropping twice the fraction."""


@attrs.frozen
class DropsTwiceNM(_DropsTwice, NM):
    """N:M, dropping twice the fraction (within one weight per group of M of the request when
    N is 1 or 2, so a tolerance of a weight per group would miss it)."""


@attrs.frozen
class GenerousBudget(Unstructured):
    """budget() rounds up and adds one more weight."""

    def budget(self, spec: LayerSpec, density: float) -> int:
        return min(math.ceil(density * spec.numel) + 1, spec.numel)


@attrs.frozen
class NoisyTieBreakFill(Unstructured):
    """fill() breaks ties with the global RNG, so the same inputs give different masks."""

    def fill(self, scores, base, candidates, budget, spec, **kwargs):
        noisy = torch.nan_to_num(scores.float(), nan=0.0, posinf=1e9, neginf=-1e9)
        return super().fill(noisy + 1e3 * torch.rand(scores.shape), base, candidates, budget, spec)


@attrs.frozen
class OneGroupOffNM(NM):
    """fill() moves one weight of a row's first group into its second group (N+1 and N-1), only
    to a candidate position; satisfied() stays the honest N:M check."""

    def fill(self, scores, base, candidates, budget, spec, **kwargs):
        mask = super().fill(scores, base, candidates, budget, spec, **kwargs)
        if spec.fan_in // self.m < 2 or budget == spec.numel or self.n == self.m:
            return mask
        groups = mask.reshape(-1, self.m).clone()
        free = (candidates.reshape(-1, self.m) & ~groups)[1]
        if not free.any() or not groups[0].any():
            return mask
        groups[0, torch.nonzero(groups[0])[0, 0]] = False
        groups[1, torch.nonzero(free)[0, 0]] = True
        return groups.reshape(mask.shape)


@attrs.frozen
class SkewedNM(NM):
    """Group 0 gets N+1 and group 1 N-1, and satisfied() agrees (both use group_counts)."""

    def group_counts(self, spec, budget, device, active_rows=None):
        counts = super().group_counts(spec, budget, device, active_rows).clone()
        if counts.numel() > 1 and budget != spec.numel and self.n < self.m and counts[1] > 0:
            counts[0] += 1
            counts[1] -= 1
        return counts


@attrs.frozen
class CountOnlyNM(NM):
    """satisfied() only counts the active weights, not N per group."""

    def satisfied(self, mask, spec, budget, active_rows=None):
        return int(mask.sum()) == budget


@attrs.frozen
class AlwaysSatisfied(Unstructured):
    """satisfied() accepts anything."""

    def satisfied(self, mask, spec, budget, active_rows=None):
        return True


@attrs.frozen
class UncheckedNM(NM):
    """validate() accepts fan-ins M does not divide, and the grouping does not pad them."""

    def validate(self, spec: LayerSpec) -> None:
        return None

    def to_groups(self, tensor, spec, fill):
        return tensor.reshape(-1, self.m)


@attrs.frozen
class AssertingNM(NM):
    """validate() reports a bad fan-in with ValueError, not LayerError."""

    def validate(self, spec: LayerSpec) -> None:
        if spec.fan_in % self.m:
            raise ValueError("bad fan-in")


# -- distributions and schedules ---------------------------------------------------------------


@attrs.frozen
class TenPercentOver(ErdosRenyiKernel):
    """ERK with every density raised by 10% (capped at 1): the global density is off."""

    def densities(self, layers, density, fixed=None):
        out = super().densities(layers, density, fixed)
        return {k: min(1.0, 1.1 * v) for k, v in out.items()}


@attrs.frozen
class GridDensities(Uniform):
    """Uniform densities rounded down to a grid of 0.1: small targets become 0."""

    def densities(self, layers, density, fixed=None):
        return {k: math.floor(v * 10) / 10 for k, v in super().densities(layers, density).items()}


@attrs.frozen
class IgnoresFixed(ErdosRenyiKernel):
    """Drops ``fixed`` (the densities a structure pins) and the ``dense`` patterns."""

    def densities(
        self, layers: Sequence[LayerSpec], density: float, fixed: Mapping[str, float] | None = None
    ) -> Mapping[str, float]:
        return scaled_densities(self, layers, density, self.raw, ())


@attrs.frozen
class OverOneDrop:
    """Drops 150% of the active weights."""

    def fraction(self, step: int, t_end: int) -> float:
        return 1.5


@attrs.frozen
class NaNAtEndDrop:
    """A constant 0.3 that turns into NaN at ``t_end`` (as ``0 / 0`` would)."""

    def fraction(self, step: int, t_end: int) -> float:
        return 0.3 if step < t_end else float("nan")


# -- formats ---------------------------------------------------------------------------------


@attrs.frozen
class InferringCSR(CSR):
    """Zeroes dead weights, then infers the mask from ``weight != 0``: drops live zeros."""

    def pack(self, weight: torch.Tensor, mask: torch.Tensor) -> Any:
        masked = weight.masked_fill(~mask, 0)
        return super().pack(masked, masked != 0)


@attrs.frozen
class LeakyDense(DenseMasked):
    """Stores the weight as given: unpack returns the inactive values too."""

    def pack(self, weight: torch.Tensor, mask: torch.Tensor) -> DenseMaskedWeight:
        return DenseMaskedWeight(weight.detach().clone(), mask.clone())


@attrs.frozen
class BiasOnlyWhereLive(CSR):
    """An all-off neuron outputs 0 instead of its bias."""

    def linear(self, packed: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> Any:
        out = super().linear(packed, x, bias)
        dead = packed.matrix.crow_indices().diff() == 0
        return out.masked_fill(dead, 0)


@attrs.frozen
class SilentCondensed(Condensed):
    """Packs a mask that is not constant fan-in by keeping each neuron's first k inputs (k the
    fewest any active neuron has) instead of refusing it."""

    def pack(self, weight: torch.Tensor, mask: torch.Tensor) -> CondensedWeight:
        rows = mask.reshape(mask.shape[0], -1)
        counts = rows.sum(dim=1)
        active = counts > 0
        if active.any():
            k = int(counts[active].min())
            rank = rows.long().cumsum(dim=1)
            rows = rows & (rank <= k) & active.unsqueeze(1)
        return super().pack(weight, rows.reshape(mask.shape))


# -- presets ---------------------------------------------------------------------------------


def preset_ignoring_overrides(**overrides: Any) -> DSTConfig:
    """Always RigL at density 0.1, whatever the caller asks."""
    return DSTConfig(prune="magnitude", grow="gradient", density=0.1)


def preset_without_overrides() -> DSTConfig:
    """Takes no keyword arguments at all."""
    return DSTConfig(prune="magnitude", grow="gradient")


# -- re-initialisations ---------------------------------------------------------------------


@attrs.frozen
class WholeRowScale:
    """Broken: scales whole rows, inactive positions included."""

    def apply_(self, weight, mask, spec, generator):
        weight.mul_(2.0)


@attrs.frozen
class ZeroFanInScale:
    """Broken: scales by ``sqrt(fan_in / (k - 1))``: Inf on a neuron with one active input."""

    def apply_(self, weight, mask, spec, generator):
        k = mask.reshape(spec.fan_out, -1).sum(dim=1).reshape(-1, *([1] * (mask.dim() - 1)))
        scale = (spec.fan_in / (k - 1).to(weight.dtype)).sqrt()
        weight.copy_(torch.where(mask, weight * scale, weight))


@attrs.frozen
class GlobalRngReinit:
    """Broken: draws from torch's global generator."""

    def apply_(self, weight, mask, spec, generator):
        weight.copy_(torch.where(mask, torch.randn(weight.shape), weight))


@attrs.frozen
class WholeTensorFreshStep:
    """Broken: applies its correction to every weight, not only the grown ones."""

    tracks_age = True

    def check(self, optimizer, param, fqn):
        return None

    def after_step(self, optimizer, param, index, born):
        with torch.no_grad():
            param.mul_(0.5)
        return None


@attrs.frozen
class OffByOneFreshStep:
    """Broken: corrects the weight after each grown one (an off-by-one index), which may be
    inactive."""

    tracks_age = True

    def check(self, optimizer, param, fqn):
        return None

    def after_step(self, optimizer, param, index, born):
        flat = param.view(-1)
        with torch.no_grad():
            flat.index_add_(
                0, (index + 1) % flat.numel(), torch.full(index.shape, 1e-3, dtype=param.dtype)
            )
        return None


@attrs.frozen
class NaNFreshStep:
    """Broken: ``1/born - 1/born``, NaN for a weight grown at step 0."""

    tracks_age = True

    def check(self, optimizer, param, fqn):
        return None

    def after_step(self, optimizer, param, index, born):
        with torch.no_grad():
            param.view(-1).index_add_(0, index, (1 / born - 1 / born).to(param.dtype))
        return torch.ones_like(index, dtype=torch.bool)


@attrs.frozen
class WrongStepFanIn(ConstantFanIn):
    """Broken: declares a budget step of 1 weight, but a constant fan-in moves a whole column."""

    def budget_step(self, spec, mask=None):
        return 1


# -- compact layers -------------------------------------------------------------------------------


class ForgetfulRelayout(CompactLinear):
    """Moves the weights to the new layout but resets the optimizer state of survivors too."""

    def relayout_(self, mask, state=None):
        super().relayout_(mask, None)
        for tensor in (state or {}).values():
            tensor.zero_()


class DroppedSlotGrad(CompactLinear):
    """Loses the gradient of its first active weight."""

    def _backward(self, x, values, grad_out, need_x, need_values):
        grad_x, grad_values = super()._backward(x, values, grad_out, need_x, need_values)
        if grad_values is not None and self.nnz:
            grad_values[0] = 0
        return grad_x, grad_values


class StaleForward(CompactLinear):
    """Its forward leaves out the last active weight."""

    def _product(self, x, values, bias):
        if self.nnz:
            values = values.clone()
            values[self.nnz - 1] = 0
        return super()._product(x, values, bias)


class NoCapture(CompactLinear):
    """Never forms the dense gradient that gradient-based growth needs."""

    def _capture(self, dense_grad):
        pass
