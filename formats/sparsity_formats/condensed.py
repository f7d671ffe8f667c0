"""The ``condensed`` format (SRigL): constant fan-in rows as ``[active neurons, k]`` tensors.

Built from the mask: every output neuron with an active weight must hold the same ``k``
active inputs; a neuron with none is ablated, holds nothing, and outputs exactly the bias (or
0). Column indices use the narrowest integer dtype holding ``in_features - 1``. Convolution
weights are stored as their ``[out, -1]`` view (see :mod:`sparsity_formats._common`).

``linear`` computes only the active neurons. On CPU it uses the compiled kernel of
:mod:`sparsity_formats._native` (one fused call: gathered dot products at batch 1, two rows at a
time while the weight fits in cache, register tiles over the transposed input for larger
batches, bias and ablated rows written directly, the narrow indices read as stored) for
float32, bfloat16 and float16, without autograd; elsewhere, or when the
kernel cannot be built, a pure-PyTorch path gathers the inputs (``index_select`` at batch 1, a
padded ``embedding_bag`` for larger batches) and scatters the active rows into the output. On
CPU, float16 and bfloat16 are computed in float32 and cast back. On CUDA, batch 1 runs the
gather; larger batches unpack the weight for the call and multiply it densely (cuBLAS), which
beat the gather in 23 of 24 cases at batch 256 and 4096 on an H100, by up to 67 times (the
other was 4% slower; ``benchmarks/bench_formats_cuda.py``). Only the packed form is kept
between calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch

from sparsity_core import hookimpl
from sparsity_core.errors import LayerError
from sparsity_core.layers import LayerSpec

from . import _native
from ._common import (
    PackedShape,
    as_matrix,
    capabilities,
    compute_dtype,
    dense_linear,
    finish_output,
    flatten_input,
    gather_matmul,
    index_dtype,
    reject,
)

__all__ = ["Condensed", "CondensedWeight"]

# The dtypes the compiled CPU kernel reads directly (it accumulates in float32).
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EMPTY_ROWS = torch.empty(0, dtype=torch.long)
_EMPTY_BIAS = torch.empty(0)


def _kernel_args(packed: Any) -> tuple:
    """``(values, indices, active_rows, rows argument, in_features, out_features, dtype ok)``:
    computed once per packed weight, so a batch-1 call runs only a few attribute checks."""
    rows = packed.active_rows
    every = rows.numel() == packed.out_features
    return (
        packed.values,
        packed.indices,
        rows,
        _EMPTY_ROWS if every else rows,
        packed.in_features,
        packed.out_features,
        packed.values.dtype in _NATIVE_DTYPES,
    )


def _constant_fan_in(method: str, counts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The active rows and their common fan-in ``k`` from per-row counts, or a LayerError."""
    rows = counts.nonzero().squeeze(1)
    fan_ins = counts[rows].unique()
    if fan_ins.numel() > 1:
        raise LayerError(
            f"condensed.{method}: the mask is not constant fan-in: its active output neurons "
            f"hold between {int(fan_ins[0])} and {int(fan_ins[-1])} active inputs, but every "
            f"one must hold the same k (all-off neurons count as ablated). Use a "
            f"constant_fan_in or nm structure for this layer, or store it as 'csr'."
        )
    return rows, int(fan_ins[0]) if fan_ins.numel() else 0


@attrs.define(eq=False)
class CondensedWeight(PackedShape):
    """Values and column indices ``[active, k]``, the active rows, and the weight's shape."""

    values: torch.Tensor
    indices: torch.Tensor
    active_rows: torch.Tensor
    shape: tuple[int, ...]
    # What the compiled kernel's fast path needs, built on first use by ``Condensed.linear``
    # and rebuilt when a tensor field is replaced (see ``_kernel_args``).
    kernel_args: Any = attrs.field(default=None, init=False, repr=False)

    @property
    def fan_in(self) -> int:
        return self.values.shape[1]


@attrs.frozen
class Condensed:
    """Constant fan-in storage; supports constant_fan_in and nm, under neuron_ablation or not.

    ``native=False`` always uses the pure-PyTorch kernels (the compiled CPU kernel is used
    otherwise, where it applies and could be built).
    """

    native: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))

    def supports(self, structures: Sequence[Any]) -> bool:
        return capabilities(structures).constant_fan_in

    def check_supports(self, structures: Sequence[Any], spec: LayerSpec | None = None) -> None:
        """Raise a LayerError (ConfigError without ``spec``) unless ``structures`` fit."""
        if not self.supports(structures):
            reject(
                "condensed",
                structures,
                spec,
                "every active output neuron to keep the same number of inputs (constant_fan_in "
                "or nm, optionally under neuron_ablation; any structure declaring "
                "StructureCapabilities(constant_fan_in=True))",
                "Store this layer as 'csr' or 'dense_masked', or train it with "
                "structures=('neuron_ablation', 'constant_fan_in').",
            )

    def pack(self, weight: torch.Tensor, mask: torch.Tensor) -> CondensedWeight:
        w2, m2 = as_matrix("condensed", weight, mask)
        rows, k = _constant_fan_in("pack", m2.sum(dim=1))
        cols = m2[rows].nonzero()[:, 1].reshape(rows.numel(), k)
        values = w2[rows].gather(1, cols)
        indices = cols.to(index_dtype(w2.shape[1]))
        return CondensedWeight(values, indices, rows, tuple(weight.shape))

    def pack_layout(
        self,
        values: torch.Tensor,
        columns: torch.Tensor,
        row_ptr: torch.Tensor,
        shape: tuple[int, ...],
    ) -> CondensedWeight:
        """The same weight straight from a compact layer's CSR layout (its ``values``,
        column ``index`` and ``row_ptr``): each active row's slots become one row of
        ``[active, k]``, with no dense weight and no search for the active positions."""
        rows, k = _constant_fan_in("pack_layout", row_ptr[1:] - row_ptr[:-1])
        nnz = rows.numel() * k
        held = values.detach()[:nnz].reshape(rows.numel(), k).clone()
        indices = columns[:nnz].reshape(rows.numel(), k).to(index_dtype(shape[1]))
        return CondensedWeight(held, indices, rows, tuple(shape))

    def _scatter(self, packed: CondensedWeight, fill: torch.Tensor) -> torch.Tensor:
        dense = fill.new_zeros(packed.out_features, packed.in_features)
        rows = packed.active_rows.unsqueeze(1).expand_as(packed.indices)
        dense.index_put_((rows, packed.indices.long()), fill)
        return dense.reshape(packed.shape)

    def unpack(self, packed: CondensedWeight) -> torch.Tensor:
        return self._scatter(packed, packed.values)

    def mask(self, packed: CondensedWeight) -> torch.Tensor:
        """The positions held (the mask ``pack`` was given)."""
        return self._scatter(packed, torch.ones_like(packed.values, dtype=torch.bool))

    def linear(
        self, packed: CondensedWeight, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        args = packed.kernel_args
        if (
            args is None
            or args[0] is not packed.values
            or args[1] is not packed.indices
            or args[2] is not packed.active_rows
        ):
            args = packed.kernel_args = _kernel_args(packed)
        values, indices, _, rows, in_features, out_features, native_dtype = args
        # The compiled kernel (the inference fast path: at batch 1 the Python around it is a
        # measurable share of the call, so the binding itself checks that it applies: x
        # [batch, in_features] on the CPU in the values' dtype, no autograd graph to record;
        # None otherwise).
        if (
            self.native
            and native_dtype
            and isinstance(x, torch.Tensor)
            and (op := _native.condensed_linear()) is not None
            and (
                out := op(
                    x,
                    values,
                    indices,
                    rows,
                    _EMPTY_BIAS if bias is None else bias,
                    in_features,
                    out_features,
                )
            )
            is not None
        ):
            return out
        if x.dim() != 2 and x.dim() > 0 and x.shape[-1] == in_features:
            out = self.linear(packed, x.reshape(-1, in_features), bias)
            return out.reshape(*x.shape[:-1], out_features)
        x2d, lead = flatten_input("condensed", x, in_features, values.dtype)
        if x.is_cuda and x2d.shape[0] != 1:
            return dense_linear(self.unpack(packed), x2d, bias, lead)
        dtype = compute_dtype(values)
        # embedding_bag and index_select take int32 indices, not the stored uint8/int16.
        rows_out = gather_matmul(x2d.to(dtype), indices.int(), values.to(dtype))
        return finish_output(
            rows_out,
            None if rows is _EMPTY_ROWS else packed.active_rows,
            out_features,
            bias,
            lead,
            x.dtype,
        )

    def nbytes(self, packed: CondensedWeight) -> int:
        held = (packed.values, packed.indices, packed.active_rows)
        return sum(t.nelement() * t.element_size() for t in held)


@hookimpl
def sparsity_register_formats(register) -> None:
    register(
        "condensed",
        Condensed,
        summary="constant fan-in [active neurons, k] values + narrow column indices (SRigL)",
    )
