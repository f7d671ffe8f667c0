"""Which layers are sparse, and the static facts the engine needs about each."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import attrs
import torch
from torch import nn

from .compact import is_compact
from .errors import ConfigError, LayerError

__all__ = [
    "SUPPORTED_LAYER_TYPES",
    "LayerSpec",
    "SkippedLayer",
    "layer_kind",
    "output_layer",
    "select_layers",
    "sparse_param",
    "split_frozen",
    "unsupported_weights",
]

SUPPORTED_LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
}


def layer_kind(module: nn.Module) -> str | None:
    """The supported layer kind ``module`` is (``"Linear"``, ...), or None: a compact layer
    counts as the kind it stands for."""
    if is_compact(module):
        return module.sparse_layer_type
    for name, cls in SUPPORTED_LAYER_TYPES.items():
        if isinstance(module, cls):
            return name
    return None


def sparse_param(module: nn.Module) -> torch.Tensor | None:
    """The tensor a layer trains: its dense ``weight``, or a compact layer's ``values``."""
    if is_compact(module):
        return module.values
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


@attrs.frozen
class LayerSpec:
    """A sparse layer's name and weight geometry.

    The weight is seen as a matrix ``[fan_out, fan_in]``: for a convolution, ``fan_in`` is
    ``C_in/groups * kh * kw`` in PyTorch's contiguous ``(C_in, kh, kw)`` order, so row ``o`` of
    ``weight.reshape(fan_out, -1)`` holds output channel ``o``'s inputs.
    """

    fqn: str
    shape: tuple[int, ...] = attrs.field(converter=tuple)
    layer_type: str = "Linear"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def fan_out(self) -> int:
        return self.shape[0]

    @property
    def fan_in(self) -> int:
        return self.numel // self.shape[0] if self.shape[0] else 0

    @property
    def kernel_numel(self) -> int:
        """Product of the kernel's spatial sizes (1 for Linear)."""
        return math.prod(self.shape[2:]) if len(self.shape) > 2 else 1

    @classmethod
    def of(cls, fqn: str, module: nn.Module) -> LayerSpec:
        if is_compact(module):
            return cls(fqn, module.dense_shape, module.sparse_layer_type)
        return cls(fqn, tuple(module.weight.shape), type(module).__name__)


@attrs.frozen
class SkippedLayer:
    """A layer (or weight) left dense, and why: by the scheduler, or by an export.

    ``requested`` marks what the configuration asked for (a ``LayerRule(..., dense=True)``),
    which is reported but never warned about.
    """

    fqn: str
    reason: str
    layer_type: str = ""
    shape: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    requested: bool = False


def _matches(fqn: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(fqn, p) for p in patterns)


# Weights of modules that hold a projection the scheduler cannot sparsify as a layer: the
# attention's packed q/k/v projection is a bare Parameter, not a Linear module.
_PACKED_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def unsupported_weights(
    model: nn.Module, *, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[SkippedLayer]:
    """Projection weights that are not a supported layer (``nn.MultiheadAttention``'s packed
    in-projection), among those ``include``/``exclude`` would select: they stay dense."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.MultiheadAttention):
            continue
        for attr in _PACKED_PROJECTIONS:
            weight = getattr(module, attr, None)
            fqn = f"{name}.{attr}" if name else attr
            if not isinstance(weight, torch.Tensor):
                continue
            if (include and not _matches(fqn, include)) or _matches(fqn, exclude):
                continue
            out.append(
                SkippedLayer(
                    fqn,
                    f"not a supported layer: nn.MultiheadAttention keeps its q/k/v projection "
                    f"as one packed Parameter ({attr}), which stays dense; its out_proj is a "
                    f"Linear and is sparsified; pass exclude=[{fqn!r}] to acknowledge it",
                    layer_type=type(module).__name__,
                    shape=tuple(weight.shape),
                )
            )
    return out


def split_frozen(
    chosen: Sequence[tuple[LayerSpec, nn.Module]],
) -> tuple[list[tuple[LayerSpec, nn.Module]], list[SkippedLayer]]:
    """Split selected layers into trainable ones and frozen ones (``requires_grad=False``).

    A frozen weight never gets a gradient, so dropping it would lose trained values and growing
    it would add zeros that can never train: frozen layers are skipped, never sparsified.
    """
    trainable, frozen = [], []
    for spec, module in chosen:
        if sparse_param(module).requires_grad:
            trainable.append((spec, module))
        else:
            frozen.append(
                SkippedLayer(
                    spec.fqn,
                    f"frozen (requires_grad=False): it would never train, so it stays dense; "
                    f"pass exclude=[{spec.fqn!r}] to acknowledge it, or set requires_grad=True "
                    f"before building the scheduler to sparsify it",
                    layer_type=spec.layer_type,
                    shape=spec.shape,
                )
            )
    return trainable, frozen


def output_layer(model: nn.Module) -> str | None:
    """The name of the model's output layer as structures see it: its last Linear or
    convolution in module order (``None`` if it has none). Neuron ablation never removes
    that layer's neurons, which are the model's outputs."""
    names = [n for n, m in model.named_modules() if layer_kind(m) is not None]
    return names[-1] if names else None


def select_layers(
    model: nn.Module,
    *,
    layer_types: Sequence[str] = tuple(SUPPORTED_LAYER_TYPES),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[tuple[LayerSpec, nn.Module]]:
    """The layers of ``model`` to sparsify, in module order.

    Args:
        layer_types: class names among ``Linear``, ``Conv1d``, ``Conv2d`` (subclasses count).
        include: fnmatch patterns on the fully qualified name; empty means every layer of
            ``layer_types``.
        exclude: fnmatch patterns removed after ``include``.
    """
    unknown = [t for t in layer_types if t not in SUPPORTED_LAYER_TYPES]
    if unknown:
        raise ConfigError(
            f"layer_types {unknown} are not supported; choose among "
            f"{sorted(SUPPORTED_LAYER_TYPES)}."
        )
    kinds = set(layer_types)
    candidates = [n for n, m in model.named_modules() if layer_kind(m) in kinds]
    # Patterns may also name the packed projections that are reported, never sparsified.
    known = candidates + [s.fqn for s in unsupported_weights(model)]
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in known):
            raise ConfigError(
                f"exclude pattern {pattern!r} matches no {'/'.join(layer_types)} layer, so it "
                f"excludes nothing; check the spelling against the layer names: {known}."
            )
    chosen: list[tuple[LayerSpec, nn.Module]] = []
    for fqn, module in model.named_modules():
        if layer_kind(module) not in kinds:
            continue
        if include and not _matches(fqn, include):
            continue
        if exclude and _matches(fqn, exclude):
            continue
        weight = sparse_param(module)
        if weight is None or math.prod(LayerSpec.of(fqn, module).shape) == 0:
            raise LayerError(
                f"layer {fqn!r} ({type(module).__name__}) has no parameters to sparsify "
                f"(weight shape {None if weight is None else tuple(weight.shape)}); exclude it "
                f"with exclude=[{fqn!r}]."
            )
        if weight.is_meta:
            raise LayerError(
                f"layer {fqn!r} ({type(module).__name__}) is on the meta device: its weight "
                f"has a shape but no values, so no mask can be planned or applied. Materialise "
                f"the model first (model.to_empty(device='cpu') then initialise it, or "
                f"load_state_dict(state, assign=True)), then build the optimizer and scheduler."
            )
        owner = next((spec.fqn for spec, m in chosen if sparse_param(m) is weight), None)
        if owner is not None:
            raise LayerError(
                f"layers {owner!r} and {fqn!r} share one weight tensor (tied weights), which "
                f"can hold only one mask; exclude one of them with exclude=[{fqn!r}]."
            )
        chosen.append((LayerSpec.of(fqn, module), module))
    if not chosen:
        raise ConfigError(
            f"no layer of {type(model).__name__} matches layer_types={list(layer_types)}, "
            f"include={list(include)}, exclude={list(exclude)}; widen the selection."
        )
    for pattern in include:
        if not any(fnmatch.fnmatchcase(spec.fqn, pattern) for spec, _ in chosen):
            raise ConfigError(
                f"include pattern {pattern!r} matches no {'/'.join(layer_types)} layer; "
                f"available: {candidates}."
            )
    return chosen
