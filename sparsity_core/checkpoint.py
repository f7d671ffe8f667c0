"""Checkpoint validation for :class:`~sparsity_core.scheduler.DSTScheduler` state dicts.

A state dict holds only plain types and tensors (it loads with ``torch.load(weights_only=True)``)
and names every component by its registry name, so loading never runs code from the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .engine import LayerState
from .errors import CheckpointError
from .selection import count
from .structures import describe, realized_budget

__all__ = ["SCHEMA_VERSION", "check_layers", "check_schema"]

SCHEMA_VERSION = 1
_REQUIRED = {"config", "step", "layers", "masks", "ever_active"}


def check_schema(state: Any) -> None:
    """Raise :class:`CheckpointError` unless ``state`` is a state dict this version can read."""
    if not isinstance(state, Mapping) or "schema_version" not in state:
        raise CheckpointError(
            "this is not a DSTScheduler state dict (no 'schema_version'); pass the dict "
            "returned by scheduler.state_dict()."
        )
    version = state["schema_version"]
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise CheckpointError(
            f"checkpoint schema version {version!r} is newer than this sparsity-core "
            f"understands ({SCHEMA_VERSION}); upgrade sparsity-core to load it."
        )
    missing = _REQUIRED - set(state)
    if missing:
        raise CheckpointError(
            f"checkpoint is missing keys {sorted(missing)}; it is truncated or not ours."
        )


def check_config(mine: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """The saved config must equal the scheduler's (both as ``DSTConfig.to_dict()``)."""
    if dict(saved) != dict(mine):
        diff = sorted(k for k in set(mine) | set(saved) if mine.get(k) != saved.get(k))
        raise CheckpointError(
            f"checkpoint config differs from this scheduler's in {diff}; build the scheduler "
            f"with DSTScheduler.from_state_dict(model, optimizer, state) to use its config."
        )


def check_layers(layers: Mapping[str, LayerState], state: Mapping[str, Any]) -> None:
    """Every saved layer matches the model's: names, shapes, budgets, masks and structure."""
    saved_layers = dict(state["layers"])
    if set(saved_layers) != set(layers):
        raise CheckpointError(
            f"checkpoint layers {sorted(saved_layers)} differ from this model's sparse layers "
            f"{sorted(layers)}; load it into the same architecture."
        )
    for fqn, layer in layers.items():
        saved = saved_layers[fqn]
        if tuple(saved["shape"]) != layer.spec.shape or int(saved["budget"]) != layer.budget:
            raise CheckpointError(
                f"layer {fqn!r}: checkpoint shape {tuple(saved['shape'])} / budget "
                f"{saved['budget']} differ from the model's {layer.spec.shape} / {layer.budget}"
            )
        keys = ["masks", "ever_active"]
        if layer.grad_momentum is not None:
            keys.append("grad_momentum")
        for key in keys:
            tensor = state.get(key, {}).get(fqn)
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != layer.spec.shape:
                raise CheckpointError(
                    f"checkpoint {key}[{fqn!r}] is missing or has the wrong shape; the file is "
                    f"truncated or was written by a different method."
                )
        mask = state["masks"][fqn].to(dtype=torch.bool)
        expected = realized_budget(layer.structure, layer.spec, layer.budget, mask)
        if count(mask) != expected or not layer.structure.satisfied(mask, layer.spec, layer.budget):
            raise CheckpointError(
                f"checkpoint mask of {fqn!r} has {count(mask)} active weights (expected "
                f"{expected}) or breaks the structure {describe(layer.structure)}; the file is "
                f"corrupt or was written for another structure."
            )
