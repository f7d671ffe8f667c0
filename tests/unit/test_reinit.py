"""Initial masks by magnitude and sparse re-initialisation (issue 17): ``DSTConfig.init_mask``
scores the dense initial weights with a prune criterion; ``DSTConfig.reinit`` (a plugin kind,
``sparsity_register_reinits``) rescales or redraws the weights under the initial mask."""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from torch import nn

import sparsity_core
from sparsity_core import ConfigError, DSTScheduler, Registry, hookimpl
from sparsity_core.engine import plan_initial_mask
from sparsity_core.registry import create_plugin_manager
from sparsity_plugins.reinit import SparseFanIn, SparseKaiming


def model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(200, 64), nn.ReLU(), nn.Linear(64, 10))


def build(config, seed: int = 0, registry=None):
    m = model(seed)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
    scheduler = DSTScheduler(m, optimizer, config, total_steps=100, registry=registry)
    return m, before, scheduler


class TestSparseFanIn:
    def test_each_neuron_is_scaled_by_the_root_of_its_fan_in_ratio(self):
        config = sparsity_core.preset("rigl", density=0.1, reinit="sparse_fan_in")
        _, before, scheduler = build(config)
        for fqn, layer in scheduler.layers.items():
            w0 = before[f"{fqn}.weight"]
            k = layer.mask.sum(dim=1, keepdim=True).float()
            expected = torch.where(
                layer.mask, w0 * (layer.spec.fan_in / k.clamp(min=1)).sqrt(), 0.0
            )
            assert torch.allclose(layer.weight, expected, rtol=1e-6, atol=0)

    def test_it_restores_the_dense_output_variance(self):
        """A neuron's pre-activation variance under the sparse mask matches the dense layer's."""
        x = torch.randn(4096, 200, generator=torch.Generator().manual_seed(1))
        dense = model()
        sparse, _, _ = build(sparsity_core.preset("srigl_no_ablation", density=0.05))
        plain, _, _ = build(sparsity_core.preset("srigl_no_ablation", density=0.05, reinit="none"))
        with torch.no_grad():
            target = (x @ dense[0].weight.T).var().item()
            rescaled = (x @ sparse[0].weight.T).var().item()
            unscaled = (x @ plain[0].weight.T).var().item()
        assert abs(rescaled / target - 1) < 0.15
        assert unscaled / target < 0.1  # what the sparse mask alone leaves (k / fan_in)

    def test_srigl_presets_rescale_and_rigl_keeps_the_model_init(self):
        assert sparsity_core.preset("srigl").reinit == SparseFanIn()
        assert sparsity_core.preset("srigl_no_ablation").reinit == SparseFanIn()
        assert sparsity_core.preset("rigl").to_dict()["reinit"] == {"kind": "none"}


class TestSparseKaiming:
    def test_active_weights_get_the_variance_of_their_sparse_fan_in(self):
        config = sparsity_core.preset(
            "srigl_no_ablation", density=0.1, reinit={"kind": "sparse_kaiming"}
        )
        _, _, scheduler = build(config)
        layer = scheduler.layers["0"]
        k = int(layer.mask[0].sum())
        active = layer.weight[layer.mask]
        assert abs(active.std().item() / math.sqrt(2.0 / k) - 1) < 0.1
        assert bool((layer.weight[~layer.mask] == 0).all())

    def test_it_is_reproducible_per_seed(self):
        config = sparsity_core.preset("rigl", density=0.2, reinit=SparseKaiming())
        a = build(config)[2].layers["0"].weight.detach().clone()
        b = build(config)[2].layers["0"].weight.detach().clone()
        c = build(attrs.evolve(config, seed=1))[2].layers["0"].weight.detach().clone()
        assert torch.equal(a, b) and not torch.equal(a, c)

    def test_an_unknown_nonlinearity_is_refused(self):
        with pytest.raises(ConfigError, match="nonlinearity"):
            SparseKaiming(nonlinearity="swish")


class TestMagnitudeInitialMask:
    def test_unstructured_keeps_the_largest_initial_weights(self):
        config = sparsity_core.preset("rigl", density=0.1, init_mask="magnitude")
        _, before, scheduler = build(config)
        for fqn, layer in scheduler.layers.items():
            w0 = before[f"{fqn}.weight"].abs()
            kept, dropped = w0[layer.mask], w0[~layer.mask]
            assert kept.min() >= dropped.max()

    def test_constant_fan_in_keeps_the_largest_initial_weights_of_each_neuron(self):
        config = sparsity_core.preset("srigl_no_ablation", density=0.1, init_mask="magnitude")
        _, before, scheduler = build(config)
        layer = scheduler.layers["0"]
        w0 = before["0.weight"].abs()
        for row in range(layer.spec.fan_out):
            m = layer.mask[row]
            assert w0[row][m].min() >= w0[row][~m].max()

    def test_the_default_stays_the_uniformly_random_mask(self):
        """``init_mask="random"`` draws exactly the mask drawn before the option existed."""
        config = sparsity_core.preset("rigl", density=0.1)
        _, _, scheduler = build(config)
        for layer in scheduler.layers.values():
            old = plan_initial_mask(layer.spec, layer.structure, layer.budget, 0, "cpu")
            assert torch.equal(layer.mask, old)

    def test_a_criterion_that_needs_a_gradient_is_refused(self):
        with pytest.raises(ConfigError, match="do not exist before training"):
            sparsity_core.preset("rigl", init_mask="saliency")


@attrs.frozen
class Doubling:
    """A third-party re-initialisation: doubles the active weights."""

    def apply_(self, weight, mask, spec, generator):
        weight.mul_(torch.where(mask, 2.0, 1.0))


@attrs.frozen
class Failing:
    def apply_(self, weight, mask, spec, generator):
        raise RuntimeError("boom")


class ReinitPlugin:
    @hookimpl
    def sparsity_register_reinits(self, register):
        register("doubling", Doubling, summary="x2")
        register("failing", Failing, summary="raises")


class TestThirdPartyReinit:
    def registry(self) -> Registry:
        return Registry.from_plugin_manager(create_plugin_manager(plugins={"acme": ReinitPlugin()}))

    def test_a_plugin_reinit_is_used_by_name(self):
        registry = self.registry()
        config = sparsity_core.DSTConfig.from_dict(
            {"density": 0.2, "reinit": {"kind": "doubling"}}, registry
        )
        _, before, scheduler = build(config, registry=registry)
        layer = scheduler.layers["0"]
        assert torch.equal(layer.weight[layer.mask], 2 * before["0.weight"][layer.mask])
        assert scheduler.state_dict()["config"]["reinit"] == {"kind": "doubling"}

    def test_a_failing_reinit_names_itself_and_the_layer(self):
        registry = self.registry()
        config = sparsity_core.DSTConfig.from_dict(
            {"density": 0.2, "reinit": {"kind": "failing"}}, registry
        )
        with pytest.raises(ConfigError, match=r"reinit Failing failed on layer '0'.*boom"):
            build(config, registry=registry)
