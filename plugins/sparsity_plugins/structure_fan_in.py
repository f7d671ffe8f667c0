"""The ``constant_fan_in`` structure: every output neuron has exactly k active inputs."""

from __future__ import annotations

import math

import attrs
import torch

from sparsity_core import LayerSpec, hookimpl
from sparsity_core.errors import UpdateError
from sparsity_core.structures import GroupedStructure, StructureCapabilities, active_rows_of


@attrs.frozen
class ConstantFanIn(GroupedStructure):
    """Rows of the ``[fan_out, fan_in]`` view (output neurons / channels) each keep k inputs.

    ``k = round(density * fan_in)`` alone, so the layer budget is ``k * fan_out``; planning
    then rounds every layer's ``k`` together (one input per neuron up or down) so the model's
    total meets the global density (``budget_step``). Under neuron ablation the layer budget
    is spread over the active neurons: ``k = budget // active``, and the remainder moves to
    other layers.
    """

    capabilities = StructureCapabilities(per_neuron=True, constant_fan_in=True)

    def describe(self) -> str:
        return "constant_fan_in"

    def group_shape(self, spec: LayerSpec) -> tuple[int, int]:
        return spec.fan_out, spec.fan_in

    def budget(self, spec: LayerSpec, density: float) -> int:
        return math.floor(density * spec.fan_in + 0.5) * spec.fan_out

    def budget_step(self, spec: LayerSpec, mask: torch.Tensor | None = None) -> int:
        """One more input per active neuron."""
        if mask is None:
            return spec.fan_out
        return max(1, int(active_rows_of(mask).sum()))

    def min_active_rows(self, spec: LayerSpec, budget: int) -> int:
        return max(1, math.ceil(budget / spec.fan_in))

    def group_counts(
        self,
        spec: LayerSpec,
        budget: int,
        device: torch.device,
        active_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if active_rows is None:
            return torch.full(
                (spec.fan_out,), budget // spec.fan_out, dtype=torch.long, device=device
            )
        active_rows = active_rows.to(device)
        n_active = int(active_rows.sum())
        if n_active < self.min_active_rows(spec, budget):
            raise UpdateError(
                f"layer {spec.fqn!r}: {n_active} active neurons cannot hold {budget} weights "
                f"with fan-in at most {spec.fan_in}."
            )
        return active_rows.long() * (budget // n_active)


@hookimpl
def sparsity_register_structures(register) -> None:
    register("constant_fan_in", ConstantFanIn, summary="every output neuron keeps exactly k inputs")
