"""Checks for prune and growth criteria: one invariant each, over drawn score contexts.

Every check takes the criterion and keyword-only options: ``contexts`` (a
:class:`~sparsity_core.ScoreContext` or a strategy of them; default: the kit's
:func:`~sparsity_core.testing.strategies.score_contexts`), ``max_examples`` and ``device``
(default ``"cpu"``: contexts are drawn on the CPU and moved there, their generator included, so
``device="cuda"`` checks a criterion's GPU path; a device that cannot be used fails the check
naming it). A check returns nothing and raises :class:`AssertionError` naming the check, the
criterion, the layer and what broke; the falsifying context is attached by hypothesis.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from ..context import ScoreContext
from ..errors import CapabilityError
from ..protocols import capabilities_of
from ._common import FAST, Draw, _call, _device, _fail, _same, _unchanged, run_examples
from ._tensor_strategies import _strategy, score_contexts

__all__ = [
    "check_criterion_capabilities_declared",
    "check_criterion_degenerate_inputs",
    "check_criterion_deterministic",
    "check_criterion_finite",
    "check_criterion_inputs_unchanged",
    "check_criterion_no_global_rng",
    "check_criterion_shape_dtype_device",
]

Contexts = ScoreContext | SearchStrategy[ScoreContext] | None


def _where(ctx: ScoreContext) -> str:
    return f"layer {ctx.spec.fqn!r} {tuple(ctx.spec.shape)} at step {ctx.step}"


def _scores(check: str, criterion: Any, ctx: ScoreContext) -> torch.Tensor:
    """``criterion.scores(ctx)``, which must return a tensor (anything else fails ``check``)."""
    out = _call(check, criterion, _where(ctx), "scores(ctx)", lambda: criterion.scores(ctx))
    if not isinstance(out, torch.Tensor):
        _fail(check, criterion, _where(ctx), f"scores() returned {type(out).__name__}")
    return out


def _moved(ctx: ScoreContext, device: torch.device) -> ScoreContext:
    """``ctx`` with every tensor on ``device`` and a generator there seeded as its own."""
    if ctx.weight.device == device and ctx.generator.device == device:
        return ctx

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, Mapping):
            return {key: move(item) for key, item in value.items()}
        return value

    fields = {f.alias: move(getattr(ctx, f.name)) for f in attrs.fields(type(ctx))}
    fields["generator"] = torch.Generator(device=device)
    fields["generator"].manual_seed(ctx.generator.initial_seed())
    return type(ctx)(**fields)


def _each_context(
    check: str,
    criterion: Any,
    contexts: Contexts,
    default: SearchStrategy[ScoreContext],
    body: Callable[[ScoreContext], None],
    max_examples: int | None,
    device: Any,
) -> None:
    chosen = default if contexts is None else _strategy(contexts)
    on = _device(check, criterion, device)

    def example(draw: Draw) -> None:
        body(_moved(draw(chosen, label="ctx"), on))

    run_examples(check, example, cost=FAST, max_examples=max_examples)


def check_criterion_shape_dtype_device(
    criterion: Any,
    *,
    contexts: Contexts = None,
    max_examples: int | None = None,
    device: Any = "cpu",
) -> None:
    """Scores are a tensor with the weight's shape, dtype and device."""
    check = "check_criterion_shape_dtype_device"

    def body(ctx: ScoreContext) -> None:
        out, weight = _scores(check, criterion, ctx), ctx.weight
        for what, got, want in (
            ("shape", tuple(out.shape), tuple(weight.shape)),
            ("dtype", out.dtype, weight.dtype),
            ("device", out.device, weight.device),
        ):
            if got != want:
                _fail(check, criterion, _where(ctx), f"scores() have {what} {got}, not {want}")

    _each_context(check, criterion, contexts, score_contexts(), body, max_examples, device)


def check_criterion_finite(
    criterion: Any,
    *,
    contexts: Contexts = None,
    max_examples: int | None = None,
    device: Any = "cpu",
) -> None:
    """Scores are finite wherever every input is finite."""
    check = "check_criterion_finite"

    def body(ctx: ScoreContext) -> None:
        _assert_finite(check, criterion, ctx, "although every input is finite")

    _each_context(
        check, criterion, contexts, score_contexts(finite=True), body, max_examples, device
    )


def _assert_finite(check: str, criterion: Any, ctx: ScoreContext, why: str) -> None:
    out = _scores(check, criterion, ctx)
    if tuple(out.shape) != tuple(ctx.weight.shape):
        _fail(check, criterion, _where(ctx), f"scores() have shape {tuple(out.shape)}")
    bad = ~torch.isfinite(out)
    if bad.any():
        _fail(
            check,
            criterion,
            _where(ctx),
            f"scores() hold {int(bad.sum())} non-finite values (e.g. {out[bad][0].item()}) {why}",
        )


def _context_tensors(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Every tensor a context holds, by the name a criterion reads it under."""
    out: dict[str, torch.Tensor] = {}
    for field in attrs.fields(type(ctx)):
        value = getattr(ctx, field.name)
        name = "ctx." + field.name.lstrip("_")
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(item, torch.Tensor):
                    out[f"{name}[{key!r}]"] = item
    return out


def check_criterion_inputs_unchanged(
    criterion: Any,
    *,
    contexts: Contexts = None,
    max_examples: int | None = None,
    device: Any = "cpu",
) -> None:
    """Scoring modifies no tensor of the context (weight, mask, gradient, state, ...)."""
    check = "check_criterion_inputs_unchanged"

    def body(ctx: ScoreContext) -> None:
        tensors = _context_tensors(ctx)
        before = {name: t.clone() for name, t in tensors.items()}
        _scores(check, criterion, ctx)
        _unchanged(check, criterion, _where(ctx), before, tensors)

    default = score_contexts(finite=st.booleans(), degenerate=st.booleans())
    _each_context(check, criterion, contexts, default, body, max_examples, device)


def check_criterion_deterministic(
    criterion: Any,
    *,
    contexts: Contexts = None,
    max_examples: int | None = None,
    device: Any = "cpu",
) -> None:
    """The same context and generator state give the same scores (NaN where NaN)."""
    check = "check_criterion_deterministic"

    def body(ctx: ScoreContext) -> None:
        state = ctx.generator.get_state()
        first = _scores(check, criterion, ctx)
        ctx.generator.set_state(state)
        second = _scores(check, criterion, ctx)
        if not _same(first, second):
            _fail(
                check,
                criterion,
                _where(ctx),
                "scores() differ between two calls with the same context and generator state: "
                "draw randomness only from ctx.generator",
            )

    default = score_contexts(finite=st.booleans())
    _each_context(check, criterion, contexts, default, body, max_examples, device)


def _global_rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "random": random.getstate(),
        "numpy": np.random.get_state()[1].copy(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def _rng_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return bool(np.array_equal(a, b))
    if isinstance(a, list):
        return len(a) == len(b) and all(_rng_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def moved_rngs(before: dict[str, Any]) -> list[str]:
    """The global RNGs (of :func:`_global_rng_states` ``before``) whose state has moved since."""
    after = _global_rng_states()
    return [name for name in before if not _rng_equal(before[name], after.get(name))]


def check_criterion_no_global_rng(
    criterion: Any,
    *,
    contexts: Contexts = None,
    max_examples: int | None = None,
    device: Any = "cpu",
) -> None:
    """Scoring leaves the global RNGs (torch, CUDA, ``random``, numpy) untouched."""
    check = "check_criterion_no_global_rng"

    def body(ctx: ScoreContext) -> None:
        before = _global_rng_states()
        _scores(check, criterion, ctx)
        moved = moved_rngs(before)
        if moved:
            _fail(
                check,
                criterion,
                _where(ctx),
                f"scores() drew from the global {' and '.join(moved)} RNG; draw only from "
                f"ctx.generator (e.g. torch.rand(shape, generator=ctx.generator))",
            )

    _each_context(check, criterion, contexts, score_contexts(), body, max_examples, device)


def check_criterion_degenerate_inputs(
    criterion: Any,
    *,
    contexts: Contexts = None,
    max_examples: int | None = None,
    device: Any = "cpu",
) -> None:
    """All-zero gradients, all-zero weights, empty or full masks and ties give valid scores.

    Valid means a finite tensor shaped like the weight: no 0/0, no error on an empty mask.
    """
    check = "check_criterion_degenerate_inputs"

    def body(ctx: ScoreContext) -> None:
        _assert_finite(
            check,
            criterion,
            ctx,
            "on a degenerate input (all-zero, empty, full or tied); guard divisions and "
            "normalisations",
        )

    default = score_contexts(degenerate=True)
    _each_context(check, criterion, contexts, default, body, max_examples, device)


def check_criterion_capabilities_declared(
    criterion: Any, *, max_examples: int | None = None, device: Any = "cpu"
) -> None:
    """The criterion reads only the inputs its ``capabilities`` declare, as the engine provides.

    The context holds only the declared optional inputs (gradient, optimizer state, gradient
    momentum, ever-active set), so an undeclared read raises
    :class:`~sparsity_core.errors.CapabilityError`; drawing from ``ctx.generator`` needs
    ``stochastic=True``.
    """
    check = "check_criterion_capabilities_declared"
    caps = capabilities_of(criterion)

    def body(ctx: ScoreContext) -> None:
        state = ctx.generator.get_state()
        try:
            criterion.scores(ctx)
        except CapabilityError as exc:
            _fail(check, criterion, _where(ctx), f"read an input it did not declare: {exc}")
        except Exception as exc:
            _fail(
                check,
                criterion,
                _where(ctx),
                f"scores(ctx) raised {type(exc).__name__}: {exc} (its context held only the "
                f"declared inputs {caps})",
            )
        if not caps.stochastic and not torch.equal(state, ctx.generator.get_state()):
            _fail(
                check,
                criterion,
                _where(ctx),
                "scores() drew from ctx.generator but its capabilities do not declare "
                "stochastic=True",
            )

    _each_context(
        check, criterion, None, score_contexts(capabilities=caps), body, max_examples, device
    )
