"""Planning is a pure function: model + config + registry -> layers, structures, budgets."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import sparsity_core as sc
from sparsity_core.config import LayerRule
from sparsity_core.errors import ConfigError
from sparsity_core.planning import plan_layers


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )


class TestPlanLayers:
    """plan_layers reads the model and never changes it; the scheduler builds on its result."""

    def test_budgets_match_the_scheduler_and_the_model_is_untouched(self):
        model = _mlp()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        config = sc.preset("srigl", density=0.2, delta_t=5)
        plan = plan_layers(model, config, total_steps=100)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert plan.config.t_end == 75 and plan.total_steps == 100
        scheduler = sc.DSTScheduler(
            model, torch.optim.SGD(model.parameters()), config, total_steps=100
        )
        assert {p.spec.fqn: p.budget for p in plan.layers} == {
            fqn: layer.budget for fqn, layer in scheduler.layers.items()
        }
        assert {p.spec.fqn: p.target_density for p in plan.layers} == scheduler.target_densities

    def test_dense_rules_are_reported_as_skipped(self):
        config = sc.preset("rigl", delta_t=5, rules=[LayerRule("4", dense=True)])
        plan = plan_layers(_mlp(), config, total_steps=100)
        assert [p.spec.fqn for p in plan.layers] == ["0", "2"]
        assert [(s.fqn, s.reason) for s in plan.skipped] == [("4", "dense by LayerRule('4')")]

    def test_bad_input_fails_in_planning(self):
        with pytest.raises(ConfigError, match="total_steps"):
            plan_layers(_mlp(), sc.preset("rigl"), total_steps=0)

    def test_resuming_needs_no_private_keyword(self):
        """The public constructor takes only public arguments; from_state_dict resumes."""
        params = inspect.signature(sc.DSTScheduler).parameters
        assert not [name for name in params if name.startswith("_")]
