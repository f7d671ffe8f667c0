"""The hook implementations sparsity-core finds through this package's entry point."""

from __future__ import annotations

from typing import Any

from sparsity_core import hookimpl

from .growth import ExploreGrowth
from .presets import dst_ee
from .prune import RelativeMagnitudePrune
from .structures import FloorFanIn


@hookimpl
def sparsity_register_growth_criteria(register) -> None:
    register("explore", ExploreGrowth, summary="|grad| + exploration bonus for unseen weights")


@hookimpl
def sparsity_register_prune_criteria(register) -> None:
    register("relative_magnitude", RelativeMagnitudePrune, summary="|w| / its neuron's norm")


@hookimpl
def sparsity_register_structures(register) -> None:
    register("floor_fan_in", FloorFanIn, summary="constant fan-in with k >= min_k per neuron")


@hookimpl
def sparsity_register_presets(register) -> None:
    register("dst_ee", dst_ee, summary="relative_magnitude + explore (after DST-EE)")


def _explore_instances(cls: type) -> Any:
    from hypothesis import strategies as st  # only the testing kit calls this

    return st.builds(cls, c=st.floats(min_value=0.0, max_value=4.0))


@hookimpl
def sparsity_register_strategies(register) -> None:
    register("growth.explore", _explore_instances, summary="explore with c in [0, 4]")
