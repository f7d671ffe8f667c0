"""The ``unstructured`` structure: one group per layer holding exactly the budget."""

from __future__ import annotations

import math

import attrs
import torch

from sparsity_core import LayerSpec, hookimpl
from sparsity_core.errors import UpdateError
from sparsity_core.selection import topk_mask


@attrs.frozen
class Unstructured:
    """Any mask with exactly the layer's budget of active weights."""

    def validate(self, spec: LayerSpec) -> None:
        """Every non-empty layer can be unstructured-sparse."""

    def budget(self, spec: LayerSpec, density: float) -> int:
        return math.floor(density * spec.numel + 0.5)

    def keep(
        self, scores: torch.Tensor, mask: torch.Tensor, fraction: float, spec: LayerSpec
    ) -> torch.Tensor:
        active = int(mask.sum())
        # Only as many as can be regrown from positions inactive before this update.
        n_drop = min(math.floor(fraction * active), spec.numel - active)
        return topk_mask(scores, active - n_drop, mask)

    def fill(
        self,
        scores: torch.Tensor,
        base: torch.Tensor,
        candidates: torch.Tensor,
        budget: int,
        spec: LayerSpec,
    ) -> torch.Tensor:
        need = budget - int(base.sum())
        if need < 0:
            raise UpdateError(f"layer {spec.fqn!r}: base holds more than the budget {budget}.")
        return base | topk_mask(scores, need, candidates & ~base)

    def satisfied(self, mask: torch.Tensor, spec: LayerSpec, budget: int) -> bool:
        return (
            mask.dtype == torch.bool
            and tuple(mask.shape) == spec.shape
            and int(mask.sum()) == budget
        )


@hookimpl
def sparsity_register_structures(register) -> None:
    register("unstructured", Unstructured, summary="exactly the budget per layer, anywhere")
