"""Structure-aware top-k: the one selection routine every structure builds on.

Non-finite scores (NaN, +Inf, -Inf) are the lowest priority among candidates: they are chosen
only when nothing finite is left, so a NaN gradient can never change how many weights are
selected. Ties are broken by PyTorch's ``topk``/``sort`` (deterministic on a given device).
"""

from __future__ import annotations

import torch

from .errors import UpdateError

__all__ = ["grouped_fill", "grouped_keep", "grouped_topk_mask", "priority", "topk_mask"]


def priority(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Scores as a float key: non-candidates ``-inf``, non-finite candidates the dtype's minimum."""
    key = scores.detach()
    if not key.is_floating_point():
        key = key.float()
    lowest = torch.finfo(key.dtype).min
    key = torch.where(torch.isfinite(key), key, torch.full_like(key, lowest))
    return key.masked_fill(~candidates, float("-inf"))


def topk_mask(scores: torch.Tensor, k: int, candidates: torch.Tensor) -> torch.Tensor:
    """A boolean mask shaped like ``scores`` selecting the ``k`` best ``candidates``."""
    available = int(candidates.sum())
    if not 0 <= k <= available:
        raise UpdateError(f"cannot select {k} of {available} candidate positions.")
    out = torch.zeros_like(candidates, dtype=torch.bool)
    if k == 0:
        return out
    if k == available:
        return out.copy_(candidates)
    key = priority(scores, candidates).reshape(-1)
    idx = torch.topk(key, k, sorted=False).indices
    out.view(-1)[idx] = True
    return out


def grouped_topk_mask(
    scores: torch.Tensor, k: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """Per-row top-k: row ``g`` of the 2-D ``scores`` keeps its ``k[g]`` best candidates.

    Vectorised over rows (one sort), so it costs the same for any number of groups.
    """
    if scores.dim() != 2:
        raise ValueError(f"grouped_topk_mask expects 2-D scores, got shape {tuple(scores.shape)}")
    k = k.to(device=scores.device, dtype=torch.long).reshape(-1, 1)
    available = candidates.sum(dim=1, keepdim=True)
    if bool((k < 0).any()) or bool((k > available).any()):
        bad = int(torch.nonzero((k < 0) | (k > available))[0, 0])
        raise UpdateError(
            f"cannot select {int(k[bad])} of {int(available[bad])} candidates in group {bad}."
        )
    key = priority(scores, candidates)
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(key.shape[1], device=key.device).expand_as(order))
    return ranks < k


def grouped_keep(
    scores: torch.Tensor, mask: torch.Tensor, n_drop: int, cap: torch.Tensor | None = None
) -> torch.Tensor:
    """Drop the ``n_drop`` lowest-scoring active positions, at most ``cap[g]`` from row ``g``.

    ``scores`` and ``mask`` are 2-D ``[groups, group_size]``. The caps keep every group
    refillable from its own previously inactive positions. Returns the kept mask (a subset of
    ``mask``). ``n_drop`` is reduced to what the caps allow.
    """
    keep_key = priority(scores, mask)
    # Highest drop priority first: lowest scores, and non-finite scores before everything.
    drop_key = torch.where(mask, -keep_key, torch.full_like(keep_key, float("-inf")))
    droppable = mask
    if cap is not None:
        cap = cap.to(device=scores.device, dtype=torch.long).reshape(-1, 1)
        order = torch.argsort(drop_key, dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(
            1, order, torch.arange(drop_key.shape[1], device=drop_key.device).expand_as(order)
        )
        droppable = mask & (ranks < cap)
    n_drop = min(int(n_drop), int(droppable.sum()))
    return mask & ~topk_mask(drop_key, n_drop, droppable)


def grouped_fill(
    scores: torch.Tensor, base: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Complete ``base`` so row ``g`` of the 2-D mask holds exactly ``counts[g]`` positions,
    adding the highest-scoring ``candidates``."""
    counts = counts.to(device=scores.device, dtype=torch.long)
    need = counts - base.sum(dim=1)
    if bool((need < 0).any()):
        g = int(torch.nonzero(need < 0)[0, 0])
        raise UpdateError(
            f"group {g} already holds {int(base[g].sum())} positions, more than its "
            f"{int(counts[g])}."
        )
    pool = candidates & ~base
    if scores.shape[0] == 1:
        return base | topk_mask(scores, int(need[0]), pool)
    return base | grouped_topk_mask(scores, need, pool)
