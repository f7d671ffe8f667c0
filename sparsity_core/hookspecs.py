"""Hook specifications: the contract between sparsity-core and its plugins.

A plugin is a module (or object) with functions decorated by :data:`sparsity_core.hookimpl`
whose names match the specs below. Register it through an entry point in the ``sparsity_core``
group::

    [project.entry-points.sparsity_core]
    my_plugin = "my_package.my_module"

Registration hooks receive a ``register(name, component_cls, *, summary="")`` callable and
return nothing. ``name`` is what users write in configs (``grow="my_rule"``); it must be unique
per component type across all installed plugins. ``component_cls`` is a class (usually an
``attrs.frozen`` class holding hyper-parameters) whose instances implement the matching protocol
in :mod:`sparsity_core.protocols`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .telemetry import UpdateRecord

PROJECT_NAME = "sparsity_core"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class RegisterFn(Protocol):
    """The callable passed to every ``sparsity_register_*`` hook."""

    def __call__(self, name: str, component: Any, *, summary: str = "") -> None: ...


@hookspec
def sparsity_register_prune_criteria(register: RegisterFn) -> None:
    """Register prune criteria (:class:`~sparsity_core.protocols.PruneCriterion`).

    A prune criterion scores active weights; higher scores are kept.
    """


@hookspec
def sparsity_register_growth_criteria(register: RegisterFn) -> None:
    """Register growth criteria (:class:`~sparsity_core.protocols.GrowthCriterion`).

    A growth criterion scores inactive weights; higher scores are grown first.
    """


@hookspec
def sparsity_register_structures(register: RegisterFn) -> None:
    """Register structure constraints (:class:`~sparsity_core.protocols.StructureConstraint`)."""


@hookspec
def sparsity_register_distributions(register: RegisterFn) -> None:
    """Register layer-wise distributions (:class:`~sparsity_core.protocols.Distribution`)."""


@hookspec
def sparsity_register_schedules(register: RegisterFn) -> None:
    """Register drop-fraction schedules (:class:`~sparsity_core.protocols.DropSchedule`)."""


@hookspec
def sparsity_register_reinits(register: RegisterFn) -> None:
    """Register weight re-initialisations for the initial mask
    (:class:`~sparsity_core.protocols.Reinitializer`), e.g. ``sparse_fan_in``."""


@hookspec
def sparsity_register_optimizer_state_policies(register: RegisterFn) -> None:
    """Register optimizer-state policies (:class:`~sparsity_core.protocols.OptimizerStatePolicy`):
    what the optimizer's state of a grown weight is, e.g. ``adam_fresh_step``."""


@hookspec
def sparsity_register_formats(register: RegisterFn) -> None:
    """Register storage formats (:class:`~sparsity_core.protocols.StorageFormat`)."""


@hookspec
def sparsity_register_presets(register: RegisterFn) -> None:
    """Register method presets: callables ``(**overrides) -> DSTConfig``.

    Presets are what ``sparsity-core train --method NAME`` and :func:`sparsity_core.preset`
    look up, e.g. ``rigl`` or ``set``.
    """


@hookspec
def sparsity_register_strategies(register: RegisterFn) -> None:
    """Register hypothesis strategies for the testing kit (:mod:`sparsity_core.testing`).

    ``register(name, factory)``; the kit looks strategies up by two kinds of name:

    * ``"<type>.<component name>"`` (e.g. ``"growth.explore"``): ``factory(component_class)``
      returns a strategy of instances, so method strategies vary the hyper-parameters;
    * ``"specs.<structure name>"``: ``factory(structure)`` returns a strategy of
      :class:`~sparsity_core.LayerSpec` the structure accepts (when its shapes are not those
      of N:M or any-shape structures).
    """


@hookspec
def sparsity_after_mask_update(scheduler: Any, step: int, records: Sequence[UpdateRecord]) -> None:
    """Observe a topology update, called once per update step (never per batch).

    Args:
        scheduler: the :class:`~sparsity_core.scheduler.DSTScheduler` that updated.
        step: the optimizer step count at which the update happened.
        records: one :class:`~sparsity_core.telemetry.UpdateRecord` per sparse layer.

    Observers must not modify masks or weights.
    """
