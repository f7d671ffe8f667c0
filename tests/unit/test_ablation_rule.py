"""SRigL's neuron-ablation rule (issue 17), case by case against the old one.

The rule: a neuron's salient weights are those the drop keeps plus the layer's ``n_drop``
highest growth scores over all positions; it is ablated with fewer than
``max(1, floor(gamma_sal * k))`` of them, ``k`` the layer's fan-in before any ablation; the
rule is applied to every neuron (an ablated neuron comes back when salient again), and the
model's output layer is never ablated. Each test below failed under the old rule (``k`` the
current, inflated fan-in, a real-valued threshold, candidates only among inactive positions
of active neurons, no revival, no output exemption).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsity_core
from sparsity_core import LayerSpec
from sparsity_core.planning import plan_layers
from sparsity_core.structures import active_rows_of, compose_structures, structure_capabilities
from sparsity_plugins.structure_ablation import NeuronAblation
from sparsity_plugins.structure_fan_in import ConstantFanIn

SPEC = LayerSpec("hidden", (8, 20), "Linear")
K = 4
BUDGET = K * SPEC.fan_out


def srigl(**ablation) -> object:
    return compose_structures((NeuronAblation(**ablation), ConstantFanIn()))


def rows_mask(counts: list[int]) -> torch.Tensor:
    """Row r active at its first counts[r] inputs."""
    mask = torch.zeros(SPEC.shape, dtype=torch.bool)
    for r, c in enumerate(counts):
        mask[r, :c] = True
    return mask


def update(structure, previous, keep, grow_scores):
    new = structure.fill(grow_scores, keep, ~previous, BUDGET, SPEC, previous=previous)
    assert structure.satisfied(new, SPEC, BUDGET)
    return new


def scores_in(rows: list[int], columns: slice) -> torch.Tensor:
    scores = torch.zeros(SPEC.shape)
    for r in rows:
        scores[r, columns] = 10.0 + torch.arange(scores[r, columns].numel(), dtype=torch.float)
    return scores


class TestThreshold:
    def test_one_salient_weight_of_k_4_keeps_a_neuron_at_gamma_0_3(self):
        """floor(0.3 * 4) = 1: a neuron with one salient weight stays (the old rule, 1 < 1.2,
        ablated it)."""
        previous = rows_mask([K] * 8)
        keep = previous.clone()
        keep[0, 1:K] = False  # neuron 0 keeps one weight; 3 dropped in all
        grow = scores_in([1, 2, 3], slice(K, K + 1))  # the 3 top growth scores elsewhere
        new = update(srigl(), previous, keep, grow)
        assert bool(active_rows_of(new)[0])

    def test_the_threshold_does_not_rise_once_neurons_are_ablated(self):
        """Two neurons ablated earlier leave 6 at k = 5; the threshold still comes from the
        layer's k = 4 (1 salient weight), not from 5 (the old rule: 1 < 1.5, ablated)."""
        previous = rows_mask([0, 0] + [5] * 5 + [7])
        previous[7, 5:] = False  # 6 active neurons x 5 = 30 of the budget of 32
        keep = previous.clone()
        keep[2, 1:5] = False  # neuron 2 keeps one weight
        grow = torch.zeros(SPEC.shape)
        grow[3:7, 10] = 1.0  # the 4 top growth scores go to other neurons
        grow[0:2] = -1.0  # the ablated neurons stay unattractive
        new = update(srigl(), previous, keep, grow)
        assert bool(active_rows_of(new)[2])
        assert not bool(active_rows_of(new)[:2].any())

    def test_a_neuron_with_nothing_salient_is_still_ablated(self):
        previous = rows_mask([K] * 8)
        keep = previous.clone()
        keep[0] = False
        grow = scores_in([1, 2, 3, 4], slice(K, K + 1))
        new = update(srigl(), previous, keep, grow)
        assert not bool(active_rows_of(new)[0])


class TestSalientSet:
    def test_weights_dropped_now_count_when_their_gradient_is_high(self):
        """Neuron 0 lost all 4 weights to the drop, but those positions hold the layer's top
        growth scores: they are salient (the old rule looked only at inactive positions)."""
        previous = rows_mask([K] * 8)
        keep = previous.clone()
        keep[0] = False
        grow = scores_in([0], slice(0, K))
        new = update(srigl(), previous, keep, grow)
        assert bool(active_rows_of(new)[0])
        assert not bool((new & previous & ~keep).any())  # a drop is never undone

    def test_an_ablated_neuron_comes_back_when_salient_again(self):
        """Neuron 0 was ablated (7 neurons x 4 hold 28 of 32); the update's 6 top growth
        scores all lie in it, so it is salient again and regrows (the old rule never
        revived)."""
        previous = rows_mask([0] + [K] * 7)
        keep = previous.clone()
        keep[1:7, 0] = False  # 6 dropped
        grow = scores_in([0], slice(0, 6))
        new = update(srigl(), previous, keep, grow)
        assert bool(active_rows_of(new)[0]), "the salient ablated neuron was not revived"
        assert bool(active_rows_of(new).all())

    def test_the_minimum_of_active_neurons_keeps_those_active_before_not_revived_ones(self):
        """Every neuron is below the threshold (3 salient weights of 4 needed) but the minimum
        keeps 4 of 8 active: they are the 4 that were active, not 4 ablated neurons revived
        without being salient (found by the hypothesis sequence test; the least-salient-first
        order with ties by index revived neurons 4-7)."""
        previous = rows_mask([8] * 4 + [0] * 4)
        keep = previous & rows_mask([2] * 8)  # 24 dropped
        grow = torch.zeros(SPEC.shape)
        grow[:4, :2] = 100.0  # 8 of the 24 top scores lie on kept weights
        grow[:4, 8] = 50.0  # each active neuron: 2 kept + 1 = 3 salient
        grow[4:, :3] = 50.0  # each ablated neuron: 3 salient
        s = srigl(gamma_sal=1.0, min_active_fraction=0.5)
        new = update(s, previous, keep, grow)
        assert active_rows_of(new).tolist() == [True] * 4 + [False] * 4


class TestOutputLayer:
    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 6))

    def test_srigl_never_ablates_the_output_layer(self):
        plan = plan_layers(self.model(), sparsity_core.preset("srigl"), total_steps=100)
        hidden, output = plan.layers
        assert structure_capabilities(hidden.structure).ablates
        assert not structure_capabilities(output.structure).ablates
        assert structure_capabilities(output.structure).constant_fan_in

    def test_exempt_output_false_ablates_it_too(self):
        config = sparsity_core.preset(
            "srigl",
            structures=[{"kind": "neuron_ablation", "exempt_output": False}, "constant_fan_in"],
        )
        plan = plan_layers(self.model(), config, total_steps=100)
        assert all(structure_capabilities(p.structure).ablates for p in plan.layers)

    @pytest.mark.parametrize("excluded", [True, False])
    def test_the_output_is_the_models_last_layer_not_the_last_selected(self, excluded):
        exclude = ("2",) if excluded else ()
        plan = plan_layers(
            self.model(), sparsity_core.preset("srigl", exclude=exclude), total_steps=100
        )
        assert structure_capabilities(plan.layers[0].structure).ablates


class TestPlannedBudget:
    def test_the_threshold_comes_from_the_planned_budget_when_given(self):
        """The engine passes ``planned=``: once budget moved between layers, the threshold
        still comes from the layer's planned fan-in (here k = 10 -> 3 salient weights needed)."""
        previous = rows_mask([K] * 8)
        keep = previous.clone()
        keep[0, 2:K] = False  # neuron 0 keeps two weights; 2 dropped in all
        grow = scores_in([1], slice(K, K + 2))
        assert bool(active_rows_of(update(srigl(), previous, keep, grow))[0])
        new = srigl().fill(grow, keep, ~previous, BUDGET, SPEC, previous=previous, planned=80)
        assert not bool(active_rows_of(new)[0])
