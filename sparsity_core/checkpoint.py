"""Checkpoint files and validation of :class:`~sparsity_core.scheduler.DSTScheduler` state dicts.

A state dict holds only plain types and tensors (it loads with ``torch.load(weights_only=True)``)
and names every component by its registry name, so loading never runs code from the file.
:func:`save_checkpoint` writes atomically (temporary file, then rename), so a process killed
mid-write leaves the previous checkpoint intact; :func:`load_checkpoint` turns every way a file
can be unreadable into a :class:`CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .config import DSTConfig
from .engine import LayerState
from .errors import CheckpointError, ConfigError, UnknownComponentError
from .registry import Registry
from .selection import count
from .structures import describe, realized_budget

__all__ = [
    "SCHEMA_VERSION",
    "atomic_file",
    "check_layers",
    "check_layout",
    "check_schema",
    "load_checkpoint",
    "migrated_config",
    "save_checkpoint",
    "saved_allocation",
    "saved_config",
    "write_text",
]

SCHEMA_VERSION = 2
_REQUIRED = {"config", "step", "layers", "masks", "ever_active"}


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Write ``path`` atomically: yield a binary handle on a temporary file in the same folder,
    then flush, ``fsync`` and rename it over ``path``.

    ``os.replace`` is atomic, so a reader (or a process killed mid-write) never sees a partly
    written file: it finds the previous version or the new one. If the body raises, the
    temporary file is removed and ``path`` is untouched. Every file the project writes to
    keep (checkpoints, exported models, result stores, dataset caches) goes through here.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_file`); returns the path."""
    with atomic_file(path) as handle:
        handle.write(text.encode())
    return Path(path)


def save_checkpoint(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` with ``torch.save`` to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as handle:
        torch.save(obj, handle)
    return Path(path)


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device | None = "cpu"
) -> Any:
    """``torch.load(path, weights_only=True)`` with a clear :class:`CheckpointError` on failure.

    Only tensors and plain containers are unpickled: a file that asks for anything else (code,
    custom classes) is refused rather than executed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist (or is not a file); check the path, or "
            f"start without resuming."
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds objects other than tensors and plain containers, "
            f"which torch.load(weights_only=True) refuses to unpickle ({_refusal(exc)}). "
            f"sparsity-core checkpoints never need them; only load files you trust with "
            f"weights_only=False, and never from unknown sources."
        ) from exc
    except Exception as exc:  # zip, EOF, or unpickling errors of a damaged file
        size = path.stat().st_size
        reason = "the file is empty: no data reached the disk" if size == 0 else _describe(exc)
        raise CheckpointError(
            f"checkpoint {str(path)!r} ({size} bytes) is truncated or corrupt and cannot be "
            f"read ({reason}). Restore it from a copy, or delete it to start over."
        ) from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].split(". ")[0] if lines else ""


def _describe(exc: BaseException) -> str:
    first = _first_line(exc)
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _refusal(exc: BaseException) -> str:
    """The line of torch's weights-only error that names what was refused."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    named = [line for line in lines if "WeightsUnpickler error" in line]
    # Only what was refused: torch's advice to allowlist it or to drop weights_only is not ours.
    return named[0].split(" was not an allowed global")[0] if named else _describe(exc)


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
    _check_step(state)
    for key in ("masks", "ever_active"):
        if not isinstance(state[key], Mapping):
            raise CheckpointError(f"checkpoint {key!r} is not a mapping; the file is corrupt.")
        for fqn, tensor in state[key].items():
            if isinstance(tensor, torch.Tensor) and tensor.dtype != torch.bool:
                raise CheckpointError(
                    f"checkpoint {key}[{fqn!r}] has dtype {tensor.dtype}, not torch.bool; "
                    f"DSTScheduler.state_dict() writes boolean masks, so this file was edited or "
                    f"written by other code. Masks are never inferred or converted: fix the "
                    f"file (e.g. state[{key!r}][{fqn!r}] = mask != 0 if that is what it means)."
                )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_step(state: Mapping[str, Any]) -> None:
    """The saved step is an integer in [last update step, total_steps]."""
    step, total = state["step"], state.get("total_steps")
    if total is not None and (not _is_int(total) or total < 1):
        raise CheckpointError(
            f"checkpoint total_steps={total!r} is not a positive integer; the file is corrupt."
        )
    if not _is_int(step) or step < 0:
        raise CheckpointError(
            f"checkpoint step={step!r} is not an integer >= 0 (the optimizer steps taken); the "
            f"file is corrupt or was edited."
        )
    if total is not None and step > total:
        raise CheckpointError(
            f"checkpoint step={step} is beyond the run's total_steps={total}; the file is "
            f"corrupt or was edited."
        )
    history = state.get("history", [])
    last = max((r.get("step", 0) for r in history if isinstance(r, Mapping)), default=0)
    if not _is_int(last) or last > step:
        raise CheckpointError(
            f"checkpoint step={step} is before its last recorded update (step {last!r}); the "
            f"file is corrupt or was edited."
        )


def migrated_config(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state's config dict with what older schemas left implicit made explicit.

    Schema 1 (before budgets were rounded over the whole model, and before neuron ablation
    spared the output layer by default) resumes with ``budget_rounding="per_layer"`` and
    ``neuron_ablation`` without ``exempt_output``, so its masks and budgets still fit. It does
    resume under the current ablation rule (see ``sparsity_plugins.structure_ablation``).
    """
    config = dict(state["config"])
    # Checkpoints written before optimizer-state policies existed reset state only.
    config.setdefault("optimizer_state", {"kind": "reset"})
    if state.get("schema_version") == 1:
        config.setdefault("budget_rounding", "per_layer")
        config.setdefault("init_mask", {"kind": "random"})
        config.setdefault("reinit", {"kind": "none"})

        def legacy(structure: Any) -> Any:
            if isinstance(structure, Mapping) and structure.get("kind") == "neuron_ablation":
                return {"exempt_output": False, **structure}
            return structure

        if isinstance(config.get("structures"), list):
            config["structures"] = [legacy(s) for s in config["structures"]]
        if isinstance(config.get("rules"), list):
            config["rules"] = [
                {**r, "structures": [legacy(s) for s in r["structures"]]}
                if isinstance(r, Mapping) and isinstance(r.get("structures"), list)
                else r
                for r in config["rules"]
            ]
    return config


def saved_config(state: Mapping[str, Any], registry: Registry | None = None) -> DSTConfig:
    """The :class:`DSTConfig` of a state dict (schema checked first); names missing plugins.

    Component names are resolved in ``registry`` (default: the process-wide one).
    """
    check_schema(state)
    try:
        return DSTConfig.from_dict(migrated_config(state), registry)
    except (UnknownComponentError, ConfigError) as exc:
        raise CheckpointError(
            f"the checkpoint's config cannot be rebuilt here: {exc} (The checkpoint names its "
            f"components by plugin name; install the plugins of the run that wrote it.)"
        ) from exc


def check_config(mine: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """The saved config must equal the scheduler's (both as ``DSTConfig.to_dict()``)."""
    if dict(saved) != dict(mine):
        diff = sorted(k for k in set(mine) | set(saved) if mine.get(k) != saved.get(k))
        raise CheckpointError(
            f"checkpoint config differs from this scheduler's in {diff}; build the scheduler "
            f"with DSTScheduler.from_state_dict(model, optimizer, state) to use its config."
        )


def check_layout(shapes: Mapping[str, tuple[int, ...]], state: Mapping[str, Any]) -> None:
    """The checkpoint's sparse layers and mask shapes are exactly the model's (``shapes``).

    Runs before a scheduler is built from ``state``, so a mismatch is reported by name instead
    of failing somewhere inside the construction.
    """
    saved_layers = state["layers"]
    if not isinstance(saved_layers, Mapping):
        raise CheckpointError("checkpoint 'layers' is not a mapping; the file is corrupt.")
    only_saved = sorted(set(saved_layers) - set(shapes))
    only_model = sorted(set(shapes) - set(saved_layers))
    if only_saved or only_model:
        raise CheckpointError(
            f"checkpoint sparse layers differ from this model's: in the checkpoint only "
            f"{only_saved}, in the model only {only_model}. Load it into the architecture (and "
            f"the layer selection) that wrote it."
        )
    for fqn, shape in shapes.items():
        saved_shape = tuple(saved_layers[fqn].get("shape", ()))
        if saved_shape != tuple(shape):
            raise CheckpointError(
                f"layer {fqn!r}: the checkpoint's weight has shape {saved_shape}, the model's "
                f"{tuple(shape)}; load it into the architecture that wrote it."
            )
        mask = state["masks"].get(fqn) if isinstance(state["masks"], Mapping) else None
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
            raise CheckpointError(
                f"checkpoint masks[{fqn!r}] is missing or not shaped {tuple(shape)}; the file "
                f"is truncated or corrupt."
            )


def saved_allocation(state: Mapping[str, Any], fqn: str) -> int:
    """What layer ``fqn`` held when saved: its ``allocation`` (schema 2), else its budget."""
    saved = state["layers"][fqn]
    value = saved.get("allocation", saved["budget"])
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(
            f"checkpoint layers[{fqn!r}].allocation is {value!r}, not a positive int; the file "
            f"is corrupt."
        )
    return value


def check_layers(layers: Mapping[str, LayerState], state: Mapping[str, Any]) -> None:
    """Every saved layer matches the model's: names, shapes, budgets, masks and structure."""
    check_layout({fqn: layer.spec.shape for fqn, layer in layers.items()}, state)
    saved_layers = state["layers"]
    held = planned = 0
    for fqn, layer in layers.items():
        saved = saved_layers[fqn]
        if int(saved["budget"]) != layer.planned:
            raise CheckpointError(
                f"layer {fqn!r}: the checkpoint's budget of {saved['budget']} active weights "
                f"differs from this scheduler's {layer.planned}; the density, distribution or "
                f"structure differs from the run that wrote it."
            )
        allocation = saved_allocation(state, fqn)
        held += allocation
        planned += layer.planned
        if allocation > layer.spec.numel:
            raise CheckpointError(
                f"checkpoint layers[{fqn!r}].allocation of {allocation} exceeds the layer's "
                f"{layer.spec.numel} weights; the file is corrupt."
            )
        keys = ["ever_active"]
        if layer.grad_momentum is not None:
            keys.append("grad_momentum")
        for key in keys:
            tensor = state.get(key, {}).get(fqn)
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != layer.spec.shape:
                raise CheckpointError(
                    f"checkpoint {key}[{fqn!r}] is missing or has the wrong shape; the file is "
                    f"truncated or was written by a different method."
                )
        mask = state["masks"][fqn]  # boolean: check_schema refuses any other dtype
        expected = realized_budget(layer.structure, layer.spec, allocation, mask)
        if count(mask) != expected or not layer.structure.satisfied(mask, layer.spec, allocation):
            raise CheckpointError(
                f"checkpoint mask of {fqn!r} has {count(mask)} active weights (expected "
                f"{expected}) or breaks the structure {describe(layer.structure)}; the file is "
                f"corrupt or was written for another structure."
            )
    if held > planned:
        raise CheckpointError(
            f"checkpoint layers hold {held} weights in all, more than the {planned} their "
            f"budgets allow; the file is corrupt."
        )
