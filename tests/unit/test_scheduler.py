"""DSTScheduler behaviour between and at topology updates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsity_core as sc


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
        assert first.active_neurons < first.fan_out and first.active < first.budget
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
