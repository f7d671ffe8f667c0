"""Offline datasets for the main job: nothing is downloaded at run time."""

from __future__ import annotations

import os
import random
from pathlib import Path

import attrs
import numpy as np
import torch

from sparsity_core.checkpoint import atomic_file
from sparsity_core.errors import ConfigError

__all__ = ["DATASETS", "MNIST1D_SIZES", "Dataset", "cache_dir", "load_dataset"]

# name -> samples generated (80% train, 20% test, the package's own split).
MNIST1D_SIZES = {"mnist1d": 5000, "mnist1d_large": 20000}
MNIST1D_SEED = 42  # the package's default: 5000 samples with it give the standard 4000/1000
DATASETS = ("digits", *MNIST1D_SIZES)


@attrs.frozen(eq=False)
class Dataset:
    """A standardised train/test split as float32 / int64 tensors."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    """A stratified split, fixed by ``seed`` (so every method sees the same test set)."""
    rng = np.random.default_rng(seed)
    test_idx = []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        test_idx.append(idx[: round(test_fraction * len(idx))])
    test = np.zeros(len(y), dtype=bool)
    test[np.concatenate(test_idx)] = True
    return x[~test], y[~test], x[test], y[test]


def _standardise(x_train: np.ndarray, x_test: np.ndarray):
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    return (x_train - mean) / std, (x_test - mean) / std


def _to_dataset(name, x_train, y_train, x_test, y_test) -> Dataset:
    x_train, x_test = _standardise(x_train.astype(np.float64), x_test.astype(np.float64))
    return Dataset(
        name,
        torch.from_numpy(x_train.astype(np.float32)),
        torch.from_numpy(y_train.astype(np.int64)),
        torch.from_numpy(x_test.astype(np.float32)),
        torch.from_numpy(y_test.astype(np.int64)),
        int(max(y_train.max(), y_test.max()) + 1),
    )


def cache_dir() -> Path:
    """Where generated data is cached: ``$SPARSITY_CORE_CACHE``, else the user cache folder."""
    env = os.environ.get("SPARSITY_CORE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparsity-core"


def _mnist1d_arrays(num_samples: int) -> tuple[np.ndarray, ...]:
    """MNIST-1D with ``num_samples`` samples from the package's generator (default arguments,
    seed 42), cached as ``.npz``; nothing is downloaded."""
    path = cache_dir() / f"mnist1d-n{num_samples}-seed{MNIST1D_SEED}.npz"
    keys = ("x", "y", "x_test", "y_test")
    if path.exists():
        with np.load(path) as saved:
            return tuple(saved[k] for k in keys)
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ConfigError(
            "dataset 'mnist1d' needs the mnist1d package (it generates the data locally, "
            "once; the arrays are then cached in " + str(cache_dir()) + "); install it with "
            "`pip install -c constraints.txt -e '.[bench]'` or `pip install mnist1d`."
        ) from exc
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = MNIST1D_SEED
    # make_dataset seeds the global numpy and random generators: leave them as they were.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = tuple(np.asarray(data[k]) for k in keys)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as handle:
        np.savez_compressed(handle, **dict(zip(keys, arrays, strict=True)))
    return arrays


def load_dataset(name: str) -> Dataset:
    """Load a dataset by name; nothing is downloaded.

    ``digits``: scikit-learn's bundled 8x8 digits, 80/20 stratified split. ``mnist1d``: MNIST-1D
    generated locally by the ``mnist1d`` package with its default arguments (5000 samples, seed
    42: the standard 4000/1000 split). ``mnist1d_large``: the same generator with 20000 samples
    (16000/4000). Generated arrays are cached under :func:`cache_dir`.
    """
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise ConfigError(
                "dataset 'digits' needs scikit-learn, which ships the data offline; install "
                "it with `pip install -c constraints.txt -e '.[train]'` or `pip install "
                "scikit-learn`."
            ) from exc
        digits = load_digits()
        return _to_dataset(name, *_split(digits.data, digits.target, 0.2, seed=0))
    if name in MNIST1D_SIZES:
        x, y, x_test, y_test = _mnist1d_arrays(MNIST1D_SIZES[name])
        return _to_dataset(name, x, y, x_test, y_test)
    raise ConfigError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}.")
