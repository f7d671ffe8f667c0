"""sparsity-explore: an example third-party plugin for sparsity-core."""

from .growth import ExploreGrowth
from .presets import dst_ee
from .prune import RelativeMagnitudePrune
from .structures import FloorFanIn

__all__ = ["ExploreGrowth", "FloorFanIn", "RelativeMagnitudePrune", "dst_ee"]
