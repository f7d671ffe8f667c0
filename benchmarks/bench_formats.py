#!/usr/bin/env python
"""Inference speed and size of the storage formats against dense, on the CPU.

For every layer shape, sparsity, share of ablated neurons, batch size and thread count this
times one ``linear`` call (``y = x @ W.T + b``, float32) of:

* ``F.linear``     dense ``torch.nn.functional.linear`` on ``W * mask`` (the baseline);
* ``numpy``        dense ``x @ W.T + b`` through numpy's BLAS (OpenBLAS), float32;
* ``dense_masked`` the ``dense_masked`` format's ``linear``;
* ``csr``          the ``csr`` format's ``linear`` (``torch.mv`` / ``torch.sparse.mm``);
* ``sparse.mm``    ``torch.sparse.mm(csr_matrix, x.T).T + b`` called directly;
* ``scipy``        ``csr.to_scipy(...) @ x.T`` (scipy's CSR kernel, single-threaded), ``.T + b``;
* ``condensed``    the ``condensed`` format's ``linear``;
* ``nm``           the ``nm`` format's ``linear``, 2:4 only, at its own density of 50% (a
  separate table against the others at 50%).

Masks are constant fan-in: every active output neuron keeps ``k = round(density * fan_in)``
random inputs; with ablation, a random 30% of the neurons keep nothing (same ``k`` for the
others, so ablated rows are pure savings). Each (threads, shape) pair runs in a fresh child
process whose BLAS thread count is fixed by the environment (``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``) and ``torch.set_num_threads``; every ratio is
taken between medians measured in that same process, with the implementations interleaved
(round-robin blocks of calls) so that drifting load hits them alike.

* warm: the same weights are called again and again (they may sit in cache);
* cold: the call cycles through enough copies of the weights (> ``COLD_BYTES`` in all) that
  none is in cache when it is used; the memory-bandwidth floor of a call is its bytes (weights
  + bias + input + output) over this machine's bandwidth, measured once per thread count with a
  large ``torch`` copy (bytes read + written / time), and the achieved fraction is floor / time.

Before any timing, every implementation's output is checked against
``F.linear(x, W * mask, b)`` (``allclose``), once per configuration.

    python benchmarks/bench_formats.py                # full grid
    python benchmarks/bench_formats.py --quick        # (768, 3072), 90%, 2 threads: < 2 min
    python benchmarks/bench_formats.py --shapes 4096x4096 --sparsities 90 --threads 2
    python benchmarks/bench_formats.py --profile      # profile condensed.linear, batch 1, 4096^2
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from sparsity_core.checkpoint import write_text

RESULT_MARKER = "@@BENCH_FORMATS_RESULT@@"

SHAPES: tuple[tuple[int, int], ...] = ((768, 3072), (3072, 768), (4096, 4096))  # (in, out)
SPARSITIES: tuple[int, ...] = (80, 90, 95, 99)
ABLATIONS: tuple[float, ...] = (0.0, 0.3)
BATCHES: tuple[int, ...] = (1, 256)
THREADS: tuple[int, ...] = (1, 2)
MODES: tuple[str, ...] = ("warm", "cold")
NM_SPARSITY = 50  # 2:4

# Cold runs cycle through copies of the weights holding more than this many bytes in all
# (this machine: 1 MiB L2 per core, 8 MiB L3), so each call streams its weights from memory.
COLD_BYTES = 96 * 2**20
BANDWIDTH_BYTES = 256 * 2**20  # size of the buffer copied to measure the memory bandwidth

DENSE = ("F.linear", "numpy")
CSRS = ("csr", "sparse.mm", "scipy")
IMPLS = (
    "F.linear",
    "numpy",
    "dense_masked",
    "csr",
    "sparse.mm",
    "scipy",
    "condensed_torch",
    "condensed",
)
NM_IMPLS = (*IMPLS, "nm")

# Tolerances of the correctness check against F.linear(x, W * mask, b) (float32 sums).
RTOL, ATOL = 1e-4, 1e-4

# Repeats: each implementation gets about `budget` seconds of timed calls per configuration,
# between `min` and `max` calls, split into `rounds` interleaved blocks (after warm-up calls).
FULL_REPEATS = {
    1: {"budget": 0.15, "min": 30, "max": 1500},
    256: {"budget": 0.35, "min": 5, "max": 100},
}
QUICK_REPEATS = {
    1: {"budget": 0.04, "min": 15, "max": 200},
    256: {"budget": 0.1, "min": 3, "max": 20},
}
ROUNDS = 5
WARMUP_CALLS = 3
# The entry timing the unablated layer beside an ablated one (not a column of the tables).
UNABLATED = "condensed, before ablation"


# ---------------------------------------------------------------------------------------------
# masks and weights


def fan_in_mask(out_f: int, in_f: int, density: float, ablated: float, gen) -> Any:
    """A constant fan-in mask: each row keeps k random inputs; a random ``ablated`` share none."""
    return fan_in_masks(out_f, in_f, density, ablated, gen)[1]


def fan_in_masks(out_f: int, in_f: int, density: float, ablated: float, gen) -> tuple[Any, Any]:
    """The constant fan-in mask before and after ablating a random ``ablated`` share of rows."""
    import torch

    k = math.floor(density * in_f + 0.5)
    cols = torch.rand(out_f, in_f, generator=gen).topk(k, dim=1).indices
    full = torch.zeros(out_f, in_f, dtype=torch.bool)
    full.scatter_(1, cols, True)
    mask = full.clone()
    n_ablated = math.floor(ablated * out_f + 0.5)
    if n_ablated:
        mask[torch.randperm(out_f, generator=gen)[:n_ablated]] = False
    return full, mask


def nm_mask(out_f: int, in_f: int, n: int, m: int, gen) -> Any:
    """An N:M mask: n random positions kept in every group of m consecutive inputs."""
    import torch

    groups = torch.rand(out_f, in_f // m, m, generator=gen)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return mask.reshape(out_f, in_f)


# ---------------------------------------------------------------------------------------------
# implementations: build (from W * mask, mask), call, bytes, copies


def _clone(obj: Any) -> Any:
    """A copy of a packed weight in fresh memory (tensors, arrays, scipy matrices, attrs)."""
    import attrs
    import numpy as np
    import scipy.sparse
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.clone()  # also sparse CSR tensors (which deepcopy cannot copy)
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if scipy.sparse.issparse(obj):
        return obj.copy()
    if attrs.has(type(obj)):
        fields = [f.name for f in attrs.fields(type(obj)) if f.init]
        return attrs.evolve(obj, **{name: _clone(getattr(obj, name)) for name in fields})
    return obj


def _tensor_bytes(*ts: Any) -> int:
    return sum(t.nelement() * t.element_size() for t in ts)


def make_impls(names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """name -> {build(wm, mask), call(state, x, b), nbytes(state), numpy (takes numpy input)}."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from sparsity_formats.condensed import Condensed
    from sparsity_formats.csr import CSR
    from sparsity_formats.dense_masked import DenseMasked
    from sparsity_formats.nm import NMFormat

    dm, csr, cond, nm = DenseMasked(), CSR(), Condensed(), NMFormat(2, 4)
    cond_torch = Condensed(native=False)

    def numpy_call(w: np.ndarray, x: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = x @ w.T
        out += b
        return out

    def scipy_call(s: Any, x: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (s @ x.T).T + b

    def scipy_bytes(s: Any) -> int:
        return s.data.nbytes + s.indices.nbytes + s.indptr.nbytes

    table = {
        "F.linear": {
            "build": lambda wm, mask: wm.clone(),
            "call": lambda w, x, b: F.linear(x, w, b),
            "nbytes": _tensor_bytes,
        },
        "numpy": {
            "build": lambda wm, mask: wm.numpy().copy(),
            "call": numpy_call,
            "nbytes": lambda w: w.nbytes,
            "numpy": True,
        },
        "dense_masked": {
            "build": dm.pack,
            "call": dm.linear,
            "nbytes": dm.nbytes,
        },
        "csr": {"build": csr.pack, "call": csr.linear, "nbytes": csr.nbytes},
        "sparse.mm": {
            "build": lambda wm, mask: csr.pack(wm, mask).matrix,
            "call": lambda s, x, b: torch.sparse.mm(s, x.T).T + b,
            "nbytes": lambda s: _tensor_bytes(s.crow_indices(), s.col_indices(), s.values()),
        },
        "scipy": {
            "build": lambda wm, mask: csr.to_scipy(csr.pack(wm, mask)),
            "call": scipy_call,
            "nbytes": scipy_bytes,
            "numpy": True,
        },
        "condensed_torch": {
            "build": cond_torch.pack,
            "call": cond_torch.linear,
            "nbytes": cond_torch.nbytes,
        },
        "condensed": {"build": cond.pack, "call": cond.linear, "nbytes": cond.nbytes},
        "nm": {"build": nm.pack, "call": nm.linear, "nbytes": nm.nbytes},
    }
    return {name: table[name] for name in names}


# ---------------------------------------------------------------------------------------------
# timing


def _quantiles(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median_s": statistics.median(xs), "p25_s": q[0], "p75_s": q[2], "n": len(xs)}


def time_impls(
    entries: dict[str, tuple[Any, list[Any], tuple[Any, Any]]], repeats: dict[str, float]
) -> dict[str, dict[str, float]]:
    """Median call time of each entry ``name -> (call, states, (x, b))``.

    Each entry first makes warm-up calls (at least one pass over its states, up to 50), whose
    median sets its number of timed calls (``budget / estimate`` within ``[min, max]``); the
    timed calls then run in ``ROUNDS`` blocks, round-robin over the entries. Calls cycle
    through ``states`` (one state: warm; many copies: cold).
    """
    perf = time.perf_counter
    plan: dict[str, int] = {}
    cursor: dict[str, int] = {}
    for name, (call, states, (x, b)) in entries.items():
        times: list[float] = []
        # At least WARMUP_CALLS calls and one pass over the copies (at most 50), cut short once
        # the warm-up has used half the budget (slow calls on many copies).
        for i in range(max(WARMUP_CALLS, min(len(states), 50))):
            if i >= WARMUP_CALLS and sum(times) > repeats["budget"] / 2:
                break
            s = states[i % len(states)]
            t0 = perf()
            call(s, x, b)
            times.append(perf() - t0)
        n_warm = len(times)
        estimate = max(statistics.median(times[len(times) // 2 :]), 1e-7)
        n = int(repeats["budget"] / estimate)
        plan[name] = max(int(repeats["min"]), min(int(repeats["max"]), n))
        cursor[name] = n_warm
    samples: dict[str, list[float]] = {name: [] for name in entries}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(ROUNDS):
            for name, (call, states, (x, b)) in entries.items():
                total = plan[name]
                block = total // ROUNDS + (1 if r < total % ROUNDS else 0)
                n_states, i = len(states), cursor[name]
                out = samples[name]
                for _ in range(block):
                    s = states[i % n_states]
                    i += 1
                    t0 = perf()
                    call(s, x, b)
                    out.append(perf() - t0)
                cursor[name] = i
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: _quantiles(xs) for name, xs in samples.items()}


# ---------------------------------------------------------------------------------------------
# the children


def measure_bandwidth(threads: int) -> dict[str, Any]:
    """Memory bandwidth with ``threads`` threads: a large copy (read + write) and a sum (read)."""
    import torch

    torch.set_num_threads(threads)
    n = BANDWIDTH_BYTES // 4
    src = torch.rand(n)
    dst = torch.empty_like(src)
    copies, sums = [], []
    for i in range(13):
        t0 = time.perf_counter()
        dst.copy_(src)
        t1 = time.perf_counter()
        src.sum()
        t2 = time.perf_counter()
        if i >= 3:
            copies.append(t1 - t0)
            sums.append(t2 - t1)
    copy_s, sum_s = statistics.median(copies), statistics.median(sums)
    return {
        "threads": torch.get_num_threads(),
        "buffer_bytes": BANDWIDTH_BYTES,
        "copy_s": copy_s,
        "copy_bytes_per_s": 2 * BANDWIDTH_BYTES / copy_s,  # read + written
        "read_s": sum_s,
        "read_bytes_per_s": BANDWIDTH_BYTES / sum_s,
        "method": (
            f"torch dst.copy_(src) of {BANDWIDTH_BYTES // 2**20} MiB float32, median of 10 after "
            f"3 warm-up; bandwidth = (bytes read + bytes written) / time; read-only reference: "
            f"src.sum()"
        ),
    }


def _blas_info() -> list[dict[str, Any]]:
    try:
        import threadpoolctl
    except ImportError:
        return []
    keep = ("user_api", "internal_api", "num_threads", "version", "filepath")
    return [{k: lib.get(k) for k in keep} for lib in threadpoolctl.threadpool_info()]


def _check(
    impls: dict[str, dict[str, Any]],
    states: dict[str, Any],
    x: Any,
    b: Any,
    ref: Any,
) -> dict[str, dict[str, Any]]:
    import numpy as np
    import torch

    report = {}
    for name, impl in impls.items():
        if impl.get("numpy"):
            got = torch.from_numpy(
                np.ascontiguousarray(impl["call"](states[name], x.numpy(), b.numpy()))
            )
        else:
            got = impl["call"](states[name], x, b)
        ok = got.shape == ref.shape and torch.allclose(got, ref, rtol=RTOL, atol=ATOL)
        err = float((got - ref).abs().max()) if got.shape == ref.shape else float("inf")
        report[name] = {"ok": bool(ok), "max_abs_err": err}
    return report


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    import torch.nn.functional as F

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    torch.set_num_threads(args.threads)
    in_f, out_f = args.shape
    repeats = QUICK_REPEATS if args.quick else FULL_REPEATS
    bandwidth = args.bandwidth
    gen = torch.Generator().manual_seed(1000 * in_f + out_f)
    results: list[dict[str, Any]] = []

    def log(msg: str) -> None:
        print(f"[bench_formats] {args.threads}t {in_f}x{out_f} {msg}", file=sys.stderr, flush=True)

    configs: list[tuple[str, int, float]] = [
        ("constant_fan_in", sp, ab) for sp in args.sparsities for ab in args.ablations
    ]
    if args.nm:
        configs.append(("nm 2:4", NM_SPARSITY, 0.0))
    for structure, sparsity, ablated in configs:
        t_config = time.perf_counter()
        density = 1 - sparsity / 100
        if structure == "nm 2:4":
            mask = nm_mask(out_f, in_f, 2, 4, gen)
            names = NM_IMPLS
        else:
            full_mask, mask = fan_in_masks(out_f, in_f, density, ablated, gen)
            names = IMPLS
        weight = torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)
        bias = torch.randn(out_f, generator=gen)
        wm = weight * mask
        impls = make_impls(names)
        warm_states = {name: impl["build"](wm, mask) for name, impl in impls.items()}
        # With ablated rows, the unablated layer (the same weights, before ablation) is timed
        # in the same rounds, so the ablation gain is a side-by-side ratio.
        unablated = None
        if structure != "nm 2:4" and ablated > 0:
            unablated = impls["condensed"]["build"](weight * full_mask, full_mask)
        nbytes = {name: int(impl["nbytes"](warm_states[name])) for name, impl in impls.items()}
        rows_active = int(mask.any(dim=1).sum())
        k = int(mask.sum(dim=1).max())
        cold_states = {}
        if "cold" in args.modes:
            for name, state in warm_states.items():
                copies = max(2, math.ceil(COLD_BYTES / max(nbytes[name], 1)))
                cold_states[name] = [state] + [_clone(state) for _ in range(copies - 1)]
        for batch in args.batches:
            x = torch.randn(batch, in_f, generator=gen)
            ref = F.linear(x, wm, bias)
            check = _check(impls, warm_states, x, bias, ref)
            bad = [n for n, c in check.items() if not c["ok"]]
            if bad:
                raise RuntimeError(
                    f"{structure} {sparsity}% ablated {ablated} batch {batch}: {bad} differ "
                    f"from F.linear(x, W * mask, b): {check}"
                )
            io_bytes = _tensor_bytes(x, bias) + batch * out_f * 4
            for mode in args.modes:
                entries = {}
                for name, impl in impls.items():
                    states = [warm_states[name]] if mode == "warm" else cold_states[name]
                    xb = (x.numpy(), bias.numpy()) if impl.get("numpy") else (x, bias)
                    entries[name] = (impl["call"], states, xb)
                if unablated is not None and mode == "warm":
                    entries[UNABLATED] = (impls["condensed"]["call"], [unablated], (x, bias))
                times = time_impls(entries, repeats[batch])
                same_run = times.pop(UNABLATED, None)
                med = {name: t["median_s"] for name, t in times.items()}
                best_dense = min(DENSE, key=med.__getitem__)
                best_csr = min(CSRS, key=med.__getitem__)
                ratios = {
                    name: {
                        "vs_F.linear": med["F.linear"] / med[name],
                        "vs_best_dense": med[best_dense] / med[name],
                        "vs_best_csr": med[best_csr] / med[name],
                    }
                    for name in impls
                }
                record: dict[str, Any] = {
                    "structure": structure,
                    "in": in_f,
                    "out": out_f,
                    "sparsity": sparsity,
                    "density": float(mask.sum()) / mask.numel(),
                    "k": k,
                    "ablated": ablated,
                    "active_rows": rows_active,
                    "batch": batch,
                    "threads": torch.get_num_threads(),
                    "mode": mode,
                    "times": times,
                    "ratios": ratios,
                    "best_dense": best_dense,
                    "best_csr": best_csr,
                    "nbytes": nbytes,
                    "io_bytes": io_bytes,
                    "copies": {
                        name: (1 if mode == "warm" else len(cold_states[name])) for name in impls
                    },
                    "check": check,
                }
                if same_run is not None:
                    record["unablated_condensed"] = same_run
                if mode == "cold" and bandwidth:
                    floors = {name: (nbytes[name] + io_bytes) / bandwidth for name in impls}
                    record["floor_s"] = floors
                    record["achieved_fraction"] = {name: floors[name] / med[name] for name in impls}
                results.append(record)
        del cold_states, warm_states
        gc.collect()
        log(
            f"{structure} {sparsity}% ablated {ablated:.0%}: {time.perf_counter() - t_config:.1f} s"
        )
    return {
        "results": results,
        "blas": _blas_info(),
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
    }


# ---------------------------------------------------------------------------------------------
# profiling condensed.linear in-process


def run_profile(args: argparse.Namespace) -> None:
    import cProfile
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile

    from sparsity_formats.condensed import Condensed

    torch.set_num_threads(args.threads[-1])
    in_f, out_f = args.shapes[-1]
    sparsity = args.sparsities[0]
    gen = torch.Generator().manual_seed(0)
    mask = fan_in_mask(out_f, in_f, 1 - sparsity / 100, 0.0, gen)
    weight = torch.randn(out_f, in_f, generator=gen) * mask
    bias = torch.randn(out_f, generator=gen)
    x = torch.randn(args.profile_batch, in_f, generator=gen)
    fmt = Condensed()
    packed = fmt.pack(weight, mask)
    for _ in range(50):
        fmt.linear(packed, x, bias)
    calls = 2000 if args.profile_batch == 1 else 20
    label = (
        f"condensed.linear, ({in_f}, {out_f}), {sparsity}%, batch {args.profile_batch}, "
        f"{torch.get_num_threads()} threads, {calls} calls"
    )
    t0 = time.perf_counter()
    for _ in range(calls):
        fmt.linear(packed, x, bias)
    per_call = (time.perf_counter() - t0) / calls
    print(f"{label}: {per_call * 1e6:.1f} us per call (unprofiled)")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fmt.linear(packed, x, bias)
    profiler.disable()
    print(f"\ncProfile of {label}, sorted by tottime")
    pstats.Stats(profiler).strip_dirs().sort_stats("tottime").print_stats(args.profile_top)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fmt.linear(packed, x, bias)
    print(f"torch.profiler of {label}, sorted by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_top))


# ---------------------------------------------------------------------------------------------
# the parent: children, table, targets, JSON


def native_build_report() -> dict[str, Any]:
    """Build the compiled condensed kernel from scratch (in a temporary cache) and time it.

    Then load it from the default cache, as the timed children will, so they never build.
    """
    import tempfile

    code = (
        "import json; from sparsity_formats import _native; "
        "print(json.dumps(_native.native_status()))"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": cache}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
    clean = json.loads(out.stdout.strip().splitlines()[-1])
    cached = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    if not clean["available"]:
        line = f"NOT BUILT ({clean['error']}); 'cond' is the pure-PyTorch fallback"
    else:
        line = (
            f"compiled C++ ({clean['capability']}, {' '.join(clean['flags'])}): clean build "
            f"{clean['seconds']:.1f} s, load from cache {cached['seconds']:.2f} s; 'cond.pt' is "
            f"the pure-PyTorch fallback"
        )
    return {"clean": clean, "cached": cached, "line": line}


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def _run_child(argv: list[str], threads: int) -> Any:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    proc = subprocess.run(cmd, env=_child_env(threads), stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {argv} failed (exit {proc.returncode}):\n{proc.stdout}")
    return json.loads(lines[-1][len(RESULT_MARKER) :])


def _us(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    us = seconds * 1e6
    if us < 10:
        return f"{us:.2f}"
    if us < 100:
        return f"{us:.1f}"
    return f"{us:.0f}"


def _shape(r: dict[str, Any]) -> str:
    return f"{r['in']}x{r['out']}"


SHORT = {
    "F.linear": "F.linear",
    "numpy": "numpy",
    "dense_masked": "d_mask",
    "csr": "csr",
    "sparse.mm": "sp.mm",
    "scipy": "scipy",
    "condensed_torch": "cond.pt",
    "condensed": "cond",
    "nm": "nm",
}


def _main_table(results: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in results if r["structure"] == "constant_fan_in"]
    head = (
        f"{'in x out':<10} {'thr':>3} {'batch':>5} {'sp%':>3} {'abl':>4} {'mode':<4} "
        + " ".join(f"{SHORT[n]:>9}" for n in IMPLS)
        + f" {'c/F.lin':>7} {'c/bestD':>7} {'c/bestC':>7} {'floor':>8} {'c.frac':>6} {'F.frac':>6}"
    )
    out = [head, "-" * len(head)]
    rows.sort(
        key=lambda r: (
            r["threads"],
            SHAPES.index((r["in"], r["out"])) if (r["in"], r["out"]) in SHAPES else 9,
            r["batch"],
            r["sparsity"],
            r["ablated"],
            MODES.index(r["mode"]),
        )
    )
    for r in rows:
        med = {n: r["times"][n]["median_s"] for n in IMPLS}
        c = r["ratios"]["condensed"]
        floor = r.get("floor_s", {}).get("condensed")
        frac = r.get("achieved_fraction", {})
        out.append(
            f"{_shape(r):<10} {r['threads']:>3} {r['batch']:>5} {r['sparsity']:>3} "
            f"{r['ablated'] * 100:>3.0f}% {r['mode']:<4} "
            + " ".join(f"{_us(med[n]):>9}" for n in IMPLS)
            + f" {c['vs_F.linear']:>6.2f}x {c['vs_best_dense']:>6.2f}x {c['vs_best_csr']:>6.2f}x"
            + f" {_us(floor):>8}"
            + (
                f" {frac['condensed']:>6.2f} {frac['F.linear']:>6.2f}"
                if frac
                else f" {'-':>6} {'-':>6}"
            )
        )
    return out


def _bytes_table(results: list[dict[str, Any]]) -> list[str]:
    seen = {}
    for r in results:
        key = (r["structure"], r["in"], r["out"], r["sparsity"], r["ablated"])
        seen.setdefault(key, r)
    names = ("F.linear", "dense_masked", "csr", "scipy", "condensed", "nm")
    head = (
        f"{'structure':<16} {'in x out':<10} {'sp%':>3} {'abl':>4} {'k':>5} {'active':>6} "
        + " ".join(f"{SHORT[n]:>10}" for n in names)
        + f" {'cond/csr':>8} {'cond/scipy':>10}"
    )
    out = [head, "-" * len(head)]
    for (structure, *_), r in sorted(
        seen.items(), key=lambda kv: (kv[0][0] != "constant_fan_in", kv[0][1:])
    ):
        nb = r["nbytes"]
        out.append(
            f"{structure:<16} {_shape(r):<10} {r['sparsity']:>3} {r['ablated'] * 100:>3.0f}% "
            f"{r['k']:>5} {r['active_rows']:>6} "
            + " ".join(f"{nb[n]:>10,}" if n in nb else f"{'-':>10}" for n in names)
            + f" {nb['condensed'] / nb['csr']:>8.3f} {nb['condensed'] / nb['scipy']:>10.3f}"
        )
    return out


def _nm_table(results: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in results if r["structure"] == "nm 2:4"]
    if not rows:
        return []
    head = (
        f"{'in x out':<10} {'thr':>3} {'batch':>5} {'mode':<4} "
        + " ".join(f"{SHORT[n]:>9}" for n in NM_IMPLS)
        + f" {'nm/F.lin':>8} {'nm/bestD':>8} {'nm/bestC':>8} {'nm.frac':>7}"
    )
    out = [head, "-" * len(head)]
    rows.sort(
        key=lambda r: (r["threads"], r["in"] * 10**6 + r["out"], r["batch"], MODES.index(r["mode"]))
    )
    for r in rows:
        med = {n: r["times"][n]["median_s"] for n in NM_IMPLS}
        q = r["ratios"]["nm"]
        frac = r.get("achieved_fraction", {}).get("nm")
        out.append(
            f"{_shape(r):<10} {r['threads']:>3} {r['batch']:>5} {r['mode']:<4} "
            + " ".join(f"{_us(med[n]):>9}" for n in NM_IMPLS)
            + f" {q['vs_F.linear']:>7.2f}x {q['vs_best_dense']:>7.2f}x {q['vs_best_csr']:>7.2f}x"
            + (f" {frac:>7.2f}" if frac is not None else f" {'-':>7}")
        )
    return out


def _find(results, shape, batch, mode, ablated=0.0, sparsity=90, threads=2):
    for r in results:
        if (
            r["structure"] == "constant_fan_in"
            and (r["in"], r["out"]) == shape
            and r["batch"] == batch
            and r["mode"] == mode
            and r["ablated"] == ablated
            and r["sparsity"] == sparsity
            and r["threads"] == threads
        ):
            return r
    return None


def _targets(results: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The issue's targets at 90% / 2 threads / warm / no ablation, each ok or MISSED."""
    lines = [
        "targets (issue 4), condensed at 90% sparsity, 2 threads, warm, 0% ablated unless "
        "stated; 'vs X' = time(X) / time(condensed),",
        "  medians from the same child process; ablated: time(30% ablated) / time(the same layer "
        "before ablation, timed in the same rounds); "
        "cold: time / floor at 90%, 0% ablated",
    ]
    checks: list[dict[str, Any]] = []

    def add(shape, what, value, goal, better="higher", note="", info=False):
        if value is None:
            lines.append(f"  {shape:<10} {what:<44} {'n/a':>8}   (not measured)")
            checks.append({"shape": shape, "target": what, "value": None, "goal": goal, "ok": None})
            return
        ok = value >= goal if better == "higher" else value <= goal
        sign = ">=" if better == "higher" else "<="
        verdict = "info" if info else ("ok" if ok else "MISSED")
        lines.append(
            f"  {shape:<10} {what:<44} {value:>8.2f}x  (target {sign} {goal:g})  {verdict}{note}"
        )
        ok = None if info else ok
        checks.append(
            {
                "shape": shape,
                "target": what,
                "value": value,
                "goal": goal,
                "direction": better,
                "ok": ok,
            }
        )

    measured = {(r["in"], r["out"]) for r in results}
    skipped = [f"{a}x{b}" for a, b in SHAPES if (a, b) not in measured]
    for shape in SHAPES:
        if shape not in measured:
            continue
        label = f"{shape[0]}x{shape[1]}"
        r1 = _find(results, shape, 1, "warm")
        r256 = _find(results, shape, 256, "warm")
        need = 8.0 if shape == (4096, 4096) else 2.5
        c1 = r1["ratios"]["condensed"] if r1 else {}
        c256 = r256["ratios"]["condensed"] if r256 else {}
        add(label, "batch 1: vs F.linear", c1.get("vs_F.linear"), need)
        add(
            label,
            f"batch 1: vs best dense ({r1['best_dense'] if r1 else '-'})",
            c1.get("vs_best_dense"),
            2.0,
        )
        add(
            label,
            f"batch 1: vs best CSR ({r1['best_csr'] if r1 else '-'})",
            c1.get("vs_best_csr"),
            1.5,
        )
        add(
            label,
            f"batch 256: vs best dense ({r256['best_dense'] if r256 else '-'})",
            c256.get("vs_best_dense"),
            2.0,
        )
        add(
            label,
            f"batch 256: vs best CSR ({r256['best_csr'] if r256 else '-'})",
            c256.get("vs_best_csr"),
            1.3,
        )
        rb = r1 or r256
        add(
            label,
            "bytes: condensed / csr",
            rb["nbytes"]["condensed"] / rb["nbytes"]["csr"] if rb else None,
            0.6,
            better="lower",
        )
        for batch in (1, 256):
            r0 = _find(results, shape, batch, "warm")
            r3 = _find(results, shape, batch, "warm", ablated=0.3)
            value = None
            if r3 and "unablated_condensed" in r3:
                value = r3["times"]["condensed"]["median_s"] / r3["unablated_condensed"]["median_s"]
            elif r0 and r3:
                value = r3["times"]["condensed"]["median_s"] / r0["times"]["condensed"]["median_s"]
            add(
                label,
                f"30% ablated: time / time at 0% (batch {batch})",
                value,
                0.8,
                better="lower",
                note="  (0.70 if ablated rows cost nothing)",
            )
        for batch in (1, 256):
            rc = _find(results, shape, batch, "cold")
            value = None
            if rc and "floor_s" in rc:
                value = rc["times"]["condensed"]["median_s"] / rc["floor_s"]["condensed"]
            add(
                label,
                f"cold batch {batch}: time / bandwidth floor",
                value,
                2.0,
                better="lower",
                note="" if batch == 1 else "  (compute-bound: the floor ignores arithmetic)",
                info=batch != 1,
            )
    if skipped:
        lines.append(f"  not measured in this run: {', '.join(skipped)}")
    return lines, checks


def main(argv: list[str] | None = None) -> int:
    def shape_arg(text: str) -> tuple[int, int]:
        a, _, b = text.lower().partition("x")
        return int(a), int(b)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="(768, 3072), 90%%, batch 1 and 256, 2 threads, few repeats",
    )
    parser.add_argument(
        "--shapes",
        type=shape_arg,
        nargs="+",
        default=None,
        help="IN x OUT shapes, e.g. 768x3072 4096x4096 (default: all three)",
    )
    parser.add_argument(
        "--sparsities",
        type=int,
        nargs="+",
        default=None,
        help="sparsities in %% (default 80 90 95 99)",
    )
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="(default 1 2)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="(default 1 256)")
    parser.add_argument(
        "--ablations",
        type=float,
        nargs="+",
        default=None,
        help="shares of ablated neurons (default 0 0.3)",
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--no-nm", dest="nm", action="store_false", help="skip the 2:4 table")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "bench_formats.json",
        help="JSON output (default benchmarks/results/bench_formats.json)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile condensed.linear (last --shapes, first --sparsities, last "
        "--threads; default 4096x4096, 90%%, 2 threads) instead of benchmarking",
    )
    parser.add_argument("--profile-batch", type=int, default=1)
    parser.add_argument("--profile-top", type=int, default=15)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-bandwidth", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=shape_arg, help=argparse.SUPPRESS)
    parser.add_argument("--bandwidth", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    given = {key for key in ("shapes", "sparsities", "threads") if getattr(args, key) is not None}
    if args.quick:
        defaults = {"shapes": [(768, 3072)], "sparsities": [90], "threads": [2]}
    else:
        defaults = {
            "shapes": list(SHAPES),
            "sparsities": list(SPARSITIES),
            "threads": list(THREADS),
        }
    defaults.update(batches=list(BATCHES), ablations=list(ABLATIONS))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args.child_bandwidth:
        print(RESULT_MARKER + json.dumps(measure_bandwidth(args.threads[0])), flush=True)
        return 0
    if args.child:
        args.threads = args.threads[0]
        print(RESULT_MARKER + json.dumps(run_child(args)), flush=True)
        return 0
    if args.profile:
        if "shapes" not in given:
            args.shapes = [(4096, 4096)]
        if "sparsities" not in given:
            args.sparsities = [90]
        if "threads" not in given:
            args.threads = [2]
        run_profile(args)
        return 0

    import torch

    native = native_build_report()
    print(f"[bench_formats] condensed kernel: {native['line']}", file=sys.stderr, flush=True)
    t_start = time.perf_counter()
    loadavg_before = [round(v, 2) for v in os.getloadavg()]
    bandwidth: dict[int, dict[str, Any]] = {}
    results: list[dict[str, Any]] = []
    blas: dict[int, Any] = {}
    common = [
        "--sparsities",
        *map(str, args.sparsities),
        "--batches",
        *map(str, args.batches),
        "--ablations",
        *map(str, args.ablations),
        "--modes",
        *args.modes,
    ]
    if args.quick:
        common.append("--quick")
    if not args.nm:
        common.append("--no-nm")
    for threads in args.threads:
        if "cold" in args.modes:
            bandwidth[threads] = _run_child(
                ["--child-bandwidth", "--threads", str(threads)], threads
            )
            bw = bandwidth[threads]
            print(
                f"[bench_formats] {threads} threads: bandwidth {bw['copy_bytes_per_s'] / 1e9:.2f} "
                f"GB/s copy (read+write), {bw['read_bytes_per_s'] / 1e9:.2f} GB/s read",
                file=sys.stderr,
                flush=True,
            )
        for shape in args.shapes:
            t0 = time.perf_counter()
            child = [
                "--child",
                "--threads",
                str(threads),
                "--shape",
                f"{shape[0]}x{shape[1]}",
                *common,
            ]
            if threads in bandwidth:
                child += ["--bandwidth", repr(bandwidth[threads]["copy_bytes_per_s"])]
            out = _run_child(child, threads)
            results.extend(out["results"])
            blas[threads] = out["blas"]
            print(
                f"[bench_formats] {threads} threads {shape[0]}x{shape[1]} done in "
                f"{time.perf_counter() - t0:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    loadavg_after = [round(v, 2) for v in os.getloadavg()]
    elapsed = time.perf_counter() - t_start

    repeats = QUICK_REPEATS if args.quick else FULL_REPEATS
    lines = [
        f"bench_formats: y = x @ W.T + b, float32, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, {'--quick' if args.quick else 'full grid'}; times in us "
        f"(median per call)",
        "repeats: per implementation and configuration about "
        + ", ".join(
            f"batch {b}: {v['budget']} s of calls, {v['min']}..{v['max']} calls"
            for b, v in repeats.items()
        )
        + f", in {ROUNDS} interleaved rounds after warm-up; cold cycles > "
        f"{COLD_BYTES // 2**20} MiB of weight copies",
    ]
    lines.append(f"condensed kernel: {native['line']}")
    for threads, bw in sorted(bandwidth.items()):
        lines.append(
            f"bandwidth, {threads} thread(s): {bw['copy_bytes_per_s'] / 1e9:.2f} GB/s "
            f"(copy, read+write; used for the floor), {bw['read_bytes_per_s'] / 1e9:.2f} GB/s "
            f"(read-only sum)"
        )
    lines += ["", "constant fan-in masks:", *_main_table(results)]
    lines += [
        "c/F.lin, c/bestD, c/bestC: time(F.linear), time(best of F.linear and numpy), time(best "
        "of csr, sparse.mm, scipy) over time(condensed) (> 1: condensed faster);",
        "floor: condensed's bandwidth floor (its bytes + bias + x + y over the copy bandwidth, "
        "cold only); c.frac, F.frac: floor / time of condensed and of F.linear.",
    ]
    nm_lines = _nm_table(results)
    if nm_lines:
        lines += ["", "nm 2:4 (50% sparsity) against the others on the same 2:4 mask:", *nm_lines]
    lines += [
        "",
        "weight bytes (format nbytes; scipy: data + indices + indptr):",
        *_bytes_table(results),
    ]
    target_lines, checks = _targets(results)
    lines += ["", *target_lines]
    lines += [
        "",
        f"load average before/after: {loadavg_before} / {loadavg_after} ({os.cpu_count()} CPUs "
        f"visible; other processes may share them); total {elapsed:.0f} s",
    ]
    if loadavg_before[0] > 0.7:
        lines.append(
            "WARNING: the machine was busy before the run (1-minute load average > 0.7): "
            "multi-threaded calls stall when a core is taken, so times may be inflated."
        )
    table = "\n".join(lines)
    print(table)

    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "shapes": [list(s) for s in args.shapes],
        "sparsities": args.sparsities,
        "threads": args.threads,
        "batches": args.batches,
        "ablations": args.ablations,
        "modes": args.modes,
        "repeats": {str(b): v for b, v in repeats.items()},
        "rounds": ROUNDS,
        "cold_bytes": COLD_BYTES,
        "rtol": RTOL,
        "atol": ATOL,
        "bandwidth": {str(t): bw for t, bw in bandwidth.items()},
        "blas": {str(t): info for t, info in blas.items()},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg_after,
        "elapsed_s": elapsed,
        "native": native,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(
        args.out,
        json.dumps({"meta": meta, "targets": checks, "results": results, "table": table}, indent=2)
        + "\n",
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
