"""Plain-text tables and ``mean ± std`` cells for command-line reports."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["format_table", "mean_std"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns under a dashed rule."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def mean_std(values: Sequence[float], scale: float = 100.0) -> str:
    """``mean ± sample std`` of ``values * scale`` with two decimals (just the value for one)."""
    if len(values) == 1:
        return f"{scale * values[0]:.2f}"
    return f"{scale * statistics.mean(values):.2f} ± {scale * statistics.stdev(values):.2f}"
