"""Built-in growth criteria: higher score = grown first."""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from sparsity_core import Capabilities, ScoreContext, hookimpl

from ._validators import open_unit_interval


@attrs.frozen
class GradientGrowth:
    """Grow the largest ``|dense gradient|`` (RigL)."""

    capabilities: ClassVar[Capabilities] = Capabilities(needs_grad=True)

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.grad.abs()


@attrs.frozen
class RandomGrowth:
    """Grow uniformly random inactive weights (SET)."""

    capabilities: ClassVar[Capabilities] = Capabilities(stochastic=True)

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return torch.rand(ctx.weight.shape, generator=ctx.generator, device=ctx.weight.device)


@attrs.frozen
class MomentumGrowth:
    """Grow the largest momentum of the dense gradient (sparse momentum).

    Inactive gradients are zeroed before the optimizer sees them, so the optimizer's own
    momentum is zero at every inactive position. This criterion therefore asks the engine for
    a momentum of the *dense* gradient, ``m <- beta * m + (1 - beta) * g`` every step (a buffer
    the size of the layer, kept only while this criterion is in use).
    """

    beta: float = attrs.field(default=0.9, converter=float, validator=open_unit_interval)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(grad_momentum=self.beta)

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.grad_momentum.abs()


@attrs.frozen
class UnfiredGrowth:
    """Grow random weights that have never been active, then random others (ITOP exploration)."""

    capabilities: ClassVar[Capabilities] = Capabilities(stochastic=True, needs_ever_active=True)

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        noise = torch.rand(ctx.weight.shape, generator=ctx.generator, device=ctx.weight.device)
        return noise + (~ctx.ever_active).to(noise.dtype)


@hookimpl
def sparsity_register_growth_criteria(register) -> None:
    register("gradient", GradientGrowth, summary="largest |dense gradient| (RigL)")
    register("random", RandomGrowth, summary="uniformly random (SET)")
    register(
        "momentum", MomentumGrowth, summary="largest |dense-gradient momentum| (sparse momentum)"
    )
    register("unfired", UnfiredGrowth, summary="random among never-active weights first (ITOP)")
