"""Per-layer, per-update records, and the summaries computed from them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import torch

from .selection import row_counts

__all__ = ["LayerSummary", "UpdateRecord", "active_neurons", "itop_rate"]


@attrs.frozen
class UpdateRecord:
    """What one topology update did to one layer."""

    fqn: str
    step: int
    fraction: float
    dropped: int
    grown: int
    active: int
    numel: int
    active_neurons: int
    fan_out: int
    ever_active: int

    @property
    def density(self) -> float:
        return self.active / self.numel

    @property
    def itop(self) -> float:
        """In-time over-parameterisation rate: fraction of weights active at any time so far."""
        return self.ever_active / self.numel

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class LayerSummary:
    """A sparse layer's state now (for tables and logs)."""

    fqn: str
    shape: tuple[int, ...]
    budget: int
    active: int
    numel: int
    active_neurons: int
    fan_out: int
    ever_active: int
    structure: str = ""
    fan_in_min: int = 0
    fan_in_max: int = 0
    satisfied: bool = True
    target_density: float | None = None

    @property
    def density(self) -> float:
        """Achieved density, counted from the mask."""
        return self.active / self.numel

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def itop(self) -> float:
        return self.ever_active / self.numel


def active_neurons(mask: torch.Tensor) -> int:
    """Output neurons (rows / output channels) with at least one active weight."""
    return int((row_counts(mask.reshape(mask.shape[0], -1)) > 0).sum())


def itop_rate(summaries: Iterable[LayerSummary | UpdateRecord]) -> float:
    """Parameter-weighted ITOP rate over layers."""
    items: Sequence[LayerSummary | UpdateRecord] = list(summaries)
    total = sum(s.numel for s in items)
    return sum(s.ever_active for s in items) / total if total else 0.0
