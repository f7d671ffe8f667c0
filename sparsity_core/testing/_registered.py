"""What the kit needs from the registry: component names, kinds and plugin strategies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from .. import registry as _registry
from ..config import DSTConfig
from ..protocols import (
    Distribution,
    DropSchedule,
    OptimizerStatePolicy,
    Reinitializer,
    StructureConstraint,
)
from ..registry import ComponentEntry, ComponentType
from ..structures import COARSE, level_of

__all__ = [
    "COMPONENT_KINDS",
    "component_kind",
    "entry_of",
    "plugin_strategy",
    "registry",
]

# The kinds the kit checks, each with the registry types a component of that kind may have.
COMPONENT_KINDS: dict[str, tuple[ComponentType, ...]] = {
    "criterion": (ComponentType.PRUNE, ComponentType.GROWTH),
    "structure": (ComponentType.STRUCTURE,),
    "distribution": (ComponentType.DISTRIBUTION,),
    "schedule": (ComponentType.SCHEDULE,),
    "format": (ComponentType.FORMAT,),
    "reinit": (ComponentType.REINIT,),
    "optimizer_state": (ComponentType.OPTIMIZER_STATE,),
    "method": (),
    "preset": (ComponentType.PRESET,),
}


def registry() -> _registry.Registry:
    """The process-wide registry (looked up at call time, so tests may swap it)."""
    return _registry.get_registry()


def is_coarse(component: Any) -> bool:
    """A neuron-level structure: it wraps a weight-level one instead of selecting itself."""
    return level_of(component) == COARSE and callable(getattr(component, "wrap", None))


def component_kind(component: Any) -> str:
    """Which checks apply: ``criterion``, ``structure``, ..., ``method`` or ``preset``."""
    if isinstance(component, type):
        raise TypeError(
            f"the testing kit checks component instances, not the class {component.__name__}: "
            f"pass {component.__name__}() (instantiated, with the hyper-parameters to check)."
        )
    if isinstance(component, DSTConfig):
        return "method"
    if all(callable(getattr(component, n, None)) for n in ("pack", "unpack", "linear")):
        return "format"
    if is_coarse(component) or isinstance(component, StructureConstraint):
        return "structure"
    if isinstance(component, Distribution):
        return "distribution"
    if isinstance(component, DropSchedule):
        return "schedule"
    if callable(getattr(component, "scores", None)):
        return "criterion"
    if isinstance(component, Reinitializer):
        return "reinit"
    if isinstance(component, OptimizerStatePolicy):
        return "optimizer_state"
    if callable(component) and not isinstance(component, type):
        return "preset"
    raise TypeError(
        f"the testing kit cannot check {component!r}: pass a component instance (a prune or "
        f"growth criterion, structure, distribution, drop schedule, re-initialisation, "
        f"optimizer-state policy or storage format), a "
        f"DSTConfig, or a preset function returning one. A class must be instantiated first."
    )


def entry_of(component: Any) -> ComponentEntry | None:
    """The registry entry whose class (or preset function) ``component`` is, if any."""
    types = COMPONENT_KINDS[component_kind(component)]
    for ctype in types:
        for entry in registry().entries(ctype):
            if entry.component is component or type(component) is entry.component:
                return entry
    return None


def plugin_strategy(name: str) -> Callable[[Any], Any] | None:
    """The strategy factory a plugin registered under ``name``, if any.

    Names follow two conventions (see the ``sparsity_register_strategies`` hook):
    ``"<type>.<component name>"`` (e.g. ``"growth.explore"``) maps the component's class to a
    strategy of instances; ``"specs.<structure name>"`` maps a structure to a strategy of layer
    specs it accepts.
    """
    reg = registry()
    if name in reg.names(ComponentType.STRATEGY):
        return reg.get(ComponentType.STRATEGY, name)
    return None


def non_default_fields(component: Any) -> dict[str, Any]:
    """The attrs fields of ``component`` that differ from their defaults (for readable ids)."""
    if not attrs.has(type(component)):
        return {}
    out = {}
    for field in attrs.fields(type(component)):
        if not field.init:
            continue
        value = getattr(component, field.name)
        default = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory(component) if default.takes_self else default.factory()
        if default is attrs.NOTHING or value != default:
            out[field.name] = value
    return out
