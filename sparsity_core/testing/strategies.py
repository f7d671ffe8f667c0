"""Hypothesis strategies for sparsity-core values: layer specs, densities, scores, masks, configs.

Every factory takes keyword-only options that accept a plain value or a strategy, validates
them eagerly, and keeps sizes small. Tensors are built from a drawn integer seed through a
``torch.Generator``, so examples are cheap, shrink well and never touch the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from ..config import DSTConfig
from ..layers import SUPPORTED_LAYER_TYPES, LayerSpec
from ..registry import ComponentType, get_registry
from ..structures import active_rows_of

__all__ = [
    "densities",
    "layer_specs",
    "masks",
    "method_configs",
    "scores",
    "seeds",
    "structured_masks",
    "structured_specs",
]

_SEED_MAX = 2**32 - 1
_NONFINITE = (float("nan"), float("inf"), float("-inf"))


def _strategy(value: Any) -> SearchStrategy[Any]:
    """``value`` itself if it is a strategy, else a strategy that always gives ``value``."""
    return value if isinstance(value, SearchStrategy) else st.just(value)


def _generator(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def seeds() -> SearchStrategy[int]:
    """Integer seeds for ``torch.Generator`` (shrinking towards 0)."""
    return st.integers(min_value=0, max_value=_SEED_MAX)


def densities(*, min_value: float = 0.05, max_value: float = 1.0) -> SearchStrategy[float]:
    """Densities in ``[min_value, max_value]``, a sub-interval of ``(0, 1]``, ends included."""
    if not 0.0 < min_value <= max_value <= 1.0:
        raise ValueError(
            f"densities(min_value={min_value!r}, max_value={max_value!r}) needs "
            f"0 < min_value <= max_value <= 1."
        )
    # The ends (density 1.0 above all) are where rounding bugs live: draw them often.
    return st.one_of(
        st.sampled_from(sorted({min_value, max_value})),
        st.floats(min_value=min_value, max_value=max_value, allow_nan=False),
    )


def _shape_for(draw: Any, layer_type: str, max_side: int) -> tuple[int, ...]:
    side = st.integers(min_value=1, max_value=max_side)
    out, inp = draw(side), draw(side)
    kernel = st.integers(min_value=1, max_value=min(3, max_side))
    if layer_type == "Linear":
        return (out, inp)
    if layer_type == "Conv1d":
        return (out, inp, draw(kernel))
    return (out, inp, draw(kernel), draw(kernel))


def layer_specs(
    *,
    layer_types: Sequence[str] | str | SearchStrategy[str] = tuple(SUPPORTED_LAYER_TYPES),
    max_side: int | SearchStrategy[int] = 8,
    fqn: str | SearchStrategy[str] = "layer",
) -> SearchStrategy[LayerSpec]:
    """Layer specs of the given types; Conv2d shapes are ``(out, in, kh, kw)``, kernels <= 3.

    Args:
        layer_types: a layer type, a sequence to choose from, or a strategy of names.
        max_side: the largest ``out`` / ``in`` channel count.
        fqn: the layer name.
    """
    if isinstance(layer_types, str):
        layer_types = (layer_types,)
    if not isinstance(layer_types, SearchStrategy):
        unknown = [t for t in layer_types if t not in SUPPORTED_LAYER_TYPES]
        if unknown or not layer_types:
            raise ValueError(
                f"layer_specs(layer_types={list(layer_types)!r}) must be a non-empty subset of "
                f"{sorted(SUPPORTED_LAYER_TYPES)}."
            )
        layer_types = st.sampled_from(tuple(layer_types))
    if not isinstance(max_side, SearchStrategy) and (
        isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1
    ):
        raise ValueError(f"layer_specs(max_side={max_side!r}) must be an integer >= 1.")

    @st.composite
    def build(draw: Any) -> LayerSpec:
        layer_type = draw(layer_types)
        shape = _shape_for(draw, layer_type, draw(_strategy(max_side)))
        return LayerSpec(draw(_strategy(fqn)), shape, layer_type)

    return build()


def scores(
    shape: Sequence[int] | SearchStrategy[Sequence[int]],
    *,
    ties: bool | SearchStrategy[bool] = True,
    nonfinite: bool | SearchStrategy[bool] = False,
    dtype: torch.dtype = torch.float32,
) -> SearchStrategy[torch.Tensor]:
    """Float score tensors of ``shape``: distinct values, or (``ties``) few levels and zeros.

    Args:
        ties: also draw tensors with many equal values (a handful of levels, all zeros, or
            one constant).
        nonfinite: sprinkle NaN, +Inf and -Inf over some positions.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"scores(dtype={dtype}) must be a floating dtype.")

    @st.composite
    def build(draw: Any) -> torch.Tensor:
        size = tuple(int(s) for s in draw(_strategy(shape)))
        kinds = ["distinct"]
        if draw(_strategy(ties)):
            kinds += ["levels", "zeros", "constant", "sparse"]
        kind = draw(st.sampled_from(kinds))
        gen = _generator(draw(seeds()))
        if kind == "distinct":
            out = torch.randn(size, generator=gen, dtype=dtype)
        elif kind == "levels":
            levels = draw(st.integers(min_value=2, max_value=4))
            out = torch.randint(0, levels, size, generator=gen).to(dtype)
        elif kind == "zeros":
            out = torch.zeros(size, dtype=dtype)
        elif kind == "constant":
            out = torch.full(size, draw(st.sampled_from([1.0, -2.5, 1e-30])), dtype=dtype)
        else:
            out = torch.randn(size, generator=gen, dtype=dtype)
            out = out * (torch.rand(size, generator=gen) < 0.3).to(dtype)
        if draw(_strategy(nonfinite)):
            rate = draw(st.sampled_from([0.1, 0.5, 1.0]))
            where = torch.rand(size, generator=gen) < rate
            values = torch.tensor(_NONFINITE, dtype=dtype)
            picks = values[torch.randint(0, len(_NONFINITE), size, generator=gen)]
            out = torch.where(where, picks, out)
        return out

    return build()


def masks(
    spec: LayerSpec | SearchStrategy[LayerSpec],
    *,
    budget: int | SearchStrategy[int] | None = None,
) -> SearchStrategy[torch.Tensor]:
    """Boolean masks shaped like ``spec`` with exactly ``budget`` active positions, anywhere.

    Args:
        budget: the active count (``None``: any count from 0 to ``spec.numel``).
    """
    if isinstance(budget, bool) or not (budget is None or isinstance(budget, int | SearchStrategy)):
        raise ValueError(f"masks(budget={budget!r}) must be an int, a strategy or None.")

    @st.composite
    def build(draw: Any) -> torch.Tensor:
        layer = draw(_strategy(spec))
        if budget is None:
            count = draw(st.integers(min_value=0, max_value=layer.numel))
        else:
            count = draw(_strategy(budget))
        if not 0 <= count <= layer.numel:
            raise ValueError(
                f"masks: budget {count} is outside [0, {layer.numel}] for layer {layer.fqn!r} "
                f"of shape {layer.shape}."
            )
        out = torch.zeros(layer.numel, dtype=torch.bool)
        order = torch.randperm(layer.numel, generator=_generator(draw(seeds())))
        out[order[:count]] = True
        return out.reshape(layer.shape)

    return build()


def _group_size(structure: Any) -> int:
    """The M a layer's fan-in must be a multiple of: ``structure.m`` (N:M), else 1.

    A composed structure (one that wraps another as ``inner``) takes its inner structure's.
    """
    while structure is not None:
        m = getattr(structure, "m", None)
        if isinstance(m, int) and not isinstance(m, bool):
            return m
        structure = getattr(structure, "inner", None)
    return 1


def structured_specs(
    structure: Any,
    *,
    layer_types: Sequence[str] | str | SearchStrategy[str] = ("Linear", "Conv2d"),
    max_side: int | SearchStrategy[int] = 8,
    max_groups: int | SearchStrategy[int] = 3,
    fqn: str | SearchStrategy[str] = "layer",
) -> SearchStrategy[LayerSpec]:
    """Layer specs whose fan-in suits ``structure``: a multiple of M for N:M, anything else.

    For a convolution the fan-in is ``C_in * kh * kw``: the kernel is drawn first (sides up to
    3), then ``C_in`` is a multiple of ``M / gcd(M, kh * kw)``, so some groups of M span input
    channels.

    Args:
        structure: a structure (fine or composed) or a strategy of them.
        layer_types: a layer type, a sequence to choose from, or a strategy of names.
        max_side: the largest output count, and the largest ``C_in`` without structure.
        max_groups: under N:M, the largest number of M-groups in a row is about this (the
            fan-in stays at most ``max_groups * M``).
        fqn: the layer name.
    """
    if isinstance(layer_types, str):
        layer_types = (layer_types,)
    if not isinstance(layer_types, SearchStrategy):
        bad = [t for t in layer_types if t not in SUPPORTED_LAYER_TYPES]
        if bad or not layer_types:
            raise ValueError(
                f"structured_specs(layer_types={list(layer_types)!r}) must be a non-empty subset "
                f"of {sorted(SUPPORTED_LAYER_TYPES)}."
            )
        layer_types = st.sampled_from(tuple(layer_types))
    for name, value in (("max_side", max_side), ("max_groups", max_groups)):
        if not isinstance(value, SearchStrategy) and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"structured_specs({name}={value!r}) must be an integer >= 1.")

    @st.composite
    def build(draw: Any) -> LayerSpec:
        layer_type = draw(layer_types)
        m = _group_size(draw(_strategy(structure)))
        side = draw(_strategy(max_side))
        out = draw(st.integers(min_value=1, max_value=side))
        kernel = (1, 1)
        if layer_type == "Conv2d":
            kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        elif layer_type == "Conv1d":
            kernel = (draw(st.integers(1, 3)),)
        spatial = math.prod(kernel)
        step = m // math.gcd(m, spatial)
        if m == 1:
            c_in = draw(st.integers(min_value=1, max_value=side))
        else:
            most = max(1, draw(_strategy(max_groups)) * m // (step * spatial))
            c_in = step * draw(st.integers(min_value=1, max_value=most))
        shape = (out, c_in) if layer_type == "Linear" else (out, c_in, *kernel)
        return LayerSpec(draw(_strategy(fqn)), shape, layer_type)

    return build()


def structured_masks(
    structure: Any,
    spec: LayerSpec | SearchStrategy[LayerSpec],
    *,
    budget: int | SearchStrategy[int] | None = None,
    ablate: bool | SearchStrategy[bool] = False,
) -> SearchStrategy[torch.Tensor]:
    """Masks that satisfy ``structure``: ``structure.fill`` of an empty mask on random scores.

    Args:
        structure: a structure (fine or composed) or a strategy of them.
        spec: the layer (its fan-in must suit the structure, see :func:`structured_specs`).
        budget: the layer budget; ``None`` draws one from ``structure.budget`` at a density
            that leaves every neuron at least one input (the structure's fixed density, e.g.
            N/M, or now and then 1).
        ablate: for a composed structure with neuron ablation (one with ``inner``), switch off
            a random set of neurons (never below ``min_active_rows``) and fill the survivors
            with the inner structure, as after an update that ablated them.
    """
    if isinstance(budget, bool) or not (budget is None or isinstance(budget, int | SearchStrategy)):
        raise ValueError(f"structured_masks(budget={budget!r}) must be an int, a strategy or None.")

    @st.composite
    def build(draw: Any) -> torch.Tensor:
        chosen = draw(_strategy(structure))
        layer = draw(_strategy(spec))
        if budget is None:
            count = chosen.budget(layer, draw(_structure_densities(chosen, layer)))
        else:
            count = draw(_strategy(budget))
        if not 0 <= count <= layer.numel:
            raise ValueError(
                f"structured_masks: budget {count} is outside [0, {layer.numel}] for layer "
                f"{layer.fqn!r} of shape {layer.shape}."
            )
        gen = _generator(draw(seeds()))
        values = torch.rand(layer.shape, generator=gen)
        empty = torch.zeros(layer.shape, dtype=torch.bool)
        inner = getattr(chosen, "inner", None)
        if inner is not None and draw(_strategy(ablate)):
            fewest = max(1, int(chosen.min_active_rows(layer, count)))
            alive = draw(st.integers(min_value=min(fewest, layer.fan_out), max_value=layer.fan_out))
            order = torch.randperm(layer.fan_out, generator=gen)
            rows = torch.zeros(layer.fan_out, dtype=torch.bool)
            rows[order[:alive]] = True
            out = inner.fill(values, empty, ~empty, count, layer, active_rows=rows)
            if not torch.equal(active_rows_of(out), rows):
                raise ValueError(
                    f"structured_masks: budget {count} leaves some of the {alive} active neurons "
                    f"of layer {layer.fqn!r} empty; draw a larger budget."
                )
            return out
        return chosen.fill(values, empty, ~empty, count, layer)

    return build()


def _structure_densities(structure: Any, spec: LayerSpec) -> SearchStrategy[float]:
    fixed = getattr(structure, "fixed_density", lambda s: None)(spec)
    if fixed is not None:
        return st.sampled_from([float(fixed)] * 3 + [1.0])
    return densities(min_value=min(1.0, 1.0 / spec.fan_in))


def _component(ctype: ComponentType, value: Any) -> SearchStrategy[Any]:
    if value is None:
        return st.sampled_from(get_registry().names(ctype))
    return _strategy(value)


def method_configs(
    *,
    prune: Any = None,
    grow: Any = None,
    structures: Any = ("unstructured",),
    distribution: Any = None,
    drop: Any = None,
    density: float | SearchStrategy[float] | None = None,
    delta_t: int | SearchStrategy[int] | None = None,
    seed: int | SearchStrategy[int] | None = None,
    t_end: int | SearchStrategy[int | None] | None = None,
) -> SearchStrategy[DSTConfig]:
    """DST configurations drawn from the registry, with small ``delta_t``.

    Each component option takes anything ``DSTConfig`` accepts (a registry name, a
    ``{"kind": ...}`` dict, an instance) or a strategy of those; ``None`` draws a registered
    name with its default hyper-parameters.

    Args:
        density: default ``densities(min_value=0.2)``.
        delta_t: default 2 to 5 steps.
        seed: default any small integer.
        t_end: ``None`` lets the scheduler use 75% of its ``total_steps``.
    """
    density = densities(min_value=0.2) if density is None else density
    delta_t = st.integers(min_value=2, max_value=5) if delta_t is None else delta_t
    seed = st.integers(min_value=0, max_value=2**16) if seed is None else seed

    @st.composite
    def build(draw: Any) -> DSTConfig:
        return DSTConfig(
            prune=draw(_component(ComponentType.PRUNE, prune)),
            grow=draw(_component(ComponentType.GROWTH, grow)),
            structures=draw(_strategy(structures)),
            distribution=draw(_component(ComponentType.DISTRIBUTION, distribution)),
            drop=draw(_component(ComponentType.SCHEDULE, drop)),
            density=draw(_strategy(density)),
            delta_t=draw(_strategy(delta_t)),
            seed=draw(_strategy(seed)),
            t_end=draw(_strategy(t_end)),
        )

    return build()
