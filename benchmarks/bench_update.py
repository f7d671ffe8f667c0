#!/usr/bin/env python
"""Cost of one topology update, per structure, relative to one training step.

For every structure setup (unstructured RigL, constant fan-in, SRigL with neuron ablation,
N:M 2:4 and N:M 3:32) this measures, on an MLP of 20M+ parameters (CPU):

* one training step (forward + backward + ``optimizer.step()`` + ``scheduler.step()`` on a
  step that does not update the topology), SGD with momentum, and the same step of the plain
  dense model without any scheduler (the per-step masking overhead);
* one topology update: the ``scheduler.step()`` call of an update step alone (the extra cost
  of that step), its ratio to one training step and the amortised overhead at ΔT = 100
  (``update / (100 * step)``); targets from issue 3: ratio < 3 and overhead < 3 %;
* the same update at a fixed drop fraction (``scheduler._update(step, 0.3)`` called directly,
  so every setup drops the same fraction whatever the schedule says);
* the dense-gradient capture cost: the update step's ``optimizer.step()`` (whose pre-hook
  clones every sparse layer's dense gradient) minus a normal ``optimizer.step()``;
* the update's peak extra memory: the peak resident set size during ``scheduler.step()``
  above the resident set just before it (see ``MEMORY_METHOD``).

Each setup runs in a fresh child process (``--child``), so memory readings and allocator
state never leak from one setup into the next. The parent prints a table and writes JSON.

    python benchmarks/bench_update.py                 # full run (several minutes)
    python benchmarks/bench_update.py --quick         # ~2M-parameter smoke test (seconds)
    python benchmarks/bench_update.py --profile srigl # cProfile one setup's update

Update steps are reached by moving the scheduler's step counter to ``k * ΔT - 1`` before a
training step (``scheduler._step``), so no 99 throw-away steps are needed between updates;
the drop fraction is then the preset's cosine schedule at step ``k * ΔT`` (about 0.3 early on).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sparsity_core.checkpoint import write_text

DELTA_T = 100
TOTAL_STEPS = 100_000  # t_end = 75 000: every measured update lies well inside the window
FIXED_FRACTION = 0.3
RESULT_MARKER = "@@BENCH_UPDATE_RESULT@@"

# name -> (preset, overrides); None is the plain dense model without a scheduler.
SETUPS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "dense": None,
    "rigl": ("rigl", {"density": 0.1}),
    "srigl_no_ablation": ("srigl_no_ablation", {"density": 0.1}),
    "srigl": ("srigl", {"density": 0.1}),
    "nm_rigl_2:4": ("nm_rigl", {"density": 0.5}),
    "nm_rigl_3:32": ("nm_rigl", {"density": 0.1}),
}

FULL_WIDTHS = (1024, 3072, 3072, 3072, 1024)
QUICK_WIDTHS = (512, 1024, 1024, 512)

MEMORY_METHOD = (
    "Linux /proc/self/status, in a fresh child process per setup: free heap memory is handed "
    "back (malloc_trim), VmRSS is read just before scheduler.step() and the peak (VmHWM) is "
    "reset by writing 5 to /proc/self/clear_refs; peak extra = VmHWM after the call - VmRSS "
    "before it. torch CPU tensors are invisible to tracemalloc, hence RSS. The captured dense "
    "gradients (held from optimizer.step() to scheduler.step()) are part of the RSS before the "
    "call and are reported separately as the capture buffer."
)
MEMORY_METHOD_FALLBACK = (
    "Linux /proc/self/status, fresh child process per setup; /proc/self/clear_refs could not "
    "reset the peak, so peak extra = max(0, VmHWM after - VmHWM before) is a LOWER BOUND (it "
    "only shows growth above the training step's own earlier peak)."
)


# ---------------------------------------------------------------------------------------------
# memory helpers (Linux)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


_LIBC = None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS so VmRSS counts only live memory."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------------
# the child: one setup, one process


def _build(widths: tuple[int, ...]):
    import torch
    from torch import nn

    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    torch.manual_seed(0)
    return nn.Sequential(*layers)


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def run_child(setup: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    import sparsity_core
    from sparsity_core.structures import describe

    torch.set_num_threads(args.threads)
    widths = tuple(args.widths)
    model = _build(widths)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    spec = SETUPS[setup]
    sched = None
    if spec is not None:
        name, overrides = spec
        config = sparsity_core.preset(name, delta_t=DELTA_T, **overrides)
        sched = sparsity_core.DSTScheduler(model, opt, config, total_steps=TOTAL_STEPS)

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, widths[0], generator=gen)
    y = torch.randint(0, widths[-1], (args.batch,), generator=gen)

    def forward_backward() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return time.perf_counter() - t0

    def timed(fn) -> tuple[float, Any]:
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    # -- training steps that do not update the topology ----------------------------------------
    steps: dict[str, list[float]] = {"fwd_bwd": [], "opt": [], "sched": [], "total": []}
    for i in range(args.warmup + args.steps):
        if sched is not None:
            assert not sched.is_update_step(sched.step_count + 1)
        t_fb = forward_backward()
        t_opt, _ = timed(opt.step)
        t_sched, _ = timed(sched.step) if sched is not None else (0.0, None)
        if i >= args.warmup:
            steps["fwd_bwd"].append(t_fb)
            steps["opt"].append(t_opt)
            steps["sched"].append(t_sched)
            steps["total"].append(t_fb + t_opt + t_sched)
    result: dict[str, Any] = {
        "setup": setup,
        "params": n_params,
        "widths": list(widths),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "step_samples_s": steps,
        "step_s": _median(steps["total"]),
        "step_opt_s": _median(steps["opt"]),
        "step_sched_s": _median(steps["sched"]),
    }
    if sched is None:
        return result

    layers = sched.layers
    result.update(
        preset=spec[0],
        config_density=sched.config.density,
        achieved_density=sched.density(),
        sparse_params=sum(layer.spec.numel for layer in layers.values()),
        structures=sorted({describe(layer.structure) for layer in layers.values()}),
        capture_buffer_mb=(
            sum(layer.weight.numel() * layer.weight.element_size() for layer in layers.values())
            / 2**20
            if sched._caps.needs_grad
            else 0.0
        ),
    )
    can_reset = _reset_peak()
    result["memory_method"] = MEMORY_METHOD if can_reset else MEMORY_METHOD_FALLBACK

    def measure_memory(fn) -> tuple[float, Any, float | None]:
        _trim_heap()
        rss_before = _status_kib("VmRSS")
        hwm_before = _status_kib("VmHWM")
        reset = _reset_peak()
        elapsed, out = timed(fn)
        hwm_after = _status_kib("VmHWM")
        if rss_before is None or hwm_after is None:
            return elapsed, out, None
        extra = hwm_after - rss_before if reset else max(0, hwm_after - (hwm_before or 0))
        return elapsed, out, extra / 1024

    # -- natural update steps: scheduler.step() on a real update step --------------------------
    nat: dict[str, list[float]] = {"update": [], "opt": [], "fwd_bwd": [], "peak_extra_mb": []}
    fractions: list[float] = []
    k = sched.step_count // DELTA_T
    for i in range(args.warmup_updates + args.updates):
        k += 1
        sched._step = k * DELTA_T - 1  # the next scheduler.step() is an update step
        t_fb = forward_backward()
        t_opt, _ = timed(opt.step)  # the pre-hook clones the dense gradients here
        t_upd, records, extra = measure_memory(sched.step)
        if not records:
            raise RuntimeError(f"{setup}: step {sched.step_count} did not update the topology")
        if i >= args.warmup_updates:
            nat["update"].append(t_upd)
            nat["opt"].append(t_opt)
            nat["fwd_bwd"].append(t_fb)
            if extra is not None:
                nat["peak_extra_mb"].append(extra)
            fractions.append(records[0].fraction)
    last = {r.fqn: r for r in records}

    # -- fixed-fraction updates: scheduler._update(step, 0.3) called directly -----------------
    fixed: dict[str, list[float]] = {"update": [], "peak_extra_mb": []}
    for i in range(args.warmup_updates + args.updates):
        forward_backward()
        grads = {}
        if sched._caps.needs_grad:
            grads = {fqn: layer.weight.grad.detach().clone() for fqn, layer in layers.items()}
        opt.step()  # not an update step: masks the gradients, captures nothing
        sched._captured_grads.update(grads)
        del grads
        update = functools.partial(sched._update, sched.step_count, FIXED_FRACTION)
        try:
            t_upd, _, extra = measure_memory(update)
        finally:
            sched._captured_grads.clear()
        if i >= args.warmup_updates:
            fixed["update"].append(t_upd)
            if extra is not None:
                fixed["peak_extra_mb"].append(extra)

    result.update(
        natural_samples=nat,
        natural_fraction=_median(fractions),
        update_s=_median(nat["update"]),
        update_opt_s=_median(nat["opt"]),
        capture_s=(_median(nat["opt"]) - result["step_opt_s"] if sched._caps.needs_grad else None),
        peak_extra_mb=max(nat["peak_extra_mb"]) if nat["peak_extra_mb"] else None,
        fixed_samples=fixed,
        fixed_fraction=FIXED_FRACTION,
        fixed_update_s=_median(fixed["update"]),
        fixed_peak_extra_mb=max(fixed["peak_extra_mb"]) if fixed["peak_extra_mb"] else None,
        achieved_density_after=sched.density(),
        active_neurons_after_natural={
            fqn: f"{r.active_neurons}/{r.fan_out}" for fqn, r in last.items()
        },
        all_satisfied=all(s.satisfied for s in sched.summary()),
    )
    return result


# ---------------------------------------------------------------------------------------------
# profiling one setup's update in-process


def run_profile(setup: str, args: argparse.Namespace) -> None:
    import cProfile
    import pstats

    import torch
    import torch.nn.functional as F

    import sparsity_core

    if SETUPS.get(setup) is None:
        raise SystemExit(f"--profile needs a sparse setup, one of {list(SETUPS)[1:]}")
    torch.set_num_threads(args.threads)
    widths = tuple(args.widths)
    model = _build(widths)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    name, overrides = SETUPS[setup]
    config = sparsity_core.preset(name, delta_t=DELTA_T, **overrides)
    sched = sparsity_core.DSTScheduler(model, opt, config, total_steps=TOTAL_STEPS)
    x = torch.randn(args.batch, widths[0])
    y = torch.randint(0, widths[-1], (args.batch,))

    def prepare() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        grads = {f: layer.weight.grad.detach().clone() for f, layer in sched.layers.items()}
        opt.step()
        sched._captured_grads.update(grads)

    prepare()
    sched._update(sched.step_count, FIXED_FRACTION)  # warm-up
    sched._captured_grads.clear()
    profiler = cProfile.Profile()
    for _ in range(args.updates):
        prepare()
        profiler.enable()
        sched._update(sched.step_count, FIXED_FRACTION)
        profiler.disable()
        sched._captured_grads.clear()
    print(
        f"cProfile of {args.updates} x scheduler._update(step, {FIXED_FRACTION}) for {setup} "
        f"(widths {list(widths)}, {args.threads} threads)"
    )
    stats = pstats.Stats(profiler).strip_dirs().sort_stats("tottime")
    stats.print_stats(args.profile_top)
    stats.sort_stats("cumulative").print_callers(
        r"argsort|topk|where|masked_fill|scatter|sum|any|count_nonzero|nan_to_num"
    )


# ---------------------------------------------------------------------------------------------
# the parent: one child per setup, then the table


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _child_command(setup: str, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        setup,
        "--threads",
        str(args.threads),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--updates",
        str(args.updates),
        "--warmup-updates",
        str(args.warmup_updates),
        "--widths",
        *map(str, args.widths),
    ]


def _run_setup(setup: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    proc = subprocess.run(
        _child_command(setup, args), env=env, stdout=subprocess.PIPE, text=True, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"setup {setup} failed (exit {proc.returncode}):\n{proc.stdout}")
    return json.loads(lines[-1][len(RESULT_MARKER) :])


def _table(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    dense_step = results.get("dense", {}).get("step_s")
    out = []
    out.append(
        f"bench_update: MLP {' -> '.join(map(str, meta['widths']))}, {meta['params']:,} "
        f"parameters, batch {meta['batch']}, SGD(momentum=0.9), {meta['threads']} threads, "
        f"torch {meta['torch']}, ΔT={DELTA_T}"
    )
    out.append(
        f"medians of {meta['steps']} training steps / {meta['updates']} updates per setup "
        f"(after {meta['warmup']} / {meta['warmup_updates']} warm-up); times in ms"
    )
    header = (
        f"{'setup':<18} {'structure':<33} {'density':>7} {'step':>8} {'/dense':>6} "
        f"{'update':>8} {'frac':>5} {'/step':>6} {'@ΔT=100':>8} {'upd@0.3':>8} {'/step':>6} "
        f"{'capture':>8} {'peak+MB':>8} {'capt.MB':>8}  targets"
    )
    out.append(header)
    out.append("-" * len(header))
    for setup, r in results.items():
        step = r["step_s"]
        if setup == "dense":
            out.append(
                f"{setup:<18} {'(plain dense, no scheduler)':<33} {1.0:>7.3f} "
                f"{step * 1e3:>8.1f} {1.0:>6.2f}"
            )
            continue
        upd, fixed = r["update_s"], r["fixed_update_s"]
        ratio = upd / step
        fixed_ratio = fixed / step
        amort = upd / (DELTA_T * step)
        ok = ratio < 3 and amort < 0.03 and fixed_ratio < 3
        capture = r["capture_s"]
        out.append(
            f"{setup:<18} {' + '.join(r['structures']):<33.33} {r['achieved_density']:>7.3f} "
            f"{step * 1e3:>8.1f} {_fmt(step / dense_step if dense_step else None, '>6.2f')} "
            f"{upd * 1e3:>8.1f} {r['natural_fraction']:>5.2f} {ratio:>6.2f} "
            f"{amort * 100:>7.2f}% {fixed * 1e3:>8.1f} {fixed_ratio:>6.2f} "
            f"{_fmt(None if capture is None else capture * 1e3, '>8.1f')} "
            f"{_fmt(r['peak_extra_mb'], '>8.1f')} {r['capture_buffer_mb']:>8.1f}  "
            f"{'ok' if ok else 'MISSED'}"
        )
    out.append("")
    out.append(
        "step: fwd+bwd+optimizer.step()+scheduler.step() on a non-update step; /dense: step over "
        "the plain dense step (per-step masking overhead);"
    )
    out.append(
        "update: scheduler.step() alone on an update step (drop fraction 'frac' from the preset's "
        "cosine schedule); /step: update over step (target < 3);"
    )
    out.append(
        f"@ΔT=100: update / ({DELTA_T} * step) (target < 3%); upd@0.3: scheduler._update(step, "
        f"{FIXED_FRACTION}) called directly, same fraction for every setup;"
    )
    out.append(
        "capture: update step's optimizer.step() minus a normal one (dense-gradient clone); "
        "peak+MB: peak RSS during the update above RSS before it (max over updates); "
        "capt.MB: captured dense-gradient buffer."
    )
    out.append(f"memory: {meta['memory_method']}")
    out.append(
        f"load average before/after: {meta['loadavg_before']} / {meta['loadavg_after']} "
        f"({os.cpu_count()} CPUs visible; other processes may share them)"
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~2M-parameter model, few repeats")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    parser.add_argument("--batch", type=int, default=256, help="training batch size (256)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (7)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up training steps (2)")
    parser.add_argument("--updates", type=int, default=None, help="timed updates (5)")
    parser.add_argument("--warmup-updates", type=int, default=None, help="warm-up updates (1)")
    parser.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=None,
        help=f"MLP widths (default {' '.join(map(str, FULL_WIDTHS))})",
    )
    parser.add_argument(
        "--setups",
        nargs="+",
        default=list(SETUPS),
        choices=list(SETUPS),
        help="setups to run (default: all)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "bench_update.json",
        help="JSON output (default benchmarks/results/bench_update.json)",
    )
    parser.add_argument(
        "--profile",
        choices=[s for s, v in SETUPS.items() if v is not None],
        help="cProfile this setup's update instead of benchmarking",
    )
    parser.add_argument("--profile-top", type=int, default=25, help="rows of the profile (25)")
    parser.add_argument("--child", choices=list(SETUPS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    defaults = (3, 1, 3, 1) if args.quick else (7, 2, 5, 1)
    for attr, value in zip(("steps", "warmup", "updates", "warmup_updates"), defaults, strict=True):
        if getattr(args, attr) is None:
            setattr(args, attr, value)
    if args.widths is None:
        args.widths = list(QUICK_WIDTHS if args.quick else FULL_WIDTHS)
    if args.steps < 1 or args.updates < 1 or args.warmup + args.steps >= DELTA_T:
        parser.error(f"need --steps >= 1, --updates >= 1 and --warmup + --steps < {DELTA_T}")

    if args.child:
        result = run_child(args.child, args)
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return 0
    if args.profile:
        run_profile(args.profile, args)
        return 0

    import torch

    if "dense" not in args.setups:
        args.setups = ["dense", *args.setups]  # the baseline every ratio needs
    loadavg_before = [round(v, 2) for v in os.getloadavg()]
    results: dict[str, dict[str, Any]] = {}
    for setup in args.setups:
        t0 = time.perf_counter()
        print(f"[bench_update] {setup} ...", file=sys.stderr, flush=True)
        results[setup] = _run_setup(setup, args)
        print(
            f"[bench_update] {setup} done in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    sparse = [r for r in results.values() if "memory_method" in r]
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "widths": list(args.widths),
        "params": results["dense"]["params"],
        "batch": args.batch,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "updates": args.updates,
        "warmup_updates": args.warmup_updates,
        "delta_t": DELTA_T,
        "fixed_fraction": FIXED_FRACTION,
        "optimizer": "SGD(lr=0.01, momentum=0.9)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": loadavg_before,
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "memory_method": sparse[0]["memory_method"] if sparse else MEMORY_METHOD,
        "quick": args.quick,
    }
    table = _table(results, meta)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {}
    dense_step = results["dense"]["step_s"]
    for setup, r in results.items():
        if setup == "dense":
            continue
        summary[setup] = {
            "step_ms": r["step_s"] * 1e3,
            "masked_over_dense": r["step_s"] / dense_step,
            "update_ms": r["update_s"] * 1e3,
            "update_over_step": r["update_s"] / r["step_s"],
            "amortised_overhead_dt100": r["update_s"] / (DELTA_T * r["step_s"]),
            "fixed_update_ms": r["fixed_update_s"] * 1e3,
            "fixed_update_over_step": r["fixed_update_s"] / r["step_s"],
            "capture_ms": None if r["capture_s"] is None else r["capture_s"] * 1e3,
            "peak_extra_mb": r["peak_extra_mb"],
            "capture_buffer_mb": r["capture_buffer_mb"],
            "meets_targets": r["update_s"] / r["step_s"] < 3
            and r["update_s"] / (DELTA_T * r["step_s"]) < 0.03,
        }
    write_text(
        args.out,
        json.dumps({"meta": meta, "summary": summary, "results": results, "table": table}, indent=2)
        + "\n",
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
