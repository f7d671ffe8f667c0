"""Checks for whole methods (prune x grow x structures x distribution x schedule) and presets.

Every method check takes a :class:`~sparsity_core.DSTConfig` (or a preset function, called with
no argument) and trains small models drawn by
:func:`~sparsity_core.testing.strategies.runs` (an MLP, a Conv2d + Conv1d + Linear net, and an
MLP with an all-zero-gradient and an unused layer; SGD with momentum or Adam; 8 to 16 steps),
watching one invariant after every ``scheduler.step()``. The method keeps its components and
density; its timing is fitted to the short run (``delta_t`` of 2 to 4, ``t_start`` 0, ``t_end``
75% of the run) unless ``fit_timing=False``. Pass ``run`` (a
:class:`~sparsity_core.testing.models.RunSpec` or a strategy of them) to train your own model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from ..config import DSTConfig
from ..errors import SparsityError
from ..layers import LayerSpec
from ..registry import ComponentType
from ..structures import fixed_density
from ._common import FAST, RUN, Draw, _fail, run_examples
from ._component_strategies import runs
from ._registered import registry
from ._tensor_strategies import _strategy, densities
from ._training import Training
from .models import RunSpec
from .run_checks import (
    check_checkpoint_resume,
    check_same_seed_same_masks,
    check_zero_drop_is_identity,
)

__all__ = [
    "check_method_budget_conserved",
    "check_method_checkpoint_resume",
    "check_method_drop_count",
    "check_method_drop_keeps_highest",
    "check_method_dropped_subset_of_active",
    "check_method_grown_subset_of_inactive",
    "check_method_grown_weights_and_state_zero",
    "check_method_kept_weights_unchanged",
    "check_method_mask_identity",
    "check_method_no_updates_after_t_end",
    "check_method_same_seed_same_masks",
    "check_method_structure_holds",
    "check_method_zero_drop_is_identity",
    "check_preset_accepts_overrides",
]

Runs = RunSpec | SearchStrategy[RunSpec] | None


def as_config(method: Any) -> DSTConfig:
    """``method`` itself, or the config a preset function returns with no argument."""
    if isinstance(method, DSTConfig):
        return method
    config = method()
    if not isinstance(config, DSTConfig):
        raise TypeError(f"preset {method!r} returned {type(config).__name__}, not a DSTConfig.")
    return config


def _draw_method(draw: Draw, method: Any, run: Runs, fit_timing: bool) -> tuple[DSTConfig, RunSpec]:
    config = as_config(method)
    spec = draw(runs(config) if run is None else _strategy(run), label="run")
    if fit_timing:
        config = attrs.evolve(
            config, delta_t=draw(st.integers(2, 4), label="delta_t"), t_start=0, t_end=None
        )
    return config, spec


def _monitored(
    check: str,
    monitors: frozenset[str],
    method: Any,
    run: Runs,
    fit_timing: bool,
    max_examples: int | None,
    t_end: Callable[[Draw, RunSpec, DSTConfig], int | None] | None = None,
) -> None:
    def example(draw: Draw) -> None:
        config, spec = _draw_method(draw, method, run, fit_timing)
        if t_end is not None:
            config = attrs.evolve(config, t_end=t_end(draw, spec, config))
        training = Training.build(
            check,
            config,
            spec.model_factory,
            spec.optimizer_factory,
            spec.steps,
            data=spec.data,
            loss_fn=None,
            before_optimizer_step=None,
            monitors=monitors,
        )
        training.run_until(spec.steps)
        training.finish()

    run_examples(check, example, cost=RUN, max_examples=max_examples)


def _method_check(name: str, monitor: str, doc: str) -> Callable[..., None]:
    def check(
        method: Any, *, run: Runs = None, fit_timing: bool = True, max_examples: int | None = None
    ) -> None:
        _monitored(name, frozenset({monitor}), method, run, fit_timing, max_examples)

    return _named(check, name, doc)


def _named(check: Callable[..., None], name: str, doc: str) -> Callable[..., None]:
    """``check`` under its public name and docstring (what ids and docs show)."""
    check.__name__ = check.__qualname__ = name
    check.__doc__ = doc
    check.__module__ = __name__
    return check


check_method_budget_conserved = _method_check(
    "check_method_budget_conserved",
    "budget",
    """Every layer holds exactly its budget after every step, and the budget never changes
    (under neuron ablation: the structure's realized budget, never more than the budget).""",
)
check_method_dropped_subset_of_active = _method_check(
    "check_method_dropped_subset_of_active",
    "dropped",
    """Dropped weights were active: each update's record counts exactly the active weights
    that left the mask, at the step it happened.""",
)
check_method_drop_keeps_highest = _method_check(
    "check_method_drop_keeps_highest",
    "keep_highest",
    """Each update's drop keeps the highest prune scores its structure allows: the structure's
    ``keep()``, given the update's prune scores, never chooses the lower score of a pair it
    trades by score (see :func:`~sparsity_core.testing.check_structure_keep_highest`).""",
)
check_method_drop_count = _method_check(
    "check_method_drop_count",
    "drop_count",
    """Each update drops the fraction of the active weights its record states (or, when fewer,
    as many as can be regrown), missing it by less than one weight or the structure's declared
    ``drop_tolerance`` (see :func:`~sparsity_core.testing.check_structure_keep_drop_count`);
    weights of neurons that neuron ablation removes afterwards are not part of the drop.""",
)
check_method_grown_subset_of_inactive = _method_check(
    "check_method_grown_subset_of_inactive",
    "grown",
    """Grown weights were inactive after the drop and not dropped in the same update: each
    record counts exactly the weights that entered the mask.""",
)
check_method_structure_holds = _method_check(
    "check_method_structure_holds",
    "structure",
    """Every mask satisfies its layer's structure after every step (and, under N:M, the kit's
    own group count).""",
)
check_method_mask_identity = _method_check(
    "check_method_mask_identity",
    "mask_identity",
    """Masks are the same boolean tensors throughout (updated in place, so optimizers, DDP and
    checkpoints keep pointing at them), one per weight tensor, for a fixed set of layers.""",
)
check_method_grown_weights_and_state_zero = _method_check(
    "check_method_grown_weights_and_state_zero",
    "zeros",
    """Grown weights start at exactly 0 with every parameter-shaped optimizer state 0 there, and
    inactive (e.g. dropped) weights and their optimizer state are exactly 0 after every step.""",
)
check_method_kept_weights_unchanged = _method_check(
    "check_method_kept_weights_unchanged",
    "kept_weights",
    """An update leaves the values of the weights that stay active untouched.""",
)


def _early_t_end(draw: Draw, spec: RunSpec, config: DSTConfig) -> int:
    first = max(config.t_start, 0) + 1
    return draw(st.integers(min(first, spec.steps - 1), spec.steps - 1), label="t_end")


def check_method_no_updates_after_t_end(
    method: Any, *, run: Runs = None, fit_timing: bool = True, max_examples: int | None = None
) -> None:
    """The topology changes only on update steps and never at or after ``t_end``: masks and
    weights are untouched by ``scheduler.step()`` otherwise. ``t_end`` is drawn before the end
    of the run."""
    check = "check_method_no_updates_after_t_end"
    _monitored(
        check, frozenset({"timing"}), method, run, fit_timing, max_examples, t_end=_early_t_end
    )


def _run_check(name: str, body: Callable[..., None], doc: str) -> Callable[..., None]:
    def check(
        method: Any, *, run: Runs = None, fit_timing: bool = True, max_examples: int | None = None
    ) -> None:
        def example(draw: Draw) -> None:
            config, spec = _draw_method(draw, method, run, fit_timing)
            body(draw, config, spec)

        run_examples(name, example, cost=RUN, max_examples=max_examples)

    return _named(check, name, doc)


check_method_zero_drop_is_identity = _run_check(
    "check_method_zero_drop_is_identity",
    lambda draw, config, spec: check_zero_drop_is_identity(config, **spec.kwargs()),
    """With a drop fraction of 0 at every step, masks never change and nothing is recorded.""",
)
check_method_same_seed_same_masks = _run_check(
    "check_method_same_seed_same_masks",
    lambda draw, config, spec: check_same_seed_same_masks(config, **spec.kwargs()),
    """Two runs with the same config, seed, model and data have identical masks and records.""",
)
check_method_checkpoint_resume = _run_check(
    "check_method_checkpoint_resume",
    lambda draw, config, spec: check_checkpoint_resume(
        config,
        resume_at=draw(st.integers(1, spec.steps - 1), label="resume_at"),
        **spec.kwargs(),
    ),
    """Saving (``torch.save``, loaded with ``weights_only=True``) at any step and resuming into
    fresh objects ends bit-identical to the run without a break: masks, ever-active sets,
    weights and history.""",
)


_PROBE = LayerSpec("probe", (8, 32))


def _pins_density(config: DSTConfig) -> bool:
    return any(fixed_density(s, _PROBE) is not None for s in config.structures)


def check_preset_accepts_overrides(
    preset: Callable[..., Any], *, max_examples: int | None = None
) -> None:
    """A preset builds a DSTConfig with no argument and honours the overrides
    ``sparsity-core train`` passes: ``density`` (unless its structure pins it, as N:M does),
    ``delta_t``, ``distribution``, ``seed`` and ``t_end``."""
    check = "check_preset_accepts_overrides"
    name = getattr(preset, "__name__", repr(preset))
    uniform = registry().create(ComponentType.DISTRIBUTION, "uniform")

    def example(draw: Draw) -> None:
        overrides = {
            "density": draw(densities(min_value=0.05, max_value=0.95), label="density"),
            "delta_t": draw(st.integers(1, 500), label="delta_t"),
            "distribution": "uniform",
            "seed": draw(st.integers(0, 2**16), label="seed"),
            "t_end": draw(st.integers(1000, 10_000), label="t_end"),
        }
        where = f"overrides {overrides}"
        try:
            config = preset(**overrides)
        except (TypeError, SparsityError) as exc:
            _fail(check, name, where, f"the preset raised {type(exc).__name__}: {exc}")
        if not isinstance(config, DSTConfig):
            _fail(check, name, where, f"the preset returned {type(config).__name__}")
        got = {key: getattr(config, key) for key in ("delta_t", "seed", "t_end")}
        want = {key: overrides[key] for key in got}
        if got != want or config.distribution != uniform:
            _fail(check, name, where, f"the config holds {got} and {config.distribution!r}")
        if not _pins_density(config) and not math.isclose(config.density, overrides["density"]):
            _fail(check, name, where, f"the config's density is {config.density!r}")
        if not isinstance(as_config(preset), DSTConfig):
            _fail(check, name, "no overrides", "the preset returned no DSTConfig")

    run_examples(check, example, cost=FAST, max_examples=max_examples)
