"""Built-in layer-wise density distributions: uniform, Erdos-Renyi (ER) and ER-Kernel (ERK).

All three share one routine: each sparse layer ``l`` gets density ``eps * raw_l`` with one
global ``eps`` chosen so the parameter-weighted density equals the target; a layer whose density
would exceed 1 is made dense and ``eps`` is solved again over the rest (as in RigL's ERK).
Layers matching ``dense`` patterns are kept dense and count toward the global budget.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence

import attrs

from sparsity_core import LayerSpec, hookimpl
from sparsity_core.errors import ConfigError

from ._validators import positive, str_tuple


def scaled_densities(
    owner: object,
    layers: Sequence[LayerSpec],
    density: float,
    raw: Callable[[LayerSpec], float],
    dense_patterns: Sequence[str],
    fixed: Mapping[str, float] | None = None,
) -> Mapping[str, float]:
    """Densities proportional to ``raw`` (capped at 1) with the exact global ``density``.

    ``fixed`` pins some layers' densities (a structure such as N:M imposes them); layers
    matching ``dense_patterns`` are pinned at 1. The rest share what remains of the budget.
    """
    name = type(owner).__name__
    for pattern in dense_patterns:
        if not any(fnmatch.fnmatchcase(spec.fqn, pattern) for spec in layers):
            raise ConfigError(
                f"{name}.dense pattern {pattern!r} matches no sparse layer; layers: "
                f"{[spec.fqn for spec in layers]}."
            )
    pinned = dict(fixed or {})
    for spec in layers:
        if any(fnmatch.fnmatchcase(spec.fqn, p) for p in dense_patterns):
            pinned[spec.fqn] = 1.0
    total = sum(spec.numel for spec in layers)
    target = density * total
    while True:
        pinned_params = sum(spec.numel * pinned[spec.fqn] for spec in layers if spec.fqn in pinned)
        free = [spec for spec in layers if spec.fqn not in pinned]
        remaining = target - pinned_params
        if not free:
            if abs(remaining) > 1e-9 * total:
                break
            return {spec.fqn: pinned[spec.fqn] for spec in layers}
        if remaining <= 0:
            break
        eps = remaining / sum(raw(spec) * spec.numel for spec in free)
        overflow = [spec for spec in free if eps * raw(spec) > 1.0]
        if not overflow:
            out = {spec.fqn: pinned[spec.fqn] for spec in layers if spec.fqn in pinned}
            out.update({spec.fqn: eps * raw(spec) for spec in free})
            return out
        pinned[max(overflow, key=raw).fqn] = 1.0
    implied = sum(spec.numel * pinned[spec.fqn] for spec in layers if spec.fqn in pinned) / total
    raise ConfigError(
        f"{name}: a global density of {density:.4g} cannot be met with layers "
        f"{sorted(pinned)} pinned at densities {[round(pinned[f], 4) for f in sorted(pinned)]} "
        f"(dense patterns, or structures such as N:M that fix a layer's density; together they "
        f"imply {implied:.4g}). Change the density to match, or shorten {name}.dense."
    )


@attrs.frozen
class _Scaled:
    """Density proportional to ``raw(layer)`` (the shared shape of all three)."""

    dense: tuple[str, ...] = attrs.field(default=(), converter=str_tuple)

    def raw(self, spec: LayerSpec) -> float:
        raise NotImplementedError

    def densities(
        self, layers: Sequence[LayerSpec], density: float, fixed: Mapping[str, float] | None = None
    ) -> Mapping[str, float]:
        return scaled_densities(self, layers, density, self.raw, self.dense, fixed)


@attrs.frozen
class Uniform(_Scaled):
    """The same density in every sparse layer (layers in ``dense`` excepted)."""

    def raw(self, spec: LayerSpec) -> float:
        return 1.0


@attrs.frozen
class ErdosRenyi(_Scaled):
    """Density proportional to ``(n_in + n_out) / (n_in * n_out)`` (SET); channels only."""

    power: float = attrs.field(default=1.0, converter=float, validator=positive)

    def raw(self, spec: LayerSpec) -> float:
        n_in = spec.shape[1] if len(spec.shape) > 1 else 1
        return ((spec.fan_out + n_in) / (spec.fan_out * n_in)) ** self.power


@attrs.frozen
class ErdosRenyiKernel(_Scaled):
    """Density proportional to ``sum(shape) / prod(shape)``, kernel sizes included (RigL's ERK)."""

    power: float = attrs.field(default=1.0, converter=float, validator=positive)

    def raw(self, spec: LayerSpec) -> float:
        return (sum(spec.shape) / spec.numel) ** self.power


@hookimpl
def sparsity_register_distributions(register) -> None:
    register("uniform", Uniform, summary="same density per layer")
    register("er", ErdosRenyi, summary="Erdos-Renyi: (n_in + n_out) / (n_in * n_out)")
    register("erk", ErdosRenyiKernel, summary="Erdos-Renyi-Kernel: sum(shape) / prod(shape) (RigL)")


__all__ = ["ErdosRenyi", "ErdosRenyiKernel", "Uniform", "scaled_densities"]
