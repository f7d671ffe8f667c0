"""Optimizer state stays consistent with the masks, whatever the optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsity_core
from sparsity_core import DSTScheduler

OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    "rmsprop_momentum": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}
STEPS = 20


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def _param_state(optimizer, weight) -> dict[str, torch.Tensor]:
    """Every optimizer state tensor of ``weight`` shaped like it (found independently)."""
    return {
        key: value
        for key, value in optimizer.state.get(weight, {}).items()
        if torch.is_tensor(value) and value.shape == weight.shape
    }


def _state_keys(optimizer) -> dict[int, tuple[str, ...]]:
    return {id(p): tuple(sorted(s)) for p, s in optimizer.state.items()}


@pytest.mark.parametrize("make_optimizer", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
class TestOptimizerStateUnderDST:
    """RigL training keeps weights and optimizer state exactly zero where masks are off."""

    def test_state_follows_masks(self, make_optimizer):
        """After every step, inactive and freshly grown positions hold exactly zero everywhere."""
        model = _mlp()
        optimizer = make_optimizer(model.parameters())
        config = sparsity_core.preset("rigl", density=0.2, delta_t=3)
        scheduler = DSTScheduler(model, optimizer, config, total_steps=40)
        masks = scheduler.masks
        mask_ptrs = {fqn: m.data_ptr() for fqn, m in masks.items()}
        weights = {fqn: layer.weight for fqn, layer in scheduler.layers.items()}
        gen = torch.Generator().manual_seed(0)
        keys_after_first_step = None
        grown_total = 0
        update_steps = []
        for step in range(1, STEPS + 1):
            x = torch.randn(16, 16, generator=gen)
            y = torch.randn(16, 4, generator=gen)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            before = {fqn: m.clone() for fqn, m in masks.items()}
            records = scheduler.step()
            if records:
                update_steps.append(step)
            if keys_after_first_step is None:
                keys_after_first_step = _state_keys(optimizer)
            else:
                assert _state_keys(optimizer) == keys_after_first_step, step

            for fqn, mask in scheduler.masks.items():
                assert mask is masks[fqn]
                assert mask.data_ptr() == mask_ptrs[fqn]
                weight = weights[fqn].detach()
                state = _param_state(optimizer, weights[fqn])
                assert state, f"{fqn}: optimizer keeps no per-element state"
                assert int(mask.sum()) == scheduler.layers[fqn].budget
                assert bool((weight[~mask] == 0).all()), (step, fqn)
                for key, value in state.items():
                    assert bool((value[~mask] == 0).all()), (step, fqn, key)
                grown = mask & ~before[fqn]
                if not records:
                    assert not grown.any(), (step, fqn)
                    continue
                grown_total += int(grown.sum())
                assert bool((weight[grown] == 0).all()), (step, fqn)
                for key, value in state.items():
                    assert bool((value[grown] == 0).all()), (step, fqn, key)

        assert update_steps == [3, 6, 9, 12, 15, 18]
        assert grown_total > 0
        assert set(scheduler.masks) == {"0", "2", "4"}


class TestStateAtConstruction:
    """Attaching a scheduler to an optimizer that already holds state cleans that state."""

    @pytest.mark.parametrize(
        "make_optimizer",
        [OPTIMIZERS["adam"], lambda p: torch.optim.Adagrad(p, initial_accumulator_value=0.5)],
        ids=["adam_warm", "adagrad_initial_accumulator"],
    )
    def test_existing_state_is_zeroed_where_masked(self, make_optimizer):
        """Non-zero state from dense warm-up steps is zeroed at every inactive position."""
        model = _mlp()
        optimizer = make_optimizer(model.parameters())
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(16, 16, generator=gen)).pow(2).mean().backward()
            optimizer.step()
        config = sparsity_core.preset("rigl", density=0.2, delta_t=3)
        scheduler = DSTScheduler(model, optimizer, config, total_steps=40)
        for layer in scheduler.layers.values():
            state = _param_state(optimizer, layer.weight)
            assert state
            for key, value in state.items():
                assert bool((value[~layer.mask] == 0).all()), key
                assert bool((value[layer.mask] != 0).any()), key
            assert bool((layer.weight.detach()[~layer.mask] == 0).all())
