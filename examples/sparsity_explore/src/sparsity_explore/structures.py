"""``floor_fan_in``: constant fan-in that never leaves a neuron fewer than ``min_k`` inputs.

At high sparsity a constant fan-in of ``round(density * fan_in)`` leaves narrow layers with one
or two inputs per neuron (a 5-tap first convolution at 90% keeps 0 or 1). This structure keeps
``max(min_k, round(density * fan_in))`` (at most the fan-in) per neuron instead; the distribution's
density is then a lower bound for such layers.

It is a structure no built-in knows, and it only *declares* what it offers
(``StructureCapabilities(per_neuron=True, constant_fan_in=True)``): that alone lets it run under
``neuron_ablation`` and be stored as ``condensed``.
"""

from __future__ import annotations

import math

import attrs
import torch

from sparsity_core import LayerSpec
from sparsity_core.errors import ConfigError, UpdateError
from sparsity_core.structures import GroupedStructure, StructureCapabilities


def _positive(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"floor_fan_in.{attribute.name}={value!r} must be an integer >= 1.")


@attrs.frozen
class FloorFanIn(GroupedStructure):
    """Every output neuron keeps exactly k inputs, ``k = max(min_k, round(density * fan_in))``."""

    capabilities = StructureCapabilities(per_neuron=True, constant_fan_in=True)

    min_k: int = attrs.field(default=2, validator=_positive)

    def describe(self) -> str:
        return f"floor_fan_in (k >= {self.min_k})"

    def group_shape(self, spec: LayerSpec) -> tuple[int, int]:
        return spec.fan_out, spec.fan_in

    def budget(self, spec: LayerSpec, density: float) -> int:
        k = max(self.min_k, math.floor(density * spec.fan_in + 0.5))
        return min(k, spec.fan_in) * spec.fan_out

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
