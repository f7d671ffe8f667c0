"""One rank of the DDP tests: train tiny MLPs with several methods and save what each rank saw.

Run by ``test_ddp.py`` as ``python _ddp_worker.py OUT_DIR`` with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set; the test imports :func:`train` to build the
single-process reference with the same global batches.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sparsity_core as sc
from sparsity_core.distributed import mask_digest
from sparsity_core.errors import DistributedError

GLOBAL_BATCH = 16
STEPS = 13
DELTA_T = 3  # updates at steps 3, 6, 9 and 12
FEATURES, CLASSES = 12, 4

# (case name, preset, micro-batches per optimizer step)
# "+compact": the Linear layers are compact (sparsity_core.to_compact) before DDP wraps them.
CASES = [
    ("rigl", "rigl", 1),
    ("set", "set", 1),
    ("srigl", "srigl", 1),
    ("rigl-accum2", "rigl", 2),
    ("rigl-compact", "rigl+compact", 1),
    ("srigl-compact-accum2", "srigl+compact", 2),
]


def build_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, CLASSES)
    )


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, FEATURES, generator=gen)
    return x, torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=gen)


def method_config(method: str, **overrides: Any) -> sc.DSTConfig:
    return sc.preset(method, density=0.25, delta_t=DELTA_T, t_end=STEPS, seed=7, **overrides)


def train(
    method: str, *, rank: int = 0, world: int = 1, micro: int = 1, config: Any = None
) -> dict[str, Any]:
    """Train ``STEPS`` steps; under DDP rank ``r`` takes its slice of every global batch.

    With ``micro > 1`` each rank splits its slice into micro-batches and accumulates gradients,
    all-reducing only on the last backward (``no_sync``), the usual DDP accumulation pattern.
    """
    method, _, mode = method.partition("+")
    config = config if config is not None else method_config(method)
    model = build_model()
    if mode == "compact":
        sc.to_compact(model, config, total_steps=STEPS)
    wrapped: nn.Module = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = sc.DSTScheduler(
        wrapped,
        optimizer,
        config,
        total_steps=STEPS,
        verify_ranks=world > 1,
    )
    per_rank = GLOBAL_BATCH // world
    updates = []
    for step in range(STEPS):
        x, y = global_batch(step)
        shard = slice(rank * per_rank, (rank + 1) * per_rank)
        x, y = x[shard], y[shard]
        optimizer.zero_grad(set_to_none=True)
        for i, (xm, ym) in enumerate(zip(x.chunk(micro), y.chunk(micro), strict=True)):
            last = i == micro - 1
            sync = contextlib.nullcontext() if last or world == 1 else wrapped.no_sync()
            with sync:
                (F.cross_entropy(wrapped(xm), ym) / micro).backward()
        optimizer.step()
        if scheduler.step():
            updates.append({fqn: m.clone() for fqn, m in scheduler.masks.items()})
    return {
        "updates": updates,
        "masks": {fqn: m.clone() for fqn, m in scheduler.masks.items()},
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "dropped": sum(r.dropped for r in scheduler.history),
    }


@attrs.frozen
class GlobalRngGrowth:
    """Breaks the rules on layer '2': scores from the global RNG, seeded differently per rank."""

    def scores(self, ctx: Any) -> torch.Tensor:
        if ctx.spec.fqn == "2":
            torch.manual_seed(1234 + dist.get_rank())
            return torch.rand(ctx.weight.shape)
        return torch.rand(ctx.weight.shape, generator=ctx.generator)


def diverged_growth(world: int, rank: int) -> dict[str, Any]:
    """A criterion that ignores ctx.generator makes rank masks differ on one layer."""
    config = method_config("set", grow=GlobalRngGrowth())
    model = build_model()
    wrapped = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    registry = sc.get_registry().with_component("growth", "global_rng", GlobalRngGrowth)
    scheduler = sc.DSTScheduler(
        wrapped, optimizer, config, total_steps=STEPS, verify_ranks=True, registry=registry
    )
    x, y = global_batch(0)
    for step in range(1, DELTA_T + 1):
        optimizer.zero_grad()
        F.cross_entropy(wrapped(x[rank::world]), y[rank::world]).backward()
        optimizer.step()
        try:
            scheduler.step()
        except DistributedError as exc:
            digests = {k: mask_digest(m) for k, m in scheduler.masks.items()}
            return {"error": str(exc), "step": step, "digests": digests}
    return {"error": None, "step": DELTA_T, "digests": {}}


def diverged_seed(world: int, rank: int) -> dict[str, Any]:
    """Ranks configured with different seeds are caught at construction, before training."""
    model = build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = sc.preset("rigl", density=0.25, delta_t=DELTA_T, t_end=STEPS, seed=rank)
    try:
        sc.DSTScheduler(model, optimizer, config, total_steps=STEPS, verify_ranks=True)
    except DistributedError as exc:
        untouched = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return {"error": str(exc), "untouched": untouched}
    return {"error": None, "untouched": None}


def diverged_resume(world: int, rank: int) -> dict[str, Any]:
    """Ranks resuming from different checkpoints are caught before the model is touched."""
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = sc.DSTScheduler(model, optimizer, method_config("rigl"), total_steps=STEPS)
    state = scheduler.state_dict()
    state["step"] = 6
    if rank == 1:  # a valid but different mask: move one active weight of layer '4'
        flat = state["masks"]["4"].view(-1)
        on, off = torch.nonzero(flat)[0, 0], torch.nonzero(~flat)[0, 0]
        flat[on], flat[off] = False, True
    fresh = build_model()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1)
    try:
        sc.DSTScheduler.from_state_dict(fresh, fresh_optimizer, state, verify_ranks=True)
    except DistributedError as exc:
        untouched = all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
        return {"error": str(exc), "untouched": untouched}
    return {"error": None, "untouched": None}


def main(out_dir: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        result: dict[str, Any] = {
            name: train(method, rank=rank, world=world, micro=micro)
            for name, method, micro in CASES
        }
        result["diverged_growth"] = diverged_growth(world, rank)
        result["diverged_seed"] = diverged_seed(world, rank)
        result["diverged_resume"] = diverged_resume(world, rank)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
