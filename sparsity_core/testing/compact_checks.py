"""Compact training against its oracle, the masked path.

:func:`check_method_compact_matches_masked` trains the same short run twice, once masked and once
with the method's Linear layers compact (:func:`sparsity_core.to_compact`; convolutions stay
masked beside them), in float64, and compares after every step: identical masks, weights and
every optimizer state tensor equal within tolerance at the active positions, and the compact
layers' own invariants (layout equal to the mask, padding slots and their state at zero, state
zero at weights grown in the update).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..compact import CompactLinear, is_compact
from ..compacting import to_compact
from ..optim_state import param_shaped_state
from ..scheduler import DSTScheduler
from ._common import RUN, Draw, _fail, run_examples
from ._training import method_name, registry_for
from .method_checks import Runs, _draw_method
from .models import mse

__all__ = ["check_method_compact_matches_masked"]

_ATOL = 1e-9
_RTOL = 1e-7


def _masked_layers(model: nn.Module) -> list[str]:
    """The layers to leave masked: every supported layer that is not a plain Linear."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv1d | nn.Conv2d)
        or (isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward)
    ]


def _build(
    spec: Any, config: Any, compact: bool, layer_cls: type[CompactLinear]
) -> tuple[nn.Module, torch.optim.Optimizer, DSTScheduler]:
    model = spec.model_factory().double()
    if compact:
        to_compact(
            model,
            config,
            total_steps=spec.steps,
            registry=registry_for(config),
            keep_masked=_masked_layers(model),
            layer_cls=layer_cls,
        )
    optimizer = spec.optimizer_factory(model.parameters())
    scheduler = DSTScheduler(
        model, optimizer, config, total_steps=spec.steps, registry=registry_for(config)
    )
    return model, optimizer, scheduler


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=_RTOL, atol=_ATOL, equal_nan=True)


def _compare(
    check: str,
    method: str,
    step: int,
    masked: DSTScheduler,
    compact: DSTScheduler,
    grown: dict[str, torch.Tensor],
) -> None:
    for fqn, ref in masked.layers.items():
        layer = compact.layers[fqn]
        where = f"layer {fqn!r} after step {step}"
        if not torch.equal(ref.mask, layer.mask):
            _fail(check, method, where, "the compact run's mask differs from the masked run's")
        if not layer.compact:
            if not _close(ref.weight, layer.weight):
                _fail(check, method, where, "the masked layer's weights differ")
            continue
        module = layer.module
        if not torch.equal(module.mask(), layer.mask):
            _fail(check, method, where, "the compact layout is not the scheduler's mask")
        if module.nnz != int(layer.mask.sum()):
            _fail(check, method, where, f"nnz={module.nnz} but the mask holds {layer.mask.sum()}")
        if bool((module.values.detach()[module.nnz :] != 0).any()):
            _fail(check, method, where, "a padding slot of values is not zero")
        if not _close(ref.weight.detach(), module.dense_weight()):
            diff = float((ref.weight.detach() - module.dense_weight()).abs().max())
            _fail(check, method, where, f"the weights differ (max |diff| {diff:.3g})")
        if ref.module.bias is not None and not _close(ref.module.bias, module.bias):
            _fail(check, method, where, "the biases differ")
        theirs = param_shaped_state(compact.optimizer, module.values)
        for key, value in param_shaped_state(masked.optimizer, ref.weight).items():
            if key not in theirs:
                _fail(check, method, where, f"the compact optimizer has no state {key!r}")
            mine = theirs[key]
            if bool((mine[module.nnz :] != 0).any()):
                _fail(check, method, where, f"optimizer state {key!r} is not zero at padding")
            if not _close(value * layer.mask, module.scatter(mine)):
                _fail(check, method, where, f"optimizer state {key!r} differs from the masked run")
            if fqn in grown and bool((module.scatter(mine)[grown[fqn]] != 0).any()):
                _fail(check, method, where, f"optimizer state {key!r} is not zero at grown weights")


def check_method_compact_matches_masked(
    method: Any,
    *,
    run: Runs = None,
    fit_timing: bool = True,
    layer_cls: type[CompactLinear] = CompactLinear,
    max_examples: int | None = None,
) -> None:
    """Compact training gives the masked path's masks exactly, and its weights and optimizer
    state within float tolerance, after every step (float64; convolutions stay masked).

    Args:
        layer_cls: the compact layer class (a subclass with your own kernels, say).
    """
    check = "check_method_compact_matches_masked"

    def example(draw: Draw) -> None:
        config, spec = _draw_method(draw, method, run, fit_timing)
        model_a, opt_a, masked = _build(spec, config, False, layer_cls)
        model_b, opt_b, compact = _build(spec, config, True, layer_cls)
        name = f"method {method_name(masked)}"
        if not any(is_compact(m) for m in model_b.modules()):
            _fail(check, name, "the model", "to_compact made no layer compact")
        _compare(check, name, 0, masked, compact, {})
        for step in range(1, spec.steps + 1):
            batch = tuple(t.double() for t in spec.data[(step - 1) % len(spec.data)])
            for model, opt, scheduler in ((model_a, opt_a, masked), (model_b, opt_b, compact)):
                opt.zero_grad()
                mse(model, batch).backward()
                opt.step()
                before = {fqn: layer.mask.clone() for fqn, layer in scheduler.layers.items()}
                records = scheduler.step()
            grown = (
                {fqn: compact.layers[fqn].mask & ~before[fqn] for fqn in before} if records else {}
            )
            _compare(check, name, step, masked, compact, grown)

    run_examples(check, example, cost=RUN, max_examples=max_examples)
