"""The ``constant_fan_in`` structure: every output neuron has exactly k active inputs."""

from __future__ import annotations

import math

import attrs
import torch

from sparsity_core import LayerSpec, hookimpl
from sparsity_core.structures import GroupedStructure


@attrs.frozen
class ConstantFanIn(GroupedStructure):
    """Rows of the ``[fan_out, fan_in]`` view (output neurons / channels) each keep k inputs.

    ``k = round(density * fan_in)``, so the layer budget is ``k * fan_out`` and the achieved
    density differs from the requested one by less than half an input per neuron.
    """

    def group_shape(self, spec: LayerSpec) -> tuple[int, int]:
        return spec.fan_out, spec.fan_in

    def budget(self, spec: LayerSpec, density: float) -> int:
        return math.floor(density * spec.fan_in + 0.5) * spec.fan_out

    def group_counts(self, spec: LayerSpec, budget: int, device: torch.device) -> torch.Tensor:
        return torch.full((spec.fan_out,), budget // spec.fan_out, dtype=torch.long, device=device)


@hookimpl
def sparsity_register_structures(register) -> None:
    register("constant_fan_in", ConstantFanIn, summary="every output neuron keeps exactly k inputs")
