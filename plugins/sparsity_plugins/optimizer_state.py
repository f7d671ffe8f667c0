"""Built-in optimizer-state policies: what a grown weight's optimizer state is.

Every update zeroes the per-element state (momentum, Adam's moments) of dropped and grown
weights, whatever the policy. That leaves one thing a fresh optimizer would do differently for
Adam: its bias correction. Adam divides the moments by ``1 - beta ** t`` with ``t`` the step
count of the whole tensor, so a weight grown at step 5000 gets its first update from moments
that hold one gradient, corrected as if they held thousands. Its first step at the tensor's step
``t`` is ``((1 - beta1) / (1 - beta1**t)) / (sqrt(1 - beta2) / sqrt(1 - beta2**t))`` times a fresh
Adam's: about 0.5x at ``t = 10``, 1x near ``t = 100`` and 3.2x (with the default betas) from a
few thousand steps on.
Per-weight step counts for grown weights were reported for sparse LLM training (SMET, ICML
2026); ``adam_fresh_step`` gives each grown weight the bias correction of its own age.
"""

from __future__ import annotations

import math

import attrs
import torch

from sparsity_core import hookimpl
from sparsity_core.errors import ConfigError, OptimizerError


@attrs.frozen
class ResetState:
    """Zeroed moments at grown weights, and nothing more (the engine does the zeroing)."""

    tracks_age = False

    def check(self, optimizer, param, fqn) -> None:
        return None

    def after_step(self, optimizer, param, index, born) -> None:
        return None


def _tolerance(value: float) -> float:
    if not 0.0 < value < 1.0:
        raise ConfigError(
            f"adam_fresh_step tolerance={value!r} must lie in (0, 1): it is how close a grown "
            f"weight's bias correction must come to the tensor's before it is left alone."
        )
    return float(value)


@attrs.frozen
class AdamFreshStep:
    """Adam and AdamW: a grown weight's update uses the bias correction of its own age.

    After each optimizer step, for every weight grown ``a`` steps ago (``a`` counted in the
    optimizer's steps of that parameter), the step Adam took with the tensor's correction is
    replaced by the one a freshly initialised Adam would take at its step ``a``, from the same
    moments. A weight stops being tracked once its correction is within ``tolerance`` of the
    tensor's (``beta2 ** a < tolerance``; about 16,000 steps with the defaults), or when it is
    dropped. Needs ``torch.optim.Adam`` or ``AdamW`` without ``amsgrad`` or ``maximize``.
    """

    tolerance: float = attrs.field(default=1e-7, converter=_tolerance)
    tracks_age = True

    def check(self, optimizer, param, fqn) -> None:
        name = type(optimizer).__name__
        if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            raise OptimizerError(
                f"optimizer_state='adam_fresh_step' corrects Adam's bias correction, but layer "
                f"{fqn!r} is trained by {name}. Use torch.optim.Adam or AdamW, or "
                f"optimizer_state='reset'."
            )
        group = _group_of(optimizer, param)
        for flag in ("amsgrad", "maximize"):
            if group.get(flag):
                raise OptimizerError(
                    f"optimizer_state='adam_fresh_step' does not handle {name}({flag}=True) "
                    f"(layer {fqn!r}); turn {flag} off or use optimizer_state='reset'."
                )

    @torch.no_grad()
    def after_step(self, optimizer, param, index, born):
        state = optimizer.state.get(param)
        if not state or "exp_avg" not in state:
            return None
        group = _group_of(optimizer, param)
        beta1, beta2 = (float(b) for b in group["betas"])
        lr, eps = float(group["lr"]), float(group["eps"])
        t = float(state["step"])
        age = (t - born).clamp_min(1.0)  # at least the one step taken since the growth
        flat = param.view(-1)
        m = state["exp_avg"].view(-1)[index].double()
        v = state["exp_avg_sq"].view(-1)[index].double()
        taken = (lr / (1 - beta1**t)) * m / (v.sqrt() / math.sqrt(1 - beta2**t) + eps)
        fresh_bc2 = (1 - torch.pow(beta2, age)).sqrt()
        fresh = (lr / (1 - torch.pow(beta1, age))) * m / (v.sqrt() / fresh_bc2 + eps)
        flat.index_add_(0, index, (taken - fresh).to(flat.dtype))
        return torch.pow(beta2, age + 1) >= self.tolerance


def _group_of(optimizer, param) -> dict:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise OptimizerError(f"the optimizer ({type(optimizer).__name__}) does not hold the parameter.")


@hookimpl
def sparsity_register_optimizer_state_policies(register) -> None:
    register("reset", ResetState, summary="zeroed state at grown weights (every optimizer)")
    register(
        "adam_fresh_step",
        AdamFreshStep,
        summary="Adam/AdamW: grown weights get a fresh bias correction (per-weight step)",
    )
