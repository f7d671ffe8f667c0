#!/usr/bin/env python
"""Exported convolutions (``PackedConv``) against the dense convolution, on the CPU.

For a few Conv1d / Conv2d layers at 90% sparsity (constant fan-in masks, every neuron active)
this times one forward of the dense ``nn.Conv*d`` on the masked weight and of the layer
exported with each format through ``rules=[("Conv*", fmt)]`` (unfold + ``fmt.linear``), under
``torch.inference_mode``, batch 1 and 32, 2 threads. Medians of interleaved rounds; the
outputs are checked against the dense convolution first. This is why ``export`` packs
convolutions only when a rule names them.

    python benchmarks/bench_conv_export.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

from sparsity_core.checkpoint import write_text

LAYERS = (  # (kind, in channels, out channels, kernel, padding, input size)
    ("Conv1d", 64, 128, 5, 2, (40,)),
    ("Conv1d", 128, 256, 3, 1, (20,)),
    ("Conv2d", 64, 64, 3, 1, (32, 32)),
    ("Conv2d", 128, 128, 3, 1, (16, 16)),
)
FORMATS = ("csr", "condensed")
BATCHES = (1, 32)
DENSITY = 0.1
ROUNDS, CALLS = 7, 5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    import torch
    from torch import nn

    import sparsity_core as sc

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_formats import fan_in_mask

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    header = ["layer", "input", "batch", "dense us"] + [f"{f} us (x dense)" for f in FORMATS]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for kind, c_in, c_out, k, pad, size in LAYERS:
        conv = getattr(nn, kind)(c_in, c_out, k, padding=pad)
        mask = fan_in_mask(c_out, conv.weight[0].numel(), DENSITY, 0.0, gen)
        mask = mask.reshape(conv.weight.shape)
        with torch.no_grad():
            conv.weight.mul_(mask)
        calls = {"dense": conv}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for fmt in FORMATS:
                model = sc.export(nn.Sequential(conv), {"0": mask}, rules=[("Conv*", fmt)]).model
                calls[fmt] = model[0]
        for batch in BATCHES:
            x = torch.randn(batch, c_in, *size, generator=gen)
            times: dict[str, list[float]] = {name: [] for name in calls}
            with torch.inference_mode():
                expected = conv(x)
                for call in calls.values():
                    torch.testing.assert_close(call(x), expected, rtol=1e-4, atol=1e-4)
                for _ in range(ROUNDS):
                    for name, call in calls.items():
                        start = time.perf_counter()
                        for _ in range(CALLS):
                            call(x)
                        times[name].append((time.perf_counter() - start) / CALLS * 1e6)
            us = {name: statistics.median(ts) for name, ts in times.items()}
            rows.append(
                {"layer": f"{kind}({c_in}, {c_out}, {k})", "input": list(size), "batch": batch}
                | {"us": us, "speedup_vs_dense": {n: us["dense"] / t for n, t in us.items()}}
            )
            cells = [rows[-1]["layer"], "x".join(map(str, size)), str(batch), f"{us['dense']:.0f}"]
            cells += [f"{us[f]:.0f} ({us['dense'] / us[f]:.2f}x)" for f in FORMATS]
            print("| " + " | ".join(cells) + " |", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "density": DENSITY, "rounds": ROUNDS, "calls": CALLS}
    meta["torch"] = torch.__version__
    path = args.out / "bench_conv_export.json"
    write_text(path, json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
