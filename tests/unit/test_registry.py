"""Plugin discovery: entry points, hand-made plugins, errors and environment switches."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import types
from collections import OrderedDict

import pluggy
import pytest
import torch
from _fake_plugins import (
    EchoFormat,
    LargestWeightGrowth,
    MaskUpdateRecorder,
    echo_format_strategy,
    growth_plugin,
)
from torch import nn

import sparsity_core
from sparsity_core import (
    ComponentType,
    DSTConfig,
    DSTScheduler,
    DuplicateComponentError,
    NoBuiltinsError,
    PluginLoadError,
    Registry,
    UnknownComponentError,
    hookimpl,
)
from sparsity_core import config as config_module
from sparsity_core.registry import (
    BUILTIN_DISTRIBUTION,
    ENTRY_POINT_GROUP,
    create_plugin_manager,
    plugin_infos,
)

EXPECTED_BUILTINS = {
    ComponentType.PRUNE: {"magnitude", "random", "saliency"},
    ComponentType.GROWTH: {"gradient", "random", "momentum", "unfired"},
    ComponentType.STRUCTURE: {"unstructured"},
    ComponentType.DISTRIBUTION: {"uniform", "er", "erk"},
    ComponentType.SCHEDULE: {"constant", "cosine"},
    ComponentType.FORMAT: {"dense_masked"},
    ComponentType.PRESET: {"static", "set", "rigl"},
}

ENV_VARS = (
    "SPARSITY_CORE_DISABLE_AUTOLOAD",
    "SPARSITY_CORE_BLOCK_PLUGINS",
    "SPARSITY_CORE_TRACE_HOOKS",
)

_real_entry_points = importlib.metadata.entry_points


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def _fresh_registry(**kwargs) -> Registry:
    return Registry.from_plugin_manager(create_plugin_manager(**kwargs))


def _patch_entry_points(monkeypatch, extra=(), *, keep_real=True):
    """Make the registry see ``extra`` entry points (after the real ones when ``keep_real``)."""

    def fake_entry_points(**params):
        real = list(_real_entry_points(**params)) if keep_real else []
        if params.get("group") == ENTRY_POINT_GROUP:
            return real + list(extra)
        return real

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)


class FakeEntryPoint:
    """A duck-typed entry point with a distribution and a ``load()`` returning a given object."""

    def __init__(self, name, value, obj=None, dist_name="acme-sparsity", version="9.9.9"):
        self.name = name
        self.value = value
        self.group = ENTRY_POINT_GROUP
        self.dist = types.SimpleNamespace(metadata={"Name": dist_name}, version=version)
        self._obj = obj

    def load(self):
        if self._obj is None:
            raise ImportError(f"No module named {self.value!r}")
        return self._obj


class EveryHookPlugin:
    """A third-party plugin implementing every registration hook once."""

    @hookimpl
    def sparsity_register_prune_criteria(self, register):
        register("acme_prune", LargestWeightGrowth)

    @hookimpl
    def sparsity_register_growth_criteria(self, register):
        register("acme_growth", LargestWeightGrowth)

    @hookimpl
    def sparsity_register_structures(self, register):
        register("acme_structure", object)

    @hookimpl
    def sparsity_register_distributions(self, register):
        register("acme_distribution", object)

    @hookimpl
    def sparsity_register_schedules(self, register):
        register("acme_schedule", object)

    @hookimpl
    def sparsity_register_reinits(self, register):
        register("acme_reinit", object)

    @hookimpl
    def sparsity_register_optimizer_state_policies(self, register):
        register("acme_optimizer_state", object)

    @hookimpl
    def sparsity_register_formats(self, register):
        register("acme_format", EchoFormat, summary="dense weight * mask")

    @hookimpl
    def sparsity_register_presets(self, register):
        register("acme_preset", lambda **kw: DSTConfig(**kw))

    @hookimpl
    def sparsity_register_strategies(self, register):
        register("acme_strategy", echo_format_strategy, summary="draws EchoFormat inputs")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(8, 16), act=nn.ReLU(), fc2=nn.Linear(16, 4)))


class TestLazyLoading:
    """Importing the package does no plugin work."""

    def test_import_loads_no_plugin(self):
        """A fresh interpreter that imports sparsity_core has no manager and no plugin module."""
        code = (
            "import sys, sparsity_core\n"
            "print(sparsity_core.registry.get_plugin_manager.cache_info().currsize)\n"
            "print(sparsity_core.registry.get_registry.cache_info().currsize)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('sparsity_plugins', "
            "'sparsity_formats'))))\n"
        )
        env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        ).stdout.split("\n")
        assert out[:3] == ["0", "0", "[]"]


class TestBuiltinDiscovery:
    """Built-ins are found through the same entry points third parties use."""

    @pytest.mark.parametrize("ctype", list(EXPECTED_BUILTINS), ids=lambda t: t.value)
    def test_every_builtin_name_is_registered(self, ctype):
        """Each component type holds at least the expected built-in names."""
        registry = _fresh_registry()
        assert EXPECTED_BUILTINS[ctype] <= set(registry.names(ctype))

    def test_every_builtin_comes_from_a_sparsity_core_entry_point(self):
        """Each built-in entry's plugin is an entry point of the sparsity-core distribution."""
        registry = _fresh_registry()
        ours = {
            ep.name
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
            if ep.dist is not None and ep.dist.metadata["Name"] == BUILTIN_DISTRIBUTION
        }
        infos = {info.name: info for info in registry.plugins}
        for ctype, names in EXPECTED_BUILTINS.items():
            for name in names:
                entry = registry.entry(ctype, name)
                assert entry.plugin in ours, (ctype, name, entry.plugin)
                assert infos[entry.plugin].is_builtin
                assert infos[entry.plugin].version == sparsity_core.__version__

    def test_plugins_are_loaded_sorted_and_without_errors(self):
        """Plugin infos come back sorted by name, each with no error."""
        infos = plugin_infos(create_plugin_manager())
        names = [info.name for info in infos]
        assert names == sorted(names)
        assert all(info.error is None for info in infos)


class TestHandMadePlugins:
    """Plugins registered by hand work exactly like installed ones."""

    def test_third_party_growth_rule_is_created_by_name(self):
        """A plugin's growth rule is found and instantiated by its registered name."""
        registry = _fresh_registry(autoload=False, plugins={"acme": growth_plugin()})
        assert registry.names(ComponentType.GROWTH) == ["largest_weight"]
        entry = registry.entry("growth", "largest_weight")
        assert (entry.plugin, entry.summary) == ("acme", "third-party growth")
        assert registry.create("growth", "largest_weight") == LargestWeightGrowth()

    def test_third_party_growth_rule_is_usable_in_config_and_training(self, monkeypatch):
        """DSTConfig(grow=<third-party name>) resolves, serialises and trains."""
        registry = _fresh_registry(plugins={"acme": growth_plugin()})
        monkeypatch.setattr(config_module, "get_registry", lambda: registry)
        config = DSTConfig(grow="largest_weight", distribution="uniform", density=0.3, delta_t=2)
        assert config.grow == LargestWeightGrowth()
        assert config.to_dict(registry)["grow"] == {"kind": "largest_weight"}
        model = _mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = DSTScheduler(model, optimizer, config, total_steps=10, registry=registry)
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(4, 8)).sum().backward()
            optimizer.step()
            records = scheduler.step()
        assert [r.fqn for r in records] == ["fc1", "fc2"]
        assert all(r.grown > 0 for r in records)

    def test_every_registration_hook_reaches_the_registry(self):
        """A plugin implementing every registration hook adds one entry of every type."""
        registry = _fresh_registry(autoload=False, plugins={"acme": EveryHookPlugin()})
        for ctype in ComponentType:
            entries = registry.entries(ctype)
            assert [(e.name, e.plugin) for e in entries] == [(f"acme_{ctype.value}", "acme")]

    def test_third_party_format_is_found(self):
        """A format registered through sparsity_register_formats is usable from the registry."""
        registry = _fresh_registry(plugins={"acme": EveryHookPlugin()})
        assert {"acme_format", "dense_masked"} <= set(registry.names("format"))
        fmt = registry.create("format", "acme_format")
        weight = torch.randn(3, 4)
        mask = weight > 0
        assert torch.equal(fmt.unpack(fmt.pack(weight, mask)), weight * mask)
        assert registry.name_of("format", fmt) == "acme_format"

    def test_third_party_strategy_is_found(self):
        """A strategy factory registered through sparsity_register_strategies is stored as is."""
        registry = _fresh_registry(plugins={"acme": EveryHookPlugin()})
        entry = registry.entry(ComponentType.STRATEGY, "acme_strategy")
        assert entry.component is echo_format_strategy
        assert (entry.plugin, entry.summary) == ("acme", "draws EchoFormat inputs")

    def test_module_plugin_is_accepted(self):
        """A plain module object with hook functions works as a plugin."""
        module = types.ModuleType("acme_module_plugin")
        module.sparsity_register_growth_criteria = growth_plugin(
            "from_module"
        ).sparsity_register_growth_criteria
        registry = _fresh_registry(autoload=False, plugins={"acme_module": module})
        assert registry.entry("growth", "from_module").plugin == "acme_module"


class TestRegistrationErrors:
    """Conflicts and unknown names raise errors that say where each name came from."""

    def test_two_plugins_same_name(self):
        """Two plugins registering one growth name raise an error naming both plugins."""
        plugins = {"acme_one": growth_plugin("twin"), "acme_two": growth_plugin("twin")}
        with pytest.raises(DuplicateComponentError) as info:
            _fresh_registry(autoload=False, plugins=plugins)
        message = str(info.value)
        assert "'twin'" in message
        assert "'acme_one'" in message
        assert "'acme_two'" in message

    def test_third_party_shadowing_a_builtin(self):
        """A plugin reusing a built-in name conflicts with the built-in's plugin."""
        with pytest.raises(DuplicateComponentError) as info:
            _fresh_registry(plugins={"acme": growth_plugin("gradient")})
        message = str(info.value)
        assert "growth 'gradient'" in message
        assert "'growth_criteria'" in message
        assert "'acme'" in message

    def test_unknown_name_lists_available_with_plugins(self):
        """An unknown name lists every available name and the plugin providing it."""
        registry = _fresh_registry()
        with pytest.raises(UnknownComponentError) as info:
            registry.entry("growth", "gradiant")
        message = str(info.value)
        assert "'gradiant'" in message
        for name in EXPECTED_BUILTINS[ComponentType.GROWTH]:
            assert f"{name} (from growth_criteria)" in message

    def test_empty_name_is_rejected(self):
        """Registering an empty name is an error naming the plugin."""

        @hookimpl
        def sparsity_register_schedules(register):
            register("", object)

        plugin = types.SimpleNamespace(sparsity_register_schedules=sparsity_register_schedules)
        with pytest.raises(ValueError, match="acme_empty"):
            _fresh_registry(autoload=False, plugins={"acme_empty": plugin})

    def test_misspelled_hook_name(self):
        """A hookimpl whose name matches no hookspec is caught by check_pending."""

        @hookimpl
        def sparsity_register_growth_critera(register):
            register("typo", LargestWeightGrowth)

        plugin = types.SimpleNamespace(
            sparsity_register_growth_critera=sparsity_register_growth_critera
        )
        with pytest.raises(pluggy.PluginValidationError, match="sparsity_register_growth_critera"):
            create_plugin_manager(autoload=False, plugins={"typo": plugin})

    def test_wrong_hook_argument_name(self):
        """A hookimpl asking for an argument the spec does not offer is rejected."""

        @hookimpl
        def sparsity_register_growth_criteria(registrar):
            registrar("x", LargestWeightGrowth)

        plugin = types.SimpleNamespace(
            sparsity_register_growth_criteria=sparsity_register_growth_criteria
        )
        with pytest.raises(pluggy.PluginValidationError, match="registrar"):
            create_plugin_manager(autoload=False, plugins={"bad_args": plugin})


class TestEntryPointFailures:
    """Entry points that fail to import are reported with their name and distribution."""

    def test_broken_entry_point_raises(self, monkeypatch):
        """Strict loading raises PluginLoadError naming the entry point and its distribution."""
        broken = FakeEntryPoint("acme_broken", "acme_sparsity.nonexistent_mod_xyz")
        _patch_entry_points(monkeypatch, [broken])
        with pytest.raises(PluginLoadError) as info:
            create_plugin_manager()
        message = str(info.value)
        assert "'acme_broken'" in message
        assert "acme_sparsity.nonexistent_mod_xyz" in message
        assert "acme-sparsity 9.9.9" in message
        assert "SPARSITY_CORE_BLOCK_PLUGINS=acme_broken" in message
        assert isinstance(info.value.__cause__, ImportError)

    def test_broken_real_entry_point_without_distribution(self, monkeypatch):
        """An importlib EntryPoint with no distribution still raises, naming the module."""
        broken = importlib.metadata.EntryPoint(
            name="acme_orphan", value="nonexistent_mod_xyz", group=ENTRY_POINT_GROUP
        )
        _patch_entry_points(monkeypatch, [broken])
        with pytest.raises(PluginLoadError, match=r"'acme_orphan'.*nonexistent_mod_xyz.*unknown"):
            create_plugin_manager()

    def test_non_strict_records_the_error(self, monkeypatch):
        """With strict=False the broken plugin is listed with its error and the rest loads."""
        broken = FakeEntryPoint("acme_broken", "acme_sparsity.nonexistent_mod_xyz")
        _patch_entry_points(monkeypatch, [broken])
        pm = create_plugin_manager(strict=False)
        infos = {info.name: info for info in plugin_infos(pm)}
        assert infos["acme_broken"].error is not None
        assert "nonexistent_mod_xyz" in infos["acme_broken"].error
        assert infos["acme_broken"].distribution == "acme-sparsity"
        assert infos["growth_criteria"].error is None
        registry = Registry.from_plugin_manager(pm)
        assert "gradient" in registry.names("growth")

    def test_working_third_party_entry_point_loads(self, monkeypatch):
        """A third-party entry point is loaded beside the built-ins and keeps its distribution."""
        good = FakeEntryPoint("acme_growth", "acme_sparsity.growth", obj=growth_plugin())
        _patch_entry_points(monkeypatch, [good])
        registry = _fresh_registry()
        assert registry.entry("growth", "largest_weight").plugin == "acme_growth"
        info = {i.name: i for i in registry.plugins}["acme_growth"]
        assert (info.distribution, info.version, info.is_builtin) == (
            "acme-sparsity",
            "9.9.9",
            False,
        )

    def test_no_builtins_found(self, monkeypatch):
        """Autoload that finds only third-party entry points says the package is not installed."""
        good = FakeEntryPoint("acme_growth", "acme_sparsity.growth", obj=growth_plugin())
        _patch_entry_points(monkeypatch, [good], keep_real=False)
        pm = create_plugin_manager()
        with pytest.raises(NoBuiltinsError, match=r"pip install -e \."):
            Registry.from_plugin_manager(pm)


class TestEnvironmentSwitches:
    """The environment variables documented in sparsity_core.registry."""

    def test_disable_autoload(self, monkeypatch):
        """SPARSITY_CORE_DISABLE_AUTOLOAD=1 loads no entry point and says so on lookups."""
        monkeypatch.setenv("SPARSITY_CORE_DISABLE_AUTOLOAD", "1")

        def no_entry_points(**params):
            raise AssertionError("entry points were read although autoload is off")

        monkeypatch.setattr(importlib.metadata, "entry_points", no_entry_points)
        pm = create_plugin_manager()
        assert plugin_infos(pm) == []
        assert pm.get_plugins() == set()
        registry = Registry.from_plugin_manager(pm)
        assert all(registry.names(t) == [] for t in ComponentType)
        with pytest.raises(UnknownComponentError, match="SPARSITY_CORE_DISABLE_AUTOLOAD"):
            registry.entry("preset", "rigl")

    def test_block_presets(self, monkeypatch):
        """Blocking the presets plugin removes every preset, and the lookup error says why."""
        monkeypatch.setenv("SPARSITY_CORE_BLOCK_PLUGINS", " presets , acme_nothing")
        registry = _fresh_registry()
        assert all(e.plugin != "presets" for e in registry.entries("preset"))
        assert "presets" not in {info.name for info in registry.plugins}
        assert "gradient" in registry.names("growth")
        with pytest.raises(UnknownComponentError) as info:
            registry.entry("preset", "rigl")
        message = str(info.value)
        assert "'rigl'" in message
        assert "presets" in message
        assert "SPARSITY_CORE_BLOCK_PLUGINS" in message

    def test_block_every_builtin(self, monkeypatch):
        """Blocking all built-ins raises NoBuiltinsError listing the blocked plugins."""
        names = [ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
        monkeypatch.setenv("SPARSITY_CORE_BLOCK_PLUGINS", ",".join(names))
        with pytest.raises(NoBuiltinsError, match=r"blocked plugins: .*presets"):
            _fresh_registry()

    def test_trace_hooks(self, monkeypatch, capsys):
        """SPARSITY_CORE_TRACE_HOOKS=1 writes hook calls to stderr."""
        monkeypatch.setenv("SPARSITY_CORE_TRACE_HOOKS", "1")
        registry = _fresh_registry(autoload=False, plugins={"rec": MaskUpdateRecorder()})
        registry.call_observers(scheduler=None, step=7, records=[])
        assert "sparsity_after_mask_update" in capsys.readouterr().err


class TestObserverHook:
    """sparsity_after_mask_update fires once per topology update and never otherwise."""

    def test_fires_once_per_update_step(self):
        """Over 20 steps with delta_t=2 the observer sees exactly the update steps' records."""
        recorder = MaskUpdateRecorder()
        registry = _fresh_registry(plugins={"recorder": recorder})
        model = _mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        config = sparsity_core.preset("rigl", density=0.3, delta_t=2)
        scheduler = DSTScheduler(model, optimizer, config, total_steps=20, registry=registry)
        gen = torch.Generator().manual_seed(0)
        update_steps = []
        for step in range(1, 21):
            x = torch.randn(8, 8, generator=gen)
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
            before = len(recorder.calls)
            records = scheduler.step()
            if records:
                update_steps.append(step)
                assert len(recorder.calls) == before + 1
                called_with, called_step, called_records = recorder.calls[-1]
                assert called_with is scheduler
                assert called_step == step
                assert called_records == records
            else:
                assert len(recorder.calls) == before
        assert update_steps == list(range(2, 15, 2))
        assert [call[1] for call in recorder.calls] == update_steps
