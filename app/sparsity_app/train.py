"""The main job: train a small model with a DST method (and the dense baseline) on offline data."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from sparsity_core.checkpoint import load_checkpoint, save_checkpoint, saved_config
from sparsity_core.compacting import to_compact
from sparsity_core.config import DSTConfig, component_from_dict, component_to_dict, preset
from sparsity_core.errors import CheckpointError, ConfigError
from sparsity_core.layers import LayerSpec, select_layers
from sparsity_core.registry import ComponentType
from sparsity_core.scheduler import DSTScheduler
from sparsity_core.structures import compose_structures, fixed_density
from sparsity_core.telemetry import UpdateRecord, itop_rate

from .data import Dataset
from .models import MODELS, build_mlp, build_model
from .progress import ProgressBar

__all__ = [
    "DENSE",
    "Recipe",
    "RunResult",
    "build_mlp",
    "evaluate",
    "itop_curve",
    "method_config",
    "train_run",
]

DENSE = "dense"
OPTIMIZERS = ("sgd", "adam")
# The layout of the main job's checkpoint files (the scheduler's state inside has its own).
CHECKPOINT_VERSION = 1
STRUCTURE = ComponentType.STRUCTURE


@attrs.frozen
class Recipe:
    """The training recipe shared by every method in one comparison."""

    epochs: int = attrs.field(default=100)
    batch_size: int = attrs.field(default=64)
    lr: float = attrs.field(default=0.05)
    momentum: float = attrs.field(default=0.9)
    weight_decay: float = attrs.field(default=5e-4)
    hidden: tuple[int, ...] = attrs.field(default=(256, 256), converter=tuple)
    delta_t: int = attrs.field(default=50)
    sparsity: float = attrs.field(default=0.9)
    distribution: str = attrs.field(default="erk")
    model: str = attrs.field(default="mlp")
    drop_fraction: float | None = attrs.field(default=None)
    gamma_sal: float | None = attrs.field(default=None)
    optimizer: str = attrs.field(default="sgd")

    @epochs.validator
    @batch_size.validator
    @delta_t.validator
    def _positive(self, attribute: attrs.Attribute, value: int) -> None:
        if value < 1:
            raise ConfigError(f"--{attribute.name.replace('_', '-')}={value} must be >= 1.")

    @sparsity.validator
    def _sparsity(self, attribute: attrs.Attribute, value: float) -> None:
        if not 0.0 <= value < 1.0:
            raise ConfigError(
                f"--sparsity={value} must lie in [0, 1): it is the fraction of weights removed "
                f"(0.9 keeps 10%)."
            )

    @model.validator
    def _model(self, attribute: attrs.Attribute, value: str) -> None:
        if value not in MODELS:
            raise ConfigError(f"--model={value!r} is not a known model; choose one of {MODELS}.")

    @drop_fraction.validator
    def _drop_fraction(self, attribute: attrs.Attribute, value: float | None) -> None:
        if value is not None and not 0.0 < value <= 1.0:
            raise ConfigError(
                f"--drop-fraction={value} must lie in (0, 1]: it is the initial fraction of "
                f"active weights dropped and regrown per update (RigL uses 0.3)."
            )

    @gamma_sal.validator
    def _gamma_sal(self, attribute: attrs.Attribute, value: float | None) -> None:
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(
                f"--gamma-sal={value} must lie in [0, 1]: neuron ablation removes a neuron with "
                f"fewer than max(1, floor(gamma_sal * k)) salient weights (SRigL uses 0.3)."
            )

    @optimizer.validator
    def _optimizer(self, attribute: attrs.Attribute, value: str) -> None:
        if value not in OPTIMIZERS:
            raise ConfigError(
                f"--optimizer={value!r} is not one of {list(OPTIMIZERS)} (sgd: momentum and "
                f"weight decay from the recipe; adam: torch.optim.Adam with the recipe's weight "
                f"decay)."
            )

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The recipe's optimizer over ``params`` (SGD with momentum, or Adam)."""
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )

    def steps_per_epoch(self, n_train: int) -> int:
        return math.ceil(n_train / self.batch_size)


@attrs.frozen
class RunResult:
    """One training run's outcome.

    ``steps`` counts the whole run's optimizer steps (a resumed run included the ones before
    the checkpoint, whose step is ``resumed_from``); ``seconds`` is the training time of every
    process of the run up to its last checkpoint plus this one's; ``train_loss`` is the loss
    of the run's last step, taken from the checkpoint when nothing was left to train.
    """

    method: str
    seed: int
    test_accuracy: float
    train_loss: float
    seconds: float
    steps: int
    density: float
    itop: float | None
    layers: tuple[dict[str, Any], ...]
    itop_curve: tuple[tuple[int, float], ...] = ()
    resumed_from: int = 0
    masks: dict[str, torch.Tensor] | None = attrs.field(default=None, eq=False, repr=False)
    compact: bool = False
    step_ms: float | None = None
    """Median training step (forward, backward, optimizer, scheduler) of this process, in ms."""
    state_bytes: int | None = None
    """Weights, gradients, optimizer state, index buffers, masks and ever-active sets."""

    @property
    def label(self) -> str:
        """The method, marked when it trained compact."""
        return f"{self.method} (compact)" if self.compact else self.method

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (the optional masks are left out)."""
        return attrs.asdict(self, filter=lambda a, _: a.name != "masks")


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy."""
    model.eval()
    acc = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return acc


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The epoch's batch order, a function of (seed, epoch) only, so a resumed run matches."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(torch.randperm(n, generator=gen).split(batch_size))


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _check_resumable(
    state: Any,
    path: Path,
    method: str,
    recipe: Recipe,
    data: Dataset,
    seed: int,
    compact: bool = False,
) -> None:
    """The checkpoint was written by this same job: method, seed, dataset and every flag."""
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a checkpoint of `sparsity-core train`; resume from "
            f"the folder a run wrote, or start without --resume."
        )
    version = state.get("version", 1)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has version {version!r}, newer than this sparsity-core writes "
            f"({CHECKPOINT_VERSION}); upgrade sparsity-core to resume it."
        )
    if state.get("method") != method:
        raise CheckpointError(
            f"checkpoint {path} is for method {state.get('method')!r}, not {method!r}."
        )
    if bool(state.get("compact", False)) != compact:
        raise CheckpointError(
            f"checkpoint {path} trained {'compact' if state.get('compact') else 'masked'}; "
            f"resume it {'with' if state.get('compact') else 'without'} --compact."
        )
    saved = state.get("recipe")
    if not isinstance(saved, dict):
        raise CheckpointError(
            f"checkpoint {path} does not record the flags of the run that wrote it (written by "
            f"an older sparsity-core), so resuming could silently mix two settings; start it "
            f"over without --resume, or in another --checkpoint-dir."
        )
    mine = {"dataset": data.name, "seed": seed, **attrs.asdict(recipe)}
    theirs = {"dataset": state.get("dataset"), "seed": state.get("seed"), **saved}
    changed = [
        f"{_flag(key)} {_shown(theirs.get(key))} in the checkpoint, {_shown(value)} now"
        for key, value in mine.items()
        if _plain(theirs.get(key)) != _plain(value)
    ]
    if changed:
        raise CheckpointError(
            f"checkpoint {path} was written with other settings: {'; '.join(changed)}. "
            f"Resume with the checkpoint's values, or start over without --resume (or in "
            f"another --checkpoint-dir) to train with the new ones."
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _shown(value: Any) -> str:
    """A value as it is written on the command line (``--hidden 32,32``)."""
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def _params(ctype: ComponentType, component: Any) -> dict[str, Any]:
    """``{"kind": registry name, **hyper-parameters}`` of a component (the public config form)."""
    return component_to_dict(ctype, component)


def _tuned(ctype: ComponentType, component: Any, kind: str, **params: Any) -> Any:
    """``component`` with ``params`` changed if it is the built-in registered as ``kind``
    (the recipe's knobs belong to those plugins; any other component is left as it is)."""
    current = _params(ctype, component)
    if current["kind"] != kind:
        return component
    return component_from_dict(ctype, {**current, **params})


def method_config(
    method: str,
    recipe: Recipe,
    seed: int,
    total_steps: int,
    output_layer: str | None = None,
    *,
    layers: Sequence[LayerSpec] = (),
) -> DSTConfig:
    """The preset ``method`` at the recipe's sparsity, ΔT, distribution, drop fraction and
    ablation threshold (``gamma_sal``, for presets with neuron ablation).

    Neuron-level structures (ablation) never remove ``output_layer``'s neurons: they are the
    classes. Given the sparse ``layers``, an N:M structure whose M does not divide a fan-in
    opts into zero-padding it (``pad=True``) instead of failing, and when the structures pin
    every layer's density (N:M) the global density is set to the one they imply.
    """
    config = preset(
        method,
        density=1.0 - recipe.sparsity,
        delta_t=recipe.delta_t,
        distribution=recipe.distribution,
        seed=seed,
        t_end=int(0.75 * total_steps),
    )
    if recipe.drop_fraction is not None:
        drop = _tuned(ComponentType.SCHEDULE, config.drop, "cosine", alpha=recipe.drop_fraction)
        if _params(ComponentType.SCHEDULE, drop).get("rate"):  # static's rate 0 stays 0
            drop = _tuned(ComponentType.SCHEDULE, drop, "constant", rate=recipe.drop_fraction)
        config = attrs.evolve(config, drop=drop)
    structures = []
    for s in config.structures:
        params = _params(STRUCTURE, s)
        if params["kind"] == "neuron_ablation":
            exempt = tuple(params["exempt"])
            if output_layer:
                exempt = tuple(dict.fromkeys((*exempt, output_layer)))
            gamma = params["gamma_sal"] if recipe.gamma_sal is None else recipe.gamma_sal
            s = _tuned(
                ComponentType.STRUCTURE, s, "neuron_ablation", exempt=exempt, gamma_sal=gamma
            )
        elif params["kind"] == "nm" and any(spec.fan_in % params["m"] for spec in layers):
            s = _tuned(STRUCTURE, s, "nm", pad=True)
        structures.append(s)
    config = attrs.evolve(config, structures=tuple(structures))
    composed = compose_structures(config.structures)
    pinned = [fixed_density(composed, spec) for spec in layers]
    if layers and all(d is not None for d in pinned):
        total = sum(spec.numel for spec in layers)
        implied = sum(d * spec.numel for d, spec in zip(pinned, layers, strict=True)) / total
        config = attrs.evolve(config, density=implied)
    return config


def train_run(
    method: str,
    data: Dataset,
    recipe: Recipe,
    *,
    seed: int = 0,
    progress: ProgressBar | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    keep_masks: bool = False,
    compact: bool = False,
) -> RunResult:
    """Train one model with ``method`` (a preset name, or ``dense``) and evaluate it.

    With ``checkpoint`` set, the model, optimizer, scheduler and step are saved there
    atomically every ``checkpoint_every`` steps; ``resume`` continues from that file.
    ``keep_masks`` returns copies of the final masks in :attr:`RunResult.masks`. ``compact``
    trains the sparse Linear layers compact (:func:`sparsity_core.to_compact`; convolutions
    stay masked).
    """
    if compact and method == DENSE:
        raise ConfigError("the dense baseline has no sparse layers to train compact.")
    torch.manual_seed(seed)
    model = build_model(recipe.model, data.num_features, data.num_classes, recipe.hidden)
    steps_per_epoch = recipe.steps_per_epoch(len(data.y_train))
    total_steps = recipe.epochs * steps_per_epoch
    state = None
    if resume and checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        _check_resumable(state, checkpoint, method, recipe, data, seed, compact)
    config = None
    if state is not None and method != DENSE:
        config = saved_config(state["sparsity"])
    elif method != DENSE:
        output_layer = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        specs = [spec for spec, _ in select_layers(model)]
        config = method_config(method, recipe, seed, total_steps, output_layer, layers=specs)
    if compact:
        masks = state["sparsity"]["masks"] if state is not None else None
        to_compact(
            model, config, total_steps=total_steps, masks=masks, keep_masked=convolutions(model)
        )
    optimizer = recipe.make_optimizer(model.parameters())
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    scheduler = None
    start_step = 0
    saved_loss, saved_seconds = float("nan"), 0.0
    if state is not None:
        if method != DENSE:
            scheduler = DSTScheduler.from_state_dict(model, optimizer, state["sparsity"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        start_step = int(state["step"])
        saved_loss = float(state.get("train_loss", float("nan")))
        saved_seconds = float(state.get("seconds", 0.0))
    elif method != DENSE:
        scheduler = DSTScheduler(model, optimizer, config, total_steps=total_steps)

    def save(step: int, train_loss: float, seconds: float) -> None:
        save_checkpoint(
            {
                "version": CHECKPOINT_VERSION,
                "method": method,
                "compact": compact,
                "dataset": data.name,
                "seed": seed,
                "recipe": attrs.asdict(recipe),
                "arch": {
                    "model": recipe.model,
                    "num_features": data.num_features,
                    "hidden": list(recipe.hidden),
                    "num_classes": data.num_classes,
                },
                "step": step,
                "train_loss": train_loss,
                "seconds": seconds,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_schedule": lr_schedule.state_dict(),
                "sparsity": scheduler.state_dict() if scheduler is not None else None,
            },
            checkpoint,
        )

    if progress is not None:
        progress.update(start_step)
    start = time.perf_counter()
    step = start_step
    train_loss = saved_loss
    step_times: list[float] = []
    for epoch in range(start_step // steps_per_epoch, recipe.epochs):
        batches = _batches(len(data.y_train), recipe.batch_size, seed, epoch)
        for idx in batches[step - epoch * steps_per_epoch :]:
            began = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            optimizer.step()
            lr_schedule.step()
            if scheduler is not None:
                scheduler.step()
            step_times.append(time.perf_counter() - began)
            step += 1
            train_loss = float(loss.item())
            if progress is not None:
                progress.update(postfix=f"{method} loss {train_loss:.3f}")
            if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
                save(step, train_loss, saved_seconds + time.perf_counter() - start)
    # The last step is always saved, so an export or a resume never starts from a stale file.
    if checkpoint is not None and checkpoint_every and step % checkpoint_every != 0:
        save(step, train_loss, saved_seconds + time.perf_counter() - start)
    seconds = saved_seconds + time.perf_counter() - start
    accuracy = evaluate(model, data.x_test, data.y_test)
    if scheduler is None:
        layers = tuple(
            {
                "fqn": n,
                "shape": list(m.weight.shape),
                "structure": "dense",
                "target_sparsity": 0.0,
                "sparsity": 0.0,
                "fan_in_min": m.weight[0].numel(),
                "fan_in_max": m.weight[0].numel(),
                "satisfied": True,
                "active_neurons": m.weight.shape[0],
                "fan_out": m.weight.shape[0],
                "fan_in": [m.weight[0].numel()] * m.weight.shape[0],
            }
            for n, m in _weighted_layers(model)
        )
        density, itop, masks = 1.0, None, None
    else:
        masks = scheduler.masks
        summaries = scheduler.summary()
        layers = tuple(
            {
                "fqn": s.fqn,
                "shape": list(s.shape),
                "structure": s.structure,
                "target_sparsity": 1.0 - s.target_density,
                "sparsity": s.sparsity,
                "fan_in_min": s.fan_in_min,
                "fan_in_max": s.fan_in_max,
                "satisfied": s.satisfied,
                "active_neurons": s.active_neurons,
                "fan_out": s.fan_out,
                "itop": s.itop,
                "fan_in": masks[s.fqn].reshape(s.fan_out, -1).sum(dim=1).tolist(),
            }
            for s in summaries
        )
        density, itop = scheduler.density(), scheduler.itop_rate()
    return RunResult(
        method,
        seed,
        accuracy,
        train_loss,
        seconds,
        step,
        density,
        itop,
        layers,
        itop_curve(scheduler.history) if scheduler is not None else (),
        resumed_from=start_step,
        masks=_copies(masks) if keep_masks else None,
        compact=compact,
        step_ms=statistics.median(step_times) * 1e3 if step_times else None,
        state_bytes=training_state_bytes(model, optimizer, scheduler),
    )


def convolutions(model: nn.Module) -> list[str]:
    """The layers compact training leaves masked (it holds Linear layers only)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d)]


def training_state_bytes(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: DSTScheduler | None
) -> int:
    """Bytes a run keeps between steps: weights, gradients, optimizer state, index buffers and
    (sparse runs) the masks and ever-active sets."""

    def size(t: Any) -> int:
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    total = sum(size(p) + size(p.grad) for p in model.parameters())
    total += sum(size(v) for p in model.parameters() for v in optimizer.state.get(p, {}).values())
    total += sum(size(b) for b in model.buffers())
    if scheduler is not None:
        total += sum(size(lay.mask) + size(lay.ever_active) for lay in scheduler.layers.values())
    return total


def _copies(masks: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if masks is None else {k: v.clone() for k, v in masks.items()}


def _weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)
    ]


def itop_curve(history: Sequence[UpdateRecord]) -> tuple[tuple[int, float], ...]:
    """``(step, ITOP rate)`` after each topology update, from the scheduler's records."""
    by_step: dict[int, list[UpdateRecord]] = {}
    for record in history:
        by_step.setdefault(record.step, []).append(record)
    return tuple((step, itop_rate(records)) for step, records in sorted(by_step.items()))
