"""Dynamic sparse training under DistributedDataParallel, launched with torchrun.

    torchrun --standalone --nproc_per_node=2 examples/ddp/train_ddp.py --method rigl

Every rank builds the same model and the same DSTScheduler. DDP all-reduces the gradients during
``backward()``; the scheduler reads them in its optimizer pre-step hook, after the all-reduce, and
draws random growth from per-(seed, layer, step) generators, so every rank computes the same
masks without broadcasting them. ``verify_ranks=True`` checks that after every update.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import sparsity_core as sc
from sparsity_app.data import load_dataset
from sparsity_core.checkpoint import save_checkpoint


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="rigl", help="a preset: rigl, set, srigl, ...")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (all ranks)")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--delta-t", type=int, default=20, help="steps between updates")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist1d"])
    parser.add_argument("--cpu", action="store_true", help="use gloo on CPU even with GPUs")
    parser.add_argument("--checkpoint", help="rank 0 saves model, optimizer and masks here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    use_cuda = torch.cuda.is_available() and not args.cpu
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    micro_batch = args.batch_size // (world * args.accumulate)
    if micro_batch < 1 or micro_batch * world * args.accumulate != args.batch_size:
        raise SystemExit(
            f"--batch-size={args.batch_size} must be a multiple of ranks x --accumulate "
            f"({world} x {args.accumulate})."
        )

    data = load_dataset(args.dataset)
    train_set = TensorDataset(data.x_train, data.y_train)
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, batch_size=micro_batch, sampler=sampler, drop_last=True)
    steps_per_epoch = len(loader) // args.accumulate
    total_steps = args.epochs * steps_per_epoch

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = nn.Sequential(
        nn.Linear(data.num_features, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, data.num_classes),
    ).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    config = sc.preset(
        args.method, density=1.0 - args.sparsity, delta_t=args.delta_t, seed=args.seed
    )
    # The DDP wrapper is unwrapped: layer names (and checkpoints) match a one-process run.
    scheduler = sc.DSTScheduler(ddp, optimizer, config, total_steps=total_steps, verify_ranks=True)

    step = 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(steps_per_epoch):
            optimizer.zero_grad(set_to_none=True)
            for micro in range(args.accumulate):
                x, y = next(batches)
                # Gradients are all-reduced only on the last micro-batch's backward.
                last = micro == args.accumulate - 1
                with contextlib.nullcontext() if last else ddp.no_sync():
                    loss = F.cross_entropy(ddp(x.to(device)), y.to(device)) / args.accumulate
                    loss.backward()
            optimizer.step()
            records = scheduler.step()  # on update steps: drop, grow, verify across ranks
            step += 1
            if records and rank == 0:
                moved = sum(r.grown for r in records)
                print(f"step {step}: regrew {moved} weights, masks identical on {world} ranks")

    if rank == 0:
        model.eval()
        with torch.no_grad():
            logits = model(data.x_test.to(device))
        accuracy = (logits.argmax(dim=1).cpu() == data.y_test).float().mean().item()
        print(
            f"{args.method}: {total_steps} steps on {world} ranks, test accuracy "
            f"{100 * accuracy:.2f}%, density {scheduler.density():.4f}"
        )
        if args.checkpoint:
            save_checkpoint(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "sparsity": scheduler.state_dict(),
                },
                args.checkpoint,
            )
            print(f"wrote {args.checkpoint}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
