"""The public testing kit: one ``check_<invariant>`` per invariant, and ways to run them all.

* :func:`check_component` runs every check that applies to a component (no pytest needed);
  :func:`parametrize_with_checks` turns them into pytest tests with ids
  ``<component>-<check>``.
* Checks by kind: criteria (``check_criterion_*``), structures (``check_structure_*``),
  distributions (``check_distribution_*``), schedules (``check_schedule_*``), formats
  (``check_format_*``), whole methods (``check_method_*``) and presets
  (``check_preset_accepts_overrides``). Each draws its inputs with hypothesis.
* :func:`check_method_run` and :func:`check_checkpoint_resume` check a run on your own model.
* :mod:`sparsity_core.testing.strategies`: the hypothesis strategies;
  :mod:`sparsity_core.testing.profiles`: the ``dev`` and ``ci`` profiles;
  :mod:`sparsity_core.testing.models`: the tiny models the run checks train.

The kit needs ``hypothesis`` and ``pytest`` (``pip install sparsity-core[test]``). See
``docs/testing.md`` for the list of checks.
"""

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
from .reinit_checks import (
    check_reinit_deterministic,
    check_reinit_finite,
    check_reinit_only_active,
)
from .run_checks import (
    check_checkpoint_resume,
    check_method_run,
    check_same_seed_same_masks,
    check_zero_drop_is_identity,
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
    nm_violation,
)
from .suite import (
    CHECKS,
    CheckFailure,
    CheckResult,
    builtin_components,
    check_component,
    checks_for,
    component_id,
    parametrize_with_checks,
)

__all__ = [
    "CHECKS",
    "CheckFailure",
    "CheckResult",
    "builtin_components",
    "check_checkpoint_resume",
    "check_component",
    "check_criterion_capabilities_declared",
    "check_criterion_degenerate_inputs",
    "check_criterion_deterministic",
    "check_criterion_finite",
    "check_criterion_inputs_unchanged",
    "check_criterion_no_global_rng",
    "check_criterion_shape_dtype_device",
    "check_distribution_dense_layers",
    "check_distribution_densities_in_range",
    "check_distribution_global_density",
    "check_format_keeps_live_zeros",
    "check_format_linear_matches_dense",
    "check_format_rejects_unsupported",
    "check_format_round_trip",
    "check_method_budget_conserved",
    "check_method_checkpoint_resume",
    "check_method_compact_matches_masked",
    "check_method_drop_count",
    "check_method_drop_keeps_highest",
    "check_method_dropped_subset_of_active",
    "check_method_grown_subset_of_inactive",
    "check_method_grown_weights_and_state_zero",
    "check_method_kept_weights_unchanged",
    "check_method_mask_identity",
    "check_method_no_updates_after_t_end",
    "check_method_run",
    "check_method_same_seed_same_masks",
    "check_method_structure_holds",
    "check_method_zero_drop_is_identity",
    "check_preset_accepts_overrides",
    "check_reinit_deterministic",
    "check_reinit_finite",
    "check_reinit_only_active",
    "check_same_seed_same_masks",
    "check_schedule_fraction_in_range",
    "check_state_policy_only_tracked",
    "check_state_policy_training_invariants",
    "check_structure_budget",
    "check_structure_budget_step",
    "check_structure_keep",
    "check_structure_keep_drop_count",
    "check_structure_keep_highest",
    "check_structure_satisfied_rejects_violations",
    "check_structure_select",
    "check_structure_select_idempotent",
    "check_structure_validate",
    "check_zero_drop_is_identity",
    "checks_for",
    "component_id",
    "nm_violation",
    "parametrize_with_checks",
]
