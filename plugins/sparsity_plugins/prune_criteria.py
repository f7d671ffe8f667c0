"""Built-in prune criteria: higher score = kept."""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from sparsity_core import Capabilities, ScoreContext, hookimpl


@attrs.frozen
class MagnitudePrune:
    """Keep the largest ``|weight|`` (RigL, SET)."""

    capabilities: ClassVar[Capabilities] = Capabilities()

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.weight.abs()


@attrs.frozen
class RandomPrune:
    """Keep a uniformly random subset of the active weights."""

    capabilities: ClassVar[Capabilities] = Capabilities(stochastic=True)

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return torch.rand(ctx.weight.shape, generator=ctx.generator, device=ctx.weight.device)


@attrs.frozen
class SaliencyPrune:
    """Keep the largest ``|weight * gradient|`` (first-order Taylor saliency, as in SNIP)."""

    capabilities: ClassVar[Capabilities] = Capabilities(needs_grad=True)

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return (ctx.weight * ctx.grad).abs()


@hookimpl
def sparsity_register_prune_criteria(register) -> None:
    register("magnitude", MagnitudePrune, summary="largest |weight| kept")
    register("random", RandomPrune, summary="uniformly random active weights kept")
    register("saliency", SaliencyPrune, summary="largest |weight * gradient| kept")
