"""Hypothesis strategies for sparsity-core values: layers, tensors, contexts, components, runs.

Every factory takes keyword-only options that accept a plain value or a strategy, validates
them eagerly, and keeps sizes small. :func:`scores`, :func:`weights`, :func:`masks` and
:func:`score_contexts` draw the values of a tensor of up to 256 elements through hypothesis, so
a failing example shrinks to a small tensor of simple values (zeros and one 1.0, the first
positions of a mask); larger tensors, and :func:`structured_masks`, are built from a drawn seed
through a ``torch.Generator`` (their shape and seed shrink, their values stay random). None
touches the global RNG.

A plugin contributes strategies for its own components through the
``sparsity_register_strategies`` hook: ``"<type>.<name>"`` (component instances, used by
:func:`components` and :func:`method_configs`) and ``"specs.<structure name>"`` (layer specs,
used by :func:`structured_specs`).
"""

from ._component_strategies import components, method_configs, runs, structure_tuples
from ._structure_strategies import structure_densities, structured_masks, structured_specs
from ._tensor_strategies import (
    densities,
    fractions,
    layer_lists,
    layer_specs,
    masks,
    score_contexts,
    scores,
    seeds,
    weights,
)

__all__ = [
    "components",
    "densities",
    "fractions",
    "layer_lists",
    "layer_specs",
    "masks",
    "method_configs",
    "runs",
    "score_contexts",
    "scores",
    "seeds",
    "structure_densities",
    "structure_tuples",
    "structured_masks",
    "structured_specs",
    "weights",
]
