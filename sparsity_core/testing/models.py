"""Tiny models, optimizers and data for the kit's run checks (and for your own tests).

Every model's sparse layers have fan-ins that are multiples of ``unit``, so N:M structures with
any M dividing ``unit`` fit them. Factories build the same initial weights on every call and
leave the global RNG untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODEL_KINDS", "OPTIMIZERS", "RunSpec", "batches", "model_factory"]

OUTPUTS = 3
BATCH = 8


class MLP(nn.Module):
    """Three Linear layers: ``unit -> width -> width -> 3``."""

    def __init__(self, unit: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(unit, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, OUTPUTS),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvNet(nn.Module):
    """Conv2d (2x2 kernel), then Conv1d (kernel 3) over the flattened map, then Linear."""

    def __init__(self, unit: int, width: int) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(unit, width, 2)
        self.conv1d = nn.Conv1d(width, width, 3)
        self.head = nn.Linear(width, OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2d(x)).flatten(2)
        h = torch.relu(self.conv1d(h)).mean(dim=-1)
        return self.head(h)


class DeadBranchMLP(nn.Module):
    """An MLP with a layer whose output is multiplied by 0 (all-zero gradient) and one never
    called (no gradient at all)."""

    def __init__(self, unit: int, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(unit, width)
        self.dead = nn.Linear(width, OUTPUTS)
        self.unused = nn.Linear(width, width)
        self.out = nn.Linear(width, OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        return self.out(h) + 0.0 * self.dead(h)


MODEL_KINDS: dict[str, tuple[type[nn.Module], Callable[[int], tuple[int, ...]]]] = {
    "mlp": (MLP, lambda unit: (unit,)),
    "conv": (ConvNet, lambda unit: (unit, 5, 5)),
    "dead": (DeadBranchMLP, lambda unit: (unit,)),
}


def model_factory(kind: str, unit: int, width: int, seed: int) -> Callable[[], nn.Module]:
    """A factory building the same model of ``kind`` (a key of ``MODEL_KINDS``) on every call."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind {kind!r} is not one of {sorted(MODEL_KINDS)}.")
    cls = MODEL_KINDS[kind][0]

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(unit, width)

    return build


def batches(kind: str, unit: int, seed: int, count: int = 4) -> list[tuple[torch.Tensor, ...]]:
    """``count`` fixed ``(inputs, targets)`` batches for a model of ``kind``."""
    gen = torch.Generator().manual_seed(seed)
    shape = MODEL_KINDS[kind][1](unit)
    return [
        (torch.randn((BATCH, *shape), generator=gen), torch.randn((BATCH, OUTPUTS), generator=gen))
        for _ in range(count)
    ]


def sgd_momentum(params: Any) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay (a momentum buffer per weight)."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)


def adam(params: Any) -> torch.optim.Optimizer:
    """Adam (two moment tensors per weight)."""
    return torch.optim.Adam(params, lr=1e-2)


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd_momentum": sgd_momentum,
    "adam": adam,
}


def mse(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean squared error of an ``(inputs, targets)`` batch."""
    inputs, targets = batch
    return F.mse_loss(model(inputs), targets)


@attrs.frozen(repr=False)
class RunSpec:
    """A short training run: model, optimizer, batches and the number of optimizer steps."""

    model_factory: Callable[[], nn.Module]
    optimizer_factory: Callable[[Any], torch.optim.Optimizer]
    data: tuple[Any, ...] = attrs.field(converter=tuple)
    steps: int
    label: str = ""

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~sparsity_core.testing.check_method_run`."""
        return {
            "model_factory": self.model_factory,
            "optimizer_factory": self.optimizer_factory,
            "data": self.data,
            "steps": self.steps,
        }

    @classmethod
    def build(
        cls, kind: str, unit: int, width: int, seed: int, optimizer: str, steps: int
    ) -> RunSpec:
        """A run of ``kind`` with the named optimizer (a key of ``OPTIMIZERS``)."""
        return cls(
            model_factory(kind, unit, width, seed),
            OPTIMIZERS[optimizer],
            batches(kind, unit, seed),
            steps,
            label=f"{kind} unit={unit} width={width} seed={seed} {optimizer} {steps} steps",
        )

    def __repr__(self) -> str:
        return f"RunSpec({self.label or self.steps})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Hypothesis prints drawn values with this (not the tensors of ``data``)."""
        printer.text(repr(self))
