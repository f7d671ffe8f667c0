"""Run every applicable check on a component: :func:`check_component` (no pytest needed) and
:func:`parametrize_with_checks` (one pytest test per component and check)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
from hypothesis import Phase

from ..config import DSTConfig
from ..registry import ComponentType
from . import _common
from ._registered import component_kind, entry_of, non_default_fields, registry
from .compact_checks import check_method_compact_matches_masked
from .criterion_checks import (
    check_criterion_capabilities_declared,
    check_criterion_degenerate_inputs,
    check_criterion_deterministic,
    check_criterion_finite,
    check_criterion_inputs_unchanged,
    check_criterion_no_global_rng,
    check_criterion_shape_dtype_device,
)
from .distribution_checks import (
    check_distribution_dense_layers,
    check_distribution_densities_in_range,
    check_distribution_global_density,
    check_schedule_fraction_in_range,
)
from .format_checks import (
    check_format_keeps_live_zeros,
    check_format_linear_matches_dense,
    check_format_rejects_unsupported,
    check_format_round_trip,
)
from .keep_checks import check_structure_keep_drop_count, check_structure_keep_highest
from .method_checks import (
    check_method_budget_conserved,
    check_method_checkpoint_resume,
    check_method_drop_count,
    check_method_drop_keeps_highest,
    check_method_dropped_subset_of_active,
    check_method_grown_subset_of_inactive,
    check_method_grown_weights_and_state_zero,
    check_method_kept_weights_unchanged,
    check_method_mask_identity,
    check_method_no_updates_after_t_end,
    check_method_same_seed_same_masks,
    check_method_structure_holds,
    check_method_zero_drop_is_identity,
    check_preset_accepts_overrides,
)
from .profiles import check_settings
from .reinit_checks import (
    check_reinit_deterministic,
    check_reinit_finite,
    check_reinit_only_active,
)
from .state_policy_checks import (
    check_state_policy_only_tracked,
    check_state_policy_training_invariants,
)
from .structure_checks import (
    check_structure_budget,
    check_structure_budget_step,
    check_structure_keep,
    check_structure_satisfied_rejects_violations,
    check_structure_select,
    check_structure_select_idempotent,
    check_structure_validate,
)

__all__ = [
    "CHECKS",
    "CheckFailure",
    "CheckResult",
    "builtin_components",
    "check_component",
    "checks_for",
    "component_id",
    "parametrize_with_checks",
]

Check = Callable[..., None]

METHOD_CHECKS: tuple[Check, ...] = (
    check_method_budget_conserved,
    check_method_dropped_subset_of_active,
    check_method_drop_keeps_highest,
    check_method_drop_count,
    check_method_grown_subset_of_inactive,
    check_method_zero_drop_is_identity,
    check_method_structure_holds,
    check_method_mask_identity,
    check_method_grown_weights_and_state_zero,
    check_method_kept_weights_unchanged,
    check_method_no_updates_after_t_end,
    check_method_checkpoint_resume,
    check_method_same_seed_same_masks,
    check_method_compact_matches_masked,
)

# The checks of each kind of component, in the order they run.
CHECKS: dict[str, tuple[Check, ...]] = {
    "criterion": (
        check_criterion_shape_dtype_device,
        check_criterion_finite,
        check_criterion_inputs_unchanged,
        check_criterion_deterministic,
        check_criterion_no_global_rng,
        check_criterion_degenerate_inputs,
        check_criterion_capabilities_declared,
    ),
    "structure": (
        check_structure_validate,
        check_structure_budget,
        check_structure_budget_step,
        check_structure_select,
        check_structure_select_idempotent,
        check_structure_keep,
        check_structure_keep_highest,
        check_structure_keep_drop_count,
        check_structure_satisfied_rejects_violations,
    ),
    "distribution": (
        check_distribution_global_density,
        check_distribution_densities_in_range,
        check_distribution_dense_layers,
    ),
    "schedule": (check_schedule_fraction_in_range, check_method_no_updates_after_t_end),
    "format": (
        check_format_round_trip,
        check_format_linear_matches_dense,
        check_format_keeps_live_zeros,
        check_format_rejects_unsupported,
    ),
    "reinit": (check_reinit_only_active, check_reinit_finite, check_reinit_deterministic),
    "optimizer_state": (check_state_policy_only_tracked, check_state_policy_training_invariants),
    "method": METHOD_CHECKS,
    "preset": (check_preset_accepts_overrides, *METHOD_CHECKS),
}

PASSED, FAILED, XFAIL, XPASS = "passed", "failed", "expected failure", "unexpected pass"


@attrs.frozen
class CheckResult:
    """The outcome of one check on one component.

    Attributes:
        component: the component's id (see :func:`component_id`).
        check: the check's name.
        status: ``"passed"``, ``"failed"``, ``"expected failure"`` (failed, and listed in
            ``expected_failed_checks``) or ``"unexpected pass"`` (listed there, yet passed).
        examples: hypothesis examples run (those of the shrinking phase included).
        seconds: wall time.
        message: the failure, with the falsifying example (empty on a pass).
        reason: why the failure was expected (from ``expected_failed_checks``).
    """

    component: str
    check: str
    status: str
    examples: int
    seconds: float
    message: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        """A pass, or an expected failure."""
        return self.status in (PASSED, XFAIL)


class CheckFailure(AssertionError):
    """Raised by :func:`check_component` when a check fails unexpectedly or passes unexpectedly.

    ``results`` holds every :class:`CheckResult`.
    """

    def __init__(self, message: str, results: Sequence[CheckResult]) -> None:
        super().__init__(message)
        self.results = list(results)


def _schedule_method(schedule: Any) -> DSTConfig:
    """A small method that drops by ``schedule`` (for the schedule's run check)."""
    return DSTConfig(
        prune="magnitude", grow="random", drop=schedule, distribution="uniform", density=0.5
    )


def _bind(check: Check, kind: str) -> Check:
    """``check`` as it applies to a component of ``kind`` (a schedule runs inside a method)."""
    if kind == "schedule" and check is check_method_no_updates_after_t_end:

        def run_with_schedule(schedule: Any, **options: Any) -> None:
            check(_schedule_method(schedule), **options)

        run_with_schedule.__name__ = run_with_schedule.__qualname__ = check.__name__
        run_with_schedule.__doc__ = check.__doc__
        return run_with_schedule
    return check


def _without_shrinking(check: Check) -> Check:
    """``check`` without hypothesis's shrinking: an expected failure needs no minimal example."""

    def run(component: Any, **options: Any) -> None:
        with check_settings(phases=[Phase.explicit, Phase.reuse, Phase.generate]):
            check(component, **options)

    run.__name__ = run.__qualname__ = check.__name__
    run.__doc__ = check.__doc__
    return run


def checks_for(component: Any) -> list[Check]:
    """The checks that apply to ``component``, each called as ``check(component)``."""
    kind = component_kind(component)
    return [_bind(check, kind) for check in CHECKS[kind]]


def component_id(component: Any) -> str:
    """A stable id: ``<type>.<registry name>``, hyper-parameters that differ from their defaults
    in parentheses (e.g. ``structure.nm(n=1,m=8)``); the class name if unregistered."""
    kind = component_kind(component)
    if kind == "method":
        parts = [component.prune, component.grow, *component.structures]
        return "method." + "+".join(_short_name(part) for part in parts)
    entry = entry_of(component)
    base = f"{entry.type.value}.{entry.name}" if entry is not None else type(component).__name__
    if kind == "preset":
        return base if entry is not None else getattr(component, "__name__", base)
    params = non_default_fields(component)
    if params:
        base += "(" + ",".join(f"{k}={v!r}" for k, v in params.items()) + ")"
    return base.replace(" ", "")


def _short_name(component: Any) -> str:
    entry = entry_of(component)
    return entry.name if entry is not None else type(component).__name__


def builtin_components(*, include_plugins: bool = False) -> dict[str, Any]:
    """Every registered component with default parameters, by :func:`component_id`.

    Criteria, structures (neuron-level ones included), distributions, schedules, formats and
    presets (the functions). Only sparsity-core's own unless ``include_plugins``.
    """
    reg = registry()
    builtin = {info.name for info in reg.plugins if info.is_builtin}
    out: dict[str, Any] = {}
    for entry in reg.entries():
        if entry.type is ComponentType.STRATEGY:
            continue
        if not include_plugins and entry.plugin not in builtin:
            continue
        component = entry.component if entry.type is ComponentType.PRESET else entry.component()
        out[f"{entry.type.value}.{entry.name}"] = component
    return out


def _expected(
    expected_failed_checks: Mapping[str, str] | Iterable[str] | None,
    applicable: Sequence[str],
    *,
    strict: bool = True,
) -> dict[str, str]:
    """``{check: reason}`` among ``applicable``; with ``strict``, other names are an error."""
    if expected_failed_checks is None:
        return {}
    if isinstance(expected_failed_checks, Mapping):
        expected = {str(k): str(v) for k, v in expected_failed_checks.items()}
    else:
        expected = {str(name): "" for name in expected_failed_checks}
    unknown = sorted(set(expected) - set(applicable))
    if unknown and strict:
        raise ValueError(
            f"expected_failed_checks names {unknown}, which are not checks of this component; "
            f"its checks are {list(applicable)}."
        )
    return {k: v for k, v in expected.items() if k in applicable}


def _message(exc: BaseException) -> str:
    notes = getattr(exc, "__notes__", [])
    text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, AssertionError) else str(exc)
    return "\n".join([text, *notes])


def check_component(
    component: Any,
    *,
    expected_failed_checks: Mapping[str, str] | Iterable[str] | None = None,
    raise_on_failure: bool = True,
    max_examples: int | None = None,
) -> list[CheckResult]:
    """Run every check that applies to ``component`` and return one result per check.

    Args:
        component: a criterion, structure, distribution, schedule or format instance, a
            :class:`~sparsity_core.DSTConfig`, or a preset function.
        expected_failed_checks: checks known to fail, ``{name: reason}`` (or just names). Such a
            failure is reported as ``"expected failure"``; if it passes instead, that is an
            ``"unexpected pass"`` and counts as a failure (remove it from the list).
        raise_on_failure: raise :class:`CheckFailure` (an ``AssertionError``) if any check fails
            unexpectedly or passes unexpectedly.
        max_examples: hypothesis examples per check (default: from the loaded profile).
    """
    checks = checks_for(component)
    cid = component_id(component)
    expected = _expected(expected_failed_checks, [c.__name__ for c in checks])
    results = []
    for check in checks:
        name = check.__name__
        seen: list[int] = []
        token = _common._EXAMPLES.set(seen)
        start = time.perf_counter()
        try:
            check(component, max_examples=max_examples)
        except Exception as exc:
            status = XFAIL if name in expected else FAILED
            message = _message(exc)
        else:
            status = XPASS if name in expected else PASSED
            message = ""
        finally:
            _common._EXAMPLES.reset(token)
        results.append(
            CheckResult(
                cid,
                name,
                status,
                sum(seen),
                time.perf_counter() - start,
                message,
                expected.get(name, ""),
            )
        )
    bad = [r for r in results if not r.ok]
    if bad and raise_on_failure:
        lines = [f"{len(bad)} of {len(results)} checks of {cid} failed:"]
        for r in bad:
            detail = r.message or "passed, but is listed in expected_failed_checks"
            lines.append(f"- {r.check} ({r.status}): {detail}")
        raise CheckFailure("\n".join(lines), results)
    return results


def parametrize_with_checks(
    components: Sequence[Any] | Mapping[str, Any],
    *,
    expected_failed_checks: Mapping[str, str]
    | Callable[[Any], Mapping[str, str] | None]
    | None = None,
) -> Any:
    """A ``pytest.mark.parametrize("component, check", ...)`` over every applicable check.

    Test ids are ``<component>-<check>`` (e.g. ``growth.gradient-check_criterion_finite``), so
    ``pytest -k check_criterion_finite`` selects one check. The test body is
    ``check(component)``::

        @parametrize_with_checks([MyGrowth()])
        def test_my_growth(component, check):
            check(component)

    Args:
        components: components (ids from :func:`component_id`), or ``{id: component}``.
        expected_failed_checks: ``{check name: reason}`` for every component, or a function of
            the component returning that; those tests are strict ``xfail``.
    """
    import pytest

    if isinstance(components, Mapping):
        items = list(components.items())
    else:
        items = [(component_id(c), c) for c in components]
    checks = {cid: checks_for(component) for cid, component in items}
    if expected_failed_checks is not None and not callable(expected_failed_checks):
        every = sorted({c.__name__ for found in checks.values() for c in found})
        _expected(expected_failed_checks, every)  # a name no component has is a typo
    params = []
    for cid, component in items:
        names = [c.__name__ for c in checks[cid]]
        if callable(expected_failed_checks):
            expected = _expected(expected_failed_checks(component), names)
        else:
            expected = _expected(expected_failed_checks, names, strict=False)
        for check in checks[cid]:
            marks, name = (), check.__name__
            if name in expected:
                reason = expected[name] or "listed in expected_failed_checks"
                marks = (pytest.mark.xfail(reason=reason, strict=True),)
                check = _without_shrinking(check)
            params.append(pytest.param(component, check, id=f"{cid}-{name}", marks=marks))
    return pytest.mark.parametrize(("component", "check"), params)
