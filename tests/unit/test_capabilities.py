"""Structures declare capabilities; the core and the formats ask for them, never for a type."""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from torch import nn

import sparsity_core as sc
from sparsity_core.errors import ConfigError, LayerError
from sparsity_core.structures import (
    GroupedStructure,
    StructureCapabilities,
    compose_structures,
    structure_capabilities,
)


@attrs.frozen
class FloorFanIn(GroupedStructure):
    """A structure no built-in knows: constant fan-in, but never fewer than ``min_k`` inputs
    per neuron (tiny fan-ins are what hurt constant fan-in most)."""

    capabilities = StructureCapabilities(per_neuron=True, constant_fan_in=True)
    min_k: int = 4

    def group_shape(self, spec):
        return spec.fan_out, spec.fan_in

    def budget(self, spec, density):
        k = max(self.min_k, math.floor(density * spec.fan_in + 0.5))
        return min(k, spec.fan_in) * spec.fan_out

    def min_active_rows(self, spec, budget):
        return max(1, math.ceil(budget / spec.fan_in))

    def group_counts(self, spec, budget, device, active_rows=None):
        if active_rows is None:
            return torch.full((spec.fan_out,), budget // spec.fan_out, device=device)
        active_rows = active_rows.to(device)
        return active_rows.long() * (budget // int(active_rows.sum()))


@attrs.frozen
class Opaque(GroupedStructure):
    """A weight-level structure that declares nothing (one group, like unstructured)."""

    def group_shape(self, spec):
        return 1, spec.numel

    def budget(self, spec, density):
        return math.floor(density * spec.numel + 0.5)

    def group_counts(self, spec, budget, device, active_rows=None):
        return torch.tensor([budget], device=device)


def _registry():
    registry = sc.get_registry()
    return registry.with_component("structure", "unit_floor_fan_in", FloorFanIn).with_component(
        "structure", "opaque", Opaque
    )


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


class TestDeclaredCapabilities:
    """What a structure declares is what it gets: ablation and condensed storage."""

    def test_builtins_declare_what_they_offer(self):
        reg = sc.get_registry()
        fan_in = structure_capabilities(reg.create("structure", "constant_fan_in"))
        nm = structure_capabilities(reg.create("structure", "nm", n=2, m=4))
        assert fan_in.per_neuron and fan_in.constant_fan_in and fan_in.nm is None
        assert nm.nm == (2, 4) and nm.pins_density and nm.constant_fan_in
        ablated = compose_structures(
            (reg.create("structure", "neuron_ablation"), reg.create("structure", "nm"))
        )
        assert structure_capabilities(ablated).ablates and structure_capabilities(ablated).nm

    def test_a_third_party_constant_fan_in_structure_ablates_and_exports_condensed(self):
        """FloorFanIn (no built-in knows it) trains under neuron_ablation, packs condensed."""
        model = _mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        ablation = {"kind": "neuron_ablation", "gamma_sal": 0.9, "exempt": ["4"]}
        config = sc.preset("rigl", density=0.25, delta_t=2, structures=(ablation, FloorFanIn()))
        scheduler = sc.DSTScheduler(model, optimizer, config, total_steps=40, registry=_registry())
        gen = torch.Generator().manual_seed(0)
        for _ in range(12):
            optimizer.zero_grad()
            model(torch.randn(16, 16, generator=gen)).pow(2).mean().backward()
            optimizer.step()
            scheduler.step()
        assert any(s.active_neurons < s.fan_out for s in scheduler.summary())  # it ablated
        for layer in scheduler.layers.values():
            assert layer.structure.satisfied(layer.mask, layer.spec, layer.budget)
        x = torch.randn(5, 16, generator=gen)
        with torch.no_grad():
            expected = model(x)
        result = sc.export(model, scheduler, format="condensed", rules=[("4", None)])
        with torch.no_grad():
            torch.testing.assert_close(result.model(x), expected)

    def test_undeclared_structures_get_neither(self):
        """No per-neuron capability: no ablation; no constant fan-in: no condensed storage."""
        with pytest.raises(ConfigError, match="per_neuron=True"):
            sc.DSTConfig(structures=("neuron_ablation", Opaque()))
        model = _mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        config = sc.preset("rigl", delta_t=5, structures=(Opaque(),))
        scheduler = sc.DSTScheduler(model, optimizer, config, total_steps=40, registry=_registry())
        with pytest.raises(LayerError, match="constant_fan_in=True"):
            sc.export(model, scheduler, format="condensed")
