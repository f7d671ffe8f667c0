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
from sparsity_core.structures import GroupedStructure, StructureCapabilities


def _positive_int(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"nm.{attribute.name}={value!r} must be an integer >= 1.")


@attrs.frozen
class NM(GroupedStructure):
    """N:M semi-structured sparsity (2:4 by default): a fixed density of N/M per layer.

    A layer kept dense by the distribution (density 1) holds all M of every group. Under neuron
    ablation an ablated neuron's groups hold nothing, and its budget is not redistributed: N
    per group is fixed, so the layer keeps ``N * fan_in / M`` weights per active neuron.

    ``pad=True`` accepts a fan-in that M does not divide: each row is zero-padded to a multiple
    of M (the padding is never active), and the last, partial group of a row holds
    ``min(N, real positions)``. The layer's density is then slightly off N/M, and the
    distribution pins it at exactly that value.
    """

    n: int = attrs.field(default=2, validator=_positive_int)
    m: int = attrs.field(default=4, validator=_positive_int)
    pad: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    @m.validator
    def _n_le_m(self, attribute, value) -> None:
        if self.n > value:
            raise ConfigError(f"nm n={self.n} > m={value}: N:M keeps N of every M, so N <= M.")

    @property
    def capabilities(self) -> StructureCapabilities:
        return StructureCapabilities(
            per_neuron=True,
            constant_fan_in=True,
            nm=(self.n, self.m),
            pins_density=True,
            padded=self.pad,
        )

    def describe(self) -> str:
        return f"nm {self.n}:{self.m}" + (" padded" if self.pad else "")

    @property
    def density(self) -> float:
        return self.n / self.m

    def validate(self, spec: LayerSpec) -> None:
        if spec.fan_in % self.m and not self.pad:
            raise LayerError(
                f"layer {spec.fqn!r} has fan-in {spec.fan_in}, not divisible by M={self.m}, so "
                f"it cannot be split into {self.n}:{self.m} groups; exclude it "
                f"(exclude=[{spec.fqn!r}]), choose an M that divides {spec.fan_in}, or opt into "
                f"zero-padding the fan-in with {{'kind': 'nm', 'n': {self.n}, 'm': {self.m}, "
                f"'pad': True}}."
            )

    # -- grouping (rows padded to a multiple of M when needed) ----------------------------------

    def _groups_per_row(self, spec: LayerSpec) -> int:
        return -(-spec.fan_in // self.m)

    def _padding(self, spec: LayerSpec) -> int:
        return self._groups_per_row(spec) * self.m - spec.fan_in

    def group_shape(self, spec: LayerSpec) -> tuple[int, int]:
        return spec.fan_out * self._groups_per_row(spec), self.m

    def to_groups(self, tensor: torch.Tensor, spec: LayerSpec, fill) -> torch.Tensor:
        padding = self._padding(spec)
        rows = tensor.reshape(spec.fan_out, spec.fan_in)
        if padding:
            filler = torch.full(
                (spec.fan_out, padding), fill, dtype=tensor.dtype, device=tensor.device
            )
            rows = torch.cat([rows, filler], dim=1)
        return rows.reshape(self.group_shape(spec))

    def from_groups(self, grouped: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        rows = grouped.reshape(spec.fan_out, -1)[:, : spec.fan_in]
        return rows.reshape(spec.shape)

    def _row_pattern(self, spec: LayerSpec, *, dense: bool, device=None) -> torch.Tensor:
        """Active positions per group along one row (the last group may be partial)."""
        per_row = self._groups_per_row(spec)
        tail = spec.fan_in - (per_row - 1) * self.m
        full = self.m if dense else self.n
        pattern = torch.full((per_row,), full, dtype=torch.long, device=device)
        pattern[-1] = tail if dense else min(self.n, tail)
        return pattern

    def group_sizes(self, spec: LayerSpec, device: torch.device) -> torch.Tensor | None:
        if not self._padding(spec):
            return None
        return self._row_pattern(spec, dense=True, device=device).repeat(spec.fan_out)

    # -- budgets --------------------------------------------------------------------------------

    def _sparse_budget(self, spec: LayerSpec) -> int:
        return int(self._row_pattern(spec, dense=False).sum()) * spec.fan_out

    def fixed_density(self, spec: LayerSpec) -> float:
        return self._sparse_budget(spec) / spec.numel

    def budget(self, spec: LayerSpec, density: float) -> int:
        if density == 1.0:
            return spec.numel
        fixed = self.fixed_density(spec)
        if abs(density - fixed) > 1e-9:
            raise LayerError(
                f"structure nm {self.n}:{self.m} fixes layer {spec.fqn!r}'s density at "
                f"{fixed:.6g}, but the distribution gave it {density:.6g}; use "
                f"distribution='uniform' with density={fixed:.6g} (layers listed in `dense` "
                f"stay dense)."
            )
        return self._sparse_budget(spec)

    def min_active_rows(self, spec: LayerSpec, budget: int) -> int:
        return max(1, math.ceil(budget / spec.fan_in))

    def group_counts(
        self,
        spec: LayerSpec,
        budget: int,
        device: torch.device,
        active_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        pattern = self._row_pattern(spec, dense=budget == spec.numel, device=device)
        counts = pattern.repeat(spec.fan_out)
        if active_rows is not None:
            # Groups never span neurons: row r owns groups [r * g, (r + 1) * g).
            counts *= active_rows.to(device).long().repeat_interleave(len(pattern))
        return counts


@hookimpl
def sparsity_register_structures(register) -> None:
    register("nm", NM, summary="exactly N of every M consecutive inputs (default 2:4)")
