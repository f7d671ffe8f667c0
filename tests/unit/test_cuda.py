"""The engine on CUDA tensors (skipped on machines without a GPU)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import sparsity_core as sc
from sparsity_core.testing import check_checkpoint_resume, check_method_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"


class Net(nn.Module):
    """Conv2d and Linear layers whose fan-ins (16, 64, 64) suit N:M groups."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 64, 2)
        self.fc = nn.Linear(64, 64)
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(h)))


def build() -> nn.Module:
    with torch.random.fork_rng(devices=[0]):
        torch.manual_seed(0)
        return Net().to(DEVICE)


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def data():
    gen = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(16, 4, 5, 5, generator=gen).to(DEVICE),
            torch.randn(16, 3, generator=gen).to(DEVICE),
        )
        for _ in range(4)
    ]


@pytest.mark.parametrize(
    ("preset", "density"),
    [("rigl", 0.2), ("set", 0.2), ("srigl", 0.2), ("srigl_no_ablation", 0.2), ("nm_rigl", 0.5)],
)
class TestOnCuda:
    def test_run_invariants_hold_on_cuda(self, preset, density):
        """Budgets, structure, zero inactive weights and optimizer state hold with CUDA masks."""
        config = sc.preset(preset, density=density, delta_t=3)
        scheduler = check_method_run(config, build, steps=20, optimizer_factory=adam, data=data())
        assert all(layer.mask.device.type == "cuda" for layer in scheduler.layers.values())
        assert scheduler.history

    def test_checkpoint_resume_is_bit_identical_on_cuda(self, preset, density):
        """A CUDA run resumed from a checkpoint ends identical to an uninterrupted one."""
        config = sc.preset(preset, density=density, delta_t=3)
        check_checkpoint_resume(
            config, build, steps=20, resume_at=10, optimizer_factory=adam, data=data()
        )


def test_cuda_state_dict_loads_on_cpu():
    """A checkpoint written from CUDA masks loads with weights_only=True into a CPU model."""
    model = build()
    opt = adam(model.parameters())
    sched = sc.DSTScheduler(model, opt, sc.preset("srigl", density=0.2, delta_t=2), total_steps=10)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    cpu_model = Net()
    cpu = sc.DSTScheduler.from_state_dict(cpu_model, adam(cpu_model.parameters()), state)
    for fqn, mask in sched.masks.items():
        assert torch.equal(cpu.masks[fqn], mask.cpu())
