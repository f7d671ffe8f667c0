#!/usr/bin/env python
"""Inference speed of the storage formats on a CUDA GPU, against dense ``F.linear``.

The CPU benchmark (``bench_formats.py``) carries the issue's targets; this one measures the GPU
paths where a GPU is present. For each layer shape, dtype and batch it times one ``linear``
call (``y = x @ W.T + b``) of:

* ``F.linear``          dense, on ``W * mask`` (cuBLAS; tensor cores in half types);
* ``nm``                the ``nm`` format (2:4, 50%) as it runs by default on CUDA: the gather
  at batch 1, otherwise the weight unpacked for the call, then ``F.linear``;
* ``nm semi``           ``nm`` with ``semi_structured=True``: torch's 2:4 kernel (cuSPARSELt) in
  float16/bfloat16 (float32: the default path);
* ``nm gather``         the CPU's gather path run on CUDA (``gather_matmul``), for comparison;
* ``condensed``         the ``condensed`` format at 90% (constant fan-in), default CUDA path
  (the gather at batch 1, unpacked for the call otherwise);
* ``condensed gather``  the gather path on CUDA, for comparison;
* ``csr``               the ``csr`` format at 90%, default CUDA path (cuSPARSE ``mv`` at batch
  1, unpacked for the call otherwise);
* ``csr cusparse``      ``torch.sparse.mm`` (``mv`` at batch 1) on the CSR tensor.

Each implementation is checked against ``F.linear(x, W * mask, b)`` first, then timed with CUDA
events: rounds of back-to-back calls, interleaved across implementations, median per call. The
speed-up is dense time / format time from the same run (> 1: the format is faster). Dense at the
2:4 mask and at the 90% mask cost the same (cuBLAS does not skip zeros), so one dense entry
serves both.

    python benchmarks/bench_formats_cuda.py            # full grid, 1-2 minutes on an H100
    python benchmarks/bench_formats_cuda.py --quick    # (4096, 4096), batch 1 and 256
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

from sparsity_core.checkpoint import write_text

SHAPES: tuple[tuple[int, int], ...] = ((768, 3072), (3072, 768), (4096, 4096), (8192, 8192))
BATCHES: tuple[int, ...] = (1, 256, 4096)
DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32")
IMPLS: tuple[str, ...] = (
    "F.linear",
    "nm",
    "nm semi",
    "nm gather",
    "condensed",
    "condensed gather",
    "csr",
    "csr cusparse",
)
SPARSITY = 90  # condensed and csr; nm is 2:4 (50%)
ROUNDS, CALLS, WARMUP = 15, 20, 3
ROUND_US = 5000.0
# Tolerance per unit of sum(|x| * |w|) + |b| (half types round products and sums).
RTOL = {"float16": 5e-3, "bfloat16": 3e-2, "float32": 1e-4}


def _masks(out_f: int, in_f: int, gen) -> tuple[Any, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_formats import fan_in_mask, nm_mask

    return nm_mask(out_f, in_f, 2, 4, gen), fan_in_mask(out_f, in_f, 1 - SPARSITY / 100, 0.0, gen)


def _build(name: str, w: Any, mask: Any) -> Any:
    """``(call(x, b), packed weight)`` for one implementation (``F.linear``: the dense weight)."""
    import torch
    import torch.nn.functional as F

    from sparsity_formats._common import finish_output, gather_matmul
    from sparsity_formats.condensed import Condensed
    from sparsity_formats.csr import CSR
    from sparsity_formats.nm import NMFormat

    if name == "F.linear":
        dense = w * mask
        return (lambda x, b: F.linear(x, dense, b)), dense
    if name in ("nm", "nm semi", "nm gather"):
        fmt: Any = NMFormat(semi_structured=name == "nm semi")
    else:
        fmt = Condensed() if name.startswith("condensed") else CSR()
    packed = fmt.pack(w, mask)
    if name.endswith("gather"):
        # The pure-PyTorch gather that the CPU runs (cached indices, as a kernel would hold).
        if name == "nm gather":
            cols, rows = fmt._columns(packed), None
            values = packed.values.reshape(packed.out_features, -1)
        else:
            cols, values = packed.indices.int(), packed.values
            every = packed.active_rows.numel() == packed.out_features
            rows = None if every else packed.active_rows

        def gather(x: Any, b: Any) -> Any:
            out = gather_matmul(x, cols, values)
            return finish_output(out, rows, packed.out_features, b, (x.shape[0],), x.dtype)

        return gather, packed
    if name == "csr cusparse":
        matrix = packed.matrix

        def cusparse(x: Any, b: Any) -> Any:
            if x.shape[0] == 1:
                return (torch.mv(matrix, x[0]) + b).unsqueeze(0)
            return torch.sparse.mm(matrix, x.T).T + b

        return cusparse, packed
    return (lambda x, b: fmt.linear(packed, x, b)), packed


def _error(out: Any, x: Any, dense: Any, b: Any) -> float:
    """Largest error of ``out`` against F.linear, per unit of the products' magnitude."""
    import torch.nn.functional as F

    expected = F.linear(x.double(), dense.double(), b.double())
    scale = F.linear(x.double().abs(), dense.double().abs(), b.double().abs())
    return float(((out.double() - expected).abs() / scale.clamp_min(1e-6)).max())


def _time(calls: dict[str, Any], x: Any, b: Any) -> dict[str, float]:
    """Median µs per call of each implementation, rounds interleaved."""
    import torch

    def timed(call: Any, n: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            call(x, b)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1000 / n

    # Calls per round: up to CALLS, fewer for slow calls (about ROUND_US of work per round).
    counts = {}
    for name, call in calls.items():
        for _ in range(WARMUP):
            call(x, b)
        counts[name] = max(1, min(CALLS, int(ROUND_US / timed(call, 1))))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(ROUNDS):
        for name, call in calls.items():
            times[name].append(timed(call, counts[name]))
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(shapes, batches, dtypes) -> list[dict[str, Any]]:
    import torch

    gen = torch.Generator().manual_seed(0)
    rows = []
    for in_f, out_f in shapes:
        nm, fan_in = _masks(out_f, in_f, gen)
        w32 = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
        b32 = torch.randn(out_f, generator=gen)
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            w, b = w32.to("cuda", dtype), b32.to("cuda", dtype)
            builds = {}
            for name in IMPLS:
                mask = (nm if name.startswith(("nm", "F.")) else fan_in).cuda()
                try:
                    builds[name] = (_build(name, w, mask), mask)
                except (RuntimeError, NotImplementedError) as exc:
                    print(f"  {name} {dtype_name}: cannot pack ({exc})".splitlines()[0])
            for batch in batches:
                x = torch.randn(batch, in_f, generator=gen).to("cuda", dtype)
                calls, errors, skipped = {}, {}, {}
                for name, ((call, _), mask) in builds.items():
                    try:
                        out = call(x, b)
                        torch.cuda.synchronize()
                    except (RuntimeError, NotImplementedError) as exc:
                        skipped[name] = str(exc).splitlines()[0][:120]
                        continue
                    errors[name] = _error(out, x, w * mask, b)
                    if errors[name] > RTOL[dtype_name]:
                        raise SystemExit(
                            f"{name} {dtype_name} {in_f}x{out_f} batch {batch}: off F.linear by "
                            f"{errors[name]:.3g} per unit of scale (tolerance {RTOL[dtype_name]})"
                        )
                    calls[name] = call
                medians = _time(calls, x, b)
                semi = builds.get("nm semi", ((None, None), None))[0][1]
                rows.append(
                    {
                        "shape": [in_f, out_f],
                        "dtype": dtype_name,
                        "batch": batch,
                        "us": medians,
                        "speedup_vs_dense": {
                            n: medians["F.linear"] / t for n, t in medians.items() if t > 0
                        },
                        "max_rel_error": errors,
                        "skipped": skipped,
                        "nm_semi_structured": type(getattr(semi, "semi", None)).__name__,
                    }
                )
                print(_line(rows[-1]), flush=True)
    return rows


def _line(r: dict[str, Any]) -> str:
    cells = [f"{r['shape'][0]}x{r['shape'][1]}", r["dtype"], str(r["batch"])]
    for name in IMPLS:
        t = r["us"].get(name)
        if t is None:
            cells.append("-")
        else:
            s = r["speedup_vs_dense"][name]
            cells.append(f"{t:.1f}" if name == "F.linear" else f"{t:.1f} ({s:.2f}x)")
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="(4096, 4096), batch 1 and 256")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_formats_cuda: no CUDA device; nothing to measure (see bench_formats.py).")
        return 0
    shapes = ((4096, 4096),) if args.quick else SHAPES
    batches = (1, 256) if args.quick else BATCHES
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("median µs per call (speed-up over F.linear); condensed and csr at 90%, nm at 2:4")
    print("| shape (in x out) | dtype | batch | " + " | ".join(IMPLS) + " |")
    print("|" + " --- |" * (3 + len(IMPLS)))
    rows = run(shapes, batches, DTYPES)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "rounds": ROUNDS,
        "calls_per_round": f"up to {CALLS}, about {ROUND_US:.0f} us of calls",
    }
    path = args.out_dir / "bench_formats_cuda.json"
    write_text(path, json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
