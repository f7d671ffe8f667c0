"""The main job: train a small model with a DST method (and the dense baseline) on offline data."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from .config import DSTConfig, preset
from .data import Dataset
from .errors import CheckpointError, ConfigError
from .layers import LayerSpec, select_layers
from .models import MODELS, build_mlp, build_model
from .progress import ProgressBar
from .scheduler import DSTScheduler
from .structures import COARSE, compose_structures, level_of
from .telemetry import UpdateRecord, itop_rate

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
                f"fewer than gamma_sal * k salient weights (SRigL uses 0.3)."
            )

    def steps_per_epoch(self, n_train: int) -> int:
        return math.ceil(n_train / self.batch_size)


@attrs.frozen
class RunResult:
    """One training run's outcome."""

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
    masks: dict[str, torch.Tensor] | None = attrs.field(default=None, eq=False, repr=False)

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


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
    if recipe.drop_fraction is not None and hasattr(config.drop, "alpha"):
        config = attrs.evolve(config, drop=attrs.evolve(config.drop, alpha=recipe.drop_fraction))
    structures = []
    for s in config.structures:
        exempt = getattr(s, "exempt", None)
        if output_layer and level_of(s) == COARSE and exempt is not None:
            s = attrs.evolve(s, exempt=tuple(dict.fromkeys((*exempt, output_layer))))
        if recipe.gamma_sal is not None and hasattr(s, "gamma_sal"):
            s = attrs.evolve(s, gamma_sal=recipe.gamma_sal)
        m = getattr(s, "m", None)
        if m is not None and hasattr(s, "pad") and any(spec.fan_in % m for spec in layers):
            s = attrs.evolve(s, pad=True)
        structures.append(s)
    config = attrs.evolve(config, structures=tuple(structures))
    composed = compose_structures(config.structures)
    pinned = [getattr(composed, "fixed_density", lambda _: None)(spec) for spec in layers]
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
) -> RunResult:
    """Train one model with ``method`` (a preset name, or ``dense``) and evaluate it.

    With ``checkpoint`` set, the model, optimizer, scheduler and step are saved there
    atomically every ``checkpoint_every`` steps; ``resume`` continues from that file.
    ``keep_masks`` returns copies of the final masks in :attr:`RunResult.masks`.
    """
    torch.manual_seed(seed)
    model = build_model(recipe.model, data.num_features, data.num_classes, recipe.hidden)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    steps_per_epoch = recipe.steps_per_epoch(len(data.y_train))
    total_steps = recipe.epochs * steps_per_epoch
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    scheduler = None
    start_step = 0
    if resume and checkpoint is not None and checkpoint.exists():
        try:
            state = torch.load(checkpoint, weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read checkpoint {checkpoint}: {exc}") from exc
        if state.get("method") != method:
            raise CheckpointError(
                f"checkpoint {checkpoint} is for method {state.get('method')!r}, not {method!r}."
            )
        if method != DENSE:
            scheduler = DSTScheduler.from_state_dict(model, optimizer, state["sparsity"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        start_step = int(state["step"])
    elif method != DENSE:
        output_layer = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        specs = [spec for spec, _ in select_layers(model)]
        config = method_config(method, recipe, seed, total_steps, output_layer, layers=specs)
        scheduler = DSTScheduler(model, optimizer, config, total_steps=total_steps)

    if progress is not None:
        progress.update(start_step)
    start = time.perf_counter()
    step = start_step
    loss = torch.tensor(float("nan"))
    for epoch in range(start_step // steps_per_epoch, recipe.epochs):
        batches = _batches(len(data.y_train), recipe.batch_size, seed, epoch)
        for idx in batches[step - epoch * steps_per_epoch :]:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            optimizer.step()
            lr_schedule.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            if progress is not None:
                progress.update(postfix=f"{method} loss {loss.item():.3f}")
            if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
                _atomic_save(
                    {
                        "method": method,
                        "arch": {
                            "model": recipe.model,
                            "num_features": data.num_features,
                            "hidden": list(recipe.hidden),
                            "num_classes": data.num_classes,
                        },
                        "step": step,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "lr_schedule": lr_schedule.state_dict(),
                        "sparsity": scheduler.state_dict() if scheduler is not None else None,
                    },
                    checkpoint,
                )
    seconds = time.perf_counter() - start
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
        float(loss.item()),
        seconds,
        step - start_step,
        density,
        itop,
        layers,
        itop_curve(scheduler.history) if scheduler is not None else (),
        {k: v.clone() for k, v in masks.items()} if keep_masks and masks is not None else None,
    )


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
