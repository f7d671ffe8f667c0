"""When SRigL ablates: active neurons per layer after each topology update, one run.

Trains ``srigl`` (or any method) on the MNIST-1D CNN with Adam (the ``mnist1d/cnn1d/adam``
setting of ``train_bench.py``) and prints, for each update, the active neurons of every sparse
layer, then the final accuracy and density. Needs ``pip install -e ".[bench]"`` (mnist1d).

    python benchmarks/ablation_history.py --sparsity 0.9 --seed 0
"""

from __future__ import annotations

import argparse
import json

import attrs
import torch

from sparsity_app.bench.grid import SETTINGS
from sparsity_app.data import load_dataset
from sparsity_app.train import train_run
from sparsity_core import DSTScheduler
from sparsity_core.checkpoint import write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="srigl")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the history here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = SETTINGS["mnist1d/cnn1d/adam"].recipe
    recipe = attrs.evolve(recipe, sparsity=args.sparsity)
    schedulers: list[DSTScheduler] = []
    original = DSTScheduler._attach

    def keep(self, *a, **k):  # the run's scheduler, to read its history afterwards
        original(self, *a, **k)
        schedulers.append(self)

    DSTScheduler._attach = keep
    try:
        result = train_run(args.method, load_dataset("mnist1d"), recipe, seed=args.seed)
    finally:
        DSTScheduler._attach = original
    scheduler = schedulers[-1]
    by_step: dict[int, dict[str, int]] = {}
    for record in scheduler.history:
        by_step.setdefault(record.step, {})[record.fqn] = record.active_neurons
    names = list(scheduler.layers)
    print(f"{args.method} at {args.sparsity:.0%}, seed {args.seed}: active neurons per update")
    print("step   " + "  ".join(f"{n:>6}" for n in names))
    for step, row in sorted(by_step.items()):
        print(f"{step:<6} " + "  ".join(f"{row.get(n, 0):>6}" for n in names))
    print(
        f"test accuracy {100 * result.test_accuracy:.2f}%, density {result.density:.5f} "
        f"(target {1 - args.sparsity:.5f})"
    )
    if args.json:
        payload = {"history": by_step, "accuracy": result.test_accuracy}
        write_text(args.json, json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
