"""optimizer_state="adam_fresh_step": a grown weight trains as under a freshly built Adam."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsity_core as sc
from sparsity_core.errors import OptimizerError


def _setup(policy, *, compact=False, optimizer=torch.optim.Adam, **opt_kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    )
    model = model.double()
    config = sc.preset("rigl", density=0.25, delta_t=10, optimizer_state=policy)
    if compact:
        sc.to_compact(model, config, total_steps=200)
    opt = optimizer(model.parameters(), **({"lr": 1e-2} | opt_kwargs))
    scheduler = sc.DSTScheduler(model, opt, config, total_steps=200)
    return model, opt, scheduler


def _step(model, opt, scheduler, gen):
    opt.zero_grad()
    x = torch.randn(16, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=gen)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return scheduler.step()


def _dense(module):
    return module.dense_weight() if isinstance(module, sc.CompactLinear) else module.weight


def _grown_weights_trajectory(policy, *, compact=False, after=4, **opt_kwargs):
    """Train to the first update (step 10) and ``after`` steps more: the grown weights of layer
    '2' at each of those steps, and the gradients they got."""
    model, opt, scheduler = _setup(policy, compact=compact, **opt_kwargs)
    gen = torch.Generator().manual_seed(1)
    before = scheduler.masks["2"].clone()
    while not _step(model, opt, scheduler, gen):
        before = scheduler.masks["2"].clone()
    grown = scheduler.masks["2"] & ~before
    assert int(grown.sum()) > 5
    layer = model.get_submodule("2")
    values, grads = [_dense(layer).detach()[grown].clone()], []
    for _ in range(after):
        # The gradient at the grown weights, read in backward before the optimizer step.
        opt.zero_grad()
        x = torch.randn(16, 12, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (16,), generator=gen)
        weight = _dense(layer)
        if isinstance(layer, sc.CompactLinear):
            out = nn.functional.cross_entropy(model(x), y)
            out.backward()
            grads.append(layer.scatter(layer.values.grad)[grown].clone())
        else:
            nn.functional.cross_entropy(model(x), y).backward()
            grads.append(weight.grad[grown].clone())
        opt.step()
        assert not scheduler.step()
        values.append(_dense(layer).detach()[grown].clone())
    return values, grads


def _fresh_adam(start, grads, **opt_kwargs):
    """The same weights trained by a new Adam on the same gradients."""
    param = nn.Parameter(start.clone())
    opt = torch.optim.Adam([param], **({"lr": 1e-2} | opt_kwargs))
    out = []
    for g in grads:
        param.grad = g.clone()
        opt.step()
        out.append(param.detach().clone())
    return out


@pytest.mark.parametrize("compact", [False, True], ids=["masked", "compact"])
def test_grown_weights_train_as_under_a_fresh_adam(compact):
    values, grads = _grown_weights_trajectory("adam_fresh_step", compact=compact)
    assert bool((values[0] == 0).all())  # grown weights start at zero
    for mine, fresh in zip(values[1:], _fresh_adam(values[0], grads), strict=True):
        torch.testing.assert_close(mine, fresh, rtol=1e-9, atol=1e-12)


def test_without_the_policy_a_grown_weights_first_step_is_scaled_by_the_tensors_age():
    """The failure the policy fixes (and proof the test above can fail): with the tensor's bias
    correction at its step t, a grown weight's first step is (1 - b1) / (1 - b1^t) over
    sqrt(1 - b2) / sqrt(1 - b2^t) times a fresh Adam's: 0.48x at t = 11 here, 3.2x once t is
    in the thousands."""
    values, grads = _grown_weights_trajectory("reset", after=1)
    fresh = _fresh_adam(values[0], grads)[0]
    t, b1, b2 = 11, 0.9, 0.999
    expected = ((1 - b1) / (1 - b1**t)) / ((1 - b2) ** 0.5 / (1 - b2**t) ** 0.5)
    torch.testing.assert_close(
        (values[1] / fresh).abs(), torch.full_like(fresh, expected), rtol=1e-3, atol=0
    )


def test_adamw_with_weight_decay_is_served_too():
    values, grads = _grown_weights_trajectory(
        "adam_fresh_step", optimizer=torch.optim.AdamW, weight_decay=0.1
    )
    param = nn.Parameter(values[0].clone())
    opt = torch.optim.AdamW([param], lr=1e-2, weight_decay=0.1)
    for mine, g in zip(values[1:], grads, strict=True):
        param.grad = g.clone()
        opt.step()
        torch.testing.assert_close(mine, param.detach(), rtol=1e-9, atol=1e-12)


def test_a_resumed_run_goes_on_exactly(tmp_path):
    """The growth steps are checkpointed: a run saved after two updates and resumed matches the
    run that went on."""
    model, opt, scheduler = _setup("adam_fresh_step")
    gen = torch.Generator().manual_seed(1)
    for _ in range(25):
        _step(model, opt, scheduler, gen)
    assert scheduler.state_dict()["grown_at"]["2"]["positions"].numel() > 0
    torch.save(
        {"m": model.state_dict(), "o": opt.state_dict(), "s": scheduler.state_dict()},
        tmp_path / "c.pt",
    )
    gen_state = gen.get_state()
    for _ in range(20):
        _step(model, opt, scheduler, gen)
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    model2, opt2, first = _setup("adam_fresh_step")  # a fresh model, optimizer and scheduler
    first.remove()
    resumed = sc.DSTScheduler.from_state_dict(model2, opt2, saved["s"])
    model2.load_state_dict(saved["m"])
    opt2.load_state_dict(saved["o"])
    gen2 = torch.Generator()
    gen2.set_state(gen_state)
    for _ in range(20):
        _step(model2, opt2, resumed, gen2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("optimizer", "kwargs", "message"),
    [
        (torch.optim.SGD, {"momentum": 0.9}, "trained by SGD"),
        (torch.optim.Adam, {"amsgrad": True}, "amsgrad=True"),
    ],
)
def test_optimizers_it_cannot_serve_are_refused(optimizer, kwargs, message):
    with pytest.raises(OptimizerError, match=message):
        _setup("adam_fresh_step", optimizer=optimizer, **kwargs)
