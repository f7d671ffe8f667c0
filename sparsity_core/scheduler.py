"""``DSTScheduler``: keeps a model sparse and updates its topology every ΔT optimizer steps."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .budgets import Item, apportion, ceiling, span
from .checkpoint import (
    SCHEMA_VERSION,
    check_config,
    check_layers,
    check_layout,
    check_schema,
    migrated_config,
    saved_allocation,
    saved_config,
)
from .compact import is_compact
from .config import DSTConfig
from .distributed import (
    average_across,
    data_parallel_group,
    require_process_group,
    unwrap_model,
    verify_masks_agree,
)
from .engine import (
    LayerState,
    MaskChange,
    commit_change,
    compute_change,
    plan_initial_mask,
    reinit_layer,
    resize_change,
    zero_inactive_,
)
from .errors import (
    CheckpointError,
    ConfigError,
    SchedulerStateError,
    SparsityWarning,
    UpdateError,
)
from .layers import SkippedLayer, sparse_param
from .optim_state import (
    check_movable_state,
    check_optimizer_holds,
    param_shaped_state,
    reset_state_at,
)
from .planning import Plan, capacities, layer_shapes, plan_layers
from .protocols import Capabilities, capabilities_of
from .registry import Registry, get_registry
from .selection import count
from .structures import active_rows_of, budget_step, describe
from .telemetry import LayerSummary, UpdateRecord, active_neurons, itop_rate

__all__ = ["SCHEMA_VERSION", "DSTScheduler"]


def _multi_process() -> bool:
    """A torch.distributed run with more than one rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _dense(layer: LayerState) -> torch.Tensor | None:
    """A compact layer's transient dense weight for an update (None: the layer's own)."""
    return layer.module.dense_weight() if layer.compact else None


# The schedulers attached to each optimizer (by weak reference both ways: an optimizer that is
# garbage collected takes its entry with it, and the hooks alone keep a scheduler alive).
_ATTACHED: weakref.WeakKeyDictionary[Any, list[weakref.ref[DSTScheduler]]] = (
    weakref.WeakKeyDictionary()
)


def _attached(optimizer: Any) -> list[DSTScheduler]:
    refs = _ATTACHED.get(optimizer, [])
    return [s for s in (r() for r in refs) if s is not None and s._hooks]


def _refuse_overlap(optimizer: Any, weights: Mapping[str, torch.Tensor]) -> None:
    """A second scheduler whose weights another one on ``optimizer`` governs is refused: the
    first one's hooks would keep zeroing weights by its own masks."""
    mine = {id(w): fqn for fqn, w in weights.items()}
    for other in _attached(optimizer):
        shared = [fqn for fqn, layer in other.layers.items() if id(layer.param) in mine]
        if shared:
            raise SchedulerStateError(
                f"{other!r} is already attached to this {type(optimizer).__name__} and "
                f"governs layers {shared}; a second scheduler on the same weights would fight "
                f"its optimizer hooks (its masks keep zeroing weights the new one grows). Call "
                f"remove() on the existing scheduler first (DSTScheduler.attached(optimizer) "
                f"returns it), then build the new one."
            )


def _merge(a: Capabilities, b: Capabilities) -> Capabilities:
    momenta = {m for m in (a.grad_momentum, b.grad_momentum) if m is not None}
    if len(momenta) > 1:
        raise ConfigError(
            f"prune and grow criteria ask for different gradient momenta {sorted(momenta)}; "
            f"use one coefficient."
        )
    return Capabilities(
        needs_grad=a.needs_grad or b.needs_grad,
        needs_optimizer_state=a.needs_optimizer_state or b.needs_optimizer_state,
        grad_momentum=next(iter(momenta), None),
        stochastic=a.stochastic or b.stochastic,
        needs_ever_active=a.needs_ever_active or b.needs_ever_active,
    )


class DSTScheduler:
    """Dynamic sparse training for any model with Linear / Conv1d / Conv2d layers.

    Call :meth:`step` once per training iteration, after ``optimizer.step()``. Between
    updates it costs two in-place ops per layer and step (zeroing inactive gradients before the
    optimizer step and inactive weights after it, through optimizer hooks). Every ``delta_t``
    steps it drops and regrows weights and returns one :class:`UpdateRecord` per layer.

    Args:
        model: the model to sparsify (its layers are selected by ``config``).
        optimizer: the optimizer that holds the model's parameters.
        config: the method; see :class:`DSTConfig` and :func:`sparsity_core.preset`.
        total_steps: optimizer steps in the run (checks ``t_end``, and sets it to 75% of the
            run when ``config.t_end`` is None).
        registry: the component registry (default: the process-wide one).
        verify_ranks: in a ``torch.distributed`` run, check after construction and after every
            topology update that all ranks hold identical masks (one 8-byte digest per layer is
            all-gathered) and raise :class:`~sparsity_core.errors.DistributedError` naming the
            layers that diverged. Needs an initialised process group.
        process_group: the group ``verify_ranks`` compares (default: the world).

    Under ``DistributedDataParallel`` pass the wrapped or the inner model: wrappers are
    unwrapped, so layer names, generators and checkpoints match a single-process run.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: DSTConfig,
        *,
        total_steps: int | None = None,
        registry: Registry | None = None,
        verify_ranks: bool = False,
        process_group: Any = None,
    ) -> None:
        plan = plan_layers(unwrap_model(model), config, total_steps=total_steps, registry=registry)
        self._grad_group = data_parallel_group(model)
        self._attach(plan, optimizer, registry, verify_ranks, process_group, resume=None)

    def _attach(
        self,
        plan: Plan,
        optimizer: torch.optim.Optimizer,
        registry: Registry | None,
        verify_ranks: bool,
        process_group: Any,
        *,
        resume: Mapping[str, Any] | None,
    ) -> None:
        """Build the live state of ``plan`` (masks drawn, or taken from ``resume``), check it
        against the optimizer and the other ranks, then apply it and hook the optimizer."""
        if not isinstance(verify_ranks, bool):
            raise ConfigError(f"verify_ranks={verify_ranks!r} must be True or False.")
        if verify_ranks:
            require_process_group(process_group)
        self.verify_ranks = verify_ranks
        self.process_group = process_group
        self.config = plan.config
        self.total_steps = plan.total_steps
        self.registry = registry or get_registry()
        self.optimizer = optimizer
        self.structure = plan.structure
        self.skipped: tuple[SkippedLayer, ...] = plan.skipped
        self.target_densities = {p.spec.fqn: p.target_density for p in plan.layers}
        self._caps = _merge(capabilities_of(self.config.prune), capabilities_of(self.config.grow))
        weights = {p.spec.fqn: sparse_param(p.module) for p in plan.layers}
        check_optimizer_holds(optimizer, list(weights.items()))
        _refuse_overlap(optimizer, weights)
        self._check_compact(plan, optimizer)
        if resume is not None:
            check_layout(layer_shapes(plan), resume)
        self.layers: dict[str, LayerState] = {}
        for p in plan.layers:
            device = weights[p.spec.fqn].device
            budget = p.budget
            if resume is not None:
                mask = resume["masks"][p.spec.fqn].to(device=device).clone()
                budget = saved_allocation(resume, p.spec.fqn)
            elif is_compact(p.module):
                # A compact layer was built with its initial mask (to_compact draws it as a
                # masked scheduler would, and re-initialises the weights).
                mask = p.module.mask()
                self._check_compact_start(p, mask)
            else:
                mask = plan_initial_mask(
                    p.spec,
                    p.structure,
                    p.budget,
                    self.config.seed,
                    device,
                    criterion=self.config.init_mask,
                    weight=p.module.weight.detach(),
                )
            momentum = None
            if self._caps.grad_momentum is not None:
                momentum = torch.zeros(p.spec.shape, dtype=weights[p.spec.fqn].dtype, device=device)
            self.layers[p.spec.fqn] = LayerState(
                p.spec, p.module, p.structure, mask, budget, mask.clone(), momentum, p.budget
            )
        self._step = 0
        self._optimizer_stepped = False
        self._grads_masked = False  # mask_grads_() ran since the last optimizer step
        self._policy = self.config.optimizer_state
        # With a policy that tracks ages: per layer, the dense positions of weights grown so
        # far, the optimizer's step count at their growth, and their index into the parameter.
        self._young: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        if self._policy.tracks_age:
            for fqn, layer in self.layers.items():
                self._policy.check(optimizer, layer.param, fqn)
        self.history: list[UpdateRecord] = []
        self._captured_grads: dict[str, torch.Tensor] = {}
        # Before touching the model: a checkpoint that does not fit, or ranks that start from
        # different masks, fail here.
        if resume is not None:
            check_layers(self.layers, resume)
        self._verify_ranks(int(resume["step"]) if resume is not None else 0)
        if resume is not None:
            self._relayout_to_masks(resuming=True)
        if resume is None:
            self._reinit()
        self._apply_masks(reset_optimizer=True)
        self._hooks = [
            optimizer.register_step_pre_hook(self._before_optimizer_step),
            optimizer.register_step_post_hook(self._after_optimizer_step),
        ]
        self._arm_capture()
        _ATTACHED.setdefault(optimizer, []).append(weakref.ref(self))
        self._warn_skipped()
        self._warn_no_update()

    # -- construction helpers -------------------------------------------------------------------

    @torch.no_grad()
    def _reinit(self) -> None:
        """The config's re-initialisation of each layer's weights under its initial mask
        (compact layers had theirs when :func:`~sparsity_core.to_compact` built them)."""
        for layer in self.layers.values():
            if not layer.compact:
                reinit_layer(
                    self.config.reinit, self.config.seed, layer.spec, layer.weight.data, layer.mask
                )

    def _check_compact(self, plan: Plan, optimizer: torch.optim.Optimizer) -> None:
        """Compact layers need what their layout can give: room for every budget the plan may
        move them to, no per-step dense gradient, optimizer state shaped like ``values``."""
        compact = [p for p in plan.layers if is_compact(p.module)]
        if not compact:
            return
        if self._caps.grad_momentum is not None:
            raise ConfigError(
                f"the config's criteria keep a momentum of the dense gradient at every step "
                f"(grad_momentum={self._caps.grad_momentum}), which compact layers "
                f"{[p.spec.fqn for p in compact]} never compute (they form the dense gradient "
                f"on update steps only). Train them on the masked path (sparsity_core."
                f"to_masked(model)) or choose criteria without a gradient momentum."
            )
        if self._caps.needs_grad and self._grad_group is None and _multi_process():
            raise ConfigError(
                f"compact layers {[p.spec.fqn for p in compact]} form their dense gradient on "
                f"update steps on each rank, and the scheduler averages it over the "
                f"DistributedDataParallel group it is given. Pass the DDP wrapper (not the inner "
                f"model) to DSTScheduler, or ranks would grow different weights."
            )
        need = capacities(plan)
        for p in compact:
            if p.module.capacity < need[p.spec.fqn]:
                raise ConfigError(
                    f"compact layer {p.spec.fqn!r} has capacity {p.module.capacity}, but this "
                    f"config may move its budget up to {need[p.spec.fqn]} weights; build the "
                    f"compact model with sparsity_core.to_compact(model, config) for this config."
                )
            check_movable_state(optimizer, p.module.values, p.spec.fqn)

    def _check_compact_start(self, p: Any, mask: torch.Tensor) -> None:
        held = count(mask)
        if held != p.budget or not p.structure.satisfied(mask, p.spec, p.budget):
            raise ConfigError(
                f"compact layer {p.spec.fqn!r} holds {held} weights, but this config plans "
                f"{p.budget} under {describe(p.structure)}: it was built for another config. "
                f"Build it with sparsity_core.to_compact(model, config) with the config you "
                f"pass here, or resume with DSTScheduler.from_state_dict()."
            )

    @torch.no_grad()
    def _average_captured(self) -> None:
        """Under DDP, the dense gradients compact layers formed are each rank's own: average
        them over the ranks, as DDP averaged the dense weight's gradient on the masked path."""
        if self._grad_group is None or not self._caps.needs_grad:
            return
        captured = []
        for layer in self.layers.values():
            if layer.compact:
                # Every rank reduces every layer (zeros where a layer saw no backward pass), so
                # the collectives line up whatever each rank's batch used.
                if layer.module.captured_grad is None:
                    layer.module.captured_grad = torch.zeros(
                        layer.spec.shape, dtype=layer.param.dtype, device=layer.param.device
                    )
                captured.append(layer.module.captured_grad)
        if captured:
            average_across(captured, self._grad_group)

    @torch.no_grad()
    def _relayout_to_masks(self, *, resuming: bool = False) -> None:
        """Compact layers take the layout of the loaded masks, as masked layers are zeroed
        where the loaded masks are off (loading the model's state_dict of the same checkpoint,
        before or after, gives the same layout). While resuming, optimizer state that already
        exists was loaded for the checkpoint's layout, not the model's: moving it would
        scramble it, so that order is refused."""
        for layer in self.layers.values():
            if not layer.compact or torch.equal(layer.module.mask(), layer.mask):
                continue
            state = param_shaped_state(self.optimizer, layer.param)
            if resuming and state:
                raise SchedulerStateError(
                    f"compact layer {layer.spec.fqn!r} holds another layout than the checkpoint, "
                    f"and the optimizer already holds state for it (loaded for the checkpoint's "
                    f"layout). Load the model's state_dict (it holds the layout) before the "
                    f"optimizer's, or build the scheduler before loading the optimizer."
                )
            layer.module.relayout_(layer.mask, state)

    def _check_state(self, layer: LayerState) -> None:
        """Before an update: a compact layer's layout is still the scheduler's mask, and the
        optimizer's state for it can move with the weights."""
        if not layer.compact:
            return
        if not torch.equal(layer.module.mask(), layer.mask):
            raise SchedulerStateError(
                f"compact layer {layer.spec.fqn!r} holds another layout than the scheduler's "
                f"mask ({layer.module.nnz} vs {count(layer.mask)} active weights): its "
                f"state was loaded or changed outside the scheduler (a model state_dict from "
                f"another checkpoint?). Load the model, optimizer and scheduler states of one "
                f"checkpoint together."
            )
        check_movable_state(self.optimizer, layer.param, layer.spec.fqn)

    def _arm_capture(self) -> None:
        """Compact layers form the dense gradient only for the backward passes of the step
        whose topology update needs it."""
        capture = (
            bool(self._hooks) and self._caps.needs_grad and self.is_update_step(self._step + 1)
        )
        for layer in self.layers.values():
            if layer.compact:
                layer.module.capture_grad = capture
                layer.module.captured_grad = None  # a new step: sum its backward passes only

    def _warn_skipped(self) -> None:
        surprising = [s for s in self.skipped if not s.requested]
        if surprising:
            listed = "; ".join(f"{s.fqn!r} {tuple(s.shape)}: {s.reason}" for s in surprising)
            warnings.warn(
                f"DSTScheduler leaves {len(surprising)} weight(s) dense: {listed}. "
                f"(scheduler.skipped lists them.)",
                SparsityWarning,
                stacklevel=3,
            )

    def _warn_no_update(self) -> None:
        c = self.config
        first = (c.t_start // c.delta_t + 1) * c.delta_t
        if first < c.t_end:
            return
        try:
            fraction = float(c.drop.fraction(c.t_start + 1, c.t_end))
        except Exception:  # the schedule's own errors surface at the first update instead
            fraction = 1.0
        if fraction > 0.0:
            warnings.warn(
                f"DSTConfig.delta_t={c.delta_t} leaves no update step between t_start="
                f"{c.t_start} and t_end={c.t_end} (the first would be step {first}), so the "
                f"topology never changes and this run trains a static mask. Lower delta_t, "
                f"raise t_end or total_steps, or use the 'static' preset to say so.",
                SparsityWarning,
                stacklevel=3,
            )

    @torch.no_grad()
    def _apply_masks(self, *, reset_optimizer: bool) -> None:
        for layer in self.layers.values():
            if layer.compact:
                layer.module.zero_padding_()
                if reset_optimizer:
                    for value in param_shaped_state(self.optimizer, layer.param).values():
                        value[layer.module.nnz :] = 0
                continue
            zero_inactive_(layer.weight, layer.mask)
            if reset_optimizer:
                reset_state_at(self.optimizer, layer.weight, ~layer.mask)

    # -- per-step hooks (the hot path: keep them cheap) ----------------------------------------

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._grads_masked:
            # mask_grads_() took the dense gradient and the momentum already; zero the inactive
            # gradients again (idempotent) in case a backward pass came after it.
            for layer in self.layers.values():
                if not layer.compact and layer.weight.grad is not None:
                    zero_inactive_(layer.weight.grad, layer.mask)
            return
        self._take_grads()

    @torch.no_grad()
    def _take_grads(self) -> None:
        """What the step needs of the dense gradients (growth's copy on the step before an
        update, the gradient momentum), then the inactive gradients zeroed."""
        capture = self._caps.needs_grad and self.is_update_step(self._step + 1)
        beta = self._caps.grad_momentum
        for fqn, layer in self.layers.items():
            if layer.compact:
                continue  # no inactive slot has a gradient; the dense one is captured in backward
            grad = layer.weight.grad
            if grad is None:
                continue
            if capture:
                self._captured_grads[fqn] = grad.detach().clone()
            if beta is not None and self._step < self.config.t_end:
                layer.grad_momentum.mul_(beta).add_(grad.detach(), alpha=1.0 - beta)
            zero_inactive_(grad, layer.mask)

    @torch.no_grad()
    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for layer in self.layers.values():
            if layer.compact:
                layer.module.zero_padding_()
            else:
                zero_inactive_(layer.weight, layer.mask)
        for fqn, (pos, born, index) in list(self._young.items()):
            keep = self._policy.after_step(optimizer, self.layers[fqn].param, index, born)
            if keep is not None and not bool(keep.all()):
                self._young[fqn] = (pos[keep], born[keep], index[keep])
        self._optimizer_stepped = True
        self._grads_masked = False

    # -- public API -----------------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """Optimizer steps seen so far (calls to :meth:`step`)."""
        return self._step

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The live boolean masks by layer name (updated in place; do not modify)."""
        return {fqn: layer.mask for fqn, layer in self.layers.items()}

    def mask_grads_(self) -> None:
        """Zero the gradients of inactive weights now, before the optimizer step.

        The optimizer's pre-step hook does this anyway; call it yourself when something reads
        the gradients between ``backward()`` and ``optimizer.step()``, gradient clipping above
        all: ``torch.nn.utils.clip_grad_norm_`` then measures the gradients that will be
        applied, not the dense ones. Call it after the step's last backward pass (and after
        ``GradScaler.unscale_``). Growth still sees the dense gradient: it is taken here, before
        the zeroing, on the step before an update. Calling it twice in one step changes
        nothing; compact layers have no inactive gradients.
        """
        if not self._hooks:
            raise SchedulerStateError(
                f"{self!r} was detached with remove(): it no longer enforces its masks. Build a "
                f"new scheduler (or DSTScheduler.from_state_dict()) to go on."
            )
        if not self._grads_masked:
            self._take_grads()
            self._grads_masked = True

    def is_update_step(self, step: int) -> bool:
        """Whether the topology changes at ``step`` (before any drop-fraction check)."""
        c = self.config
        return step % c.delta_t == 0 and c.t_start < step < c.t_end

    def step(self) -> list[UpdateRecord]:
        """Advance one optimizer step; on update steps change the topology and return records.

        Call it once after each ``optimizer.step()``. A call with no optimizer step since the
        previous one (twice per step, or after a ``GradScaler`` skipped the step) warns and is
        not counted, so the schedule never runs ahead of the optimizer. An update that raises
        :class:`~sparsity_core.errors.UpdateError` changes nothing, the step count included:
        the next call retries it. After :meth:`remove` it raises
        :class:`~sparsity_core.errors.SchedulerStateError`.
        """
        if not self._hooks:
            raise SchedulerStateError(
                f"{self!r} was detached with remove(): it no longer enforces its masks, so "
                f"step() would change masks that training ignores. Build a new scheduler (or "
                f"DSTScheduler.from_state_dict(model, optimizer, old.state_dict())) to go on."
            )
        if not self._optimizer_stepped:
            warnings.warn(
                f"DSTScheduler.step() at step {self._step} without an optimizer.step() since "
                f"the previous call; not counted. Call it once after each optimizer.step() (with "
                f"gradient accumulation, only when the optimizer steps; a GradScaler that "
                f"skipped a step on overflow causes this too, harmlessly).",
                SparsityWarning,
                stacklevel=2,
            )
            self._grads_masked = False  # the skipped step's gradients are not the next one's
            return []
        step = self._step + 1
        records: list[UpdateRecord] = []
        if self.is_update_step(step):
            # An UpdateError applies nothing and leaves the count and the captured gradients
            # as they were: the next call (now, or after the next optimizer step) retries.
            records = self._update_at(step)
            self._captured_grads.clear()
        self._step = step
        self._optimizer_stepped = False
        self._grads_masked = False
        self._arm_capture()
        if records:
            self.history.extend(records)
            self._verify_ranks(step)
            self.registry.call_observers(scheduler=self, step=step, records=records)
        return records

    def _update_at(self, step: int) -> list[UpdateRecord]:
        fraction = float(self.config.drop.fraction(step, self.config.t_end))
        if not (0.0 <= fraction <= 1.0):
            raise UpdateError(
                f"drop schedule {type(self.config.drop).__name__} returned fraction "
                f"{fraction!r} at step {step}; fractions must lie in [0, 1]."
            )
        if fraction == 0.0:
            return []
        return self._update(step, fraction)

    def _verify_ranks(self, step: int, masks: Mapping[str, torch.Tensor] | None = None) -> None:
        if self.verify_ranks:
            masks = self.masks if masks is None else {fqn: masks[fqn] for fqn in self.layers}
            verify_masks_agree(masks, step=step, group=self.process_group)

    def _inputs(self, fqn: str, layer: LayerState) -> dict[str, Any]:
        caps, inputs = self._caps, {}
        if caps.needs_grad:
            grad = layer.module.captured_grad if layer.compact else self._captured_grads.get(fqn)
            if grad is None:
                param = layer.param
                grad = torch.zeros(layer.spec.shape, dtype=param.dtype, device=param.device)
            inputs["grad"] = grad
        if caps.needs_optimizer_state:
            state = param_shaped_state(self.optimizer, layer.param)
            if layer.compact:  # the dense view a criterion expects (transient, per layer)
                state = {key: layer.module.scatter(value) for key, value in state.items()}
            inputs["optimizer_state"] = state
        if caps.grad_momentum is not None:
            inputs["grad_momentum"] = layer.grad_momentum
        if caps.needs_ever_active:
            inputs["ever_active"] = layer.ever_active
        return inputs

    def _update(self, step: int, fraction: float) -> list[UpdateRecord]:
        changes: dict[str, MaskChange] = {}
        for layer in self.layers.values():
            self._check_state(layer)
        self._average_captured()
        for fqn, layer in self.layers.items():
            changes[fqn] = compute_change(
                layer,
                prune=self.config.prune,
                grow=self.config.grow,
                fraction=fraction,
                step=step,
                seed=self.config.seed,
                inputs=self._inputs(fqn, layer),
                weight=_dense(layer),
            )
        if self.config.budget_rounding == "global":
            changes = self._rebalance(changes, step)
        for fqn, change in changes.items():
            layer = self.layers[fqn]
            if layer.compact and change.count() > layer.module.capacity:
                raise UpdateError(
                    f"layer {fqn!r} would hold {change.count()} weights, more than its compact "
                    f"capacity of {layer.module.capacity}; the update was not applied. (The "
                    f"plan bounds every budget by the capacity: this is a bug, please report "
                    f"it with the config.)"
                )
        # Every layer computed without error: now commit (all or nothing).
        records = [
            commit_change(self.layers[fqn], change, self.optimizer, step, fraction)
            for fqn, change in changes.items()
        ]
        if self._policy.tracks_age:
            for fqn, change in changes.items():
                self._track_growth(fqn, change.new_mask, change.grown)
        if self.config.budget_rounding == "global":
            # What each layer holds now is its share until the next update.
            for fqn, change in changes.items():
                layer = self.layers[fqn]
                if budget_step(layer.structure, layer.spec) is not None:
                    layer.budget = change.count()
        return records

    def _track_growth(self, fqn: str, new_mask: torch.Tensor, grown: torch.Tensor) -> None:
        """Record the weights ``grown`` in this update (born at the optimizer's step count for
        the layer) and forget the tracked ones that were dropped or grown again."""
        layer = self.layers[fqn]
        state = self.optimizer.state.get(layer.param, {})
        born_now = float(state["step"]) if "step" in state else 0.0
        device = layer.mask.device
        empty = torch.empty(0, dtype=torch.long, device=device)
        pos, born, _ = self._young.get(fqn, (empty, empty.double(), empty))
        still = new_mask.reshape(-1)[pos] & ~grown.reshape(-1)[pos]
        new = grown.reshape(-1).nonzero().squeeze(1)
        pos = torch.cat([pos[still], new])
        born = torch.cat(
            [born[still], torch.full((new.numel(),), born_now, dtype=torch.float64, device=device)]
        )
        self._young[fqn] = (pos, born, self._param_index(layer, pos))

    @staticmethod
    def _param_index(layer: LayerState, pos: torch.Tensor) -> torch.Tensor:
        """Dense positions of active weights as indices into the trained parameter: the same
        positions for a dense weight, the slots holding them for a compact layer."""
        if not layer.compact:
            return pos
        flat = layer.module.flat_index()
        order = torch.argsort(flat)
        return order[torch.searchsorted(flat[order], pos)]

    def _rebalance(self, changes: dict[str, MaskChange], step: int) -> dict[str, MaskChange]:
        """Move what ablation left unused to the layers that can take it (global rounding).

        The layers that take part (a structure with a ``budget_step``) share the sum of their
        planned budgets; each may end up to two of its steps, or one step of the widest layer,
        from its planned share (a step is one weight per active neuron under constant fan-in;
        unstructured layers take any count)."""
        taking_part, target, held_total = [], 0, 0
        for fqn, change in changes.items():
            layer = self.layers[fqn]
            if budget_step(layer.structure, layer.spec) is not None:
                held = change.count()
                taking_part.append((fqn, held))
                target += layer.planned
                held_total += held
        if held_total == target:  # nothing left over (always so without ablation)
            return changes
        units = {
            fqn: budget_step(
                self.layers[fqn].structure, self.layers[fqn].spec, changes[fqn].new_mask
            )
            for fqn, _ in taking_part
        }
        # Every layer may take up to one step of the widest layer (what one ablated neuron's
        # remainder there can leave), or two of its own steps if those are wider.
        reach = max((u for u in units.values() if u is not None), default=1)
        items, names = [], []
        for fqn, held in taking_part:
            layer, change = self.layers[fqn], changes[fqn]
            unit = units[fqn]
            if unit is None:
                continue
            free = ~layer.mask & ~change.new_mask
            if unit == 1:
                most = min(held + count(free), ceiling(layer.planned, 1, reach))
                items.append(Item(held, 1, ideal=layer.planned, low=1, high=max(held, most)))
            else:
                items.append(self._anchored(layer, change, held, unit, free, reach))
            names.append(fqn)
        out = dict(changes)
        for fqn, item, budget in zip(names, items, apportion(items, target), strict=True):
            if budget != item.value:
                out[fqn] = resize_change(
                    self.layers[fqn],
                    changes[fqn],
                    budget,
                    prune=self.config.prune,
                    grow=self.config.grow,
                    step=step,
                    seed=self.config.seed,
                    inputs=self._inputs(fqn, self.layers[fqn]),
                    weight=_dense(self.layers[fqn]),
                )
        return out

    @staticmethod
    def _anchored(
        layer: LayerState,
        change: MaskChange,
        held: int,
        unit: int,
        free: torch.Tensor,
        reach: int,
    ) -> Item:
        """A layer that holds ``unit`` weights per step: it may end within ``max(2 * unit,
        reach)`` weights of its planned share on its active neurons (``planned // unit``
        steps), never drifting further however many updates move it, and never growing a
        neuron past its free inputs."""
        rows = active_rows_of(change.new_mask)
        spare = free.reshape(layer.spec.fan_out, -1).sum(dim=1)[rows]
        most_up = int(spare.min()) if spare.numel() else 0
        share = (layer.planned // unit) * unit
        deltas = []
        n = span(unit, reach)
        for d in range(-n, n + 1):
            result = share + d * unit
            up = (result - held) // unit
            if unit <= result <= layer.spec.numel and up <= most_up:
                deltas.append(up)
        if 0 not in deltas:
            deltas.append(0)
        return Item(held, unit, tuple(sorted(set(deltas))), ideal=layer.planned)

    def summary(self) -> list[LayerSummary]:
        """Each layer's budget, structure, fan-in range, active neurons and ever-active count."""
        out = []
        for fqn, layer in self.layers.items():
            fan_in = layer.mask.reshape(layer.spec.fan_out, -1).sum(dim=1)
            live = fan_in[fan_in > 0]
            out.append(
                LayerSummary(
                    fqn=fqn,
                    shape=layer.spec.shape,
                    budget=layer.budget,
                    active=count(layer.mask),
                    numel=layer.spec.numel,
                    active_neurons=active_neurons(layer.mask),
                    fan_out=layer.spec.fan_out,
                    ever_active=count(layer.ever_active),
                    structure=describe(layer.structure),
                    fan_in_min=int(live.min()) if live.numel() else 0,
                    fan_in_max=int(live.max()) if live.numel() else 0,
                    satisfied=bool(layer.structure.satisfied(layer.mask, layer.spec, layer.budget)),
                    target_density=self.target_densities[fqn],
                )
            )
        return out

    def itop_rate(self) -> float:
        """Fraction of the sparse layers' weights that have been active at any time."""
        return itop_rate(self.summary())

    def target_density(self) -> float:
        """The density the config asked for over these layers (``config.density``)."""
        return self.config.density

    def density(self) -> float:
        """Achieved global density over the sparse layers, counted from the masks."""
        total = sum(layer.spec.numel for layer in self.layers.values())
        return sum(count(layer.mask) for layer in self.layers.values()) / total

    def remove(self) -> None:
        """Detach the optimizer hooks (the masks stop being enforced); step() then refuses."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._arm_capture()  # disarms: no dense gradient is formed for a detached scheduler
        refs = _ATTACHED.get(self.optimizer, [])
        refs[:] = [r for r in refs if r() is not None and r() is not self]

    @staticmethod
    def attached(optimizer: torch.optim.Optimizer) -> list[DSTScheduler]:
        """The schedulers whose hooks are on ``optimizer`` (not yet removed)."""
        return _attached(optimizer)

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Config (by plugin names), step, masks and history; loads with ``weights_only=True``."""
        return {
            "schema_version": SCHEMA_VERSION,
            "config": self.config.to_dict(self.registry),
            "step": self._step,
            "total_steps": self.total_steps,
            "layers": {
                fqn: {
                    "shape": list(layer.spec.shape),
                    "budget": layer.planned,
                    "allocation": layer.budget,
                }
                for fqn, layer in self.layers.items()
            },
            "masks": {fqn: layer.mask.detach().cpu().clone() for fqn, layer in self.layers.items()},
            "ever_active": {
                fqn: layer.ever_active.detach().cpu().clone() for fqn, layer in self.layers.items()
            },
            "grad_momentum": {
                fqn: layer.grad_momentum.detach().cpu().clone()
                for fqn, layer in self.layers.items()
                if layer.grad_momentum is not None
            },
            "history": [record.to_dict() for record in self.history],
            "grown_at": {
                fqn: {"positions": pos.cpu().clone(), "step": born.cpu().clone()}
                for fqn, (pos, born, _) in self._young.items()
            },
        }

    @classmethod
    def from_state_dict(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: Mapping[str, Any],
        *,
        registry: Registry | None = None,
        verify_ranks: bool = False,
        process_group: Any = None,
    ) -> DSTScheduler:
        """Rebuild a scheduler from a checkpoint (config included), without a random initial mask.

        Use this to resume: it never zeroes weights that the saved masks keep. A config naming
        a component that no installed plugin provides, a newer schema, or layers that differ
        from ``model``'s raise :class:`~sparsity_core.errors.CheckpointError`.
        """
        config = saved_config(state, registry)
        total_steps = state.get("total_steps")
        plan = plan_layers(unwrap_model(model), config, total_steps=total_steps, registry=registry)
        scheduler = cls.__new__(cls)
        scheduler._grad_group = data_parallel_group(model)
        scheduler._attach(plan, optimizer, registry, verify_ranks, process_group, resume=state)
        try:
            scheduler.load_state_dict(state)
        except Exception:
            scheduler.remove()  # leave no hook on the optimizer of a failed load
            raise
        return scheduler

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore step, masks and history from :meth:`state_dict` (same config and layers)."""
        check_schema(state)
        check_config(self.config.to_dict(self.registry), migrated_config(state))
        check_layers(self.layers, state)
        # Before changing anything: ranks that loaded different checkpoints fail here.
        self._verify_ranks(int(state["step"]), state["masks"])
        for fqn, layer in self.layers.items():
            layer.set_mask(state["masks"][fqn])
            layer.budget = saved_allocation(state, fqn)
            layer.ever_active.copy_(state["ever_active"][fqn])
            if layer.grad_momentum is not None:
                layer.grad_momentum.copy_(state["grad_momentum"][fqn])
        self._step = int(state["step"])
        self.history = [UpdateRecord(**record) for record in state.get("history", [])]
        self._relayout_to_masks()
        self._apply_masks(reset_optimizer=False)
        self._young = {}
        for fqn, saved in (
            dict(state.get("grown_at") or {}).items() if self._policy.tracks_age else ()
        ):
            layer = self.layers[fqn]
            pos = saved["positions"].to(device=layer.mask.device, dtype=torch.long)
            born = saved["step"].to(device=layer.mask.device, dtype=torch.float64)
            if pos.shape != born.shape or (
                pos.numel() and not bool(layer.mask.reshape(-1)[pos].all())
            ):
                raise CheckpointError(
                    f"checkpoint grown_at[{fqn!r}] lists positions that its mask does not hold; "
                    f"the file was edited or is damaged."
                )
            self._young[fqn] = (pos, born, self._param_index(layer, pos))
        self._arm_capture()

    def __repr__(self) -> str:
        if not hasattr(self, "layers"):
            return "DSTScheduler(<not initialised>)"
        return (
            f"DSTScheduler(layers={len(self.layers)}, density={self.density():.4f}, "
            f"step={self._step}, t_end={self.config.t_end}, delta_t={self.config.delta_t})"
        )
