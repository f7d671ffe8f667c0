"""sparsity-explore: an example third-party plugin for sparsity-core."""

from .growth import ExploreGrowth
from .presets import dst_ee
from .prune import RelativeMagnitudePrune

__all__ = ["ExploreGrowth", "RelativeMagnitudePrune", "dst_ee"]
