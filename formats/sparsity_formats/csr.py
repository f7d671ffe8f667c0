"""The ``csr`` format: a torch sparse CSR tensor built from the mask, convertible to scipy.

Positions come from the mask alone, so a live weight equal to 0 is stored as an explicit zero
(scipy keeps explicit zeros too). Convolution weights are stored as their ``[out, -1]`` view
(see :mod:`sparsity_formats._common`).

``linear`` uses ``torch.mv`` at batch 1 and ``torch.sparse.mm`` otherwise. Torch's CPU CSR
kernels (MKL) have no float16/bfloat16 implementation, so on CPU those dtypes are computed in
float32 and the result is cast back. On CUDA, batches of 2 or more multiply the weight unpacked
for the call (cuBLAS), which beat cuSPARSE's ``sparse.mm`` in 23 of 24 cases at batch 256 and
4096 on an H100, by up to 80 times (the other was 11% slower;
``benchmarks/bench_formats_cuda.py``); batch 1 keeps cuSPARSE's ``mv``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import scipy.sparse
import torch

from sparsity_core import hookimpl
from sparsity_core.errors import ConfigError
from sparsity_core.layers import LayerSpec

from ._common import (
    PackedShape,
    as_matrix,
    compute_dtype,
    dense_linear,
    finish_output,
    flatten_input,
)

__all__ = ["CSR", "CSRWeight"]


def _sparse_csr(
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    size: tuple[int, int],
    *,
    check: bool = False,
) -> torch.Tensor:
    if col.numel() == 0:
        # Some torch versions reject an empty view with odd strides (e.g. from numpy).
        col, values = col.new_empty(0), values.new_empty(0)
    with warnings.catch_warnings():
        # torch warns once per process that sparse CSR is in beta (the point of this format),
        # and some versions warn that unchecked invariants are the default (pack builds them).
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=check)


@attrs.define(eq=False)
class CSRWeight(PackedShape):
    """A weight's ``[out, in]`` view as a sparse CSR tensor, and the weight's original shape."""

    matrix: torch.Tensor
    shape: tuple[int, ...]


@attrs.frozen
class CSR:
    """Compressed sparse rows (torch ``sparse_csr``); supports any structure."""

    def supports(self, structures: Sequence[Any]) -> bool:
        return True

    def check_supports(self, structures: Sequence[Any], spec: LayerSpec | None = None) -> None:
        """Nothing to check: CSR stores any mask."""

    def pack(self, weight: torch.Tensor, mask: torch.Tensor) -> CSRWeight:
        w2, m2 = as_matrix("csr", weight, mask)
        crow = torch.zeros(w2.shape[0] + 1, dtype=torch.int64, device=w2.device)
        torch.cumsum(m2.sum(dim=1), dim=0, out=crow[1:])
        col = m2.nonzero()[:, 1].contiguous()
        values = w2[m2].clone()  # row-major order, matching ``nonzero``
        return CSRWeight(_sparse_csr(crow, col, values, tuple(w2.shape)), tuple(weight.shape))

    def pack_layout(
        self,
        values: torch.Tensor,
        columns: torch.Tensor,
        row_ptr: torch.Tensor,
        shape: tuple[int, ...],
    ) -> CSRWeight:
        """The same weight straight from a compact layer's CSR layout (its ``values``,
        column ``index`` and ``row_ptr``), with no dense weight."""
        nnz = int(row_ptr[-1])
        crow = row_ptr.to(torch.int64).clone()
        col = columns[:nnz].to(torch.int64)
        held = values.detach()[:nnz].clone()
        return CSRWeight(_sparse_csr(crow, col, held, tuple(shape)), tuple(shape))

    def unpack(self, packed: CSRWeight) -> torch.Tensor:
        return packed.matrix.to_dense().reshape(packed.shape)

    def mask(self, packed: CSRWeight) -> torch.Tensor:
        """The positions held (the mask ``pack`` was given)."""
        m = packed.matrix
        ones = torch.ones_like(m.values(), dtype=torch.bool)
        held = _sparse_csr(m.crow_indices(), m.col_indices(), ones, m.shape)
        return held.to_dense().reshape(packed.shape)

    def linear(
        self, packed: CSRWeight, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        matrix = packed.matrix
        x2d, lead = flatten_input("csr", x, packed.in_features, matrix.dtype)
        if x.is_cuda and x2d.shape[0] > 1:
            return dense_linear(matrix.to_dense(), x2d, bias, lead)
        dtype = compute_dtype(matrix)
        if dtype != matrix.dtype:
            matrix = _sparse_csr(
                matrix.crow_indices(), matrix.col_indices(), matrix.values().to(dtype), matrix.shape
            )
            x2d = x2d.to(dtype)
        if x2d.shape[0] == 0 or matrix.values().numel() == 0:
            rows_out = x2d.new_zeros(x2d.shape[0], packed.out_features)
        elif x2d.shape[0] == 1:
            rows_out = torch.mv(matrix, x2d[0]).unsqueeze(0)
        else:
            rows_out = torch.sparse.mm(matrix, x2d.T).T
        return finish_output(rows_out, None, packed.out_features, bias, lead, x.dtype)

    def nbytes(self, packed: CSRWeight) -> int:
        m = packed.matrix
        held = (m.crow_indices(), m.col_indices(), m.values())
        return sum(t.nelement() * t.element_size() for t in held)

    def to_scipy(self, packed: CSRWeight) -> scipy.sparse.csr_matrix:
        """The ``[out, in]`` view as a scipy CSR matrix (explicit zeros kept; bf16 as float32)."""
        m = packed.matrix
        values = m.values().detach().cpu()
        if values.dtype == torch.bfloat16:
            values = values.float()  # numpy has no bfloat16
        return scipy.sparse.csr_matrix(
            (values.numpy(), m.col_indices().cpu().numpy(), m.crow_indices().cpu().numpy()),
            shape=tuple(m.shape),
        )

    def from_scipy(
        self,
        matrix: Any,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> CSRWeight:
        """Packed form of a scipy sparse matrix; every stored entry (explicit zeros too) is live.

        Args:
            matrix: any scipy sparse matrix or array, 2-D (converted to CSR; duplicates summed).
            shape: the weight's shape (e.g. a convolution's) whose ``[out, -1]`` view the
                matrix is; defaults to the matrix's own shape.
            dtype: the values' dtype (defaults to the matrix's, as torch maps it).
        """
        csr = scipy.sparse.csr_matrix(matrix)
        if not csr.has_canonical_format:
            csr = csr.copy()
            csr.sum_duplicates()
        rows, cols = csr.shape
        shape = tuple(csr.shape if shape is None else shape)
        if not shape or shape[0] != rows or math.prod(shape[1:]) != cols:
            raise ConfigError(
                f"csr.from_scipy: a {rows}x{cols} matrix is not the [out, -1] view of shape "
                f"{shape}; pass the weight's shape (out = {rows}, the rest multiplying to {cols})."
            )
        values = torch.from_numpy(np.ascontiguousarray(csr.data))
        if dtype is not None:
            values = values.to(dtype)
        crow = torch.from_numpy(csr.indptr.astype(np.int64))
        col = torch.from_numpy(csr.indices.astype(np.int64))
        # Validated: unlike ``pack``'s own indices, these come from outside.
        return CSRWeight(_sparse_csr(crow, col, values, (rows, cols), check=True), shape)


@hookimpl
def sparsity_register_formats(register) -> None:
    register("csr", CSR, summary="torch sparse CSR from the mask; scipy round trip")
