"""The ``dense_masked`` format: the dense weight with its explicit boolean mask (the oracle).

Like the packed formats, ``linear`` treats a convolution weight as its ``[out, -1]`` view and
takes inputs of shape ``[..., C_in * prod(kernel)]`` (see :mod:`sparsity_formats._common`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from sparsity_core import hookimpl
from sparsity_core.errors import ConfigError

from ._common import flatten_input


@attrs.define(eq=False)
class DenseMaskedWeight:
    """A dense weight, zero wherever ``mask`` is off, and the mask itself."""

    weight: torch.Tensor
    mask: torch.Tensor


@attrs.frozen
class DenseMasked:
    """Stores ``weight`` with zeros at inactive positions plus the mask; supports any structure."""

    def supports(self, structures: Sequence[Any]) -> bool:
        return True

    def check_supports(self, structures: Sequence[Any], spec: Any = None) -> None:
        """Every structure can be stored dense with its mask: never raises."""

    def pack(self, weight: torch.Tensor, mask: torch.Tensor) -> DenseMaskedWeight:
        if mask.dtype != torch.bool or mask.shape != weight.shape:
            raise ConfigError(
                f"dense_masked.pack needs a boolean mask shaped like the weight "
                f"{tuple(weight.shape)}, got {mask.dtype} {tuple(mask.shape)}."
            )
        dense = weight.detach().masked_fill(~mask, 0)
        return DenseMaskedWeight(dense, mask.clone())

    def unpack(self, packed: DenseMaskedWeight) -> torch.Tensor:
        return packed.weight.clone()

    def linear(
        self, packed: DenseMaskedWeight, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        weight = packed.weight
        matrix = weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)
        flatten_input("dense_masked", x, matrix.shape[1], matrix.dtype)
        return F.linear(x, matrix, bias)

    def nbytes(self, packed: DenseMaskedWeight) -> int:
        return packed.weight.nelement() * packed.weight.element_size() + packed.mask.nelement()


@hookimpl
def sparsity_register_formats(register) -> None:
    register("dense_masked", DenseMasked, summary="dense weight + boolean mask (the oracle)")
