"""Checks for optimizer-state policies (``DSTConfig.optimizer_state``).

A policy's ``after_step`` runs after every optimizer step on the weights grown so far. It may
change the parameter at the positions it is given only, must keep them finite, and must say
which to keep tracking with a boolean tensor over those positions (or None). In training, a
method using it must keep every invariant of the masked path.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

from ._common import FAST, RUN, Draw, _call, _fail, run_examples
from ._training import registry_for

__all__ = ["check_state_policy_only_tracked", "check_state_policy_training_invariants"]


def _adam_case(
    draw: Draw,
) -> tuple[torch.nn.Parameter, torch.optim.Adam, torch.Tensor, torch.Tensor]:
    """An Adam parameter after some steps, and a subset of its positions grown at later steps."""
    n = draw(st.integers(1, 40), label="numel")
    steps = draw(st.integers(1, 30), label="steps")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64))
    opt = torch.optim.Adam([param], lr=draw(st.sampled_from([1e-3, 1e-2, 0.1]), label="lr"))
    for _ in range(steps):
        param.grad = torch.randn(n, generator=gen, dtype=torch.float64)
        opt.step()
    chosen = draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n), label="grown")
    index = torch.tensor(sorted(chosen), dtype=torch.long)
    born = torch.tensor(
        [draw(st.integers(0, steps - 1), label="born") for _ in chosen], dtype=torch.float64
    )
    return param, opt, index, born


def check_state_policy_only_tracked(policy: Any, *, max_examples: int | None = None) -> None:
    """``after_step`` changes the parameter only at the positions it is given, keeps it finite,
    and returns None or a boolean tensor with one entry per position."""
    check = "check_state_policy_only_tracked"

    def example(draw: Draw) -> None:
        param, opt, index, born = _adam_case(draw)
        before = param.detach().clone()
        where = f"an Adam parameter of {param.numel()} weights, {index.numel()} grown"
        keep = _call(
            check,
            policy,
            where,
            "after_step(optimizer, param, index, born)",
            lambda: policy.after_step(opt, param, index, born),
        )
        after = param.detach()
        outside = torch.ones(param.numel(), dtype=torch.bool)
        outside[index] = False
        if bool((after[outside] != before[outside]).any()):
            _fail(check, policy, where, "after_step() changed weights outside the given positions")
        if not bool(after.isfinite().all()):
            _fail(check, policy, where, "after_step() produced a NaN or Inf weight")
        if keep is not None and (
            not isinstance(keep, torch.Tensor)
            or keep.dtype != torch.bool
            or keep.shape != index.shape
        ):
            _fail(
                check,
                policy,
                where,
                f"after_step() returned {keep!r}; return None or a boolean tensor shaped like "
                f"index {tuple(index.shape)}",
            )

    run_examples(check, example, cost=FAST, max_examples=max_examples)


def check_state_policy_training_invariants(policy: Any, *, max_examples: int | None = None) -> None:
    """RigL with this policy under Adam, a few updates: after every step the inactive weights
    and their optimizer state are zero, and every layer holds its budget."""
    from .. import DSTScheduler, preset

    check = "check_state_policy_training_invariants"

    def example(draw: Draw) -> None:
        seed = draw(st.integers(0, 2**31 - 1), label="seed")
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3)
        ).double()
        config = preset("rigl", density=0.4, delta_t=3, optimizer_state=policy, seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        scheduler = _call(
            check,
            policy,
            "a 6-12-3 MLP under Adam",
            "DSTScheduler(model, Adam, rigl with this policy)",
            lambda: DSTScheduler(model, opt, config, total_steps=24, registry=registry_for(config)),
        )
        gen = torch.Generator().manual_seed(seed)
        for step in range(18):
            opt.zero_grad()
            x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
            torch.nn.functional.cross_entropy(
                model(x), torch.randint(0, 3, (8,), generator=gen)
            ).backward()
            opt.step()
            scheduler.step()
            for fqn, layer in scheduler.layers.items():
                weight, mask = layer.weight, layer.mask
                where = f"layer {fqn!r} after step {step + 1}"
                if bool(weight[~mask].any()) or not bool(weight.isfinite().all()):
                    _fail(
                        check,
                        policy,
                        where,
                        "an inactive weight is not zero (or a weight is not finite)",
                    )
                state = opt.state[weight]
                if any(bool(state[k][~mask].any()) for k in ("exp_avg", "exp_avg_sq")):
                    _fail(check, policy, where, "Adam's state is not zero at an inactive weight")
                if int(mask.sum()) != layer.budget:
                    _fail(
                        check, policy, where, f"holds {int(mask.sum())} weights, not {layer.budget}"
                    )

    run_examples(check, example, cost=RUN, max_examples=max_examples)
