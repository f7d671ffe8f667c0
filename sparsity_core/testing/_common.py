"""Helpers shared by the kit's checks: failure messages and exact tensor comparison."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import torch

from ..layers import LayerSpec


def _fail(check: str, component: Any, where: str, what: str) -> NoReturn:
    raise AssertionError(f"{check}: {_describe(component)} on {where}: {what}")


def _describe(component: Any) -> str:
    if isinstance(component, str):
        return component
    return type(component).__name__


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality that also treats NaN as equal to NaN (at the same position)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)


def _count(where: torch.Tensor) -> int:
    return int(where.sum())


def _check_mask_value(
    check: str, component: Any, spec: LayerSpec, mask: Any, what: str
) -> torch.Tensor:
    where = f"layer {spec.fqn!r}"
    if not isinstance(mask, torch.Tensor):
        _fail(check, component, where, f"{what} returned {type(mask).__name__}, not a tensor")
    if mask.dtype != torch.bool:
        _fail(check, component, where, f"{what} returned dtype {mask.dtype}, not torch.bool")
    if tuple(mask.shape) != spec.shape:
        _fail(
            check,
            component,
            where,
            f"{what} returned shape {tuple(mask.shape)}, not the layer's {spec.shape}",
        )
    return mask


def _unchanged(
    check: str,
    component: Any,
    where: str,
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
) -> None:
    for name, old in before.items():
        if not _same(old, after[name]):
            _fail(check, component, where, f"modified its input {name} in place")
