"""The benchmark's results file: every finished run by key, rewritten atomically after each run."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sparsity_core.checkpoint import atomic_file
from sparsity_core.errors import CheckpointError

__all__ = ["RunStore"]

FORMAT = "sparsity-core train_bench v1"


class RunStore:
    """Finished runs keyed by :attr:`RunSpec.key`; a run found here is not trained again.

    One process writes a file at a time (two invocations on the same file would overwrite
    each other's runs).

    The file also keeps runs that the current grid does not plan (another subset, another
    recipe), so narrowing and widening the grid never throws work away.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.runs: dict[str, dict[str, Any]] = {}
        self.meta: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        if self.path.exists():
            try:
                payload = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise CheckpointError(
                    f"cannot read the benchmark results {self.path}: {exc}; move it away to "
                    f"start afresh."
                ) from exc
            if payload.get("format") != FORMAT:
                raise CheckpointError(
                    f"{self.path} is not a train_bench results file (format "
                    f"{payload.get('format')!r}, expected {FORMAT!r}); choose another --out-dir."
                )
            self.runs = {r["key"]: r for r in payload.get("runs", [])}
            self.meta = payload.get("meta", {})
            self.extra = {k: v for k, v in payload.items() if k not in ("format", "meta", "runs")}

    def __contains__(self, key: str) -> bool:
        return key in self.runs

    def add(self, record: dict[str, Any]) -> None:
        """Record a finished run and save the file."""
        self.runs[record["key"]] = record
        self.save()

    def select(self, keys: Iterable[str]) -> list[dict[str, Any]]:
        """The stored runs among ``keys``, in that order."""
        return [self.runs[k] for k in keys if k in self.runs]

    def save(self) -> None:
        """Write the file atomically (a killed run leaves the previous file intact)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        head = json.dumps({"format": FORMAT, "meta": self.meta, **self.extra}, indent=1)
        # One run per line: compact, and a re-run's diff shows the runs that changed.
        runs = sorted(self.runs.values(), key=lambda r: r["key"])
        lines = ",\n".join(json.dumps(r, separators=(",", ":")) for r in runs)
        with atomic_file(self.path) as handle:
            handle.write(f'{head[:-2]},\n "runs": [\n{lines}\n ]\n}}\n'.encode())
