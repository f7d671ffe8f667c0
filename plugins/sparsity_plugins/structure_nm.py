"""The ``nm`` structure: exactly N active weights in every group of M consecutive inputs.

Groups run along the fan-in axis of the ``[fan_out, fan_in]`` view (for a convolution, the
contiguous ``(C_in, kh, kw)`` order), so ``weight.reshape(-1, M)`` lists the groups in order.
"""

from __future__ import annotations

import math

import attrs
import torch

from sparsity_core import LayerSpec, hookimpl
from sparsity_core.errors import ConfigError, LayerError
from sparsity_core.structures import GroupedStructure


def _positive_int(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"nm.{attribute.name}={value!r} must be an integer >= 1.")


@attrs.frozen
class NM(GroupedStructure):
    """N:M semi-structured sparsity (2:4 by default): a fixed density of N/M per layer.

    A layer kept dense by the distribution (density 1) holds all M of every group. Under neuron
    ablation an ablated neuron's groups hold nothing, and its budget is not redistributed: N
    per group is fixed, so the layer keeps ``N * fan_in / M`` weights per active neuron.
    """

    row_grouped = True

    n: int = attrs.field(default=2, validator=_positive_int)
    m: int = attrs.field(default=4, validator=_positive_int)

    @m.validator
    def _n_le_m(self, attribute, value) -> None:
        if self.n > value:
            raise ConfigError(f"nm n={self.n} > m={value}: N:M keeps N of every M, so N <= M.")

    def describe(self) -> str:
        return f"nm {self.n}:{self.m}"

    @property
    def density(self) -> float:
        return self.n / self.m

    def validate(self, spec: LayerSpec) -> None:
        if spec.fan_in % self.m:
            raise LayerError(
                f"layer {spec.fqn!r} has fan-in {spec.fan_in}, not divisible by M={self.m}, so "
                f"it cannot be split into {self.n}:{self.m} groups; exclude it "
                f"(exclude=[{spec.fqn!r}]) or choose an M that divides {spec.fan_in}."
            )

    def group_shape(self, spec: LayerSpec) -> tuple[int, int]:
        return spec.numel // self.m, self.m

    def budget(self, spec: LayerSpec, density: float) -> int:
        if density == 1.0:
            return spec.numel
        if abs(density - self.density) > 1e-9:
            raise LayerError(
                f"structure nm {self.n}:{self.m} fixes layer density at {self.density:g}, but "
                f"layer {spec.fqn!r} was given density {density:.6g} by the distribution; use "
                f"distribution='uniform' with density={self.density:g} (layers listed in "
                f"`dense` stay dense)."
            )
        return spec.numel // self.m * self.n

    def min_active_rows(self, spec: LayerSpec, budget: int) -> int:
        return max(1, math.ceil(budget / spec.fan_in))

    def fixed_density(self, spec: LayerSpec) -> float:
        return self.density

    def group_counts(
        self,
        spec: LayerSpec,
        budget: int,
        device: torch.device,
        active_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        groups = spec.numel // self.m
        per_group = self.m if budget == spec.numel else self.n
        counts = torch.full((groups,), per_group, dtype=torch.long, device=device)
        if active_rows is not None:
            # Groups never span neurons: row r owns groups [r * g, (r + 1) * g).
            counts *= active_rows.to(device).long().repeat_interleave(spec.fan_in // self.m)
        return counts


@hookimpl
def sparsity_register_structures(register) -> None:
    register("nm", NM, summary="exactly N of every M consecutive inputs (default 2:4)")
