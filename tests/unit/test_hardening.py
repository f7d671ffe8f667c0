"""Silent damage a new user hit: each case is an error or a defined, tested behaviour now."""

from __future__ import annotations

import warnings

import attrs
import pytest
import torch
from torch import nn

import sparsity_core as sc
from sparsity_core import (
    CheckpointError,
    ConfigError,
    DSTScheduler,
    LayerError,
    SchedulerStateError,
    SparsityWarning,
    UpdateError,
)
from sparsity_core.config import LayerRule


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))


def _step(model, optimizer, gen) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(torch.randn(8, 16, generator=gen)).pow(2).mean().backward()
    optimizer.step()


def _active_weights_at_zero(scheduler: DSTScheduler) -> int:
    return sum(int(((layer.weight == 0) & layer.mask).sum()) for layer in scheduler.layers.values())


class TestSecondScheduler:
    """A second scheduler over the same optimizer and weights is refused, naming the first."""

    def test_second_scheduler_on_the_same_optimizer_is_refused(self):
        """The notebook cell run twice: the second construction names the first and remove()."""
        model = _mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        first = DSTScheduler(model, optimizer, sc.preset("rigl", delta_t=5), total_steps=40)
        with pytest.raises(SchedulerStateError) as info:
            DSTScheduler(model, optimizer, sc.preset("rigl", delta_t=5), total_steps=40)
        message = str(info.value)
        assert "remove()" in message and repr(first) in message and "'0'" in message
        assert DSTScheduler.attached(optimizer) == [first]

    def test_after_remove_the_new_scheduler_trains_as_if_alone(self):
        """With the first removed, training matches a scheduler that never had a predecessor."""
        import copy

        model = _mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        first = DSTScheduler(model, optimizer, sc.preset("set", delta_t=5), total_steps=40)
        first.remove()
        alone = copy.deepcopy(model)
        alone_optimizer = torch.optim.SGD(alone.parameters(), lr=0.1)
        config = sc.preset("set", delta_t=5, seed=1)
        second = DSTScheduler(model, optimizer, config, total_steps=40)
        reference = DSTScheduler(alone, alone_optimizer, config, total_steps=40)
        gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        for _ in range(12):
            _step(model, optimizer, gen_a)
            second.step()
            _step(alone, alone_optimizer, gen_b)
            reference.step()
        for (name, a), b in zip(
            model.state_dict().items(), alone.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), name
        assert DSTScheduler.attached(optimizer) == [second]

    def test_disjoint_layers_may_share_an_optimizer(self):
        """Two schedulers over different layers of one optimizer are allowed."""
        model = _mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        DSTScheduler(model, optimizer, sc.preset("rigl", delta_t=5, include=["0"]), total_steps=40)
        DSTScheduler(model, optimizer, sc.preset("rigl", delta_t=5, include=["2"]), total_steps=40)
        assert len(DSTScheduler.attached(optimizer)) == 2


class TestFrozenLayers:
    """Layers with requires_grad=False are skipped and reported, never sparsified."""

    def test_frozen_layer_is_skipped_with_a_warning_and_reported(self):
        """The frozen layer keeps its weights, is outside the budget and is listed in skipped."""
        model = _mlp()
        model[0].weight.requires_grad_(False)
        before = model[0].weight.detach().clone()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        with pytest.warns(SparsityWarning, match=r"requires_grad=False.*exclude=\['0'\]"):
            scheduler = DSTScheduler(model, optimizer, sc.preset("rigl", delta_t=5), total_steps=40)
        assert list(scheduler.layers) == ["2"]
        assert [(s.fqn, s.reason.split(":")[0]) for s in scheduler.skipped] == [
            ("0", "frozen (requires_grad=False)")
        ]
        assert torch.equal(model[0].weight, before)

    def test_excluding_the_frozen_layer_silences_the_warning(self):
        """Once the user says so with exclude=, nothing is reported as a surprise."""
        model = _mlp()
        model[0].weight.requires_grad_(False)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            DSTScheduler(
                model, optimizer, sc.preset("rigl", delta_t=5, exclude=["0"]), total_steps=40
            )

    def test_every_layer_frozen_names_requires_grad(self):
        """Nothing trainable to sparsify is an error naming requires_grad, not the optimizer."""
        model = _mlp()
        for p in model.parameters():
            p.requires_grad_(False)
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        with pytest.raises(ConfigError, match="requires_grad"):
            DSTScheduler(model, optimizer, sc.preset("rigl", delta_t=5), total_steps=40)


class FailOnce:
    """A growth criterion that raises on its first call, then scores at random."""

    def __init__(self) -> None:
        self.calls = 0

    def scores(self, ctx):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("transient")
        return torch.rand(ctx.weight.shape, generator=ctx.generator)


class TestStepContract:
    """step() after a failed update, after remove(), and without an optimizer step."""

    def _scheduler(self, **overrides):
        model = _mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        config = sc.preset("set", delta_t=2, **overrides)
        return model, optimizer, DSTScheduler(model, optimizer, config, total_steps=40)

    def test_failed_update_does_not_advance_the_step(self):
        """An UpdateError leaves the counter as it was, so the next call retries that update."""
        model, optimizer, scheduler = self._scheduler()
        grow = FailOnce()
        object.__setattr__(scheduler.config, "grow", grow)
        gen = torch.Generator().manual_seed(0)
        _step(model, optimizer, gen)
        scheduler.step()
        _step(model, optimizer, gen)
        with pytest.raises(UpdateError):
            scheduler.step()
        assert scheduler.step_count == 1 and scheduler.history == []
        records = scheduler.step()  # retried at once: the same update step
        assert scheduler.step_count == 2 and records and records[0].step == 2

    def test_step_after_remove_is_refused(self):
        """A removed scheduler no longer changes masks."""
        model, optimizer, scheduler = self._scheduler()
        scheduler.remove()
        masks = {k: m.clone() for k, m in scheduler.masks.items()}
        gen = torch.Generator().manual_seed(0)
        _step(model, optimizer, gen)
        with pytest.raises(SchedulerStateError, match="remove"):
            scheduler.step()
        assert all(torch.equal(masks[k], m) for k, m in scheduler.masks.items())

    def test_step_without_an_optimizer_step_warns_and_does_not_count(self):
        """Two step() calls per optimizer step would double the schedule: warned, not counted."""
        model, optimizer, scheduler = self._scheduler()
        gen = torch.Generator().manual_seed(0)
        _step(model, optimizer, gen)
        scheduler.step()
        with pytest.warns(SparsityWarning, match="optimizer.step"):
            assert scheduler.step() == []
        assert scheduler.step_count == 1
        _step(model, optimizer, gen)
        assert scheduler.step() and scheduler.step_count == 2


class TestCheckpointValues:
    """A checkpoint's step and mask dtypes are validated, never coerced."""

    def _state(self):
        model = _mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = DSTScheduler(model, optimizer, sc.preset("rigl", delta_t=5), total_steps=40)
        state = scheduler.state_dict()
        scheduler.remove()
        return model, optimizer, state

    @pytest.mark.parametrize("step", [-5, 2.5, True, "3", 10**9])
    def test_bad_step_is_refused(self, step):
        """Negative, fractional, non-integer or beyond-the-run steps name the value."""
        model, optimizer, state = self._state()
        state["step"] = step
        with pytest.raises(CheckpointError, match=r"step"):
            DSTScheduler.from_state_dict(model, optimizer, state)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
    def test_non_bool_mask_is_refused(self, dtype):
        """A float or uint8 mask is not silently turned into a bool one."""
        model, optimizer, state = self._state()
        state["masks"]["0"] = state["masks"]["0"].to(dtype)
        with pytest.raises(CheckpointError, match=str(dtype)):
            DSTScheduler.from_state_dict(model, optimizer, state)
        assert DSTScheduler.attached(optimizer) == []


class TestPatternsThatMatchNothing:
    """A LayerRule or exclude pattern that matches no layer is an error listing the layers."""

    def test_rule_matching_no_layer(self):
        model = _mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        config = sc.preset("rigl", rules=[LayerRule("*.atn.*", structures=("constant_fan_in",))])
        with pytest.raises(ConfigError, match=r"'\*\.atn\.\*'.*\['0', '2'\]"):
            DSTScheduler(model, optimizer, config, total_steps=40)

    def test_exclude_matching_no_layer(self):
        model = _mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ConfigError, match=r"exclude pattern 'fc9'.*\['0', '2'\]"):
            DSTScheduler(model, optimizer, sc.preset("rigl", exclude=["fc9"]), total_steps=40)

    def test_delta_t_beyond_t_end_warns(self):
        """No update step in (t_start, t_end) while the schedule would drop: warned."""
        model = _mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.warns(SparsityWarning, match=r"delta_t=100.*t_end=30"):
            DSTScheduler(model, optimizer, sc.preset("rigl", delta_t=100), total_steps=40)

    def test_static_preset_does_not_warn(self):
        """A schedule that never drops asks for no update: nothing to warn about."""
        model = _mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            DSTScheduler(model, optimizer, sc.preset("static"), total_steps=40)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2)
        self.head = nn.Linear(16, 4)


class TestUnsupportedWeights:
    """Weights the scheduler cannot sparsify are reported, never left dense without a word."""

    def test_multihead_attention_in_proj_is_reported(self):
        model = Attention()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.warns(SparsityWarning, match="in_proj_weight"):
            scheduler = DSTScheduler(model, optimizer, sc.preset("rigl", delta_t=5), total_steps=40)
        assert "attn.out_proj" in scheduler.layers
        assert [s.fqn for s in scheduler.skipped] == ["attn.in_proj_weight"]


class TestClearErrors:
    """Raw errors that escaped before now name the component, the value and the fix."""

    def test_model_on_the_meta_device(self):
        model = _mlp().to("meta")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(LayerError, match=r"meta.*to_empty"):
            DSTScheduler(model, optimizer, sc.preset("rigl", delta_t=5), total_steps=40)

    def test_misspelled_preset_override(self):
        with pytest.raises(ConfigError, match=r"densty.*density"):
            sc.preset("rigl", densty=0.1)

    def test_unregistered_component_instance_fails_at_construction(self):
        """Not at the first state_dict(), after training: at construction, naming the hook."""

        @attrs.frozen
        class MyGrowth:
            def scores(self, ctx):
                return torch.rand(ctx.weight.shape, generator=ctx.generator)

        model = _mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        config = sc.preset("rigl", grow=MyGrowth())
        with pytest.raises(ConfigError, match="sparsity_register_growth_criteria"):
            DSTScheduler(model, optimizer, config, total_steps=40)
        assert DSTScheduler.attached(optimizer) == []

    def test_an_in_process_registration_saves_and_resumes(self):
        """Registry.with_component names the instance in checkpoints and resolves it on load."""

        @attrs.frozen
        class MyGrowth:
            def scores(self, ctx):
                return torch.rand(ctx.weight.shape, generator=ctx.generator)

        registry = sc.get_registry().with_component("growth", "my_growth", MyGrowth)
        model = _mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        config = sc.preset("rigl", grow=MyGrowth(), delta_t=5)
        scheduler = DSTScheduler(model, optimizer, config, total_steps=40, registry=registry)
        state = scheduler.state_dict()
        assert state["config"]["grow"] == {"kind": "my_growth"}
        scheduler.remove()
        resumed = DSTScheduler.from_state_dict(model, optimizer, state, registry=registry)
        assert resumed.config.grow == MyGrowth()
        with pytest.raises(CheckpointError, match="my_growth"):  # the global registry lacks it
            DSTScheduler.from_state_dict(_mlp(), torch.optim.SGD(_mlp().parameters()), state)


class TestPaddedSingleGroup:
    """A padded N:M layer that forms one group never drops what it cannot regrow."""

    def test_padded_nm_on_a_one_by_one_layer_keeps_what_it_cannot_regrow(self):
        """(1, 1) at density 1, fraction 1: the group's one real position has no room to
        regrow, so keep() drops nothing (it dropped it: the padding counted as room)."""
        nm = sc.get_registry().create("structure", "nm", n=2, m=4, pad=True)
        spec = sc.LayerSpec("fc", (1, 1))
        budget = nm.budget(spec, 1.0)
        mask = torch.ones(1, 1, dtype=torch.bool)
        kept = nm.keep(torch.zeros(1, 1), mask, 1.0, spec)
        assert torch.equal(kept, mask)
        filled = nm.fill(torch.zeros(1, 1), kept, ~mask, budget, spec, previous=mask)
        assert nm.satisfied(filled, spec, budget)
