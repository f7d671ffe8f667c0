"""Export a sparse model for inference: masked ``nn.Linear`` layers become :class:`PackedLinear`.

:func:`export` packs every masked Linear layer's weight with a storage format (``condensed`` by
default, or per layer through ``rules``) and swaps in a :class:`PackedLinear` that computes
``fmt.linear(packed, x, bias)``. Its packed tensors are registered buffers, so the exported
model's ``state_dict`` holds tensors only (it loads with ``torch.load(weights_only=True)``).

``nn.Conv1d`` and ``nn.Conv2d`` layers (``groups=1``) that a rule names become
:class:`PackedConv`, which unfolds the input into patches and runs the same ``fmt.linear`` on
them: it saves the weight's bytes but ran slower than the dense convolution in 13 of the 16 CPU
cases measured (``benchmarks/bench_conv_export.py``), so convolutions are not packed by
default. A convolution no rule names, a grouped one, or a layer whose rule says ``None`` stays
dense with its inactive weights zeroed, and the report lists it as skipped with the reason. The
modules themselves live in :mod:`sparsity_core.packed_modules`.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from .compact import is_compact
from .config import component_from_dict
from .errors import ConfigError, LayerError, SparsityError
from .layers import LayerSpec, SkippedLayer
from .packed_modules import PackedConv, PackedLinear
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


def _pack(fmt: Any, module: nn.Module, weight: Any, mask: torch.Tensor) -> Any:
    """The packed weight of a layer: a compact layer's straight from its layout when the
    format can take one (``pack_layout``), else through a transient dense weight."""
    if is_compact(module):
        from_layout = getattr(fmt, "pack_layout", None)
        if callable(from_layout):
            return from_layout(module.values, module.index, module.row_ptr, module.dense_shape)
        dense = module.dense_weight()
        return fmt.pack(dense, mask.to(device=dense.device, dtype=torch.bool))
    return fmt.pack(weight.detach(), mask.to(device=weight.device, dtype=torch.bool))


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
    :class:`PackedConv`. A compact layer (:class:`~sparsity_core.CompactLinear`) becomes a
    :class:`PackedLinear` too, packed straight from its layout where the format has
    ``pack_layout`` (``condensed``, ``csr``: no dense weight, no repacking).

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
        compact = is_compact(module)
        shape = module.dense_shape if compact else getattr(weight, "shape", None)
        if not (compact or isinstance(weight, torch.Tensor)) or tuple(mask.shape) != tuple(shape):
            raise LayerError(
                f"export: the mask of layer {fqn!r} has shape {tuple(mask.shape)} but its weight "
                f"is {None if shape is None else tuple(shape)}; pass the matching mask."
            )
        if compact and not torch.equal(module.mask(), mask.to(module.row_ptr.device)):
            raise LayerError(
                f"export: compact layer {fqn!r} holds another layout than its mask; pass the "
                f"scheduler that trains it (or its masks)."
            )
        chosen, by_rule = _choose_format(fqn, module, rules, format)
        conv = isinstance(module, nn.Conv1d | nn.Conv2d)
        reason = None
        if chosen is None:
            reason = "its format is None (by a rule or the default)"
        elif conv and not by_rule:
            reason = (
                f"a convolution is packed only when a rule names it, e.g. rules=[({kind!r}, "
                f"{format if isinstance(format, str) else 'csr'!r})]: packed, it runs as unfold "
                f"+ format.linear, slower than the dense convolution in most cases measured"
            )
        elif conv and module.groups != 1:
            reason = f"a grouped convolution (groups={module.groups}) is not packed"
        elif not conv and not compact and not isinstance(module, nn.Linear):
            reason = f"only Linear, Conv1d and Conv2d layers are packed, not {kind}"
        if reason is not None:
            reason += (
                "; kept compact" if compact else "; kept dense with its inactive weights zeroed"
            )
            skipped.append(SkippedLayer(fqn, reason, layer_type=kind))
            continue
        spec = LayerSpec.of(fqn, module)
        layer_structures = None if structures is None else structures[fqn]
        fmt = _make_format(chosen, layer_structures, registry)
        name = registry.name_of(ComponentType.FORMAT, fmt)
        if layer_structures is not None:
            _check_supports(fmt, name, layer_structures, spec)
        try:
            packed = _pack(fmt, module, weight, mask)
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
        param = module.values if compact else weight
        report.append(
            ExportRow(
                fqn,
                name,
                tuple(shape),
                math.prod(shape) * param.element_size(),
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
            if is_compact(target.get_submodule(layer.fqn)):
                continue  # holds only its active weights already
            weight = target.get_submodule(layer.fqn).weight
            mask = mask_map[layer.fqn].to(device=weight.device, dtype=torch.bool)
            weight.masked_fill_(~mask, 0)
    for fqn, packed_module in planned.items():
        if not fqn:
            target = packed_module  # the model is itself one Linear layer
            continue
        parent, _, child = fqn.rpartition(".")
        setattr(target.get_submodule(parent), child, packed_module)
    return ExportResult(target, tuple(report), tuple(skipped))
