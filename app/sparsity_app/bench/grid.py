"""The training grid: settings (dataset, model, recipe), methods, sparsities, seeds; running it."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any, TextIO

import attrs
import numpy as np
import torch

from sparsity_core.errors import ConfigError, SparsityError

from ..data import load_dataset
from ..models import build_model, param_count
from ..progress import ProgressBar
from ..train import DENSE, Recipe, train_run
from .store import RunStore

__all__ = [
    "METHODS",
    "SETTINGS",
    "SPARSITIES",
    "RunSpec",
    "Setting",
    "plan_runs",
    "run_grid",
    "run_one",
    "setting_name",
]

METHODS = (DENSE, "static", "set", "rigl", "srigl", "srigl_no_ablation", "nm_rigl")
SPARSITIES = (0.8, 0.9, 0.95, 0.98)


def setting_name(dataset: str, model: str, variant: str = "") -> str:
    """``dataset/model``, or ``dataset/model/variant``."""
    return f"{dataset}/{model}/{variant}" if variant else f"{dataset}/{model}"


@attrs.frozen
class Setting:
    """One (dataset, model) pair and the fixed recipe every method trains with on it.

    ``variant`` names a second recipe on the same pair (``mnist1d/cnn1d/adam``)."""

    dataset: str
    recipe: Recipe
    variant: str = ""

    @property
    def name(self) -> str:
        return setting_name(self.dataset, self.recipe.model, self.variant)

    def describe(self) -> str:
        r = self.recipe
        widths = "-".join(map(str, r.hidden))
        arch = f"MLP hidden {widths}" if r.model == "mlp" else f"1-D CNN channels {widths}"
        drop = "0.3" if r.drop_fraction is None else f"{r.drop_fraction}"
        if r.optimizer == "adam":
            optim = f"Adam(weight decay {r.weight_decay})"
        else:
            optim = f"SGD(momentum {r.momentum}, weight decay {r.weight_decay})"
        return (
            f"{self.name}: {arch}; {optim}, "
            f"lr {r.lr} cosine-decayed to 0, batch {r.batch_size}, {r.epochs} epochs, "
            f"ΔT={r.delta_t}, drop fraction {drop} (cosine-decayed; constant for SET; updates "
            f"stop at 75% of training), {r.distribution.upper()} layer densities"
        )


# The documented recipes (see benchmarks/README.md for how they were chosen).
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting(
            "digits",
            Recipe(epochs=100, batch_size=64, lr=0.05, hidden=(256, 256), delta_t=50),
        ),
        Setting(
            "mnist1d",
            Recipe(epochs=100, batch_size=64, lr=0.05, hidden=(256, 256), delta_t=100),
        ),
        Setting(
            "mnist1d",
            Recipe(
                epochs=50, batch_size=64, lr=0.05, hidden=(32, 64, 64), delta_t=100, model="cnn1d"
            ),
        ),
        # The 1-D CNN of the MNIST-1D paper (three convolutions of 25 channels) with that
        # paper's optimiser: Adam, lr 1e-2, batch 100, 6000 steps (150 epochs of 4000).
        Setting(
            "mnist1d",
            Recipe(
                epochs=150,
                batch_size=100,
                lr=0.01,
                weight_decay=0.0,
                hidden=(25, 25, 25),
                delta_t=100,
                model="cnn1d",
                optimizer="adam",
            ),
            variant="adam",
        ),
        Setting(
            "mnist1d_large",
            Recipe(epochs=20, batch_size=64, lr=0.05, hidden=(256, 256), delta_t=100),
        ),
    )
}


# Bumped when the methods themselves change (issue 17: global budget rounding, SRigL's
# ablation rule and initial scaling, SET's constant drop fraction), so results recorded
# before are never mixed with new ones.
METHODS_REVISION = 2

# Recipe fields added after results were first recorded, with their defaults: left out of the
# fingerprint at that default, so runs recorded before the field existed keep their keys.
_ADDED_LATER = {"gamma_sal": None, "optimizer": "sgd"}


def recipe_fingerprint(recipe: Recipe) -> str:
    """A short hash of everything in the recipe but the sparsity (which the key names)."""
    fields = attrs.asdict(attrs.evolve(recipe, sparsity=0.0))
    for name, default in _ADDED_LATER.items():
        if fields[name] == default:
            del fields[name]
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]


@attrs.frozen
class RunSpec:
    """One training run of the grid."""

    dataset: str
    method: str
    sparsity: float
    seed: int
    recipe: Recipe
    keep_masks: bool = attrs.field(default=False, eq=False)
    variant: str = ""
    compact: bool = False
    """Train the sparse Linear layers compact (sparsity_core.to_compact)."""

    @property
    def setting(self) -> str:
        return setting_name(self.dataset, self.recipe.model, self.variant)

    @property
    def key(self) -> str:
        key = (
            f"{self.setting}/{self.method}/s{self.sparsity:g}/seed{self.seed}/"
            f"{recipe_fingerprint(self.recipe)}"
        )
        if METHODS_REVISION != 1 and self.method != DENSE:
            key = f"{key}/r{METHODS_REVISION}"
        return f"{key}/compact" if self.compact else key


def plan_runs(
    settings: Sequence[Setting],
    methods: Sequence[str],
    sparsities: Sequence[float],
    seeds: Sequence[int],
    *,
    mask_sparsity: float | None = None,
    compact: bool = False,
) -> list[RunSpec]:
    """Every run of the grid, seed by seed: the dense baseline once per (setting, seed), each
    other method at each sparsity. Runs of the first seed at ``mask_sparsity`` keep their
    final masks."""
    unknown = [s for s in sparsities if not 0.0 < s < 1.0]
    if unknown:
        raise ConfigError(f"sparsities {unknown} must lie in (0, 1), e.g. 0.9 for 90%.")
    specs = []
    # Seed-major: an interrupted grid has every configuration at the first seeds, not some
    # configurations at every seed.
    for seed in seeds:
        for setting in settings:
            for method in methods:
                for sparsity in [0.0] if method == DENSE else sparsities:
                    specs.append(
                        RunSpec(
                            setting.dataset,
                            method,
                            sparsity,
                            seed,
                            attrs.evolve(setting.recipe, sparsity=sparsity),
                            keep_masks=(seed == seeds[0] and sparsity == mask_sparsity),
                            variant=setting.variant,
                            compact=compact and method != DENSE,
                        )
                    )
    return specs


@functools.lru_cache(maxsize=4)
def _dataset(name: str):
    return load_dataset(name)


def _pack_mask(mask: torch.Tensor) -> dict[str, Any]:
    bits = np.packbits(mask.reshape(-1).cpu().numpy().astype(np.uint8))
    return {"shape": list(mask.shape), "bits": base64.b64encode(bits.tobytes()).decode()}


def unpack_mask(packed: dict[str, Any]) -> np.ndarray:
    """Inverse of the masks stored with a run: a boolean array of the layer's weight shape."""
    shape = packed["shape"]
    bits = np.frombuffer(base64.b64decode(packed["bits"]), dtype=np.uint8)
    return np.unpackbits(bits, count=int(np.prod(shape))).astype(bool).reshape(shape)


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Train one run of the grid and return its JSON record."""
    data = _dataset(spec.dataset)
    result = train_run(
        spec.method,
        data,
        spec.recipe,
        seed=spec.seed,
        keep_masks=spec.keep_masks,
        compact=spec.compact,
    )
    model = build_model(spec.recipe.model, data.num_features, data.num_classes, spec.recipe.hidden)
    record = {
        "key": spec.key,
        "setting": spec.setting,
        "dataset": spec.dataset,
        "model": spec.recipe.model,
        "method": spec.method,
        "sparsity": spec.sparsity,
        "seed": spec.seed,
        "recipe": attrs.asdict(spec.recipe),
        "params": param_count(model),
        "n_train": len(data.y_train),
        "n_test": len(data.y_test),
        "threads": torch.get_num_threads(),
        **result.to_dict(),
        "step_ms": 1000.0 * result.seconds / max(result.steps, 1),
    }
    record["achieved_sparsity"] = 1.0 - record.pop("density")
    if result.masks is not None:
        record["masks"] = {fqn: _pack_mask(m) for fqn, m in result.masks.items()}
    return record


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _line(record: dict[str, Any]) -> str:
    return (
        f"{record['key']}: acc {100 * record['test_accuracy']:.2f}% "
        f"({record['seconds']:.1f}s, {record['step_ms']:.2f} ms/step)"
    )


def run_grid(
    specs: Sequence[RunSpec],
    store: RunStore,
    *,
    workers: int = 1,
    threads: int = 1,
    stream: TextIO | None = None,
    runner: Callable[[RunSpec], dict[str, Any]] = run_one,
) -> int:
    """Train every run not yet in ``store`` (saved after each); returns how many were trained.

    ``workers`` > 1 trains that many runs at once in fresh processes, each with ``threads``
    torch threads.
    """
    stream = stream if stream is not None else sys.stderr
    pending = [s for s in specs if s.key not in store]
    skipped = len(specs) - len(pending)
    if skipped:
        print(f"train_bench: {skipped} of {len(specs)} runs already done, skipped", file=stream)
    if not pending:
        return 0
    bar = ProgressBar(len(pending), desc="runs", stream=stream)
    log_lines = not getattr(stream, "isatty", lambda: False)()
    start = time.perf_counter()

    def finished(record: dict[str, Any]) -> None:
        record["wall_clock"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        store.add(record)
        if log_lines:
            print(_line(record), file=stream, flush=True)
        bar.update(postfix=f"{record['key'].rsplit('/', 1)[0]} {record['test_accuracy']:.3f}")

    if workers <= 1:
        _init_worker(threads)
        for spec in pending:
            finished(runner(spec))
    else:
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=get_context("spawn"),
            initializer=_init_worker,
            initargs=(threads,),
        ) as pool:
            futures = {pool.submit(runner, spec): spec for spec in pending}
            for future in as_completed(futures):
                try:
                    record = future.result()
                except Exception as exc:
                    # Stop the queued runs now instead of training them all for nothing.
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise SparsityError(
                        f"train_bench: run {futures[future].key} failed: {type(exc).__name__}: "
                        f"{exc} (the runs finished before it are saved in {store.path})."
                    ) from exc
                finished(record)
    bar.close()
    print(
        f"train_bench: trained {len(pending)} runs in {time.perf_counter() - start:.0f}s",
        file=stream,
    )
    return len(pending)
