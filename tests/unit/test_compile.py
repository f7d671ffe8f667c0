"""torch.compile under the scheduler: compiled training gives eager's masks and weights.

Slow: each case compiles (10-30 s on two cores).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsity_core as sc

pytestmark = pytest.mark.slow


def _run(*, compile_what, compact=False, method="rigl", steps=30):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    config = sc.preset(method, density=0.3, delta_t=4)
    if compact:
        sc.to_compact(model, config, total_steps=40)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = sc.DSTScheduler(model, opt, config, total_steps=40)
    forward = torch.compile(model) if compile_what == "model" else model

    def step(x, y):
        opt.zero_grad()
        loss = nn.functional.mse_loss(forward(x), y)
        loss.backward()
        opt.step()
        return loss

    train_step = torch.compile(step) if compile_what == "step" else step
    gen = torch.Generator().manual_seed(1)
    masks = []
    for _ in range(steps):
        train_step(torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen))
        if scheduler.step():
            masks.append({k: v.clone() for k, v in scheduler.masks.items()})
    return model, masks


def _weights(model):
    return [
        m.dense_weight().detach() if isinstance(m, sc.CompactLinear) else m.weight.detach()
        for m in model.modules()
        if isinstance(m, nn.Linear | sc.CompactLinear)
    ]


@pytest.mark.parametrize(
    ("compile_what", "compact", "atol"),
    [
        ("model", False, 0.0),  # forward and backward compiled: the same arithmetic
        ("step", False, 1e-5),  # the optimizer step too: its fused update rounds differently
        ("step", True, 1e-5),
    ],
    ids=["model", "step", "step-compact"],
)
def test_compiled_training_gives_eagers_masks_and_weights(compile_what, compact, atol):
    eager_model, eager_masks = _run(compile_what=None, compact=compact)
    model, masks = _run(compile_what=compile_what, compact=compact)
    assert len(eager_masks) > 3
    for a, b in zip(eager_masks, masks, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(_weights(eager_model), _weights(model), strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
