"""Once installed, the plugin is found by name: registry, `plugins` listing, `train --method`."""

from __future__ import annotations

import json

import torch
from sparsity_explore import ExploreGrowth, RelativeMagnitudePrune
from torch import nn

import sparsity_core as sc
from sparsity_app.cli import main
from sparsity_core import LayerSpec, ScoreContext, get_registry, preset


class TestRegistration:
    """The entry point registers every component under its name, from this distribution."""

    def test_components_are_registered_by_the_entry_point(self):
        registry = get_registry()
        for ctype, name, cls in [
            ("growth", "explore", ExploreGrowth),
            ("prune", "relative_magnitude", RelativeMagnitudePrune),
        ]:
            entry = registry.entry(ctype, name)
            assert entry.component is cls and entry.plugin == "sparsity_explore"
        info = next(i for i in registry.plugins if i.name == "sparsity_explore")
        assert info.distribution == "sparsity-explore" and not info.is_builtin

    def test_method_config_by_name(self):
        """The preset, and the components by name in a config, round-trip through to_dict."""
        config = preset("dst_ee", density=0.2, grow={"kind": "explore", "c": 1.5})
        assert config.grow == ExploreGrowth(c=1.5)
        assert config.to_dict()["grow"] == {"kind": "explore", "c": 1.5}
        assert config.to_dict()["prune"] == {"kind": "relative_magnitude"}


class TestCommandLine:
    """`sparsity-core plugins` lists the plugin; `sparsity-core train --method dst_ee` trains."""

    def test_plugins_lists_it(self, capsys):
        assert main(["plugins", "--json"]) == 0
        plugins = {p["plugin"]: p for p in json.loads(capsys.readouterr().out)}
        ours = plugins["sparsity_explore"]
        assert ours["distribution"] == "sparsity-explore" and ours["error"] is None
        assert ours["components"] == {
            "prune": ["relative_magnitude"],
            "growth": ["explore"],
            "structure": ["floor_fan_in"],
            "preset": ["dst_ee"],
            "strategy": ["growth.explore"],
        }

    def test_train_with_the_preset(self, tmp_path):
        out = tmp_path / "runs.json"
        argv = ["train", "--method", "dst_ee", "--no-dense", "--epochs", "2", "--hidden", "32"]
        assert main([*argv, "--delta-t", "10", "--json", str(out)]) == 0
        (run,) = json.loads(out.read_text())["runs"]
        assert run["method"] == "dst_ee" and abs(run["density"] - 0.1) < 0.01
        assert run["test_accuracy"] > 0.2  # 10 classes: well above chance after 2 epochs
        assert run["itop"] > run["density"]  # the topology explored beyond the initial mask


def test_exploration_prefers_weights_never_active():
    """With no gradient signal, the bonus ranks never-active weights above the others."""
    spec = LayerSpec("fc", (2, 3))
    ever = torch.tensor([[True, False, True], [False, False, True]])
    ctx = ScoreContext(
        spec,
        50,
        torch.zeros(2, 3),
        torch.zeros(2, 3, dtype=torch.bool),
        torch.Generator().manual_seed(0),
        grad=torch.zeros(2, 3),
        ever_active=ever,
    )
    scores = ExploreGrowth(c=1.0).scores(ctx)
    assert bool((scores[~ever].min() > scores[ever].max()).item())
    assert torch.equal(ExploreGrowth(c=0.0).scores(ctx), torch.zeros(2, 3))


class TestThirdPartyStructure:
    """floor_fan_in declares per-neuron constant fan-in: that alone buys ablation and condensed."""

    def test_trains_under_neuron_ablation_and_exports_condensed(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        model.append(nn.Linear(32, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        ablation = {"kind": "neuron_ablation", "gamma_sal": 0.9, "exempt": ["4"]}
        config = sc.preset(
            "rigl",
            density=0.1,
            delta_t=2,
            structures=(ablation, {"kind": "floor_fan_in", "min_k": 3}),
        )
        scheduler = sc.DSTScheduler(model, optimizer, config, total_steps=40)
        gen = torch.Generator().manual_seed(0)
        for _ in range(12):
            optimizer.zero_grad()
            model(torch.randn(16, 16, generator=gen)).pow(2).mean().backward()
            optimizer.step()
            scheduler.step()
        summary = {s.fqn: s for s in scheduler.summary()}
        assert summary["0"].fan_in_min == summary["0"].fan_in_max >= 3  # the floor holds
        assert any(s.active_neurons < s.fan_out for s in summary.values())  # it ablated
        assert all(s.satisfied for s in summary.values())
        x = torch.randn(5, 16, generator=gen)
        with torch.no_grad():
            expected = model(x)
            packed = sc.export(model, scheduler, format="condensed", rules=[("4", None)]).model
            torch.testing.assert_close(packed(x), expected)
        assert type(packed[0]).__name__ == "PackedLinear"
