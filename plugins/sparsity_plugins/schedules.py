"""Built-in drop-fraction schedules."""

from __future__ import annotations

import math

import attrs

from sparsity_core import hookimpl

from ._validators import unit_interval


@attrs.frozen
class ConstantDrop:
    """The same drop fraction at every update (SET's zeta)."""

    rate: float = attrs.field(default=0.3, converter=float, validator=unit_interval)

    def fraction(self, step: int, t_end: int) -> float:
        return self.rate


@attrs.frozen
class CosineDrop:
    """RigL's cosine decay: ``alpha / 2 * (1 + cos(pi * step / t_end))``."""

    alpha: float = attrs.field(default=0.3, converter=float, validator=unit_interval)

    def fraction(self, step: int, t_end: int) -> float:
        if step >= t_end:
            return 0.0
        return self.alpha / 2.0 * (1.0 + math.cos(math.pi * step / t_end))


@hookimpl
def sparsity_register_schedules(register) -> None:
    register("constant", ConstantDrop, summary="fixed drop fraction `rate` (default 0.3, SET)")
    register("cosine", CosineDrop, summary="alpha/2 * (1 + cos(pi t / T_end)), alpha=0.3 (RigL)")
