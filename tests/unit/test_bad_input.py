"""Bad input fails before training starts, with the right error type and a useful message."""

from __future__ import annotations

import functools
import warnings
from collections import OrderedDict

import attrs
import pytest
import torch
from torch import nn

import sparsity_core
from sparsity_core import (
    ConfigError,
    DSTConfig,
    DSTScheduler,
    LayerError,
    OptimizerError,
    UnknownComponentError,
    UpdateError,
)


class MLP(nn.Module):
    """Three named Linear layers: fc1, fc2, head."""

    def __init__(self, seed: int = 0, width: int = 32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(16, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshot[key]), f"{key} changed by a failed construction"


def _scheduler_error(model, config, error, *, optimizer=None, total_steps=100, registry=None):
    """Build a scheduler that must fail with ``error``; check the model was left as it was."""
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
    snapshot = _snapshot(model)
    with pytest.raises(error) as info:
        DSTScheduler(model, optimizer, config, total_steps=total_steps, registry=registry)
    _assert_untouched(model, snapshot)
    return str(info.value)


def _train_step(model, optimizer, scheduler, gen, *, poison=None):
    x = torch.randn(8, 16, generator=gen)
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    if poison is not None:
        poison()
    optimizer.step()
    return scheduler.step()


class TestConfigValues:
    """Invalid DSTConfig values raise ConfigError when the config is built."""

    @pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan")])
    def test_density_out_of_range(self, density):
        """A density outside (0, 1] is rejected, naming the field and the value."""
        with pytest.raises(ConfigError) as info:
            DSTConfig(density=density)
        assert f"density={float(density)!r}" in str(info.value)

    def test_density_not_a_number(self):
        """A density that is not a number is a ConfigError naming the field and the value."""
        with pytest.raises(ConfigError) as info:
            DSTConfig(density="ten percent")
        assert "density" in str(info.value)
        assert "ten percent" in str(info.value)

    @pytest.mark.parametrize("delta_t", [0, -3, 1.5, True])
    def test_delta_t_not_positive_int(self, delta_t):
        """delta_t must be an integer >= 1."""
        with pytest.raises(ConfigError) as info:
            DSTConfig(delta_t=delta_t)
        assert f"delta_t={delta_t!r}" in str(info.value)

    @pytest.mark.parametrize("t_end", [10, 5])
    def test_t_end_not_after_t_start(self, t_end):
        """t_end <= t_start is rejected, naming both values."""
        with pytest.raises(ConfigError) as info:
            DSTConfig(t_start=10, t_end=t_end)
        message = str(info.value)
        assert f"t_end={t_end}" in message
        assert "t_start=10" in message

    def test_negative_t_start(self):
        """t_start must be >= 0."""
        with pytest.raises(ConfigError, match="t_start=-1"):
            DSTConfig(t_start=-1)

    def test_unknown_component_name(self):
        """A misspelled component name lists the available ones."""
        with pytest.raises(UnknownComponentError) as info:
            DSTConfig(grow="gradiant")
        message = str(info.value)
        assert "'gradiant'" in message
        for name in ("gradient", "random", "momentum", "unfired"):
            assert name in message

    def test_not_a_component(self):
        """An object without the protocol's methods is rejected, naming the field."""
        with pytest.raises(ConfigError) as info:
            DSTConfig(grow=object())
        message = str(info.value)
        assert "DSTConfig.grow=<object object" in message
        assert "GrowthCriterion" in message

    def test_not_a_structure(self):
        """A structure lacking the StructureConstraint methods is rejected."""
        with pytest.raises(ConfigError, match="StructureConstraint"):
            DSTConfig(structures=(object(),))


class TestSchedulerArguments:
    """Arguments of DSTScheduler that conflict with the config fail at construction."""

    def test_t_end_beyond_total_steps(self):
        """t_end larger than the run is rejected, naming both numbers."""
        message = _scheduler_error(MLP(), DSTConfig(t_end=50), ConfigError, total_steps=40)
        assert "t_end=50" in message
        assert "total_steps=40" in message

    def test_t_end_none_without_total_steps(self):
        """With t_end=None the scheduler needs total_steps."""
        message = _scheduler_error(MLP(), DSTConfig(), ConfigError, total_steps=None)
        assert "t_end is None" in message
        assert "total_steps" in message

    @pytest.mark.parametrize("total_steps", [0, -5, True])
    def test_total_steps_not_positive(self, total_steps):
        """total_steps must be a positive integer."""
        message = _scheduler_error(MLP(), DSTConfig(), ConfigError, total_steps=total_steps)
        assert f"total_steps={total_steps!r}" in message

    @pytest.mark.parametrize("total_steps", [100.5, "100"])
    def test_total_steps_not_integer(self, total_steps):
        """A non-integer total_steps is a ConfigError naming the value."""
        message = _scheduler_error(MLP(), DSTConfig(), ConfigError, total_steps=total_steps)
        assert f"total_steps={total_steps!r}" in message

    def test_not_a_config(self):
        """Passing a dict instead of a DSTConfig is a ConfigError naming the type."""
        message = _scheduler_error(MLP(), {"density": 0.1}, ConfigError)
        assert "dict" in message

    def test_verify_ranks_not_a_bool(self):
        """verify_ranks takes True or False, not a process group or a string."""
        model = MLP()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ConfigError, match="verify_ranks='yes'"):
            DSTScheduler(model, optimizer, DSTConfig(), total_steps=100, verify_ranks="yes")


@attrs.frozen
class OverfullDistribution:
    """A distribution that hands layer 'fc2' a density above 1."""

    def densities(self, layers, density, fixed=None):
        return {spec.fqn: 1.5 if spec.fqn == "fc2" else density for spec in layers}


class TestFanInBudget:
    """Constant fan-in keeps k = round(density * fan_in) <= fan_in; anything more is refused."""

    def test_k_larger_than_fan_in_is_refused(self):
        """A density above 1 (k = 48 > fan-in 32) is a ConfigError naming the layer and value."""
        config = DSTConfig(structures=("constant_fan_in",), distribution=OverfullDistribution())
        message = _scheduler_error(MLP(), config, ConfigError, registry=_registry())
        assert "OverfullDistribution" in message
        assert "'fc2' density 1.5" in message
        assert "outside (0, 1]" in message

    def test_too_few_active_neurons_for_the_budget_is_an_update_error(self):
        """Spreading a budget over neurons that would each need k > fan-in names the layer."""
        structure = sparsity_core.get_registry().create("structure", "constant_fan_in")
        spec = sparsity_core.LayerSpec("fc2", (8, 4))
        active = torch.tensor([True, True] + [False] * 6)
        with pytest.raises(UpdateError) as info:
            structure.group_counts(spec, 16, torch.device("cpu"), active)
        message = str(info.value)
        assert "'fc2'" in message
        assert "2 active neurons cannot hold 16 weights" in message
        assert "fan-in at most 4" in message


class TestLayerSelection:
    """Selections and budgets that cannot work fail at construction, naming the layer."""

    def test_layer_too_small_for_its_budget(self):
        """A layer whose budget rounds to zero weights raises LayerError naming it."""
        model = nn.Sequential(OrderedDict(body=nn.Linear(64, 64), tiny=nn.Linear(2, 1)))
        config = DSTConfig(distribution="uniform", density=0.1)
        message = _scheduler_error(model, config, LayerError)
        assert "'tiny'" in message
        assert "(1, 2)" in message
        assert "'body'" not in message

    def test_optimizer_without_the_model_parameters(self):
        """An optimizer over another model raises OptimizerError naming the layers."""
        model, other = MLP(seed=0), MLP(seed=1)
        optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
        message = _scheduler_error(model, DSTConfig(), OptimizerError, optimizer=optimizer)
        assert "['fc1', 'fc2', 'head']" in message

    def test_optimizer_missing_one_layer(self):
        """An optimizer missing one sparse layer names exactly that layer."""
        model = MLP()
        params = [p for name, p in model.named_parameters() if not name.startswith("fc2")]
        optimizer = torch.optim.SGD(params, lr=0.1)
        message = _scheduler_error(model, DSTConfig(), OptimizerError, optimizer=optimizer)
        assert "['fc2']" in message

    def test_not_an_optimizer(self):
        """Something that is not a torch optimizer is an OptimizerError naming its type."""
        message = _scheduler_error(MLP(), DSTConfig(), OptimizerError, optimizer=["sgd"])
        assert "list" in message

    def test_include_pattern_matching_nothing(self):
        """An include pattern that matches no layer is named in the error."""
        message = _scheduler_error(MLP(), DSTConfig(include=("decoder.*",)), ConfigError)
        assert "decoder.*" in message

    def test_one_of_two_include_patterns_matching_nothing(self):
        """Among several include patterns, the one matching nothing is named."""
        config = DSTConfig(include=("fc*", "decoder.*"))
        message = _scheduler_error(MLP(), config, ConfigError)
        assert "include pattern 'decoder.*'" in message
        assert "fc1" in message

    def test_no_selectable_layer(self):
        """A model without any Linear / Conv layer cannot be sparsified."""
        model = nn.Sequential(nn.ReLU())
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        message = _scheduler_error(model, DSTConfig(), ConfigError, optimizer=optimizer)
        assert "no layer of Sequential" in message
        assert "Linear" in message

    def test_dense_pattern_matching_nothing(self):
        """A distribution's dense pattern matching no layer is named in the error."""
        config = DSTConfig(distribution={"kind": "erk", "dense": ["classifier"]})
        message = _scheduler_error(MLP(), config, ConfigError)
        assert "dense pattern 'classifier'" in message

    def test_dense_layers_exceed_density(self):
        """Dense layers that alone exceed the target density are named, with the numbers."""
        model = nn.Sequential(OrderedDict(big=nn.Linear(64, 64), small=nn.Linear(64, 4)))
        config = DSTConfig(distribution={"kind": "uniform", "dense": ["big"]}, density=0.5)
        message = _scheduler_error(model, config, ConfigError)
        assert "'big'" in message
        assert "0.5" in message

    def test_zero_parameter_layer(self):
        """A layer with no weights raises LayerError naming it."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about initialising empty tensors
            empty = nn.Linear(0, 3)
        model = nn.Sequential(OrderedDict(body=nn.Linear(8, 8), empty=empty))
        message = _scheduler_error(model, DSTConfig(), LayerError)
        assert "'empty'" in message
        assert "(3, 0)" in message


@attrs.frozen
class RaisingGrowth:
    """A growth criterion that fails on the last layer only (after the others were scored)."""

    def scores(self, ctx):
        if ctx.spec.fqn == "head":
            raise RuntimeError("boom from a broken plugin")
        return torch.rand(ctx.weight.shape, generator=ctx.generator)


@attrs.frozen
class WrongShapeGrowth:
    """A growth criterion returning one score per row for the second layer."""

    def scores(self, ctx):
        if ctx.spec.fqn == "fc2":
            return torch.zeros(ctx.weight.shape[0])
        return torch.rand(ctx.weight.shape, generator=ctx.generator)


@attrs.frozen
class RaisingPrune:
    """A prune criterion that fails on the first layer, before any layer was updated."""

    def scores(self, ctx):
        raise ValueError(f"cannot score {ctx.spec.fqn}")


@attrs.frozen
class ComplexGrowth:
    """A growth criterion returning complex scores, which have no order."""

    def scores(self, ctx):
        return torch.zeros(ctx.weight.shape, dtype=torch.complex64)


@attrs.frozen
class ListGrowth:
    """A growth criterion returning a Python list instead of a tensor."""

    def scores(self, ctx):
        return ctx.weight.tolist()


NON_FINITE = (float("nan"), float("inf"), float("-inf"))


@attrs.frozen
class NonFiniteGrowth:
    """Growth scores that are NaN / +Inf / -Inf on every other candidate, finite elsewhere."""

    def scores(self, ctx):
        scores = torch.rand(ctx.weight.shape, generator=ctx.generator)
        flat = scores.view(-1)
        for i, value in enumerate(NON_FINITE):
            flat[i::6] = value
        return scores


@attrs.frozen
class NonFinitePrune:
    """Magnitude scores, but NaN / +Inf / -Inf at the first few active weights of each layer."""

    def scores(self, ctx):
        scores = ctx.weight.abs().clone()
        first = torch.nonzero(ctx.mask.view(-1)).flatten()[: len(NON_FINITE)]
        scores.view(-1)[first] = torch.tensor(NON_FINITE)
        return scores


@attrs.frozen
class AllNaN:
    """Every score NaN: no order at all."""

    def scores(self, ctx):
        return torch.full(ctx.weight.shape, float("nan"))


_HAND_MADE = {
    "prune": (RaisingPrune, NonFinitePrune, AllNaN),
    "growth": (RaisingGrowth, WrongShapeGrowth, ComplexGrowth, ListGrowth, NonFiniteGrowth, AllNaN),
    "distribution": (OverfullDistribution,),
}


@functools.cache
def _registry() -> sparsity_core.Registry:
    """The installed components plus this file's hand-made ones, registered in-process (a
    scheduler refuses components it could not save by name)."""
    registry = sparsity_core.get_registry()
    for ctype, classes in _HAND_MADE.items():
        for cls in classes:
            registry = registry.with_component(ctype, cls.__name__, cls)
    return registry


class TestNonFiniteScores:
    """NaN and +/-Inf scores are the lowest priority and never change the budget."""

    def _run(self, *, prune="magnitude", grow="random", steps=9):
        model = MLP()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        config = sparsity_core.preset("set", density=0.2, delta_t=3, prune=prune, grow=grow)
        scheduler = DSTScheduler(model, optimizer, config, total_steps=40, registry=_registry())
        gen = torch.Generator().manual_seed(0)
        updates = []
        for _ in range(steps):
            before = {fqn: m.clone() for fqn, m in scheduler.masks.items()}
            records = _train_step(model, optimizer, scheduler, gen)
            if records:
                updates.append((before, {fqn: m.clone() for fqn, m in scheduler.masks.items()}))
            for layer in scheduler.layers.values():
                assert int(layer.mask.sum()) == layer.budget
        assert len(updates) == 3
        return scheduler, updates

    def test_non_finite_growth_scores_are_grown_last(self):
        """No position with a NaN or infinite growth score is grown while finite ones remain."""
        _, updates = self._run(grow=NonFiniteGrowth())
        passed_over = 0
        for before, after in updates:
            for fqn, mask in after.items():
                finite = (torch.arange(mask.numel()) % 6 >= len(NON_FINITE)).view(mask.shape)
                grown = mask & ~before[fqn]
                finite_left = int((~before[fqn] & finite & ~grown).sum())
                non_finite_grown = int((grown & ~finite).sum())
                assert int(grown.sum()) > 0
                assert non_finite_grown == 0 or finite_left == 0, (fqn, non_finite_grown)
                passed_over += int((~before[fqn] & ~finite & ~grown).sum()) > 0
        assert passed_over  # some update really had non-finite candidates to pass over

    def test_non_finite_prune_scores_are_dropped_first(self):
        """Active weights with NaN or infinite prune scores are the first to be dropped."""
        _, updates = self._run(prune=NonFinitePrune())
        for before, after in updates:
            for fqn, mask in after.items():
                first = torch.nonzero(before[fqn].view(-1)).flatten()[: len(NON_FINITE)]
                n_dropped = int((before[fqn] & ~mask).sum())
                assert n_dropped > 0
                still = int(mask.view(-1)[first].sum())
                assert still == max(0, len(NON_FINITE) - n_dropped), (fqn, still, n_dropped)

    def test_all_nan_scores_keep_every_budget(self):
        """With no finite score at all the update still keeps each layer's exact budget."""
        scheduler, updates = self._run(prune=AllNaN(), grow=AllNaN())
        for _, after in updates:
            for fqn, mask in after.items():
                assert int(mask.sum()) == scheduler.layers[fqn].budget


class TestUpdateFailures:
    """Failures during an update leave the model exactly as it was."""

    def _setup(self, **overrides):
        model = MLP()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        config = sparsity_core.preset("rigl", density=0.2, delta_t=3, **overrides)
        scheduler = DSTScheduler(model, optimizer, config, total_steps=40, registry=_registry())
        return model, optimizer, scheduler

    def test_nan_gradients_keep_the_budget(self):
        """NaN gradients on an update step never change any layer's active count."""
        model, optimizer, scheduler = self._setup()
        gen = torch.Generator().manual_seed(0)

        def poison():
            model.fc2.weight.grad.fill_(float("nan"))

        for step in range(1, 7):
            is_update = scheduler.is_update_step(step)
            records = _train_step(
                model, optimizer, scheduler, gen, poison=poison if is_update else None
            )
            assert bool(records) == is_update
            if is_update:  # the NaN really reached the weights the update scores
                assert bool(model.fc2.weight.isnan().any())
            for fqn, layer in scheduler.layers.items():
                assert int(layer.mask.sum()) == layer.budget, (step, fqn)
                assert bool((layer.weight.detach()[~layer.mask] == 0).all()), (step, fqn)
            for record in records:
                assert record.active == scheduler.layers[record.fqn].budget
                assert record.dropped == record.grown

    def _assert_update_error_leaves_state(self, overrides, expected):
        model, optimizer, scheduler = self._setup(**overrides)
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            assert _train_step(model, optimizer, scheduler, gen) == []
        x = torch.randn(8, 16, generator=gen)
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
        masks = {fqn: m.clone() for fqn, m in scheduler.masks.items()}
        weights = _snapshot(model)
        state = {
            id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
            for p, s in optimizer.state.items()
        }
        with pytest.raises(UpdateError) as info:
            scheduler.step()
        message = str(info.value)
        for fragment in expected:
            assert fragment in message
        for fqn, mask in scheduler.masks.items():
            assert torch.equal(mask, masks[fqn])
        _assert_untouched(model, weights)
        for p, s in optimizer.state.items():
            for k, v in state[id(p)].items():
                assert torch.equal(s[k], v)
        assert scheduler.history == []

    def test_raising_growth_criterion(self):
        """A criterion raising on one layer gives UpdateError naming it; no layer changes."""
        self._assert_update_error_leaves_state(
            {"grow": RaisingGrowth()},
            ["grow criterion RaisingGrowth", "'head'", "RuntimeError", "boom from a broken"],
        )

    def test_raising_prune_criterion(self):
        """A prune criterion raising names itself and the layer; nothing changes."""
        self._assert_update_error_leaves_state(
            {"prune": RaisingPrune()},
            ["prune criterion RaisingPrune", "'fc1'", "ValueError", "cannot score fc1"],
        )

    def test_wrong_shape_scores(self):
        """Scores of the wrong shape give UpdateError naming the shapes; nothing changes."""
        self._assert_update_error_leaves_state(
            {"grow": WrongShapeGrowth()},
            ["WrongShapeGrowth", "shape (32,)", "'fc2'", "shape (32, 32)"],
        )

    def test_wrong_dtype_scores(self):
        """Complex scores (no order) give UpdateError naming the dtype; nothing changes."""
        self._assert_update_error_leaves_state(
            {"grow": ComplexGrowth()}, ["ComplexGrowth", "torch.complex64", "'fc1'", "real-valued"]
        )

    def test_scores_not_a_tensor(self):
        """A list instead of a tensor gives UpdateError naming the type; nothing changes."""
        self._assert_update_error_leaves_state(
            {"grow": ListGrowth()}, ["ListGrowth", "returned list", "'fc1'"]
        )
