"""The ``unstructured`` structure: one group per layer holding exactly the budget."""

from __future__ import annotations

import math

import attrs
import torch

from sparsity_core import LayerSpec, hookimpl
from sparsity_core.structures import GroupedStructure


@attrs.frozen
class Unstructured(GroupedStructure):
    """Any mask with exactly the layer's budget of active weights."""

    def describe(self) -> str:
        return "unstructured"

    def group_shape(self, spec: LayerSpec) -> tuple[int, int]:
        return 1, spec.numel

    def group_counts(
        self,
        spec: LayerSpec,
        budget: int,
        device: torch.device,
        active_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return torch.tensor([budget], device=device)

    def budget(self, spec: LayerSpec, density: float) -> int:
        return math.floor(density * spec.numel + 0.5)

    def budget_step(self, spec: LayerSpec, mask: torch.Tensor | None = None) -> int:
        return 1


@hookimpl
def sparsity_register_structures(register) -> None:
    register("unstructured", Unstructured, summary="exactly the budget per layer, anywhere")
