"""The kit's own tests: each deliberately broken component fails the check for its invariant.

Every built-in passes every check (tests/conformance), so a failure here is the broken part's.
"""

from __future__ import annotations

import attrs
import pytest
import torch
from _broken_components import (
    AlwaysSatisfied,
    AssertingNM,
    BiasOnlyWhereLive,
    CandidateBlindFill,
    CountOnlyNM,
    DoubleScoresPrune,
    DriftingFill,
    DroppedSlotGrad,
    DropsAtZero,
    DropsTwice,
    DropsTwiceNM,
    FlatScoresGrowth,
    ForgetfulRelayout,
    GenerousBudget,
    GlobalRngGrowth,
    GlobalRngReinit,
    GridDensities,
    IgnoresFixed,
    InferringCSR,
    InverseMagnitudePrune,
    KeepsInactive,
    KeepsLowest,
    KeepsLowestNM,
    LeakyDense,
    MutatingGrowth,
    NaNAtEndDrop,
    NaNFreshStep,
    NoCapture,
    NoisyTieBreakFill,
    NormalisedGradientGrowth,
    OffByOneFreshStep,
    OneGroupOffNM,
    OverDroppingKeep,
    OverOneDrop,
    PythonRandomGrowth,
    SilentCondensed,
    SkewedNM,
    StaleForward,
    TenPercentOver,
    UncheckedNM,
    UndeclaredGradGrowth,
    UndeclaredRandomGrowth,
    WholeRowScale,
    WholeTensorFreshStep,
    WrongStepFanIn,
    ZeroFanInScale,
    preset_ignoring_overrides,
    preset_without_overrides,
)

import sparsity_core.engine as engine
import sparsity_core.scheduler as scheduler_module
from sparsity_core import DSTConfig, DSTScheduler
from sparsity_core.engine import LayerState, MaskChange
from sparsity_core.testing import (
    CHECKS,
    check_component,
    check_criterion_capabilities_declared,
    check_criterion_degenerate_inputs,
    check_criterion_deterministic,
    check_criterion_finite,
    check_criterion_inputs_unchanged,
    check_criterion_no_global_rng,
    check_criterion_shape_dtype_device,
    check_distribution_dense_layers,
    check_distribution_densities_in_range,
    check_distribution_global_density,
    check_format_keeps_live_zeros,
    check_format_linear_matches_dense,
    check_format_rejects_unsupported,
    check_format_round_trip,
    check_method_budget_conserved,
    check_method_checkpoint_resume,
    check_method_compact_matches_masked,
    check_method_drop_count,
    check_method_drop_keeps_highest,
    check_method_dropped_subset_of_active,
    check_method_grown_subset_of_inactive,
    check_method_grown_weights_and_state_zero,
    check_method_kept_weights_unchanged,
    check_method_mask_identity,
    check_method_no_updates_after_t_end,
    check_method_same_seed_same_masks,
    check_method_structure_holds,
    check_method_zero_drop_is_identity,
    check_preset_accepts_overrides,
    check_reinit_deterministic,
    check_reinit_finite,
    check_reinit_only_active,
    check_schedule_fraction_in_range,
    check_state_policy_only_tracked,
    check_state_policy_training_invariants,
    check_structure_budget,
    check_structure_budget_step,
    check_structure_keep,
    check_structure_keep_drop_count,
    check_structure_keep_highest,
    check_structure_satisfied_rejects_violations,
    check_structure_select,
    check_structure_select_idempotent,
    check_structure_validate,
)
from sparsity_core.testing.models import RunSpec
from sparsity_formats.csr import CSR
from sparsity_plugins.prune_criteria import MagnitudePrune

# Broken parts are usually caught within a few examples; these bounds make the tests certain.
CHEAP = 500


def _case(check, component, match):
    return pytest.param(check, component, match, id=f"{type(component).__name__}-{check.__name__}")


COMPONENT_CASES = [
    # criteria
    _case(check_criterion_inputs_unchanged, MutatingGrowth(), r"modified its input ctx\.weight"),
    _case(check_criterion_no_global_rng, GlobalRngGrowth(), "global torch RNG"),
    _case(check_criterion_deterministic, GlobalRngGrowth(), "differ between two calls"),
    _case(check_criterion_no_global_rng, PythonRandomGrowth(), "global random RNG"),
    _case(check_criterion_shape_dtype_device, FlatScoresGrowth(), r"shape \(\d+,\)"),
    _case(check_criterion_shape_dtype_device, DoubleScoresPrune(), "dtype torch.float64"),
    _case(check_criterion_capabilities_declared, UndeclaredGradGrowth(), r"ctx\.grad"),
    _case(check_criterion_capabilities_declared, UndeclaredRandomGrowth(), "stochastic=True"),
    _case(check_criterion_degenerate_inputs, NormalisedGradientGrowth(), "degenerate input"),
    _case(check_criterion_finite, InverseMagnitudePrune(), "non-finite values"),
    # structures
    _case(check_structure_select, CandidateBlindFill(), "not candidates"),
    _case(check_structure_select, DriftingFill(), r"holds \d+ weights, not the"),
    _case(check_structure_select, OneGroupOffNM(), "rejected by the structure's satisfied"),
    _case(check_structure_select, SkewedNM(), "breaks N:M: group"),
    _case(check_structure_select_idempotent, NoisyTieBreakFill(), "two different masks"),
    _case(check_structure_keep, KeepsInactive(), "kept 1 inactive"),
    _case(check_structure_keep, OverDroppingKeep(), "inactive positions they could be regrown"),
    _case(check_structure_keep, DropsAtZero(), "at fraction 0"),
    _case(check_structure_keep_highest, KeepsLowest(), "it keeps the lower score"),
    _case(check_structure_keep_highest, KeepsLowestNM(), "it keeps the lower score"),
    _case(check_structure_keep_drop_count, DropsTwice(), r"were asked: [\d.]+ off"),
    _case(check_structure_keep_drop_count, DropsTwiceNM(), r"were asked: [\d.]+ off"),
    _case(check_structure_budget, GenerousBudget(), "half a weight per rounding group"),
    _case(check_structure_satisfied_rejects_violations, AlwaysSatisfied(), "one weight"),
    _case(check_structure_budget_step, WrongStepFanIn(), "declares a step the structure cannot"),
    _case(check_structure_satisfied_rejects_violations, CountOnlyNM(), "breaks N:M"),
    _case(check_structure_validate, UncheckedNM(), r"validate\(\) accepted the layer"),
    _case(check_structure_validate, AssertingNM(), "raised ValueError, not"),
    # distributions and schedules
    _case(check_distribution_global_density, TenPercentOver(), "global density"),
    _case(check_distribution_densities_in_range, GridDensities(), r"density 0\.0 is outside"),
    _case(check_distribution_dense_layers, IgnoresFixed(), "pinned dense via 'fixed'"),
    _case(check_schedule_fraction_in_range, OverOneDrop(), r"= 1\.5 is outside \[0, 1\]"),
    _case(check_schedule_fraction_in_range, NaNAtEndDrop(), r"= nan is outside"),
    # re-initialisations
    _case(check_reinit_only_active, WholeRowScale(), "changed .* inactive weight"),
    _case(check_reinit_finite, ZeroFanInScale(), "NaN or Inf"),
    _case(check_reinit_deterministic, GlobalRngReinit(), "global torch RNG"),
    # optimizer-state policies
    _case(check_state_policy_only_tracked, WholeTensorFreshStep(), "outside the given positions"),
    _case(
        check_state_policy_training_invariants, OffByOneFreshStep(), "inactive weight is not zero"
    ),
    _case(check_state_policy_only_tracked, NaNFreshStep(), "NaN or Inf"),
    # formats
    _case(check_format_keeps_live_zeros, InferringCSR(), "live zeros"),
    _case(check_format_round_trip, LeakyDense(), r"differs from w\.masked_fill"),
    _case(check_format_linear_matches_dense, BiasOnlyWhereLive(), r"off F\.linear"),
    _case(check_format_rejects_unsupported, SilentCondensed(), "stored it wrongly"),
    # presets
    _case(check_preset_accepts_overrides, preset_ignoring_overrides, "the config holds"),
    _case(check_preset_accepts_overrides, preset_without_overrides, "TypeError"),
]


class TestBrokenComponents:
    """Each broken criterion, structure, distribution, schedule, format and preset fails the
    check of the invariant it breaks, with a message saying what broke."""

    @pytest.mark.parametrize(("check", "component", "match"), COMPONENT_CASES)
    def test_the_matching_check_fails(self, check, component, match):
        with pytest.raises(AssertionError, match=match) as info:
            check(component, max_examples=CHEAP)
        assert check.__name__ in str(info.value)


class TestChecksOnADevice:
    """The format and criterion checks take ``device``: the broken formats and criteria fail
    there too, and a device that cannot be used is a failure naming it (CUDA runs are in
    ``tests/unit/test_cuda.py``)."""

    @pytest.mark.parametrize(
        ("check", "component", "match"),
        [
            c
            for c in COMPONENT_CASES
            if c.values[0].__name__.startswith(("check_format_", "check_criterion_"))
        ],
    )
    def test_broken_components_fail_with_a_device(self, check, component, match):
        with pytest.raises(AssertionError, match=match):
            check(component, max_examples=CHEAP, device=torch.device("cpu"))

    @pytest.mark.parametrize(
        "check",
        [check_format_round_trip, check_criterion_finite, check_criterion_capabilities_declared],
    )
    @pytest.mark.parametrize("device", ["no-such-device", "cuda:99", "meta"])
    def test_unusable_device_is_named(self, check, device):
        """A device that is unknown, absent or holds no values ("meta") fails before drawing."""
        component = CSR() if check is check_format_round_trip else MagnitudePrune()
        with pytest.raises(AssertionError, match=rf"device '{device}': cannot allocate tensors"):
            check(component, max_examples=CHEAP, device=device)


# -- whole methods: broken components inside a run, and a broken engine --------------------------

RUN = RunSpec.build("mlp", 16, 16, 0, "sgd_momentum", 16)
METHOD = DSTConfig(
    prune="magnitude",
    grow="gradient",
    drop={"kind": "constant", "rate": 0.5},
    distribution="uniform",
    density=0.5,
)
RUN_EXAMPLES = 6


def _regrow_a_dropped_weight(real):
    """compute_change that puts back one dropped weight (and skips one grown) but reports the
    update as computed."""

    def compute_change(layer, **kwargs):
        change = real(layer, **kwargs)
        if change.dropped.any() and change.grown.any():
            new = change.new_mask.clone().reshape(-1)
            new[torch.nonzero(change.dropped.reshape(-1))[0, 0]] = True
            new[torch.nonzero(change.grown.reshape(-1))[0, 0]] = False
            return MaskChange(new.reshape(change.new_mask.shape), change.dropped, change.grown)
        return change

    return compute_change


def _grow_at_a_small_value(real):
    def commit_change(layer, change, *args, **kwargs):
        record = real(layer, change, *args, **kwargs)
        with torch.no_grad():
            layer.weight[change.grown] = 0.01
        return record

    return commit_change


def _replace_mask(self, new_mask):
    self.mask = new_mask.clone()


def _update_until_the_end(self, step):
    return step % self.config.delta_t == 0 and step > self.config.t_start


def _forget_history(real):
    def state_dict(self):
        return {**real(self), "history": []}

    return state_dict


def _drop_at_least_a_tenth(real):
    """step() that updates with fraction 0.1 where the schedule says 0 (a floor on the drop)."""

    def step(self):
        records = real(self)
        if not records and self.is_update_step(self.step_count):
            records = self._update(self.step_count, 0.1)
            self.history.extend(records)
        return records

    return step


BROKEN_ENGINES = {
    "regrows-dropped": [(scheduler_module, "compute_change", _regrow_a_dropped_weight)],
    "no-optimizer-reset": [(engine, "reset_state_at", lambda real: lambda *a, **k: None)],
    "grown-nonzero": [(scheduler_module, "commit_change", _grow_at_a_small_value)],
    "mask-replaced": [(LayerState, "set_mask", lambda real: _replace_mask)],
    "updates-after-t_end": [(DSTScheduler, "is_update_step", lambda real: _update_until_the_end)],
    "checkpoint-forgets-history": [(DSTScheduler, "state_dict", _forget_history)],
    "drop-floor": [(DSTScheduler, "step", _drop_at_least_a_tenth)],
}


def _break(monkeypatch, name):
    for owner, attribute, patch in BROKEN_ENGINES[name]:
        monkeypatch.setattr(owner, attribute, patch(getattr(owner, attribute)))


ENGINE_CASES = [
    ("regrows-dropped", check_method_dropped_subset_of_active, "active weights left the mask"),
    ("regrows-dropped", check_method_grown_subset_of_inactive, "inactive weights entered"),
    ("no-optimizer-reset", check_method_grown_weights_and_state_zero, "optimizer state"),
    ("grown-nonzero", check_method_grown_weights_and_state_zero, "grown weights are not"),
    ("mask-replaced", check_method_mask_identity, "replaced instead of updated in place"),
    ("updates-after-t_end", check_method_no_updates_after_t_end, ">= t_end"),
    ("checkpoint-forgets-history", check_method_checkpoint_resume, "history differs"),
    ("drop-floor", check_method_zero_drop_is_identity, "fraction 0 recorded updates"),
]


class TestBrokenEngine:
    """Method checks catch an engine that breaks the invariant they watch (patched in-process)."""

    @pytest.mark.parametrize(
        ("broken", "check", "match"),
        ENGINE_CASES,
        ids=[f"{b}-{c.__name__}" for b, c, _ in ENGINE_CASES],
    )
    def test_the_matching_method_check_fails(self, monkeypatch, broken, check, match):
        check(METHOD, run=RUN, max_examples=RUN_EXAMPLES)  # the sound engine passes
        _break(monkeypatch, broken)
        with pytest.raises(AssertionError, match=match):
            check(METHOD, run=RUN, max_examples=RUN_EXAMPLES)


METHOD_CASES = [
    ({"grow": MutatingGrowth()}, check_method_kept_weights_unchanged, "changed weights that"),
    ({"grow": GlobalRngGrowth()}, check_method_same_seed_same_masks, "masks differ"),
    ({"structures": CandidateBlindFill()}, check_method_grown_subset_of_inactive, "rejected"),
    ({"structures": DriftingFill()}, check_method_budget_conserved, "rejected"),
    ({"structures": SkewedNM(n=2, m=4)}, check_method_structure_holds, "breaks N:M"),
    ({"structures": KeepsInactive()}, check_method_dropped_subset_of_active, "rejected"),
    ({"structures": KeepsLowest()}, check_method_drop_keeps_highest, "keeps the lower score"),
    ({"structures": DropsTwice()}, check_method_drop_count, "record says fraction 0.5"),
]


class TestBrokenComponentsInAMethod:
    """A broken component inside an otherwise sound method fails the method check it breaks."""

    @pytest.mark.parametrize(
        ("change", "check", "match"),
        METHOD_CASES,
        ids=[f"{type(next(iter(c.values()))).__name__}-{k.__name__}" for c, k, _ in METHOD_CASES],
    )
    def test_the_matching_method_check_fails(self, change, check, match):
        method = attrs.evolve(METHOD, **change)
        with pytest.raises(AssertionError, match=match):
            check(method, run=RUN, max_examples=RUN_EXAMPLES)


COMPACT_CASES = [
    (ForgetfulRelayout, "optimizer state"),
    (DroppedSlotGrad, "the weights differ"),
    (StaleForward, "the weights differ"),
    (NoCapture, "mask differs"),
]


class TestBrokenCompactLayer:
    """A compact layer with a broken kernel or update fails the equivalence with the masked
    path (the sound CompactLinear passes it)."""

    @pytest.mark.parametrize(
        ("layer_cls", "match"), COMPACT_CASES, ids=[c.__name__ for c, _ in COMPACT_CASES]
    )
    def test_check_method_compact_matches_masked_fails(self, layer_cls, match):
        check_method_compact_matches_masked(METHOD, run=RUN, max_examples=RUN_EXAMPLES)
        with pytest.raises(AssertionError, match=match):
            check_method_compact_matches_masked(
                METHOD, run=RUN, layer_cls=layer_cls, max_examples=RUN_EXAMPLES
            )


def test_every_check_is_shown_failing():
    """No check of the kit is vacuous: each one fails on some broken component or engine here."""
    shown = {case.values[0].__name__ for case in COMPONENT_CASES}
    shown |= {check.__name__ for _, check, _ in ENGINE_CASES + METHOD_CASES}
    shown.add(check_method_compact_matches_masked.__name__)  # TestBrokenCompactLayer
    every = {check.__name__ for checks in CHECKS.values() for check in checks}
    assert every - shown == set()


KEEP_BUGS = [KeepsLowest(), DropsTwice(), KeepsLowestNM(), DropsTwiceNM()]


class TestKeepBugs:
    """A drop that keeps the lowest scores, or drops twice the requested fraction, fails the
    kit both as a structure and inside a method (issue 15: both passed every check)."""

    @pytest.mark.parametrize("structure", KEEP_BUGS, ids=lambda s: type(s).__name__)
    def test_a_structure_check_fails(self, structure):
        """The structure's checks report the broken drop, and nothing else."""
        results = check_component(structure, raise_on_failure=False, max_examples=50)
        failed = [r for r in results if r.status == "failed"]
        assert failed, f"every structure check passed: {[r.check for r in results]}"
        assert all("keep()" in r.message for r in failed)

    @pytest.mark.parametrize("structure", KEEP_BUGS, ids=lambda s: type(s).__name__)
    def test_a_method_check_fails(self, structure):
        """A sound method using the structure fails at least one method check."""
        method = attrs.evolve(METHOD, structures=structure)
        results = check_component(method, raise_on_failure=False, max_examples=3)
        failed = [r.check for r in results if r.status == "failed"]
        assert failed, f"every method check passed: {[r.check for r in results]}"
