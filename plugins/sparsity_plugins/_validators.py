"""attrs validators shared by the built-in components (errors name the component and value)."""

from __future__ import annotations

import math
from typing import Any

import attrs

from sparsity_core.errors import ConfigError


def unit_interval(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    """Reject values outside [0, 1] (and NaN)."""
    if not isinstance(value, int | float) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ConfigError(
            f"{type(instance).__name__}.{attribute.name}={value!r} must lie in [0, 1]."
        )


def open_unit_interval(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    """Reject values outside [0, 1) (and NaN)."""
    if not isinstance(value, int | float) or math.isnan(value) or not 0.0 <= value < 1.0:
        raise ConfigError(
            f"{type(instance).__name__}.{attribute.name}={value!r} must lie in [0, 1)."
        )


def positive(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    """Reject values <= 0 (and NaN)."""
    if not isinstance(value, int | float) or math.isnan(value) or value <= 0:
        raise ConfigError(f"{type(instance).__name__}.{attribute.name}={value!r} must be > 0.")


def str_tuple(value: Any) -> tuple[str, ...]:
    """Accept one pattern or a sequence of them."""
    return (value,) if isinstance(value, str) else tuple(value)
