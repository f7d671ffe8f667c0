"""Planning: model + config + registry -> the sparse layers, their structures and budgets.

:func:`plan_layers` is a pure function of its arguments: it reads the model (layer names,
shapes, ``requires_grad``, devices) and never changes it, draws no mask and touches no
optimizer. The scheduler turns a :class:`Plan` into live state (masks, hooks); a checkpoint is
checked against the plan of the model it is loaded into.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from torch import nn

from .budgets import Item, apportion, ceiling, span
from .config import DSTConfig
from .errors import ConfigError, LayerError, UnknownComponentError
from .layers import (
    LayerSpec,
    SkippedLayer,
    output_layer,
    select_layers,
    split_frozen,
    unsupported_weights,
)
from .registry import Registry, get_registry
from .structures import budget_step, compose_structures, fixed_density

__all__ = ["LayerPlan", "Plan", "capacities", "layer_shapes", "plan_layers"]


@attrs.frozen(eq=False)
class LayerPlan:
    """One sparse layer: its geometry, module, composed structure and exact budget."""

    spec: LayerSpec
    module: nn.Module
    structure: Any
    budget: int
    target_density: float


@attrs.frozen(eq=False)
class Plan:
    """What a scheduler over ``config`` sparsifies in a model, and what it leaves dense.

    Attributes:
        config: the config with ``t_end`` resolved against ``total_steps``.
        structure: the config's own structures, composed (for layers no rule names).
        layers: the sparse layers, in module order.
        skipped: weights found but left dense, with the reason (frozen, dense by a rule, not a
            supported layer).
        total_steps: the run's optimizer steps, if known.
    """

    config: DSTConfig
    structure: Any
    layers: tuple[LayerPlan, ...]
    skipped: tuple[SkippedLayer, ...]
    total_steps: int | None = None


def _check_total_steps(total_steps: Any) -> None:
    if total_steps is not None and (
        isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
    ):
        raise ConfigError(f"total_steps={total_steps!r} must be a positive integer.")


def _check_registered(config: DSTConfig, registry: Registry) -> None:
    """Every component must save by name: fail now, not at the first state_dict()."""
    try:
        config.to_dict(registry)
    except UnknownComponentError as exc:
        raise ConfigError(
            f"{exc} (DSTScheduler checks this at construction: checkpoints name every "
            f"component by its registered name, so an unregistered instance would train and "
            f"then fail at the first state_dict().)"
        ) from exc


def _check_rules(config: DSTConfig, chosen: Sequence[tuple[LayerSpec, nn.Module]]) -> None:
    names = [spec.fqn for spec, _ in chosen]
    for rule in config.rules:
        if not any(rule.matches(spec.fqn, spec.layer_type) for spec, _ in chosen):
            raise ConfigError(
                f"LayerRule({rule.match!r}) matches no selected layer, so it would be "
                f"ignored; match is a class name ('Linear', 'Conv1d', 'Conv2d') or an "
                f"fnmatch pattern on these layer names: {names}."
            )


def _for_layer(structure: Any, spec: LayerSpec, output: bool) -> Any:
    """A structure may treat the model's output layer apart (neuron ablation spares it)."""
    fn = getattr(structure, "for_layer", None)
    return fn(spec, output=output) if callable(fn) else structure


def _structures_by_layer(
    config: DSTConfig,
    default: Any,
    chosen: Sequence[tuple[LayerSpec, nn.Module]],
    output: str | None = None,
) -> tuple[list[tuple[LayerSpec, nn.Module, Any]], list[SkippedLayer]]:
    """Each layer's composed structure (first matching rule, else ``default``), as the
    structure adapts it to its layer (``output``: the model's output layer)."""
    sparse, dense = [], []
    for spec, module in chosen:
        rule = next((r for r in config.rules if r.matches(spec.fqn, spec.layer_type)), None)
        if rule is not None and rule.dense:
            dense.append(
                SkippedLayer(
                    spec.fqn,
                    f"dense by LayerRule({rule.match!r})",
                    layer_type=spec.layer_type,
                    shape=spec.shape,
                    requested=True,
                )
            )
            continue
        structure = default if rule is None else compose_structures(rule.structures)
        sparse.append((spec, module, _for_layer(structure, spec, spec.fqn == output)))
    if not sparse:
        raise ConfigError(
            f"every selected layer ({[spec.fqn for spec, _ in chosen]}) is kept dense by "
            f"DSTConfig.rules; nothing is left to sparsify."
        )
    return sparse, dense


def _budgets(
    config: DSTConfig, layers: Sequence[tuple[LayerSpec, Any]]
) -> dict[str, tuple[int, float]]:
    """Exact integer budgets from the distribution's densities, checked per layer."""
    specs = [spec for spec, _ in layers]
    fixed = {}
    for spec, structure in layers:
        pinned = fixed_density(structure, spec)
        if pinned is not None:
            fixed[spec.fqn] = float(pinned)
    distribution = config.distribution
    name = type(distribution).__name__
    if fixed:
        densities = dict(distribution.densities(specs, config.density, fixed=fixed))
    else:
        densities = dict(distribution.densities(specs, config.density))
    out: dict[str, tuple[int, float]] = {}
    for spec, structure in layers:
        if spec.fqn not in densities:
            raise ConfigError(f"distribution {name} gave no density for layer {spec.fqn!r}.")
        d = densities[spec.fqn]
        if not (0.0 < d <= 1.0) or math.isnan(d):
            raise ConfigError(
                f"distribution {name} gave layer {spec.fqn!r} density {d!r}, outside (0, 1]; a "
                f"distribution must return densities in (0, 1] (1.0 keeps every weight: k = "
                f"fan-in under constant_fan_in, never more)."
            )
        out[spec.fqn] = (int(structure.budget(spec, d)), float(d))
    if config.budget_rounding == "global":
        # A layer that rounds to nothing alone gets one step (k = 1 under constant fan-in)
        # from the others, as long as they can give it.
        _round_globally(layers, densities, out)
    for spec, _ in layers:
        budget, d = out[spec.fqn]
        if budget < 1:
            raise LayerError(
                f"layer {spec.fqn!r} (shape {spec.shape}, {spec.numel} weights) gets density "
                f"{d:.3g}, which leaves it no weight at all. Raise the density, keep it dense "
                f"through the distribution (dense=[{spec.fqn!r}]) or exclude it "
                f"(exclude=[{spec.fqn!r}])."
            )
    return out


def _round_globally(
    layers: Sequence[tuple[LayerSpec, Any]],
    densities: Mapping[str, float],
    out: dict[str, tuple[int, float]],
) -> None:
    """Move budgets by whole steps (one input per neuron under constant fan-in, one weight
    when unstructured) so their sum meets the density over the layers that take part, never
    above it: each layer by up to two of its steps, or one step of the widest layer if that is
    more (a narrow head can then make up what the wide layers' steps cannot hit)."""
    steps = {spec.fqn: budget_step(structure, spec) for spec, structure in layers}
    reach = max((s for s in steps.values() if s is not None), default=1)
    items, names = [], []
    for spec, structure in layers:
        step = steps[spec.fqn]
        if step is None:
            continue
        budget = out[spec.fqn][0]
        ideal = densities[spec.fqn] * spec.numel
        most = int(structure.budget(spec, 1.0))
        if step == 1:
            items.append(Item(budget, 1, ideal=ideal, low=1, high=most))
        else:
            n = span(step, reach)
            deltas = tuple(d for d in range(-n, n + 1) if step <= budget + d * step <= most)
            items.append(Item(budget, step, deltas, ideal))
        names.append(spec.fqn)
    if not items:
        return
    target = math.floor(sum(item.ideal for item in items) + 1e-6)
    for fqn, budget in zip(names, apportion(items, target), strict=True):
        out[fqn] = (budget, out[fqn][1])


def plan_layers(
    model: nn.Module,
    config: DSTConfig,
    *,
    total_steps: int | None = None,
    registry: Registry | None = None,
) -> Plan:
    """The sparse layers of ``model`` under ``config``, with structures and exact budgets.

    Every check that needs no optimizer happens here, before anything is built: the config's
    components are registered in ``registry`` (default: the process-wide one), ``t_end`` fits
    ``total_steps``, patterns and rules match layers, structures accept their layers, and each
    layer gets at least one weight. The model is not changed.
    """
    if not isinstance(config, DSTConfig):
        raise ConfigError(f"DSTScheduler needs a DSTConfig, got {type(config).__name__}.")
    _check_total_steps(total_steps)
    config = attrs.evolve(config, t_end=config.resolved_t_end(total_steps))
    _check_registered(config, registry or get_registry())
    chosen = select_layers(
        model, layer_types=config.layer_types, include=config.include, exclude=config.exclude
    )
    chosen, frozen = split_frozen(chosen)
    if not chosen:
        raise ConfigError(
            f"every selected layer ({[s.fqn for s in frozen]}) is frozen "
            f"(requires_grad=False), so there is nothing to train sparse; set "
            f"requires_grad=True on the layers to sparsify, or select others with "
            f"include=/exclude=."
        )
    _check_rules(config, chosen)
    default = compose_structures(config.structures)
    sparse, dense = _structures_by_layer(config, default, chosen, output_layer(model))
    for spec, _, structure in sparse:
        structure.validate(spec)
    budgets = _budgets(config, [(spec, structure) for spec, _, structure in sparse])
    unsupported = unsupported_weights(model, include=config.include, exclude=config.exclude)
    return Plan(
        config=config,
        structure=default,
        layers=tuple(
            LayerPlan(spec, module, structure, *budgets[spec.fqn])
            for spec, module, structure in sparse
        ),
        skipped=(*frozen, *dense, *unsupported),
        total_steps=total_steps,
    )


def layer_shapes(plan: Plan) -> Mapping[str, tuple[int, ...]]:
    """``{fqn: weight shape}`` of the plan's sparse layers (what a checkpoint must match)."""
    return {layer.spec.fqn: layer.spec.shape for layer in plan.layers}


def capacities(plan: Plan) -> dict[str, int]:
    """The most weights each layer of ``plan`` can ever hold (a compact layer's capacity).

    A budget is its own (per-layer rounding, or a structure without a ``budget_step``) unless
    the global apportionment moves it; then it stays within
    :func:`~sparsity_core.budgets.ceiling` of its planned share, and never past the layer.
    """
    steps = {p.spec.fqn: budget_step(p.structure, p.spec) for p in plan.layers}
    reach = max((s for s in steps.values() if s is not None), default=1)
    out = {}
    for p in plan.layers:
        step = steps[p.spec.fqn]
        if plan.config.budget_rounding != "global" or step is None:
            out[p.spec.fqn] = p.budget
        else:
            out[p.spec.fqn] = min(p.spec.numel, ceiling(p.budget, step, reach))
    return out
