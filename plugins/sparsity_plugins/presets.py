"""Built-in method presets: ``static``, ``set``, ``rigl`` and the structured ones.

RigL and SET differ only in the growth criterion; ``static`` keeps its random initial mask;
SRigL is RigL under ``(neuron_ablation, constant_fan_in)``; ``nm_rigl`` / ``nm_set`` are RigL /
SET under N:M.
"""

from __future__ import annotations

from typing import Any

import attrs

from sparsity_core import DSTConfig, hookimpl


def static(**overrides: Any) -> DSTConfig:
    """A fixed random ERK mask (the baseline every DST method must beat)."""
    base = DSTConfig(
        prune="magnitude", grow="random", distribution="erk", drop={"kind": "constant", "rate": 0.0}
    )
    return attrs.evolve(base, **overrides)


def set_(**overrides: Any) -> DSTConfig:
    """SET: drop smallest magnitudes, regrow at random, a constant fraction 0.3 (SET's zeta)
    at every update, ERK (Mocanu et al. 2018 keep the fraction fixed; RigL decays it)."""
    base = DSTConfig(
        prune="magnitude",
        grow="random",
        distribution="erk",
        drop={"kind": "constant", "rate": 0.3},
        delta_t=100,
    )
    return attrs.evolve(base, **overrides)


def rigl(**overrides: Any) -> DSTConfig:
    """RigL: drop smallest magnitudes, regrow largest dense gradients (cosine, ERK, ΔT=100)."""
    base = DSTConfig(
        prune="magnitude",
        grow="gradient",
        distribution="erk",
        drop={"kind": "cosine", "alpha": 0.3},
        delta_t=100,
    )
    return attrs.evolve(base, **overrides)


def srigl(**overrides: Any) -> DSTConfig:
    """SRigL: RigL with constant fan-in and neuron ablation (gamma_sal = 0.3; the output
    layer is never ablated), the initial weights rescaled for each neuron's sparse fan-in
    (``reinit="sparse_fan_in"``, as the SRigL authors' code initialises)."""
    return rigl(
        **{
            "structures": ("neuron_ablation", "constant_fan_in"),
            "reinit": "sparse_fan_in",
            **overrides,
        }
    )


def srigl_no_ablation(**overrides: Any) -> DSTConfig:
    """SRigL without neuron ablation: RigL with constant fan-in (and SRigL's sparse-aware
    initial scaling)."""
    return rigl(**{"structures": ("constant_fan_in",), "reinit": "sparse_fan_in", **overrides})


NM_GROUP_SIZES = (4, 8, 16, 32)


def nm_for_density(density: float) -> dict[str, int]:
    """The N:M pattern closest to ``density`` with M in 4, 8, 16, 32 (2:4 at 0.5).

    Ties go to the smaller M. E.g. 0.5 -> 2:4, 0.25 -> 1:4, 0.1 -> 3:32 (0.094).
    """
    best = None
    for m in NM_GROUP_SIZES:
        n = max(1, round(density * m))
        error = abs(n / m - density)
        if n <= m and (best is None or error < best[0] - 1e-12):
            best = (error, n, m)
    return {"kind": "nm", "n": best[1], "m": best[2]}


def _nm(base_preset, overrides: dict[str, Any]) -> DSTConfig:
    density = overrides.pop("density", 0.5)
    structures = overrides.pop("structures", (nm_for_density(density),))
    nm = [s for s in DSTConfig(structures=structures).structures if hasattr(s, "m")]
    fixed = nm[0].n / nm[0].m if nm else density
    return base_preset(
        **{"structures": structures, "distribution": "uniform", "density": fixed, **overrides}
    )


def nm_rigl(**overrides: Any) -> DSTConfig:
    """RigL under N:M (2:4 by default). ``density`` picks the nearest N:M (see nm_for_density);
    the config's density is that pattern's N/M."""
    return _nm(rigl, overrides)


def nm_set(**overrides: Any) -> DSTConfig:
    """SET under N:M (2:4 by default), like :func:`nm_rigl`."""
    return _nm(set_, overrides)


@hookimpl
def sparsity_register_presets(register) -> None:
    register("static", static, summary="fixed random ERK mask, no topology updates")
    register("set", set_, summary="magnitude prune + random growth (SET)")
    register("rigl", rigl, summary="magnitude prune + gradient growth (RigL)")
    register("srigl", srigl, summary="RigL + constant fan-in + neuron ablation (SRigL)")
    register("srigl_no_ablation", srigl_no_ablation, summary="RigL + constant fan-in")
    register("nm_rigl", nm_rigl, summary="RigL under N:M (2:4; nearest N:M for other densities)")
    register("nm_set", nm_set, summary="SET under N:M (2:4; nearest N:M for other densities)")
