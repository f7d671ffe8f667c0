"""Structures: the grouped base every built-in shares, and composition coarse to fine.

A *fine* (weight-level) structure is a view of the weight as ``[groups, group_size]`` in which
group ``g`` keeps exactly ``counts[g]`` active positions: one group (unstructured), groups of
M consecutive inputs (N:M), or rows (constant fan-in). The drop and the grow are the same two
grouped top-k calls for every structure, so a new structure only says how it groups and counts.

A *coarse* (neuron-level) structure, such as neuron ablation, decides which output neurons are
active and wraps the fine structure (``coarse.wrap(fine)``); ``(coarse, fine)`` tuples are
composed by :func:`compose_structures`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import attrs
import torch

from .errors import ConfigError
from .layers import LayerSpec
from .selection import count, grouped_fill, grouped_keep, row_counts

__all__ = [
    "COARSE",
    "FINE",
    "GroupedStructure",
    "StructureCapabilities",
    "budget_step",
    "compose_structures",
    "describe",
    "fixed_density",
    "level_of",
    "realized_budget",
    "structure_capabilities",
    "validate_structure_order",
]

FINE = "weight"
COARSE = "neuron"


@attrs.frozen
class StructureCapabilities:
    """What a structure offers, so the core and the formats ask instead of probing types.

    A structure declares it as its ``capabilities`` attribute (a class attribute, or a property
    when it depends on hyper-parameters); none declared means a weight-level structure that
    offers nothing below. Any structure declaring the same capability gets what builds on it:
    ``per_neuron`` composes with neuron ablation, ``constant_fan_in`` stores as ``condensed``,
    ``nm`` stores as ``nm``.

    Attributes:
        neuron_level: a coarse structure that decides which output neurons are active and
            wraps a weight-level one (``wrap(inner)`` returns the composed structure).
        per_neuron: every group lies inside one output neuron, and ``group_counts(spec,
            budget, device, active_rows)`` / ``min_active_rows(spec, budget)`` spread the
            budget over the active neurons (what neuron ablation needs).
        constant_fan_in: every active output neuron holds the same number of inputs.
        nm: ``(n, m)`` when exactly N of every M consecutive inputs are active.
        pins_density: ``fixed_density(spec)`` gives the density the structure imposes on a
            layer (the distribution then pins it).
        padded: some groups are padded (``group_sizes`` gives their real sizes).
        ablates: whole neurons may be removed at an update; ``realized_budget(spec, budget,
            mask)`` then gives the exact count a mask holds.
    """

    neuron_level: bool = False
    per_neuron: bool = False
    constant_fan_in: bool = False
    nm: tuple[int, int] | None = None
    pins_density: bool = False
    padded: bool = False
    ablates: bool = False


def structure_capabilities(structure: Any) -> StructureCapabilities:
    """The capabilities ``structure`` declares (none declared: a plain weight-level one)."""
    caps = getattr(structure, "capabilities", None)
    if isinstance(caps, StructureCapabilities):
        return caps
    # Structures written before capabilities were declared said ``level`` / ``row_grouped``.
    return StructureCapabilities(
        neuron_level=getattr(structure, "level", FINE) == COARSE,
        per_neuron=bool(getattr(structure, "row_grouped", False)),
    )


def level_of(structure: Any) -> str:
    """``"neuron"`` for coarse structures (those that wrap another), else ``"weight"``."""
    return COARSE if structure_capabilities(structure).neuron_level else FINE


def _name(structure: Any) -> str:
    return type(structure).__name__


def validate_structure_order(structures: Sequence[Any]) -> None:
    """Raise :class:`ConfigError` unless ``structures`` go coarse to fine, ending in a fine one."""
    if not structures:
        raise ConfigError("no structure given; use ('unstructured',) for none.")
    names = [_name(s) for s in structures]
    fine = [s for s in structures if level_of(s) == FINE]
    if len(fine) > 1:
        raise ConfigError(
            f"structures {names} combine {len(fine)} weight-level structures "
            f"({[_name(s) for s in fine]}); they cannot hold together or one implies the other "
            f"(N:M already gives every neuron the same fan-in). Keep exactly one, last."
        )
    if not fine:
        raise ConfigError(
            f"structures {names} have no weight-level structure; end the tuple with one, e.g. "
            f"(..., 'constant_fan_in') or (..., 'nm')."
        )
    if level_of(structures[-1]) != FINE:
        raise ConfigError(
            f"structures {names} list the neuron-level {_name(structures[-1])} after the "
            f"weight-level {_name(fine[0])}; order them coarse to fine, e.g. "
            f"('neuron_ablation', 'constant_fan_in')."
        )
    seen: set[type] = set()
    for s in structures:
        if type(s) in seen:
            raise ConfigError(f"structures {names} list {_name(s)} twice.")
        seen.add(type(s))
    inner = structures[-1]
    for coarse in structures[:-1]:
        if not structure_capabilities(inner).per_neuron:
            raise ConfigError(
                f"{_name(coarse)} removes whole neurons and redistributes their budget, which "
                f"needs a weight-level structure that counts per neuron (constant_fan_in or nm, "
                f"or one declaring StructureCapabilities(per_neuron=True)), not {_name(inner)}."
            )


def compose_structures(structures: Sequence[Any]) -> Any:
    """One structure from a coarse-to-fine tuple: each coarse one wraps what follows it."""
    validate_structure_order(structures)
    composed = structures[-1]
    for coarse in reversed(structures[:-1]):
        composed = coarse.wrap(composed)
    return composed


def describe(structure: Any) -> str:
    """A short human name for a (possibly composed) structure, e.g. ``nm 2:4``."""
    fn = getattr(structure, "describe", None)
    return fn() if callable(fn) else type(structure).__name__


def realized_budget(structure: Any, spec: LayerSpec, budget: int, mask: torch.Tensor) -> int:
    """The exact count a mask must hold: ``budget``, unless a coarse structure ablated neurons."""
    if not structure_capabilities(structure).ablates:
        return budget
    return int(structure.realized_budget(spec, budget, mask))


def budget_step(structure: Any, spec: LayerSpec, mask: torch.Tensor | None = None) -> int | None:
    """The spacing of the budgets ``structure`` can hold on ``spec`` (with ``mask``'s active
    neurons), or None when it takes part in no global apportionment (its budget is its own).

    Planning rounds every taking-part layer's budget together so the model's total meets the
    global density; after an update that ablated neurons, the leftover moves between layers in
    these steps (see :mod:`sparsity_core.budgets`).
    """
    fn = getattr(structure, "budget_step", None)
    if not callable(fn):
        return None
    step = fn(spec, mask)
    if step is None:
        return None
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ConfigError(
            f"structure {_name(structure)}.budget_step() returned {step!r} for layer "
            f"{spec.fqn!r}; return a positive int, or None to keep the layer's budget its own."
        )
    return step


def fixed_density(structure: Any, spec: LayerSpec) -> float | None:
    """The density ``structure`` imposes on the layer ``spec``, if it pins one."""
    if not structure_capabilities(structure).pins_density:
        return None
    return float(structure.fixed_density(spec))


def active_rows_of(mask: torch.Tensor) -> torch.Tensor:
    """Output neurons with at least one active weight (an all-off row is an ablated neuron)."""
    return row_counts(mask.reshape(mask.shape[0], -1)) > 0


class GroupedStructure:
    """Base class: subclasses define ``group_shape``, ``group_counts`` and ``budget``.

    Structures whose groups each lie inside one output neuron declare
    ``StructureCapabilities(per_neuron=True)`` and also accept ``active_rows``, a boolean
    vector over output neurons; inactive (ablated) neurons hold nothing and the budget is
    spread over the active ones.
    """

    capabilities: ClassVar[StructureCapabilities] = StructureCapabilities()

    @property
    def row_grouped(self) -> bool:
        """Deprecated spelling of ``capabilities.per_neuron``."""
        return structure_capabilities(self).per_neuron

    def group_shape(self, spec: LayerSpec) -> tuple[int, int]:
        """``(groups, group_size)``; ``weight.reshape(groups, group_size)`` is the grouped view."""
        raise NotImplementedError

    def to_groups(self, tensor: torch.Tensor, spec: LayerSpec, fill: Any) -> torch.Tensor:
        """The ``[groups, group_size]`` view of a weight-shaped tensor (a subclass may pad,
        filling the padding with ``fill``)."""
        return tensor.reshape(self.group_shape(spec))

    def from_groups(self, grouped: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        """Inverse of :meth:`to_groups` (padding dropped)."""
        return grouped.reshape(spec.shape)

    def group_sizes(self, spec: LayerSpec, device: torch.device) -> torch.Tensor | None:
        """Real positions per group when some groups are padded (None: every group is full)."""
        return None

    def group_counts(
        self,
        spec: LayerSpec,
        budget: int,
        device: torch.device,
        active_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """How many active positions each group holds for ``budget`` (and active neurons)."""
        raise NotImplementedError

    def budget(self, spec: LayerSpec, density: float) -> int:
        raise NotImplementedError

    def fixed_density(self, spec: LayerSpec) -> float | None:
        """The density this structure imposes on a layer, if any (N:M: N/M)."""
        return None

    def min_active_rows(self, spec: LayerSpec, budget: int) -> int:
        """The fewest active neurons that can hold ``budget``."""
        return 1

    def budget_step(self, spec: LayerSpec, mask: torch.Tensor | None = None) -> int | None:
        """The spacing of the budgets this structure holds (see :func:`budget_step`); None
        (the default): the layer keeps the budget this structure gives it."""
        return None

    def validate(self, spec: LayerSpec) -> None:
        """Layers of any shape are accepted unless a subclass says otherwise."""

    def realized_budget(
        self, spec: LayerSpec, budget: int, mask: torch.Tensor | None = None
    ) -> int:
        """``budget`` itself: a fine structure alone never ablates neurons."""
        return budget

    def keep(
        self, scores: torch.Tensor, mask: torch.Tensor, fraction: float, spec: LayerSpec
    ) -> torch.Tensor:
        groups, size = self.group_shape(spec)
        m2 = self.to_groups(mask, spec, False)
        s2 = self.to_groups(scores, spec, 0)
        active = count(mask)
        n_drop = math.floor(fraction * active)
        real = self.group_sizes(spec, mask.device)
        if groups == 1:
            # Never drop more than can be regrown from positions inactive before the update
            # (padding is never a position).
            room = (size if real is None else int(real.sum())) - active
            kept = grouped_keep(s2, m2, min(n_drop, room))
        else:
            free = (size if real is None else real) - row_counts(m2)
            kept = grouped_keep(s2, m2, n_drop, free)
        return self.from_groups(kept, spec)

    def fill(
        self,
        scores: torch.Tensor,
        base: torch.Tensor,
        candidates: torch.Tensor,
        budget: int,
        spec: LayerSpec,
        *,
        previous: torch.Tensor | None = None,
        active_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        counts = self.group_counts(spec, budget, base.device, active_rows)
        filled = grouped_fill(
            self.to_groups(scores, spec, 0),
            self.to_groups(base, spec, False),
            self.to_groups(candidates, spec, False),
            counts,
        )
        return self.from_groups(filled, spec)

    def satisfied(
        self,
        mask: torch.Tensor,
        spec: LayerSpec,
        budget: int,
        active_rows: torch.Tensor | None = None,
    ) -> bool:
        if mask.dtype != torch.bool or tuple(mask.shape) != spec.shape:
            return False
        counts = self.group_counts(spec, budget, mask.device, active_rows)
        return bool(torch.equal(row_counts(self.to_groups(mask, spec, False)), counts))
