"""Strategies for tensors and layers: specs, densities, scores, weights, masks, score contexts.

Every factory takes keyword-only options that accept a plain value or a strategy, validates
them eagerly, and keeps sizes small. A tensor's values are decoded from random bytes: for a
tensor of up to ``_DRAWN_NUMEL`` elements hypothesis draws the bytes, so a failing example
shrinks element by element to a simple tensor (zeros, small integers, the first positions of a
mask); above that the bytes come from a drawn seed through a ``torch.Generator``, which keeps
large examples cheap (only their shape and seed shrink). Neither touches the global RNG.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from ..context import ScoreContext
from ..layers import SUPPORTED_LAYER_TYPES, LayerSpec
from ..protocols import Capabilities
from ..rng import make_generator

__all__ = [
    "densities",
    "fractions",
    "layer_lists",
    "layer_specs",
    "masks",
    "score_contexts",
    "scores",
    "seeds",
    "weights",
]

_SEED_MAX = 2**32 - 1
_NONFINITE = (float("nan"), float("inf"), float("-inf"))

# Tensors with at most this many elements take their bytes from hypothesis (and shrink value
# by value); larger ones from a seed. 256 covers nearly every layer :func:`layer_specs` draws,
# and keeps a score context (about 13 bytes an element) well inside hypothesis's example size.
_DRAWN_NUMEL = 256


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


@functools.cache
def _exactly(count: int) -> SearchStrategy[bytes]:
    # One strategy per size: a new one would be validated at every draw.
    return st.binary(min_size=count, max_size=count)


def _bytes(draw: Any, numel: int, width: int) -> torch.Tensor:
    """``(numel, width)`` random bytes (int64): drawn, up to ``_DRAWN_NUMEL`` elements, else
    from a drawn seed. Drawn bytes shrink towards 0, so every decoder below maps 0 to the
    simplest value."""
    count = numel * width
    if numel > _DRAWN_NUMEL:
        gen = _generator(draw(seeds()))
        raw = torch.randint(0, 256, (count,), generator=gen, dtype=torch.uint8)
    elif count:
        raw = torch.frombuffer(bytearray(draw(_exactly(count))), dtype=torch.uint8)
    else:
        raw = torch.zeros(0, dtype=torch.uint8)
    return raw.reshape(numel, width).long()


def _values(draw: Any, size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Values in ``(-4, 4)`` on a grid of ``2**-21``, three bytes each (so a drawn tensor is
    distinct but for rare collisions). The first byte holds the sign (bit 0), the integer part
    (bits 1-2) and the first five bits of the fraction; the other two refine the fraction.
    Shrinking lowers the bytes one by one, first to last, so it settles each element on 0, 1,
    2 or 3 (then a multiple of 1/32) before it clears the refinement."""
    raw = _bytes(draw, math.prod(size), 3)
    head, tail = raw[:, 0], (raw[:, 1] * 256 + raw[:, 2]).double()
    magnitude = ((head >> 1) & 3) + ((head >> 3) + tail / 2**16) / 32
    negative = (head & 1).bool() & (magnitude > 0)  # never -0.0
    return torch.where(negative, -magnitude, magnitude).reshape(size).to(dtype)


def _sprinkle(
    draw: Any, out: torch.Tensor, rate: float, picks: Sequence[float], where: Any = None
) -> torch.Tensor:
    """``out`` with about ``rate`` of its positions (of ``where``, if given) set to one of
    ``picks``: a position's byte at or above ``256 * (1 - rate)`` marks it and chooses the
    pick, so shrinking unmarks positions (and prefers the first pick)."""
    raw = _bytes(draw, out.numel(), 1).reshape(out.shape)
    marked = raw >= round(256 * (1 - rate))
    if where is not None:
        marked &= where
    values = torch.tensor(picks, dtype=out.dtype)
    return torch.where(marked, values[raw % len(picks)], out)


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


def _layer_types(factory: str, value: Any) -> SearchStrategy[str]:
    """A layer type, a sequence of them or a strategy, as a strategy (checked eagerly)."""
    if isinstance(value, SearchStrategy):
        return value
    value = (value,) if isinstance(value, str) else tuple(value)
    if not value or any(t not in SUPPORTED_LAYER_TYPES for t in value):
        raise ValueError(
            f"{factory}(layer_types={list(value)!r}) must be a non-empty subset of "
            f"{sorted(SUPPORTED_LAYER_TYPES)}."
        )
    return st.sampled_from(value)


def _positive(factory: str, **values: Any) -> None:
    """Each value is a strategy or an integer >= 1."""
    for name, value in values.items():
        if not isinstance(value, SearchStrategy) and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{factory}({name}={value!r}) must be an integer >= 1.")


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
    layer_types = _layer_types("layer_specs", layer_types)
    _positive("layer_specs", max_side=max_side)

    return _layer_spec(layer_types, _strategy(max_side), _strategy(fqn))


# Composites are defined once at module level: hypothesis inspects a composite's source each
# time one is defined, which costs milliseconds per example if done inside a draw.
@st.composite
def _layer_spec(draw: Any, layer_types: Any, max_side: Any, fqn: Any) -> LayerSpec:
    layer_type = draw(layer_types)
    shape = _shape_for(draw, layer_type, draw(max_side))
    return LayerSpec(draw(fqn), shape, layer_type)


def scores(
    shape: Sequence[int] | SearchStrategy[Sequence[int]],
    *,
    ties: bool | SearchStrategy[bool] = True,
    nonfinite: bool | SearchStrategy[bool] = False,
    dtype: torch.dtype = torch.float32,
) -> SearchStrategy[torch.Tensor]:
    """Float score tensors of ``shape``: distinct values in ``(-4, 4)``, or (``ties``) few
    levels and zeros. Up to 256 elements the values shrink (towards zeros and small integers).

    Args:
        ties: also draw tensors with many equal values (a handful of levels, all zeros, or
            one constant).
        nonfinite: sprinkle NaN, +Inf and -Inf over some positions.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"scores(dtype={dtype}) must be a floating dtype.")

    return _scores(_strategy(shape), _strategy(ties), _strategy(nonfinite), dtype)


@st.composite
def _scores(draw: Any, shape: Any, ties: Any, nonfinite: Any, dtype: torch.dtype) -> torch.Tensor:
    size = tuple(int(s) for s in draw(shape))
    kinds = ["distinct"]
    if draw(ties):
        kinds += ["levels", "zeros", "constant", "sparse"]
    kind = draw(st.sampled_from(kinds))
    if kind == "levels":
        levels = draw(st.integers(min_value=2, max_value=4))
        out = (_bytes(draw, math.prod(size), 1) % levels).reshape(size).to(dtype)
    elif kind == "zeros":
        out = torch.zeros(size, dtype=dtype)
    elif kind == "constant":
        out = torch.full(size, draw(st.sampled_from([1.0, -2.5, 1e-30])), dtype=dtype)
    else:
        out = _values(draw, size, dtype)
        if kind == "sparse":
            out = _sprinkle(draw, out, 0.7, [0.0])
    if draw(nonfinite):
        rate = draw(st.sampled_from([0.1, 0.5, 1.0]))
        out = _sprinkle(draw, out, rate, _NONFINITE)
    return out


def masks(
    spec: LayerSpec | SearchStrategy[LayerSpec],
    *,
    budget: int | SearchStrategy[int] | None = None,
) -> SearchStrategy[torch.Tensor]:
    """Boolean masks shaped like ``spec`` with exactly ``budget`` active positions, anywhere
    (up to 256 elements they shrink towards the first positions).

    Args:
        budget: the active count (``None``: any count from 0 to ``spec.numel``).
    """
    if isinstance(budget, bool) or not (budget is None or isinstance(budget, int | SearchStrategy)):
        raise ValueError(f"masks(budget={budget!r}) must be an int, a strategy or None.")

    return _masks(_strategy(spec), None if budget is None else _strategy(budget))


@st.composite
def _masks(draw: Any, spec: Any, budget: Any) -> torch.Tensor:
    layer = draw(spec)
    if budget is None:
        count = draw(st.integers(min_value=0, max_value=layer.numel))
    else:
        count = draw(budget)
    if not 0 <= count <= layer.numel:
        raise ValueError(
            f"masks: budget {count} is outside [0, {layer.numel}] for layer {layer.fqn!r} "
            f"of shape {layer.shape}."
        )
    # The active positions are the ``count`` lowest drawn priorities (ties to the first), so a
    # shrunk mask is active at its first positions.
    raw = _bytes(draw, layer.numel, 2)
    order = torch.argsort(raw[:, 0] * 256 + raw[:, 1], stable=True)
    out = torch.zeros(layer.numel, dtype=torch.bool)
    out[order[:count]] = True
    return out.reshape(layer.shape)


def fractions() -> SearchStrategy[float]:
    """Drop fractions in [0, 1], the ends drawn often."""
    return st.one_of(st.sampled_from([0.0, 0.3, 1.0]), st.floats(0.0, 1.0))


def layer_lists(
    *,
    min_size: int = 1,
    max_size: int = 5,
    max_side: int | SearchStrategy[int] = 16,
    layer_types: Sequence[str] | str | SearchStrategy[str] = tuple(SUPPORTED_LAYER_TYPES),
) -> SearchStrategy[list[LayerSpec]]:
    """Lists of layer specs with distinct names ``layer0``, ``layer1``, ... (a model's layers)."""
    if not 1 <= min_size <= max_size:
        raise ValueError(
            f"layer_lists(min_size={min_size}, max_size={max_size}) needs 1 <= min <= max."
        )

    return _layer_list(min_size, max_size, max_side, layer_types)


_INACTIVE = ("zero", "random", "nonfinite")


def weights(
    shape: Sequence[int] | SearchStrategy[Sequence[int]],
    *,
    mask: torch.Tensor | SearchStrategy[torch.Tensor] | None = None,
    live_zeros: bool | SearchStrategy[bool] = True,
    inactive: str | SearchStrategy[str] = "zero",
    dtype: torch.dtype = torch.float32,
) -> SearchStrategy[torch.Tensor]:
    """Weights of ``shape`` in ``(-4, 4)``, shrinking as :func:`scores` do; with ``mask``, live
    (masked) and inactive positions differ.

    Args:
        mask: the active positions (``None``: every position is live).
        live_zeros: make some live weights exactly 0 (a live weight may be 0: never infer the
            mask from ``weight != 0``).
        inactive: what inactive positions hold: ``"zero"`` (as the engine keeps them),
            ``"random"`` or ``"nonfinite"`` (Inf and NaN, which a packed format must ignore).
    """
    if not dtype.is_floating_point:
        raise ValueError(f"weights(dtype={dtype}) must be a floating dtype.")
    if isinstance(inactive, str) and inactive not in _INACTIVE:
        raise ValueError(f"weights(inactive={inactive!r}) must be one of {_INACTIVE}.")

    return _weights(
        _strategy(shape),
        None if mask is None else _strategy(mask),
        _strategy(live_zeros),
        _strategy(inactive),
        dtype,
    )


_DEGENERATE = ("zero_gradient", "zero_weight", "empty_mask", "full_mask", "tied")


def _only_declared(capabilities: Capabilities, inputs: dict[str, Any]) -> dict[str, Any]:
    declared = {
        "grad": capabilities.needs_grad,
        "optimizer_state": capabilities.needs_optimizer_state,
        "grad_momentum": capabilities.grad_momentum is not None,
        "ever_active": capabilities.needs_ever_active,
    }
    return {name: value for name, value in inputs.items() if declared[name]}


def score_contexts(
    spec: LayerSpec | SearchStrategy[LayerSpec] | None = None,
    *,
    capabilities: Capabilities | None = None,
    finite: bool | SearchStrategy[bool] = True,
    degenerate: bool | SearchStrategy[bool] = False,
) -> SearchStrategy[ScoreContext]:
    """Contexts a criterion scores: weight (zero where inactive, some live zeros), mask, inputs.

    Args:
        spec: the layer (default: any small Linear or Conv layer).
        capabilities: hold only the optional inputs these declare, as the engine does (reading
            another raises :class:`~sparsity_core.errors.CapabilityError`); ``None``: hold all.
        finite: every input finite; otherwise the gradient may hold NaN and Inf.
        degenerate: one degenerate case: all-zero gradient (and momentum and optimizer state),
            all-zero weight, empty mask, full mask, or every value tied.
    """
    spec = layer_specs() if spec is None else spec

    return _score_context(_strategy(spec), capabilities, _strategy(finite), _strategy(degenerate))


@st.composite
def _layer_list(
    draw: Any, min_size: int, max_size: int, max_side: Any, layer_types: Any
) -> list[LayerSpec]:
    count = draw(st.integers(min_value=min_size, max_value=max_size), label="layers")
    return [
        draw(layer_specs(fqn=f"layer{i}", max_side=max_side, layer_types=layer_types))
        for i in range(count)
    ]


@st.composite
def _weights(
    draw: Any, shape: Any, mask: Any, live_zeros: Any, inactive: Any, dtype: torch.dtype
) -> torch.Tensor:
    size = tuple(int(s) for s in draw(_strategy(shape)))
    out = _values(draw, size, torch.float32)
    live = torch.ones(size, dtype=torch.bool) if mask is None else draw(_strategy(mask))
    if tuple(live.shape) != size:
        raise ValueError(f"weights: mask shape {tuple(live.shape)} is not {size}.")
    if draw(_strategy(live_zeros)):
        rate = draw(st.sampled_from([0.1, 0.2, 0.3, 1.0]), label="live zero rate")
        out = _sprinkle(draw, out, rate, [0.0], where=live)
    kind = draw(_strategy(inactive))
    if kind == "zero":
        out = out.masked_fill(~live, 0.0)
    elif kind == "nonfinite":
        out = _sprinkle(draw, out, 1.0, [float("inf"), float("-inf"), float("nan")], where=~live)
    return out.to(dtype)


@st.composite
def _score_context(
    draw: Any, spec: Any, capabilities: Any, finite: Any, degenerate: Any
) -> ScoreContext:
    layer = draw(_strategy(spec), label="spec")
    mask = draw(masks(layer), label="mask")
    case = draw(st.sampled_from(_DEGENERATE), label="case") if draw(_strategy(degenerate)) else None
    if case == "empty_mask":
        mask = torch.zeros_like(mask)
    elif case == "full_mask":
        mask = torch.ones_like(mask)
    weight = draw(weights(layer.shape, mask=mask), label="weight")
    grad = draw(scores(layer.shape, nonfinite=not draw(_strategy(finite))), label="grad")
    if case in ("zero_gradient", "tied"):
        level = 0.0 if case == "zero_gradient" else 0.5
        grad = torch.full_like(grad, level)
    if case in ("zero_weight", "tied"):
        weight = torch.where(mask, 0.0 if case == "zero_weight" else 0.5, 0.0)
    momentum = grad * 0.5
    state = {"exp_avg": grad * 0.1, "exp_avg_sq": grad * grad}
    ever = mask | draw(masks(layer), label="ever_active")
    inputs = {
        "grad": grad,
        "optimizer_state": state,
        "grad_momentum": momentum,
        "ever_active": ever,
    }
    if capabilities is not None:
        inputs = _only_declared(capabilities, inputs)
    step = draw(st.integers(min_value=1, max_value=1000), label="step")
    generator = make_generator(draw(seeds(), label="seed"), layer.fqn, step, "grow")
    return ScoreContext(layer, step, weight, mask, generator, **inputs)
