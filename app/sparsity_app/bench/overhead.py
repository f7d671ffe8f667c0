"""Step overhead of the dense-masked engine and the amortised cost of topology updates.

On one wide MLP (25M parameters by default) in one process: a plain dense model and, for each
method, a masked copy with a :class:`DSTScheduler`, all starting from the same weights. Their
training steps are timed in interleaved rounds (every setup once per round, the first one
rotating), so load from other processes affects them alike, and the medians are compared side
by side.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from sparsity_core.config import preset
from sparsity_core.scheduler import DSTScheduler

from ..models import build_mlp, param_count
from ..tables import format_table

__all__ = ["OVERHEAD_WIDTHS", "measure_overhead", "overhead_text"]

OVERHEAD_WIDTHS = (1024, 3072, 3072, 3072, 1024)
TOTAL_STEPS = 100_000  # t_end = 75 000: every timed update lies well inside the update window


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def measure_overhead(
    *,
    widths: Sequence[int] = OVERHEAD_WIDTHS,
    methods: Sequence[str] = ("rigl", "srigl"),
    density: float = 0.1,
    delta_t: int = 100,
    batch: int = 256,
    threads: int = 2,
    rounds: int = 5,
    steps_per_round: int = 2,
    updates: int = 3,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Median step times (ms) of plain dense and masked training, and update costs."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dense = build_mlp(widths[0], widths[1:-1], widths[-1])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, widths[0], generator=gen)
    y = torch.randint(0, widths[-1], (batch,), generator=gen)

    def make(model):
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    setups: dict[str, tuple[Any, Any, DSTScheduler | None]] = {"dense": (*make(dense), None)}
    for method in methods:
        model, opt = make(copy.deepcopy(dense))
        config = preset(method, density=density, delta_t=delta_t)
        sched = DSTScheduler(model, opt, config, total_steps=TOTAL_STEPS)
        setups[method] = (model, opt, sched)

    def step(name: str) -> float:
        model, opt, sched = setups[name]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()
        return time.perf_counter() - t0

    load_before = _loadavg()
    for name in setups:  # warm-up
        step(name)
    samples: dict[str, list[float]] = {name: [] for name in setups}
    names = list(setups)
    for r in range(rounds):
        # Rotate who goes first, so no setup always follows the same neighbour.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for _ in range(steps_per_round):
                samples[name].append(step(name))
        log(f"overhead: round {r + 1}/{rounds}")
    median = {name: 1000 * statistics.median(v) for name, v in samples.items()}

    update_ms: dict[str, list[float]] = {}
    for method in methods:
        _, _, sched = setups[method]
        update_ms[method] = []
        for k in range(1, updates + 1):
            # Jump to the step before an update (no 99 filler steps); private on purpose.
            sched._step = k * delta_t - 1
            assert sched.is_update_step(sched.step_count + 1)
            update_ms[method].append(1000 * step(method))
        log(f"overhead: {method} updates timed")
    load_after = _loadavg()

    rows = []
    for method in methods:
        step_ms = median[method]
        update_step = statistics.median(update_ms[method])
        extra = update_step - step_ms
        rows.append(
            {
                "method": method,
                "step_ms": step_ms,
                "dense_step_ms": median["dense"],
                "step_ratio": step_ms / median["dense"],
                "update_step_ms": update_step,
                "update_extra_ms": extra,
                "amortised": extra / (delta_t * step_ms),
                "step_samples_ms": [1000 * t for t in samples[method]],
                "update_samples_ms": update_ms[method],
            }
        )
    return {
        "widths": list(widths),
        "params": param_count(dense),
        "density": density,
        "delta_t": delta_t,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "steps_per_round": steps_per_round,
        "updates": updates,
        "dense_step_ms": median["dense"],
        "dense_samples_ms": [1000 * t for t in samples["dense"]],
        "methods": rows,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "torch": torch.__version__,
    }


def overhead_text(result: dict[str, Any]) -> str:
    """The overhead table with the targets (< 1.15x per step, < 3% amortised)."""
    rows = [["dense (plain, no scheduler)", f"{result['dense_step_ms']:.1f}", "1.00", "-", "-", ""]]
    for r in result["methods"]:
        ok = r["step_ratio"] < 1.15 and r["amortised"] < 0.03
        rows.append(
            [
                f"{r['method']} (dense-masked)",
                f"{r['step_ms']:.1f}",
                f"{r['step_ratio']:.3f}",
                f"{r['update_extra_ms']:.0f}",
                f"{100 * r['amortised']:.2f}%",
                "ok" if ok else "MISSED",
            ]
        )
    widths = "-".join(map(str, result["widths"]))
    head = (
        f"MLP {widths} ({result['params']:,} parameters), density {result['density']}, batch "
        f"{result['batch']}, {result['threads']} threads, ΔT={result['delta_t']}; medians of "
        f"{result['rounds']} interleaved rounds x {result['steps_per_round']} steps, "
        f"{result['updates']} updates; load average before/after {result['loadavg_before']} / "
        f"{result['loadavg_after']}"
    )
    table = format_table(
        ["setup", "step ms", "x dense", "update extra ms", f"@ΔT={result['delta_t']}", "targets"],
        rows,
    )
    note = (
        "x dense: masked training step (fwd+bwd+optimizer.step+scheduler.step, no update) over "
        "the plain dense step (target < 1.15). update extra: an update step minus a normal "
        "masked step (dense-gradient capture + drop/grow); "
        "@ΔT: update extra / (ΔT x masked step) (target < 3%)."
    )
    return f"{head}\n{table}\n{note}"
