"""sparsity-explore passes sparsity-core's testing kit, alone and mixed with structures."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from sparsity_explore import ExploreGrowth, FloorFanIn, RelativeMagnitudePrune, dst_ee

from sparsity_core.testing import check_method_run, parametrize_with_checks
from sparsity_core.testing import strategies as sst


@parametrize_with_checks(
    {
        "growth.explore": ExploreGrowth(),
        "growth.explore(c=0)": ExploreGrowth(c=0.0),
        "prune.relative_magnitude": RelativeMagnitudePrune(),
        "preset.dst_ee": dst_ee,
        "method.dst_ee+srigl": dst_ee(structures=("neuron_ablation", "constant_fan_in")),
        "method.dst_ee+nm": dst_ee(structures=("nm",), distribution="uniform", density=0.5),
        "structure.floor_fan_in": FloorFanIn(),
        "structure.floor_fan_in(min_k=5)": FloorFanIn(min_k=5),
        "method.dst_ee+ablation+floor_fan_in": dst_ee(
            structures=("neuron_ablation", FloorFanIn(min_k=3))
        ),
    },
    expected_failed_checks=lambda component: (
        # By design: where round(density * fan_in) < min_k the floor keeps more than the density.
        {"check_structure_budget": "k never falls below min_k"}
        if isinstance(component, FloorFanIn)
        else None
    ),
)
def test_passes_the_kit(component, check):
    """Every check of the kit: criteria alone, the preset, and the preset under structures."""
    check(component)


@given(
    config=sst.method_configs(
        prune="relative_magnitude",
        grow="explore",  # drawn with varying c, from the strategy this plugin registers
        structures=st.sampled_from(
            [("unstructured",), ("constant_fan_in",), ("neuron_ablation", "constant_fan_in")]
        ),
    ),
    data=st.data(),
)
def test_every_invariant_holds_with_any_bonus_and_structure(config, data):
    """Whole runs with any exploration weight c and any fan-in structure keep every invariant."""
    run = data.draw(sst.runs(config), label="run")
    assert check_method_run(config, **run.kwargs()).history
