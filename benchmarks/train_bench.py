#!/usr/bin/env python
"""Training benchmarks of the DST methods: accuracy vs sparsity, plots and step overhead.

    python benchmarks/train_bench.py --quick          # smoke run, < 10 minutes on 2 cores
    python benchmarks/train_bench.py                  # the full grid (see benchmarks/README.md)
    python benchmarks/train_bench.py --settings mnist1d/mlp --sparsities 90 95 --set epochs=200

The same code runs as ``sparsity-core bench train``; this script writes to
``benchmarks/results/`` by default. Completed runs are kept in the results JSON and skipped
when the command is run again.
"""

from __future__ import annotations

from pathlib import Path

from sparsity_app.bench.main import main

if __name__ == "__main__":
    raise SystemExit(main(default_out=str(Path(__file__).resolve().parent / "results")))
