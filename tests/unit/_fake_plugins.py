"""Hand-made plugins for the registry tests: small, third-party style, never installed."""

from __future__ import annotations

import types
from typing import Any

import attrs
import torch

from sparsity_core import hookimpl


@attrs.frozen
class LargestWeightGrowth:
    """A third-party growth rule: grow where the (zero) weight plus noise is largest."""

    def scores(self, ctx: Any) -> torch.Tensor:
        noise = torch.rand(ctx.weight.shape, generator=ctx.generator, device=ctx.weight.device)
        return ctx.weight.abs() + noise


@attrs.frozen
class EchoFormat:
    """A third-party storage format that stores ``weight * mask`` densely."""

    def supports(self, structures: Any) -> bool:
        return True

    def pack(self, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weight.detach().masked_fill(~mask, 0)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        return packed.clone()

    def linear(
        self, packed: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return torch.nn.functional.linear(x, packed, bias)

    def nbytes(self, packed: torch.Tensor) -> int:
        return packed.nelement() * packed.element_size()


def echo_format_strategy(component: Any) -> str:
    """A stand-in strategy factory (the registry stores it without calling it)."""
    return f"strategy for {type(component).__name__}"


def growth_plugin(name: str = "largest_weight") -> types.SimpleNamespace:
    """A plugin object that registers :class:`LargestWeightGrowth` as growth ``name``."""

    @hookimpl
    def sparsity_register_growth_criteria(register):
        register(name, LargestWeightGrowth, summary="third-party growth")

    return types.SimpleNamespace(
        sparsity_register_growth_criteria=sparsity_register_growth_criteria
    )


class MaskUpdateRecorder:
    """An observer plugin that records every ``sparsity_after_mask_update`` call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, int, list[Any]]] = []

    @hookimpl
    def sparsity_after_mask_update(self, scheduler, step, records):
        self.calls.append((scheduler, step, list(records)))
