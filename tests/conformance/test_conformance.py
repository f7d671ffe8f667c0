"""Dogfooding: every registered built-in component and preset passes the public testing kit.

One test per component and check, with ids ``<type>.<name>-<check>``: e.g.
``pytest tests/conformance -k "structure.nm-"`` or ``-k check_method_checkpoint_resume``.
"""

from __future__ import annotations

from sparsity_core.registry import ComponentType, get_registry
from sparsity_core.testing import builtin_components, component_id, parametrize_with_checks

BUILTINS = builtin_components()

# Known failures of built-ins, ``{component id: {check: reason}}`` (strict: fixing one makes its
# test fail until the entry is removed). None at present.
EXPECTED_FAILURES: dict[str, dict[str, str]] = {}


@parametrize_with_checks(
    BUILTINS,
    expected_failed_checks=lambda component: EXPECTED_FAILURES.get(component_id(component)),
)
def test_builtin_passes_the_kit(component, check):
    """Each applicable check passes on each built-in (criteria, structures, distributions,
    schedules, formats, and presets as whole methods)."""
    check(component)


def test_every_builtin_is_checked():
    """Every component the built-in plugins register (strategies aside) is in the conformance
    run, under its type and name."""
    registry = get_registry()
    builtin = {info.name for info in registry.plugins if info.is_builtin}
    expected = {
        f"{e.type.value}.{e.name}"
        for e in registry.entries()
        if e.plugin in builtin and e.type is not ComponentType.STRATEGY
    }
    assert set(BUILTINS) == expected
    assert {cid.split(".")[0] for cid in BUILTINS} == {
        t.value for t in ComponentType if t is not ComponentType.STRATEGY
    }
