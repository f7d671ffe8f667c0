"""Aggregate the grid's runs: the accuracy table, step overhead vs dense and the claim checks."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from ..tables import format_table, mean_std
from ..train import DENSE

__all__ = ["Group", "check_claims", "group_runs", "headline_markdown", "results_table"]

DST = ("set", "rigl", "srigl")


@attrs.frozen
class Group:
    """The runs of one (setting, method, sparsity) over seeds."""

    setting: str
    method: str
    sparsity: float
    runs: tuple[dict[str, Any], ...]

    @property
    def accuracies(self) -> list[float]:
        return [r["test_accuracy"] for r in self.runs]

    @property
    def accuracy(self) -> float:
        return statistics.mean(self.accuracies)

    @property
    def achieved_sparsity(self) -> float:
        return statistics.mean(r["achieved_sparsity"] for r in self.runs)

    @property
    def step_ms(self) -> float:
        return statistics.median(r["step_ms"] for r in self.runs)

    @property
    def seconds(self) -> float:
        return statistics.mean(r["seconds"] for r in self.runs)

    @property
    def itop(self) -> float | None:
        values = [r["itop"] for r in self.runs if r.get("itop") is not None]
        return statistics.mean(values) if values else None

    def active_fraction(self) -> list[float]:
        """Mean fraction of active output neurons per layer (the output layer last)."""
        per_layer = zip(*(r["layers"] for r in self.runs), strict=True)
        return [
            statistics.mean(layer["active_neurons"] / layer["fan_out"] for layer in layers)
            for layers in per_layer
        ]


def group_runs(runs: Iterable[dict[str, Any]]) -> dict[tuple[str, str, float], Group]:
    """Runs grouped by (setting, method, sparsity), in first-seen order."""
    grouped: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault((run["setting"], run["method"], run["sparsity"]), []).append(run)
    return {k: Group(*k, tuple(sorted(v, key=lambda r: r["seed"]))) for k, v in grouped.items()}


def _dense(groups: dict[tuple[str, str, float], Group], setting: str) -> Group | None:
    return groups.get((setting, DENSE, 0.0))


def results_table(groups: dict[tuple[str, str, float], Group]) -> str:
    """One row per (setting, method, sparsity): accuracy, time, step overhead, ITOP, neurons."""
    rows = []
    for (setting, method, sparsity), g in groups.items():
        dense = _dense(groups, setting)
        ratio = f"{g.step_ms / dense.step_ms:.2f}" if dense else "-"
        hidden = g.active_fraction()[:-1]
        rows.append(
            [
                setting,
                method,
                f"{sparsity:.0%}" if method != DENSE else "0%",
                f"{g.achieved_sparsity:.4f}",
                mean_std(g.accuracies),
                len(g.runs),
                f"{g.seconds:.1f}",
                f"{g.step_ms:.2f}",
                ratio,
                f"{g.itop:.3f}" if g.itop is not None else "-",
                " ".join(f"{f:.2f}" for f in hidden),
            ]
        )
    headers = [
        "setting",
        "method",
        "sparsity",
        "achieved",
        "test acc % (mean ± std)",
        "seeds",
        "time/run s",
        "ms/step",
        "x dense",
        "ITOP",
        "active neurons (hidden layers)",
    ]
    return format_table(headers, rows)


def headline_markdown(
    groups: dict[tuple[str, str, float], Group],
    setting: str,
    methods: Sequence[str],
    sparsities: Sequence[float],
) -> str:
    """A markdown table of one setting: methods as rows, sparsities as columns."""
    lines = [
        "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
        "| --- |" + " --- |" * len(sparsities),
    ]
    dense = _dense(groups, setting)
    if dense is not None:
        cell = mean_std(dense.accuracies)
        lines.append("| dense (0%) | " + " | ".join([cell] * len(sparsities)) + " |")
    for method in methods:
        if method == DENSE:
            continue
        cells = []
        for s in sparsities:
            g = groups.get((setting, method, s))
            cells.append(mean_std(g.accuracies) if g else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@attrs.frozen
class Verdict:
    """One claim checked on one setting (and sparsity)."""

    claim: str
    setting: str
    holds: bool
    detail: str
    margin: float = 0.0
    noise: float = 0.0

    @property
    def clear(self) -> bool:
        """Whether the margin exceeds the larger seed standard deviation of the two sides."""
        return abs(self.margin) > self.noise


def _acc(groups, setting, method, sparsity) -> float | None:
    g = groups.get((setting, method, sparsity))
    return 100 * g.accuracy if g else None


def _noise(groups, setting, *pairs: tuple[str, float]) -> float:
    """The largest seed standard deviation (accuracy %) among the named groups."""
    stds = [0.0]
    for method, sparsity in pairs:
        g = groups.get((setting, method, sparsity))
        if g is not None and len(g.runs) > 1:
            stds.append(100 * statistics.stdev(g.accuracies))
    return max(stds)


def check_claims(groups: dict[tuple[str, str, float], Group]) -> list[Verdict]:
    """Evaluate the four published qualitative claims on every setting that has the runs."""
    out: list[Verdict] = []
    settings = list(dict.fromkeys(k[0] for k in groups))
    sparsities = sorted({k[2] for k in groups if k[1] != DENSE})
    for setting in settings:
        for s in (s for s in sparsities if s >= 0.9):
            static = _acc(groups, setting, "static", s)
            for m in DST:
                acc = _acc(groups, setting, m, s)
                if static is None or acc is None:
                    continue
                out.append(
                    Verdict(
                        "1: DST beats static at >= 90%",
                        setting,
                        acc > static,
                        f"{m} {acc:.2f} vs static {static:.2f} at {s:.0%} ({acc - static:+.2f})",
                        acc - static,
                        _noise(groups, setting, (m, s), ("static", s)),
                    )
                )
        dense = _acc(groups, setting, DENSE, 0.0)
        for m in ("rigl", "srigl"):
            acc = _acc(groups, setting, m, 0.9)
            if dense is None or acc is None:
                continue
            out.append(
                Verdict(
                    "2: RigL/SRigL at 90% within 1 point of dense",
                    setting,
                    acc >= dense - 1.0,
                    f"{m} {acc:.2f} vs dense {dense:.2f} ({acc - dense:+.2f})",
                    acc - dense + 1.0,
                    _noise(groups, setting, (m, 0.9), (DENSE, 0.0)),
                )
            )
        for s in (s for s in sparsities if 0.8 <= s <= 0.95):
            rigl, srigl = _acc(groups, setting, "rigl", s), _acc(groups, setting, "srigl", s)
            if rigl is None or srigl is None:
                continue
            out.append(
                Verdict(
                    "3: SRigL within 1 point of RigL at 80-95%",
                    setting,
                    srigl >= rigl - 1.0,
                    f"srigl {srigl:.2f} vs rigl {rigl:.2f} at {s:.0%} ({srigl - rigl:+.2f})",
                    srigl - rigl + 1.0,
                    _noise(groups, setting, ("srigl", s), ("rigl", s)),
                )
            )
        for s in (s for s in sparsities if s >= 0.95):
            abl = _acc(groups, setting, "srigl", s)
            no_abl = _acc(groups, setting, "srigl_no_ablation", s)
            if abl is None or no_abl is None:
                continue
            out.append(
                Verdict(
                    "4a: at 95-98% SRigL with ablation beats SRigL without",
                    setting,
                    abl > no_abl,
                    f"srigl {abl:.2f} vs srigl_no_ablation {no_abl:.2f} at {s:.0%} "
                    f"({abl - no_abl:+.2f})",
                    abl - no_abl,
                    _noise(groups, setting, ("srigl", s), ("srigl_no_ablation", s)),
                )
            )
        fractions = [
            (s, statistics.mean(groups[(setting, "srigl", s)].active_fraction()[:-1]))
            for s in sparsities
            if (setting, "srigl", s) in groups
        ]
        if len(fractions) >= 2:
            values = [f for _, f in fractions]
            falling = all(b <= a for a, b in itertools.pairwise(values))
            out.append(
                Verdict(
                    "4b: SRigL's active-neuron fraction falls as sparsity rises",
                    setting,
                    falling and values[-1] < values[0],
                    ", ".join(f"{s:.0%}: {f:.3f}" for s, f in fractions),
                )
            )
    return out


def claims_text(verdicts: Sequence[Verdict]) -> str:
    """The verdicts as a table, grouped by claim."""
    rows = [
        [
            v.claim,
            v.setting,
            "holds" if v.holds else "FAILS",
            v.detail,
            f"{v.noise:.2f}" if v.noise else "-",
            ("yes" if v.clear else "no") if v.noise else "-",
        ]
        for v in sorted(verdicts, key=lambda v: v.claim)
    ]
    headers = ["claim", "setting", "verdict", "measured (test acc %, means)", "seed std", "clear"]
    table = format_table(headers, rows)
    return (
        f"{table}\nmargin: the difference that decides the verdict (for claims 2 and 3, the "
        f"difference plus the 1 point allowed); seed std: the larger sample std over seeds of "
        f"the two sides; clear: |margin| > seed std (otherwise the verdict is within the noise of "
        f"this many seeds)."
    )
