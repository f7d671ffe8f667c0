"""Break one built-in in-process, then run the property tests that must catch it.

Not collected by pytest (no ``test_`` prefix); run it by hand to see a suite fail:

    python tests/kit/break_builtins.py fill_ignores_candidates   # unstructured regrows dropped
    python tests/kit/break_builtins.py no_optimizer_reset        # stale momentum at grown weights
    python tests/kit/break_builtins.py nm_off_by_one             # one group N+1, another N-1
    python tests/kit/break_builtins.py random_growth_global_rng  # SET growth ignores the generator

Each prints pytest's failures and exits non-zero; the unbroken suite passes.
"""

from __future__ import annotations

import sys

import pytest
import torch

CASES = (
    "fill_ignores_candidates",
    "no_optimizer_reset",
    "nm_off_by_one",
    "random_growth_global_rng",
)
CONFORMANCE = "tests/conformance/test_conformance.py"


def _break(case: str) -> list[str]:
    """Patch the named built-in and return the pytest arguments that should now fail."""
    quiet = ["-x", "-q", "-p", "no:cacheprovider"]
    if case == "fill_ignores_candidates":
        from sparsity_core.selection import topk_mask
        from sparsity_plugins import structure_unstructured

        def fill(self, scores, base, candidates, budget, spec, **kwargs):
            return base | topk_mask(scores, budget - int(base.sum()), ~base)

        structure_unstructured.Unstructured.fill = fill
        target = "EveryPruneGrowth or structure.unstructured-check_structure_select"
        return ["tests/unit/test_properties.py", CONFORMANCE, "-k", target, *quiet]
    if case == "no_optimizer_reset":
        import sparsity_core.engine as engine

        engine.reset_state_at = lambda *args, **kwargs: None
        return ["tests/unit/test_optimizer_state.py", *quiet]
    if case == "nm_off_by_one":
        from sparsity_plugins import structure_nm

        original = structure_nm.NM.group_counts

        def group_counts(self, spec, budget, device, active_rows=None):
            counts = original(self, spec, budget, device, active_rows).clone()
            if counts.numel() > 1 and budget != spec.numel:
                counts[0] += 1
                counts[1] -= 1
            return counts

        structure_nm.NM.group_counts = group_counts
        target = "nm or NM or structure.nm-check_structure_select"
        return ["tests/unit/test_structures.py", CONFORMANCE, "-k", target, *quiet]
    if case == "random_growth_global_rng":
        from sparsity_plugins import growth_criteria

        def scores(self, ctx):
            return torch.rand(ctx.weight.shape, device=ctx.weight.device)

        growth_criteria.RandomGrowth.scores = scores
        return [CONFORMANCE, "-k", "growth.random-", *quiet]
    raise SystemExit(f"unknown case {case!r}; choose one of {CASES}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python {sys.argv[0]} {{{','.join(CASES)}}}")
    sys.exit(pytest.main(_break(sys.argv[1])))
