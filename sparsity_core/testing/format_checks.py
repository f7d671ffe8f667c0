"""Checks for storage formats, against the oracle ``weight.masked_fill(~mask, 0)``.

Every check takes the format and ``max_examples``. Weights are drawn with masks satisfying a
registered structure tuple (each weight-level structure alone and under each neuron-level one),
restricted to those the format ``supports()`` unless a check says otherwise; a format carrying
N:M parameters (integer ``n`` and ``m``) is also given the registered ``nm`` structure with them.
Live weights include exact zeros and inactive positions hold zeros, random values or Inf/NaN.
Examples are drawn on the CPU and moved to ``device`` (e.g. ``"cuda"`` to check a format's GPU
path; the default is the CPU).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st

from ..errors import SparsityError
from ..layers import LayerSpec
from ..registry import ComponentType
from ..structures import compose_structures, describe, fixed_density
from ._common import FAST, Draw, _call, _device, _fail, run_examples
from ._component_strategies import _registered_tuples
from ._registered import registry
from ._structure_strategies import structured_masks, structured_specs
from ._tensor_strategies import _generator, seeds, weights

__all__ = [
    "check_format_keeps_live_zeros",
    "check_format_linear_matches_dense",
    "check_format_rejects_unsupported",
    "check_format_round_trip",
]

# Tolerance per unit of sum(|x| * |w|) + |b|: float32 sums in another order than F.linear does;
# bfloat16 rounds the output (F.linear's and the format's) to 8 bits.
_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
_LEADS = st.one_of(
    st.just(()),
    st.sampled_from([0, 1, 2, 7, 33]).map(lambda b: (b,)),
    st.tuples(st.integers(1, 3), st.integers(0, 4)),
)


def _candidates(fmt: Any) -> list[tuple[Any, ...]]:
    tuples = _registered_tuples()
    n, m = getattr(fmt, "n", None), getattr(fmt, "m", None)
    names = registry().names(ComponentType.STRUCTURE)
    if isinstance(n, int) and isinstance(m, int) and "nm" in names:
        own = registry().create(ComponentType.STRUCTURE, "nm", n=n, m=m)
        tuples += [(own,)] + [(t[0], own) for t in tuples if len(t) == 2]
    unique: list[tuple[Any, ...]] = []
    for t in tuples:
        if t not in unique:
            unique.append(t)
    return unique


def _label(structures: tuple[Any, ...]) -> str:
    return " + ".join(describe(s) if hasattr(s, "fill") else type(s).__name__ for s in structures)


def _options(check: str, fmt: Any, supported: bool | None) -> list[tuple[Any, ...]]:
    """Candidate structure tuples the format supports (``supported``), refuses, or all."""
    options = _candidates(fmt)
    if supported is None:
        return options
    chosen = [
        t
        for t in options
        if bool(_call(check, fmt, _label(t), "supports()", lambda t=t: fmt.supports(t)))
        is supported
    ]
    if supported and not chosen:
        _fail(
            check,
            fmt,
            "every registered structure",
            f"supports() accepts none of {[_label(t) for t in options]}, so nothing can be "
            f"stored or checked",
        )
    return chosen


def _draw_layer(
    draw: Draw, options: list[tuple[Any, ...]], device: torch.device
) -> tuple[tuple[Any, ...], torch.Tensor, torch.Tensor]:
    """``(structures, weight, mask)`` on ``device``: a mask satisfying a structure tuple."""
    structures = draw(st.sampled_from(options), label="structures")
    composed = compose_structures(structures)
    spec = draw(structured_specs(composed, max_side=10, max_groups=4), label="spec")
    density = fixed_density(structures[-1], spec)
    budget = None if density is None else composed.budget(spec, density)
    # Ablated (all-off) neurons are where formats go wrong (their output is the bias): often.
    ablate = st.sampled_from([True, True, False])
    mask = draw(structured_masks(composed, spec, budget=budget, ablate=ablate), label="mask")
    inactive = draw(st.sampled_from(["zero", "random", "nonfinite"]), label="inactive")
    weight = draw(weights(spec.shape, mask=mask, inactive=inactive), label="weight")
    return structures, weight.to(device), mask.to(device)


def _where(structures: tuple[Any, ...], weight: torch.Tensor) -> str:
    on = "" if weight.device.type == "cpu" else f" {weight.device}"
    return (
        f"a {tuple(weight.shape)} {weight.dtype}{on} weight with structure ({_label(structures)})"
    )


def _unlike(out: Any, like: torch.Tensor) -> tuple[Any, Any, Any] | None:
    """None when ``out`` is a tensor of ``like``'s shape, dtype and device; else ``out``'s
    (shape, dtype, device), None where it has no such attribute."""
    got = tuple(getattr(out, a, None) for a in ("shape", "dtype", "device"))
    if isinstance(out, torch.Tensor) and got == (like.shape, like.dtype, like.device):
        return None
    return got


def _round_trip(
    check: str, fmt: Any, structures: tuple[Any, ...], weight: torch.Tensor, mask: torch.Tensor
) -> Any:
    where = _where(structures, weight)
    packed = _call(check, fmt, where, "pack()", lambda: fmt.pack(weight, mask))
    out = _call(check, fmt, where, "unpack()", lambda: fmt.unpack(packed))
    expected = weight.masked_fill(~mask, 0)
    if (got := _unlike(out, weight)) is not None:
        got = (type(out).__name__, *got)
        _fail(
            check,
            fmt,
            where,
            f"unpack() returned {got}, not a {weight.dtype} tensor of the weight's shape on "
            f"{weight.device}",
        )
    if not torch.equal(out, expected):
        wrong = int((out != expected).sum())
        _fail(
            check,
            fmt,
            where,
            f"unpack(pack(w, m)) differs from w.masked_fill(~m, 0) at {wrong} positions",
        )
    return packed


def check_format_round_trip(
    fmt: Any, *, max_examples: int | None = None, device: Any = "cpu"
) -> None:
    """``unpack(pack(w, m))`` is exactly ``w.masked_fill(~m, 0)`` (shape and dtype too), in
    float32 and bfloat16, whatever the inactive positions hold."""
    check = "check_format_round_trip"
    options = _options(check, fmt, True)
    on = _device(check, fmt, device)

    def example(draw: Draw) -> None:
        structures, weight, mask = _draw_layer(draw, options, on)
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
        _round_trip(check, fmt, structures, weight.to(dtype), mask)

    run_examples(check, example, cost=FAST, max_examples=max_examples)


def _assert_close(
    check: str,
    fmt: Any,
    where: str,
    out: Any,
    x: torch.Tensor,
    dense: torch.Tensor,
    bias: torch.Tensor | None,
) -> None:
    """``out`` is ``F.linear(x, dense, bias)`` within the dtype's tolerance, shape and dtype too."""
    expected = F.linear(x, dense, bias)
    if (got := _unlike(out, expected)) is not None:
        wanted = (expected.shape, expected.dtype, expected.device)
        _fail(check, fmt, where, f"linear() returned {got}, not {wanted}")
    scale = F.linear(x.double().abs(), dense.double().abs(), None)
    if bias is not None:
        scale = scale + bias.double().abs()
    error = (out.double() - expected.double()).abs()
    if not bool((error <= _RTOL[x.dtype] * scale + 1e-6).all()):
        _fail(
            check,
            fmt,
            where,
            f"linear() is off F.linear(x, w * m, b) by up to {error.max().item():.3g}",
        )


def check_format_linear_matches_dense(
    fmt: Any, *, max_examples: int | None = None, device: Any = "cpu"
) -> None:
    """``linear(pack(w, m), x, b)`` matches ``F.linear(x, w * m, b)`` within dtype tolerance for
    1-D, empty and batched inputs, with and without bias, in float32 and bfloat16."""
    check = "check_format_linear_matches_dense"
    options = _options(check, fmt, True)
    on = _device(check, fmt, device)

    def example(draw: Draw) -> None:
        structures, weight, mask = _draw_layer(draw, options, on)
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
        weight = weight.masked_fill(~mask, 0).to(dtype)  # F.linear needs finite weights
        dense = weight.reshape(weight.shape[0], -1)
        gen = _generator(draw(seeds(), label="input seed"))
        lead = draw(_LEADS, label="batch")
        x = torch.randn((*lead, dense.shape[1]), generator=gen).to(device=on, dtype=dtype)
        where = f"{_where(structures, weight)} and input {tuple(x.shape)}"
        packed = _call(check, fmt, where, "pack()", lambda: fmt.pack(weight, mask))
        for bias in (torch.randn(dense.shape[0], generator=gen).to(device=on, dtype=dtype), None):
            out = _call(
                check, fmt, where, "linear()", lambda bias=bias: fmt.linear(packed, x, bias)
            )
            _assert_close(check, fmt, f"{where}, bias {bias is not None}", out, x, dense, bias)

    run_examples(check, example, cost=FAST, max_examples=max_examples)


def check_format_keeps_live_zeros(
    fmt: Any, *, max_examples: int | None = None, device: Any = "cpu"
) -> None:
    """A live weight equal to 0 is stored like any other live weight (the mask is never
    inferred from ``weight != 0``).

    The packed size must not depend on the live values (replacing live zeros by 1 keeps
    ``nbytes``), and a format exposing ``mask(packed)`` must return the mask it was given.
    """
    check = "check_format_keeps_live_zeros"
    options = _options(check, fmt, True)
    on = _device(check, fmt, device)

    def example(draw: Draw) -> None:
        structures, weight, mask = _draw_layer(draw, options, on)
        live = torch.nonzero(mask.reshape(-1)).flatten().tolist()
        assume(live)
        weight = weight.clone()
        weight.reshape(-1)[draw(st.sampled_from(live), label="a live zero")] = 0.0
        where = f"{_where(structures, weight)} with {int((weight[mask] == 0).sum())} live zeros"
        packed = _round_trip(check, fmt, structures, weight, mask)
        nonzero = torch.where(mask & (weight == 0), torch.ones_like(weight), weight)
        sizes = [
            _call(check, fmt, where, "nbytes()", lambda p=p: fmt.nbytes(p))
            for p in (packed, fmt.pack(nonzero, mask))
        ]
        if sizes[0] != sizes[1]:
            _fail(
                check,
                fmt,
                where,
                f"nbytes() is {sizes[0]} with the live zeros but {sizes[1]} once they are 1: live "
                f"zeros were dropped",
            )
        held = getattr(fmt, "mask", None)
        if callable(held):
            got = _call(check, fmt, where, "mask()", lambda: held(packed))
            if not isinstance(got, torch.Tensor) or not torch.equal(got, mask):
                _fail(check, fmt, where, "mask(pack(w, m)) is not m: the live zeros were lost")

    run_examples(check, example, cost=FAST, max_examples=max_examples)


def check_format_rejects_unsupported(
    fmt: Any, *, max_examples: int | None = None, device: Any = "cpu"
) -> None:
    """A structure the format does not support is rejected, never stored wrongly.

    For structures ``supports()`` refuses: ``check_supports`` (where defined) raises a
    :class:`~sparsity_core.errors.SparsityError`, and ``pack`` of a mask with that structure
    either raises one or round-trips exactly. For supported ones ``check_supports`` and
    ``pack`` succeed.
    """
    check = "check_format_rejects_unsupported"
    groups = [g for g in (_options(check, fmt, False), _options(check, fmt, True)) if g]
    guard = getattr(fmt, "check_supports", None)
    on = _device(check, fmt, device)

    def example(draw: Draw) -> None:
        # Refused and accepted structures are drawn equally often (the refused ones first).
        options = draw(st.sampled_from(groups), label="refused or accepted")
        structures, weight, mask = _draw_layer(draw, options, on)
        where = _where(structures, weight)
        spec = LayerSpec("layer", tuple(weight.shape))
        if fmt.supports(structures):
            if callable(guard):
                _call(
                    check,
                    fmt,
                    where,
                    "check_supports() of a supported structure",
                    lambda: guard(structures, spec),
                )
            _round_trip(check, fmt, structures, weight, mask)
            return
        if callable(guard):
            try:
                guard(structures, spec)
            except SparsityError:
                pass
            except Exception as exc:
                _fail(
                    check,
                    fmt,
                    where,
                    f"check_supports() raised {type(exc).__name__}, not a SparsityError: {exc}",
                )
            else:
                _fail(check, fmt, where, "check_supports() accepts a structure supports() refuses")
        try:
            packed = fmt.pack(weight, mask)
        except SparsityError:
            return
        except Exception as exc:
            _fail(
                check,
                fmt,
                where,
                f"pack() of an unsupported structure raised {type(exc).__name__}, not a "
                f"SparsityError: {exc}",
            )
        out = _call(check, fmt, where, "unpack()", lambda: fmt.unpack(packed))
        held = getattr(fmt, "mask", None)
        same_mask = not callable(held) or torch.equal(held(packed), mask)
        if not (
            isinstance(out, torch.Tensor)
            and torch.equal(out, weight.masked_fill(~mask, 0))
            and same_mask
        ):
            _fail(
                check,
                fmt,
                where,
                "pack() accepted a mask of a structure supports() refuses and stored it wrongly "
                "(unpack differs from w * m, or mask() from m); raise a LayerError instead",
            )

    run_examples(check, example, cost=FAST, max_examples=max_examples)
