#!/usr/bin/env python
"""The condensed inference kernel per instruction set, side by side with the dense product.

For (out, in) = (768, 3072) and (3072, 768) at 90% constant fan-in and batch 1, 32 and 256
(float32, 2 threads by default), every ISA the CPU has (``sparsity_formats._native``: AVX-512,
AVX2+FMA, portable) runs ``Condensed().linear`` in interleaved rounds beside the best dense
call (``F.linear``); medians in microseconds, and each one's speed-up over dense.

    python benchmarks/bench_condensed_isa.py    # -> results/bench_condensed_isa.{txt,json}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsity_core.checkpoint import write_text
from sparsity_formats import _native
from sparsity_formats.condensed import Condensed

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=41)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = _native.kernel_isas()
    if kernels is None:
        raise SystemExit(f"the condensed kernel is not built: {_native.native_status()['error']}")
    isas = list(kernels.available_isas())
    fmt = Condensed()
    rows, lines = [], []
    header = f"{'shape':>11} {'batch':>5} | {'dense us':>9} | " + " | ".join(
        f"{isa:>17}" for isa in isas
    )
    lines.append(
        f"condensed_linear per ISA vs F.linear, 90% constant fan-in, float32, "
        f"{args.threads} threads, {args.rounds} interleaved rounds (median us, x dense)"
    )
    lines.append(header)
    for out_f, in_f in ((768, 3072), (3072, 768)):
        gen = torch.Generator().manual_seed(0)
        keep = torch.rand(out_f, in_f, generator=gen).argsort(dim=1)[:, : in_f // 10]
        mask = torch.zeros(out_f, in_f, dtype=torch.bool).scatter_(1, keep, True)
        weight = torch.randn(out_f, in_f, generator=gen) * mask
        packed = fmt.pack(weight, mask)
        for batch in (1, 32, 256):
            x = torch.randn(batch, in_f, generator=gen)
            calls = {"dense": lambda x=x, w=weight: F.linear(x, w)}
            for isa in isas:
                calls[isa] = lambda x=x, isa=isa, p=packed: (
                    kernels.set_isa(isa),
                    fmt.linear(p, x),
                )[1]
            times: dict[str, list[float]] = {name: [] for name in calls}
            with torch.inference_mode():
                for call in calls.values():  # warm-up
                    call()
                for _ in range(args.rounds):
                    for name, call in calls.items():
                        start = time.perf_counter()
                        call()
                        times[name].append(time.perf_counter() - start)
            med = {name: statistics.median(v) * 1e6 for name, v in times.items()}
            rows.append({"shape": [out_f, in_f], "batch": batch, "median_us": med})
            cells = " | ".join(f"{med[isa]:9.1f} ({med['dense'] / med[isa]:4.2f}x)" for isa in isas)
            lines.append(f"{out_f:>5}x{in_f:<5} {batch:>5} | {med['dense']:9.1f} | {cells}")
    kernels.set_isa(isas[0])
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(RESULTS / "bench_condensed_isa.txt", text)
    meta = {
        "threads": args.threads,
        "rounds": args.rounds,
        "isas": isas,
        "torch": torch.__version__,
    }
    write_text(
        RESULTS / "bench_condensed_isa.json", json.dumps({"meta": meta, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
