"""Per-(seed, layer, step) random generators: reproducible, resumable, identical on every rank."""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "make_generator"]


def derive_seed(seed: int, fqn: str, step: int, purpose: str) -> int:
    """A 63-bit seed that depends only on its arguments (not on Python's salted ``hash``)."""
    digest = hashlib.blake2b(
        f"{int(seed)}\x1f{fqn}\x1f{int(step)}\x1f{purpose}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_generator(
    seed: int, fqn: str, step: int, purpose: str, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A fresh generator on ``device`` seeded from (seed, layer, step, purpose)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, fqn, step, purpose))
    return gen
