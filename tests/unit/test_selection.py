"""``topk_mask``: the k best candidates, on every path (small layers, few candidates, few
winners among many candidates), with NaN scores last and ties kept to the count."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsity_core import selection
from sparsity_core.errors import UpdateError
from sparsity_core.selection import priority, row_counts, topk_mask


def check_topk(scores: torch.Tensor, k: int, candidates: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` holds exactly k candidates, none ranked below a candidate left out."""
    if out.dtype != torch.bool or out.shape != candidates.shape:
        raise AssertionError(f"expected a bool mask shaped {tuple(candidates.shape)}")
    if bool((out & ~candidates).any()):
        raise AssertionError("selected a non-candidate")
    if int(out.sum()) != k:
        raise AssertionError(f"selected {int(out.sum())} positions, not {k}")
    key = priority(scores, candidates)
    left = candidates & ~out
    if bool(out.any()) and bool(left.any()) and float(key[out].min()) < float(key[left].max()):
        raise AssertionError(
            f"a left-out candidate (key {float(key[left].max())}) beats a selected one "
            f"(key {float(key[out].min())})"
        )


def _layer(n: int, cand_fraction: float, ties: float, nans: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, generator=gen)
    u = torch.rand(n, generator=gen)
    scores[u < ties] = 0.0  # a block of exactly tied scores (dead units' zero gradients)
    scores[torch.rand(n, generator=gen) < nans] = float("nan")
    candidates = torch.rand(n, generator=gen) < cand_fraction
    return scores.reshape(-1, 256), candidates.reshape(-1, 256)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.sampled_from([1, 3, 256, 300, 1200]),
    cand_fraction=st.sampled_from([0.02, 0.1, 0.3, 0.9, 1.0]),
    k_fraction=st.sampled_from([0.0, 0.001, 0.03, 0.2, 0.7, 1.0]),
    ties=st.sampled_from([0.0, 0.5]),
    nans=st.sampled_from([0.0, 0.01]),
    seed=st.integers(0, 2**16),
)
def test_topk_mask_selects_the_best_candidates(rows, cand_fraction, k_fraction, ties, nans, seed):
    # 300 and 1200 rows of 256 are past the size where the compacting paths start.
    scores, candidates = _layer(rows * 256, cand_fraction, ties, nans, seed)
    k = int(k_fraction * int(candidates.sum()))
    out = topk_mask(scores, k, candidates)
    check_topk(scores, k, candidates, out)


@pytest.mark.parametrize(
    ("cand_fraction", "k_fraction"),
    [(0.1, 0.3), (0.9, 0.03), (0.9, 0.001), (0.5, 0.5)],
    ids=["few-candidates", "few-winners", "very-few-winners", "plain"],
)
def test_topk_mask_matches_a_whole_layer_topk(cand_fraction, k_fraction):
    # Distinct scores: every path must select exactly what one topk over the layer selects.
    scores, candidates = _layer(1024 * 256, cand_fraction, 0.0, 0.0, 7)
    k = int(k_fraction * int(candidates.sum()))
    expected = torch.zeros(candidates.numel(), dtype=torch.bool)
    expected[torch.topk(priority(scores, candidates).reshape(-1), k).indices] = True
    assert torch.equal(topk_mask(scores, k, candidates).reshape(-1), expected)


def test_topk_mask_rejects_more_than_available():
    scores, candidates = _layer(512, 0.5, 0.0, 0.0, 0)
    with pytest.raises(UpdateError, match="cannot select"):
        topk_mask(scores, int(candidates.sum()) + 1, candidates)


def _unguarded(key, k, candidates, available):
    # Broken on purpose: trusts a threshold from a sample without checking that k keys reach
    # it (and aims at half the winners), so it returns too few.
    threshold = torch.topk(key[::64], max(1, k // 128), sorted=False).values.min()
    pos = (key >= threshold).nonzero().squeeze(1)
    return pos[torch.topk(key[pos], min(k, pos.numel()), sorted=False).indices]


def _first_k(key, k, candidates, available):
    # Broken on purpose: the right count, but the first k candidates rather than the best.
    return candidates.nonzero().squeeze(1)[:k]


@pytest.mark.parametrize("broken", [_unguarded, _first_k])
def test_check_topk_catches_a_broken_selection(monkeypatch, broken):
    """The property above can fail: a selector that trusts its sample is caught."""
    monkeypatch.setattr(selection, "_topk_indices", broken)
    scores, candidates = _layer(600 * 256, 0.9, 0.0, 0.0, 3)
    k = int(0.03 * int(candidates.sum()))
    with pytest.raises(AssertionError):
        check_topk(scores, k, candidates, topk_mask(scores, k, candidates))


@given(
    st.integers(1, 40),
    st.sampled_from([1, 7, 8, 64, 72, 2040, 2048, 2056, 4096]),
    st.floats(0.0, 1.0),
    st.integers(0, 2**31 - 1),
)
def test_row_counts_matches_a_plain_sum(rows, cols, density, seed):
    """Every path of row_counts (the byte sum, and the 64-bit word sums of rows whose length
    is a multiple of 8, chunked below and above 255 words) counts exactly."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=gen) < density
    assert torch.equal(row_counts(mask), mask.sum(dim=1))
    full = torch.ones(rows, cols, dtype=torch.bool)
    assert torch.equal(row_counts(full), torch.full((rows,), cols))
    assert torch.equal(row_counts(mask.t().contiguous().t()), mask.sum(dim=1))  # a strided view


@given(
    st.lists(st.integers(1, 70), min_size=1, max_size=3),
    st.sampled_from([0.0, 1e-3, 0.5]),
    st.integers(0, 2**31 - 1),
    st.booleans(),
)
def test_any_set_matches_any(shape, density, seed, transpose):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(*shape, generator=gen) < density
    if transpose and mask.dim() > 1:
        mask = mask.transpose(0, -1)  # not contiguous: the plain path
    assert selection.any_set(mask) == bool(mask.any())
    one = torch.zeros(*shape, dtype=torch.bool)
    one.view(-1)[-1] = True  # the last position alone, in the last word
    assert selection.any_set(one)
