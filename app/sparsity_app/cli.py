"""The ``sparsity-core`` command: ``plugins`` lists plugins, ``train`` runs the main job."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from sparsity_core.checkpoint import write_text
from sparsity_core.errors import SparsityError
from sparsity_core.registry import (
    ComponentType,
    Registry,
    components_by_plugin,
    create_plugin_manager,
)

from .data import DATASETS
from .models import MODELS
from .tables import format_table, mean_std

__all__ = ["main"]


def _registry_for_listing() -> Registry:
    # Not strict: a broken plugin is listed with its error instead of hiding every other one.
    return Registry.from_plugin_manager(create_plugin_manager(strict=False))


def cmd_plugins(args: argparse.Namespace) -> int:
    registry = _registry_for_listing()
    by_plugin = components_by_plugin(registry)
    summaries = {(e.type.value, e.name): e.summary for e in registry.entries()}
    if args.json:
        out = [
            {
                "plugin": info.name,
                "entry_point": info.value,
                "distribution": info.distribution,
                "version": info.version,
                "error": info.error,
                "components": by_plugin.get(info.name, {}),
            }
            for info in registry.plugins
        ]
        print(json.dumps(out, indent=2))
        return 0
    for info in registry.plugins:
        dist = f"{info.distribution} {info.version}" if info.distribution else "registered by hand"
        print(f"{info.name}  ({dist}; {info.value})")
        if info.error:
            print(f"    ERROR: {info.error}")
        for ctype in ComponentType:
            for name in by_plugin.get(info.name, {}).get(ctype.value, []):
                summary = summaries[(ctype.value, name)]
                print(f"    {ctype.value:<12} {name:<14} {summary}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .progress import ProgressBar
    from .train import DENSE, Recipe, train_run

    torch.set_num_threads(args.threads)
    methods = list(dict.fromkeys(args.method or ["rigl"]))
    if not args.no_dense and DENSE not in methods:
        methods.insert(0, DENSE)
    recipe = Recipe(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        hidden=tuple(int(h) for h in args.hidden.split(",")),
        delta_t=args.delta_t,
        sparsity=args.sparsity,
        distribution=args.distribution,
        model=args.model,
    )
    # Fail on a bad method name before any training starts.
    from sparsity_core.config import preset

    for method in methods:
        if method != DENSE:
            preset(method, density=1.0 - recipe.sparsity)
    data = load_dataset(args.dataset)
    seeds = [args.seed + i for i in range(args.seeds)]
    steps = recipe.epochs * recipe.steps_per_epoch(len(data.y_train))
    print(
        f"sparsity-core train: {data.name} ({len(data.y_train)} train / {len(data.y_test)} test, "
        f"{data.num_features} features), {recipe.model.upper()} {data.num_features}-"
        f"{'-'.join(map(str, recipe.hidden))}-{data.num_classes}, {recipe.epochs} epochs "
        f"({steps} steps), sparsity {recipe.sparsity:.0%}, ΔT={recipe.delta_t}, "
        f"{recipe.distribution}, seeds {seeds}",
        file=sys.stderr,
    )
    bar = ProgressBar(steps * len(methods) * len(seeds), desc="train")
    ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    # Each sparse method on the masked path, and with --compact also compact, side by side.
    plan = [(m, False) for m in methods]
    if args.compact:
        plan += [(m, True) for m in methods if m != DENSE]
    results = []
    for method, compact in plan:
        for seed in seeds:
            name = f"{method}-compact" if compact else method
            results.append(
                train_run(
                    method,
                    data,
                    recipe,
                    seed=seed,
                    progress=bar,
                    checkpoint=ckpt_dir / f"{name}-seed{seed}.pt" if ckpt_dir else None,
                    checkpoint_every=args.checkpoint_every,
                    resume=args.resume,
                    compact=compact,
                )
            )
    bar.close()

    rows = []
    labels = list(dict.fromkeys(r.label for r in results))
    for label in labels:
        runs = [r for r in results if r.label == label]
        itops = [r.itop for r in runs if r.itop is not None]
        rows.append(
            [
                label,
                mean_std([r.test_accuracy for r in runs]),
                f"{1 - statistics.mean(r.density for r in runs):.4f}",
                f"{statistics.mean(itops):.3f}" if itops else "-",
                f"{statistics.mean(r.seconds for r in runs):.1f}",
                f"{statistics.median(r.step_ms for r in runs):.2f}",
                f"{statistics.mean(r.state_bytes for r in runs) / 2**10:.0f}",
            ]
        )
    print()
    headers = ["method", "test acc %", "sparsity", "ITOP", "time s", "step ms", "state KiB"]
    print(format_table(headers, rows))
    print()
    layer_rows = []
    for label in labels:
        first = next(r for r in results if r.label == label)
        for layer in first.layers:
            lo, hi = layer["fan_in_min"], layer["fan_in_max"]
            layer_rows.append(
                [
                    label,
                    layer["fqn"],
                    "x".join(map(str, layer["shape"])),
                    layer["structure"],
                    f"{layer['target_sparsity']:.4f}",
                    f"{layer['sparsity']:.4f}",
                    str(lo) if lo == hi else f"{lo}-{hi}",
                    f"{layer['active_neurons']}/{layer['fan_out']}",
                    "yes" if layer["satisfied"] else "NO",
                    f"{layer['itop']:.3f}" if "itop" in layer else "-",
                ]
            )
    headers = [
        "method",
        "layer",
        "shape",
        "structure",
        "target",
        "sparsity",
        "fan-in",
        "active neurons",
        "holds",
        "ITOP",
    ]
    print(format_table(headers, layer_rows))
    if args.json:
        payload = {
            "dataset": data.name,
            "recipe": attrs.asdict(recipe),
            "runs": [r.to_dict() for r in results],
        }
        write_text(args.json, json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from .bench.main import run

    return run(args)


def _format_arg(text: str) -> Any:
    """``name`` or ``name:key=value,key=value`` (e.g. ``nm:n=2,m=4,semi_structured=true``)."""
    name, _, params = text.partition(":")
    if not params:
        return name
    spec: dict[str, Any] = {"kind": name}
    for item in params.split(","):
        key, _, value = item.partition("=")
        if value.lstrip("-").isdigit():
            spec[key] = int(value)
        elif value.lower() in ("true", "false"):
            spec[key] = value.lower() == "true"
        else:
            spec[key] = value
    return spec


def cmd_export(args: argparse.Namespace) -> int:
    from sparsity_core.checkpoint import load_checkpoint, save_checkpoint
    from sparsity_core.errors import CheckpointError
    from sparsity_core.exporting import export
    from sparsity_core.scheduler import DSTScheduler

    from .models import build_model

    path = Path(args.checkpoint)
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "arch" not in state or "model" not in state:
        raise CheckpointError(
            f"{path} is not a checkpoint of `sparsity-core train` (no 'arch'/'model'); write "
            f"one with `sparsity-core train --checkpoint-dir DIR --checkpoint-every N`."
        )
    if state.get("sparsity") is None:
        raise CheckpointError(
            f"{path} is a checkpoint of the dense baseline: it has no masks to export."
        )
    arch = state["arch"]
    model = build_model(
        arch.get("model", "mlp"), arch["num_features"], arch["num_classes"], arch["hidden"]
    )
    if state.get("compact"):
        # A compact run's model holds the layout: rebuild it from the saved masks first.
        from sparsity_core.checkpoint import saved_config
        from sparsity_core.compacting import to_compact

        from .train import convolutions

        to_compact(
            model,
            saved_config(state["sparsity"]),
            masks=state["sparsity"]["masks"],
            keep_masked=convolutions(model),
        )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = DSTScheduler.from_state_dict(model, optimizer, state["sparsity"])
    model.load_state_dict(state["model"])
    scheduler.remove()
    rules = []
    for rule in args.rule or []:
        pattern, _, fmt = rule.partition("=")
        rules.append((pattern, None if fmt.lower() == "none" else _format_arg(fmt)))
    result = export(model, scheduler, format=_format_arg(args.format), rules=rules)
    print(result.format_report())
    out = Path(args.out) if args.out else path.with_name(path.stem + f".{args.format}.pt")
    save_checkpoint(
        {
            "arch": arch,
            "method": state.get("method"),
            "format": args.format,
            "rules": args.rule or [],
            "model": result.model.state_dict(),
        },
        out,
    )
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sparsity_core import __version__

    parser = argparse.ArgumentParser(
        prog="sparsity-core", description="Dynamic sparse training for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed plugins and the components they register")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)

    t = sub.add_parser(
        "train",
        help="train a small MLP on an offline dataset with DST methods and the dense baseline",
    )
    t.add_argument(
        "--method",
        action="append",
        help="a preset (repeat for several; default rigl); see `sparsity-core plugins`",
    )
    t.add_argument("--sparsity", type=float, default=0.9, help="fraction of weights removed")
    t.add_argument("--seed", type=int, default=0, help="first seed")
    t.add_argument("--seeds", type=int, default=1, help="number of seeds per method")
    t.add_argument("--dataset", default="digits", choices=list(DATASETS))
    t.add_argument(
        "--model",
        default="mlp",
        choices=list(MODELS),
        help="mlp, or cnn1d (a small 1-D CNN; --hidden gives its channels, e.g. 32,64,64)",
    )
    t.add_argument("--epochs", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--hidden", default="256,256", help="hidden widths, comma-separated")
    t.add_argument("--delta-t", type=int, default=50, help="steps between topology updates")
    t.add_argument("--distribution", default="erk", help="layer-wise distribution")
    t.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument(
        "--compact",
        action="store_true",
        help="also train each method compact (only the active weights; sparsity_core.to_compact)"
        " and show step time and training-state memory of dense, masked and compact side by side",
    )
    t.add_argument("--json", metavar="PATH", help="also write every run as JSON")
    t.add_argument("--checkpoint-dir", help="save a checkpoint per run in this folder")
    t.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints")
    t.add_argument("--resume", action="store_true", help="continue runs from their checkpoints")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "export",
        help="pack a `train` checkpoint's sparse layers for inference; print the bytes saved",
    )
    e.add_argument("checkpoint", help="a checkpoint written by `sparsity-core train`")
    e.add_argument(
        "--format",
        default="condensed",
        help="storage format: dense_masked, csr, condensed, nm (or nm:n=2,m=4)",
    )
    e.add_argument(
        "--rule",
        action="append",
        metavar="PATTERN=FORMAT",
        help="per-layer format, first match; PATTERN is fnmatched against layer names and class "
        "names (e.g. 'Conv*': convolutions are packed only when a rule names them); FORMAT "
        "'none' keeps the layer dense",
    )
    e.add_argument("--out", help="where to write the exported state dict")
    e.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="benchmarks (train: the DST training benchmark)")
    bench_sub = b.add_subparsers(dest="bench", required=True)
    bt = bench_sub.add_parser(
        "train",
        help="train every method over datasets, sparsities and seeds (resumable); write a "
        "table, the checks of the published claims, JSON and PNG plots",
    )
    from .bench.main import add_arguments

    add_arguments(bt, default_out="train_bench_results")
    bt.set_defaults(func=cmd_bench_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SparsityError as exc:
        print(f"sparsity-core: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
