"""Helpers for data-parallel training (``torch.distributed`` / DDP).

Under ``DistributedDataParallel`` no mask is ever broadcast: every rank holds the same weights,
reads the same all-reduced gradient and draws randomness from the same per-(seed, layer, step)
generator, so every rank computes the same masks. :func:`verify_masks_agree` checks that cheaply
(one 8-byte digest per layer, gathered from every rank) and names the layers that diverged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError, DistributedError

__all__ = [
    "average_across",
    "data_parallel_group",
    "mask_digest",
    "require_process_group",
    "unwrap_model",
    "verify_masks_agree",
]

# Wrappers whose ``.module`` is the user's model; unwrapping them keeps layer names (and so the
# per-layer generators and checkpoints) the same as in a single-process run.
_WRAPPERS: tuple[type[nn.Module], ...] = (
    nn.DataParallel,
    nn.parallel.DistributedDataParallel,
)


def data_parallel_group(model: nn.Module) -> Any:
    """The process group a ``DistributedDataParallel`` wrapper averages gradients over, or
    None (no wrapper: gradients are the process's own)."""
    while isinstance(model, _WRAPPERS):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model.process_group
        model = model.module
    return None


def average_across(tensors: list[torch.Tensor], group: Any) -> None:
    """Average ``tensors`` in place over the ranks of ``group``, as DDP averages gradients."""
    world = dist.get_world_size(group)
    for tensor in tensors:
        dist.all_reduce(tensor, group=group)
        tensor.div_(world)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``DataParallel`` / ``DistributedDataParallel`` wrappers (else ``model``)."""
    while isinstance(model, _WRAPPERS):
        model = model.module
    return model


def mask_digest(mask: torch.Tensor) -> int:
    """A signed 64-bit BLAKE2b digest of a boolean mask's contents (equal masks, equal digests).

    The mask is copied to the host once; the cost is one pass over ``numel`` bytes.
    """
    data = mask.detach().to(device="cpu", dtype=torch.bool).contiguous().numpy().tobytes()
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def require_process_group(group: Any = None) -> None:
    """Raise :class:`ConfigError` unless ``torch.distributed`` is initialised (for ``group``)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            "verify_ranks=True compares masks across ranks, but torch.distributed is not "
            "initialised; call torch.distributed.init_process_group() (torchrun does the "
            "rendezvous) before building the DSTScheduler, or leave verify_ranks=False."
        )
    if group is not None and dist.get_rank(group) < 0:
        raise ConfigError(
            f"this rank ({dist.get_rank()}) is not a member of process_group={group!r}; pass "
            f"the data-parallel group this rank trains in."
        )


def _collective_device(group: Any) -> torch.device:
    # NCCL moves only CUDA tensors; gloo (and mixed "cpu:gloo,cuda:nccl") takes CPU ones.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def verify_masks_agree(masks: Mapping[str, torch.Tensor], *, step: int, group: Any = None) -> None:
    """Raise :class:`DistributedError` on every rank unless all ranks hold identical masks.

    A collective: every rank of ``group`` must call it at the same point (the scheduler does so
    on every topology update). Costs one host copy and hash of each mask and one all-gather of
    ``8 * len(masks)`` bytes per rank.

    Args:
        masks: the masks by layer name (same names, in the same order, on every rank).
        step: the optimizer step, for the message.
        group: the process group (default: the world).
    """
    require_process_group(group)
    world = dist.get_world_size(group)
    if world == 1:
        return
    names = list(masks)
    device = _collective_device(group)
    local = torch.tensor([mask_digest(m) for m in masks.values()], dtype=torch.int64)
    local = local.to(device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered).cpu()  # [rank, layer]
    if table.shape[1] != len(names):  # pragma: no cover - all_gather fails first on a mismatch
        raise DistributedError(f"ranks hold different numbers of sparse layers at step {step}.")
    differs = table != table[0]
    bad_layers = torch.nonzero(differs.any(dim=0)).flatten().tolist()
    if not bad_layers:
        return
    details = "; ".join(
        f"{names[j]!r} differs on ranks {torch.nonzero(differs[:, j]).flatten().tolist()}"
        for j in bad_layers
    )
    raise DistributedError(
        f"masks diverged across ranks at step {step} (compared with rank 0): {details}. Every "
        f"rank must build the scheduler with the same config and seed from the same weights or "
        f"checkpoint, train a model wrapped in DistributedDataParallel (so gradients are "
        f"all-reduced before optimizer.step()), and use criteria that draw randomness only from "
        f"ctx.generator, never the global RNG."
    )
