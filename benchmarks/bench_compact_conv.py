#!/usr/bin/env python
"""Would compact convolutions pay? A sparse Conv2d trained as unfold + CompactLinear, against
the dense convolution (forward + backward, medians of interleaved rounds).

Compact layers hold Linear layers only; a convolution could run compact as ``unfold`` (im2col)
followed by the compact product over patches. This measures that path at 90% constant fan-in
(with the compiled kernels) beside ``nn.Conv2d``. It decides whether compact convolutions are
worth building: see ``docs/compact.md``.

    python benchmarks/bench_compact_conv.py    # -> results/bench_compact_conv.txt
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparsity_core import CompactLinear
from sparsity_core.checkpoint import write_text

RESULTS = Path(__file__).parent / "results"
CASES = [  # (batch, channels in, channels out, image side, kernel)
    (32, 64, 64, 32, 3),
    (32, 128, 128, 16, 3),
    (32, 256, 256, 8, 3),
    (128, 64, 64, 16, 3),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        f"sparse Conv2d as unfold + CompactLinear (90% constant fan-in) vs dense nn.Conv2d, "
        f"forward + backward, {args.threads} threads, {args.rounds} rounds (median ms)",
        f"{'batch x C_in -> C_out, HxW, k':>30} | {'dense':>7} | {'compact':>7} | x dense",
    ]
    for batch, c_in, c_out, side, k in CASES:
        torch.manual_seed(0)
        conv = nn.Conv2d(c_in, c_out, k, padding=k // 2)
        fan_in = c_in * k * k
        keep = torch.rand(c_out, fan_in).argsort(dim=1)[:, : fan_in // 10]
        mask = torch.zeros(c_out, fan_in, dtype=torch.bool).scatter_(1, keep, True)
        linear = nn.Linear(fan_in, c_out)
        layer = CompactLinear.from_linear(linear, mask)
        x = torch.randn(batch, c_in, side, side, requires_grad=True)

        def dense(conv=conv, x=x):
            conv(x).sum().backward()

        def compact(layer=layer, x=x, k=k):
            patches = F.unfold(x, k, padding=k // 2)  # [B, C*k*k, L]
            y = layer(patches.transpose(1, 2))  # [B, L, C_out]
            y.sum().backward()

        times: dict[str, list[float]] = {"dense": [], "compact": []}
        for fn in (dense, compact):
            fn()
        for _ in range(args.rounds):
            for name, fn in (("dense", dense), ("compact", compact)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        d, c = (statistics.median(times[n]) * 1e3 for n in ("dense", "compact"))
        label = f"{batch} x {c_in} -> {c_out}, {side}x{side}, {k}"
        lines.append(f"{label:>30} | {d:7.2f} | {c:7.2f} | {d / c:5.2f}x")
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(RESULTS / "bench_compact_conv.txt", text)


if __name__ == "__main__":
    main()
