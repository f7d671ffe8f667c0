"""Built-in re-initialisations of the weights under the initial mask.

A layer initialised for its dense fan-in ``n`` (PyTorch's default, Kaiming) gives each output
the variance of ``n`` inputs; under a sparse mask a neuron sums only its ``k`` active inputs,
so its output variance shrinks by ``k / n`` and the signal fades layer after layer. Scaling
for the sparse fan-in restores it, which is what sparse-aware initialisation does (Evci et
al., "Gradient Flow in Sparse Neural Networks and How Lottery Tickets Win", AAAI 2022; the
SRigL authors' code initialises this way).
"""

from __future__ import annotations

import math

import attrs
import torch

from sparsity_core import LayerSpec, hookimpl
from sparsity_core.errors import ConfigError


@attrs.frozen
class NoReinit:
    """Keep the model's own initialisation."""

    def apply_(
        self, weight: torch.Tensor, mask: torch.Tensor, spec: LayerSpec, generator: torch.Generator
    ) -> None:
        return None


def _active_fan_in(mask: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """Active inputs per output neuron, shaped to broadcast over the weight."""
    k = mask.reshape(spec.fan_out, -1).sum(dim=1)
    return k.reshape(-1, *([1] * (mask.dim() - 1)))


@attrs.frozen
class SparseFanIn:
    """Scale each neuron's weights by ``sqrt(fan_in / k)``, ``k`` its active inputs.

    The distribution of the initial weights keeps its shape; its variance becomes that of an
    initialisation for fan-in ``k``, so each neuron's output variance is the dense one's.
    Neurons with no active input are left as they are.
    """

    def apply_(
        self, weight: torch.Tensor, mask: torch.Tensor, spec: LayerSpec, generator: torch.Generator
    ) -> None:
        k = _active_fan_in(mask, spec).to(weight.dtype)
        scale = torch.where(k > 0, (spec.fan_in / k.clamp(min=1)).sqrt(), torch.ones_like(k))
        scaled = weight * scale.to(weight.device)
        weight.copy_(torch.where(mask, scaled, weight))


_GAINS = {"relu": math.sqrt(2.0), "linear": 1.0, "tanh": 5.0 / 3.0}


@attrs.frozen
class SparseKaiming:
    """Draw the active weights afresh from ``N(0, gain^2 / k)``, ``k`` each neuron's active
    inputs (Kaiming-normal initialisation for the sparse fan-in)."""

    nonlinearity: str = attrs.field(default="relu")

    @nonlinearity.validator
    def _known(self, attribute: attrs.Attribute, value: str) -> None:
        if value not in _GAINS:
            raise ConfigError(
                f"SparseKaiming.nonlinearity={value!r} is not one of {sorted(_GAINS)}."
            )

    def apply_(
        self, weight: torch.Tensor, mask: torch.Tensor, spec: LayerSpec, generator: torch.Generator
    ) -> None:
        k = _active_fan_in(mask, spec).to(weight.dtype).clamp(min=1)
        draw = torch.randn(
            weight.shape, generator=generator, device=generator.device, dtype=weight.dtype
        )
        std = _GAINS[self.nonlinearity] / k.sqrt()
        fresh = draw.to(weight.device) * std.to(weight.device)
        weight.copy_(torch.where(mask, fresh, weight))


@hookimpl
def sparsity_register_reinits(register) -> None:
    register("none", NoReinit, summary="keep the model's own initialisation")
    register(
        "sparse_fan_in",
        SparseFanIn,
        summary="scale each neuron by sqrt(fan_in / active inputs) (sparse-aware init)",
    )
    register(
        "sparse_kaiming",
        SparseKaiming,
        summary="redraw active weights from N(0, gain^2 / active inputs)",
    )


__all__ = ["NoReinit", "SparseFanIn", "SparseKaiming"]
