"""check_component, parametrize_with_checks, component ids and plugin strategies."""

from __future__ import annotations

import types

import pytest
import torch
from _broken_components import FlatScoresGrowth, InferringCSR, MutatingGrowth, SkewedNM
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsity_core.registry as registry_module
from sparsity_core import DSTConfig, LayerSpec, hookimpl, preset
from sparsity_core.registry import Registry, create_plugin_manager
from sparsity_core.testing import (
    CHECKS,
    CheckFailure,
    builtin_components,
    check_component,
    checks_for,
    component_id,
    parametrize_with_checks,
)
from sparsity_core.testing import strategies as sst
from sparsity_plugins.growth_criteria import GradientGrowth, MomentumGrowth
from sparsity_plugins.structure_nm import NM

pytest_plugins = ["pytester"]


class TestCheckComponent:
    """check_component runs every applicable check and reports each outcome."""

    def test_a_sound_criterion_passes_every_criterion_check(self):
        """One passed result per criterion check, each with the examples it ran."""
        results = check_component(GradientGrowth(), max_examples=3)
        assert [r.check for r in results] == [c.__name__ for c in CHECKS["criterion"]]
        assert all(r.status == "passed" and r.ok for r in results)
        assert all(r.component == "growth.gradient" and r.examples >= 3 for r in results)

    def test_a_broken_criterion_raises_naming_the_failed_check(self):
        """The raised CheckFailure names the failing check and carries every result."""
        with pytest.raises(CheckFailure, match="check_criterion_inputs_unchanged") as info:
            check_component(MutatingGrowth(), max_examples=20)
        failed = {r.check for r in info.value.results if r.status == "failed"}
        assert "check_criterion_inputs_unchanged" in failed
        assert isinstance(info.value, AssertionError)

    def test_results_without_raising(self):
        """raise_on_failure=False returns the failures with their messages."""
        results = check_component(FlatScoresGrowth(), raise_on_failure=False, max_examples=5)
        by_check = {r.check: r for r in results}
        shape = by_check["check_criterion_shape_dtype_device"]
        assert shape.status == "failed" and "shape" in shape.message
        assert "Draw 1 (ctx)" in shape.message  # the falsifying example is attached

    def test_expected_failures_are_reported_not_raised(self):
        """A listed failing check is an expected failure; the others still pass."""
        results = check_component(
            InferringCSR(),
            expected_failed_checks={"check_format_keeps_live_zeros": "infers the mask"},
            max_examples=15,
        )
        by_check = {r.check: r for r in results}
        assert by_check["check_format_keeps_live_zeros"].status == "expected failure"
        assert by_check["check_format_keeps_live_zeros"].reason == "infers the mask"
        assert by_check["check_format_round_trip"].status == "passed"

    def test_an_expected_failure_that_passes_is_a_failure(self):
        """Listing a check that passes raises, so stale lists do not hide regressions."""
        with pytest.raises(CheckFailure, match="unexpected pass"):
            check_component(
                GradientGrowth(),
                expected_failed_checks=["check_criterion_finite"],
                max_examples=2,
            )

    def test_an_unknown_expected_check_is_a_value_error(self):
        """A misspelled check name is refused and the applicable checks are listed."""
        with pytest.raises(ValueError, match="check_criterion_finite"):
            check_component(GradientGrowth(), expected_failed_checks=["check_criterion_fnite"])

    def test_a_class_instead_of_an_instance_is_refused(self):
        """Passing the class is a TypeError saying to instantiate it."""
        with pytest.raises(TypeError, match="instantiated"):
            check_component(GradientGrowth)

    def test_checks_by_kind(self):
        """Each kind of component gets its own checks; a schedule also gets the t_end run."""
        components = builtin_components()
        assert checks_for(components["format.csr"]) == list(CHECKS["format"])
        assert checks_for(preset("rigl")) == list(CHECKS["method"])
        names = [c.__name__ for c in checks_for(components["schedule.cosine"])]
        assert names == ["check_schedule_fraction_in_range", "check_method_no_updates_after_t_end"]


class TestComponentIds:
    """Ids name the registered type and name, and the hyper-parameters that differ."""

    @pytest.mark.parametrize(
        ("component", "expected"),
        [
            (GradientGrowth(), "growth.gradient"),
            (MomentumGrowth(beta=0.5), "growth.momentum(beta=0.5)"),
            (NM(n=1, m=8), "structure.nm(n=1,m=8)"),
            (SkewedNM(), "SkewedNM"),
            (preset("srigl"), "method.magnitude+gradient+neuron_ablation+constant_fan_in"),
        ],
    )
    def test_ids(self, component, expected):
        assert component_id(component) == expected

    def test_builtin_components_cover_the_registry(self):
        """Every built-in component of every type is listed once, under its type and name."""
        components = builtin_components()
        kinds = {cid.split(".")[0] for cid in components}
        assert kinds == {
            "prune",
            "growth",
            "structure",
            "distribution",
            "schedule",
            "reinit",
            "optimizer_state",
            "format",
            "preset",
        }
        assert {"growth.gradient", "structure.neuron_ablation", "preset.rigl"} <= set(components)


class TestParametrizeWithChecks:
    """parametrize_with_checks gives one test per component and check, selectable with -k."""

    def test_ids_and_expected_failures(self):
        mark = parametrize_with_checks(
            [GradientGrowth(), InferringCSR()],
            expected_failed_checks={"check_format_keeps_live_zeros": "infers the mask"},
        )
        params = mark.args[1]
        ids = [p.id for p in params]
        assert "growth.gradient-check_criterion_finite" in ids
        assert "InferringCSR-check_format_keeps_live_zeros" in ids
        assert len(ids) == len(CHECKS["criterion"]) + len(CHECKS["format"])
        xfails = [p.id for p in params if p.marks]
        assert xfails == ["InferringCSR-check_format_keeps_live_zeros"]
        assert params[0].marks == () and params[0].values[0] == GradientGrowth()

    def test_an_expected_check_no_component_has_is_refused(self):
        with pytest.raises(ValueError, match="not checks"):
            parametrize_with_checks([GradientGrowth()], expected_failed_checks={"check_x": ""})

    def test_pytest_k_selects_one_check(self, pytester):
        """A test module using the decorator runs under pytest; -k picks one check by name."""
        pytester.makepyfile(
            """
            from sparsity_plugins.growth_criteria import GradientGrowth
            from sparsity_core.testing import parametrize_with_checks

            @parametrize_with_checks([GradientGrowth()])
            def test_growth(component, check):
                check(component, max_examples=2)
            """
        )
        result = pytester.runpytest_inprocess(
            "-k", "check_criterion_finite", "-p", "no:cacheprovider"
        )
        result.assert_outcomes(passed=1, deselected=len(CHECKS["criterion"]) - 1)
        result.stdout.no_fnmatch_line("*error*")


# -- plugin strategies ---------------------------------------------------------------------------


class Blocks:
    """A stand-in third-party structure: it only accepts layers 8 inputs wide."""

    @staticmethod
    def specs(structure):
        return st.builds(lambda out: LayerSpec("any", (out, 8)), st.integers(1, 4))


def _plugin() -> types.SimpleNamespace:
    @hookimpl
    def sparsity_register_strategies(register):
        register("growth.momentum", lambda cls: st.builds(cls, beta=st.sampled_from([0.25, 0.5])))
        register("specs.nm", Blocks.specs)

    return types.SimpleNamespace(sparsity_register_strategies=sparsity_register_strategies)


@pytest.fixture
def with_strategy_plugin(monkeypatch):
    """The process-wide registry, plus a plugin that registers two strategies."""
    registry = Registry.from_plugin_manager(create_plugin_manager(plugins={"acme": _plugin()}))
    monkeypatch.setattr(registry_module, "get_registry", lambda: registry)
    return registry


class TestPluginStrategies:
    """Strategies registered through sparsity_register_strategies are used by the kit."""

    def test_component_strategy_varies_hyper_parameters(self, with_strategy_plugin):
        """``growth.momentum`` draws MomentumGrowth with the plugin's betas."""
        seen = set()

        @settings(max_examples=30, database=None)
        @given(sst.components("growth", "momentum"))
        def draw(component):
            seen.add(component.beta)

        draw()
        assert seen == {0.25, 0.5}

    def test_method_configs_use_component_strategies(self, with_strategy_plugin):
        """A growth named in method_configs is drawn from the plugin's strategy."""

        @settings(max_examples=10, database=None)
        @given(sst.method_configs(grow="momentum"))
        def draw(config):
            assert isinstance(config, DSTConfig) and config.grow.beta in (0.25, 0.5)

        draw()

    def test_specs_strategy_replaces_the_default_shapes(self, with_strategy_plugin):
        """``specs.nm`` supplies the layers structured_specs draws for N:M (renamed as asked)."""

        @settings(max_examples=20, database=None)
        @given(sst.structured_specs(NM(), fqn="fc"))
        def draw(spec):
            assert spec.shape[1] == 8 and spec.fqn == "fc"

        draw()

    def test_without_the_plugin_defaults_are_used(self):
        """With no strategy registered, components come with default hyper-parameters."""

        @settings(max_examples=5, database=None)
        @given(sst.components("growth", "momentum"))
        def draw(component):
            assert component == MomentumGrowth()

        draw()


def test_strategies_draw_valid_contexts_and_weights():
    """score_contexts hold only declared inputs; weights keep live zeros and inactive values."""

    @settings(max_examples=20, database=None)
    @given(sst.score_contexts(capabilities=GradientGrowth.capabilities), st.data())
    def draw(ctx, data):
        assert ctx.grad.shape == ctx.weight.shape
        with pytest.raises(Exception, match="needs_ever_active"):
            ctx.ever_active  # noqa: B018
        mask = ctx.mask
        weight = data.draw(sst.weights(mask.shape, mask=mask, inactive="nonfinite"))
        assert bool(torch.isfinite(weight[mask]).all())
        assert not bool(torch.isfinite(weight[~mask]).any())

    draw()
