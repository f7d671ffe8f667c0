"""``GroupedStructure``: the base every built-in structure shares.

A structure is a view of the weight as ``[groups, group_size]`` in which group ``g`` keeps
exactly ``counts[g]`` active positions: one group (unstructured), groups of M consecutive
inputs (N:M), or rows (constant fan-in). The drop and the grow are then the same two grouped
top-k calls for every structure, so a new structure only says how it groups and counts.
"""

from __future__ import annotations

import math

import torch

from .layers import LayerSpec
from .selection import grouped_fill, grouped_keep

__all__ = ["GroupedStructure"]


class GroupedStructure:
    """Base class: subclasses define ``group_shape``, ``group_counts`` and ``budget``."""

    def group_shape(self, spec: LayerSpec) -> tuple[int, int]:
        """``(groups, group_size)``; ``weight.reshape(groups, group_size)`` is the grouped view."""
        raise NotImplementedError

    def group_counts(self, spec: LayerSpec, budget: int, device: torch.device) -> torch.Tensor:
        """How many active positions each group holds when the layer holds ``budget``."""
        raise NotImplementedError

    def budget(self, spec: LayerSpec, density: float) -> int:
        raise NotImplementedError

    def validate(self, spec: LayerSpec) -> None:
        """Layers of any shape are accepted unless a subclass says otherwise."""

    def keep(
        self, scores: torch.Tensor, mask: torch.Tensor, fraction: float, spec: LayerSpec
    ) -> torch.Tensor:
        groups, size = self.group_shape(spec)
        m2 = mask.reshape(groups, size)
        active = int(mask.sum())
        n_drop = math.floor(fraction * active)
        if groups == 1:
            # Never drop more than can be regrown from positions inactive before the update.
            kept = grouped_keep(scores.reshape(1, size), m2, min(n_drop, size - active))
        else:
            kept = grouped_keep(scores.reshape(groups, size), m2, n_drop, size - m2.sum(dim=1))
        return kept.reshape(mask.shape)

    def fill(
        self,
        scores: torch.Tensor,
        base: torch.Tensor,
        candidates: torch.Tensor,
        budget: int,
        spec: LayerSpec,
    ) -> torch.Tensor:
        groups, size = self.group_shape(spec)
        counts = self.group_counts(spec, budget, base.device)
        filled = grouped_fill(
            scores.reshape(groups, size),
            base.reshape(groups, size),
            candidates.reshape(groups, size),
            counts,
        )
        return filled.reshape(base.shape)

    def satisfied(self, mask: torch.Tensor, spec: LayerSpec, budget: int) -> bool:
        if mask.dtype != torch.bool or tuple(mask.shape) != spec.shape:
            return False
        groups, size = self.group_shape(spec)
        counts = self.group_counts(spec, budget, mask.device)
        return int(mask.sum()) == budget and bool(
            torch.equal(mask.reshape(groups, size).sum(dim=1), counts)
        )
