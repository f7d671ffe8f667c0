"""The read-only view of one layer that criteria score."""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import torch

from .errors import CapabilityError
from .layers import LayerSpec

__all__ = ["ScoreContext"]


def _missing(what: str, capability: str) -> CapabilityError:
    return CapabilityError(
        f"the criterion read ctx.{what}, which was not captured: declare "
        f"`capabilities = Capabilities({capability})` on the criterion class so the engine "
        f"captures it on update steps."
    )


@attrs.define(eq=False)
class ScoreContext:
    """Everything a criterion may read about one layer at one update step.

    Criteria must not modify any tensor here. Optional inputs are present only when the
    criterion declares them in its :class:`~sparsity_core.protocols.Capabilities`; reading an
    undeclared one raises :class:`~sparsity_core.errors.CapabilityError`.

    Attributes:
        spec: the layer's name and shape.
        step: the optimizer step of this update.
        weight: the weight (exactly zero where inactive).
        mask: for pruning, the active positions; for growth, the positions active after the drop.
        generator: the only source of randomness (seeded from seed, layer, step and phase).
    """

    spec: LayerSpec
    step: int
    weight: torch.Tensor
    mask: torch.Tensor
    generator: torch.Generator
    _grad: torch.Tensor | None = None
    _optimizer_state: Mapping[str, torch.Tensor] | None = None
    _grad_momentum: torch.Tensor | None = None
    _ever_active: torch.Tensor | None = None

    @property
    def grad(self) -> torch.Tensor:
        """The dense gradient of the update step (inactive positions included)."""
        if self._grad is None:
            raise _missing("grad", "needs_grad=True")
        return self._grad

    @property
    def optimizer_state(self) -> Mapping[str, torch.Tensor]:
        """The optimizer's state tensors shaped like the weight, by state key."""
        if self._optimizer_state is None:
            raise _missing("optimizer_state", "needs_optimizer_state=True")
        return self._optimizer_state

    @property
    def grad_momentum(self) -> torch.Tensor:
        """Exponential moving average of the dense gradient."""
        if self._grad_momentum is None:
            raise _missing("grad_momentum", "grad_momentum=0.9")
        return self._grad_momentum

    @property
    def ever_active(self) -> torch.Tensor:
        """Positions that have been active at any time so far."""
        if self._ever_active is None:
            raise _missing("ever_active", "needs_ever_active=True")
        return self._ever_active
