"""Property tests of the engine and the built-ins, run through the public testing kit."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from sparsity_core import (
    ComponentType,
    DSTConfig,
    DSTScheduler,
    LayerError,
    LayerSpec,
    ScoreContext,
    get_registry,
)
from sparsity_core.rng import make_generator
from sparsity_core.testing import (
    check_checkpoint_resume,
    check_criterion_scores,
    check_distribution,
    check_drop_schedule,
    check_method_run,
    check_same_seed_same_masks,
    check_structure_budget,
    check_structure_fill,
    check_structure_keep,
    check_zero_drop_is_identity,
)
from sparsity_core.testing import strategies as sst

REGISTRY = get_registry()
PRUNES = REGISTRY.names(ComponentType.PRUNE)
GROWTHS = REGISTRY.names(ComponentType.GROWTH)
# Arbitrary masks are valid inputs only without structure; structured ones need
# structure-aware strategies (groups with fixed counts), which the kit does not draw yet.
STRUCTURES = ["unstructured"]
DISTRIBUTIONS = REGISTRY.names(ComponentType.DISTRIBUTION)
SCHEDULES = REGISTRY.names(ComponentType.SCHEDULE)
BATCH = 8


# -- tiny models, data and optimizers ----------------------------------------------------------


class MLP(nn.Module):
    """Three Linear layers."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvNet(nn.Module):
    """Conv2d, then Conv1d over the flattened feature map, then Linear."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(2, width, 3)
        self.conv1d = nn.Conv1d(width, width, 3)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2d(x)).flatten(2)
        h = torch.relu(self.conv1d(h)).mean(dim=-1)
        return self.head(h)


class DeadBranchMLP(nn.Module):
    """An MLP with a layer whose output is multiplied by 0 and a layer that is never called."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(6, width)
        self.dead = nn.Linear(width, 3)  # all-zero gradient
        self.unused = nn.Linear(width, width)  # no gradient at all
        self.out = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        return self.out(h) + 0.0 * self.dead(h)


class GroupedConvNet(nn.Module):
    """Conv2d and Linear layers whose fan-ins (16, 32, 32) hold N:M groups of M up to 16."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 32, 2)
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(h)))


MODELS: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "mlp": (MLP, (6,)),
    "conv": (ConvNet, (2, 6, 6)),
    "dead": (DeadBranchMLP, (6,)),
    "grouped": (GroupedConvNet, (4, 5, 5)),
}


def model_factory(kind: str, width: int, seed: int) -> Callable[[], nn.Module]:
    """A factory building the same initial model on every call, leaving the global RNG alone."""
    cls = MODELS[kind][0]

    def build() -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(width)

    return build


def batches(kind: str, seed: int, count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shape = MODELS[kind][1]
    return [
        (torch.randn((BATCH, *shape), generator=gen), torch.randn((BATCH, 3), generator=gen))
        for _ in range(count)
    ]


def sgd_momentum(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)


def adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-2)


optimizers = st.sampled_from([sgd_momentum, adam])
widths = st.integers(min_value=4, max_value=32)
run_steps = st.integers(min_value=12, max_value=24)


def run_kwargs(kind: str, width: int, seed: int, optimizer, steps: int) -> dict:
    return {
        "model_factory": model_factory(kind, width, seed),
        "steps": steps,
        "optimizer_factory": optimizer,
        "data": batches(kind, seed),
    }


# -- whole runs --------------------------------------------------------------------------------


class TestEveryPruneGrowthPair:
    """Every registered prune x growth pair keeps the engine's invariants on every step."""

    @pytest.mark.parametrize(("prune", "grow"), list(itertools.product(PRUNES, GROWTHS)))
    @given(
        data=st.data(),
        kind=st.sampled_from(["mlp", "conv"]),
        width=widths,
        seed=sst.seeds(),
        optimizer=optimizers,
        steps=run_steps,
    )
    def test_budget_is_exact_and_masks_valid_after_every_step(
        self, prune, grow, data, kind, width, seed, optimizer, steps
    ):
        config = data.draw(sst.method_configs(prune=prune, grow=grow))
        scheduler = check_method_run(config, **run_kwargs(kind, width, seed, optimizer, steps))
        assert scheduler.history, "no update happened, so the update checks were not exercised"


class TestDegenerateGradients:
    """All-zero, missing and NaN gradients never break the budget or the zero invariants."""

    @given(
        config=sst.method_configs(),
        width=widths,
        seed=sst.seeds(),
        optimizer=optimizers,
        steps=run_steps,
    )
    def test_invariants_hold_for_layers_with_zero_or_no_gradient(
        self, config, width, seed, optimizer, steps
    ):
        scheduler = check_method_run(config, **run_kwargs("dead", width, seed, optimizer, steps))
        assert {"dead", "unused"} <= set(scheduler.layers)
        assert scheduler.history

    @given(
        config=sst.method_configs(),
        kind=st.sampled_from(["mlp", "conv", "dead"]),
        width=widths,
        seed=sst.seeds(),
        optimizer=optimizers,
        steps=run_steps,
        rate=st.sampled_from([0.2, 1.0]),
    )
    def test_invariants_hold_with_nan_gradients_on_update_steps(
        self, config, kind, width, seed, optimizer, steps, rate
    ):
        def poison(step: int, model: nn.Module) -> None:
            if step % config.delta_t:
                return
            gen = torch.Generator().manual_seed(seed + step)
            for module in model.modules():
                grad = getattr(getattr(module, "weight", None), "grad", None)
                if grad is not None:
                    grad.masked_fill_(torch.rand(grad.shape, generator=gen) < rate, float("nan"))

        scheduler = check_method_run(
            config,
            before_optimizer_step=poison,
            **run_kwargs(kind, width, seed, optimizer, steps),
        )
        assert scheduler.history


class TestRunProperties:
    """Zero drop, seeding and checkpoints behave as documented."""

    @given(
        config=sst.method_configs(),
        kind=st.sampled_from(["mlp", "conv"]),
        width=widths,
        seed=sst.seeds(),
        optimizer=optimizers,
        steps=run_steps,
    )
    def test_drop_fraction_zero_leaves_masks_identical(
        self, config, kind, width, seed, optimizer, steps
    ):
        check_zero_drop_is_identity(
            config,
            drop={"kind": "constant", "rate": 0.0},
            **run_kwargs(kind, width, seed, optimizer, steps),
        )

    @given(
        config=sst.method_configs(),
        kind=st.sampled_from(["mlp", "conv"]),
        width=widths,
        seed=sst.seeds(),
        optimizer=optimizers,
        steps=run_steps,
    )
    def test_same_seed_gives_same_masks(self, config, kind, width, seed, optimizer, steps):
        check_same_seed_same_masks(config, **run_kwargs(kind, width, seed, optimizer, steps))

    @pytest.mark.parametrize("grow", ["gradient", "random", "momentum"], ids=["rigl", "set", "mom"])
    @given(
        data=st.data(),
        kind=st.sampled_from(["mlp", "conv"]),
        width=widths,
        seed=sst.seeds(),
        optimizer=optimizers,
        steps=run_steps,
    )
    def test_checkpoint_round_trip_resumes_bit_identically(
        self, grow, data, kind, width, seed, optimizer, steps
    ):
        config = data.draw(sst.method_configs(prune="magnitude", grow=grow))
        resume_at = data.draw(st.integers(min_value=1, max_value=steps - 1), label="resume_at")
        check_checkpoint_resume(
            config, resume_at=resume_at, **run_kwargs(kind, width, seed, optimizer, steps)
        )


# -- components --------------------------------------------------------------------------------


@st.composite
def layer_lists(draw, *, min_size: int = 1, max_size: int = 5) -> list[LayerSpec]:
    """Layer specs with distinct names."""
    count = draw(st.integers(min_value=min_size, max_value=max_size))
    return [draw(sst.layer_specs(fqn=f"layer{i}", max_side=16)) for i in range(count)]


class TestDistributions:
    """Every registered distribution meets the global density exactly."""

    @pytest.mark.parametrize("name", DISTRIBUTIONS)
    @given(layers=layer_lists(), density=sst.densities(min_value=0.01), data=st.data())
    def test_distribution_hits_global_density_within_one_weight_per_layer(
        self, name, layers, density, data
    ):
        check_distribution(REGISTRY.create(ComponentType.DISTRIBUTION, name), layers, density)

    @pytest.mark.parametrize("name", DISTRIBUTIONS)
    @given(layers=layer_lists(min_size=2), density=sst.densities(min_value=0.01), data=st.data())
    def test_distribution_with_dense_layers_hits_global_density(self, name, layers, density, data):
        dense = data.draw(
            st.lists(st.sampled_from([s.fqn for s in layers]), min_size=1, unique=True),
            label="dense",
        )
        total = sum(s.numel for s in layers)
        assume(sum(s.numel for s in layers if s.fqn in dense) < density * total)
        distribution = REGISTRY.create(ComponentType.DISTRIBUTION, name, dense=dense)
        result = check_distribution(distribution, layers, density)
        assert all(result[fqn] == 1.0 for fqn in dense)


class TestStructures:
    """The unstructured structure's keep, fill and budget respect their contracts."""

    @pytest.mark.parametrize("name", STRUCTURES)
    @given(data=st.data(), spec=sst.layer_specs())
    def test_fill_keeps_base_adds_only_candidates_and_hits_budget(self, name, data, spec):
        base = data.draw(sst.masks(spec), label="base")
        candidates = data.draw(sst.masks(spec), label="candidates")
        room = int((candidates & ~base).sum())
        have = int(base.sum())
        budget = data.draw(st.integers(min_value=have, max_value=have + room), label="budget")
        scores = data.draw(sst.scores(spec.shape, nonfinite=st.booleans()), label="scores")
        structure = REGISTRY.create(ComponentType.STRUCTURE, name)
        check_structure_fill(structure, spec, scores, base, candidates, budget)

    @pytest.mark.parametrize("name", STRUCTURES)
    @given(
        data=st.data(),
        spec=sst.layer_specs(),
        fraction=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    )
    def test_keep_is_a_subset_and_fraction_zero_is_identity(self, name, data, spec, fraction):
        mask = data.draw(sst.masks(spec), label="mask")
        scores = data.draw(sst.scores(spec.shape, nonfinite=st.booleans()), label="scores")
        structure = REGISTRY.create(ComponentType.STRUCTURE, name)
        check_structure_keep(structure, spec, scores, mask, fraction)

    @pytest.mark.parametrize("name", STRUCTURES)
    @given(spec=sst.layer_specs(max_side=16), density=sst.densities(min_value=1e-3))
    def test_budget_is_an_integer_near_density_times_numel(self, name, spec, density):
        check_structure_budget(REGISTRY.create(ComponentType.STRUCTURE, name), spec, density)


def _context(spec: LayerSpec, draw) -> ScoreContext:
    weight = draw(sst.scores(spec.shape, nonfinite=False), label="weight")
    mask = draw(sst.masks(spec), label="mask")
    weight = weight * mask
    grad = draw(sst.scores(spec.shape, nonfinite=st.booleans()), label="grad")
    return ScoreContext(
        spec,
        draw(st.integers(min_value=1, max_value=1000), label="step"),
        weight,
        mask,
        make_generator(draw(sst.seeds(), label="seed"), spec.fqn, 1, "grow"),
        grad=grad,
        optimizer_state={"exp_avg": grad * 0.1, "exp_avg_sq": grad * grad},
        grad_momentum=grad * 0.5,
        ever_active=mask | draw(sst.masks(spec), label="ever_active"),
    )


class TestCriteria:
    """Every registered criterion scores like the weight, mutates nothing and is seeded."""

    @pytest.mark.parametrize(
        ("ctype", "name"),
        [(ComponentType.PRUNE, n) for n in PRUNES] + [(ComponentType.GROWTH, n) for n in GROWTHS],
    )
    @given(data=st.data(), spec=sst.layer_specs())
    def test_scores_are_shaped_pure_and_reproducible(self, ctype, name, data, spec):
        check_criterion_scores(REGISTRY.create(ctype, name), _context(spec, data.draw))


class TestSchedules:
    """Every registered drop schedule stays in [0, 1]."""

    @pytest.mark.parametrize("name", SCHEDULES)
    @given(t_end=st.integers(min_value=1, max_value=200))
    def test_drop_fraction_is_in_unit_interval(self, name, t_end):
        check_drop_schedule(REGISTRY.create(ComponentType.SCHEDULE, name), t_end)


@pytest.mark.parametrize("name", REGISTRY.names(ComponentType.PRESET))
def test_presets_pass_the_run_checks(name):
    """Every registered preset, shrunk to a tiny run on Conv2d + Linear, keeps every invariant."""
    config = REGISTRY.get(ComponentType.PRESET, name)(delta_t=3, density=0.3)
    assert isinstance(config, DSTConfig)
    check_method_run(config, **run_kwargs("grouped", 8, 0, adam, 16))


class TiedMLP(nn.Module):
    """Two square Linear layers sharing one weight (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 6)
        self.second.weight = self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def test_tied_weights_are_rejected_with_a_clear_error():
    """A weight shared by two layers would need two masks: it is refused, naming both layers."""
    model = TiedMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(LayerError, match=r"'first' and 'second' share one weight tensor"):
        DSTScheduler(model, optimizer, DSTConfig(density=0.5, delta_t=2), total_steps=20)
