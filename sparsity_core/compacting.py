"""Conversions between a masked model and its compact form.

:func:`to_compact` swaps the sparse ``nn.Linear`` layers that a config selects for
:class:`~sparsity_core.compact.CompactLinear` layers holding only their active weights;
:func:`to_masked` swaps them back for dense ``nn.Linear`` layers with zeros where inactive.
Build the optimizer after :func:`to_compact` (it trains the new ``values`` parameters), then
the :class:`~sparsity_core.DSTScheduler` with the same config::

    model = sparsity_core.to_compact(model, config, total_steps=steps)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = sparsity_core.DSTScheduler(model, optimizer, config, total_steps=steps)
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .compact import CompactLinear, is_compact
from .config import DSTConfig
from .distributed import unwrap_model
from .engine import plan_initial_mask, reinit_layer
from .errors import ConfigError, LayerError, OptimizerError
from .planning import capacities, plan_layers
from .registry import Registry

__all__ = ["compact_optimizer_state", "masked_optimizer_state", "to_compact", "to_masked"]


def _set_module(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _tied(model: nn.Module, weight: torch.Tensor) -> list[str]:
    """Every name under which ``weight`` is a parameter of ``model`` (more than one: tied)."""
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]


def _check_masks(masks: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
    unknown = sorted(set(masks) - set(names))
    if unknown:
        raise ConfigError(
            f"to_compact(masks=...) names layers {unknown} that the config does not sparsify "
            f"(it sparsifies {list(names)}); pass the masks of a scheduler over this config."
        )


@torch.no_grad()
def to_compact(
    model: nn.Module,
    config: DSTConfig,
    *,
    total_steps: int | None = None,
    registry: Registry | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    keep_masked: Sequence[str] = (),
    layer_cls: type[CompactLinear] = CompactLinear,
) -> nn.Module:
    """Swap ``model``'s sparse Linear layers for compact ones, in place; returns ``model``.

    Without ``masks`` each layer gets the initial mask and re-initialisation a
    :class:`~sparsity_core.DSTScheduler` over ``config`` would give it (same seed, same
    generators), so a compact run starts where the masked run starts. With ``masks`` (e.g. a
    masked scheduler's ``masks`` or a checkpoint's ``state["masks"]``) each layer keeps its
    current weights under that mask, for going on compact from a masked run.

    Args:
        config: the method; it selects the layers and plans each one's capacity (the most
            weights its budget can move to).
        total_steps: as for the scheduler.
        masks: the masks to convert under, by layer name (all of the config's compact layers).
        keep_masked: fnmatch patterns of sparse layers to leave on the masked path (they train
            masked beside the compact ones, under the same scheduler).
        layer_cls: the compact layer class (a subclass of :class:`CompactLinear` with other
            kernels, say).

    Raises:
        LayerError: a selected layer the compact path cannot hold (a convolution: keep it
            masked with ``keep_masked``), or a weight tied to another parameter.
    """
    inner = unwrap_model(model)
    plan = plan_layers(inner, config, total_steps=total_steps, registry=registry)
    room = capacities(plan)
    chosen = []
    for p in plan.layers:
        if any(fnmatch.fnmatchcase(p.spec.fqn, pattern) for pattern in keep_masked):
            continue
        if is_compact(p.module):
            continue
        if not isinstance(p.module, nn.Linear) or type(p.module).forward is not nn.Linear.forward:
            raise LayerError(
                f"layer {p.spec.fqn!r} ({type(p.module).__name__}) is selected by the config, "
                f"but compact training holds plain nn.Linear layers only (a subclass with its "
                f"own forward would lose it); keep it on the masked path "
                f"with to_compact(..., keep_masked=[{p.spec.fqn!r}]) (the scheduler trains "
                f"it masked beside the compact layers), or exclude it from the config."
            )
        names = _tied(inner, p.module.weight)
        if len(names) > 1:
            raise LayerError(
                f"layer {p.spec.fqn!r}'s weight is tied to {names[1:]} (one "
                f"tensor under several names); a compact layer would untie them silently. "
                f"Untie the weights, or keep the layer masked with keep_masked="
                f"[{p.spec.fqn!r}]."
            )
        chosen.append(p)
    if masks is not None:
        _check_masks(masks, [p.spec.fqn for p in plan.layers])
    for p in chosen:
        weight = p.module.weight
        if masks is None:
            mask = plan_initial_mask(
                p.spec,
                p.structure,
                p.budget,
                config.seed,
                weight.device,
                criterion=plan.config.init_mask,
                weight=weight.detach(),
            )
            reinit_layer(plan.config.reinit, config.seed, p.spec, weight.data, mask)
        else:
            if p.spec.fqn not in masks:
                raise ConfigError(
                    f"to_compact(masks=...) has no mask for layer {p.spec.fqn!r}; pass every "
                    f"sparse layer's mask (or keep it masked with keep_masked=)."
                )
            mask = masks[p.spec.fqn].to(device=weight.device, dtype=torch.bool)
        module = layer_cls.from_linear(
            p.module, mask, capacity=max(room[p.spec.fqn], int(mask.sum())), fqn=p.spec.fqn
        )
        module.train(p.module.training)
        _set_module(inner, p.spec.fqn, module)
    return model


@torch.no_grad()
def to_masked(model: nn.Module) -> nn.Module:
    """Swap every compact layer of ``model`` for a dense ``nn.Linear`` with zeros at inactive
    weights, in place; returns ``model``. A masked scheduler resumes on it from the compact
    scheduler's ``state_dict()`` (the masks are the same). To carry the optimizer state, take
    :func:`masked_optimizer_state` before the swap."""
    inner = unwrap_model(model)
    for fqn, module in list(inner.named_modules()):
        if is_compact(module):
            linear = module.to_linear()
            linear.train(module.training)
            _set_module(inner, fqn, linear)
    return model


def compact_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]
) -> dict[str, Any]:
    """A masked model's optimizer ``state_dict``, made fit for ``optimizer`` over its compact form.

    Call it after :func:`to_compact` (with ``masks=``), with ``optimizer`` built from the compact
    model exactly as the masked model's optimizer was built (the same parameter groups, each
    listing its parameters in the same order: :func:`to_compact` puts each layer's ``values``
    where its dense weight was), and load the result into ``optimizer``. The saved state is
    matched to ``optimizer``'s parameters group by group and position by position; every
    per-weight state tensor of a converted layer is gathered at the layer's active positions
    (zeros in the padding slots), everything else is kept as it is.

    The result shares no tensor with ``state`` (``optimizer.state_dict()`` returns the live
    state, and an optimizer may keep the tensors it is loaded with: two optimizers would then
    advance one ``step`` counter).

    Build the groups by module, not by ``p.dim()``: a compact layer's ``values`` is 1-D, so a
    rule such as "weight decay for parameters of 2 or more dimensions" would put it among the
    biases (and drop its weight decay); such groups differ in size and are refused here.

    Raises:
        OptimizerError: groups or group sizes that differ from ``state``'s, a state tensor of
            a converted weight that is neither a scalar nor shaped like the dense weight, or one
            of another parameter that does not fit the parameter at its position.
    """
    compact = {
        id(m.values): m for m in unwrap_model(model).modules() if isinstance(m, CompactLinear)
    }
    groups, saved = optimizer.param_groups, state["param_groups"]
    sizes = [len(g["params"]) for g in groups]
    saved_sizes = [len(g["params"]) for g in saved]
    if sizes != saved_sizes:
        raise OptimizerError(
            f"compact_optimizer_state: the optimizer has parameter groups of sizes {sizes}, the "
            f"saved state {saved_sizes}; build the compact model's optimizer as the masked one "
            f"was built (the same groups, the parameters in the same order)."
        )
    by_id = {
        saved_id: param
        for group, saved_group in zip(groups, saved, strict=True)
        for param, saved_id in zip(group["params"], saved_group["params"], strict=True)
    }
    out = {"param_groups": copy.deepcopy(saved), "state": {}}
    for index, entry in state["state"].items():
        param = by_id.get(index)
        layer = compact.get(id(param))
        if layer is None:
            for key, value in entry.items():
                if (
                    param is not None
                    and isinstance(value, torch.Tensor)
                    and value.dim() > 0
                    and value.shape != param.shape
                ):
                    raise OptimizerError(
                        f"compact_optimizer_state: saved state {key!r} of shape "
                        f"{tuple(value.shape)} would go to a parameter of shape "
                        f"{tuple(param.shape)}: the optimizer lists its parameters in another "
                        f"order than the saved one. Build it as the masked model's optimizer "
                        f"was built."
                    )
            out["state"][index] = _cloned(entry)
            continue
        flat = layer.flat_index()
        moved = {}
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                moved[key] = _cloned(value)
                continue
            if tuple(value.shape) != layer.dense_shape:
                raise OptimizerError(
                    f"compact_optimizer_state: state {key!r} of layer {layer.fqn!r} has shape "
                    f"{tuple(value.shape)}, not the dense weight's {layer.dense_shape}; pass the "
                    f"state_dict of the optimizer of the masked model this one was converted "
                    f"from, with the compact optimizer built the same way."
                )
            slots = value.new_zeros(layer.capacity)
            slots[: layer.nnz] = value.reshape(-1)[flat.to(value.device)]
            moved[key] = slots
        out["state"][index] = moved
    return out


def masked_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer``'s state (an optimizer of the compact ``model``), made fit for the masked
    model that :func:`to_masked` turns ``model`` into.

    Call it before :func:`to_masked`; build the masked model's optimizer exactly as
    ``optimizer`` was built (the same groups, each listing its parameters in the same order:
    :func:`to_masked` puts each layer's dense ``weight`` where its ``values`` was) and load the
    result into it. Every per-weight state tensor of a compact layer is scattered to the dense
    weight's shape (zeros at inactive weights, the masked path's invariant for moments); scalars
    such as Adam's ``step`` and every other parameter's state are kept. No tensor is shared with
    ``optimizer``'s live state.

    Raises:
        OptimizerError: a state tensor of a compact layer that is neither a scalar nor shaped
            like its ``values``.
    """
    compact = {
        id(m.values): m for m in unwrap_model(model).modules() if isinstance(m, CompactLinear)
    }
    state = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in state["param_groups"] for i in group["params"]]
    layer_of = {i: compact.get(id(p)) for i, p in zip(ids, params, strict=True)}
    out = {"param_groups": copy.deepcopy(state["param_groups"]), "state": {}}
    for index, entry in state["state"].items():
        layer = layer_of.get(index)
        if layer is None:
            out["state"][index] = _cloned(entry)
            continue
        moved = {}
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                moved[key] = _cloned(value)
                continue
            if tuple(value.shape) != (layer.capacity,):
                raise OptimizerError(
                    f"masked_optimizer_state: state {key!r} of compact layer {layer.fqn!r} has "
                    f"shape {tuple(value.shape)}, not its values' ({layer.capacity},); only "
                    f"per-weight state and scalars can be carried to the dense weight."
                )
            moved[key] = layer.scatter(value.detach()).clone()
        out["state"][index] = moved
    return out


def _cloned(value: Any) -> Any:
    """``value`` with every tensor in it copied (dicts, lists and tuples walked)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cloned(v) for v in value)
    return value
