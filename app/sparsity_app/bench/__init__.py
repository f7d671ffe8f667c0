"""Training benchmarks: a resumable grid of DST runs, a report, plots and the step overhead.

``python benchmarks/train_bench.py`` and ``sparsity-core bench train`` both run
:func:`sparsity_app.bench.main.run`. Importing this package imports neither matplotlib nor
mnist1d; the plots and the MNIST-1D data load them when used.
"""

from __future__ import annotations

from .grid import METHODS, SETTINGS, RunSpec, Setting, plan_runs, run_grid
from .store import RunStore

__all__ = ["METHODS", "SETTINGS", "RunSpec", "RunStore", "Setting", "plan_runs", "run_grid"]
