"""Optimizer-agnostic state handling: every state tensor shaped like the parameter."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .errors import OptimizerError

__all__ = [
    "check_movable_state",
    "check_optimizer_holds",
    "param_shaped_state",
    "reset_state_at",
]


def param_shaped_state(
    optimizer: torch.optim.Optimizer, param: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The optimizer's per-element state for ``param`` (momentum, Adam moments, ...)."""
    state = optimizer.state.get(param, {})
    return {
        key: value
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and value.shape == param.shape
    }


def reset_state_at(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor
) -> None:
    """Zero every per-element state tensor of ``param`` at ``where`` (whatever the optimizer)."""
    for value in param_shaped_state(optimizer, param).values():
        value.masked_fill_(where, 0)


def check_optimizer_holds(
    optimizer: torch.optim.Optimizer, named_params: Iterable[tuple[str, torch.Tensor]]
) -> None:
    """Raise :class:`OptimizerError` unless every sparse parameter is in the optimizer."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise OptimizerError(
            f"DSTScheduler needs a torch.optim.Optimizer, got {type(optimizer).__name__}."
        )
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in named_params if id(p) not in held]
    if missing:
        raise OptimizerError(
            f"the optimizer ({type(optimizer).__name__}) does not hold the weights of sparse "
            f"layers {missing}; build the optimizer from model.parameters() of the same model "
            f"instance that you pass to DSTScheduler (and after moving it to its device)."
        )


def check_movable_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, fqn: str) -> None:
    """Raise :class:`OptimizerError` when the optimizer keeps per-parameter state for a compact
    layer's ``values`` that a topology update cannot move with the weights: a tensor that is
    neither shaped like the parameter nor a scalar (e.g. factored second moments)."""
    for key, value in optimizer.state.get(param, {}).items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        if value.shape != param.shape:
            raise OptimizerError(
                f"{type(optimizer).__name__} keeps state {key!r} of shape {tuple(value.shape)} "
                f"for compact layer {fqn!r}, whose values have shape {tuple(param.shape)}: a "
                f"topology update moves each weight's state with it, which needs every state "
                f"tensor shaped like the parameter (or a scalar). Use an optimizer with "
                f"element-wise state (SGD, Adam, AdamW, RMSprop, ...), or train this layer on "
                f"the masked path."
            )
