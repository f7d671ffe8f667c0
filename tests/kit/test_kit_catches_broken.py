"""The kit's own tests: each deliberately broken component fails the check for its invariant."""

from __future__ import annotations

import attrs
import pytest
import torch
from _broken_components import (
    CandidateBlindFill,
    DriftingFill,
    DropsAtZero,
    FlatScoresGrowth,
    GenerousBudget,
    GlobalRngGrowth,
    KeepsInactive,
    MutatingGrowth,
    OverDroppingKeep,
    OverOneDrop,
    TenPercentOver,
)
from sparsity_plugins.distributions import ErdosRenyiKernel
from sparsity_plugins.growth_criteria import GradientGrowth, RandomGrowth
from sparsity_plugins.schedules import ConstantDrop, CosineDrop
from sparsity_plugins.structure_unstructured import Unstructured
from torch import nn

from sparsity_core import DSTConfig, LayerSpec, ScoreContext
from sparsity_core.rng import make_generator
from sparsity_core.testing import (
    check_criterion_scores,
    check_distribution,
    check_drop_schedule,
    check_method_run,
    check_same_seed_same_masks,
    check_structure_budget,
    check_structure_fill,
    check_structure_keep,
)

SPEC = LayerSpec("fc", (3, 4))


def flat_mask(*positions: int) -> torch.Tensor:
    mask = torch.zeros(SPEC.numel, dtype=torch.bool)
    mask[list(positions)] = True
    return mask.reshape(SPEC.shape)


# Scores rise with the position, so the best positions are the last ones.
SCORES = torch.arange(SPEC.numel, dtype=torch.float32).reshape(SPEC.shape)


class TestStructureChecks:
    """Structure checks pass the built-in and fail each broken structure."""

    base = flat_mask(0, 1, 2)
    candidates = flat_mask(3, 4, 5, 6)  # the high-scoring 7..11 are not candidates

    def test_fill_check_passes_the_builtin(self):
        result = check_structure_fill(Unstructured(), SPEC, SCORES, self.base, self.candidates, 5)
        assert torch.equal(result, flat_mask(0, 1, 2, 5, 6))

    def test_fill_check_catches_a_fill_that_ignores_candidates(self):
        with pytest.raises(AssertionError, match="not candidates"):
            check_structure_fill(CandidateBlindFill(), SPEC, SCORES, self.base, self.candidates, 5)

    def test_fill_check_catches_a_budget_drift(self):
        with pytest.raises(AssertionError, match="not the budget 5"):
            check_structure_fill(DriftingFill(), SPEC, SCORES, self.base, self.candidates, 5)

    def test_fill_check_rejects_an_impossible_budget_as_misuse(self):
        with pytest.raises(ValueError, match="cannot be filled"):
            check_structure_fill(Unstructured(), SPEC, SCORES, self.base, self.candidates, 8)

    def test_keep_check_passes_the_builtin(self):
        check_structure_keep(Unstructured(), SPEC, SCORES, flat_mask(*range(6)), 0.5)
        check_structure_keep(Unstructured(), SPEC, SCORES, flat_mask(*range(6)), 0.0)

    def test_keep_check_catches_keeping_an_inactive_position(self):
        with pytest.raises(AssertionError, match="kept 1 inactive"):
            check_structure_keep(KeepsInactive(), SPEC, SCORES, flat_mask(*range(6)), 0.5)

    def test_keep_check_catches_dropping_more_than_can_be_regrown(self):
        nearly_full = flat_mask(*range(SPEC.numel - 1))
        with pytest.raises(AssertionError, match="more than the 1 inactive"):
            check_structure_keep(OverDroppingKeep(), SPEC, SCORES, nearly_full, 0.5)

    def test_keep_check_catches_a_drop_at_fraction_zero(self):
        with pytest.raises(AssertionError, match="at fraction 0"):
            check_structure_keep(DropsAtZero(), SPEC, SCORES, flat_mask(*range(6)), 0.0)

    def test_budget_check_passes_the_builtin_and_catches_a_generous_budget(self):
        assert check_structure_budget(Unstructured(), SPEC, 0.5) == 6
        with pytest.raises(AssertionError, match=r"more than 1\.0 from"):
            check_structure_budget(GenerousBudget(), SPEC, 0.45)


def context() -> ScoreContext:
    gen = torch.Generator().manual_seed(0)
    mask = flat_mask(0, 4, 8, 9)
    weight = torch.randn(SPEC.shape, generator=gen) * mask
    grad = torch.randn(SPEC.shape, generator=gen)
    return ScoreContext(SPEC, 10, weight, mask, make_generator(0, "fc", 10, "grow"), grad=grad)


class TestCriterionCheck:
    """The criterion check passes the built-ins and fails each broken criterion."""

    @pytest.mark.parametrize("criterion", [RandomGrowth(), GradientGrowth()])
    def test_passes_the_builtins(self, criterion):
        check_criterion_scores(criterion, context())

    def test_catches_a_criterion_that_mutates_the_weight(self):
        with pytest.raises(AssertionError, match=r"modified its input ctx\.weight"):
            check_criterion_scores(MutatingGrowth(), context())

    def test_catches_a_criterion_that_uses_the_global_rng(self):
        with pytest.raises(AssertionError, match="global torch RNG"):
            check_criterion_scores(GlobalRngGrowth(), context())

    def test_catches_scores_of_the_wrong_shape(self):
        with pytest.raises(AssertionError, match=r"shape \(12,\)"):
            check_criterion_scores(FlatScoresGrowth(), context())


LAYERS = [LayerSpec("a", (16, 8)), LayerSpec("b", (8, 4, 3, 3)), LayerSpec("c", (4, 8, 3))]


class TestDistributionAndScheduleChecks:
    """Distribution and schedule checks pass the built-ins and fail broken ones."""

    def test_distribution_check_passes_erk_and_catches_a_ten_percent_error(self):
        check_distribution(ErdosRenyiKernel(), LAYERS, 0.3)
        with pytest.raises(AssertionError, match="global density"):
            check_distribution(TenPercentOver(), LAYERS, 0.3)

    def test_schedule_check_passes_the_builtins_and_catches_a_fraction_above_one(self):
        check_drop_schedule(CosineDrop(), 50)
        check_drop_schedule(ConstantDrop(rate=1.0), 50)
        with pytest.raises(AssertionError, match=r"= 1\.5 is outside \[0, 1\]"):
            check_drop_schedule(OverOneDrop(), 50)


# -- whole runs ----------------------------------------------------------------------------------


def tiny_mlp() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(4)]


RUN = {
    "model_factory": tiny_mlp,
    "steps": 12,
    "optimizer_factory": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "data": batches(),
}
BASE = DSTConfig(
    prune="magnitude",
    grow="random",
    drop={"kind": "constant", "rate": 0.5},
    distribution="uniform",
    density=0.5,
    delta_t=2,
)


class TestMethodRunCheck:
    """The run checks pass a sound method and fail every broken component inside a run."""

    def test_passes_a_sound_method(self):
        scheduler = check_method_run(BASE, **RUN)
        assert scheduler.history

    @pytest.mark.parametrize(
        "change",
        [
            {"structures": CandidateBlindFill()},
            {"structures": DriftingFill()},
            {"structures": KeepsInactive()},
            {"structures": OverDroppingKeep(), "density": 0.9},
            {"grow": FlatScoresGrowth()},
            {"drop": OverOneDrop()},
        ],
        ids=["regrows-dropped", "budget-drift", "keeps-inactive", "over-drop", "shape", "drop>1"],
    )
    def test_reports_engine_update_errors_as_check_failures(self, change):
        config = attrs.evolve(BASE, **change)
        with pytest.raises(AssertionError, match="check_method_run: the scheduler rejected"):
            check_method_run(config, **RUN)

    def test_catches_a_criterion_that_changes_surviving_weights(self):
        config = attrs.evolve(BASE, grow=MutatingGrowth())
        with pytest.raises(AssertionError, match="changed weights that stayed active"):
            check_method_run(config, **RUN)

    def test_same_seed_check_catches_global_rng_randomness(self):
        check_same_seed_same_masks(BASE, **RUN)
        config = attrs.evolve(BASE, grow=GlobalRngGrowth())
        with pytest.raises(AssertionError, match="masks differ after update"):
            check_same_seed_same_masks(config, **RUN)
