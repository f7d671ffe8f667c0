"""The budget rule (issue 17): layer budgets are rounded over the whole model, and what neuron
ablation leaves unused in one layer moves to others, so the model holds its global density.

Before this rule, constant fan-in rounded each layer alone: the MNIST-1D CNN at 90% started
2.4% under its target (500 of 512.5 weights) and lost more with every ablation.
"""

from __future__ import annotations

import copy
import itertools
import math

import attrs
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import sparsity_core
from sparsity_app.models import build_cnn1d
from sparsity_core import CheckpointError, ConfigError, DSTScheduler, LayerError
from sparsity_core.budgets import Item, apportion
from sparsity_core.checkpoint import SCHEMA_VERSION
from sparsity_core.planning import plan_layers
from sparsity_core.selection import count
from sparsity_plugins.structure_unstructured import Unstructured


def cnn() -> nn.Sequential:
    """The MNIST-1D paper's 1-D CNN shape: 5-tap then 3-tap stride-2 convolutions, a head."""
    return build_cnn1d(40, (25, 25, 25), 10)


def mlp(widths) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def totals(plan) -> tuple[int, float]:
    held = sum(layer.budget for layer in plan.layers)
    target = sum(layer.target_density * layer.spec.numel for layer in plan.layers)
    return held, target


def _plan_or_reject(model, config):
    try:
        return plan_layers(model, config, total_steps=100)
    except LayerError:  # a layer left without any weight: not this test's subject
        assume(False)


class TestPlannedBudgets:
    @pytest.mark.parametrize("method", ["srigl", "srigl_no_ablation"])
    @pytest.mark.parametrize("density", [0.05, 0.1, 0.2, 0.3])
    def test_constant_fan_in_meets_the_density_within_one_weight_per_layer(self, method, density):
        plan = plan_layers(cnn(), sparsity_core.preset(method, density=density), total_steps=100)
        held, target = totals(plan)
        assert held <= target + 1e-6
        assert target - held <= len(plan.layers), (
            f"{method} at density {density}: {held} weights planned for a target of "
            f"{target:.1f} ({[layer.budget for layer in plan.layers]})"
        )
        for layer in plan.layers:
            assert layer.budget % layer.spec.fan_out == 0  # still a constant fan-in

    def test_a_layer_rounding_to_nothing_alone_gets_one_input_per_neuron(self):
        """At 2%, the 5-tap first convolution rounds to k = 0 alone (a LayerError per layer);
        globally it gets k = 1 and the head gives up inputs to pay for it."""
        config = sparsity_core.preset("srigl", density=0.02)
        with pytest.raises(LayerError, match="leaves it no weight"):
            plan_layers(cnn(), attrs.evolve(config, budget_rounding="per_layer"), total_steps=9)
        plan = plan_layers(cnn(), config, total_steps=100)
        assert [p.budget // p.spec.fan_out for p in plan.layers[:3]] == [1, 1, 1]
        held, target = totals(plan)
        assert held - target <= plan.layers[-1].spec.fan_out  # the smallest choice there is

    def test_per_layer_rounding_is_still_available(self):
        config = sparsity_core.preset("srigl_no_ablation", density=0.1, budget_rounding="per_layer")
        plan = plan_layers(cnn(), config, total_steps=100)
        for layer in plan.layers:
            k = math.floor(layer.target_density * layer.spec.fan_in + 0.5)
            assert layer.budget == k * layer.spec.fan_out

    @given(
        widths=st.lists(st.integers(2, 40), min_size=2, max_size=5),
        density=st.floats(0.02, 0.9),
    )
    def test_unstructured_budgets_sum_to_the_target_exactly(self, widths, density):
        model = mlp(widths)
        plan = _plan_or_reject(model, sparsity_core.preset("rigl", density=density))
        held, target = totals(plan)
        assume(all(p.target_density * p.spec.numel >= 1 for p in plan.layers))
        assert held == math.floor(target + 1e-6)

    @given(
        widths=st.lists(st.integers(2, 40), min_size=2, max_size=5),
        density=st.floats(0.05, 0.9),
    )
    def test_global_rounding_is_never_worse_than_rounding_each_layer(self, widths, density):
        model = mlp(widths)
        config = sparsity_core.preset("srigl_no_ablation", density=density)
        plan = _plan_or_reject(model, config)
        alone = _plan_or_reject(model, attrs.evolve(config, budget_rounding="per_layer"))
        held, target = totals(plan)
        held_alone, _ = totals(alone)
        # At or below the target, or (when the smallest choice is above it) no further above.
        assert held <= math.floor(target + 1e-6) or held <= held_alone
        if held_alone <= target:
            assert held >= held_alone  # never further below the target
        widest = max(p.spec.fan_out for p in plan.layers)
        for a, b in zip(plan.layers, alone.layers, strict=True):
            # Two inputs per neuron at most, or one input per neuron of the widest layer.
            assert abs(a.budget - b.budget) <= max(2 * a.spec.fan_out, widest)


class TestApportion:
    def test_exact_search_reaches_what_rounding_each_alone_misses(self):
        items = [Item(50, 25, (-1, 0, 1), 58.4), Item(100, 25, (-1, 0, 1), 100.0)]
        items += [Item(100, 25, (-1, 0, 1), 100.0), Item(250, 10, (-1, 0, 1), 254.4)]
        assert sum(apportion(items, 512)) == 510

    def test_free_layers_take_the_remainder_exactly(self):
        items = [Item(100, 25, (-1, 0, 1), 112.0), Item(40, 1, ideal=41.0, low=1, high=90)]
        counts = apportion(items, 152)
        assert sum(counts) == 152

    def test_never_above_the_target(self):
        items = [Item(30, 30, (-1, 0, 1), 40.0), Item(20, 20, (-1, 0, 1), 25.0)]
        assert sum(apportion(items, 59)) <= 59


def _train(model, optimizer, scheduler, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 40, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    sums = []
    for step in range(steps):
        idx = torch.arange(16) + 16 * (step % 4)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
        if scheduler.step():
            sums.append(sum(count(layer.mask) for layer in scheduler.layers.values()))
    return sums


class TestAblationLeftoverMoves:
    @pytest.mark.parametrize("density", [0.02, 0.05, 0.1])
    @pytest.mark.parametrize("build", [cnn, lambda: mlp([40, 256, 256, 10])], ids=["cnn", "mlp"])
    def test_the_model_holds_its_density_after_every_update(self, density, build):
        """Also where one ablated neuron's remainder in a wide layer (256 inputs per step) is
        more than two steps of the head (10 per step): the head may take it (with two steps
        at most, the MLP at 2% ended 3.3% short)."""
        torch.manual_seed(0)
        model = build()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        config = sparsity_core.preset(
            "srigl",
            density=density,
            delta_t=5,
            structures=[{"kind": "neuron_ablation", "gamma_sal": 0.9}, "constant_fan_in"],
        )
        scheduler = DSTScheduler(model, optimizer, config, total_steps=200)
        target = sum(layer.planned for layer in scheduler.layers.values())
        sums = _train(model, optimizer, scheduler, 150)
        ablated = [
            r for r in scheduler.history if r.active_neurons < scheduler.layers[r.fqn].spec.fan_out
        ]
        assert ablated, "the test needs ablation to happen"
        for held in sums:
            assert held <= target
            assert target - held <= 0.01 * target + len(scheduler.layers), (sums, target)
        # Every layer still satisfies its structure with what it now holds.
        for layer in scheduler.layers.values():
            assert layer.structure.satisfied(layer.mask, layer.spec, layer.budget)
            assert count(layer.mask) == layer.budget

    def test_resume_continues_bit_identically_with_moved_budgets(self):
        config = sparsity_core.preset(
            "srigl",
            density=0.1,
            delta_t=5,
            structures=[{"kind": "neuron_ablation", "gamma_sal": 0.9}, "constant_fan_in"],
        )

        def build():
            torch.manual_seed(0)
            model = cnn()
            return model, torch.optim.Adam(model.parameters(), lr=1e-2)

        model, optimizer = build()
        scheduler = DSTScheduler(model, optimizer, config, total_steps=200)
        _train(model, optimizer, scheduler, 60)
        state = {
            "model": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "sparsity": scheduler.state_dict(),
        }
        assert state["sparsity"]["schema_version"] == SCHEMA_VERSION
        moved = [
            fqn
            for fqn, entry in state["sparsity"]["layers"].items()
            if entry["allocation"] != entry["budget"]
        ]
        assert moved, "the test needs a budget that moved between layers"
        _train(model, optimizer, scheduler, 40, seed=1)

        model2, optimizer2 = build()
        model2.load_state_dict(state["model"])
        optimizer2.load_state_dict(state["optimizer"])
        resumed = DSTScheduler.from_state_dict(model2, optimizer2, state["sparsity"])
        _train(model2, optimizer2, resumed, 40, seed=1)
        for fqn, layer in scheduler.layers.items():
            assert torch.equal(layer.mask, resumed.layers[fqn].mask)
            assert layer.budget == resumed.layers[fqn].budget
        for a, b in zip(model.parameters(), model2.parameters(), strict=True):
            assert torch.equal(a, b)


def _srigl_cnn(**overrides):
    structures = [{"kind": "neuron_ablation", "gamma_sal": 0.9}, "constant_fan_in"]
    return sparsity_core.preset("srigl", density=0.1, delta_t=5, structures=structures, **overrides)


def _trained(config, steps=60):
    torch.manual_seed(0)
    model = cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = DSTScheduler(model, optimizer, config, total_steps=200)
    _train(model, optimizer, scheduler, steps)
    return model, optimizer, scheduler


class TestBudgetBookkeeping:
    def test_per_layer_budgets_never_move(self):
        """Without global rounding a layer keeps its own budget; ablation leaves its
        remainder unused (the rule before schema 2)."""
        _, _, scheduler = _trained(_srigl_cnn(budget_rounding="per_layer"))
        assert any(r.active_neurons < r.fan_out for r in scheduler.history)
        for layer in scheduler.layers.values():
            assert layer.budget == layer.planned
            assert count(layer.mask) <= layer.budget

    def test_load_state_dict_restores_what_each_layer_holds(self):
        _, _, scheduler = _trained(_srigl_cnn())
        state = scheduler.state_dict()
        assert any(e["allocation"] != e["budget"] for e in state["layers"].values())
        torch.manual_seed(0)
        model2 = cnn()
        optimizer2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
        fresh = DSTScheduler(model2, optimizer2, _srigl_cnn(), total_steps=200)
        fresh.load_state_dict(state)
        for fqn, layer in scheduler.layers.items():
            assert fresh.layers[fqn].budget == layer.budget
            assert torch.equal(fresh.layers[fqn].mask, layer.mask)

    @pytest.mark.parametrize(
        ("edit", "match"),
        [
            (lambda e: e.update(allocation=-3), "not a positive int"),
            (lambda e: e.update(allocation=True), "not a positive int"),
            (lambda e: e.update(allocation=10**6), "exceeds the layer's"),
        ],
    )
    def test_a_corrupt_allocation_is_refused(self, edit, match):
        model, optimizer, scheduler = _trained(_srigl_cnn(), steps=10)
        state = scheduler.state_dict()
        edit(state["layers"]["1"])
        scheduler.remove()
        with pytest.raises(CheckpointError, match=match):
            DSTScheduler.from_state_dict(model, optimizer, state)

    def test_layers_holding_more_than_planned_in_all_are_refused(self):
        """Each mask fits its own allocation, but together they exceed the planned total."""
        config = sparsity_core.preset("srigl_no_ablation", density=0.1)
        model = cnn()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = DSTScheduler(model, optimizer, config, total_steps=100)
        state = scheduler.state_dict()
        layer = scheduler.layers["1"]
        bigger = layer.mask.clone()
        rows = bigger.reshape(layer.spec.fan_out, -1)
        for r in range(layer.spec.fan_out):
            rows[r, int(torch.nonzero(~rows[r])[0])] = True  # one more input per neuron
        state["masks"]["1"] = bigger
        state["ever_active"]["1"] = bigger.clone()
        state["layers"]["1"]["allocation"] = count(bigger)
        scheduler.remove()
        with pytest.raises(CheckpointError, match=r"more than the \d+ their budgets allow"):
            DSTScheduler.from_state_dict(model, optimizer, state)


class TestBadInput:
    def test_an_unknown_budget_rounding_is_refused(self):
        with pytest.raises(ConfigError, match=r"budget_rounding='model'.*'global'"):
            sparsity_core.preset("rigl", budget_rounding="model")

    @pytest.mark.parametrize("bad", [0, True, "2", 1.5])
    def test_a_structure_with_a_bad_budget_step_is_named(self, bad):
        @attrs.frozen
        class BadStep(Unstructured):
            def budget_step(self, spec, mask=None):
                return bad

        registry = sparsity_core.get_registry().with_component("structure", "bad_step", BadStep)
        config = sparsity_core.DSTConfig.from_dict(
            {"density": 0.2, "structures": [{"kind": "bad_step"}]}, registry
        )
        with pytest.raises(ConfigError, match=r"BadStep\.budget_step\(\) returned"):
            plan_layers(cnn(), config, total_steps=100, registry=registry)


class TestOlderCheckpoints:
    def test_a_schema_1_checkpoint_resumes_with_per_layer_budgets(self):
        """Schema 1 had no global rounding and ablated every layer: it loads as it was."""
        ablation = {"kind": "neuron_ablation", "exempt_output": False}
        config = sparsity_core.preset(
            "srigl",
            density=0.1,
            budget_rounding="per_layer",
            structures=[ablation, "constant_fan_in"],
        )
        torch.manual_seed(0)
        model = cnn()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        scheduler = DSTScheduler(model, optimizer, config, total_steps=100)
        state = scheduler.state_dict()
        old = {**state, "schema_version": 1, "config": dict(state["config"])}
        del old["config"]["budget_rounding"]
        old["config"]["structures"] = [
            {k: v for k, v in s.items() if k != "exempt_output"}
            for s in state["config"]["structures"]
        ]
        old["layers"] = {
            fqn: {"shape": e["shape"], "budget": e["budget"]} for fqn, e in state["layers"].items()
        }
        scheduler.remove()
        resumed = DSTScheduler.from_state_dict(model, optimizer, old)
        assert resumed.config.budget_rounding == "per_layer"
        assert resumed.config.structures[0].exempt_output is False
        for fqn, layer in scheduler.layers.items():
            assert torch.equal(layer.mask, resumed.layers[fqn].mask)
