"""The ``neuron_ablation`` structure (SRigL): remove neurons with too few salient weights.

At every update, a neuron's salient weights are those that survive the drop plus those among
the layer's top growth candidates (as many as the update grows). A neuron with fewer than
``gamma_sal * k`` salient weights (``k`` its current fan-in) is ablated: all its weights are
dropped and its budget is spread over the remaining neurons, so the fan-in stays constant
(``k = budget // active neurons``; the weights that do not divide evenly are left out and
reported through ``realized_budget``). Under N:M, whose N per group is fixed, the ablated
neuron's weights leave the layer's count instead.

Rules:
* Ablated neurons are not revived: once a neuron's budget has moved to the others it stays there.
* At least ``max(ceil(min_active_fraction * fan_out), ceil(budget / fan_in))`` neurons stay
  active; when the rule would ablate more, the least salient go first.
* Fewer neurons are ablated than the rule asks when the survivors could not be refilled to the
  larger fan-in from their own previously inactive inputs (a drop is never undone).
* Where the budget is spread (constant fan-in) and does not divide evenly over the survivors,
  the next least salient neurons are ablated too when survivors at fan-in ``k + 1`` would put
  more of the budget to use than those neurons hold salient weights (at most ``k`` weights are
  then left out). E.g. a fan-in-40 layer with budget 1024 ablated from 256 to 208 neurons
  would keep 208 x 4 = 832 weights (19% of its budget unused); ablating 4 more keeps
  204 x 5 = 1020.
* Layers matching ``exempt`` (fnmatch patterns, e.g. the output layer) are never ablated.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, ClassVar

import attrs
import torch

from sparsity_core import LayerSpec, hookimpl
from sparsity_core.selection import count, row_counts, topk_mask
from sparsity_core.structures import (
    StructureCapabilities,
    active_rows_of,
    describe,
    fixed_density,
    structure_capabilities,
)

from ._validators import str_tuple, unit_interval


@attrs.frozen
class NeuronAblation:
    """Neuron ablation: a coarse structure that wraps ``constant_fan_in`` or ``nm``."""

    capabilities: ClassVar[StructureCapabilities] = StructureCapabilities(neuron_level=True)

    gamma_sal: float = attrs.field(default=0.3, converter=float, validator=unit_interval)
    min_active_fraction: float = attrs.field(default=0.0, converter=float, validator=unit_interval)
    exempt: tuple[str, ...] = attrs.field(default=(), converter=str_tuple)

    def wrap(self, inner: Any) -> AblatedStructure:
        return AblatedStructure(self, inner)


def _rows(spec: LayerSpec, t: torch.Tensor) -> torch.Tensor:
    return t.reshape(spec.fan_out, -1)


@attrs.frozen
class AblatedStructure:
    """``inner`` with neuron ablation applied before each grow (the composed structure)."""

    ablation: NeuronAblation
    inner: Any

    @property
    def capabilities(self) -> StructureCapabilities:
        """The inner structure's, plus ablation (constant fan-in survives it, over fewer rows)."""
        return attrs.evolve(structure_capabilities(self.inner), ablates=True)

    def describe(self) -> str:
        return f"neuron_ablation + {describe(self.inner)}"

    def _exempt(self, spec: LayerSpec) -> bool:
        return any(fnmatch.fnmatchcase(spec.fqn, p) for p in self.ablation.exempt)

    def _min_rows(self, spec: LayerSpec, budget: int) -> int:
        by_fraction = math.ceil(self.ablation.min_active_fraction * spec.fan_out)
        return max(by_fraction, self.inner.min_active_rows(spec, budget), 1)

    def validate(self, spec: LayerSpec) -> None:
        self.inner.validate(spec)

    def budget(self, spec: LayerSpec, density: float) -> int:
        return self.inner.budget(spec, density)

    def fixed_density(self, spec: LayerSpec) -> float | None:
        return fixed_density(self.inner, spec)

    def min_active_rows(self, spec: LayerSpec, budget: int) -> int:
        return self._min_rows(spec, budget)

    def realized_budget(
        self, spec: LayerSpec, budget: int, mask: torch.Tensor | None = None
    ) -> int:
        if mask is None or self._exempt(spec):
            return budget
        counts = self.inner.group_counts(spec, budget, mask.device, active_rows_of(mask))
        return int(counts.sum())

    def keep(
        self, scores: torch.Tensor, mask: torch.Tensor, fraction: float, spec: LayerSpec
    ) -> torch.Tensor:
        return self.inner.keep(scores, mask, fraction, spec)

    def _row_counts(self, spec: LayerSpec, budget: int, active: torch.Tensor) -> torch.Tensor:
        counts = self.inner.group_counts(spec, budget, active.device, active)
        return counts.reshape(spec.fan_out, -1).sum(dim=1)

    def fill(
        self,
        scores: torch.Tensor,
        base: torch.Tensor,
        candidates: torch.Tensor,
        budget: int,
        spec: LayerSpec,
        *,
        previous: torch.Tensor | None = None,
        active_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if previous is None or self._exempt(spec):
            # The initial mask (and exempt layers) keep every neuron.
            return self.inner.fill(scores, base, candidates, budget, spec)
        active_old = active_rows_of(previous)
        k_old = self._row_counts(spec, budget, active_old)
        pool = candidates & ~base & active_old.reshape(-1, *([1] * (base.dim() - 1)))
        n_grow = int(k_old.sum()) - count(base)
        top = topk_mask(scores, min(max(n_grow, 0), count(pool)), pool)
        salient = row_counts(_rows(spec, base | top))
        below = active_old & (salient < self.ablation.gamma_sal * k_old)
        # Least salient first (the marked ones, then the other active ones; ablated neurons
        # last); never below the minimum of active neurons.
        rank = torch.where(below, salient, torch.where(active_old, salient + 2**40, 2**62))
        order = torch.argsort(rank, stable=True)
        n_old = int(active_old.sum())
        limit = n_old - self._min_rows(spec, budget)
        most = min(int(below.sum()), limit)
        capacity = row_counts(_rows(spec, base | candidates))

        def survivors(n_ablate: int) -> torch.Tensor:
            active = active_old.clone()
            active[order[:n_ablate]] = False
            return active

        def feasible(n_ablate: int) -> bool:
            active = survivors(n_ablate)
            return bool((self._row_counts(spec, budget, active) <= capacity).all())

        lo, hi = 0, max(most, 0)  # lo is always feasible: no ablation refills from inactive inputs
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if feasible(mid):
                lo = mid
            else:
                hi = mid - 1
        held = lambda a0, a1: int(salient[order[a0:a1]].sum())  # noqa: E731
        lo = self._least_lossy(spec, budget, survivors, feasible, held, n_old, lo, limit)
        active_new = survivors(lo)
        keep_rows = active_new.reshape(-1, *([1] * (base.dim() - 1)))
        return self.inner.fill(
            scores, base & keep_rows, candidates & keep_rows, budget, spec, active_rows=active_new
        )

    def _least_lossy(
        self,
        spec: LayerSpec,
        budget: int,
        survivors: Any,
        feasible: Any,
        held: Any,
        n_old: int,
        marked: int,
        limit: int,
    ) -> int:
        """``marked`` (the neurons the rule ablates), or ``marked`` plus the next least salient
        neurons where survivors at fan-in k + 1 instead of k put more of the budget to use than
        those neurons hold salient weights (``held(a0, a1)``: the salient weights of the
        neurons ranked a0..a1-1). Only where the inner structure spreads the budget (not N:M)."""
        if marked <= 0:
            return marked
        # Does the inner structure spread the budget? (Constant fan-in: fewer rows, larger k;
        # N:M: k per row is fixed.) Probed at the fewest rows it accepts.
        probe = torch.zeros(spec.fan_out, dtype=torch.bool)
        probe[: self.inner.min_active_rows(spec, budget)] = True
        full = self._row_counts(spec, budget, torch.ones_like(probe)).max()
        if not bool(self._row_counts(spec, budget, probe).max() > full):
            return marked
        counts = self._row_counts(spec, budget, survivors(marked))
        n_next = budget // (int(counts.max()) + 1)
        more = n_old - n_next
        if more <= marked or more > limit or not feasible(more):
            return marked
        gained = int(self._row_counts(spec, budget, survivors(more)).sum()) - int(counts.sum())
        return more if gained > held(marked, more) else marked

    def satisfied(self, mask: torch.Tensor, spec: LayerSpec, budget: int) -> bool:
        if self._exempt(spec):
            return self.inner.satisfied(mask, spec, budget)
        active = active_rows_of(mask)
        if int(active.sum()) < self._min_rows(spec, budget):
            return False
        return self.inner.satisfied(mask, spec, budget, active_rows=active)


@hookimpl
def sparsity_register_structures(register) -> None:
    register(
        "neuron_ablation",
        NeuronAblation,
        summary="SRigL: ablate neurons with < gamma_sal * k salient weights (wraps a fine one)",
    )
