"""The training benchmark's command line (``benchmarks/train_bench.py``, ``sparsity-core bench
train``): run the grid (resumably), then write the table, the claim checks, JSON and plots."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from sparsity_core.checkpoint import write_text
from sparsity_core.errors import ConfigError, SparsityError

from ..train import DENSE, Recipe
from .grid import METHODS, SETTINGS, SPARSITIES, plan_runs, run_grid
from .overhead import measure_overhead, overhead_text
from .report import check_claims, claims_text, group_runs, headline_markdown, results_table
from .store import RunStore

__all__ = ["add_arguments", "main", "run"]

QUICK_SPARSITIES = (0.9, 0.98)
QUICK_EPOCH_DIVISOR = 10
MASK_SETTING = "mnist1d/mlp"


def add_arguments(parser: argparse.ArgumentParser, *, default_out: str) -> None:
    """The benchmark's options (shared by the script and ``sparsity-core bench train``)."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: 1 seed, sparsities {[int(100 * s) for s in QUICK_SPARSITIES]}, "
        f"1/{QUICK_EPOCH_DIVISOR} of the epochs, a short overhead timing (< 10 min on 2 cores)",
    )
    parser.add_argument(
        "--settings", nargs="+", choices=sorted(SETTINGS), help="(dataset/model) pairs"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="methods (default: all)")
    parser.add_argument(
        "--sparsities", nargs="+", type=float, help="in percent (default: 80 90 95 98)"
    )
    parser.add_argument("--seeds", type=int, help="seeds per configuration (default 3)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a recipe field in every setting (e.g. epochs=200, delta_t=50, "
        "drop_fraction=0.5, hidden=512,512); the runs get a new key",
    )
    parser.add_argument("--workers", type=int, default=1, help="runs trained at once (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out-dir", default=default_out, help="where results are written")
    parser.add_argument("--prefix", help="file name prefix (default train_bench / train_quick)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the table, checks and plots from the runs already stored",
    )
    parser.add_argument(
        "--compact",
        action="store_true",
        help="train every sparse run compact (sparsity_core.to_compact; convolutions stay "
        "masked); the runs get their own keys",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    parser.add_argument("--no-overhead", action="store_true", help="skip the overhead timing")
    parser.add_argument(
        "--redo-overhead", action="store_true", help="time the overhead again even if stored"
    )
    parser.add_argument("--overhead-threads", type=int, default=2)


_RECIPE_FIELDS = {f.name: f for f in attrs.fields(Recipe)}


def _overrides(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in _RECIPE_FIELDS or name == "sparsity":
            raise ConfigError(
                f"--set {item!r}: write FIELD=VALUE with FIELD one of "
                f"{sorted(set(_RECIPE_FIELDS) - {'sparsity'})}."
            )
        default = _RECIPE_FIELDS[name].default
        try:
            if name == "hidden":
                out[name] = tuple(int(h) for h in text.split(","))
            elif name in ("drop_fraction", "gamma_sal"):
                out[name] = None if text == "none" else float(text)
            elif isinstance(default, bool | str):
                out[name] = text
            else:
                out[name] = type(default)(text)
        except ValueError:
            raise ConfigError(f"--set {item!r}: {text!r} is not a valid {name}.") from None
    return out


def _plan(args: argparse.Namespace):
    names = args.settings or list(SETTINGS)
    overrides = _overrides(args.set)
    settings = []
    for name in names:
        setting = SETTINGS[name]
        recipe = attrs.evolve(setting.recipe, **overrides)
        if args.quick:
            recipe = attrs.evolve(recipe, epochs=max(1, recipe.epochs // QUICK_EPOCH_DIVISOR))
        settings.append(attrs.evolve(setting, recipe=recipe))
    if args.sparsities:
        sparsities = tuple(s / 100 for s in args.sparsities)
    else:
        sparsities = QUICK_SPARSITIES if args.quick else SPARSITIES
    n_seeds = args.seeds or (1 if args.quick else 3)
    if n_seeds < 1:
        raise ConfigError(f"--seeds={n_seeds} must be >= 1.")
    seeds = [args.first_seed + i for i in range(n_seeds)]
    methods = list(args.methods or METHODS)
    mask_sparsity = 0.95 if 0.95 in sparsities else max(sparsities)
    return (
        settings,
        methods,
        sparsities,
        seeds,
        plan_runs(
            settings,
            methods,
            sparsities,
            seeds,
            mask_sparsity=mask_sparsity,
            compact=getattr(args, "compact", False),
        ),
        mask_sparsity,
    )


def run(args: argparse.Namespace) -> int:
    """Run the grid and write every output; returns the exit code."""
    settings, methods, sparsities, seeds, specs, mask_sparsity = _plan(args)
    if args.workers < 1 or args.threads < 1:
        raise ConfigError(f"--workers={args.workers} and --threads={args.threads} must be >= 1.")
    out_dir = Path(args.out_dir)
    prefix = args.prefix or ("train_quick" if args.quick else "train_bench")
    store = RunStore(out_dir / f"{prefix}.json")
    print(
        f"train_bench: {len(specs)} runs ({len(settings)} settings x {len(methods)} methods x "
        f"{len(sparsities)} sparsities x {len(seeds)} seeds; dense once per seed), "
        f"{args.workers} worker(s) x {args.threads} thread(s); results in {store.path}",
        file=sys.stderr,
    )
    for setting in settings:
        print(f"  {setting.describe()}", file=sys.stderr)
    start = time.perf_counter()
    trained = 0
    if not args.report_only:
        trained = run_grid(specs, store, workers=args.workers, threads=args.threads)
    elapsed = time.perf_counter() - start

    meta = store.meta = {
        "invocations": store.meta.get("invocations", []),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible",
        "recipes": {**store.meta.get("recipes", {}), **{s.name: s.describe() for s in settings}},
    }
    command = " ".join(shlex.quote(a) for a in sys.argv)
    if trained:
        meta.setdefault("invocations", []).append(
            {
                "command": command,
                "trained": trained,
                "elapsed_s": round(elapsed, 1),
                "workers": args.workers,
                "threads_per_run": args.threads,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )
    if not args.no_overhead and ("overhead" not in store.extra or args.redo_overhead):
        quick = {"rounds": 2, "steps_per_round": 1, "updates": 1} if args.quick else {}
        store.extra["overhead"] = measure_overhead(
            threads=args.overhead_threads,
            log=lambda m: print(m, file=sys.stderr, flush=True),
            **quick,
        )
        store.extra["overhead"]["command"] = command
    store.save()

    runs = store.select(s.key for s in specs)
    groups = group_runs(runs)
    verdicts = check_claims(groups)
    run_seconds = sum(r["seconds"] for r in runs)
    invocations = meta.get("invocations", [])
    parts = [
        "train_bench: test accuracy per (setting, method, sparsity), mean ± std over seeds",
        f"this report: {command}",
        "runs trained by:",
        *[
            f"  {i['command']}  ({i['trained']} runs, {i['elapsed_s'] / 60:.1f} min wall, "
            f"{i['workers']} worker(s) x {i['threads_per_run']} thread(s), {i['finished']})"
            for i in invocations
        ],
        "recipes:",
        *[f"  {s.describe()}" for s in settings],
        f"runs: {len(runs)} of {len(specs)} planned; training time (sum of runs) "
        f"{run_seconds / 60:.1f} min; wall time of the invocations above "
        f"{sum(i['elapsed_s'] for i in invocations) / 60:.1f} min; torch {meta['torch']}, "
        f"{meta['machine']}",
        "",
        results_table(groups),
        "",
        "time/run: training loop wall time; ms/step: median over seeds of time/steps; x dense: "
        "ms/step over the dense baseline's on the same setting (small models: the masking "
        "hooks' fixed cost per step dominates); active neurons: mean fraction per hidden layer.",
        "",
        "published claims, checked on these runs:",
        claims_text(verdicts),
    ]
    if "overhead" in store.extra:
        parts += ["", "overhead on a 20M+ parameter model:", overhead_text(store.extra["overhead"])]
    text = "\n".join(parts) + "\n"
    write_text(out_dir / f"{prefix}.txt", text)
    md = []
    for setting in settings:
        table = headline_markdown(groups, setting.name, methods, sparsities)
        md += [f"**{setting.name}**", "", table, ""]
    write_text(out_dir / f"{prefix}.md", "\n".join(md))
    print(text)
    if not args.no_plots and runs:
        from .plots import plot_all

        names = [s.name for s in settings]
        mask_setting = MASK_SETTING if MASK_SETTING in names else names[0]
        mask_runs = [
            r
            for r in runs
            if r["setting"] == mask_setting and r.get("masks") and r["method"] != DENSE
        ]
        for path in plot_all(
            groups, out_dir, prefix, itop_sparsity=mask_sparsity, mask_runs=mask_runs
        ):
            print(f"wrote {path}", file=sys.stderr)
    print(f"wrote {store.path}, {out_dir / (prefix + '.txt')}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None, *, default_out: str = "train_bench_results") -> int:
    parser = argparse.ArgumentParser(
        prog="train_bench", description="Training benchmarks of the DST methods (see --help)."
    )
    add_arguments(parser, default_out=default_out)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except SparsityError as exc:
        print(f"train_bench: error: {exc}", file=sys.stderr)
        return 2
