"""Export a sparse model for inference: masked ``nn.Linear`` layers become :class:`PackedLinear`.

:func:`export` packs every masked Linear layer's weight with a storage format (``condensed`` by
default, or per layer through ``rules``) and swaps in a :class:`PackedLinear` that computes
``fmt.linear(packed, x, bias)``. Its packed tensors are registered buffers, so the exported
model's ``state_dict`` holds tensors only (it loads with ``torch.load(weights_only=True)``).

``nn.Conv1d`` and ``nn.Conv2d`` layers (``groups=1``) that a rule names become
:class:`PackedConv`, which unfolds the input into patches and runs the same ``fmt.linear`` on
them: it saves the weight's bytes but ran slower than the dense convolution on the CPU layers
measured, so convolutions are not packed by default. A convolution no rule names, a grouped
one, or a layer whose rule says ``None`` stays dense with its inactive weights zeroed, and the
report lists it as skipped with the reason.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from .config import component_from_dict
from .errors import ConfigError, LayerError, SparsityError
from .layers import LayerSpec
from .registry import ComponentType, Registry, get_registry
from .scheduler import DSTScheduler

__all__ = [
    "ExportResult",
    "ExportRow",
    "ExportSizeWarning",
    "PackedConv",
    "PackedLinear",
    "SkippedLayer",
    "export",
]

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

    def extra_repr(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.format_params.items())
        meta = "".join(f", {k}={v!r}" for k, v in self._meta.items() if k != "shape")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.format_name}({params}){meta}"
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
        super().__init__(fmt, packed, bias, format_name=format_name, registry=registry)
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
        if not batched and x.dim() != self.spatial + 1:
            raise LayerError(
                f"PackedConv ({type(self).__name__} of a Conv{self.spatial}d) expects a "
                f"{self.spatial + 2}-D (batched) or {self.spatial + 1}-D input, got shape "
                f"{tuple(x.shape)}."
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
        params = ", ".join(f"{k}={v!r}" for k, v in self.format_params.items())
        geometry = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.pads}, dilation={self.dilation}"
        )
        mode = "" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode!r}"
        return (
            f"{geometry}{mode}, bias={self.bias is not None}, format={self.format_name}({params})"
        )


@attrs.frozen
class ExportRow:
    """One packed layer: its format and weight bytes before and after packing."""

    fqn: str
    format: str
    shape: tuple[int, ...]
    dense_bytes: int
    packed_bytes: int

    @property
    def saved_bytes(self) -> int:
        return self.dense_bytes - self.packed_bytes

    @property
    def ratio(self) -> float:
        """Packed bytes over dense bytes (below 1 saves memory)."""
        return self.packed_bytes / self.dense_bytes if self.dense_bytes else float("nan")


class ExportSizeWarning(UserWarning):
    """A layer was packed into a format that takes at least as many bytes as its dense weight."""


@attrs.frozen
class SkippedLayer:
    """A layer with a mask that was not packed, and why."""

    fqn: str
    layer_type: str
    reason: str


@attrs.frozen(eq=False)
class ExportResult:
    """The exported model, one :class:`ExportRow` per packed layer, and the skipped layers."""

    model: nn.Module
    report: tuple[ExportRow, ...]
    skipped: tuple[SkippedLayer, ...] = ()

    @property
    def dense_bytes(self) -> int:
        return sum(row.dense_bytes for row in self.report)

    @property
    def packed_bytes(self) -> int:
        return sum(row.packed_bytes for row in self.report)

    def format_report(self) -> str:
        """A printable table of the packed layers' bytes, a total, and the skipped layers."""
        header = ("layer", "format", "shape", "dense B", "packed B", "saved B", "ratio")
        rows = [
            (
                r.fqn or "<model>",
                r.format,
                "x".join(map(str, r.shape)),
                str(r.dense_bytes),
                str(r.packed_bytes),
                str(r.saved_bytes),
                f"{r.ratio:.3f}",
            )
            for r in self.report
        ]
        dense, packed = self.dense_bytes, self.packed_bytes
        rows.append(
            (
                "total",
                "",
                "",
                str(dense),
                str(packed),
                str(dense - packed),
                f"{packed / dense:.3f}" if dense else "-",
            )
        )
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(
                c.ljust(w) if i < 3 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        out = [line(header), line(["-" * w for w in widths])]
        out += [line(row) for row in rows]
        for s in self.skipped:
            out.append(f"skipped {s.fqn} ({s.layer_type}): {s.reason}")
        return "\n".join(out)


def _check_rules(rules: Sequence[Any]) -> list[tuple[str, Any]]:
    checked = []
    for rule in rules:
        if (
            not isinstance(rule, Sequence)
            or isinstance(rule, str)
            or len(rule) != 2
            or not isinstance(rule[0], str)
            or not rule[0]
        ):
            raise ConfigError(
                f"export rule {rule!r} must be a (pattern, format) pair, e.g. "
                f"('classifier', 'csr') or ('Linear', {{'kind': 'nm', 'n': 2, 'm': 4}})."
            )
        checked.append((rule[0], rule[1]))
    return checked


def _choose_format(
    fqn: str, module: nn.Module, rules: Sequence[tuple[str, Any]], default: Any
) -> tuple[Any, bool]:
    """The layer's format and whether a rule (rather than the default) chose it."""
    kind = type(module).__name__
    for pattern, fmt in rules:
        if fnmatch.fnmatchcase(fqn, pattern) or fnmatch.fnmatchcase(kind, pattern):
            return fmt, True
    return default, False


def _make_format(value: Any, structures: Any, registry: Registry) -> Any:
    """A format instance from a name / dict / instance; a bare name adapts to the structure."""
    if isinstance(value, str) and structures is not None:
        cls = registry.get(ComponentType.FORMAT, value)
        if hasattr(cls, "for_structures"):  # e.g. nm picks the layer's N:M
            return cls.for_structures(structures)
    return component_from_dict(ComponentType.FORMAT, value, registry)


def _check_supports(fmt: Any, name: str, structures: Any, spec: LayerSpec) -> None:
    if hasattr(fmt, "check_supports"):
        fmt.check_supports(structures, spec)
    elif not fmt.supports(structures):
        raise LayerError(
            f"format {name!r} cannot store layer {spec.fqn!r} with structure {structures!r}. "
            f"Export this layer as 'csr' or 'dense_masked' (rules=[({spec.fqn!r}, 'csr')])."
        )


def _masks_and_structures(masks: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    if isinstance(masks, DSTScheduler):
        layers = masks.layers
        return {f: s.mask for f, s in layers.items()}, {f: s.structure for f, s in layers.items()}
    if isinstance(masks, Mapping):
        return dict(masks), None
    raise ConfigError(
        f"export needs a DSTScheduler or a mapping {{layer name: bool mask}}, got "
        f"{type(masks).__name__}."
    )


def export(
    model: nn.Module,
    masks: DSTScheduler | Mapping[str, torch.Tensor],
    *,
    format: Any = "condensed",
    rules: Sequence[tuple[str, Any]] = (),
    inplace: bool = False,
    registry: Registry | None = None,
) -> ExportResult:
    """Replace every masked ``nn.Linear`` of ``model`` by a :class:`PackedLinear`, and every
    masked ``nn.Conv1d`` / ``nn.Conv2d`` (``groups=1``) that a rule names by a
    :class:`PackedConv`.

    Every layer is checked and packed before the model is copied or changed, so an error leaves
    ``model`` as it was.

    Args:
        model: the trained model (its weights are read; it is deep-copied unless ``inplace``).
        masks: the scheduler that trained it (its layer structures are checked against each
            format, naming the layer and the fix), or ``{layer name: bool mask}``.
        format: the default format: a registry name (``"condensed"``, ``"csr"``, ``"nm"``,
            ``"dense_masked"``), a ``{"kind": name, **params}`` dict or an instance. Given by
            name with a scheduler, ``nm`` takes each layer's N:M.
        rules: ``(pattern, format)`` pairs; a pattern is fnmatched against the layer's name and
            its class name (``"Linear"``, ``"Conv2d"``); the first match wins, else ``format``.
            The format ``None`` keeps a layer as it is (dense, inactive weights zeroed).
            Convolutions take ``format`` only through a rule (``("Conv*", "condensed")``);
            without one they stay dense.
        inplace: change ``model`` itself instead of a copy.
        registry: the component registry (default: the process-wide one).
    """
    registry = registry or get_registry()
    mask_map, structures = _masks_and_structures(masks)
    rules = _check_rules(rules)
    modules = dict(model.named_modules())
    unknown = sorted(set(mask_map) - set(modules))
    if unknown:
        raise LayerError(
            f"export: masks name layers {unknown} that the model does not have; pass the model "
            f"the scheduler was built on (or fix the mask names)."
        )
    planned: dict[str, PackedLinear] = {}
    report: list[ExportRow] = []
    skipped: list[SkippedLayer] = []
    for fqn, module in modules.items():
        if fqn not in mask_map:
            continue
        mask, weight = mask_map[fqn], getattr(module, "weight", None)
        kind = type(module).__name__
        if not isinstance(weight, torch.Tensor) or tuple(mask.shape) != tuple(weight.shape):
            raise LayerError(
                f"export: the mask of layer {fqn!r} has shape {tuple(mask.shape)} but its weight "
                f"is {None if weight is None else tuple(weight.shape)}; pass the matching mask."
            )
        chosen, by_rule = _choose_format(fqn, module, rules, format)
        conv = isinstance(module, nn.Conv1d | nn.Conv2d)
        reason = None
        if chosen is None:
            reason = "kept dense by the export rule (format None)"
        elif conv and not by_rule:
            reason = (
                f"a convolution is packed only when a rule names it, e.g. rules=[({kind!r}, "
                f"'condensed')]: packed, it runs as unfold + format.linear, slower than the "
                f"dense convolution at the sizes measured"
            )
        elif conv and module.groups != 1:
            reason = f"a grouped convolution (groups={module.groups}) is not packed"
        elif not conv and not isinstance(module, nn.Linear):
            reason = f"only Linear, Conv1d and Conv2d layers are packed, not {kind}"
        if reason is not None:
            reason += "; kept dense with its inactive weights zeroed"
            skipped.append(SkippedLayer(fqn, kind, reason))
            continue
        spec = LayerSpec.of(fqn, module)
        layer_structures = None if structures is None else structures[fqn]
        fmt = _make_format(chosen, layer_structures, registry)
        name = registry.name_of(ComponentType.FORMAT, fmt)
        if layer_structures is not None:
            _check_supports(fmt, name, layer_structures, spec)
        try:
            packed = fmt.pack(weight.detach(), mask.to(device=weight.device, dtype=torch.bool))
        except (SparsityError, ValueError, RuntimeError) as exc:
            raise LayerError(
                f"export: format {name!r} cannot pack layer {fqn!r}: {exc} (choose another "
                f"format for it with rules=[({fqn!r}, 'csr')])."
            ) from exc
        bias = module.bias.detach() if module.bias is not None else None
        if conv:
            planned[fqn] = PackedConv(fmt, packed, bias, format_name=name, conv=module)
        else:
            planned[fqn] = PackedLinear(
                fmt,
                packed,
                bias,
                format_name=name,
                in_features=module.in_features,
                out_features=module.out_features,
            )
        report.append(
            ExportRow(
                fqn,
                name,
                tuple(weight.shape),
                weight.numel() * weight.element_size(),
                planned[fqn].nbytes(),
            )
        )
    larger = [r for r in report if r.format != "dense_masked" and r.ratio >= 1]
    if larger:
        listed = ", ".join(f"{r.fqn!r} ({r.format}: {r.ratio:.3f}x)" for r in larger)
        warnings.warn(
            f"export: packing does not save memory on {listed}: at this density the packed "
            f"weight (values plus indices) is no smaller than the dense one. Keep such a layer "
            f"dense with rules=[({larger[0].fqn!r}, None)].",
            ExportSizeWarning,
            stacklevel=2,
        )
    target = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for layer in skipped:
            target.get_submodule(layer.fqn).weight.masked_fill_(~mask_map[layer.fqn].bool(), 0)
    for fqn, packed_module in planned.items():
        if not fqn:
            target = packed_module  # the model is itself one Linear layer
            continue
        parent, _, child = fqn.rpartition(".")
        setattr(target.get_submodule(parent), child, packed_module)
    return ExportResult(target, tuple(report), tuple(skipped))
