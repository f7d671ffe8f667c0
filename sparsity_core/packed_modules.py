"""Inference modules holding a packed weight: :class:`PackedLinear` and :class:`PackedConv`.

:func:`sparsity_core.export` swaps them in for masked ``nn.Linear`` / ``nn.Conv1d`` /
``nn.Conv2d`` layers. Each computes ``fmt.linear(packed, x, bias)`` (a convolution on its
unfolded patches); the packed weight's tensor fields are registered buffers, so a model holding
them saves and loads through ``state_dict`` alone.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, LayerError
from .registry import ComponentType, Registry, get_registry

__all__ = ["PackedConv", "PackedLinear"]

# A sparse CSR tensor cannot be a plain buffer (its state_dict would not be three plain
# tensors), so a CSR field ``name`` is stored as ``name.crow`` / ``.col`` / ``.values`` buffers.
_CSR_PARTS = ("crow", "col", "values")


def _csr_tensor(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def _buffer_name(field: str, part: str | None = None) -> str:
    # Buffer names may not contain dots; "__" keeps them readable in state_dict keys.
    return f"{field}__{part}" if part else field


class PackedLinear(nn.Module):
    """An inference Linear layer holding a packed weight: ``forward(x) = fmt.linear(packed, x, b)``.

    The packed object's tensor fields are registered buffers (so ``state_dict`` holds them and
    ``load_state_dict`` restores them, shapes included); its other fields (the weight's shape,
    N:M group size, ...) are plain attributes. The packed object is rebuilt from the buffers
    after loading or moving the module.

    Args:
        fmt: the storage format instance that packed the weight.
        packed: ``fmt.pack(weight, mask)``.
        bias: the layer's bias (copied, detached) or None.
        format_name: the format's registry name (looked up when not given).
        registry: where to look the name up (default: the process-wide registry).
        in_features, out_features: the layer's sizes (default: from the packed ``shape``).
    """

    def __init__(
        self,
        fmt: Any,
        packed: Any,
        bias: torch.Tensor | None = None,
        *,
        format_name: str | None = None,
        registry: Registry | None = None,
        in_features: int | None = None,
        out_features: int | None = None,
    ) -> None:
        super().__init__()
        if not attrs.has(type(packed)):
            raise ConfigError(
                f"PackedLinear needs an attrs packed weight, got {type(packed).__qualname__}; "
                f"storage formats must return attrs classes from pack()."
            )
        self.fmt = fmt
        self.format_name = format_name or (registry or get_registry()).name_of(
            ComponentType.FORMAT, fmt
        )
        self.format_params = attrs.asdict(fmt, recurse=False) if attrs.has(type(fmt)) else {}
        self._packed_type = type(packed)
        self._tensor_fields: list[str] = []
        self._csr_fields: dict[str, tuple[int, int]] = {}
        self._meta: dict[str, Any] = {}
        for field in attrs.fields(type(packed)):
            if not field.init:
                continue  # caches such as nm's CUDA 2:4 weight are rebuilt on use
            value = getattr(packed, field.name)
            if isinstance(value, torch.Tensor) and value.layout == torch.sparse_csr:
                parts = (value.crow_indices(), value.col_indices(), value.values())
                for part, tensor in zip(_CSR_PARTS, parts, strict=True):
                    self._register(_buffer_name(field.name, part), tensor)
                self._csr_fields[field.name] = tuple(value.shape)
            elif isinstance(value, torch.Tensor):
                self._register(field.name, value)
                self._tensor_fields.append(field.name)
            else:
                self._meta[field.name] = value
        if "bias" in self._tensor_fields or "bias" in self._csr_fields:
            raise ConfigError(
                f"format {self.format_name!r}: a packed field named 'bias' clashes with "
                f"PackedLinear's bias buffer; rename the field."
            )
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        shape = tuple(self._meta.get("shape", (None, None)))
        self.out_features = out_features if out_features is not None else shape[0]
        self.in_features = in_features if in_features is not None else shape[-1]
        self._packed: Any = None

    def _register(self, name: str, tensor: torch.Tensor) -> None:
        self.register_buffer(name, tensor.detach().clone())

    def _build(self) -> Any:
        kwargs = dict(self._meta)
        for name in self._tensor_fields:
            kwargs[name] = getattr(self, name)
        for name, size in self._csr_fields.items():
            crow, col, values = (getattr(self, _buffer_name(name, p)) for p in _CSR_PARTS)
            kwargs[name] = _csr_tensor(crow, col, values, size)
        return self._packed_type(**kwargs)

    @property
    def packed(self) -> Any:
        """The packed weight, rebuilt from the buffers when they changed."""
        if self._packed is not None:
            return self._packed
        packed = self._build()
        # A tensor built under inference_mode (the CSR tensors assembled from their buffers)
        # cannot be used outside it: do not cache one. Other formats only hold the buffers.
        if not self._csr_fields or not torch.is_inference_mode_enabled():
            self._packed = packed
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fmt.linear(self.packed, x, self.bias)

    def unpack(self) -> torch.Tensor:
        """The dense weight (zeros where inactive)."""
        return self.fmt.unpack(self.packed)

    def nbytes(self) -> int:
        """Bytes of the packed weight, as the format counts them."""
        return int(self.fmt.nbytes(self.packed))

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._packed = None
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Packed shapes depend on the mask (e.g. CSR's nnz): take the saved shapes.
        for name, own in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if own is not None and isinstance(saved, torch.Tensor) and saved.shape != own.shape:
                self._buffers[name] = own.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._packed = None

    def _format_repr(self) -> str:
        """``bias=..., format=name(params)``: the tail of both modules' ``extra_repr``."""
        params = ", ".join(f"{k}={v!r}" for k, v in self.format_params.items())
        return f"bias={self.bias is not None}, format={self.format_name}({params})"

    def extra_repr(self) -> str:
        meta = "".join(f", {k}={v!r}" for k, v in self._meta.items() if k != "shape")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self._format_repr()}{meta}"
        )


class PackedConv(PackedLinear):
    """An inference ``Conv1d`` / ``Conv2d`` (``groups=1``) holding a packed weight.

    ``forward`` pads the input as the convolution would (zeros, or its ``padding_mode``),
    unfolds it into ``[batch, positions, C_in * prod(kernel)]`` patches, and computes
    ``fmt.linear(packed, patches, bias)``: the packed weight's ``[out, -1]`` view, the fan-in in
    ``(C_in, *kernel)`` order, is the one the structures grouped. Unbatched inputs are accepted
    as by the convolution.

    Args:
        fmt, packed, bias, format_name, registry: as for :class:`PackedLinear`.
        conv: the ``nn.Conv1d`` / ``nn.Conv2d`` whose geometry (kernel, stride, padding,
            dilation, padding mode) is copied.
    """

    def __init__(
        self,
        fmt: Any,
        packed: Any,
        bias: torch.Tensor | None = None,
        *,
        conv: nn.Module,
        format_name: str | None = None,
        registry: Registry | None = None,
    ) -> None:
        if not isinstance(conv, nn.Conv1d | nn.Conv2d) or conv.groups != 1:
            raise ConfigError(
                f"PackedConv packs nn.Conv1d / nn.Conv2d layers with groups=1, got "
                f"{type(conv).__name__}"
                f"{f' with groups={conv.groups}' if hasattr(conv, 'groups') else ''}; keep "
                f"that layer dense (export rule (name, None))."
            )
        super().__init__(
            fmt,
            packed,
            bias,
            format_name=format_name,
            registry=registry,
            in_features=math.prod(conv.weight.shape[1:]),
            out_features=conv.out_channels,
        )
        self.spatial = 2 if isinstance(conv, nn.Conv2d) else 1
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.dilation = tuple(conv.dilation)
        self.padding_mode = conv.padding_mode
        # (left, right) per spatial dim, last dim first (F.pad's order), as the conv pads.
        pads: list[int] = []
        for i in reversed(range(self.spatial)):
            if conv.padding == "same":
                total = self.dilation[i] * (self.kernel_size[i] - 1)
                pads += [total // 2, total - total // 2]
            elif conv.padding == "valid":
                pads += [0, 0]
            else:
                pads += [conv.padding[i], conv.padding[i]]
        self.pads = tuple(pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = x.dim() == self.spatial + 2
        if x.dim() not in (self.spatial + 1, self.spatial + 2) or (
            x.shape[-self.spatial - 1] != self.in_channels
        ):
            dims = "L" if self.spatial == 1 else "H, W"
            raise LayerError(
                f"{type(self).__name__} of a Conv{self.spatial}d({self.in_channels}, "
                f"{self.out_channels}, kernel_size={self.kernel_size}) expects an input "
                f"[batch, {self.in_channels}, {dims}] or [{self.in_channels}, {dims}], got "
                f"shape {tuple(x.shape)}; reshape the input."
            )
        if not batched:
            x = x.unsqueeze(0)
        if any(self.pads):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self.pads, mode=mode)
        grid = x if self.spatial == 2 else x.unsqueeze(2)  # Conv1d as a 1 x k Conv2d
        kernel, stride, dilation = (
            (v if self.spatial == 2 else (1, *v))
            for v in (self.kernel_size, self.stride, self.dilation)
        )
        patches = F.unfold(grid, kernel, dilation=dilation, stride=stride)
        out = self.fmt.linear(self.packed, patches.transpose(1, 2), self.bias)
        sizes = [
            (grid.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
            for i in range(2)
        ]
        out = out.transpose(1, 2).reshape(x.shape[0], self.out_channels, *sizes)
        if self.spatial == 1:
            out = out.squeeze(2)
        return out if batched else out.squeeze(0)

    def extra_repr(self) -> str:
        geometry = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.pads}, dilation={self.dilation}"
        )
        mode = "" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode!r}"
        return f"{geometry}{mode}, {self._format_repr()}"
