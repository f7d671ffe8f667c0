#!/usr/bin/env python
"""Accuracy of compact training beside the masked path, from two training-benchmark stores.

    python benchmarks/train_bench.py --settings mnist1d/mlp --sparsities 90 95 --seeds 3 \\
        --workers 2 --prefix train_bench_compact --compact --no-overhead --no-plots
    python benchmarks/compare_compact.py

For each (setting, method, sparsity) the compact store holds, this prints the mean ± std test
accuracy over its seeds on both paths (the masked runs of the same seeds, from
``results/train_bench.json``) and the largest per-seed difference. The two paths compute the
same training up to float rounding (the compact kernels sum in another order), which over
thousands of steps is enough to change individual runs, so the comparison is of means. The
table is written to ``results/train_bench_compact_vs_masked.txt``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from sparsity_core.checkpoint import write_text

RESULTS = Path(__file__).parent / "results"


def _runs(path: Path) -> list[dict]:
    runs = json.loads(path.read_text())["runs"]
    return list(runs.values()) if isinstance(runs, dict) else runs


def _masked_key(record: dict) -> str:
    return record["key"].removesuffix("/compact")


def _fmt(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:6.2f} ± {std:4.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--masked", type=Path, default=RESULTS / "train_bench.json")
    parser.add_argument("--compact", type=Path, default=RESULTS / "train_bench_compact.json")
    args = parser.parse_args()
    masked = {r["key"]: r for r in _runs(args.masked)}
    groups: dict[tuple, list[tuple[dict, dict | None]]] = {}
    for record in _runs(args.compact):
        if not record.get("compact"):
            continue
        group = (record["setting"], record["method"], record["sparsity"])
        groups.setdefault(group, []).append((record, masked.get(_masked_key(record))))
    lines = [
        f"compact vs masked test accuracy % (same seeds; masked runs from {args.masked.name})",
        "",
        f"{'setting':<14} {'method':<18} {'sparsity':>8} | {'masked':>13} | {'compact':>13} | "
        f"{'max |diff|':>10} | seeds",
    ]
    for (setting, method, sparsity), pairs in sorted(groups.items()):
        both = [(c, m) for c, m in pairs if m is not None]
        if not both:
            continue
        diff = max(abs(c["test_accuracy"] - m["test_accuracy"]) for c, m in both)
        lines.append(
            f"{setting:<14} {method:<18} {100 * sparsity:7.0f}% | "
            f"{_fmt([m['test_accuracy'] for _, m in both])} | "
            f"{_fmt([c['test_accuracy'] for c, _ in both])} | {100 * diff:9.2f} | {len(both)}"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(RESULTS / "train_bench_compact_vs_masked.txt", text)


if __name__ == "__main__":
    main()
