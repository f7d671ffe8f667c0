"""Property tests of the engine over combinations of built-ins, through the public testing kit.

Each built-in alone, and each preset as a whole method, is checked by
``tests/conformance``; here the engine is run with every prune x growth pair, degenerate and
NaN gradients, random method configs and stateful growth criteria.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sparsity_core import DSTConfig, DSTScheduler, LayerError
from sparsity_core.testing import (
    builtin_components,
    check_checkpoint_resume,
    check_method_run,
    check_same_seed_same_masks,
)
from sparsity_core.testing import strategies as sst

BUILTINS = builtin_components()


def _names(kind: str) -> list[str]:
    return sorted(cid.split(".", 1)[1] for cid in BUILTINS if cid.startswith(f"{kind}."))


PRUNES, GROWTHS = _names("prune"), _names("growth")
# Drawn from the built-ins only, so the suite does not depend on installed third-party plugins.
BUILTIN_METHODS = sst.method_configs(
    prune=st.sampled_from(PRUNES),
    grow=st.sampled_from(GROWTHS),
    distribution=st.sampled_from(_names("distribution")),
    drop=st.sampled_from(_names("schedule")),
)


class TestEveryPruneGrowthPair:
    """Every built-in prune x growth pair keeps the engine's invariants on every step."""

    @pytest.mark.parametrize(("prune", "grow"), list(itertools.product(PRUNES, GROWTHS)))
    @given(data=st.data())
    def test_budget_is_exact_and_masks_valid_after_every_step(self, prune, grow, data):
        config = data.draw(sst.method_configs(prune=prune, grow=grow), label="config")
        run = data.draw(sst.runs(config, kinds=["mlp", "conv"]), label="run")
        scheduler = check_method_run(config, **run.kwargs())
        assert scheduler.history, "no update happened, so the update checks were not exercised"


class TestDegenerateGradients:
    """All-zero, missing and NaN gradients never break the budget or the zero invariants."""

    @given(config=BUILTIN_METHODS, data=st.data())
    def test_invariants_hold_for_layers_with_zero_or_no_gradient(self, config, data):
        run = data.draw(sst.runs(config, kinds=["dead"]), label="run")
        scheduler = check_method_run(config, **run.kwargs())
        assert {"dead", "unused"} <= set(scheduler.layers)
        assert scheduler.history

    @given(config=BUILTIN_METHODS, data=st.data(), rate=st.sampled_from([0.2, 1.0]))
    def test_invariants_hold_with_nan_gradients_on_update_steps(self, config, data, rate):
        run = data.draw(sst.runs(config), label="run")

        def poison(step: int, model: nn.Module) -> None:
            if step % config.delta_t:
                return
            gen = torch.Generator().manual_seed(step)
            for module in model.modules():
                grad = getattr(getattr(module, "weight", None), "grad", None)
                if grad is not None:
                    grad.masked_fill_(torch.rand(grad.shape, generator=gen) < rate, float("nan"))

        scheduler = check_method_run(config, before_optimizer_step=poison, **run.kwargs())
        assert scheduler.history


class TestRunProperties:
    """Seeding and checkpoints behave as documented for random methods and stateful criteria."""

    @given(config=BUILTIN_METHODS, data=st.data())
    def test_same_seed_gives_same_masks(self, config, data):
        run = data.draw(sst.runs(config), label="run")
        check_same_seed_same_masks(config, **run.kwargs())

    @pytest.mark.parametrize("grow", ["momentum", "unfired"])
    @given(data=st.data())
    def test_checkpoint_round_trip_of_stateful_growth_resumes_bit_identically(self, grow, data):
        """Gradient momentum and ever-active sets are saved and restored exactly."""
        config = data.draw(sst.method_configs(prune="magnitude", grow=grow), label="config")
        run = data.draw(sst.runs(config), label="run")
        resume_at = data.draw(st.integers(1, run.steps - 1), label="resume_at")
        check_checkpoint_resume(config, resume_at=resume_at, **run.kwargs())


class TiedMLP(nn.Module):
    """Two square Linear layers sharing one weight (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 6)
        self.second.weight = self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def test_tied_weights_are_rejected_with_a_clear_error():
    """A weight shared by two layers would need two masks: it is refused, naming both layers."""
    model = TiedMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(LayerError, match=r"'first' and 'second' share one weight tensor"):
        DSTScheduler(model, optimizer, DSTConfig(density=0.5, delta_t=2), total_steps=20)
