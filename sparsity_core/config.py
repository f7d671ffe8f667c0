"""The method configuration: a frozen, validated value naming its components by registry name."""

from __future__ import annotations

import difflib
import fnmatch
import numbers
from collections.abc import Mapping
from typing import Any

import attrs

from .errors import ConfigError
from .layers import SUPPORTED_LAYER_TYPES
from .protocols import (
    Distribution,
    DropSchedule,
    GrowthCriterion,
    OptimizerStatePolicy,
    PruneCriterion,
    Reinitializer,
    StructureConstraint,
    capabilities_of,
)
from .registry import ComponentType, Registry, get_registry
from .structures import COARSE, level_of, validate_structure_order

__all__ = ["DSTConfig", "LayerRule", "component_from_dict", "component_to_dict", "preset"]

_PROTOCOLS = {
    ComponentType.PRUNE: PruneCriterion,
    ComponentType.GROWTH: GrowthCriterion,
    ComponentType.STRUCTURE: StructureConstraint,
    ComponentType.DISTRIBUTION: Distribution,
    ComponentType.SCHEDULE: DropSchedule,
    ComponentType.REINIT: Reinitializer,
    ComponentType.OPTIMIZER_STATE: OptimizerStatePolicy,
}


def component_from_dict(
    ctype: ComponentType | str, value: Any, registry: Registry | None = None
) -> Any:
    """A component from a name, a ``{"kind": name, **params}`` dict, or an instance."""
    ctype = ComponentType(ctype)
    if isinstance(value, str):
        return (registry or get_registry()).create(ctype, value)
    if isinstance(value, Mapping):
        params = dict(value)
        if "kind" not in params:
            raise ConfigError(
                f"{ctype.value} given as {value!r} has no 'kind' key; write "
                f'{{"kind": "<registered name>", ...hyper-parameters}}.'
            )
        name = params.pop("kind")
        return (registry or get_registry()).create(ctype, name, **params)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def component_to_dict(
    ctype: ComponentType | str, component: Any, registry: Registry | None = None
) -> dict[str, Any]:
    """``{"kind": registry name, **hyper-parameters}``: JSON-able, never pickled code."""
    name = (registry or get_registry()).name_of(ctype, component)
    if not attrs.has(type(component)):
        raise ConfigError(
            f"{ComponentType(ctype).value} {name!r} ({type(component).__qualname__}) is not an "
            f"attrs class, so its hyper-parameters cannot be saved; decorate it with "
            f"@attrs.frozen."
        )
    return {"kind": name, **_plain(attrs.asdict(component, recurse=False))}


def _converter(ctype: ComponentType):
    return lambda value: component_from_dict(ctype, value)


def _structures(value: Any, registry: Registry | None = None) -> tuple[Any, ...]:
    if isinstance(value, str | Mapping) or not isinstance(value, tuple | list):
        value = (value,)
    return tuple(component_from_dict(ComponentType.STRUCTURE, v, registry) for v in value)


def _is_coarse_structure(value: Any) -> bool:
    return level_of(value) == COARSE and callable(getattr(value, "wrap", None))


def _implements(ctype: ComponentType):
    protocol = _PROTOCOLS[ctype]

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if ctype is ComponentType.STRUCTURE and _is_coarse_structure(v):
                continue
            if not isinstance(v, protocol):
                raise ConfigError(
                    f"DSTConfig.{attribute.name}={v!r} is not a {ctype.value} component (it "
                    f"lacks the methods of {protocol.__name__}); pass a registered name such as "
                    f"{get_registry().names(ctype)[:4]} or an instance."
                )

    return check


def _number(name: str):
    def convert(value: Any) -> float:
        if isinstance(value, bool):
            raise ConfigError(f"DSTConfig.{name}={value!r} is not a number.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"DSTConfig.{name}={value!r} is not a number.") from None

    return convert


def _integer(name: str):
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"DSTConfig.{name}={value!r} must be an integer.")
        return int(value)

    return convert


def _density(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not (0.0 < value <= 1.0):
        raise ConfigError(
            f"DSTConfig.density={value!r} is outside (0, 1]; density is the fraction of weights "
            f"kept (sparsity 0.9 is density 0.1)."
        )


def _positive_int(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"DSTConfig.{attribute.name}={value!r} must be an integer >= 1 (the number of "
            f"optimizer steps between topology updates)."
        )


def _t_end(instance: DSTConfig, attribute: attrs.Attribute, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= instance.t_start:
        raise ConfigError(
            f"DSTConfig.t_end={value!r} must be an integer greater than t_start="
            f"{instance.t_start} (the step after which the topology stops changing)."
        )


def _t_start(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"DSTConfig.t_start={value!r} must be an integer >= 0.")


def _layer_types(instance: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    unknown = [t for t in value if t not in SUPPORTED_LAYER_TYPES]
    if unknown or not value:
        raise ConfigError(
            f"DSTConfig.layer_types={list(value)} must be a non-empty subset of "
            f"{sorted(SUPPORTED_LAYER_TYPES)}."
        )


def _str_tuple(value: Any) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _structure_order(instance: Any, attribute: attrs.Attribute, value: tuple[Any, ...]) -> None:
    try:
        validate_structure_order(value)
    except ConfigError as exc:
        raise ConfigError(f"{type(instance).__name__}.{attribute.name}: {exc}") from None


def _optional_structures(value: Any) -> tuple[Any, ...] | None:
    return None if value is None else _structures(value)


@attrs.frozen
class LayerRule:
    """Per-layer structure: layers matching ``match`` use ``structures`` (or stay dense).

    ``match`` is a module class name (``"Linear"``, ``"Conv1d"``, ``"Conv2d"``) or an fnmatch
    pattern on the layer's fully qualified name (``"blocks.*.attn.*"``). The first matching
    rule wins; unmatched layers use :attr:`DSTConfig.structures`. ``dense=True`` leaves the
    layer dense and outside the sparse budget (to keep a layer dense *inside* the budget, use
    the distribution's ``dense`` patterns).
    """

    match: str = attrs.field()
    structures: tuple[Any, ...] | None = attrs.field(default=None, converter=_optional_structures)
    dense: bool = attrs.field(default=False)

    @match.validator
    def _match(self, attribute: attrs.Attribute, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"LayerRule.match={value!r} must be a non-empty string.")

    @structures.validator
    def _check(self, attribute: attrs.Attribute, value: tuple[Any, ...] | None) -> None:
        if (value is None) == (not self.dense):
            raise ConfigError(
                f"LayerRule(match={self.match!r}) needs exactly one of structures=... or "
                f"dense=True."
            )
        if value is not None:
            _implements(ComponentType.STRUCTURE)(self, attribute, value)
            _structure_order(self, attribute, value)

    def matches(self, fqn: str, layer_type: str) -> bool:
        return self.match == layer_type or fnmatch.fnmatchcase(fqn, self.match)

    def to_dict(self, registry: Registry | None = None) -> dict[str, Any]:
        structures = None
        if self.structures is not None:
            structures = [
                component_to_dict(ComponentType.STRUCTURE, s, registry) for s in self.structures
            ]
        return {"match": self.match, "structures": structures, "dense": self.dense}


def _rules_seq(value: Any) -> tuple[Any, ...]:
    return (value,) if isinstance(value, LayerRule | Mapping) else tuple(value)


def _resolved_rule(rule: Any, registry: Registry) -> Any:
    if isinstance(rule, Mapping) and rule.get("structures") is not None:
        return {**rule, "structures": _structures(rule["structures"], registry)}
    return rule


def _rules(value: Any) -> tuple[LayerRule, ...]:
    return tuple(v if isinstance(v, LayerRule) else LayerRule(**v) for v in _rules_seq(value))


BUDGET_ROUNDINGS = ("global", "per_layer")


def _no_gradient_at_init(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    caps = capabilities_of(value)
    if caps.needs_grad or caps.needs_optimizer_state or caps.grad_momentum is not None:
        raise ConfigError(
            f"DSTConfig.init_mask={value!r} reads gradients or optimizer state, which do not "
            f"exist before training; use a criterion of the weights alone ('magnitude') or "
            f"'random'."
        )


def _budget_rounding(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value not in BUDGET_ROUNDINGS:
        raise ConfigError(
            f"DSTConfig.budget_rounding={value!r} is not one of {list(BUDGET_ROUNDINGS)}: "
            f"'global' rounds all layer budgets together to meet the density, 'per_layer' "
            f"rounds each layer alone."
        )


@attrs.frozen
class DSTConfig:
    """A complete DST method: components, density and timing.

    Components may be given as registered names (``grow="gradient"``), as
    ``{"kind": name, **params}`` dicts, or as instances. Change one with ``attrs.evolve``.

    Attributes:
        prune: scores active weights (higher is kept), e.g. ``magnitude``.
        grow: scores inactive weights (higher is grown), e.g. ``gradient`` (RigL), ``random`` (SET).
        structures: constraints applied coarse to fine, e.g. ``("unstructured",)`` or SRigL's
            ``("neuron_ablation", "constant_fan_in")``.
        distribution: spreads ``density`` over layers, e.g. ``erk``.
        drop: the drop-fraction schedule, e.g. ``cosine``.
        density: global fraction of weights kept over the selected layers, in (0, 1].
        delta_t: optimizer steps between topology updates (ΔT).
        t_end: the last step at which the topology may change (updates happen at multiples of
            ``delta_t`` strictly between ``t_start`` and ``t_end``). ``None``: 75% of the
            ``total_steps`` given to the scheduler, as in RigL.
        t_start: no update at or before this step.
        seed: seeds every random choice (initial masks, random scores) per (layer, step).
        layer_types: module classes to sparsify.
        include: fnmatch patterns of layer names to sparsify (empty: all of ``layer_types``).
        exclude: fnmatch patterns of layer names to leave dense and out of the budget.
        rules: per-layer structures (:class:`LayerRule`), first match wins.
        budget_rounding: ``"global"`` (default): layer budgets are rounded together so the
            selected layers hold ``density`` of their weights (within the steps constant
            fan-in allows), and what neuron ablation leaves unused in one layer moves to
            others; ``"per_layer"``: each layer rounds alone and keeps its own budget (the rule
            before schema 2, used to resume older checkpoints).
        init_mask: a prune criterion that scores the dense initial weights; the initial mask
            keeps the highest scores the structure allows. ``random`` (default): uniformly
            random; ``magnitude``: the largest initial magnitudes.
        reinit: re-initialises the weights once the initial mask is drawn, e.g.
            ``sparse_fan_in`` (rescale for each neuron's sparse fan-in); ``none`` (default).
        optimizer_state: the optimizer state of grown weights beyond the zeroed moments:
            ``reset`` (default: nothing more) or ``adam_fresh_step`` (Adam/AdamW: each grown
            weight's bias correction counts from its growth, as a fresh Adam's would).
    """

    prune: Any = attrs.field(
        default="magnitude",
        converter=_converter(ComponentType.PRUNE),
        validator=_implements(ComponentType.PRUNE),
    )
    grow: Any = attrs.field(
        default="gradient",
        converter=_converter(ComponentType.GROWTH),
        validator=_implements(ComponentType.GROWTH),
    )
    structures: tuple[Any, ...] = attrs.field(
        default=("unstructured",),
        converter=_structures,
        validator=[_implements(ComponentType.STRUCTURE), _structure_order],
    )
    distribution: Any = attrs.field(
        default="erk",
        converter=_converter(ComponentType.DISTRIBUTION),
        validator=_implements(ComponentType.DISTRIBUTION),
    )
    drop: Any = attrs.field(
        default="cosine",
        converter=_converter(ComponentType.SCHEDULE),
        validator=_implements(ComponentType.SCHEDULE),
    )
    density: float = attrs.field(default=0.1, converter=_number("density"), validator=_density)
    delta_t: int = attrs.field(default=100, validator=_positive_int)
    t_start: int = attrs.field(default=0, validator=_t_start)
    t_end: int | None = attrs.field(default=None, validator=_t_end)
    seed: int = attrs.field(default=0, converter=_integer("seed"))
    layer_types: tuple[str, ...] = attrs.field(
        default=("Linear", "Conv1d", "Conv2d"), converter=_str_tuple, validator=_layer_types
    )
    include: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    exclude: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    rules: tuple[LayerRule, ...] = attrs.field(default=(), converter=_rules)
    budget_rounding: str = attrs.field(default="global", validator=_budget_rounding)
    init_mask: Any = attrs.field(
        default="random",
        converter=_converter(ComponentType.PRUNE),
        validator=[_implements(ComponentType.PRUNE), _no_gradient_at_init],
    )
    reinit: Any = attrs.field(
        default="none",
        converter=_converter(ComponentType.REINIT),
        validator=_implements(ComponentType.REINIT),
    )
    optimizer_state: Any = attrs.field(
        default="reset",
        converter=_converter(ComponentType.OPTIMIZER_STATE),
        validator=_implements(ComponentType.OPTIMIZER_STATE),
    )

    def to_dict(self, registry: Registry | None = None) -> dict[str, Any]:
        """A JSON-able dict naming every component by its registry name."""
        out: dict[str, Any] = {}
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            ctype = _FIELD_TYPES.get(field.name)
            if field.name == "rules":
                out[field.name] = [rule.to_dict(registry) for rule in value]
            elif ctype is ComponentType.STRUCTURE:
                out[field.name] = [component_to_dict(ctype, v, registry) for v in value]
            elif ctype is not None:
                out[field.name] = component_to_dict(ctype, value, registry)
            else:
                out[field.name] = _plain(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], registry: Registry | None = None) -> DSTConfig:
        """Inverse of :meth:`to_dict` (unknown keys are an error, not ignored).

        Component names are resolved in ``registry`` (default: the process-wide one).
        """
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"DSTConfig.from_dict got unknown keys {unknown}; known keys: {sorted(known)}."
            )
        data = dict(data)
        if registry is not None:
            for name, ctype in _FIELD_TYPES.items():
                if name not in data:
                    continue
                if ctype is ComponentType.STRUCTURE:
                    data[name] = _structures(data[name], registry)
                else:
                    data[name] = component_from_dict(ctype, data[name], registry)
            if "rules" in data:
                data["rules"] = [
                    _resolved_rule(rule, registry) for rule in _rules_seq(data["rules"])
                ]
        return cls(**data)

    def resolved_t_end(self, total_steps: int | None) -> int:
        """``t_end``, or 75% of ``total_steps`` when it is None."""
        if self.t_end is not None:
            if total_steps is not None and self.t_end > total_steps:
                raise ConfigError(
                    f"DSTConfig.t_end={self.t_end} is beyond the run's total_steps={total_steps}; "
                    f"set t_end <= {total_steps} (RigL uses 75% of training)."
                )
            return self.t_end
        if total_steps is None:
            raise ConfigError(
                "DSTConfig.t_end is None and the scheduler got no total_steps: pass "
                "total_steps=<optimizer steps in the run> to DSTScheduler, or set t_end."
            )
        t_end = int(0.75 * total_steps)
        if t_end <= self.t_start:
            raise ConfigError(
                f"75% of total_steps={total_steps} is {t_end}, not after t_start={self.t_start}; "
                f"train longer or set t_end explicitly."
            )
        return t_end


_FIELD_TYPES = {
    "prune": ComponentType.PRUNE,
    "grow": ComponentType.GROWTH,
    "structures": ComponentType.STRUCTURE,
    "distribution": ComponentType.DISTRIBUTION,
    "drop": ComponentType.SCHEDULE,
    "init_mask": ComponentType.PRUNE,
    "reinit": ComponentType.REINIT,
    "optimizer_state": ComponentType.OPTIMIZER_STATE,
}


def preset(name: str, *, registry: Registry | None = None, **overrides: Any) -> DSTConfig:
    """The registered method preset ``name`` (e.g. ``rigl``, ``set``, ``static``) with overrides.

    ``name`` is looked up in ``registry`` (default: the process-wide one).
    """
    factory = (registry or get_registry()).get(ComponentType.PRESET, name)
    try:
        config = factory(**overrides)
    except TypeError as exc:
        fields = sorted(f.name for f in attrs.fields(DSTConfig))
        unknown = sorted(set(overrides) - set(fields))
        if not unknown:
            raise
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, fields, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"preset {name!r} got unknown override {', '.join(hints)}; overrides are "
            f"DSTConfig fields: {fields}."
        ) from exc
    if not isinstance(config, DSTConfig):
        raise ConfigError(f"preset {name!r} returned {type(config).__name__}, not a DSTConfig.")
    return config
