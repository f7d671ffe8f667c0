"""The ``nm`` format: N:M packed values ``[out, groups, N]`` plus in-group positions (uint8).

Groups are M consecutive inputs along each row of the ``[out, -1]`` view (convolutions as in
:mod:`sparsity_formats._common`). A group may hold fewer than N active weights (an ablated
neuron's groups hold none; under ``pad=True`` the last, partial group of a row holds
``min(N, real positions)``): its unused slots hold the value 0 at the sentinel position M.
A fan-in that M does not divide is padded to whole groups, so padded N:M is supported.

``linear`` is unpack-free on the CPU and at batch 1 on CUDA: each kept value's column is
``group * M + position`` and the product is the same gather as ``condensed`` (``index_select``
at batch 1, a padded ``embedding_bag`` otherwise; half types in float32 on CPU). Larger batches
on CUDA unpack the weight for the call and multiply it densely (cuBLAS): on an H100 it beat
the gather in every case at batch 256 and 4096, and the semi-structured kernel below except on
the 8192x8192 half-type layers (where that kernel was up to 1.75x faster); all trailed dense.

``semi_structured=True`` opts 2:4 in float16/bfloat16 on CUDA into torch's semi-structured
kernel (``torch.sparse.to_sparse_semi_structured``, cached on the packed weight; where torch or
the GPU refuse the shape, the paths above run). It is off by default: with torch 2.11 and
cuSPARSELt 0.8 on an H100 each call took 0.5 to 1 ms, almost all of it host-side setup in
``_cslt_sparse_mm``, slower than dense at every size measured (``bench_formats_cuda.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from sparsity_core import hookimpl
from sparsity_core.errors import ConfigError, LayerError
from sparsity_core.layers import LayerSpec

from ._common import (
    PackedShape,
    as_matrix,
    capabilities,
    compute_dtype,
    dense_linear,
    finish_output,
    flatten_input,
    gather_matmul,
    reject,
)

__all__ = ["NMFormat", "NMWeight"]

_SEMI_DTYPES = (torch.float16, torch.bfloat16)


def _flag(instance, attribute, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(
            f"format nm.{attribute.name}={value!r} must be True or False (a bool; on the "
            f"command line nm:{attribute.name}=true)."
        )


def _group_size(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 255:
        raise ConfigError(
            f"format nm.{attribute.name}={value!r} must be an integer in [1, 255] (positions "
            f"are stored as uint8)."
        )


@attrs.define(eq=False)
class NMWeight(PackedShape):
    """Kept values and their in-group positions ``[out, groups, N]`` (position M: empty slot)."""

    values: torch.Tensor
    positions: torch.Tensor
    m: int
    shape: tuple[int, ...]
    semi: Any = attrs.field(default=None, init=False)  # CUDA 2:4 weight, built on first use


@attrs.frozen
class NMFormat:
    """N:M semi-structured storage (2:4 by default); supports nm structures with the same N, M.

    ``semi_structured``: on CUDA, compute 2:4 in float16/bfloat16 with torch's semi-structured
    sparse kernel (off by default: slower than dense where measured, see the module docstring).
    """

    n: int = attrs.field(default=2, validator=_group_size)
    m: int = attrs.field(default=4, validator=_group_size)
    semi_structured: bool = attrs.field(default=False, validator=_flag, kw_only=True)

    @m.validator
    def _n_le_m(self, attribute, value) -> None:
        if self.n > value:
            raise ConfigError(f"format nm n={self.n} > m={value}: N:M keeps N of every M.")

    @classmethod
    def for_structures(cls, structures: Sequence[Any]) -> NMFormat:
        """The format matching the N:M of ``structures`` (coarse to fine, ending in nm)."""
        n, m = capabilities(structures).nm or (2, 4)
        return cls(n=n, m=m)

    def supports(self, structures: Sequence[Any]) -> bool:
        return capabilities(structures).nm == (self.n, self.m)

    def check_supports(self, structures: Sequence[Any], spec: LayerSpec | None = None) -> None:
        """Raise a LayerError (ConfigError without ``spec``) unless ``structures`` fit."""
        if self.supports(structures):
            return
        nm = capabilities(structures).nm
        if nm is not None:
            fix = (
                f"Use the format {{'kind': 'nm', 'n': {nm[0]}, 'm': {nm[1]}}} "
                f"(NMFormat.for_structures) for this layer."
            )
        else:
            fix = "Store this layer as 'csr' (or 'condensed' for constant fan-in)."
        reject("nm", structures, spec, f"an nm {self.n}:{self.m} structure (padded or not)", fix)

    def pack(self, weight: torch.Tensor, mask: torch.Tensor) -> NMWeight:
        w2, m2 = as_matrix("nm", weight, mask)
        rows, cols = w2.shape
        groups = -(-cols // self.m)
        padding = groups * self.m - cols
        if padding:
            w2 = F.pad(w2, (0, padding))
            m2 = F.pad(m2, (0, padding))
        grouped = m2.reshape(rows, groups, self.m)
        most = int(grouped.sum(-1).max()) if grouped.numel() else 0
        if most > self.n:
            raise LayerError(
                f"nm.pack: the mask is not {self.n}:{self.m}: some group of {self.m} consecutive "
                f"inputs holds {most} active weights (at most {self.n} allowed). Use the format "
                f"matching the layer's nm structure (a layer left dense is not N:M), or 'csr'."
            )
        slot = torch.arange(self.m, dtype=torch.int64, device=m2.device)
        # Active positions first, in order; empty slots sort last as the sentinel M.
        keys = torch.where(grouped, slot, self.m).sort(dim=-1).values[..., : self.n]
        empty = keys == self.m
        values = w2.reshape(rows, groups, self.m).gather(-1, keys.clamp(max=self.m - 1))
        values = values.masked_fill(empty, 0)
        return NMWeight(values, keys.to(torch.uint8), self.m, tuple(weight.shape))

    def _scatter(self, packed: NMWeight, fill: torch.Tensor) -> torch.Tensor:
        rows, groups, _ = fill.shape
        # One spare column per group takes the empty slots and is dropped.
        dense = fill.new_zeros(rows, groups, packed.m + 1)
        dense.scatter_(-1, packed.positions.long(), fill)
        flat = dense[..., : packed.m].reshape(rows, groups * packed.m)
        return flat[:, : packed.in_features].reshape(packed.shape)

    def unpack(self, packed: NMWeight) -> torch.Tensor:
        return self._scatter(packed, packed.values)

    def mask(self, packed: NMWeight) -> torch.Tensor:
        """The positions held (the mask ``pack`` was given)."""
        return self._scatter(packed, packed.positions < packed.m)

    def _columns(self, packed: NMWeight) -> torch.Tensor:
        groups = packed.positions.shape[1]
        start = torch.arange(groups, device=packed.positions.device) * packed.m
        cols = start.view(1, -1, 1) + packed.positions.long()
        # Empty slots hold 0; any real column will do for them.
        last = max(packed.in_features - 1, 0)
        return cols.clamp(max=last).reshape(packed.out_features, -1).int()

    def _semi_structured(self, packed: NMWeight, x2d: torch.Tensor, bias: Any) -> Any:
        """``F.linear`` with torch's 2:4 CUDA kernel, or None where it does not apply."""
        convert = getattr(torch.sparse, "to_sparse_semi_structured", None)
        if convert is None or packed.semi is False:
            return None
        try:
            if packed.semi is None:
                # Built as a normal tensor even under inference_mode: the packed weight (and
                # this cache) outlives the call and may be used outside it.
                with torch.inference_mode(False), warnings.catch_warnings():
                    dense = self.unpack(packed).reshape(packed.out_features, -1)
                    warnings.filterwarnings("ignore", message="The PyTorch API of SparseSemi")
                    packed.semi = convert(dense)
            return F.linear(x2d, packed.semi, bias)
        except (RuntimeError, ValueError, NotImplementedError, TypeError):
            packed.semi = False  # this shape or GPU is not supported: the other paths from now on
            return None

    def linear(
        self, packed: NMWeight, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        x2d, lead = flatten_input("nm", x, packed.in_features, packed.values.dtype)
        if x.is_cuda:
            # (getattr: an NMFormat pickled before the field existed has no such slot)
            shape_24 = (self.n, self.m, packed.m) == (2, 4, 4)
            semi = getattr(self, "semi_structured", False) and shape_24
            if semi and x.dtype in _SEMI_DTYPES and x2d.shape[0] > 0:
                out = self._semi_structured(packed, x2d, bias)
                if out is not None:
                    return out.reshape(*lead, packed.out_features)
            if x2d.shape[0] != 1:
                return dense_linear(self.unpack(packed), x2d, bias, lead)
        dtype = compute_dtype(packed.values)
        values = packed.values.reshape(packed.out_features, -1).to(dtype)
        rows_out = gather_matmul(x2d.to(dtype), self._columns(packed), values)
        return finish_output(rows_out, None, packed.out_features, bias, lead, x.dtype)

    def nbytes(self, packed: NMWeight) -> int:
        held = [packed.values, packed.positions]
        if isinstance(packed.semi, torch.Tensor):
            parts = (getattr(packed.semi, name, None) for name in ("packed", "meta"))
            held += [t for t in parts if isinstance(t, torch.Tensor)]
        return sum(t.nelement() * t.element_size() for t in held)


@hookimpl
def sparsity_register_formats(register) -> None:
    register("nm", NMFormat, summary="N:M packed values + uint8 in-group positions (2:4 default)")
