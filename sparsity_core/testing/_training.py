"""The monitored training loop behind the run and method checks."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import attrs
import torch
from torch import nn

from ..errors import ConfigError, LayerError, SparsityWarning, UpdateError
from ..optim_state import param_shaped_state
from ..registry import ComponentType, Registry
from ..scheduler import DSTScheduler
from ..structures import budget_step, describe, realized_budget
from ..telemetry import UpdateRecord
from ._common import _count, _describe, _fail, _same
from ._registered import registry
from .keep_checks import drop_count_violation, keep_highest_violation
from .models import mse
from .structure_checks import nm_violation

__all__ = [
    "MONITORS",
    "GradHook",
    "LossFn",
    "ModelFactory",
    "NoDrop",
    "OptimizerFactory",
    "Training",
    "method_name",
    "registry_for",
]

ModelFactory = Callable[[], nn.Module]
OptimizerFactory = Callable[[Any], torch.optim.Optimizer]
LossFn = Callable[[nn.Module, Any], torch.Tensor]
GradHook = Callable[[int, nn.Module], None]

# What a monitored run checks after every step; check_method_run checks all of them.
MONITORS = frozenset(
    {
        "budget",
        "structure",
        "mask_identity",
        "zeros",
        "dropped",
        "grown",
        "kept_weights",
        "timing",
        "keep_highest",
        "drop_count",
    }
)
# The monitors that watch each layer's keep() call (the drop) with the scores it was given.
_DROP_MONITORS = frozenset({"keep_highest", "drop_count"})


@attrs.frozen
class NoDrop:
    """A drop schedule that never drops (local, so the check needs no registered schedule)."""

    def fraction(self, step: int, t_end: int) -> float:
        return 0.0


def _components(config: Any) -> list[tuple[ComponentType, Any]]:
    """Every component instance of ``config``, with its registry type."""
    out = [
        (ComponentType.PRUNE, config.prune),
        (ComponentType.GROWTH, config.grow),
        (ComponentType.DISTRIBUTION, config.distribution),
        (ComponentType.SCHEDULE, config.drop),
        (ComponentType.PRUNE, config.init_mask),
        (ComponentType.REINIT, config.reinit),
        (ComponentType.OPTIMIZER_STATE, config.optimizer_state),
    ]
    structures = list(config.structures)
    for rule in config.rules:
        structures += list(rule.structures or ())
    return out + [(ComponentType.STRUCTURE, s) for s in structures]


def registry_for(config: Any) -> Registry:
    """The process-wide registry, plus (in this process only) every component of ``config``
    that no plugin registers, named by its class: the scheduler saves components by name, and
    the kit checks components before their plugin is installed (and its own ``NoDrop``)."""
    reg = registry()
    for ctype, component in _components(config):
        cls = type(component)
        if not any(entry.component is cls for entry in reg.entries(ctype)):
            reg = reg.with_component(ctype, f"{cls.__module__}.{cls.__qualname__}", cls)
    return reg


class _KeepRecorder:
    """A layer's structure that records each ``keep()`` call (its inputs and result) for the
    drop monitors; everything else is the structure's own."""

    def __init__(self, structure: Any, calls: dict[str, tuple[Any, ...]]) -> None:
        self._structure, self._calls = structure, calls

    @classmethod
    def around(cls, structure: Any, calls: dict[str, tuple[Any, ...]]) -> _KeepRecorder:
        # Named like the structure, so the engine's messages name the structure.
        named = type(type(structure).__name__, (cls,), {"__module__": cls.__module__})
        return named(structure, calls)

    def keep(self, scores: Any, mask: Any, fraction: float, spec: Any) -> Any:
        kept = self._structure.keep(scores, mask, fraction, spec)
        copy = kept.clone() if isinstance(kept, torch.Tensor) else kept
        self._calls[spec.fqn] = (scores.detach().clone(), mask.clone(), fraction, copy)
        return kept

    @property
    def __class__(self) -> type:
        # isinstance() sees the structure's class, as observers of the run expect.
        return type(self._structure)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._structure, name)


class Training:
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
        monitors: frozenset[str] = frozenset(),
    ) -> None:
        if len(data) == 0:
            raise ValueError(f"{check}: data holds no batch.")
        unknown = sorted(set(monitors) - MONITORS)
        if unknown:
            raise ValueError(f"{check}: unknown monitors {unknown}; known: {sorted(MONITORS)}.")
        self.check, self.model, self.optimizer, self.scheduler = check, model, optimizer, scheduler
        self.data, self.loss_fn = data, loss_fn or mse
        self.hook, self.monitors = before_optimizer_step, frozenset(monitors)
        self.budgets = {
            fqn: getattr(layer, "planned", layer.budget) for fqn, layer in scheduler.layers.items()
        }
        self.mask_objects = dict(scheduler.masks)
        self.structures = {fqn: layer.structure for fqn, layer in scheduler.layers.items()}
        self.keeps: dict[str, tuple[Any, ...]] = {}
        if self.monitors & _DROP_MONITORS:
            # The drop is judged on the scores it was given, which only keep() sees.
            for layer in scheduler.layers.values():
                layer.structure = _KeepRecorder.around(layer.structure, self.keeps)
        self.initial_masks = {fqn: m.clone() for fqn, m in scheduler.masks.items()}
        if "mask_identity" in self.monitors:
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
    ) -> Training:
        model = model_factory()
        optimizer = optimizer_factory(model.parameters())
        try:
            with warnings.catch_warnings():
                # The kit draws runs whose t_end comes before the first update on purpose; the
                # scheduler's advice for real runs would only be noise in a check's output.
                warnings.simplefilter("ignore", SparsityWarning)
                scheduler = DSTScheduler(
                    model, optimizer, config, total_steps=total_steps, registry=registry_for(config)
                )
        except UpdateError as exc:
            raise AssertionError(
                f"{check}: the scheduler rejected the initial mask: {exc}"
            ) from exc
        except (ConfigError, LayerError) as exc:
            raise ValueError(
                f"{check}: the model cannot hold the method, so nothing was checked: {exc} "
                f"(the kit's models have fan-ins of 16 or 32; pass run= with a model of yours "
                f"that can)"
            ) from exc
        return cls(check, model, optimizer, scheduler, **kwargs)

    def _fail(self, fqn: str, what: str) -> NoReturn:
        _fail(
            self.check,
            f"method {method_name(self.scheduler)}",
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
        if self.monitors:
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
                f"{scheduler.step_count} of method {method_name(scheduler)}: {exc}"
            ) from exc
        if self.monitors:
            self._check_state()
            if records:
                self._check_update(records, masks, weights)
            elif "timing" in self.monitors:
                self._check_quiet(masks, weights)
            if "timing" in self.monitors and len(scheduler.history) != seen + len(records):
                self._fail("*", "the history did not grow by the records returned")
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
        """The monitored invariants that hold after every step."""
        scheduler, on = self.scheduler, self.monitors
        if "mask_identity" in on and set(scheduler.layers) != set(self.budgets):
            self._fail("*", f"the sparse layers changed to {sorted(scheduler.layers)}")
        live = scheduler.masks
        for fqn, layer in scheduler.layers.items():
            mask = layer.mask
            if "mask_identity" in on:
                if mask is not self.mask_objects[fqn] or live[fqn] is not mask:
                    self._fail(fqn, "the mask tensor was replaced instead of updated in place")
                if mask.dtype != torch.bool or tuple(mask.shape) != layer.spec.shape:
                    self._fail(fqn, f"the mask has dtype {mask.dtype}, shape {tuple(mask.shape)}")
            if "budget" in on:
                self._check_budget(fqn, layer)
            if "structure" in on:
                structure = self.structures[fqn]
                if not structure.satisfied(mask, layer.spec, layer.budget):
                    self._fail(fqn, f"the mask violates the structure {describe(structure)}")
                broken = nm_violation(structure, layer.spec, mask, layer.budget)
                if broken is not None:
                    self._fail(fqn, f"the mask breaks N:M: {broken}")
            if "zeros" in on:
                self._check_zero(fqn, layer, ~mask, "inactive")
        if "budget" in on:
            self._check_global_budget()

    def _check_budget(self, fqn: str, layer: Any) -> None:
        planned = getattr(layer, "planned", layer.budget)
        if planned != self.budgets[fqn]:
            self._fail(fqn, f"the planned budget changed from {self.budgets[fqn]} to {planned}")
        # Only layers in the global apportionment may hold another share than planned.
        shared = budget_step(self.structures[fqn], layer.spec, layer.mask) is not None
        if layer.budget != self.budgets[fqn] and not (
            shared and self.scheduler.config.budget_rounding == "global"
        ):
            self._fail(fqn, f"the budget changed from {self.budgets[fqn]} to {layer.budget}")
        if layer.budget > layer.spec.numel:
            self._fail(fqn, f"the budget {layer.budget} exceeds the layer's {layer.spec.numel}")
        expected = realized_budget(self.structures[fqn], layer.spec, layer.budget, layer.mask)
        if expected > layer.budget:
            self._fail(fqn, f"the realized budget {expected} exceeds the budget {layer.budget}")
        if _count(layer.mask) != expected:
            self._fail(fqn, f"{_count(layer.mask)} weights are active, not the budget {expected}")

    def _check_global_budget(self) -> None:
        """The layers sharing one global budget never hold more than their plans add up to."""
        held = planned = 0
        for fqn, layer in self.scheduler.layers.items():
            if budget_step(self.structures[fqn], layer.spec, layer.mask) is not None:
                held += _count(layer.mask)
                planned += self.budgets[fqn]
        if held > planned:
            self._fail("*", f"the layers hold {held} weights, more than their {planned} planned")

    def _check_zero(self, fqn: str, layer: Any, where: torch.Tensor, what: str) -> None:
        """Weights and every parameter-shaped optimizer state are exactly 0 at ``where``."""
        weight = layer.weight.detach()
        bad = (weight != 0) & where
        if bad.any():
            self._fail(fqn, f"{_count(bad)} {what} weights are not exactly 0")
        for key, value in param_shaped_state(self.optimizer, layer.weight).items():
            bad = (value != 0) & where
            if bad.any():
                self._fail(
                    fqn, f"optimizer state {key!r} is non-zero at {_count(bad)} {what} positions"
                )

    def _check_update(
        self,
        records: list[UpdateRecord],
        masks: Mapping[str, torch.Tensor],
        weights: Mapping[str, torch.Tensor],
    ) -> None:
        scheduler, on = self.scheduler, self.monitors
        step, t_end = scheduler.step_count, scheduler.config.t_end
        if "timing" in on and not scheduler.is_update_step(step):
            self._fail("*", f"the topology changed off the update steps (t_end={t_end})")
        by_fqn = {record.fqn: record for record in records}
        if on & {"dropped", "grown"} and (
            len(by_fqn) != len(records) or set(by_fqn) != set(scheduler.layers)
        ):
            self._fail("*", f"records name layers {[r.fqn for r in records]}, not each once")
        for fqn, layer in scheduler.layers.items():
            old, new = masks[fqn], layer.mask
            dropped, grown, kept = old & ~new, new & ~old, old & new
            record = by_fqn.get(fqn)
            if "dropped" in on and (record.dropped != _count(dropped) or record.step != step):
                self._fail(
                    fqn,
                    f"the record says {record.dropped} weights were dropped at step {record.step} "
                    f"but {_count(dropped)} active weights left the mask (a dropped weight was "
                    f"not active, or was regrown in the same update)",
                )
            if "grown" in on and (record.grown != _count(grown) or record.active != _count(new)):
                self._fail(
                    fqn,
                    f"the record says {record.grown} weights were grown but {_count(grown)} "
                    f"inactive weights entered the mask (a grown weight was active after the "
                    f"drop, e.g. dropped and regrown in the same update)",
                )
            if "zeros" in on:
                self._check_zero(fqn, layer, grown, "grown")
            if "kept_weights" in on and not _same(layer.weight.detach()[kept], weights[fqn][kept]):
                self._fail(fqn, "the update changed weights that stayed active")
            if on & _DROP_MONITORS:
                self._check_drop(fqn, layer, old, record)
        self.keeps.clear()

    def _check_drop(
        self, fqn: str, layer: Any, old: torch.Tensor, record: UpdateRecord | None
    ) -> None:
        """The update's keep() kept the highest scores it allows and dropped the fraction
        its record states."""
        call = self.keeps.get(fqn)
        if record is None:
            self._fail(fqn, "the update returned no record for the layer")
        if call is None or not torch.equal(call[1], old):
            self._fail(fqn, "the update did not call the structure's keep() on the layer's mask")
        scores, mask, fraction, kept = call
        structure, spec = self.structures[fqn], layer.spec
        if "keep_highest" in self.monitors:
            broken = keep_highest_violation(structure, spec, scores, mask, fraction, kept)
            if broken is not None:
                self._fail(fqn, f"the drop on the prune scores broke the order: {broken}")
        if "drop_count" in self.monitors:
            # Judged at the fraction the record states, which is what keep() must have been given.
            broken = drop_count_violation(structure, spec, scores, mask, record.fraction, kept)
            if broken is not None:
                self._fail(fqn, f"the record says fraction {record.fraction!r}, but {broken}")

    def _check_quiet(
        self, masks: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]
    ) -> None:
        for fqn, layer in self.scheduler.layers.items():
            if not torch.equal(layer.mask, masks[fqn]):
                self._fail(fqn, "the mask changed on a step that returned no update record")
            if not _same(layer.weight.detach(), weights[fqn]):
                self._fail(fqn, "scheduler.step() changed weights on a step without an update")

    def finish(self) -> None:
        """The end of the run: the layers get their own structures back, then ``t_end`` holds."""
        for fqn, layer in self.scheduler.layers.items():
            layer.structure = self.structures[fqn]
        if "timing" not in self.monitors:
            return
        t_end = self.scheduler.config.t_end
        late = [r for r in self.scheduler.history if r.step >= t_end]
        if late:
            self._fail(late[0].fqn, f"an update was recorded at step {late[0].step} >= t_end")


def method_name(scheduler: DSTScheduler) -> str:
    c = scheduler.config
    return f"{_describe(c.prune)}/{_describe(c.grow)}/{_describe(c.distribution)}"
