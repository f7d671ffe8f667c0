"""Export a sparse model for inference: masked ``nn.Linear`` layers become :class:`PackedLinear`.

:func:`export` packs every masked Linear layer's weight with a storage format (``condensed`` by
default, or per layer through ``rules``) and swaps in a :class:`PackedLinear` that computes
``fmt.linear(packed, x, bias)``. Its packed tensors are registered buffers, so the exported
model's ``state_dict`` holds tensors only (it loads with ``torch.load(weights_only=True)``).

Convolutions are not packed in this version: they stay dense, with their inactive weights zeroed,
and the report lists them as skipped with the reason.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
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
) -> Any:
    kind = type(module).__name__
    for pattern, fmt in rules:
        if fnmatch.fnmatchcase(fqn, pattern) or fnmatch.fnmatchcase(kind, pattern):
            return fmt
    return default


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
    """Replace every masked ``nn.Linear`` of ``model`` by a :class:`PackedLinear`.

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
            its class name (``"Linear"``); the first match wins, else ``format``.
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
        if not isinstance(module, nn.Linear):
            skipped.append(
                SkippedLayer(
                    fqn,
                    kind,
                    f"only Linear layers are packed in this version; {kind} kept dense with "
                    f"its inactive weights zeroed",
                )
            )
            continue
        spec = LayerSpec.of(fqn, module)
        chosen = _choose_format(fqn, module, rules, format)
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
            f"dense with rules=[({larger[0].fqn!r}, 'dense_masked')].",
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
