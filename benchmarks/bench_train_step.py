#!/usr/bin/env python
"""Training step time and training-state memory: dense vs masked vs compact (issue 18).

On the MLP of ``bench_update.py`` (1024-3072-3072-3072-1024, 25.2M weights; CPU, 2 threads by
default) this measures, for each optimizer (Adam, SGD with momentum), batch size (32, 256),
method (``rigl``: unstructured; ``srigl``: constant fan-in with neuron ablation) and sparsity
(80, 90, 95, 99%):

* the step time (forward + backward + ``optimizer.step()`` + ``scheduler.step()``) of the dense
  model without a scheduler, the masked path (``DSTScheduler`` on the dense model) and compact
  training (``sparsity_core.to_compact`` then the same scheduler), measured side by side in
  interleaved rounds (one step of each per round), medians;
* the time of an update step (a step whose ``scheduler.step()`` changes the topology, dense
  gradient capture included), and the step time amortised over ``ΔT = 100``
  (``(99 * step + update step) / 100``);
* the training state's bytes: weights, gradients and optimizer state, plus for the sparse paths
  the masks, ever-active sets and (compact) the column indices and row pointers;
* the peak resident memory above the resident set during an update step (Linux VmHWM reset
  through /proc/self/clear_refs, as in ``bench_update.py``).

    python benchmarks/bench_train_step.py            # the full grid (about 6 minutes)
    python benchmarks/bench_train_step.py --quick    # a 1.6M-weight smoke test (seconds)
    python benchmarks/bench_train_step.py --isas     # one layer per kernel ISA, beside dense

Writes ``benchmarks/results/bench_train_step.{txt,json}`` (``--quick``: ``_quick``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_update import _build as build
from bench_update import _reset_peak, _status_kib, _trim_heap

import sparsity_core as sc
from sparsity_core.checkpoint import write_text
from sparsity_core.native import COMPACT, compact_kernels

DELTA_T = 100
TOTAL_STEPS = 100_000
FULL_WIDTHS = (1024, 3072, 3072, 3072, 1024)
QUICK_WIDTHS = (256, 1024, 1024, 256)
METHODS = ("srigl", "rigl")
MODES = ("dense", "masked", "compact")


def optimizer_for(name: str, params: Any) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    return torch.optim.SGD(params, lr=1e-2, momentum=0.9)


def tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict:
    """Bytes of the training state: weights, gradients, optimizer state, sparse bookkeeping."""
    params = [p for p in model.parameters()]
    out = {
        "weights": sum(tensor_bytes(p) for p in params),
        "grads": sum(tensor_bytes(p.grad) for p in params),
        "optimizer": sum(
            tensor_bytes(v)
            for p in params
            for v in optimizer.state.get(p, {}).values()
            if isinstance(v, torch.Tensor)
        ),
        "indices": sum(tensor_bytes(b) for b in model.buffers()),
        "masks": 0,
    }
    if scheduler is not None:
        out["masks"] = sum(
            tensor_bytes(layer.mask) + tensor_bytes(layer.ever_active)
            for layer in scheduler.layers.values()
        )
    out["total"] = sum(out.values())
    return out


class Run:
    """One mode's model, optimizer, scheduler and batch."""

    def __init__(self, mode, widths, method, density, optimizer, batch, seed=0):
        self.mode = mode
        self.model = build(widths)
        self.scheduler = None
        config = None
        if mode != "dense":
            config = sc.preset(method, density=density, delta_t=DELTA_T)
            if mode == "compact":
                sc.to_compact(self.model, config, total_steps=TOTAL_STEPS)
        self.optimizer = optimizer_for(optimizer, self.model.parameters())
        if config is not None:
            self.scheduler = sc.DSTScheduler(
                self.model, self.optimizer, config, total_steps=TOTAL_STEPS
            )
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, widths[0], generator=gen)
        self.y = torch.randn(batch, widths[-1], generator=gen)
        self.updates = 0

    def step(self) -> float:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return time.perf_counter() - start

    def update_step(self) -> tuple[float, float | None]:
        """One step whose scheduler.step() changes the topology: (seconds, peak extra MiB)."""
        self.updates += 1
        self.scheduler._step = self.updates * DELTA_T - 1
        self.scheduler._arm_capture()
        _trim_heap()
        before = _status_kib("VmRSS")
        reset = _reset_peak()
        seconds = self.step()
        after = _status_kib("VmHWM")
        extra = (after - before) / 1024 if (reset and before and after) else None
        return seconds, extra


def measure(widths, method, density, optimizer, batch, rounds, update_rounds) -> dict:
    runs = {m: Run(m, widths, method, density, optimizer, batch) for m in MODES}
    for run in runs.values():  # warm-up (first calls, lazy optimizer state)
        run.step()
        run.step()
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(rounds):
        for m in MODES:
            times[m].append(runs[m].step())
    updates: dict[str, list[float]] = {m: [] for m in MODES if m != "dense"}
    peaks: dict[str, list[float]] = {m: [] for m in updates}
    for _ in range(update_rounds):
        for m in updates:
            seconds, extra = runs[m].update_step()
            updates[m].append(seconds)
            if extra is not None:
                peaks[m].append(extra)
    out: dict[str, Any] = {}
    for m in MODES:
        step = statistics.median(times[m])
        row = {
            "step_ms": step * 1e3,
            "bytes": state_bytes(runs[m].model, runs[m].optimizer, runs[m].scheduler),
        }
        if m in updates:
            upd = statistics.median(updates[m])
            row["update_step_ms"] = upd * 1e3
            row["amortised_ms"] = ((DELTA_T - 1) * step + upd) / DELTA_T * 1e3
            row["update_peak_extra_mib"] = max(peaks[m]) if peaks[m] else None
            row["density"] = runs[m].scheduler.density()
        else:
            row["amortised_ms"] = step * 1e3
        out[m] = row
    for m in ("masked", "compact"):
        out[m]["speedup_vs_dense"] = out["dense"]["step_ms"] / out[m]["amortised_ms"]
        out[m]["memory_vs_dense"] = out[m]["bytes"]["total"] / out["dense"]["bytes"]["total"]
    out["compact"]["speedup_vs_masked"] = (
        out["masked"]["amortised_ms"] / out["compact"]["amortised_ms"]
    )
    del runs
    return out


def table(results: list[dict], meta: dict) -> str:
    lines = [
        f"bench_train_step: {meta['params'] / 1e6:.1f}M weights {meta['widths']}, "
        f"{meta['threads']} threads, {meta['rounds']} interleaved rounds (median), "
        f"updates at ΔT={DELTA_T} amortised; compact kernels: {meta['isa']}",
        "",
        "opt    batch method sparsity | dense ms | masked ms  x dense | compact ms  x dense "
        "x masked | update ms masked/compact | state MiB dense/masked/compact (compact x dense)"
        " | update peak MiB masked/compact",
    ]
    mib = 1 / 2**20
    for r in results:
        d, m, c = r["dense"], r["masked"], r["compact"]
        peak = "/".join(
            "-" if x.get("update_peak_extra_mib") is None else f"{x['update_peak_extra_mib']:.0f}"
            for x in (m, c)
        )
        lines.append(
            f"{r['optimizer']:<6} {r['batch']:>5} {r['method']:<6} {r['sparsity']:>7}% | "
            f"{d['step_ms']:8.1f} | {m['amortised_ms']:9.1f} {m['speedup_vs_dense']:7.2f}x | "
            f"{c['amortised_ms']:10.1f} {c['speedup_vs_dense']:7.2f}x "
            f"{c['speedup_vs_masked']:7.2f}x"
            f" | {m['update_step_ms']:8.0f}/{c['update_step_ms']:<8.0f} | "
            f"{d['bytes']['total'] * mib:6.0f}/{m['bytes']['total'] * mib:6.0f}/"
            f"{c['bytes']['total'] * mib:6.0f} ({c['memory_vs_dense']:.3f}x) | {peak}"
        )
    return "\n".join(lines) + "\n"


def kernel_isas(rounds: int) -> str:
    """Forward + backward of one compact layer per ISA, side by side with the dense layer."""
    kernels = compact_kernels()
    if kernels is None:
        return f"compact kernels unavailable: {COMPACT.error}\n"
    lines = [
        "compact layer forward + backward (ms, median), 90% constant fan-in, per ISA; "
        f"{torch.get_num_threads()} threads",
        "shape (out x in)  batch | dense | " + " | ".join(kernels.available_isas()),
    ]
    for (out_f, in_f), batch in itertools.product(((3072, 768), (768, 3072)), (1, 32, 256)):
        torch.manual_seed(0)
        linear = nn.Linear(in_f, out_f)
        keep = torch.rand(out_f, in_f).argsort(dim=1)[:, : in_f // 10]
        mask = torch.zeros(out_f, in_f, dtype=torch.bool).scatter_(1, keep, True)
        layer = sc.CompactLinear.from_linear(linear, mask)
        x = torch.randn(batch, in_f, requires_grad=True)

        def run(module, isa=None, x=x):
            if isa is not None:
                kernels.set_isa(isa)
            start = time.perf_counter()
            module(x).sum().backward()
            return time.perf_counter() - start

        names = ["dense", *kernels.available_isas()]
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(rounds):
            for n in names:
                times[n].append(run(linear) if n == "dense" else run(layer, n))
        cells = " | ".join(f"{statistics.median(times[n]) * 1e3:6.2f}" for n in names)
        lines.append(f"{out_f:>5} x {in_f:<5}  {batch:>5} | {cells}")
    kernels.set_isa(kernels.available_isas()[0])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model, few rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sparsities", type=int, nargs="+", default=[80, 90, 95, 99])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--optimizers", nargs="+", default=["adam", "sgd_momentum"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--isas", action="store_true", help="only the per-ISA layer timing (bench_train_isa.txt)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.isas:
        text = kernel_isas(15)
        print(text)
        args.out.mkdir(parents=True, exist_ok=True)
        write_text(args.out / "bench_train_isa.txt", text)
        return
    widths = QUICK_WIDTHS if args.quick else FULL_WIDTHS
    rounds = 3 if args.quick else args.rounds
    kernels = compact_kernels()
    meta = {
        "widths": list(widths),
        "params": sum(a * b for a, b in itertools.pairwise(widths)),
        "threads": args.threads,
        "rounds": rounds,
        "isa": kernels.isa() if kernels is not None else f"none ({COMPACT.error})",
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    results = []
    for optimizer, batch, method, sparsity in itertools.product(
        args.optimizers, args.batches, args.methods, args.sparsities
    ):
        row = measure(widths, method, 1 - sparsity / 100, optimizer, batch, rounds, 2)
        row.update(optimizer=optimizer, batch=batch, method=method, sparsity=sparsity)
        results.append(row)
        print(table([row], meta).splitlines()[-1], flush=True)
    text = table(results, meta)
    print()
    print(text)
    stem = "bench_train_step_quick" if args.quick else "bench_train_step"
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / f"{stem}.txt", text)
    write_text(args.out / f"{stem}.json", json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
