"""The component interfaces: small protocols with one job each.

Components are usually ``attrs.frozen`` classes whose fields are their hyper-parameters, so
they compare by value, hash, print, and serialise as ``{"kind": name, **fields}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:
    import torch

    from .context import ScoreContext
    from .layers import LayerSpec

__all__ = [
    "Capabilities",
    "Distribution",
    "DropSchedule",
    "GrowthCriterion",
    "OptimizerStatePolicy",
    "PruneCriterion",
    "Reinitializer",
    "StorageFormat",
    "StructureConstraint",
    "capabilities_of",
]


@attrs.frozen
class Capabilities:
    """What a criterion reads, so the engine captures only that.

    Attributes:
        needs_grad: reads ``ctx.grad``, the dense gradient of the update step (captured only on
            update steps, before inactive gradients are zeroed).
        needs_optimizer_state: reads ``ctx.optimizer_state`` (state tensors shaped like the
            weight).
        grad_momentum: reads ``ctx.grad_momentum``, an exponential moving average of the dense
            gradient with this coefficient, which the engine keeps on every step for the layers
            that use the criterion (a full-size buffer: only request it when needed).
        stochastic: draws from ``ctx.generator``.
        needs_ever_active: reads ``ctx.ever_active`` (positions active at any time so far).
    """

    needs_grad: bool = False
    needs_optimizer_state: bool = False
    grad_momentum: float | None = None
    stochastic: bool = False
    needs_ever_active: bool = False


def capabilities_of(component: Any) -> Capabilities:
    """A component's declared capabilities (none declared means it reads only weight and mask)."""
    caps = getattr(component, "capabilities", None)
    return caps if isinstance(caps, Capabilities) else Capabilities()


@runtime_checkable
class PruneCriterion(Protocol):
    """Scores active weights; higher scores are kept.

    ``scores`` returns a tensor shaped like ``ctx.weight`` and mutates nothing. Only scores at
    active positions matter. Non-finite scores are treated as the lowest priority.
    Randomness comes only from ``ctx.generator``.
    """

    def scores(self, ctx: ScoreContext) -> torch.Tensor: ...


@runtime_checkable
class GrowthCriterion(Protocol):
    """Scores inactive weights; higher scores are grown first (same rules as PruneCriterion)."""

    def scores(self, ctx: ScoreContext) -> torch.Tensor: ...


@runtime_checkable
class StructureConstraint(Protocol):
    """A structure the mask must satisfy, seen as groups that each keep a fixed count.

    All masks are boolean tensors shaped like the weight.
    """

    def validate(self, spec: LayerSpec) -> None:
        """Raise :class:`~sparsity_core.errors.LayerError` if ``spec`` cannot hold the structure."""

    def budget(self, spec: LayerSpec, density: float) -> int:
        """The exact number of active weights this structure allows nearest to ``density``."""

    def keep(
        self, scores: torch.Tensor, mask: torch.Tensor, fraction: float, spec: LayerSpec
    ) -> torch.Tensor:
        """The drop: a subset of ``mask`` keeping the highest scores, about ``1 - fraction``.

        Never drops more than can be regrown from positions that were inactive before the
        update (so a drop is never undone in the same update).
        """

    def fill(
        self,
        scores: torch.Tensor,
        base: torch.Tensor,
        candidates: torch.Tensor,
        budget: int,
        spec: LayerSpec,
        *,
        previous: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The grow: ``base`` plus the highest-scoring ``candidates``, satisfying the structure.

        A weight-level structure returns a superset of ``base`` holding exactly ``budget``.
        ``previous`` is the mask before the update (None for the initial mask); a neuron-level
        structure may use it to remove whole neurons from ``base`` (ablation), and then holds
        :meth:`realized_budget` instead.
        """

    def satisfied(self, mask: torch.Tensor, spec: LayerSpec, budget: int) -> bool:
        """Whether ``mask`` satisfies the structure for a layer whose budget is ``budget``."""


@runtime_checkable
class Distribution(Protocol):
    """Spreads a global density over layers."""

    def densities(
        self,
        layers: Sequence[LayerSpec],
        density: float,
        fixed: Mapping[str, float] | None = None,
    ) -> Mapping[str, float]:
        """``{fqn: density in (0, 1]}`` whose parameter-weighted mean is ``density``.

        ``fixed`` pins the densities of some layers (imposed by their structure, e.g. N:M);
        the scheduler passes it only when a structure pins a density.
        """


@runtime_checkable
class DropSchedule(Protocol):
    """The fraction of each layer's active weights to drop at an update step."""

    def fraction(self, step: int, t_end: int) -> float:
        """A value in ``[0, 1]`` for update step ``step`` when updates end at ``t_end``."""


@runtime_checkable
class Reinitializer(Protocol):
    """Re-initialises a layer's weights once its initial mask is drawn (before training).

    A dense initialisation scaled for the full fan-in leaves a sparse neuron's output with a
    fraction of the intended variance; a re-initialisation corrects for the sparse fan-in.
    It changes ``weight`` in place, only where ``mask`` is set; randomness comes only from
    ``generator`` (seeded per layer), so runs stay reproducible.
    """

    def apply_(
        self,
        weight: torch.Tensor,
        mask: torch.Tensor,
        spec: LayerSpec,
        generator: torch.Generator,
    ) -> None:
        """Change ``weight`` in place at the positions ``mask`` keeps."""


@runtime_checkable
class OptimizerStatePolicy(Protocol):
    """The optimizer state of grown weights.

    On every topology update the engine zeroes the per-element state of dropped and grown
    weights (any optimizer). A policy may add to that: with ``tracks_age`` the scheduler keeps,
    for every weight grown since the start, the optimizer step count at its growth (checkpointed
    with the masks), and calls :meth:`after_step` after each optimizer step with the weights
    that still need it.
    """

    tracks_age: bool

    def check(self, optimizer: Any, param: torch.Tensor, fqn: str) -> None:
        """Raise :class:`~sparsity_core.errors.OptimizerError` (naming ``fqn``) unless the
        policy can serve this optimizer and parameter; called when the scheduler is built."""

    def after_step(
        self, optimizer: Any, param: torch.Tensor, index: torch.Tensor, born: torch.Tensor
    ) -> torch.Tensor | None:
        """After an optimizer step: ``index`` (int64) are positions in ``param.view(-1)`` of
        grown weights, ``born`` (float64) the optimizer's step count when each grew. Change
        ``param`` in place; return a boolean tensor over ``index`` of those to keep tracking
        (None: all)."""


@runtime_checkable
class StorageFormat(Protocol):
    """A storage format for a sparse weight (the oracle is ``dense_masked``)."""

    def supports(self, structures: Sequence[Any]) -> bool:
        """Whether weights constrained by ``structures`` can be stored in this format."""

    def pack(self, weight: torch.Tensor, mask: torch.Tensor) -> Any:
        """Pack ``weight`` where ``mask`` is set (a live weight equal to 0 is kept)."""

    def unpack(self, packed: Any) -> torch.Tensor:
        """The dense tensor ``weight * mask`` (exactly)."""

    def linear(
        self, packed: Any, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``F.linear(x, weight * mask, bias)`` computed from the packed form."""

    def nbytes(self, packed: Any) -> int:
        """Bytes held by the packed form."""
