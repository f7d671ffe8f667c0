"""The ``explore`` growth criterion: gradient magnitude plus an exploration bonus."""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import torch

from sparsity_core import Capabilities, ConfigError, ScoreContext


def _non_negative(instance, attribute, value) -> None:
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"explore.{attribute.name}={value!r} must be a finite number >= 0.")


@attrs.frozen
class ExploreGrowth:
    """Grow by ``|g| / max|g| + c * sqrt(ln(1 + step) / (1 + seen))`` (after DST-EE).

    DST-EE's acquisition function adds to the gradient magnitude an upper-confidence bonus that
    shrinks with how often a connection has been active. The engine tracks whether a weight
    has ever been active (``seen`` is 0 or 1), so weights never tried get the larger bonus; the
    bonus grows slowly with the step, and ``c`` trades exploitation (0: RigL on normalised
    gradients) for exploration.
    """

    capabilities: ClassVar[Capabilities] = Capabilities(needs_grad=True, needs_ever_active=True)

    c: float = attrs.field(default=0.5, converter=float, validator=_non_negative)

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        magnitude = ctx.grad.abs()
        # Normalised so that c means the same at any gradient scale; an all-zero gradient stays 0.
        exploit = magnitude / magnitude.max().clamp_min(torch.finfo(magnitude.dtype).tiny)
        seen = ctx.ever_active.to(magnitude.dtype)
        bonus = self.c * torch.sqrt(math.log1p(ctx.step) / (1.0 + seen))
        return exploit + bonus
