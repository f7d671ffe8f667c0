"""scheduler.mask_grads_(): inactive gradients zeroed before something reads them (gradient
clipping), without changing what growth sees."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsity_core as sc
from sparsity_core.errors import SchedulerStateError


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    )


def _run(config, steps, *, mask_calls=0, clip=None):
    model = _mlp().double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = sc.DSTScheduler(model, opt, config, total_steps=steps)
    gen = torch.Generator().manual_seed(1)
    masks = []
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(16, 12, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (16,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        for _ in range(mask_calls):
            scheduler.mask_grads_()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if scheduler.step():
            masks.append({k: v.clone() for k, v in scheduler.masks.items()})
    return model, opt, scheduler, masks


def test_clipping_after_mask_grads_measures_the_active_gradients_only():
    config = sc.preset("rigl", density=0.2, delta_t=5)
    model = _mlp().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = sc.DSTScheduler(model, opt, config, total_steps=50)
    nn.functional.cross_entropy(
        model(torch.randn(16, 12, dtype=torch.float64)), torch.randint(0, 3, (16,))
    ).backward()
    dense = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    expected = torch.linalg.vector_norm(
        torch.stack(
            [
                (p.grad * scheduler.masks[n.rpartition(".")[0]]).norm()
                if n.endswith("weight")
                else p.grad.norm()
                for n, p in model.named_parameters()
            ]
        )
    )
    assert expected < dense  # the inactive gradients are not zero before the call
    scheduler.mask_grads_()
    measured = nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    torch.testing.assert_close(measured, expected)
    for fqn, mask in scheduler.masks.items():
        assert not bool(model.get_submodule(fqn).weight.grad[~mask].any())


@pytest.mark.parametrize("grow", ["gradient", "momentum"])
def test_mask_grads_changes_no_training(grow):
    """Called (twice) every step, it gives the run without it exactly: growth still scores the
    dense gradient (or its momentum, updated once a step), taken before the zeroing."""
    config = sc.preset("rigl", density=0.2, delta_t=5, grow=grow)
    plain = _run(config, 40)
    masked = _run(config, 40, mask_calls=2)
    assert len(plain[3]) > 3
    for a, b in zip(plain[3], masked[3], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for p, q in zip(plain[0].parameters(), masked[0].parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_clipped_run_keeps_inactive_weights_and_their_state_zero():
    config = sc.preset("rigl", density=0.2, delta_t=5)
    model, opt, scheduler, masks = _run(config, 30, mask_calls=1, clip=0.05)
    assert masks
    for fqn, mask in scheduler.masks.items():
        weight = model.get_submodule(fqn).weight
        assert not bool(weight[~mask].any())
        assert not bool(opt.state[weight]["exp_avg"][~mask].any())


def test_mask_grads_after_remove_is_refused():
    config = sc.preset("rigl", density=0.2)
    model = _mlp()
    scheduler = sc.DSTScheduler(
        model, torch.optim.SGD(model.parameters(), lr=0.1), config, total_steps=10
    )
    scheduler.remove()
    with pytest.raises(SchedulerStateError, match="remove"):
        scheduler.mask_grads_()
