"""DSTScheduler behaviour between and at topology updates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsity_core as sc
from sparsity_core.checkpoint import SCHEMA_VERSION


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5)
    )


def _batch(step: int):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(16, 12, generator=gen), torch.randint(0, 5, (16,), generator=gen)


class TestHotPath:
    def test_dense_gradient_is_captured_only_for_update_steps(self):
        """The dense-gradient copy lives only from an update step's optimizer step to its update."""
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = sc.DSTScheduler(model, opt, sc.preset("rigl", delta_t=4), total_steps=40)
        for step in range(1, 30):
            x, y = _batch(step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            captured = set(sched._captured_grads)
            assert captured == (set(sched.layers) if sched.is_update_step(step) else set())
            sched.step()
            assert sched._captured_grads == {}

    def test_no_capture_for_criteria_that_do_not_read_gradients(self):
        """SET reads no gradient, so nothing is copied even on update steps."""
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = sc.DSTScheduler(model, opt, sc.preset("set", delta_t=2), total_steps=20)
        for step in range(1, 10):
            x, y = _batch(step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            assert sched._captured_grads == {}
            sched.step()

    def test_inactive_gradients_are_zero_when_the_optimizer_steps(self):
        """The optimizer never sees a non-zero gradient at an inactive position."""
        model = _mlp()
        seen = []

        class Spy(torch.optim.SGD):
            def step(self, closure=None):
                for layer in sched.layers.values():
                    seen.append(bool((layer.weight.grad[~layer.mask] == 0).all()))
                return super().step(closure)

        opt = Spy(model.parameters(), lr=0.1)
        sched = sc.DSTScheduler(model, opt, sc.preset("rigl", delta_t=3), total_steps=30)
        for step in range(1, 12):
            x, y = _batch(step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        assert seen and all(seen)

    def test_remove_detaches_the_hooks(self):
        """After remove(), optimizer steps no longer re-mask weights."""
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = sc.DSTScheduler(model, opt, sc.preset("rigl"), total_steps=400)
        sched.remove()
        x, y = _batch(0)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert any(bool((lay.weight[~lay.mask] != 0).any()) for lay in sched.layers.values())


class TestSchedule:
    def test_updates_happen_at_multiples_of_delta_t_before_t_end(self):
        """Records appear exactly at steps k*ΔT with t_start < step < t_end."""
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        config = sc.preset("set", delta_t=5, t_start=10, t_end=40, drop="constant")
        sched = sc.DSTScheduler(model, opt, config, total_steps=60)
        update_steps = []
        for step in range(1, 61):
            x, y = _batch(step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if sched.step():
                update_steps.append(step)
        assert update_steps == [15, 20, 25, 30, 35]
        assert {r.step for r in sched.history} == set(update_steps)

    def test_t_end_defaults_to_three_quarters_of_the_run(self):
        """With t_end=None the scheduler freezes the topology after 75% of total_steps."""
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = sc.DSTScheduler(model, opt, sc.preset("rigl"), total_steps=1000)
        assert sched.config.t_end == 750

    def test_records_report_drop_and_grow_counts(self):
        """Each update record's dropped equals grown, and active equals the budget."""
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = sc.DSTScheduler(
            model, opt, sc.preset("rigl", delta_t=2, density=0.2), total_steps=20
        )
        records = []
        for step in range(1, 8):
            x, y = _batch(step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            records += sched.step()
        assert records
        for r in records:
            assert r.dropped == r.grown > 0
            assert r.active == sched.layers[r.fqn].budget
            assert 0 < r.itop <= 1 and r.active_neurons <= r.fan_out


class TestConvLayers:
    @pytest.mark.parametrize("structure", ["unstructured", "constant_fan_in"])
    def test_conv1d_and_conv2d_layers_are_sparsified(self, structure):
        """Conv1d and Conv2d weights get masks whose fan-in axis is C_in*kernel."""
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv1d(2, 6, 3),
            nn.ReLU(),
            nn.Unflatten(1, (1, 6)),
            nn.Conv2d(1, 4, (2, 2)),
            nn.Flatten(),
            nn.Linear(4 * 5 * 5, 3),
        )
        x = torch.randn(8, 2, 8)
        assert model(x).shape == (8, 3)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = sc.DSTScheduler(
            model,
            opt,
            sc.preset("rigl", structures=structure, delta_t=2, density=0.3),
            total_steps=20,
        )
        assert [lay.spec.layer_type for lay in sched.layers.values()] == [
            "Conv1d",
            "Conv2d",
            "Linear",
        ]
        for _ in range(10):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
            sched.step()
        for layer in sched.layers.values():
            assert int(layer.mask.sum()) == layer.budget
            assert sched.structure.satisfied(layer.mask, layer.spec, layer.budget)


class TestAblationCheckpoint:
    def test_resume_after_neurons_were_ablated(self):
        """A checkpoint taken after ablation (fewer weights than the nominal budget) resumes."""
        from sparsity_core.testing import check_checkpoint_resume

        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 3))

        gen = torch.Generator().manual_seed(0)
        data = [(torch.randn(16, 16, generator=gen), torch.randn(16, 3, generator=gen))] * 2
        structures = [{"kind": "neuron_ablation", "gamma_sal": 0.9}, "constant_fan_in"]
        config = sc.preset("srigl", density=0.2, delta_t=2, structures=structures)
        adam = lambda params: torch.optim.Adam(params, lr=1e-2)  # noqa: E731
        model = build()
        opt = adam(model.parameters())
        sched = sc.DSTScheduler(model, opt, config, total_steps=24)
        for step in range(12):
            x, y = data[step % 2]
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
        first = sched.summary()[0]
        assert first.active_neurons < first.fan_out
        check_checkpoint_resume(
            config, build, steps=24, resume_at=12, optimizer_factory=adam, data=data
        )


class TestCheckpointValidation:
    def _scheduler(self, grow="momentum"):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        config = sc.preset("rigl", grow=grow, delta_t=2)
        return model, opt, sc.DSTScheduler(model, opt, config, total_steps=20)

    def test_missing_gradient_momentum_is_an_error_not_a_silent_reset(self):
        """A momentum-growth checkpoint without its gradient momentum is refused, naming it."""
        _, _, sched = self._scheduler()
        state = sched.state_dict()
        del state["grad_momentum"]
        fresh = _mlp()
        optimizer = torch.optim.SGD(fresh.parameters(), 0.1)
        with pytest.raises(sc.CheckpointError, match=r"grad_momentum\['0'\] is missing"):
            sc.DSTScheduler.from_state_dict(fresh, optimizer, state)
        assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks

    def test_newer_schema_is_refused(self):
        """A state dict from a newer schema asks for an upgrade."""
        _, _, sched = self._scheduler("gradient")
        state = {**sched.state_dict(), "schema_version": 99}
        with pytest.raises(sc.CheckpointError, match="newer than this sparsity-core"):
            sched.load_state_dict(state)

    def test_mask_breaking_the_budget_is_refused(self):
        """A mask with one weight too many is reported as corrupt."""
        _, _, sched = self._scheduler("gradient")
        state = sched.state_dict()
        mask = state["masks"]["0"]
        mask.view(-1)[torch.nonzero(~mask.view(-1))[0]] = True
        with pytest.raises(sc.CheckpointError, match="checkpoint mask of '0'"):
            sched.load_state_dict(state)

    def _resume_into(self, model, state):
        """from_state_dict into ``model``; must fail, leaving no hook on the optimizer."""
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(sc.CheckpointError) as info:
            sc.DSTScheduler.from_state_dict(model, optimizer, state)
        assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
        return str(info.value)

    @pytest.mark.parametrize(
        ("field", "value", "kind"),
        [
            ("grow", {"kind": "my_growth"}, "growth 'my_growth'"),
            ("structures", [{"kind": "my_structure"}], "structure 'my_structure'"),
        ],
    )
    def test_missing_plugin_names_the_component(self, field, value, kind):
        """A config naming a component no installed plugin provides says which and how to fix."""
        _, _, sched = self._scheduler("gradient")
        state = sched.state_dict()
        state["config"][field] = value
        message = self._resume_into(_mlp(), state)
        assert f"unknown {kind}" in message
        assert "install the plugins of the run that wrote it" in message

    def test_newer_schema_is_refused_before_reading_the_config(self):
        """A newer schema is reported even when its config uses components unknown here."""
        _, _, sched = self._scheduler("gradient")
        newer = SCHEMA_VERSION + 1
        state = {**sched.state_dict(), "schema_version": newer}
        state["config"]["grow"] = {"kind": "from_the_future"}
        message = self._resume_into(_mlp(), state)
        assert f"schema version {newer} is newer" in message and f"({SCHEMA_VERSION})" in message

    def test_layer_mismatch_names_the_layers(self):
        """A model with another layer set names the layers found only on one side."""
        _, _, sched = self._scheduler("gradient")
        torch.manual_seed(0)
        deeper = nn.Sequential(
            nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 24),
            nn.ReLU(), nn.Linear(24, 5),
        )  # fmt: skip
        message = self._resume_into(deeper, sched.state_dict())
        assert "in the checkpoint only []" in message
        assert "in the model only ['6']" in message

    def test_shape_mismatch_names_the_layer_and_both_shapes(self):
        """A wider model fails on the first differing layer, before any mask is built."""
        _, _, sched = self._scheduler("gradient")
        torch.manual_seed(0)
        wider = nn.Sequential(
            nn.Linear(12, 30), nn.ReLU(), nn.Linear(30, 24), nn.ReLU(), nn.Linear(24, 5)
        )
        before = {k: v.clone() for k, v in wider.state_dict().items()}
        message = self._resume_into(wider, sched.state_dict())
        assert "layer '0'" in message and "(24, 12)" in message and "(30, 12)" in message
        assert all(torch.equal(v, before[k]) for k, v in wider.state_dict().items())

    def test_shape_mismatch_in_load_state_dict(self):
        """load_state_dict into a scheduler over another architecture names the layer too."""
        _, _, sched = self._scheduler("gradient")
        torch.manual_seed(0)
        wider = nn.Sequential(
            nn.Linear(12, 30), nn.ReLU(), nn.Linear(30, 24), nn.ReLU(), nn.Linear(24, 5)
        )
        opt = torch.optim.SGD(wider.parameters(), lr=0.1)
        other = sc.DSTScheduler(wider, opt, sched.config, total_steps=20)
        with pytest.raises(sc.CheckpointError, match=r"layer '0'.*\(24, 12\).*\(30, 12\)"):
            other.load_state_dict(sched.state_dict())

    @pytest.mark.parametrize("key", ["masks", "layers", "config"])
    def test_truncated_state_dict_names_the_missing_key(self, key):
        """A state dict that lost a required part is called truncated, naming the part."""
        _, _, sched = self._scheduler("gradient")
        state = sched.state_dict()
        del state[key]
        message = self._resume_into(_mlp(), state)
        assert f"missing keys ['{key}']" in message and "truncated" in message

    def test_corrupt_mask_leaves_the_model_untouched(self):
        """A mask over its budget is refused by from_state_dict before any weight is zeroed."""
        _, _, sched = self._scheduler("gradient")
        state = sched.state_dict()
        mask = state["masks"]["2"]
        mask.view(-1)[torch.nonzero(~mask.view(-1))[0]] = True
        model = _mlp()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        message = self._resume_into(model, state)
        assert "checkpoint mask of '2'" in message
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    def test_missing_mask_of_one_layer(self):
        """A state dict whose masks lack one layer names that layer."""
        _, _, sched = self._scheduler("gradient")
        state = sched.state_dict()
        del state["masks"]["2"]
        message = self._resume_into(_mlp(), state)
        assert "masks['2'] is missing" in message


class TestDistributedWrappers:
    def test_ddp_style_wrappers_are_unwrapped(self):
        """A model inside nn.DataParallel gets the same layer names and masks as the bare one."""
        wrapped = nn.DataParallel(_mlp())  # on a GPU machine, moves the model to cuda:0
        bare = _mlp().to(next(wrapped.parameters()).device)
        config = sc.preset("rigl", delta_t=2)
        masks = [
            sc.DSTScheduler(m, torch.optim.SGD(m.parameters()), config, total_steps=20).masks
            for m in (bare, wrapped)
        ]
        assert list(masks[0]) == list(masks[1]) == ["0", "2", "4"]
        for fqn in masks[0]:
            assert torch.equal(masks[0][fqn], masks[1][fqn])
