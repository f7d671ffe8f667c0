"""Compact sparse layers: a layer that holds only its active weights as the trainable tensor.

:class:`CompactLinear` stands for an ``nn.Linear`` of shape ``[out_features, in_features]``
whose active weights live in one flat parameter ``values`` of fixed length ``capacity``, in
row-major (CSR) order: ``row_ptr[r]:row_ptr[r + 1]`` are the slots of output neuron ``r``,
``index`` their input columns (narrow integers), ascending within a row. Slots past ``nnz``
are padding: value 0, gradient 0, never active. The parameter's shape never changes, so any
``torch.optim`` optimizer holds it and its state is shaped like it; a topology update moves
the values (and every optimizer state tensor shaped like them) to their new slots with
:meth:`CompactLinear.relayout_`. A constant fan-in layer is the same layout with ``k`` slots per
active row (``values[:nnz].view(active_rows, k)`` is the condensed layout, no repacking).

The mask stays the meaning of "active": :meth:`CompactLinear.mask` gives the dense boolean
mask of the layout, and :meth:`CompactLinear.set_layout` takes one.

Products: on the CPU, in float32 and float64, the compiled kernels of
:func:`sparsity_core.native.compact_kernels` (sparse products over the stored weights only, the
widest vector instructions the CPU has); elsewhere, when they cannot be built, with
``SPARSITY_CORE_NATIVE=0`` or ``layer.native = False``, a pure-PyTorch path that scatters the
values into a transient dense weight (one per call and layer, freed after it) and multiplies
densely, which gives results bit-identical to the masked dense layer. Both agree within float
tolerance. The dense gradient w.r.t. the whole weight, which gradient-based
growth needs, is computed only while :attr:`CompactLinear.capture_grad` is set (the scheduler
arms it for the backward passes of an update step) and summed into
:attr:`CompactLinear.captured_grad`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LayerError, SparsityWarning
from .native import compact_kernels

__all__ = ["CompactLinear", "index_dtype", "is_compact"]

# The dtypes the compiled kernels take (others go through the PyTorch path).
_KERNEL_DTYPES = (torch.float32, torch.float64)
_EMPTY = torch.empty(0)


def index_dtype(in_features: int) -> torch.dtype:
    """The narrowest signed integer dtype that holds every column index of the layer."""
    return torch.int16 if in_features <= 2**15 else torch.int32


def is_compact(module: Any) -> bool:
    """Whether ``module`` is a compact layer (holds ``values`` instead of a dense weight)."""
    return isinstance(module, CompactLinear)


class _CompactLinearFunction(torch.autograd.Function):
    """``y = x @ W.T + b`` for the weight of a compact layer, differentiable w.r.t. ``x``,
    ``values`` and ``b`` (once: a second derivative raises)."""

    @staticmethod
    def forward(ctx, x, values, bias, layer):
        ctx.layer = layer
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x, values)
        return layer._product(x, values, bias)

    @staticmethod
    def backward(ctx, grad_out):
        layer = ctx.layer
        if torch.is_grad_enabled():
            raise LayerError(
                f"compact layer {layer.fqn!r}: a second derivative (backward with "
                f"create_graph=True, or a gradient penalty) is not supported by compact "
                f"layers. Train this model on the masked path (sparsity_core.to_masked(model)) "
                f"or drop create_graph=True."
            )
        x, values = ctx.saved_tensors
        grad_x, grad_values = layer._backward(
            x, values, grad_out, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_values, grad_bias, None


class CompactLinear(nn.Module):
    """A sparse ``nn.Linear`` that stores and trains only its active weights.

    Build one with :meth:`from_linear` (a dense layer and its boolean mask) or through
    :func:`sparsity_core.to_compact`. The forward accepts ``[..., in_features]`` inputs.

    Args:
        in_features, out_features: the dense layer's sizes.
        capacity: the number of slots of ``values`` (at least the most weights the layer may
            ever hold; the scheduler plans it).
        bias: whether the layer has a bias.
        fqn: the layer's name in its model (for messages).
    """

    sparse_layer_type = "Linear"
    """The dense layer kind this module stands for (the scheduler plans it as one)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        capacity: int,
        *,
        bias: bool = True,
        fqn: str = "",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LayerError(f"CompactLinear {name}={value!r} must be a positive int.")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise LayerError(f"CompactLinear capacity={capacity!r} must be an int >= 0.")
        if capacity > in_features * out_features:
            raise LayerError(
                f"CompactLinear capacity={capacity} exceeds the {out_features}x{in_features} "
                f"layer's {in_features * out_features} weights; a compact layer holds at most "
                f"every weight."
            )
        self.in_features = in_features
        self.out_features = out_features
        self.capacity = capacity
        self.fqn = fqn
        factory = {"device": device, "dtype": dtype}
        self.values = nn.Parameter(torch.zeros(capacity, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        # The column indices are kept as their bytes (uint8): torch.distributed broadcasts no
        # int16 tensor (DDP syncs every buffer at construction), and a byte view costs nothing.
        self._index_dtype = index_dtype(in_features)
        width = torch.empty((), dtype=self._index_dtype).element_size()
        self.register_buffer(
            "cols", torch.zeros(capacity * width, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "row_ptr", torch.zeros(out_features + 1, dtype=torch.int64, device=device)
        )
        self._nnz = 0
        self.native = True
        """Use the compiled kernels where they apply (False: always the PyTorch path)."""
        self._warned = False
        self.capture_grad = False
        """While set, every backward pass adds the dense weight gradient to ``captured_grad``
        (the scheduler arms it for the steps whose update needs it, and empties it after each
        optimizer step)."""
        self.captured_grad: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(_refresh_after_load)

    # -- geometry -------------------------------------------------------------------------------

    @property
    def dense_shape(self) -> tuple[int, int]:
        """The shape of the dense weight this layer stands for."""
        return (self.out_features, self.in_features)

    @property
    def index(self) -> torch.Tensor:
        """Each slot's input column (int16 when ``in_features <= 32768``, else int32): a view
        of the ``cols`` buffer, which holds their bytes."""
        return self.cols.view(self._index_dtype)

    @property
    def nnz(self) -> int:
        """Active weights (the used slots of ``values``)."""
        return self._nnz

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nnz={self.nnz}, capacity={self.capacity}, bias={self.bias is not None}"
        )

    def rows(self) -> torch.Tensor:
        """The output neuron of each used slot (int64 ``[nnz]``)."""
        return torch.repeat_interleave(
            torch.arange(self.out_features, device=self.row_ptr.device), self.row_lengths()
        )

    def flat_index(self) -> torch.Tensor:
        """The position of each used slot in the flattened dense weight (int64, ascending)."""
        return self.rows() * self.in_features + self.index[: self.nnz].long()

    def mask(self) -> torch.Tensor:
        """The dense boolean mask of the layout (a new tensor)."""
        out = torch.zeros(
            self.out_features * self.in_features, dtype=torch.bool, device=self.values.device
        )
        out[self.flat_index()] = True
        return out.view(self.dense_shape)

    def dense_weight(self) -> torch.Tensor:
        """The dense weight (zeros where inactive): a new, detached tensor."""
        return self.scatter(self.values.detach())

    @torch.no_grad()
    def scatter(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like ``values`` (an optimizer moment, say) as a dense tensor shaped
        like the weight, zeros at inactive positions (a new tensor)."""
        out = tensor.new_zeros(self.out_features * self.in_features)
        out[self.flat_index()] = tensor[: self.nnz]
        return out.view(self.dense_shape)

    def row_lengths(self) -> torch.Tensor:
        """Active inputs of each output neuron (int64 ``[out_features]``)."""
        return self.row_ptr[1:] - self.row_ptr[:-1]

    # -- layout changes -------------------------------------------------------------------------

    def _check_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise LayerError(
                f"compact layer {self.fqn!r}: a layout needs a boolean mask, got "
                f"{getattr(mask, 'dtype', type(mask).__name__)}."
            )
        if tuple(mask.shape) != self.dense_shape:
            raise LayerError(
                f"compact layer {self.fqn!r}: mask of shape {tuple(mask.shape)} for a weight "
                f"of shape {self.dense_shape}."
            )
        flat = mask.reshape(-1).nonzero().squeeze(1).to(self.row_ptr.device)
        if flat.numel() > self.capacity:
            raise LayerError(
                f"compact layer {self.fqn!r}: the mask holds {flat.numel()} active weights, "
                f"more than the layer's capacity of {self.capacity}; build it with a larger "
                f"capacity (sparsity_core.to_compact plans the most a layer can hold)."
            )
        return flat

    def _write_index(self, flat: torch.Tensor) -> None:
        rows = torch.div(flat, self.in_features, rounding_mode="floor")
        cols = flat - rows * self.in_features
        index = self.index
        index.zero_()
        index[: flat.numel()] = cols.to(index.dtype)
        counts = torch.bincount(rows, minlength=self.out_features)
        self.row_ptr.zero_()
        torch.cumsum(counts, 0, out=self.row_ptr[1:])
        self._nnz = int(flat.numel())

    @torch.no_grad()
    def set_layout(self, mask: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Hold exactly the active positions of ``mask``, with values from the dense
        ``weight`` (zeros when not given); padding slots are zeroed."""
        flat = self._check_mask(mask)
        self._write_index(flat)
        self.values.zero_()
        if weight is not None:
            self.values[: flat.numel()] = weight.detach().reshape(-1)[flat].to(self.values)

    @torch.no_grad()
    def relayout_(self, mask: torch.Tensor, state: dict[str, torch.Tensor] | None = None) -> None:
        """Move to the layout of ``mask`` in place: weights active before and after keep their
        values (and their entries of every tensor in ``state``, e.g. the optimizer's moments,
        each shaped like ``values``); newly active weights start at 0 with zero state; slots
        past the new ``nnz`` are zeroed."""
        new_flat = self._check_mask(mask)
        old_flat = self.flat_index()
        n_new = new_flat.numel()
        if old_flat.numel():
            pos = torch.searchsorted(old_flat, new_flat).clamp_(max=old_flat.numel() - 1)
            found = old_flat[pos] == new_flat
        else:
            pos = torch.zeros(n_new, dtype=torch.int64, device=new_flat.device)
            found = torch.zeros(n_new, dtype=torch.bool, device=new_flat.device)
        src, dst = pos[found], found.nonzero().squeeze(1)
        for tensor in (self.values.data, *(state or {}).values()):
            if tensor.shape != self.values.shape:
                raise LayerError(
                    f"compact layer {self.fqn!r}: a state tensor of shape "
                    f"{tuple(tensor.shape)} cannot move with values of shape "
                    f"{tuple(self.values.shape)}."
                )
            moved = tensor[src]  # a gather: a new tensor
            tensor.zero_()
            tensor[dst] = moved
        self._write_index(new_flat)

    @torch.no_grad()
    def zero_padding_(self) -> None:
        """Zero the values (and gradient) of the unused slots."""
        self.values[self.nnz :] = 0
        if self.values.grad is not None:
            self.values.grad[self.nnz :] = 0

    # -- products -------------------------------------------------------------------------------

    def _kernels(self, x: torch.Tensor, values: torch.Tensor) -> Any | None:
        """The compiled kernels when they apply to these tensors, else None (said once per
        layer when the reason is not the user's choice)."""
        if not self.native:
            return None
        reason = None
        if x.device.type != "cpu":
            reason = f"on {x.device.type} (the compiled kernels are CPU kernels)"
        elif x.dtype not in _KERNEL_DTYPES or values.dtype != x.dtype:
            reason = f"in {x.dtype} with {values.dtype} values (the kernels take float32/float64)"
        if reason is None and type(x) is torch.Tensor:
            return compact_kernels()
        if reason is not None and not self._warned:
            self._warned = True
            warnings.warn(
                f"compact layer {self.fqn!r} runs {reason} on its PyTorch path: the right "
                f"results, but each call forms a transient dense weight (and, in backward, a "
                f"dense gradient), so it saves optimizer memory and none of the compute. Set "
                f"layer.native = False to choose this path without the warning.",
                SparsityWarning,
                stacklevel=4,
            )
        return None

    def _product(self, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None):
        kernels = self._kernels(x, values)
        if kernels is None:
            return F.linear(x, self.scatter(values), bias)
        b = _EMPTY if bias is None else bias.detach().contiguous()
        yt = kernels.forward_t(
            x.detach().t().contiguous(),
            values.detach(),
            self.index,
            self.row_ptr,
            b.to(x.dtype),
            self.out_features,
        )
        return yt.t()

    def _backward(
        self,
        x: torch.Tensor,
        values: torch.Tensor,
        grad_out: torch.Tensor,
        need_x: bool,
        need_values: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        grad_x = grad_values = None
        kernels = self._kernels(x, values)
        if kernels is not None:  # sparse products over the stored weights only
            gyt = grad_out.to(values.dtype).t().contiguous()
            xt = x.detach().t().contiguous()
            values = values.detach()
            if need_x:
                grad_x = kernels.grad_input_t(
                    gyt, values, self.index, self.row_ptr, self.in_features
                ).t()
            if need_values:
                grad_values = kernels.grad_values_t(gyt, xt, self.index, self.row_ptr, values)
            if self.capture_grad:
                self._capture(gyt @ xt.t())
            return grad_x, grad_values
        # Under autocast the forward ran in a lower precision, so grad_out may be in another
        # dtype than x and values: compute in grad_out's, give each gradient its input's.
        low = grad_out.dtype
        if need_x:
            grad_x = (grad_out @ self.scatter(values).to(low)).to(x.dtype)
        if need_values or self.capture_grad:
            dense_grad = (grad_out.t() @ x.to(low)).to(values.dtype)
            if self.capture_grad:
                self._capture(dense_grad)
            if need_values:
                grad_values = values.new_zeros(values.shape)
                grad_values[: self.nnz] = dense_grad.reshape(-1)[self.flat_index()]
        return grad_x, grad_values

    def _capture(self, dense_grad: torch.Tensor) -> None:
        # Summed over every backward pass (every use of the layer, every micro-batch) until the
        # scheduler takes it and re-arms (after each optimizer step).
        if self.captured_grad is None:
            self.captured_grad = dense_grad.detach().clone()
        else:
            self.captured_grad.add_(dense_grad.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise LayerError(
                f"compact layer {self.fqn!r} takes inputs of {self.in_features} features, got "
                f"shape {tuple(x.shape)}."
            )
        lead = x.shape[:-1]
        flat = x.reshape(math.prod(lead), self.in_features)
        y = _CompactLinearFunction.apply(flat, self.values, self.bias, self)
        return y.reshape(*lead, self.out_features)

    # -- conversions ----------------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, mask: torch.Tensor, *, capacity: int | None = None, fqn: str = ""
    ) -> CompactLinear:
        """The compact form of a dense ``linear`` layer under ``mask`` (values copied at the
        active positions; bias copied)."""
        if not isinstance(linear, nn.Linear):
            raise LayerError(
                f"CompactLinear.from_linear needs an nn.Linear, got {type(linear).__name__} "
                f"for layer {fqn!r}."
            )
        held = int(mask.sum())
        module = cls(
            linear.in_features,
            linear.out_features,
            held if capacity is None else capacity,
            bias=linear.bias is not None,
            fqn=fqn,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        module.set_layout(mask.to(linear.weight.device), linear.weight)
        if linear.bias is not None:
            with torch.no_grad():
                module.bias.copy_(linear.bias)
            module.bias.requires_grad_(linear.bias.requires_grad)
        module.values.requires_grad_(linear.weight.requires_grad)
        return module

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """The masked dense equivalent: an ``nn.Linear`` with zeros at inactive weights."""
        out = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.values.device,
            dtype=self.values.dtype,
        )
        out.weight.copy_(self.dense_weight())
        if self.bias is not None:
            out.bias.copy_(self.bias)
            out.bias.requires_grad_(self.bias.requires_grad)
        out.weight.requires_grad_(self.values.requires_grad)
        return out


def _refresh_after_load(module: CompactLinear, incompatible: Any) -> None:
    """The cached ``nnz`` follows the loaded ``row_ptr``, once the loaded layout is checked (the
    kernels trust it: a layout of another layer could make them read out of bounds)."""
    row_ptr, nnz = module.row_ptr, int(module.row_ptr[-1])
    lengths = module.row_lengths()
    problem = None
    if (
        int(row_ptr[0]) != 0
        or bool((lengths < 0).any())
        or bool((lengths > module.in_features).any())
    ):
        problem = "row_ptr is not a valid row pointer (it must start at 0, never decrease, and "
        problem += f"give no row more than in_features={module.in_features} slots)"
    elif nnz > module.capacity:
        problem = f"row_ptr holds {nnz} slots, more than the capacity of {module.capacity}"
    elif nnz and not (
        int(module.index[:nnz].min()) >= 0 and int(module.index[:nnz].max()) < module.in_features
    ):
        problem = f"a column index lies outside 0..{module.in_features - 1}"
    if problem is not None:
        raise LayerError(
            f"compact layer {module.fqn!r}: the loaded state is not a layout of this "
            f"{module.out_features}x{module.in_features} layer: {problem}. Load the state_dict "
            f"of the same model."
        )
    module._nnz = nnz
