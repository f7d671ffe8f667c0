"""Invariant checks for whole DST runs: budgets, masks, optimizer state, seeds, checkpoints.

Each check trains a small model with :class:`~sparsity_core.DSTScheduler` and raises
:class:`AssertionError` with a message naming the check, the method, the layer and what broke.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, UpdateError
from ..optim_state import param_shaped_state
from ..scheduler import DSTScheduler
from ..structures import describe, realized_budget
from ..telemetry import UpdateRecord
from ._common import _count, _describe, _fail, _same

__all__ = [
    "check_checkpoint_resume",
    "check_method_run",
    "check_same_seed_same_masks",
    "check_zero_drop_is_identity",
]
ModelFactory = Callable[[], nn.Module]
OptimizerFactory = Callable[[Any], torch.optim.Optimizer]
LossFn = Callable[[nn.Module, Any], torch.Tensor]
GradHook = Callable[[int, nn.Module], None]


# -- whole runs --------------------------------------------------------------------------------


def _mse(model: nn.Module, batch: Any) -> torch.Tensor:
    inputs, targets = batch
    return F.mse_loss(model(inputs), targets)


@attrs.frozen
class _NoDrop:
    """A drop schedule that never drops (local, so the check needs no registered schedule)."""

    def fraction(self, step: int, t_end: int) -> float:
        return 0.0


class _Training:
    """A model, its optimizer and scheduler, stepped over fixed batches with optional checks."""

    def __init__(
        self,
        check: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: DSTScheduler,
        *,
        data: Sequence[Any],
        loss_fn: LossFn | None,
        before_optimizer_step: GradHook | None,
        monitor: bool,
    ) -> None:
        if len(data) == 0:
            raise ValueError(f"{check}: data holds no batch.")
        self.check, self.model, self.optimizer, self.scheduler = check, model, optimizer, scheduler
        self.data, self.loss_fn = data, loss_fn or _mse
        self.hook, self.monitor = before_optimizer_step, monitor
        self.budgets = {fqn: layer.budget for fqn, layer in scheduler.layers.items()}
        self.mask_objects = dict(scheduler.masks)
        self.initial_masks = {fqn: m.clone() for fqn, m in scheduler.masks.items()}
        if monitor:
            self._check_ownership()
            self._check_state()

    @classmethod
    def build(
        cls,
        check: str,
        config: Any,
        model_factory: ModelFactory,
        optimizer_factory: OptimizerFactory,
        total_steps: int,
        **kwargs: Any,
    ) -> _Training:
        model = model_factory()
        optimizer = optimizer_factory(model.parameters())
        try:
            scheduler = DSTScheduler(model, optimizer, config, total_steps=total_steps)
        except UpdateError as exc:
            raise AssertionError(
                f"{check}: the scheduler rejected the initial mask: {exc}"
            ) from exc
        return cls(check, model, optimizer, scheduler, **kwargs)

    def _fail(self, fqn: str, what: str) -> NoReturn:
        _fail(
            self.check,
            f"method {_method_name(self.scheduler)}",
            f"layer {fqn!r} at step {self.scheduler.step_count}",
            what,
        )

    def run_until(self, stop: int) -> None:
        while self.scheduler.step_count < stop:
            self.step()

    def step(self) -> list[UpdateRecord]:
        scheduler, model, optimizer = self.scheduler, self.model, self.optimizer
        batch = self.data[scheduler.step_count % len(self.data)]
        optimizer.zero_grad(set_to_none=True)
        self.loss_fn(model, batch).backward()
        if self.hook is not None:
            self.hook(scheduler.step_count + 1, model)
        optimizer.step()
        if self.monitor:
            masks = {fqn: m.clone() for fqn, m in scheduler.masks.items()}
            weights = {
                fqn: layer.weight.detach().clone() for fqn, layer in scheduler.layers.items()
            }
            seen = len(scheduler.history)
        try:
            records = scheduler.step()
        except UpdateError as exc:
            raise AssertionError(
                f"{self.check}: the scheduler rejected the update at step "
                f"{scheduler.step_count} of method {_method_name(scheduler)}: {exc}"
            ) from exc
        if self.monitor:
            self._check_state()
            if len(scheduler.history) != seen + len(records):
                self._fail("*", "the history did not grow by the records returned")
            if records:
                self._check_update(records, masks, weights)
            else:
                self._check_quiet(masks, weights)
        return records

    def _check_ownership(self) -> None:
        """Each sparse weight tensor is governed by exactly one mask."""
        owners: dict[int, str] = {}
        for fqn, layer in self.scheduler.layers.items():
            owner = owners.setdefault(layer.weight.untyped_storage().data_ptr(), fqn)
            if owner != fqn:
                self._fail(
                    fqn,
                    f"layers {owner!r} and {fqn!r} share one weight tensor (tied weights) but "
                    f"have separate masks, so only their intersection can be non-zero and the "
                    f"real density is below the budget",
                )

    def _check_state(self) -> None:
        """Budgets, mask identity, zero inactive weights and zero inactive optimizer state."""
        scheduler = self.scheduler
        if set(scheduler.layers) != set(self.budgets):
            self._fail("*", f"the sparse layers changed to {sorted(scheduler.layers)}")
        live = scheduler.masks
        for fqn, layer in scheduler.layers.items():
            mask = layer.mask
            if mask is not self.mask_objects[fqn] or live[fqn] is not mask:
                self._fail(fqn, "the mask tensor was replaced instead of updated in place")
            if mask.dtype != torch.bool or tuple(mask.shape) != layer.spec.shape:
                self._fail(fqn, f"the mask has dtype {mask.dtype} and shape {tuple(mask.shape)}")
            if layer.budget != self.budgets[fqn]:
                self._fail(fqn, f"the budget changed from {self.budgets[fqn]} to {layer.budget}")
            expected = realized_budget(layer.structure, layer.spec, layer.budget, mask)
            if expected > layer.budget:
                self._fail(fqn, f"the realized budget {expected} exceeds the budget {layer.budget}")
            if _count(mask) != expected:
                self._fail(fqn, f"{_count(mask)} weights are active, not the budget {expected}")
            if not layer.structure.satisfied(mask, layer.spec, layer.budget):
                self._fail(fqn, f"the mask violates the structure {describe(layer.structure)}")
            weight = layer.weight.detach()
            bad = (weight != 0) & ~mask
            if bad.any():
                self._fail(fqn, f"{_count(bad)} inactive weights are not exactly 0")
            for key, value in param_shaped_state(self.optimizer, layer.weight).items():
                bad = (value != 0) & ~mask
                if bad.any():
                    self._fail(
                        fqn,
                        f"optimizer state {key!r} is non-zero at {_count(bad)} inactive positions",
                    )

    def _check_update(
        self,
        records: list[UpdateRecord],
        masks: Mapping[str, torch.Tensor],
        weights: Mapping[str, torch.Tensor],
    ) -> None:
        scheduler = self.scheduler
        step, t_end = scheduler.step_count, scheduler.config.t_end
        if not scheduler.is_update_step(step):
            self._fail("*", f"the topology changed off the update steps (t_end={t_end})")
        by_fqn = {record.fqn: record for record in records}
        if len(by_fqn) != len(records) or set(by_fqn) != set(scheduler.layers):
            self._fail("*", f"records name layers {[r.fqn for r in records]}, not each once")
        for fqn, layer in scheduler.layers.items():
            record, old, new = by_fqn[fqn], masks[fqn], layer.mask
            dropped, grown, kept = old & ~new, new & ~old, old & new
            if record.step != step or record.active != _count(new):
                self._fail(fqn, f"record {record} disagrees with the step or budget")
            if record.dropped != _count(dropped) or record.grown != _count(grown):
                self._fail(
                    fqn,
                    f"the record says {record.dropped} dropped / {record.grown} grown but "
                    f"{_count(dropped)} weights left and {_count(grown)} entered the mask (a "
                    f"weight was dropped and regrown in the same update)",
                )
            weight = layer.weight.detach()
            if (weight[grown] != 0).any():
                self._fail(fqn, "grown weights do not start at exactly 0")
            if not _same(weight[kept], weights[fqn][kept]):
                self._fail(fqn, "the update changed weights that stayed active")

    def _check_quiet(
        self, masks: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]
    ) -> None:
        for fqn, layer in self.scheduler.layers.items():
            if not torch.equal(layer.mask, masks[fqn]):
                self._fail(fqn, "the mask changed on a step that returned no update record")
            if not _same(layer.weight.detach(), weights[fqn]):
                self._fail(fqn, "scheduler.step() changed weights on a step without an update")

    def finish(self) -> None:
        t_end = self.scheduler.config.t_end
        late = [r for r in self.scheduler.history if r.step >= t_end]
        if late:
            self._fail(late[0].fqn, f"an update was recorded at step {late[0].step} >= t_end")


def _method_name(scheduler: DSTScheduler) -> str:
    c = scheduler.config
    return f"{_describe(c.prune)}/{_describe(c.grow)}/{_describe(c.distribution)}"


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
    update), grown weights are 0 and weights that stayed active are untouched; on other steps
    masks and weights are unchanged; nothing is recorded at or after ``t_end``. An
    :class:`~sparsity_core.errors.UpdateError` from the scheduler is a failure too.

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
    training = _Training.build(
        "check_method_run",
        config,
        model_factory,
        optimizer_factory,
        steps,
        data=data,
        loss_fn=loss_fn,
        before_optimizer_step=before_optimizer_step,
        monitor=True,
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
    zero = attrs.evolve(config, drop=_NoDrop() if drop is None else drop)
    training = _Training.build(
        check,
        zero,
        model_factory,
        optimizer_factory,
        steps,
        data=data,
        loss_fn=loss_fn,
        before_optimizer_step=None,
        monitor=True,
    )
    training.run_until(steps)
    scheduler = training.scheduler
    if scheduler.history:
        _fail(check, f"method {_method_name(scheduler)}", "the run", "fraction 0 recorded updates")
    for fqn, mask in scheduler.masks.items():
        if not torch.equal(mask, training.initial_masks[fqn]):
            _fail(
                check,
                f"method {_method_name(scheduler)}",
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
        training = _Training.build(
            check,
            config,
            model_factory,
            optimizer_factory,
            steps,
            data=data,
            loss_fn=loss_fn,
            before_optimizer_step=None,
            monitor=False,
        )
        trace = [{fqn: m.clone() for fqn, m in training.scheduler.masks.items()}]
        while training.scheduler.step_count < steps:
            if training.step():
                trace.append({fqn: m.clone() for fqn, m in training.scheduler.masks.items()})
        runs.append((training.scheduler, trace))
    (first, trace_a), (second, trace_b) = runs
    method = f"method {_method_name(first)}"
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
    common = {"data": data, "loss_fn": loss_fn, "before_optimizer_step": None, "monitor": False}
    straight = _Training.build(check, config, model_factory, optimizer_factory, steps, **common)
    straight.run_until(steps)
    first = _Training.build(check, config, model_factory, optimizer_factory, steps, **common)
    first.run_until(resume_at)
    method = f"method {_method_name(first.scheduler)}"
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
        scheduler = DSTScheduler.from_state_dict(model, optimizer, state["scheduler"])
    except (UpdateError, CheckpointError) as exc:
        _fail(check, method, f"step {resume_at}", f"from_state_dict failed: {exc}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    resumed = _Training(check, model, optimizer, scheduler, **{**common, "monitor": True})
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
