"""DSTConfig: accepted inputs, serialisation, presets, validators and value semantics."""

from __future__ import annotations

import json

import attrs
import pytest

import sparsity_core
from sparsity_core import ConfigError, DSTConfig, UnknownComponentError, get_registry

# field -> (component type, a registered name other than the default, its hyper-parameters)
COMPONENT_FIELDS = {
    "prune": ("prune", "random", {}),
    "grow": ("growth", "momentum", {"beta": 0.5}),
    "distribution": ("distribution", "uniform", {"dense": ("fc1",)}),
    "drop": ("schedule", "constant", {"rate": 0.2}),
}


def _component(ctype: str, name: str, **params):
    return get_registry().create(ctype, name, **params)


def _presets() -> list[str]:
    return get_registry().names("preset")


class TestComponentInputs:
    """Components may be given as names, {"kind": ...} dicts or instances, with equal results."""

    @pytest.mark.parametrize("field", list(COMPONENT_FIELDS))
    def test_name_dict_and_instance_agree(self, field):
        """A name, a kind-dict and an instance build equal configs holding the instance."""
        ctype, name, params = COMPONENT_FIELDS[field]
        instance = _component(ctype, name, **params)
        from_instance = DSTConfig(**{field: instance})
        from_dict = DSTConfig(**{field: {"kind": name, **params}})
        assert getattr(from_instance, field) is instance
        assert from_dict == from_instance
        if not params:
            assert DSTConfig(**{field: name}) == from_instance

    def test_hyper_parameters_reach_the_component(self):
        """Dict hyper-parameters become the component's fields."""
        config = DSTConfig(drop={"kind": "cosine", "alpha": 0.5})
        assert config.drop == _component("schedule", "cosine", alpha=0.5)
        assert config.drop != _component("schedule", "cosine")

    @pytest.mark.parametrize(
        "structures", ["unstructured", ("unstructured",), [{"kind": "unstructured"}]]
    )
    def test_structures_forms(self, structures):
        """One structure or a sequence of them becomes a tuple of instances."""
        config = DSTConfig(structures=structures)
        assert config.structures == (_component("structure", "unstructured"),)

    def test_dict_without_kind(self):
        """A component dict with no 'kind' key is a ConfigError showing the dict."""
        with pytest.raises(ConfigError, match=r"\{'rate': 0.1\} has no 'kind' key"):
            DSTConfig(drop={"rate": 0.1})

    def test_unknown_hyper_parameter(self):
        """A misspelled hyper-parameter names the component and the parameter."""
        with pytest.raises(UnknownComponentError, match=r"cosine.*alpah"):
            DSTConfig(drop={"kind": "cosine", "alpah": 0.3})

    def test_empty_structures(self):
        """An empty structures tuple is rejected."""
        with pytest.raises(ConfigError, match="structures"):
            DSTConfig(structures=())

    def test_unknown_layer_type(self):
        """A layer type outside the supported ones is rejected, naming it."""
        with pytest.raises(ConfigError, match="Embedding"):
            DSTConfig(layer_types=("Linear", "Embedding"))

    def test_single_pattern_strings_become_tuples(self):
        """include / exclude / layer_types accept a single string."""
        config = DSTConfig(include="fc*", exclude="head", layer_types="Linear")
        assert (config.include, config.exclude, config.layer_types) == (
            ("fc*",),
            ("head",),
            ("Linear",),
        )


class TestSerialisation:
    """to_dict / from_dict is a JSON-able, lossless round trip."""

    @pytest.mark.parametrize("name", _presets())
    def test_preset_round_trip_through_json(self, name):
        """Every preset survives to_dict -> json -> from_dict unchanged."""
        config = sparsity_core.preset(name)
        text = json.dumps(config.to_dict())
        assert DSTConfig.from_dict(json.loads(text)) == config

    def test_round_trip_with_every_field_changed(self):
        """A config with non-default values everywhere round-trips equal."""
        config = DSTConfig(
            prune="saliency",
            grow={"kind": "momentum", "beta": 0.8},
            distribution={"kind": "er", "dense": ["head"], "power": 0.5},
            drop={"kind": "constant", "rate": 0.1},
            density=0.25,
            delta_t=7,
            t_start=3,
            t_end=90,
            seed=11,
            layer_types=("Linear", "Conv2d"),
            include=("fc*", "head"),
            exclude=("fc3",),
        )
        data = json.loads(json.dumps(config.to_dict()))
        assert DSTConfig.from_dict(data) == config

    def test_components_are_saved_by_name(self):
        """Components are written as {"kind": name, **fields}."""
        data = DSTConfig(drop={"kind": "cosine", "alpha": 0.4}).to_dict()
        assert data["drop"] == {"kind": "cosine", "alpha": 0.4}
        assert data["grow"] == {"kind": "gradient"}
        assert data["structures"] == [{"kind": "unstructured"}]

    def test_from_dict_rejects_unknown_keys(self):
        """A key DSTConfig does not have is an error naming it and the known keys."""
        data = DSTConfig().to_dict()
        data["densty"] = 0.2
        with pytest.raises(ConfigError, match=r"\['densty'\].*known keys.*density"):
            DSTConfig.from_dict(data)

    def test_unregistered_instance_cannot_be_saved(self):
        """A component class no plugin registered cannot be written by name."""

        @attrs.frozen
        class HomeMadeGrowth:
            def scores(self, ctx):
                return ctx.weight

        config = DSTConfig(grow=HomeMadeGrowth())
        with pytest.raises(UnknownComponentError, match="HomeMadeGrowth"):
            config.to_dict()


class TestValueSemantics:
    """DSTConfig is an immutable value."""

    def test_frozen(self):
        """Assigning a field raises FrozenInstanceError."""
        config = DSTConfig()
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            config.density = 0.5
        assert config.density == 0.1

    def test_hashable_and_equal_by_value(self):
        """Equal configs hash equal and deduplicate in a set."""
        a = DSTConfig(grow="random", density=0.2)
        b = DSTConfig(grow={"kind": "random"}, density=0.2)
        assert a == b
        assert hash(a) == hash(b)
        assert len({a, b, DSTConfig(density=0.2)}) == 2

    def test_evolve(self):
        """attrs.evolve changes one field, converts names and re-validates."""
        base = DSTConfig()
        changed = attrs.evolve(base, grow="random", density=0.3)
        assert changed.grow == _component("growth", "random")
        assert changed.density == 0.3
        assert attrs.evolve(changed, grow="gradient", density=0.1) == base
        with pytest.raises(ConfigError, match="density"):
            attrs.evolve(base, density=2.0)


class TestPresets:
    """Method presets are registered factories of DSTConfig."""

    def test_builtin_presets(self):
        """static, set and rigl are registered and return DSTConfig."""
        assert {"static", "set", "rigl"} <= set(_presets())
        for name in ("static", "set", "rigl"):
            assert isinstance(sparsity_core.preset(name), DSTConfig)

    @pytest.mark.parametrize("name", ["static", "set", "rigl"])
    def test_overrides(self, name):
        """Overrides change exactly the fields given."""
        base = sparsity_core.preset(name)
        changed = sparsity_core.preset(name, density=0.05, delta_t=10)
        assert (changed.density, changed.delta_t) == (0.05, 10)
        assert attrs.evolve(changed, density=base.density, delta_t=base.delta_t) == base

    def test_rigl_and_set_differ_only_in_growth_and_drop_schedule(self):
        """RigL is SET with gradient growth instead of random growth, and a cosine-decayed
        drop fraction where SET keeps its fraction constant."""
        rigl = sparsity_core.preset("rigl").to_dict()
        set_ = sparsity_core.preset("set").to_dict()
        assert (rigl.pop("grow"), set_.pop("grow")) == ({"kind": "gradient"}, {"kind": "random"})
        assert rigl.pop("drop") == {"kind": "cosine", "alpha": 0.3}
        assert set_.pop("drop") == {"kind": "constant", "rate": 0.3}
        assert rigl == set_

    def test_static_never_drops(self):
        """The static preset's drop schedule is zero at every step."""
        config = sparsity_core.preset("static")
        assert all(config.drop.fraction(step, 100) == 0.0 for step in range(1, 100))

    def test_unknown_preset(self):
        """An unknown preset lists the registered ones."""
        with pytest.raises(UnknownComponentError, match="rigl"):
            sparsity_core.preset("rigll")

    def test_bad_override(self):
        """An override with an invalid value is rejected like any config value."""
        with pytest.raises(ConfigError, match="density"):
            sparsity_core.preset("rigl", density=0.0)


class TestComponentValidators:
    """Built-in components validate their hyper-parameters with ConfigError."""

    @pytest.mark.parametrize(
        ("ctype", "name", "params", "expected"),
        [
            ("schedule", "cosine", {"alpha": 1.5}, "CosineDrop.alpha=1.5"),
            ("schedule", "cosine", {"alpha": float("nan")}, "CosineDrop.alpha=nan"),
            ("schedule", "constant", {"rate": -0.1}, "ConstantDrop.rate=-0.1"),
            ("growth", "momentum", {"beta": 1.0}, "MomentumGrowth.beta=1.0"),
            ("distribution", "erk", {"power": 0}, "ErdosRenyiKernel.power=0.0"),
            ("distribution", "er", {"power": -1}, "ErdosRenyi.power=-1.0"),
        ],
    )
    def test_invalid_hyper_parameter(self, ctype, name, params, expected):
        """An out-of-range hyper-parameter raises ConfigError naming class, field and value."""
        with pytest.raises(ConfigError) as info:
            _component(ctype, name, **params)
        assert expected in str(info.value)

    def test_invalid_hyper_parameter_through_config(self):
        """The same validation applies when the component comes from a config dict."""
        with pytest.raises(ConfigError, match=r"MomentumGrowth\.beta=1\.0"):
            DSTConfig(grow={"kind": "momentum", "beta": 1.0})

    @pytest.mark.parametrize(
        ("ctype", "name", "params"),
        [
            ("schedule", "cosine", {"alpha": 1.0}),
            ("schedule", "constant", {"rate": 0.0}),
            ("growth", "momentum", {"beta": 0.0}),
            ("distribution", "erk", {"power": 0.5}),
        ],
    )
    def test_boundary_values_accepted(self, ctype, name, params):
        """Values on the closed end of each range are accepted and stored."""
        component = _component(ctype, name, **params)
        for key, value in params.items():
            assert getattr(component, key) == value
