"""The ``relative_magnitude`` prune criterion: magnitude relative to the weight's neuron."""

from __future__ import annotations

import attrs
import torch

from sparsity_core import ScoreContext


@attrs.frozen
class RelativeMagnitudePrune:
    """Keep ``|w| / ||w_neuron||``: each output neuron keeps its own strongest inputs.

    Plain magnitude pruning empties neurons whose weights are small overall; dividing by the
    L2 norm of the neuron's (active) weights ranks every weight against its own neuron.
    """

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        weight = ctx.weight.abs()
        rows = weight.reshape(weight.shape[0], -1)
        norm = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
        relative = rows / norm.clamp_min(torch.finfo(weight.dtype).tiny)
        return relative.reshape(weight.shape)
