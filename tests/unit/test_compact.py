"""Compact layers (issue 18): the layout, its gradients, conversions and the scheduler's checks.

Equivalence with the masked path over whole runs is the kit's
``check_method_compact_matches_masked``, run over every preset by tests/conformance and shown
failing on broken compact layers by tests/kit.
"""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparsity_core as sc
from sparsity_core import CompactLinear, DSTScheduler, to_compact, to_masked
from sparsity_core.errors import ConfigError, LayerError, OptimizerError, SchedulerStateError

SHAPES = st.tuples(st.integers(1, 7), st.integers(1, 9))


@st.composite
def layouts(draw, *, shapes=SHAPES):
    """A dense float64 linear layer, a mask over it and a capacity of at least its count."""
    out_f, in_f = draw(shapes)
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    density = draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))
    mask = torch.rand(out_f, in_f, generator=gen) < density
    if draw(st.booleans()) and out_f > 1:
        mask[draw(st.integers(0, out_f - 1))] = False  # an ablated neuron
    linear = nn.Linear(in_f, out_f, bias=draw(st.booleans())).double()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=gen, dtype=torch.float64))
    extra = draw(st.integers(0, 3))
    capacity = min(int(mask.sum()) + extra, out_f * in_f)
    return linear, mask, capacity


def mlp(width: int = 16, outputs: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, outputs),
    )


class TestLayout:
    """The values+indices layout stands for exactly the masked dense weight."""

    @given(layouts())
    def test_round_trip_gives_the_masked_weight_and_the_mask(self, case):
        """mask() and dense_weight() give back the mask and weight * mask, exactly."""
        linear, mask, capacity = case
        layer = CompactLinear.from_linear(linear, mask, capacity=capacity)
        assert torch.equal(layer.mask(), mask)
        assert torch.equal(layer.dense_weight(), linear.weight.detach() * mask)
        assert layer.nnz == int(mask.sum())
        assert bool((layer.values.detach()[layer.nnz :] == 0).all())
        assert torch.equal(layer.row_lengths(), mask.sum(dim=1))
        assert torch.equal(layer.to_linear().weight.detach(), linear.weight.detach() * mask)

    @given(layouts(), st.integers(0, 2**16))
    def test_relayout_moves_survivors_and_zeroes_grown_weights_and_their_state(self, case, seed):
        """After relayout_, weights active before and after keep their value and state;
        every other slot (grown, padding) is zero."""
        linear, mask, capacity = case
        layer = CompactLinear.from_linear(linear, mask, capacity=capacity)
        gen = torch.Generator().manual_seed(seed)
        new = torch.rand(mask.shape, generator=gen) < 0.5
        flat = new.flatten().nonzero().squeeze(1)
        if flat.numel() > capacity:  # keep the new layout within capacity
            new = torch.zeros_like(new)
            new.view(-1)[flat[:capacity]] = True
        state = {"m": torch.randn(capacity, generator=gen, dtype=torch.float64)}
        state["m"][layer.nnz :] = 0
        before_w, before_m = layer.dense_weight(), layer.scatter(state["m"])
        layer.relayout_(new, state)
        assert torch.equal(layer.mask(), new)
        both = mask & new
        assert torch.equal(layer.dense_weight(), before_w * both)
        assert torch.equal(layer.scatter(state["m"]), before_m * both)
        assert bool((state["m"][layer.nnz :] == 0).all())
        assert bool((layer.values.detach()[layer.nnz :] == 0).all())

    def test_a_mask_over_capacity_is_refused_naming_the_layer(self):
        layer = CompactLinear(4, 3, 2, fqn="fc")
        with pytest.raises(LayerError, match=r"'fc'.*9 active weights.*capacity of 2"):
            layer.set_layout(torch.ones(3, 4, dtype=torch.bool).triu())

    @pytest.mark.parametrize(
        ("mask", "match"),
        [(torch.ones(3, 4), "boolean mask"), (torch.ones(4, 3, dtype=torch.bool), "shape")],
    )
    def test_a_bad_mask_is_refused(self, mask, match):
        with pytest.raises(LayerError, match=match):
            CompactLinear(4, 3, 12, fqn="fc").set_layout(mask)

    def test_load_state_dict_restores_the_layout(self):
        """A fresh layer loading a state_dict holds the saved layout (nnz included)."""
        mask = torch.tensor([[True, False, True], [False, False, False]])
        layer = CompactLinear.from_linear(nn.Linear(3, 2), mask, capacity=4)
        fresh = CompactLinear(3, 2, 4)
        fresh.load_state_dict(layer.state_dict())
        assert fresh.nnz == 2 and torch.equal(fresh.mask(), mask)
        assert torch.equal(fresh.dense_weight(), layer.dense_weight())

    def test_narrow_indices(self):
        assert CompactLinear(300, 2, 4).index.dtype == torch.int16
        assert CompactLinear(2**15 + 1, 1, 4).index.dtype == torch.int32
        assert CompactLinear(300, 2, 4).cols.numel() == 8  # their bytes


def _gradcheck(layer: CompactLinear, x: torch.Tensor) -> bool:
    names = ["values"] + (["bias"] if layer.bias is not None else [])

    def f(inputs, *params):
        return torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (inputs,))

    params = [getattr(layer, n).detach().clone().requires_grad_() for n in names]
    return torch.autograd.gradcheck(f, (x, *params))


def _with_reference(in_f, out_f, density, *, seed, dtype=torch.float64):
    """A compact layer and the masked dense nn.Linear it stands for."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f).to(dtype)
    mask = torch.rand(out_f, in_f) < density
    ref = nn.Linear(in_f, out_f).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(linear.weight * mask)
        ref.bias.copy_(linear.bias)
    return CompactLinear.from_linear(linear, mask), ref


class TestGradients:
    """The backward of a compact layer, w.r.t. the input, the values and the bias."""

    @pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
    @pytest.mark.parametrize("lead", [(1,), (5,), (2, 3)], ids=["batch-1", "batch-5", "3-d input"])
    @pytest.mark.parametrize("kind", ["random", "ablated-rows", "empty", "full"])
    def test_gradcheck_float64(self, bias, lead, kind):
        torch.manual_seed(1)
        linear = nn.Linear(6, 5, bias=bias).double()
        mask = torch.rand(5, 6) < 0.5
        if kind == "ablated-rows":
            mask[[0, 3]] = False
        elif kind == "empty":
            mask[:] = False
        elif kind == "full":
            mask[:] = True
        layer = CompactLinear.from_linear(linear, mask, capacity=min(int(mask.sum()) + 2, 30))
        x = torch.randn(*lead, 6, dtype=torch.float64, requires_grad=True)
        assert _gradcheck(layer, x)

    def test_padding_slots_get_zero_gradient(self):
        layer = CompactLinear.from_linear(
            nn.Linear(4, 3).double(), torch.eye(3, 4, dtype=torch.bool), capacity=6
        )
        layer(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
        assert bool((layer.values.grad[3:] == 0).all()) and bool((layer.values.grad[:3] != 0).all())

    def test_captured_gradient_is_the_dense_weight_gradient_summed_over_backward_passes(self):
        """While armed, the layer forms the masked dense layer's full weight gradient (inactive
        positions included), summed over micro-batches until the scheduler empties it."""
        layer, ref = _with_reference(5, 4, 0.4, seed=2)
        layer.capture_grad = True
        xs = [torch.randn(3, 5, dtype=torch.float64) for _ in range(2)]
        for x in xs:
            layer(x).square().sum().backward()
            ref(x).square().sum().backward()
        assert torch.allclose(layer.captured_grad, ref.weight.grad)
        layer.captured_grad = None  # what the scheduler does after each optimizer step
        layer(xs[0]).sum().backward()
        ref.weight.grad = None
        ref(xs[0]).sum().backward()
        assert torch.allclose(layer.captured_grad, ref.weight.grad)

    def test_captured_gradient_sums_every_use_of_the_layer(self):
        """A layer applied twice in one forward: the captured gradient is the sum over both
        uses, as the dense weight's .grad is (found in review: the first use was lost)."""
        layer, ref = _with_reference(6, 6, 0.5, seed=3)
        layer.capture_grad = True
        x = torch.randn(4, 6, dtype=torch.float64)
        layer(torch.tanh(layer(x))).square().sum().backward()
        ref(torch.tanh(ref(x))).square().sum().backward()
        torch.testing.assert_close(layer.captured_grad, ref.weight.grad)

    def test_autocast_runs_and_gives_each_gradient_its_inputs_dtype(self):
        """Under CPU autocast (bfloat16) the PyTorch path's backward computes in the lower
        precision and returns float32 gradients for float32 inputs (found in review: it raised
        a dtype mismatch)."""
        layer, ref = _with_reference(8, 5, 0.5, seed=4, dtype=torch.float32)
        layer.native = False
        layer.capture_grad = True
        xa, xb = (torch.randn(3, 8).requires_grad_() for _ in range(2))
        with torch.no_grad():
            xb.copy_(xa)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ya, yb = layer(xa), ref(xb)
        assert ya.dtype == torch.bfloat16
        ya.float().sum().backward()
        yb.float().sum().backward()
        assert xa.grad.dtype == layer.values.grad.dtype == layer.bias.grad.dtype == torch.float32
        torch.testing.assert_close(xa.grad, xb.grad, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(layer.captured_grad, ref.weight.grad, rtol=2e-2, atol=2e-2)

    def test_a_layout_of_another_layer_is_refused_on_load(self):
        """Column indices past in_features (a 64-input layer loaded into a 32-input one) would
        make the kernels read out of bounds: refused, naming the layer."""
        mask = torch.zeros(4, 64, dtype=torch.bool)
        mask[:, 40:45] = True
        wide = CompactLinear.from_linear(nn.Linear(64, 4), mask)
        narrow = CompactLinear(32, 4, wide.capacity, fqn="fc")
        with pytest.raises(LayerError, match=r"'fc'.*column index lies outside 0..31"):
            narrow.load_state_dict(wide.state_dict())

    def test_a_frozen_bias_stays_frozen(self):
        linear = nn.Linear(4, 3)
        linear.bias.requires_grad_(False)
        layer = CompactLinear.from_linear(linear, torch.ones(3, 4, dtype=torch.bool))
        assert not layer.bias.requires_grad and not layer.to_linear().bias.requires_grad

    def test_no_dense_gradient_is_formed_unless_armed(self):
        layer = CompactLinear.from_linear(nn.Linear(3, 2), torch.ones(2, 3, dtype=torch.bool))
        layer(torch.randn(4, 3)).sum().backward()
        assert layer.captured_grad is None

    def test_double_backward_is_refused_naming_the_layer(self):
        layer = CompactLinear.from_linear(
            nn.Linear(3, 2), torch.ones(2, 3, dtype=torch.bool), fqn="head"
        )
        x = torch.randn(4, 3, requires_grad=True)
        with pytest.raises(LayerError, match=r"'head'.*second derivative"):
            torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)


def _train(model, optimizer, scheduler, steps, *, micro=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    masks = []
    for _ in range(steps):
        optimizer.zero_grad()
        for _ in range(micro):
            x = torch.randn(8, 16, generator=gen, dtype=torch.float64)
            y = torch.randn(8, 4, generator=gen, dtype=torch.float64)
            nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if scheduler.step():
            masks.append({k: v.clone() for k, v in scheduler.masks.items()})
    return masks


def _weights(model):
    return {
        n: (m.dense_weight() if isinstance(m, CompactLinear) else m.weight.detach())
        for n, m in model.named_modules()
        if isinstance(m, CompactLinear | nn.Linear)
    }


def _go_on_together(run_a, run_b, *, atol):
    """Train both runs 20 more steps on the same batches: the same masks at every update (more
    than two of them) and the same weights within ``atol``."""
    a = _train(*run_a, 20, seed=5)
    b = _train(*run_b, 20, seed=5)
    assert len(a) > 2
    assert all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))
    theirs = _weights(run_b[0])
    for fqn, w in _weights(run_a[0]).items():
        torch.testing.assert_close(w, theirs[fqn], atol=atol, rtol=0)


def _pair(method="rigl", **over):
    config = sc.preset(method, density=0.25, delta_t=5, **over)
    masked = mlp().double()
    compact = to_compact(mlp().double(), config, total_steps=60)
    out = []
    for model in (masked, compact):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        out.append((model, opt, DSTScheduler(model, opt, config, total_steps=60)))
    return config, out


class TestTraining:
    """Compact runs against the masked run of the same seed."""

    def test_gradient_accumulation_gives_the_masked_runs_masks_and_weights(self):
        """Three backward passes per step: growth sees their summed dense gradient."""
        _, runs = _pair("rigl")
        masked, compact = (_train(*run, 40, micro=3) for run in runs)
        assert len(masked) == len(compact) > 3
        for a, b in zip(masked, compact, strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a)
        theirs = _weights(runs[1][0])
        for fqn, w in _weights(runs[0][0]).items():
            assert torch.allclose(w, theirs[fqn], atol=1e-10)

    def test_the_optimizer_holds_only_active_weights(self):
        _, runs = _pair("srigl")
        model, opt, scheduler = runs[1]
        _train(model, opt, scheduler, 12)
        held = sum(p.numel() for g in opt.param_groups for p in g["params"])
        dense = sum(p.numel() for p in mlp().parameters())
        assert held < 0.45 * dense
        for layer in scheduler.layers.values():
            state = opt.state[layer.param]
            assert state["exp_avg"].shape == layer.module.values.shape

    def test_a_compact_checkpoint_resumes_bit_identically(self):
        """Save at step 20 through torch.save / weights_only load, resume into fresh objects:
        step 40 is bit-identical to the uninterrupted run."""

        def steps(model, opt, scheduler, gen, n):
            for _ in range(n):
                x = torch.randn(8, 16, generator=gen, dtype=torch.float64)
                y = torch.randn(8, 4, generator=gen, dtype=torch.float64)
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                scheduler.step()

        config, runs = _pair("srigl")
        straight = runs[1]
        steps(*straight, torch.Generator().manual_seed(3), 40)
        config, runs = _pair("srigl")
        model, opt, scheduler = runs[1]
        gen = torch.Generator().manual_seed(3)
        steps(model, opt, scheduler, gen, 20)
        buffer = io.BytesIO()
        torch.save(
            {"model": model.state_dict(), "opt": opt.state_dict(), "s": scheduler.state_dict()},
            buffer,
        )
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        model2 = to_compact(mlp().double(), config, total_steps=60)
        opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
        scheduler2 = DSTScheduler.from_state_dict(model2, opt2, state["s"])
        model2.load_state_dict(state["model"])
        opt2.load_state_dict(state["opt"])
        steps(model2, opt2, scheduler2, gen, 20)
        theirs = model2.state_dict()
        for name, tensor in straight[0].state_dict().items():
            assert torch.equal(tensor, theirs[name]), name
        assert scheduler2.history == straight[2].history
        assert len(scheduler2.history) > 0

    def test_loading_the_optimizer_before_the_layout_is_refused(self):
        """Resuming into a fresh compact model (its initial layout) with the optimizer's state
        loaded first: that state belongs to the checkpoint's layout, and moving it from the
        initial one would scramble it (found in review), so the order is refused."""
        config, runs = _pair("rigl")
        model, opt, scheduler = runs[1]
        _train(model, opt, scheduler, 12)
        state = {"opt": opt.state_dict(), "s": scheduler.state_dict()}
        fresh = to_compact(mlp().double(), config, total_steps=60)
        opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-2)
        opt2.load_state_dict(state["opt"])
        with pytest.raises(SchedulerStateError, match="before the optimizer's"):
            DSTScheduler.from_state_dict(fresh, opt2, state["s"])

    def test_remove_disarms_the_dense_gradient(self):
        config = sc.preset("rigl", density=0.25, delta_t=1)
        model = to_compact(mlp(), config, total_steps=20)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = DSTScheduler(model, opt, config, total_steps=20)
        assert model[0].capture_grad
        scheduler.remove()
        assert not model[0].capture_grad and model[0].captured_grad is None

    @staticmethod
    def _go_on_compact(method, make_opt, *, carry_state):
        """A masked run of 12 steps converted to compact; both go on for 20 more steps (the
        masked one with its own optimizer, or a fresh one when the state is not carried)."""
        config = sc.preset(method, density=0.25, delta_t=5)
        model = mlp().double()
        opt = make_opt(model.parameters())
        scheduler = DSTScheduler(model, opt, config, total_steps=60)
        _train(model, opt, scheduler, 12)
        state, opt_state = scheduler.state_dict(), opt.state_dict()
        twin = mlp().double()
        twin.load_state_dict(model.state_dict())
        to_compact(twin, config, total_steps=60, masks=state["masks"])
        opt_b = make_opt(twin.parameters())
        if carry_state:
            opt_b.load_state_dict(sc.compact_optimizer_state(twin, opt_b, opt_state))
        compact = DSTScheduler.from_state_dict(twin, opt_b, state)
        if not carry_state:  # the masked run restarts its optimizer too
            scheduler.remove()
            opt = make_opt(model.parameters())
            scheduler = DSTScheduler.from_state_dict(model, opt, state)
        _go_on_together((model, opt, scheduler), (twin, opt_b, compact), atol=1e-12)

    def test_a_masked_run_goes_on_compact_from_its_masks(self):
        """Convert mid-run (masks from the masked scheduler, fresh optimizer state on both):
        the compact run goes on with the same masks and weights as the masked one."""
        self._go_on_compact("set", lambda p: torch.optim.SGD(p, lr=0.05), carry_state=False)

    def test_a_masked_run_goes_on_compact_with_its_optimizer_state(self):
        """Convert mid-run with the optimizer's Adam moments carried over
        (compact_optimizer_state): the compact run then goes on exactly as the masked one."""
        self._go_on_compact("rigl", lambda p: torch.optim.Adam(p, lr=1e-2), carry_state=True)

    def test_optimizer_state_of_another_model_is_refused(self):
        config = sc.preset("rigl", density=0.25)
        model = to_compact(mlp(), config, total_steps=60)
        compact_opt = torch.optim.Adam(model.parameters())
        other = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 4))
        opt = torch.optim.Adam(other.parameters())
        other(torch.randn(2, 4)).sum().backward()
        opt.step()
        with pytest.raises(OptimizerError, match=r"layer '0' has shape \(16, 4\)"):
            sc.compact_optimizer_state(model, compact_opt, opt.state_dict())

    def test_parameter_groups_map_state_by_position_not_by_model_order(self):
        """Weights and biases in two groups (biases first): the state still lands on the
        right parameters, and groups built differently are refused."""
        config = sc.preset("rigl", density=0.25, delta_t=5)

        def grouped(model):
            weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
            biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
            return torch.optim.Adam(
                [{"params": biases, "weight_decay": 0.0}, {"params": weights}], lr=1e-2
            )

        model = mlp().double()
        opt = grouped(model)
        scheduler = DSTScheduler(model, opt, config, total_steps=60)
        _train(model, opt, scheduler, 12)
        twin = mlp().double()
        twin.load_state_dict(model.state_dict())
        to_compact(twin, config, total_steps=60, masks=scheduler.masks)
        opt_b = grouped(twin)
        opt_b.load_state_dict(sc.compact_optimizer_state(twin, opt_b, opt.state_dict()))
        for name, param in twin.named_parameters():
            mine = opt_b.state[param]["exp_avg"]
            module = twin.get_submodule(name.rpartition(".")[0])
            theirs = opt.state[
                model.get_submodule(name.rpartition(".")[0]).weight
                if name.endswith("values")
                else model.get_parameter(name)
            ]
            if name.endswith("values"):
                torch.testing.assert_close(module.scatter(mine), theirs["exp_avg"])
            else:
                torch.testing.assert_close(mine, theirs["exp_avg"])
        flat = torch.optim.Adam(twin.parameters(), lr=1e-2)
        with pytest.raises(OptimizerError, match="groups of sizes"):
            sc.compact_optimizer_state(twin, flat, opt.state_dict())

    def test_to_masked_gives_back_dense_linear_layers_a_masked_scheduler_resumes_on(self):
        _, runs = _pair("rigl")
        model, opt, scheduler = runs[1]
        _train(model, opt, scheduler, 12)
        weights = _weights(model)
        state = scheduler.state_dict()
        to_masked(model)
        assert not any(isinstance(m, CompactLinear) for m in model.modules())
        opt2 = torch.optim.Adam(model.parameters(), lr=1e-2)
        resumed = DSTScheduler.from_state_dict(model, opt2, state)
        for fqn, w in weights.items():
            assert torch.equal(model.get_submodule(fqn).weight.detach(), w)
            assert torch.equal(resumed.masks[fqn], state["masks"][fqn])

    def test_to_masked_carries_the_optimizer_state_and_the_run_goes_on_as_masked(self):
        """A compact Adam run converted to masked mid-way with masked_optimizer_state goes on
        exactly as the masked run it has matched so far (masks equal, weights within float64
        tolerance), and the carried moments are zero at inactive weights."""
        _, runs = _pair("rigl")
        (masked, opt_m, sched_m), (compact, opt_c, sched_c) = runs
        _train(masked, opt_m, sched_m, 12)
        _train(compact, opt_c, sched_c, 12)
        carried = sc.masked_optimizer_state(compact, opt_c)
        state = sched_c.state_dict()
        sched_c.remove()
        to_masked(compact)
        opt_b = torch.optim.Adam(compact.parameters(), lr=1e-2)
        opt_b.load_state_dict(carried)
        for fqn in ("0", "2", "4"):
            moments = opt_b.state[compact.get_submodule(fqn).weight]["exp_avg_sq"]
            assert not bool(moments[~state["masks"][fqn]].any())  # zero where inactive
        resumed = DSTScheduler.from_state_dict(compact, opt_b, state)
        _go_on_together((masked, opt_m, sched_m), (compact, opt_b, resumed), atol=1e-10)

    def test_masked_optimizer_state_refuses_state_not_shaped_like_the_values(self):
        config = sc.preset("rigl", density=0.25)
        model = to_compact(mlp(), config, total_steps=60)
        opt = torch.optim.Adam(model.parameters())
        opt.state[model[0].values]["odd"] = torch.zeros(3, 3)
        with pytest.raises(OptimizerError, match=r"state 'odd' of compact layer '0'"):
            sc.masked_optimizer_state(model, opt)


class ConvHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean(-1))


class TestBadInput:
    """What compact training cannot hold fails before training, naming the layer and the fix."""

    def test_a_convolution_is_refused_with_the_keep_masked_fix(self):
        config = sc.preset("rigl", density=0.5)
        with pytest.raises(LayerError, match=r"'conv'.*Linear layers only.*keep_masked"):
            to_compact(ConvHead(), config, total_steps=100)

    def test_keep_masked_trains_the_convolution_masked_beside_compact_layers(self):
        config = sc.preset("rigl", density=0.5, delta_t=2)
        model = to_compact(ConvHead(), config, total_steps=20, keep_masked=["conv"])
        assert isinstance(model.fc, CompactLinear) and isinstance(model.conv, nn.Conv1d)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = DSTScheduler(model, opt, config, total_steps=20)
        for _ in range(6):
            opt.zero_grad()
            model(torch.randn(4, 2, 7)).sum().backward()
            opt.step()
            scheduler.step()
        assert all(s.satisfied for s in scheduler.summary())
        assert torch.equal(model.fc.mask(), scheduler.masks["fc"])

    def test_tied_weights_are_refused(self):
        model = mlp()
        model.extra = nn.Linear(16, 16)
        model.extra.weight = model[0].weight
        with pytest.raises(LayerError, match="tied"):
            to_compact(model, sc.preset("rigl", density=0.5, exclude=["extra"]), total_steps=10)

    def test_a_linear_subclass_with_its_own_forward_is_refused(self):
        class Scaled(nn.Linear):
            def forward(self, x):
                return 2 * super().forward(x)

        model = nn.Sequential(Scaled(4, 4), nn.Linear(4, 2))
        with pytest.raises(LayerError, match="own forward"):
            to_compact(model, sc.preset("rigl", density=0.5), total_steps=10)

    def test_a_compact_model_built_for_another_config_is_refused(self):
        model = to_compact(mlp(), sc.preset("rigl", density=0.5), total_steps=50)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ConfigError, match="built for another config"):
            DSTScheduler(model, opt, sc.preset("rigl", density=0.25), total_steps=50)

    def test_too_small_a_capacity_is_refused(self):
        config = sc.preset("srigl", density=0.25)
        model = to_compact(mlp(), config, total_steps=50)
        small = CompactLinear(16, 16, model[2].nnz, fqn="2")
        small.set_layout(model[2].mask(), model[2].dense_weight())
        model[2] = small
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ConfigError, match=r"'2' has capacity \d+.*up to \d+"):
            DSTScheduler(model, opt, config, total_steps=50)

    def test_a_per_step_gradient_momentum_is_refused(self):
        """Sparse momentum's growth needs the dense gradient at every step."""
        config = sc.preset("rigl", density=0.25, grow="momentum")
        model = to_compact(mlp(), config, total_steps=50)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ConfigError, match="momentum of the dense gradient"):
            DSTScheduler(model, opt, config, total_steps=50)

    def test_the_inner_model_of_a_multi_process_run_is_refused(self, monkeypatch):
        """With several ranks and no DDP wrapper given, the captured dense gradients could not
        be averaged: refused before training, asking for the wrapper."""
        import sparsity_core.scheduler as scheduler_module

        monkeypatch.setattr(scheduler_module, "_multi_process", lambda: True)
        config = sc.preset("rigl", density=0.25)
        model = to_compact(mlp(), config, total_steps=50)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ConfigError, match="Pass the DDP wrapper"):
            DSTScheduler(model, opt, config, total_steps=50)

    def test_optimizer_state_not_shaped_like_the_values_is_refused(self):
        config = sc.preset("rigl", density=0.25, delta_t=2)
        model = to_compact(mlp(), config, total_steps=20)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.state[model[0].values]["factored"] = torch.zeros(16)
        with pytest.raises(OptimizerError, match=r"'factored' of shape \(16,\).*compact layer '0'"):
            DSTScheduler(model, opt, config, total_steps=20)

    def test_a_layout_changed_outside_the_scheduler_is_caught_at_the_update(self):
        config = sc.preset("rigl", density=0.25, delta_t=2)
        model = to_compact(mlp(), config, total_steps=20)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = DSTScheduler(model, opt, config, total_steps=20)
        model[0].set_layout(torch.roll(model[0].mask(), 1, dims=1))
        with pytest.raises(SchedulerStateError, match=r"'0' holds another layout"):
            for _ in range(2):
                opt.zero_grad()
                model(torch.randn(2, 16)).sum().backward()
                opt.step()
                scheduler.step()


class TestExport:
    """A compact model exports to the same inference model as its masked twin, packed
    straight from the layout (condensed, csr: no dense weight)."""

    @pytest.mark.parametrize(
        ("method", "fmt"),
        [("srigl", "condensed"), ("rigl", "csr"), ("srigl", "csr"), ("rigl", "dense_masked")],
    )
    def test_the_export_of_a_compact_run_is_the_masked_runs(self, method, fmt, monkeypatch):
        _, runs = _pair(method)
        for run in runs:
            _train(*run, 12)
        (m_model, _, m_sched), (c_model, _, c_sched) = runs
        masked = sc.export(m_model, m_sched, format=fmt)
        registry = sc.get_registry()
        cls = type(registry.create(sc.ComponentType.FORMAT, fmt))
        if hasattr(cls, "pack_layout"):  # packed from the layout: pack() is never called
            monkeypatch.setattr(cls, "pack", lambda *a, **k: pytest.fail("pack() was called"))
        compact = sc.export(c_model, c_sched, format=fmt)
        assert [r.format for r in compact.report] == [r.format for r in masked.report]
        x = torch.randn(7, 16, dtype=torch.float64)
        torch.testing.assert_close(compact.model(x), masked.model(x))
        for row_a, row_b in zip(masked.report, compact.report, strict=True):
            assert row_a.dense_bytes == row_b.dense_bytes
            assert row_a.packed_bytes == row_b.packed_bytes

    def test_condensed_refuses_a_layout_that_is_not_constant_fan_in(self):
        _, runs = _pair("rigl")
        model, _, scheduler = runs[1]
        with pytest.raises(LayerError, match="cannot pack layer"):
            sc.export(model, dict(scheduler.masks), format="condensed")
