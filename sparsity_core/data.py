"""Offline datasets for the main job: nothing is downloaded at run time."""

from __future__ import annotations

import attrs
import numpy as np
import torch

from .errors import ConfigError

__all__ = ["DATASETS", "Dataset", "load_dataset"]

DATASETS = ("digits", "mnist1d")


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


def load_dataset(name: str) -> Dataset:
    """Load ``digits`` (scikit-learn's bundled 8x8 digits, 80/20 stratified split) or
    ``mnist1d`` (generated locally by the ``mnist1d`` package, its standard 4000/1000 split)."""
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
    if name == "mnist1d":
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError as exc:
            raise ConfigError(
                "dataset 'mnist1d' needs the mnist1d package (it generates the data locally); "
                "install it with `pip install mnist1d`."
            ) from exc
        data = make_dataset(get_dataset_args())
        return _to_dataset(name, data["x"], data["y"], data["x_test"], data["y_test"])
    raise ConfigError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}.")
