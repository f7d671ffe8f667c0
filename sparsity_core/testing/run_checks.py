"""Run-level checks on your own model: every invariant of a DST run, seeds, checkpoints.

Each check trains a model with :class:`~sparsity_core.DSTScheduler` and raises
:class:`AssertionError` with a message naming the check, the method, the layer and what broke.
:mod:`~sparsity_core.testing.method_checks` draws the models and checks one invariant at a time.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from ..errors import CheckpointError, UpdateError
from ..scheduler import DSTScheduler
from ._common import _fail, _same
from ._training import (
    MONITORS,
    GradHook,
    LossFn,
    ModelFactory,
    NoDrop,
    OptimizerFactory,
    Training,
    method_name,
    registry_for,
)

__all__ = [
    "check_checkpoint_resume",
    "check_method_run",
    "check_same_seed_same_masks",
    "check_zero_drop_is_identity",
]


def check_method_run(
    config: Any,
    model_factory: ModelFactory,
    *,
    steps: int,
    optimizer_factory: OptimizerFactory,
    data: Sequence[Any],
    loss_fn: LossFn | None = None,
    before_optimizer_step: GradHook | None = None,
) -> DSTScheduler:
    """Train with ``config`` for ``steps`` steps, checking the engine's invariants after each.

    After every ``scheduler.step()``: each layer holds exactly its (unchanged) budget, or
    under neuron ablation the structure's realized budget, and satisfies its structure; inactive
    weights and inactive parameter-shaped optimizer state are exactly 0; masks are updated in
    place. On update steps the records match the masks (no weight dropped and regrown in one
    update), the drop keeps the highest prune scores its structure allows and drops the
    fraction the record states, grown weights are 0 and weights that stayed active are
    untouched; on other steps masks and weights are unchanged; nothing is recorded at or after
    ``t_end``. An :class:`~sparsity_core.errors.UpdateError` from the scheduler is a failure too.
    Components no plugin registers are registered for the run only (the scheduler saves
    components by name).

    Args:
        model_factory: builds the model (the same initial weights on every call).
        optimizer_factory: builds the optimizer from ``model.parameters()``.
        data: the batches, used in order (and cycled); default loss: MSE of ``(inputs,
            targets)`` pairs.
        loss_fn: ``loss_fn(model, batch)`` returning a scalar loss.
        before_optimizer_step: ``hook(step, model)`` called after ``backward()`` and before
            ``optimizer.step()`` of step ``step`` (1-based), e.g. to corrupt gradients.

    Returns:
        The scheduler after the run.
    """
    training = Training.build(
        "check_method_run",
        config,
        model_factory,
        optimizer_factory,
        steps,
        data=data,
        loss_fn=loss_fn,
        before_optimizer_step=before_optimizer_step,
        monitors=MONITORS,
    )
    training.run_until(steps)
    training.finish()
    return training.scheduler


def check_zero_drop_is_identity(
    config: Any,
    model_factory: ModelFactory,
    *,
    steps: int,
    optimizer_factory: OptimizerFactory,
    data: Sequence[Any],
    loss_fn: LossFn | None = None,
    drop: Any = None,
) -> DSTScheduler:
    """With a drop fraction of 0 at every step the masks never change and nothing is recorded.

    Args:
        drop: the zero schedule to put in ``config`` (default: a private one that returns 0);
            anything ``DSTConfig.drop`` accepts, e.g. ``{"kind": "constant", "rate": 0.0}``.
    """
    check = "check_zero_drop_is_identity"
    zero = attrs.evolve(config, drop=NoDrop() if drop is None else drop)
    training = Training.build(
        check,
        zero,
        model_factory,
        optimizer_factory,
        steps,
        data=data,
        loss_fn=loss_fn,
        before_optimizer_step=None,
        monitors=frozenset(),
    )
    training.run_until(steps)
    scheduler = training.scheduler
    if scheduler.history:
        _fail(check, f"method {method_name(scheduler)}", "the run", "fraction 0 recorded updates")
    for fqn, mask in scheduler.masks.items():
        if not torch.equal(mask, training.initial_masks[fqn]):
            _fail(
                check,
                f"method {method_name(scheduler)}",
                f"layer {fqn!r}",
                "the mask changed although the drop fraction was 0 at every step",
            )
    return scheduler


def check_same_seed_same_masks(
    config: Any,
    model_factory: ModelFactory,
    *,
    steps: int,
    optimizer_factory: OptimizerFactory,
    data: Sequence[Any],
    loss_fn: LossFn | None = None,
) -> None:
    """Two runs with the same config, seed, model and data have identical masks at every step."""
    check = "check_same_seed_same_masks"
    runs = []
    for _ in range(2):
        training = Training.build(
            check,
            config,
            model_factory,
            optimizer_factory,
            steps,
            data=data,
            loss_fn=loss_fn,
            before_optimizer_step=None,
        )
        trace = [{fqn: m.clone() for fqn, m in training.scheduler.masks.items()}]
        while training.scheduler.step_count < steps:
            if training.step():
                trace.append({fqn: m.clone() for fqn, m in training.scheduler.masks.items()})
        runs.append((training.scheduler, trace))
    (first, trace_a), (second, trace_b) = runs
    method = f"method {method_name(first)}"
    for index, (a, b) in enumerate(zip(trace_a, trace_b, strict=False)):
        for fqn in a:
            if not torch.equal(a[fqn], b[fqn]):
                when = "initially" if index == 0 else f"after update {index}"
                _fail(
                    check,
                    method,
                    f"layer {fqn!r}",
                    f"masks differ {when} between two runs with the same seed",
                )
    if len(trace_a) != len(trace_b):
        _fail(
            check,
            method,
            "the run",
            f"the runs made {len(trace_a) - 1} and {len(trace_b) - 1} updates",
        )
    if first.history != second.history:
        _fail(check, method, "the run", "the update records differ between the two runs")


def check_checkpoint_resume(
    config: Any,
    model_factory: ModelFactory,
    *,
    steps: int,
    resume_at: int,
    optimizer_factory: OptimizerFactory,
    data: Sequence[Any],
    loss_fn: LossFn | None = None,
) -> None:
    """Saving at ``resume_at`` and resuming into fresh objects ends bit-identical to no break.

    The checkpoint ``{model, optimizer, scheduler}`` goes through ``torch.save`` and
    ``torch.load(weights_only=True)``; the resumed scheduler is built with
    :meth:`DSTScheduler.from_state_dict` before the model and optimizer states are loaded.
    Final masks, every model tensor, ever-active sets and the history must match exactly.
    """
    check = "check_checkpoint_resume"
    if not 0 < resume_at < steps:
        raise ValueError(f"{check}: resume_at={resume_at} must lie strictly inside (0, {steps}).")
    common = {"data": data, "loss_fn": loss_fn, "before_optimizer_step": None}
    straight = Training.build(check, config, model_factory, optimizer_factory, steps, **common)
    straight.run_until(steps)
    first = Training.build(check, config, model_factory, optimizer_factory, steps, **common)
    first.run_until(resume_at)
    method = f"method {method_name(first.scheduler)}"
    buffer = io.BytesIO()
    torch.save(
        {
            "model": first.model.state_dict(),
            "optimizer": first.optimizer.state_dict(),
            "scheduler": first.scheduler.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    try:
        state = torch.load(buffer, weights_only=True)
    except Exception as exc:
        _fail(
            check,
            method,
            f"step {resume_at}",
            f"the checkpoint does not load with weights_only=True: {type(exc).__name__}: {exc}",
        )
    model = model_factory()
    optimizer = optimizer_factory(model.parameters())
    try:
        scheduler = DSTScheduler.from_state_dict(
            model, optimizer, state["scheduler"], registry=registry_for(config)
        )
    except (UpdateError, CheckpointError) as exc:
        _fail(check, method, f"step {resume_at}", f"from_state_dict failed: {exc}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    resumed = Training(check, model, optimizer, scheduler, **common, monitors=MONITORS)
    resumed.run_until(steps)
    a, b = straight.scheduler, resumed.scheduler
    where = f"step {steps} after resuming at {resume_at}"
    if a.history != b.history:
        _fail(check, method, where, "the update history differs from the uninterrupted run")
    for fqn, layer in a.layers.items():
        other = b.layers[fqn]
        if not torch.equal(layer.mask, other.mask):
            _fail(check, method, f"layer {fqn!r} at {where}", "the masks differ")
        if not torch.equal(layer.ever_active, other.ever_active):
            _fail(check, method, f"layer {fqn!r} at {where}", "the ever-active sets differ")
    theirs = resumed.model.state_dict()
    for name, tensor in straight.model.state_dict().items():
        if not _same(tensor, theirs[name]):
            _fail(check, method, f"tensor {name!r} at {where}", "the weights differ")
