"""PNG figures of the training grid (matplotlib is imported only when a figure is drawn)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsity_core.errors import ConfigError

from ..train import DENSE
from .grid import unpack_mask
from .report import Group

__all__ = ["plot_all"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError(
            "the training benchmark's plots need matplotlib; install it with `pip install -c "
            "constraints.txt -e '.[bench]'`, or pass --no-plots."
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _settings(groups: dict[tuple[str, str, float], Group]) -> list[str]:
    return list(dict.fromkeys(k[0] for k in groups))


def _methods(groups: dict[tuple[str, str, float], Group]) -> list[str]:
    return [m for m in dict.fromkeys(k[1] for k in groups) if m != DENSE]


def _grid(plt, n: int, width: float = 4.2, height: float = 3.3):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, list(axes[0])


def _points(groups, setting: str, method: str) -> list[tuple[float, Group]]:
    """``(sparsity, group)`` of one setting and method, by sparsity."""
    return sorted(
        ((s, g) for (st, m, s), g in groups.items() if st == setting and m == method),
        key=lambda p: p[0],
    )


def _label(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(groups, path: Path) -> None:
    """Test accuracy (mean ± std over seeds) against sparsity, one line per method."""
    plt = _pyplot()
    settings = _settings(groups)
    fig, axes = _grid(plt, len(settings))
    for ax, setting in zip(axes, settings, strict=True):
        for method in _methods(groups):
            pts = _points(groups, setting, method)
            if not pts:
                continue
            xs = [100 * s for s, _ in pts]
            ys = [100 * g.accuracy for _, g in pts]
            errs = [
                100 * statistics.stdev(g.accuracies) if len(g.runs) > 1 else 0.0 for _, g in pts
            ]
            ax.errorbar(xs, ys, yerr=errs, marker="o", ms=3, capsize=2, label=method)
        dense = groups.get((setting, DENSE, 0.0))
        if dense is not None:
            ax.axhline(100 * dense.accuracy, color="k", ls="--", lw=1, label="dense")
        _label(ax, setting, "sparsity %", "test accuracy %")
    axes[0].legend(fontsize=7)
    _save(plt, fig, path)


def plot_active_neurons(groups, path: Path) -> None:
    """Fraction of active neurons per hidden layer against sparsity, per method."""
    plt = _pyplot()
    settings = _settings(groups)
    fig, axes = _grid(plt, len(settings))
    styles = ["-", "--", ":", "-."]
    for ax, setting in zip(axes, settings, strict=True):
        for i, method in enumerate(_methods(groups)):
            pts = _points(groups, setting, method)
            if not pts:
                continue
            fractions = [g.active_fraction()[:-1] for _, g in pts]
            names = [layer["fqn"] for layer in pts[0][1].runs[0]["layers"]][:-1]
            for j, name in enumerate(names):
                ax.plot(
                    [100 * s for s, _ in pts],
                    [f[j] for f in fractions],
                    color=f"C{i}",
                    ls=styles[j % len(styles)],
                    marker="o",
                    ms=3,
                    label=f"{method} {name}",
                )
        _label(ax, setting, "sparsity %", "active neurons / neurons")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=5, ncol=2)
    _save(plt, fig, path)


def plot_itop(groups, path: Path, sparsity: float) -> None:
    """ITOP rate (fraction of weights ever active) over training, per method, at ``sparsity``."""
    plt = _pyplot()
    settings = _settings(groups)
    fig, axes = _grid(plt, len(settings))
    for ax, setting in zip(axes, settings, strict=True):
        for method in _methods(groups):
            g = groups.get((setting, method, sparsity))
            if g is None:
                continue
            run = g.runs[0]
            curve = run.get("itop_curve") or []
            total = run["steps"]
            steps = [0] + [c[0] for c in curve] + [total]
            start = 1.0 - run["achieved_sparsity"]
            values = [start] + [c[1] for c in curve] + [run["itop"]]
            ax.plot([100 * s / total for s in steps], values, drawstyle="steps-post", label=method)
        title = f"{setting}, {sparsity:.0%} sparse (first seed)"
        _label(ax, title, "training progress %", "ITOP rate (ever active / all)")
    axes[0].legend(fontsize=7)
    _save(plt, fig, path)


def plot_masks(runs: Sequence[dict[str, Any]], path: Path) -> None:
    """Per run (rows) and layer (columns): the final mask, neurons sorted by fan-in, with the
    fan-in of each neuron and the active-neuron count in the title."""
    plt = _pyplot()
    runs = [r for r in runs if r.get("masks")]
    if not runs:
        return
    n_layers = max(len(r["masks"]) for r in runs)
    fig, axes = plt.subplots(
        len(runs), n_layers, figsize=(3.0 * n_layers, 2.2 * len(runs)), squeeze=False
    )
    for row, run in zip(axes, runs, strict=True):
        layers = {layer["fqn"]: layer for layer in run["layers"]}
        for ax, (fqn, packed) in zip(row, run["masks"].items(), strict=False):
            mask = unpack_mask(packed).reshape(packed["shape"][0], -1)
            fan_in = mask.sum(axis=1)
            order = fan_in.argsort(kind="stable")[::-1]
            ax.imshow(mask[order], aspect="auto", interpolation="nearest", cmap="Greys")
            info = layers[fqn]
            live = fan_in[fan_in > 0]
            lo, hi = (int(live.min()), int(live.max())) if live.size else (0, 0)
            ax.set_title(
                f"{run['method']} {fqn}: {info['active_neurons']}/{info['fan_out']} neurons, "
                f"fan-in {lo if lo == hi else f'{lo}-{hi}'}",
                fontsize=6,
            )
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in row[len(run["masks"]) :]:
            ax.axis("off")
        row[0].set_ylabel(f"{run['setting']}\n{run['sparsity']:.0%}", fontsize=6)
    fig.suptitle("final masks (rows: output neurons sorted by fan-in; columns: inputs)", fontsize=8)
    _save(plt, fig, path)


def plot_all(
    groups: dict[tuple[str, str, float], Group],
    out_dir: Path,
    prefix: str,
    *,
    itop_sparsity: float,
    mask_runs: Sequence[dict[str, Any]],
) -> list[Path]:
    """Write the four figures; returns their paths."""
    paths = {
        "acc": out_dir / f"{prefix}_accuracy.png",
        "neurons": out_dir / f"{prefix}_active_neurons.png",
        "itop": out_dir / f"{prefix}_itop.png",
        "masks": out_dir / f"{prefix}_masks.png",
    }
    plot_accuracy(groups, paths["acc"])
    plot_active_neurons(groups, paths["neurons"])
    plot_itop(groups, paths["itop"], itop_sparsity)
    plot_masks(mask_runs, paths["masks"])
    return [p for p in paths.values() if p.exists()]
