"""The ``neuron_ablation`` structure (SRigL): remove neurons with too few salient weights.

At every update, a neuron's salient weights are those the drop keeps plus those among the
layer's ``n_drop`` highest growth scores over all its positions (``n_drop``: how many weights
this update drops; as in SRigL, a weight counts once when it is both). A neuron with fewer
than ``max(1, floor(gamma_sal * k))`` salient weights is ablated, ``k`` being the layer's
fan-in before any ablation (``budget / fan_out`` under constant fan-in; it does not rise as
neurons go). An ablated neuron's weights are all dropped and its budget is spread over the
other neurons, so the fan-in stays constant (``k' = budget // active``); what does not divide
evenly is reported through ``realized_budget`` and, under ``DSTConfig.budget_rounding =
"global"``, moves to other layers. Under N:M, whose N per group is fixed, the ablated neuron's
weights leave the layer's count instead.

Rules:
* The rule is applied to every neuron at every update: a neuron ablated earlier becomes
  active again (grown from nothing) when it is salient again.
* At least ``max(ceil(min_active_fraction * fan_out), ceil(budget / fan_in))`` neurons stay
  active; when the rule would ablate more, the least salient go first.
* When the rule's neurons could not all be refilled to the new fan-in (a drop is never undone,
  and no neuron may keep more than the fan-in), the rule is applied to the neurons active
  before only, ablating fewer of them until the survivors fit.
* The model's output layer (its last Linear or convolution in module order; ``exempt_output``)
  and layers matching ``exempt`` (fnmatch patterns) are never ablated.
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
    budget_step,
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
    exempt_output: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))

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

    def for_layer(self, spec: LayerSpec, *, output: bool) -> Any:
        """The structure for one layer: on the model's output layer (its neurons are the
        outputs) the inner one alone, unless ``exempt_output`` is off."""
        return self.inner if output and self.ablation.exempt_output else self

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

    def budget_step(self, spec: LayerSpec, mask: torch.Tensor | None = None) -> int | None:
        return budget_step(self.inner, spec, mask)

    def threshold(self, spec: LayerSpec, budget: int) -> int:
        """Fewest salient weights a neuron needs to stay: ``max(1, floor(gamma_sal * k))``
        with ``k`` the layer's fan-in before any ablation (``budget / fan_out`` under constant
        fan-in), so it never rises as neurons are ablated. ``gamma_sal = 0`` ablates nothing."""
        if self.ablation.gamma_sal == 0.0:
            return 0
        full = torch.ones(spec.fan_out, dtype=torch.bool)
        k = int(self._row_counts(spec, budget, full).max())
        return max(1, math.floor(self.ablation.gamma_sal * k + 1e-9))

    def salient_counts(
        self, scores: torch.Tensor, base: torch.Tensor, previous: torch.Tensor, spec: LayerSpec
    ) -> torch.Tensor:
        """Salient weights per neuron: those the drop keeps, plus the layer's ``n_drop``
        highest growth scores over every position (active, just dropped or inactive, in any
        neuron, ablated ones included), ``n_drop`` being how many this update drops."""
        n_drop = count(previous) - count(base)
        everywhere = torch.ones_like(base)
        top = topk_mask(scores, min(max(n_drop, 0), base.numel()), everywhere)
        return row_counts(_rows(spec, base | top))

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
        planned: int | None = None,
    ) -> torch.Tensor:
        """Ablate by the rule, then fill the active neurons to ``budget`` (what the layer holds
        now). ``planned`` (the layer's planned budget, given by the engine) sets the ``k`` of the
        threshold, so moving budget between layers never moves the threshold."""
        if active_rows is not None:
            # The neurons are decided (a global rebalance resizes the layer): fill them.
            rows = active_rows.reshape(-1, *([1] * (base.dim() - 1)))
            return self.inner.fill(
                scores, base & rows, candidates & rows, budget, spec, active_rows=active_rows
            )
        if previous is None or self._exempt(spec):
            # The initial mask (and exempt layers) keep every neuron.
            return self.inner.fill(scores, base, candidates, budget, spec)
        salient = self.salient_counts(scores, base, previous, spec)
        below = salient < self.threshold(spec, budget if planned is None else planned)
        capacity = row_counts(_rows(spec, base | candidates))
        kept = row_counts(_rows(spec, base))
        n_min = self._min_rows(spec, budget)

        def fits(active: torch.Tensor) -> bool:
            # Every active neuron can be refilled to the new fan-in from what it kept and its
            # previously inactive inputs (a drop is never undone), and none kept more.
            k = self._row_counts(spec, budget, active)
            return bool(((k <= capacity) & (~active | (k >= kept))).all())

        # The rule over every neuron (a neuron ablated before comes back when it is salient
        # again), least salient first, never below the minimum of active neurons. When the
        # minimum keeps some neurons below the threshold, they are ones active before: an
        # ablated neuron that is not salient stays ablated (it goes first).
        was_active = active_rows_of(previous)
        order = torch.argsort(
            torch.where(below & ~was_active, salient - 2**40, salient), stable=True
        )
        n_ablate = max(min(int(below.sum()), spec.fan_out - n_min), 0)
        active_new = torch.ones(spec.fan_out, dtype=torch.bool, device=base.device)
        active_new[order[:n_ablate]] = False
        if not fits(active_new):
            active_new = self._among_active(spec, budget, previous, salient, below, fits)
        keep_rows = active_new.reshape(-1, *([1] * (base.dim() - 1)))
        return self.inner.fill(
            scores, base & keep_rows, candidates & keep_rows, budget, spec, active_rows=active_new
        )

    def _among_active(
        self,
        spec: LayerSpec,
        budget: int,
        previous: torch.Tensor,
        salient: torch.Tensor,
        below: torch.Tensor,
        fits: Any,
    ) -> torch.Tensor:
        """The rule restricted to the neurons active before (no revival), ablating fewer of
        them while the survivors could not be refilled; ablating none always fits."""
        active_old = active_rows_of(previous)
        marked = active_old & below
        rank = torch.where(marked, salient, torch.where(active_old, salient + 2**40, 2**62))
        order = torch.argsort(rank, stable=True)
        limit = int(active_old.sum()) - self._min_rows(spec, budget)
        lo, hi = 0, max(min(int(marked.sum()), limit), 0)

        def survivors(n: int) -> torch.Tensor:
            active = active_old.clone()
            active[order[:n]] = False
            return active

        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(survivors(mid)):
                lo = mid
            else:
                hi = mid - 1
        return survivors(lo)

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
