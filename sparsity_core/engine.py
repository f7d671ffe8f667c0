"""The generic drop-then-grow update, shared by every method.

RigL, SET and the others differ only in the criteria that score; structures enter only through
``StructureConstraint.keep`` (the drop) and ``StructureConstraint.fill`` (the grow). An update
is computed for every layer first and committed only when all layers succeeded, so a failing
plugin leaves the model and masks untouched.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import nn

from .compact import is_compact
from .context import ScoreContext
from .errors import ConfigError, UpdateError
from .layers import LayerSpec
from .optim_state import param_shaped_state, reset_state_at
from .rng import make_generator
from .selection import any_set, count
from .structures import active_rows_of, realized_budget
from .telemetry import UpdateRecord, active_neurons

__all__ = [
    "LayerState",
    "MaskChange",
    "commit_change",
    "compute_change",
    "plan_initial_mask",
    "reinit_layer",
    "resize_change",
    "zero_inactive_",
]


@attrs.define(eq=False)
class LayerState:
    """The mutable sparse state of one layer (tensors, so identity-compared)."""

    spec: LayerSpec
    module: nn.Module
    structure: Any
    mask: torch.Tensor
    budget: int
    ever_active: torch.Tensor
    grad_momentum: torch.Tensor | None = None
    planned: int | None = None
    """The plan's budget; ``budget`` is what the layer holds now (the two differ once the
    global apportionment has moved what ablation left unused between layers)."""

    def __attrs_post_init__(self) -> None:
        if self.planned is None:
            self.planned = self.budget

    @property
    def compact(self) -> bool:
        """Whether the layer is a compact layer (it trains ``values``, not a dense weight)."""
        return is_compact(self.module)

    @property
    def param(self) -> torch.Tensor:
        """The tensor the optimizer trains: the dense weight, or a compact layer's values."""
        return self.module.values if self.compact else self.module.weight

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight; a compact layer has none (use ``module.dense_weight()``)."""
        return self.module.weight

    def set_mask(self, new_mask: torch.Tensor) -> None:
        """Update the mask in place (optimizers, DDP and checkpoints keep the same tensor)."""
        self.mask.copy_(new_mask)


def zero_inactive_(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Set ``tensor`` to exactly 0 where ``mask`` is off, in place (NaN and Inf included).

    ``torch.where`` into its own input is several times faster on CPU than ``masked_fill_``
    and, unlike multiplying by the mask, never keeps a NaN at an inactive position.
    """
    return torch.where(mask, tensor, tensor.new_zeros(()), out=tensor)


@attrs.define(eq=False)
class MaskChange:
    """A computed, not yet applied, update of one layer."""

    new_mask: torch.Tensor
    dropped: torch.Tensor
    grown: torch.Tensor
    kept: torch.Tensor | None = None
    held: int | None = None
    """Active positions of ``new_mask`` (counted once, when it was checked)."""

    def count(self) -> int:
        return self.held if self.held is not None else count(self.new_mask)


def _component_name(component: Any) -> str:
    return type(component).__name__


def _checked_scores(
    role: str, component: Any, scores: Any, spec: LayerSpec, weight: torch.Tensor
) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise UpdateError(
            f"{role} criterion {_component_name(component)} returned {type(scores).__name__} for "
            f"layer {spec.fqn!r}; scores(ctx) must return a tensor shaped like the weight."
        )
    if tuple(scores.shape) != tuple(weight.shape):
        raise UpdateError(
            f"{role} criterion {_component_name(component)} returned scores of shape "
            f"{tuple(scores.shape)} for layer {spec.fqn!r} whose weight has shape "
            f"{tuple(weight.shape)}; return one score per weight."
        )
    if scores.device != weight.device:
        raise UpdateError(
            f"{role} criterion {_component_name(component)} returned scores on {scores.device} "
            f"for layer {spec.fqn!r} on {weight.device}; compute scores on the weight's device."
        )
    if not (scores.is_floating_point() or scores.dtype in (torch.int32, torch.int64, torch.bool)):
        raise UpdateError(
            f"{role} criterion {_component_name(component)} returned scores of dtype "
            f"{scores.dtype} for layer {spec.fqn!r}; return a real-valued tensor."
        )
    return scores


def _score(role: str, component: Any, ctx: ScoreContext) -> torch.Tensor:
    try:
        scores = component.scores(ctx)
    except UpdateError:
        raise
    except Exception as exc:
        raise UpdateError(
            f"{role} criterion {_component_name(component)} failed on layer {ctx.spec.fqn!r} at "
            f"step {ctx.step}: {type(exc).__name__}: {exc}. The update was not applied; masks "
            f"and weights are unchanged."
        ) from exc
    return _checked_scores(role, component, scores, ctx.spec, ctx.weight)


def _structure_call(structure: Any, method: str, spec: LayerSpec, step: int, *args, **kwargs):
    try:
        return getattr(structure, method)(*args, **kwargs)
    except UpdateError:
        raise
    except Exception as exc:
        raise UpdateError(
            f"structure {_component_name(structure)}.{method}() failed on layer {spec.fqn!r} at "
            f"step {step}: {type(exc).__name__}: {exc}. The update was not applied; masks and "
            f"weights are unchanged."
        ) from exc


def _takes_planned(structure: Any) -> bool:
    """Whether ``structure.fill`` accepts ``planned=`` (the layer's planned budget, which a
    neuron-level structure may need besides what the layer holds now)."""
    return _fill_takes_planned(type(structure))


@functools.cache
def _fill_takes_planned(cls: type) -> bool:
    """The signature is the class's: looked up once per class, not at every update."""
    try:
        return "planned" in inspect.signature(cls.fill).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def compute_change(
    layer: LayerState,
    *,
    prune: Any,
    grow: Any,
    fraction: float,
    step: int,
    seed: int,
    inputs: Mapping[str, Any],
    weight: torch.Tensor | None = None,
) -> MaskChange:
    """Drop the lowest-priority active weights, then grow as many from the inactive ones.

    Args:
        inputs: optional context inputs already captured for this layer (``grad``,
            ``optimizer_state``, ``grad_momentum``, ``ever_active``), by capability.
        weight: the layer's dense weight when the layer holds none itself (a compact layer's
            transient ``dense_weight()``); default ``layer.weight``.
    """
    spec, mask, structure = layer.spec, layer.mask, layer.structure
    weight = (layer.weight if weight is None else weight).detach()
    device = weight.device
    prune_ctx = ScoreContext(
        spec, step, weight, mask, make_generator(seed, spec.fqn, step, "prune", device), **inputs
    )
    prune_scores = _score("prune", prune, prune_ctx)
    keep = _structure_call(structure, "keep", spec, step, prune_scores, mask, fraction, spec)
    if keep.dtype != torch.bool or keep.shape != mask.shape or any_set(keep & ~mask):
        raise UpdateError(
            f"structure {_component_name(structure)} kept positions that were not active on "
            f"layer {spec.fqn!r}; keep() must return a boolean subset of the mask."
        )
    grow_ctx = ScoreContext(
        spec, step, weight, keep, make_generator(seed, spec.fqn, step, "grow", device), **inputs
    )
    # Candidates exclude what was just dropped: a drop is never undone in the same update.
    candidates = ~mask
    grow_scores = _score("grow", grow, grow_ctx)
    extra = {"planned": layer.planned} if _takes_planned(structure) else {}
    new_mask = _structure_call(
        structure,
        "fill",
        spec,
        step,
        grow_scores,
        keep,
        candidates,
        layer.budget,
        spec,
        previous=mask,
        **extra,
    )
    if new_mask.dtype != torch.bool or new_mask.shape != mask.shape:
        raise UpdateError(
            f"structure {_component_name(structure)} returned a {new_mask.dtype} mask of shape "
            f"{tuple(new_mask.shape)} for layer {spec.fqn!r}; fill() must return a boolean mask "
            f"shaped like the weight."
        )
    expected = realized_budget(structure, spec, layer.budget, new_mask)
    held = count(new_mask)
    if (
        any_set(new_mask & ~(keep | candidates))
        or held != expected
        or expected > layer.budget
        or not structure.satisfied(new_mask, spec, layer.budget)
    ):
        raise UpdateError(
            f"structure {_component_name(structure)} returned an invalid mask for layer "
            f"{spec.fqn!r}: fill() must add only candidates (never regrow a weight dropped in "
            f"the same update), satisfy the structure and hold exactly its budget of {expected} "
            f"(got {count(new_mask)})."
        )
    return MaskChange(
        new_mask=new_mask, dropped=mask & ~new_mask, grown=new_mask & ~mask, kept=keep, held=held
    )


def resize_change(
    layer: LayerState,
    change: MaskChange,
    budget: int,
    *,
    prune: Any,
    grow: Any,
    step: int,
    seed: int,
    inputs: Mapping[str, Any],
    weight: torch.Tensor | None = None,
) -> MaskChange:
    """``change`` grown or shrunk to ``budget`` on the same active neurons (the global
    apportionment's move): more weights come from the growth scores among positions inactive
    before the update, fewer leave by the prune scores (weights grown in this update are at
    zero, so under magnitude they go first). The criteria see what :func:`compute_change`
    gave them, so their scores are the same (``weight`` as in :func:`compute_change`)."""
    spec, mask, structure = layer.spec, layer.mask, layer.structure
    weight = (layer.weight if weight is None else weight).detach()
    device = weight.device
    current = change.new_mask
    rows = active_rows_of(current)
    if budget > count(current):
        kept = change.kept if change.kept is not None else current & mask
        ctx = ScoreContext(
            spec, step, weight, kept, make_generator(seed, spec.fqn, step, "grow", device), **inputs
        )
        scores = _score("grow", grow, ctx)
        base, candidates = current, ~mask & ~current
    else:
        ctx = ScoreContext(
            spec,
            step,
            weight,
            mask,
            make_generator(seed, spec.fqn, step, "prune", device),
            **inputs,
        )
        scores = _score("prune", prune, ctx)
        base, candidates = torch.zeros_like(current), current
    new_mask = _structure_call(
        structure, "fill", spec, step, scores, base, candidates, budget, spec, active_rows=rows
    )
    if (
        not isinstance(new_mask, torch.Tensor)
        or new_mask.dtype != torch.bool
        or new_mask.shape != mask.shape
        or any_set(new_mask & ~(base | candidates))
        or count(new_mask) != budget
        or not structure.satisfied(new_mask, spec, budget)
    ):
        raise UpdateError(
            f"structure {_component_name(structure)} could not resize layer {spec.fqn!r} to "
            f"{budget} active weights on its {count(rows)} active neurons (fill() with "
            f"active_rows= must hold exactly the budget on those neurons)."
        )
    return MaskChange(
        new_mask=new_mask,
        dropped=mask & ~new_mask,
        grown=new_mask & ~mask,
        kept=change.kept,
        held=budget,
    )


@torch.no_grad()
def commit_change(
    layer: LayerState,
    change: MaskChange,
    optimizer: torch.optim.Optimizer,
    step: int,
    fraction: float,
) -> UpdateRecord:
    """Apply a computed change in place: mask, weights, optimizer state, history.

    A compact layer moves to the new layout: surviving weights keep their values and their
    optimizer state (every state tensor shaped like ``values``), grown ones start at zero with
    zero state, exactly what the masked path's zeroing and reset leave."""
    if layer.compact:
        layer.module.relayout_(change.new_mask, param_shaped_state(optimizer, layer.param))
        layer.set_mask(change.new_mask)
    else:
        layer.set_mask(change.new_mask)
        # Grown weights start at exactly zero; dropped ones become zero.
        layer.weight.masked_fill_(~change.new_mask | change.grown, 0)
        changed = change.dropped | change.grown
        reset_state_at(optimizer, layer.weight, changed)
    layer.ever_active |= change.new_mask
    return UpdateRecord(
        fqn=layer.spec.fqn,
        step=step,
        fraction=fraction,
        dropped=count(change.dropped),
        grown=count(change.grown),
        active=count(change.new_mask),
        numel=layer.spec.numel,
        active_neurons=active_neurons(change.new_mask),
        fan_out=layer.spec.fan_out,
        ever_active=count(layer.ever_active),
    )


def plan_initial_mask(
    spec: LayerSpec,
    structure: Any,
    budget: int,
    seed: int,
    device: torch.device,
    *,
    criterion: Any = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """A mask with ``budget`` active positions that satisfies ``structure``: the highest
    scores of ``criterion`` (a prune criterion over the dense initial ``weight``), or
    uniformly random ones when no criterion is given."""
    gen = make_generator(seed, spec.fqn, 0, "init", device)
    if criterion is None:
        scores = torch.rand(spec.shape, generator=gen, device=device)
    else:
        if weight is None:
            raise UpdateError(f"layer {spec.fqn!r}: an initial-mask criterion needs the weight.")
        dense = torch.ones(spec.shape, dtype=torch.bool, device=device)
        scores = _score("init_mask", criterion, ScoreContext(spec, 0, weight, dense, gen))
    empty = torch.zeros(spec.shape, dtype=torch.bool, device=device)
    mask = structure.fill(scores, empty, ~empty, budget, spec)
    if count(mask) != budget or not structure.satisfied(mask, spec, budget):
        raise UpdateError(
            f"structure {_component_name(structure)} could not build an initial mask with "
            f"{budget} active weights for layer {spec.fqn!r}."
        )
    return mask


@torch.no_grad()
def reinit_layer(reinit: Any, seed: int, spec: LayerSpec, weight: torch.Tensor, mask: torch.Tensor):
    """The config's re-initialisation of one layer's dense ``weight`` under its initial mask,
    in place (its generator is the layer's own, so the order of layers does not matter)."""
    gen = make_generator(seed, spec.fqn, 0, "reinit", weight.device)
    try:
        reinit.apply_(weight, mask, spec, gen)
    except Exception as exc:
        raise ConfigError(
            f"reinit {type(reinit).__name__} failed on layer {spec.fqn!r}: "
            f"{type(exc).__name__}: {exc}."
        ) from exc
