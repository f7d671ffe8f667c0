"""Helpers the packed storage formats share: argument checks, structure lookup, the gather kernel.

Every format stores a weight as its ``[out, in]`` view: a convolution weight
``[C_out, C_in, *kernel]`` is handled as ``weight.reshape(C_out, -1)`` (the fan-in in
``(C_in, *kernel)`` order, as the structures group it); ``unpack`` restores the original shape,
and ``linear`` takes inputs of shape ``[..., C_in * prod(kernel)]`` (e.g. unfolded patches).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NoReturn

import torch
import torch.nn.functional as F

from sparsity_core.errors import ConfigError, LayerError
from sparsity_core.layers import LayerSpec
from sparsity_core.structures import (
    StructureCapabilities,
    compose_structures,
    describe,
    structure_capabilities,
)

__all__ = [
    "PackedShape",
    "as_matrix",
    "capabilities",
    "compute_dtype",
    "dense_linear",
    "finish_output",
    "flatten_input",
    "gather_matmul",
    "index_dtype",
    "reject",
    "structure_of",
    "structures_label",
]

# CPU sparse and gather kernels accumulate half types poorly or not at all: compute in float32.
_UPCAST = (torch.float16, torch.bfloat16)
# embedding_bag takes its fast (fbgemm) path when each table row is a multiple of 8 floats.
_TABLE_WIDTH = 8


class PackedShape:
    """Mixin for packed weights holding ``shape``: the sizes of their ``[out, in]`` view."""

    shape: tuple[int, ...]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return math.prod(self.shape[1:])


def as_matrix(
    fmt: str, weight: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, mask)`` as detached ``[out, in]`` views, after checking they fit together."""
    if mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ConfigError(
            f"{fmt}.pack needs a boolean mask shaped like the weight {tuple(weight.shape)}, got "
            f"{mask.dtype} {tuple(mask.shape)}; pass the layer's mask (a torch.bool tensor)."
        )
    if weight.dim() < 2:
        raise ConfigError(
            f"{fmt}.pack stores [out, in] weights (or convolution weights, viewed as "
            f"[out, -1]), got a {weight.dim()}-D tensor of shape {tuple(weight.shape)}."
        )
    size = (weight.shape[0], math.prod(weight.shape[1:]))
    return weight.detach().reshape(size), mask.reshape(size)


def index_dtype(in_features: int) -> torch.dtype:
    """The narrowest integer dtype holding every column index ``0 .. in_features - 1``."""
    if in_features <= 2**8:
        return torch.uint8
    if in_features <= 2**15:
        return torch.int16
    return torch.int32


def flatten_input(
    fmt: str, x: torch.Tensor, in_features: int, dtype: torch.dtype
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` as ``[batch, in]`` plus its leading shape (``()`` for a 1-D input)."""
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise LayerError(
            f"{fmt}.linear expects an input of shape [..., {in_features}], got "
            f"{tuple(x.shape)}; for a convolution pass unfolded patches."
        )
    if x.dtype != dtype:
        raise LayerError(
            f"{fmt}.linear got a {x.dtype} input for a {dtype} weight; cast one to the other "
            f"(as F.linear would require)."
        )
    return x.reshape(-1, in_features), tuple(x.shape[:-1])


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a CPU kernel computes in for values of ``t``'s dtype (half types: float32)."""
    return torch.float32 if t.dtype in _UPCAST and not t.is_cuda else t.dtype


def gather_matmul(x2d: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out[b, r] = sum_j values[r, j] * x2d[b, cols[r, j]]``, shape ``[batch, rows]``.

    Batch 1 gathers the input once (``index_select``) and reduces over each row; larger batches
    use ``embedding_bag`` over the transposed input, padded to a multiple of 8 columns, which
    never materialises the ``[batch, rows, k]`` gather. ``cols`` is int32 or int64.
    """
    batch, rows = x2d.shape[0], values.shape[0]
    if batch == 0 or values.numel() == 0:
        return x2d.new_zeros(batch, rows)
    if batch == 1:
        gathered = x2d[0].index_select(0, cols.reshape(-1)).view_as(values)
        return (gathered * values).sum(-1).unsqueeze(0)
    width = -(-batch // _TABLE_WIDTH) * _TABLE_WIDTH
    table = x2d.new_zeros(x2d.shape[1], width)
    table[:, :batch] = x2d.T
    bags = F.embedding_bag(cols, table, per_sample_weights=values, mode="sum")
    return bags[:, :batch].T


def dense_linear(
    dense: torch.Tensor, x2d: torch.Tensor, bias: torch.Tensor | None, lead: tuple[int, ...]
) -> torch.Tensor:
    """``F.linear`` on a weight unpacked for this call only, shaped ``[*lead, out]``.

    The GPU path of the gather formats at batch 2 and more: on CUDA, one dense product (cuBLAS)
    on the weight scattered back for the call beat the gathers in 70 of 72 cases at batch 256
    and 4096 on an H100 (``benchmarks/bench_formats_cuda.py``); the dense weight is freed when
    the call returns.
    """
    out = F.linear(x2d, dense.reshape(dense.shape[0], -1), bias)
    return out.reshape(*lead, dense.shape[0])


def finish_output(
    rows_out: torch.Tensor,
    active_rows: torch.Tensor | None,
    out_features: int,
    bias: torch.Tensor | None,
    lead: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Scatter the active rows' outputs into ``[*lead, out]``, add the bias, cast to ``dtype``.

    Outputs of rows not in ``active_rows`` are exactly the bias (or 0); ``None`` means every
    row is active and ``rows_out`` already covers them in order.
    """
    full = rows_out
    if active_rows is not None:
        full = rows_out.new_zeros(rows_out.shape[0], out_features)
        full.index_copy_(1, active_rows, rows_out)
    if bias is not None:
        full = full + bias.to(full.dtype)
    return full.to(dtype).reshape(*lead, out_features)


def _normalise(structures: Any) -> list[Any]:
    from sparsity_core.config import component_from_dict
    from sparsity_core.registry import ComponentType

    if isinstance(structures, str) or not isinstance(structures, Sequence):
        structures = (structures,)
    return [component_from_dict(ComponentType.STRUCTURE, s) for s in structures]


def structure_of(structures: Any) -> Any:
    """The composed structure of a coarse-to-fine tuple (or a composed structure itself)."""
    items = _normalise(structures)
    if not items:
        raise ConfigError("no structure given; use ('unstructured',) for none.")
    return compose_structures(items)


def capabilities(structures: Any) -> StructureCapabilities:
    """What the structure of a layer offers (the formats ask this, never its type)."""
    return structure_capabilities(structure_of(structures))


def structures_label(structures: Any) -> str:
    """A short name for a structure tuple, e.g. ``neuron_ablation + constant_fan_in``."""
    return describe(structure_of(structures))


def reject(fmt: str, structures: Any, spec: LayerSpec | None, needs: str, fix: str) -> NoReturn:
    """Raise the error saying ``fmt`` cannot store a layer with ``structures``, and the fix."""
    where = f"layer {spec.fqn!r}" if spec is not None else "a layer"
    message = (
        f"format {fmt!r} cannot store {where} with structure ({structures_label(structures)}): "
        f"it needs {needs}. {fix}"
    )
    raise (LayerError if spec is not None else ConfigError)(message)
