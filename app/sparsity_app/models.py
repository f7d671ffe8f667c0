"""The small models the main job and the training benchmarks train (importable for reuse)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from sparsity_core.errors import ConfigError

__all__ = ["MODELS", "build_cnn1d", "build_mlp", "build_model", "param_count"]

MODELS = ("mlp", "cnn1d")


def build_mlp(num_features: int, hidden: Sequence[int], num_classes: int) -> nn.Sequential:
    """A ReLU MLP ``num_features -> hidden... -> num_classes``."""
    layers: list[nn.Module] = []
    width = num_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def build_cnn1d(length: int, channels: Sequence[int], num_classes: int) -> nn.Sequential:
    """A small 1-D CNN for signals of ``length`` samples (MNIST-1D: 40).

    The first convolution has kernel 5, the others kernel 3, all with stride 2 and "same"
    padding, so each halves the length; a Linear head reads the flattened last feature map.
    The input is ``[batch, length]`` (one channel, added here).
    """
    if not channels:
        raise ConfigError("build_cnn1d needs at least one convolution: channels is empty.")
    layers: list[nn.Module] = [nn.Unflatten(1, (1, length))]
    width, size = 1, length
    for i, c in enumerate(channels):
        k = 5 if i == 0 else 3
        layers += [nn.Conv1d(width, c, k, stride=2, padding=k // 2), nn.ReLU()]
        width, size = c, (size + 2 * (k // 2) - k) // 2 + 1
    if size < 1:
        raise ConfigError(
            f"build_cnn1d: {len(channels)} stride-2 convolutions shrink length {length} to "
            f"nothing; use fewer channels entries."
        )
    layers += [nn.Flatten(), nn.Linear(width * size, num_classes)]
    return nn.Sequential(*layers)


def build_model(
    name: str, num_features: int, num_classes: int, widths: Sequence[int]
) -> nn.Sequential:
    """``mlp`` (``widths`` = hidden sizes) or ``cnn1d`` (``widths`` = channels per conv)."""
    if name == "mlp":
        return build_mlp(num_features, widths, num_classes)
    if name == "cnn1d":
        return build_cnn1d(num_features, widths, num_classes)
    raise ConfigError(f"unknown model {name!r}; choose one of {list(MODELS)}.")


def param_count(model: nn.Module) -> int:
    """Number of parameters (weights and biases)."""
    return sum(p.numel() for p in model.parameters())
