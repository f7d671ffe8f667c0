"""Strategies for components and whole runs: registered components, structures, configs, runs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from ..config import DSTConfig, component_from_dict
from ..registry import ComponentType
from ..structures import COARSE, compose_structures, level_of, structure_capabilities
from ._registered import is_coarse, plugin_strategy, registry
from ._structure_strategies import _group_size
from ._tensor_strategies import _strategy, densities
from .models import MODEL_KINDS, OPTIMIZERS, RunSpec

__all__ = ["components", "method_configs", "runs", "structure_tuples"]

_MIN_UNIT = 16


def components(
    ctype: ComponentType | str, name: str | SearchStrategy[str] | None = None
) -> SearchStrategy[Any]:
    """Instances of registered components of type ``ctype`` (all of them, or ``name``).

    A component whose plugin registered a ``"<type>.<name>"`` strategy (e.g.
    ``"growth.explore"``) is drawn from it, so its hyper-parameters vary; any other is built
    with its defaults.
    """
    ctype = ComponentType(ctype)
    names = st.sampled_from(registry().names(ctype)) if name is None else _strategy(name)

    def instances(chosen: str) -> SearchStrategy[Any]:
        cls = registry().get(ctype, chosen)
        factory = plugin_strategy(f"{ctype.value}.{chosen}")
        if factory is not None:
            return factory(cls)
        return st.just(registry().create(ctype, chosen))

    return names.flatmap(instances)


def _registered_tuples() -> list[tuple[Any, ...]]:
    reg = registry()
    fine, coarse = [], []
    for name in reg.names(ComponentType.STRUCTURE):
        structure = reg.create(ComponentType.STRUCTURE, name)
        (coarse if is_coarse(structure) else fine).append(structure)
    out: list[tuple[Any, ...]] = [(s,) for s in fine]
    for c in coarse:
        out += [(c, s) for s in fine if structure_capabilities(s).per_neuron]
    return out


def structure_tuples(*, coarse: bool = True) -> SearchStrategy[tuple[Any, ...]]:
    """Coarse-to-fine structure tuples of registered structures with default parameters.

    Each weight-level structure alone, and (``coarse``) each neuron-level one over each
    weight-level structure that counts per neuron (e.g. ``(neuron_ablation, nm)``).
    """
    tuples = [t for t in _registered_tuples() if coarse or len(t) == 1]
    if not tuples:
        raise ValueError("structure_tuples: no structure is registered.")
    return st.sampled_from(tuples)


def variants(structure: Any) -> list[Any]:
    """The structures to check for ``structure``: itself, or for a neuron-level one, itself
    wrapped around each registered weight-level structure that counts per neuron."""
    if not is_coarse(structure):
        return [structure]
    fine = [t[0] for t in _registered_tuples() if len(t) == 1]
    out = [compose_structures((structure, s)) for s in fine if structure_capabilities(s).per_neuron]
    if not out:
        raise ValueError(
            f"{type(structure).__name__} wraps a weight-level structure that counts per neuron, "
            f"and none is registered."
        )
    return out


def _component(ctype: ComponentType, value: Any) -> SearchStrategy[Any]:
    if value is None or isinstance(value, str):
        return components(ctype, value)
    return _strategy(value)


def method_configs(
    *,
    prune: Any = None,
    grow: Any = None,
    structures: Any = ("unstructured",),
    distribution: Any = None,
    drop: Any = None,
    density: float | SearchStrategy[float] | None = None,
    delta_t: int | SearchStrategy[int] | None = None,
    seed: int | SearchStrategy[int] | None = None,
    t_end: int | SearchStrategy[int | None] | None = None,
) -> SearchStrategy[DSTConfig]:
    """DST configurations drawn from the registry, with small ``delta_t``.

    Each component option takes anything ``DSTConfig`` accepts (a registry name, a
    ``{"kind": ...}`` dict, an instance) or a strategy of those; ``None`` draws any registered
    component. Named and drawn components come from :func:`components`.

    Args:
        density: default ``densities(min_value=0.2)``.
        delta_t: default 2 to 5 steps.
        seed: default any small integer.
        t_end: ``None`` lets the scheduler use 75% of its ``total_steps``.
    """
    density = densities(min_value=0.2) if density is None else density
    delta_t = st.integers(min_value=2, max_value=5) if delta_t is None else delta_t
    seed = st.integers(min_value=0, max_value=2**16) if seed is None else seed
    components_ = (
        (ComponentType.PRUNE, prune),
        (ComponentType.GROWTH, grow),
        (ComponentType.DISTRIBUTION, distribution),
        (ComponentType.SCHEDULE, drop),
    )
    return _method_config(
        *(_component(ctype, value) for ctype, value in components_),
        _strategy(structures),
        *(_strategy(v) for v in (density, delta_t, seed, t_end)),
    )


@st.composite
def _method_config(
    draw: Any,
    prune: Any,
    grow: Any,
    distribution: Any,
    drop: Any,
    structures: Any,
    density: Any,
    delta_t: Any,
    seed: Any,
    t_end: Any,
) -> DSTConfig:
    return DSTConfig(
        prune=draw(prune, label="prune"),
        grow=draw(grow, label="grow"),
        structures=draw(structures, label="structures"),
        distribution=draw(distribution, label="distribution"),
        drop=draw(drop, label="drop"),
        density=draw(density, label="density"),
        delta_t=draw(delta_t, label="delta_t"),
        seed=draw(seed, label="seed"),
        t_end=draw(t_end, label="t_end"),
    )


def fan_in_unit(config: DSTConfig | None) -> int:
    """The smallest multiple of 16 that every N:M structure of ``config`` divides (or of
    their M): the fan-in unit of the kit's models, big enough for densities down to about 0.1
    under constant fan-in."""
    unit = 1
    if config is not None:
        structures: list[Any] = list(config.structures)
        for rule in config.rules:
            structures += list(rule.structures or ())
        for s in structures:
            s = component_from_dict(ComponentType.STRUCTURE, s)
            if level_of(s) != COARSE:
                unit = math.lcm(unit, _group_size(s))
    return unit * math.ceil(_MIN_UNIT / unit)


def runs(
    config: DSTConfig | None = None,
    *,
    kinds: Sequence[str] | SearchStrategy[str] = tuple(MODEL_KINDS),
    optimizers: Sequence[str] | SearchStrategy[str] = tuple(OPTIMIZERS),
    steps: int | SearchStrategy[int] | None = None,
) -> SearchStrategy[RunSpec]:
    """Short training runs whose layers suit ``config``'s structures (fan-ins a multiple of M).

    Args:
        kinds: model kinds from :data:`~sparsity_core.testing.models.MODEL_KINDS`: an MLP, a
            Conv2d + Conv1d + Linear net, and an MLP with an all-zero-gradient and an unused layer.
        optimizers: names from :data:`~sparsity_core.testing.models.OPTIMIZERS`.
        steps: optimizer steps (default 8 to 16).
    """
    for name, value, known in (
        ("kinds", kinds, MODEL_KINDS),
        ("optimizers", optimizers, OPTIMIZERS),
    ):
        if not isinstance(value, SearchStrategy):
            bad = [v for v in value if v not in known]
            if bad or not value:
                raise ValueError(
                    f"runs({name}={list(value)!r}) must be a non-empty subset of {sorted(known)}."
                )
    kinds = kinds if isinstance(kinds, SearchStrategy) else st.sampled_from(tuple(kinds))
    optimizers = (
        optimizers if isinstance(optimizers, SearchStrategy) else st.sampled_from(tuple(optimizers))
    )
    steps = st.integers(min_value=8, max_value=16) if steps is None else steps
    unit = fan_in_unit(config)

    return _run(kinds, optimizers, _strategy(steps), unit)


@st.composite
def _run(draw: Any, kinds: Any, optimizers: Any, steps: Any, unit: int) -> RunSpec:
    return RunSpec.build(
        draw(kinds, label="model"),
        unit,
        unit * draw(st.integers(1, 2), label="width / unit"),
        draw(st.integers(0, 2**16), label="model seed"),
        draw(optimizers, label="optimizer"),
        draw(steps, label="steps"),
    )
