"""The public testing kit: invariant checks for components and runs, and hypothesis strategies.

``sparsity_core.testing.strategies`` needs ``hypothesis`` (a test dependency) and is imported
explicitly; the checks here need only torch.
"""

from .component_checks import (
    check_criterion_scores,
    check_distribution,
    check_drop_schedule,
    check_structure_budget,
    check_structure_fill,
    check_structure_keep,
)
from .run_checks import (
    check_checkpoint_resume,
    check_method_run,
    check_same_seed_same_masks,
    check_zero_drop_is_identity,
)

__all__ = [
    "check_checkpoint_resume",
    "check_criterion_scores",
    "check_distribution",
    "check_drop_schedule",
    "check_method_run",
    "check_same_seed_same_masks",
    "check_structure_budget",
    "check_structure_fill",
    "check_structure_keep",
    "check_zero_drop_is_identity",
]
