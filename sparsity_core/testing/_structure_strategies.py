"""Strategies for structures: layer specs a structure accepts, masks that satisfy it, densities.

See :mod:`sparsity_core.testing.strategies` for the conventions shared by every factory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from ..layers import LayerSpec
from ..structures import active_rows_of, fixed_density
from ._registered import entry_of, plugin_strategy
from ._tensor_strategies import _generator, _layer_types, _positive, _strategy, densities, seeds

__all__ = ["structure_densities", "structured_masks", "structured_specs"]


def _group_size(structure: Any) -> int:
    """The M a layer's fan-in must be a multiple of: ``structure.m`` (N:M), else 1.

    A composed structure (one that wraps another as ``inner``) takes its inner structure's.
    """
    while structure is not None:
        m = getattr(structure, "m", None)
        if isinstance(m, int) and not isinstance(m, bool):
            return m
        structure = getattr(structure, "inner", None)
    return 1


def _pads(structure: Any) -> bool:
    """Whether ``structure`` (or one it wraps) pads fan-ins M does not divide (``pad=True``)."""
    while structure is not None:
        if getattr(structure, "pad", None) is True:
            return True
        structure = getattr(structure, "inner", None)
    return False


def _registered_specs(structure: Any) -> SearchStrategy[LayerSpec] | None:
    """The ``specs.<name>`` strategy a plugin registered for ``structure`` (or what it wraps)."""
    while structure is not None:
        entry = entry_of(structure)
        if entry is not None:
            factory = plugin_strategy(f"specs.{entry.name}")
            if factory is not None:
                return factory(structure)
        structure = getattr(structure, "inner", None)
    return None


def structured_specs(
    structure: Any,
    *,
    layer_types: Sequence[str] | str | SearchStrategy[str] = ("Linear", "Conv2d"),
    max_side: int | SearchStrategy[int] = 8,
    max_groups: int | SearchStrategy[int] = 3,
    fqn: str | SearchStrategy[str] = "layer",
) -> SearchStrategy[LayerSpec]:
    """Layer specs whose fan-in suits ``structure``: a multiple of M for N:M (often any fan-in
    for N:M with ``pad=True``), anything else.

    A plugin whose structure needs other shapes registers a ``"specs.<structure name>"``
    strategy (see the ``sparsity_register_strategies`` hook); it is used instead.

    For a convolution the fan-in is ``C_in * kh * kw``: the kernel is drawn first (sides up to
    3), then ``C_in`` is a multiple of ``M / gcd(M, kh * kw)``, so some groups of M span input
    channels.

    Args:
        structure: a structure (fine or composed) or a strategy of them.
        layer_types: a layer type, a sequence to choose from, or a strategy of names.
        max_side: the largest output count, and the largest ``C_in`` without structure.
        max_groups: under N:M, the largest number of M-groups in a row is about this (the
            fan-in stays at most ``max_groups * M``).
        fqn: the layer name.
    """
    layer_types = _layer_types("structured_specs", layer_types)
    _positive("structured_specs", max_side=max_side, max_groups=max_groups)

    return _structured_spec(
        _strategy(structure),
        layer_types,
        _strategy(max_side),
        _strategy(max_groups),
        _strategy(fqn),
    )


def structured_masks(
    structure: Any,
    spec: LayerSpec | SearchStrategy[LayerSpec],
    *,
    budget: int | SearchStrategy[int] | None = None,
    ablate: bool | SearchStrategy[bool] = False,
) -> SearchStrategy[torch.Tensor]:
    """Masks that satisfy ``structure``: ``structure.fill`` of an empty mask on random scores.

    Args:
        structure: a structure (fine or composed) or a strategy of them.
        spec: the layer (its fan-in must suit the structure, see :func:`structured_specs`).
        budget: the layer budget; ``None`` draws one from ``structure.budget`` at a density
            that leaves every neuron at least one input (the structure's fixed density, e.g.
            N/M, or now and then 1).
        ablate: for a composed structure with neuron ablation (one with ``inner``), switch off
            a random set of neurons (never below ``min_active_rows``) and fill the survivors
            with the inner structure, as after an update that ablated them.
    """
    if isinstance(budget, bool) or not (budget is None or isinstance(budget, int | SearchStrategy)):
        raise ValueError(f"structured_masks(budget={budget!r}) must be an int, a strategy or None.")

    return _structured_mask(
        _strategy(structure),
        _strategy(spec),
        None if budget is None else _strategy(budget),
        _strategy(ablate),
    )


def structure_densities(structure: Any, spec: LayerSpec) -> SearchStrategy[float]:
    """Densities ``structure`` accepts on ``spec``: its fixed density (N:M) or 1, else any
    density leaving every neuron at least one input."""
    fixed = fixed_density(structure, spec)
    if fixed is not None:
        return st.sampled_from([float(fixed)] * 3 + [1.0])
    return densities(min_value=min(1.0, 1.0 / spec.fan_in))


@st.composite
def _structured_spec(
    draw: Any, structure: Any, layer_types: Any, max_side: Any, max_groups: Any, fqn: Any
) -> LayerSpec:
    chosen = draw(_strategy(structure))
    registered = _registered_specs(chosen)
    if registered is not None:
        return attrs.evolve(draw(registered), fqn=draw(_strategy(fqn)))
    layer_type = draw(layer_types)
    # A padding N:M accepts any fan-in: draw those M does not divide too.
    m = 1 if _pads(chosen) and draw(st.booleans()) else _group_size(chosen)
    side = draw(_strategy(max_side))
    out = draw(st.integers(min_value=1, max_value=side))
    kernel = (1, 1)
    if layer_type == "Conv2d":
        kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    elif layer_type == "Conv1d":
        kernel = (draw(st.integers(1, 3)),)
    spatial = math.prod(kernel)
    step = m // math.gcd(m, spatial)
    if m == 1:
        c_in = draw(st.integers(min_value=1, max_value=side))
    else:
        most = max(1, draw(_strategy(max_groups)) * m // (step * spatial))
        c_in = step * draw(st.integers(min_value=1, max_value=most))
    shape = (out, c_in) if layer_type == "Linear" else (out, c_in, *kernel)
    return LayerSpec(draw(_strategy(fqn)), shape, layer_type)


@st.composite
def _structured_mask(
    draw: Any, structure: Any, spec: Any, budget: Any, ablate: Any
) -> torch.Tensor:
    chosen = draw(_strategy(structure))
    layer = draw(_strategy(spec))
    if budget is None:
        count = chosen.budget(layer, draw(structure_densities(chosen, layer)))
    else:
        count = draw(_strategy(budget))
    if not 0 <= count <= layer.numel:
        raise ValueError(
            f"structured_masks: budget {count} is outside [0, {layer.numel}] for layer "
            f"{layer.fqn!r} of shape {layer.shape}."
        )
    gen = _generator(draw(seeds()))
    values = torch.rand(layer.shape, generator=gen)
    empty = torch.zeros(layer.shape, dtype=torch.bool)
    inner = getattr(chosen, "inner", None)
    if inner is not None and draw(_strategy(ablate)):
        fewest = max(1, int(chosen.min_active_rows(layer, count)))
        alive = draw(st.integers(min_value=min(fewest, layer.fan_out), max_value=layer.fan_out))
        order = torch.randperm(layer.fan_out, generator=gen)
        rows = torch.zeros(layer.fan_out, dtype=torch.bool)
        rows[order[:alive]] = True
        out = inner.fill(values, empty, ~empty, count, layer, active_rows=rows)
        if not torch.equal(active_rows_of(out), rows):
            raise ValueError(
                f"structured_masks: budget {count} leaves some of the {alive} active neurons "
                f"of layer {layer.fqn!r} empty; draw a larger budget."
            )
        return out
    return chosen.fill(values, empty, ~empty, count, layer)
