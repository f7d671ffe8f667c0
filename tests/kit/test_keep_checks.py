"""The drop checks judge any structure by its behaviour, so sound ones with any parameters pass.

The broken drops they must catch are in test_kit_catches_broken.py.
"""

from __future__ import annotations

import math

import attrs
import pytest

from sparsity_core.selection import grouped_keep
from sparsity_core.structures import compose_structures
from sparsity_core.testing import check_structure_keep_drop_count, check_structure_keep_highest
from sparsity_plugins.structure_ablation import NeuronAblation
from sparsity_plugins.structure_fan_in import ConstantFanIn
from sparsity_plugins.structure_nm import NM

EXAMPLES = 60
DROP_CHECKS = [check_structure_keep_highest, check_structure_keep_drop_count]


@attrs.frozen
class RowRoundedFanIn(ConstantFanIn):
    """A sound third-party drop: each neuron drops ``floor(fraction * its active inputs)`` of
    its lowest-scored ones (at most what it can regrow), so the layer's count is rounded once
    per neuron."""

    def keep(self, scores, mask, fraction, spec):
        rows, kept = scores.reshape(spec.fan_out, -1), mask.reshape(spec.fan_out, -1).clone()
        for r in range(spec.fan_out):
            active = int(kept[r].sum())
            n_drop = min(math.floor(fraction * active), spec.fan_in - active)
            kept[r : r + 1] = grouped_keep(rows[r : r + 1], kept[r : r + 1], n_drop)
        return kept.reshape(spec.shape)


@attrs.frozen
class DeclaredRowRoundedFanIn(RowRoundedFanIn):
    """The same drop, declaring that it may miss the layer's count by up to a weight per neuron."""

    def drop_tolerance(self, spec):
        return spec.fan_out


SOUND = [
    ConstantFanIn(),
    NM(n=1, m=8),
    NM(n=3, m=4, pad=True),
    compose_structures((NeuronAblation(), NM(pad=True))),
    compose_structures((NeuronAblation(gamma_sal=0.9), ConstantFanIn())),
    DeclaredRowRoundedFanIn(),
]


class TestSoundStructuresPass:
    """Built-ins with non-default parameters (padded N:M, ablation over each) and a sound
    third-party drop that rounds per neuron pass both drop checks."""

    @pytest.mark.parametrize("structure", SOUND, ids=repr)
    @pytest.mark.parametrize("check", DROP_CHECKS)
    def test_passes(self, check, structure):
        """No pair is traded towards the lower score and no drop count is off."""
        check(structure, max_examples=EXAMPLES)


class TestDeclaredTolerance:
    """The drop count may miss the request by less than one weight, unless the structure
    declares a larger ``drop_tolerance``."""

    def test_an_undeclared_per_neuron_rounding_fails_naming_the_attribute(self):
        """Rounding per neuron misses the layer's count by more than a weight: declare it."""
        with pytest.raises(AssertionError, match="declares drop_tolerance"):
            check_structure_keep_drop_count(RowRoundedFanIn(), max_examples=500)

    def test_an_invalid_declaration_fails_naming_it(self):
        """A tolerance below 1 is refused with the structure, the value and the layer."""

        @attrs.frozen
        class NoTolerance(ConstantFanIn):
            drop_tolerance = 0

        with pytest.raises(AssertionError, match=r"drop_tolerance gave 0 for layer"):
            check_structure_keep_drop_count(NoTolerance(), max_examples=EXAMPLES)
