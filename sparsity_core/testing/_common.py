"""Helpers shared by the kit's checks: failure messages, exact comparison, the example runner."""

from __future__ import annotations

import contextvars
import math
import types
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky

from ..layers import LayerSpec

__all__ = ["FAST", "RUN", "Draw", "examples_for", "run_examples"]

Draw = Callable[..., Any]
FAST = "fast"  # one example costs milliseconds: the profile's max_examples
RUN = "run"  # one example trains a small model: an eighth of them, at least 2
_RUN_SHARE = 8

# Extra hypothesis settings for the kit's checks (see profiles.check_settings).
_OVERRIDES: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "sparsity_core_testing_overrides", default=types.MappingProxyType({})
)
# The number of examples the last check ran, read by check_component.
_EXAMPLES: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "sparsity_core_testing_examples", default=None
)


def examples_for(cost: str, max_examples: int | None = None) -> int:
    """How many hypothesis examples a check of ``cost`` runs under the loaded profile."""
    if max_examples is not None:
        if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
            raise ValueError(f"max_examples={max_examples!r} must be a positive integer.")
        return max_examples
    profile = settings.default.max_examples
    return profile if cost == FAST else max(2, math.ceil(profile / _RUN_SHARE))


def run_examples(
    name: str, body: Callable[[Draw], None], *, cost: str, max_examples: int | None
) -> int:
    """Run ``body(draw)`` over hypothesis examples; a failure re-raises with the example shown.

    The loaded hypothesis profile supplies every setting except the number of examples (see
    :func:`examples_for`), ``deadline`` (none: the first torch call is slow), the database
    (none: a check's result never depends on examples saved by earlier runs) and, for checks
    that train, the phases (no shrinking). ``profiles.check_settings`` overrides any of them.
    """
    overrides = dict(_OVERRIDES.get())
    given_count = overrides.pop("max_examples", None) if max_examples is None else None
    overrides.pop("max_examples", None)
    count = examples_for(cost, max_examples if given_count is None else given_count)
    seen = [0]

    def check(data: Any) -> None:
        seen[0] += 1
        body(data.draw)

    check.__name__ = check.__qualname__ = name
    options: dict[str, Any] = {
        "max_examples": count,
        "deadline": None,
        "database": None,
        "suppress_health_check": [
            *settings.default.suppress_health_check,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
        **overrides,
    }
    if cost == RUN and "phases" not in overrides:
        # Shrinking re-trains a model hundreds of times; the failing run is shown as drawn.
        options["phases"] = [Phase.explicit, Phase.reuse, Phase.generate]
    runner = settings(settings.default, **options)(given(st.data())(check))
    try:
        runner()
    except Flaky as exc:
        # A failure that did not repeat on the same example: the component is not deterministic.
        first = (getattr(exc, "exceptions", None) or [exc])[0]  # FlakyFailure groups them
        raise AssertionError(
            f"{name}: the component failed on an example, then passed when hypothesis re-ran "
            f"that same example (it is not deterministic, e.g. it uses a global RNG or state): "
            f"{first}"
        ) from exc
    finally:
        sink = _EXAMPLES.get()
        if sink is not None:
            sink.append(seen[0])
    return seen[0]


def _fail(check: str, component: Any, where: str, what: str) -> NoReturn:
    raise AssertionError(f"{check}: {_describe(component)} on {where}: {what}")


def _describe(component: Any) -> str:
    if isinstance(component, str):
        return component
    describe = getattr(component, "describe", None)
    if callable(describe):
        return f"{type(component).__name__} ({describe()})"
    return type(component).__name__


def _device(check: str, component: Any, device: Any) -> torch.device:
    """``device`` as a torch.device, or a failure saying why it cannot be used."""
    try:
        chosen = torch.device(device)
        torch.zeros(1, device=chosen).cpu()
    except (AssertionError, NotImplementedError, RuntimeError, TypeError, ValueError) as exc:
        # (torch built without CUDA raises AssertionError for "cuda"; "meta" holds no values)
        _fail(
            check,
            component,
            f"device {device!r}",
            f"cannot allocate tensors there and read them back ({exc}); pick another",
        )
    return chosen


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality that also treats NaN as equal to NaN (at the same position)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)


def _count(where: torch.Tensor) -> int:
    return int(where.sum())


def _check_mask_value(
    check: str, component: Any, spec: LayerSpec, mask: Any, what: str
) -> torch.Tensor:
    where = f"layer {spec.fqn!r}"
    if not isinstance(mask, torch.Tensor):
        _fail(check, component, where, f"{what} returned {type(mask).__name__}, not a tensor")
    if mask.dtype != torch.bool:
        _fail(check, component, where, f"{what} returned dtype {mask.dtype}, not torch.bool")
    if tuple(mask.shape) != spec.shape:
        _fail(
            check,
            component,
            where,
            f"{what} returned shape {tuple(mask.shape)}, not the layer's {spec.shape}",
        )
    return mask


def _unchanged(
    check: str,
    component: Any,
    where: str,
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
) -> None:
    for name, old in before.items():
        if not _same(old, after[name]):
            _fail(check, component, where, f"modified its input {name} in place")


def _call(check: str, component: Any, where: str, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, with any exception turned into a check failure naming the call."""
    try:
        return fn()
    except AssertionError:
        raise
    except Exception as exc:
        _fail(check, component, where, f"{what} raised {type(exc).__name__}: {exc}")
