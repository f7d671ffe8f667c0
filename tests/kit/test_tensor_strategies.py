"""The tensor strategies: failing examples shrink to small, simple tensors, and the drawn values
keep the patterns (ties, zeros, NaN and Inf, live zeros) and dtypes the strategies promise."""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st

from sparsity_core import LayerSpec
from sparsity_core.testing import strategies as sst

# Deterministic searches: the same minimal example on every run and machine.
SHRINK = settings(database=None, derandomize=True, max_examples=200)
LINEAR = LayerSpec("layer", (4, 4), "Linear")
SIDES = st.tuples(st.integers(1, 8), st.integers(1, 8))


def _minimal(strategy, condition):
    """The simplest value of ``strategy`` for which ``condition`` holds, as hypothesis finds it."""
    return find(strategy, condition, settings=SHRINK)


def _draws(strategy, count=100):
    """``count`` values of ``strategy``, generated (not shrunk) deterministically."""
    out = []

    @settings(max_examples=count, database=None, derandomize=True, phases=[Phase.generate])
    @given(strategy)
    def collect(value):
        out.append(value)

    collect()
    return out


def _nonzero(tensor):
    return tensor[tensor != 0].tolist()


class TestFailuresShrinkToSimpleTensors:
    """A property that fails on a drawn tensor reports a small tensor of simple values."""

    def test_scores_above_half_shrink_to_a_single_one(self):
        """The property "no score exceeds 0.5" on 8x8 scores fails on zeros but for one 1.0."""
        minimal = _minimal(sst.scores((8, 8)), lambda t: bool((t > 0.5).any()))
        assert minimal.shape == (8, 8)
        assert _nonzero(minimal) == [1.0]

    def test_scores_of_a_drawn_shape_shrink_to_one_element(self):
        """With the shape drawn too, the shape shrinks to 1x1 and the value to 1.0."""
        minimal = _minimal(sst.scores(SIDES), lambda t: bool((t > 0.5).any()))
        assert minimal.tolist() == [[1.0]]

    def test_a_large_sum_shrinks_to_few_small_integers(self):
        """The property "scores sum to at most 5" fails on 2, 3 and at most one tiny value."""
        minimal = _minimal(sst.scores((4, 4), ties=False), lambda t: float(t.sum()) > 5)
        values = sorted(_nonzero(minimal))
        assert len(values) <= 3 and values[-2:] == [2.0, 3.0]

    def test_nonfinite_scores_shrink_to_one_nan(self):
        """The property "no NaN" fails on zeros and one NaN, not a tensor full of NaN and Inf."""
        minimal = _minimal(sst.scores((3, 3), nonfinite=True), lambda t: bool(t.isnan().any()))
        assert int(minimal.isnan().sum()) == 1
        assert not bool(minimal[~minimal.isnan()].any())

    def test_a_mask_active_at_index_zero_shrinks_to_that_position_alone(self):
        """The property "inactive at index 0" fails on a mask active there only."""
        minimal = _minimal(sst.masks(LINEAR), lambda m: bool(m.flatten()[0]))
        assert minimal.flatten().nonzero().flatten().tolist() == [0]

    def test_masks_shrink_to_their_first_positions(self):
        """The property "at most two active positions" fails on the first three active."""
        minimal = _minimal(sst.masks(LINEAR), lambda m: int(m.sum()) >= 3)
        assert minimal.flatten().nonzero().flatten().tolist() == [0, 1, 2]

    def test_weights_shrink_to_zeros_but_one_live_weight(self):
        """The property "no live weight exceeds 0.5 in size" fails on one live 1.0 among zeros."""
        mask = torch.tensor([[True, False], [False, True]])
        minimal = _minimal(
            sst.weights((2, 2), mask=mask, inactive="random"),
            lambda w: bool((w[mask].abs() > 0.5).any()),
        )
        assert _nonzero(minimal) == [1.0] and bool(mask[minimal != 0].all())

    def test_score_contexts_shrink_to_a_one_weight_layer(self):
        """A context whose gradient exceeds 0.5 shrinks to a 1x1 layer with gradient 1.0."""
        layers = sst.layer_specs(layer_types="Linear")  # any layer type shrinks so, but slower
        minimal = _minimal(sst.score_contexts(layers), lambda c: bool((c.grad > 0.5).any()))
        assert minimal.spec.shape == (1, 1)
        assert minimal.grad.tolist() == [[1.0]]
        assert minimal.weight.tolist() == [[0.0]]

    def test_the_falsifying_example_reported_by_given_is_the_shrunk_one(self):
        """Under @given, the failure is raised on the minimal example (one 1.0 among zeros)."""
        seen = []

        @SHRINK
        @given(sst.scores((4, 4)))
        def no_score_above_half(scores):
            seen.append(scores)
            assert not bool((scores > 0.5).any())

        with pytest.raises(AssertionError) as info:
            no_score_above_half()
        report = "\n".join(getattr(info.value, "__notes__", []))  # "Falsifying example: ..."
        assert "no_score_above_half(" in report and "scores=tensor(" in report
        assert _nonzero(seen[-1]) == [1.0]  # the reported example is the last one run

    def test_tensors_above_the_drawn_size_shrink_only_their_seed(self):
        """Above 256 elements the values come from a seed: the minimal example stays random."""
        minimal = _minimal(sst.scores((16, 17), ties=False), lambda t: bool((t > 0.5).any()))
        assert len(_nonzero(minimal)) > 200


class TestDrawnValues:
    """Drawn tensors hold the values, patterns and dtypes each strategy documents."""

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
    @pytest.mark.parametrize("shape", [(3, 5), (20, 20)], ids=["drawn", "seeded"])
    def test_scores_and_weights_have_the_requested_dtype(self, dtype, shape):
        """Both the drawn (small) and the seeded (large) path give tensors of ``dtype``."""
        for scores in _draws(sst.scores(shape, nonfinite=st.booleans(), dtype=dtype), 20):
            assert scores.dtype == dtype and tuple(scores.shape) == shape
        for weight in _draws(sst.weights(shape, dtype=dtype), 20):
            assert weight.dtype == dtype and bool(weight.isfinite().all())

    def test_finite_scores_lie_in_the_open_interval_four(self):
        """Without ``nonfinite``, scores are finite and within (-4, 4)."""
        for scores in _draws(sst.scores(SIDES)):
            assert bool(scores.isfinite().all()) and float(scores.abs().max()) < 4

    def test_scores_without_ties_are_distinct(self):
        """``ties=False`` draws tensors without repeated values (collisions are rare)."""
        draws = _draws(sst.scores((8, 8), ties=False))
        distinct = sum(scores.unique().numel() == scores.numel() for scores in draws)
        assert distinct >= 0.9 * len(draws)

    def test_ties_and_zeros_are_drawn_often(self):
        """``ties=True`` (the default) often draws many equal values and all-zero tensors."""
        draws = _draws(sst.scores((6, 6)))
        tied = sum(scores.unique().numel() <= 4 for scores in draws)
        zeros = sum(not bool(scores.any()) for scores in draws)
        assert tied >= 0.25 * len(draws) and zeros >= 0.05 * len(draws)

    def test_nonfinite_scores_hold_nan_and_inf_often(self):
        """``nonfinite=True`` puts NaN, +Inf and -Inf in most tensors."""
        draws = _draws(sst.scores((6, 6), nonfinite=True))
        nan = sum(bool(s.isnan().any()) for s in draws)
        both_inf = sum(bool(s.isposinf().any() and s.isneginf().any()) for s in draws)
        assert nan >= 0.5 * len(draws) and both_inf >= 0.4 * len(draws)

    @pytest.mark.parametrize("shape", [(4, 6), (20, 20)], ids=["drawn", "seeded"])
    def test_weights_hold_live_zeros_and_the_requested_inactive_values(self, shape):
        """Live zeros are common; inactive positions are 0, or all non-finite if asked."""
        mask = torch.zeros(shape, dtype=torch.bool)
        mask.view(-1)[::2] = True
        zero = _draws(sst.weights(shape, mask=mask), 100)
        assert all(not bool(w[~mask].any()) for w in zero)
        assert sum(bool((w[mask] == 0).any()) for w in zero) >= 0.5 * len(zero)
        for w in _draws(sst.weights(shape, mask=mask, inactive="nonfinite"), 50):
            assert not bool(w[~mask].isfinite().any()) and bool(w[mask].isfinite().all())

    @pytest.mark.parametrize("shape", [(4, 6), (20, 20)], ids=["drawn", "seeded"])
    def test_masks_hold_exactly_their_budget(self, shape):
        """A mask has exactly ``budget`` active positions, spread over the layer."""
        spec = LayerSpec("layer", shape, "Linear")
        budget = spec.numel // 3
        draws = _draws(sst.masks(spec, budget=budget), 50)
        assert all(int(m.sum()) == budget for m in draws)
        assert bool(torch.stack(draws).any(dim=0).all())  # every position is drawn active
