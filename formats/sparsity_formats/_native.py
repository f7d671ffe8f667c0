"""The compiled CPU kernels of the packed formats: built on first use, cached, optional.

``condensed_linear()`` returns the compiled function, or ``None``. It is a Python binding of the
kernel, which is also registered as the operator ``torch.ops.sparsity_formats.condensed_linear``
(for code that must go through the dispatcher). The first call in a process compiles
``csrc/condensed_cpu.cpp`` as a torch C++ extension (the system's gcc/g++; ninja from the
``ninja`` package on PyPI, a dependency, or from the system; torch's own headers; about 2 minutes
on two cores here) into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``); later processes load the cached library in well under a second.
The build is keyed by the source, the flags and the CPU's vector capability, so a change to any
of them rebuilds.

The kernels are compiled once per instruction set (AVX-512, AVX2+FMA+F16C, portable) and the
widest one the CPU has is chosen when the library loads; ``SPARSITY_CORE_ISA`` picks another
(see :mod:`sparsity_core.native`), ``kernel_isas().set_isa(name)`` switches at run time.

When the build fails (no compiler, no ninja, a non-x86 CPU without the flags, ...) the formats
fall back to their pure-PyTorch kernels, which give the same results, and one
:class:`NativeKernelWarning` says why. ``SPARSITY_CORE_NATIVE=0`` skips the compiled kernels.

``python -m sparsity_formats._native`` builds (or loads) the kernels and prints the build time.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from sparsity_core.native import CSRC, apply_isa_choice, ninja_on_path

__all__ = ["NativeKernelWarning", "condensed_linear", "kernel_isas", "native_status"]

_SOURCE = Path(__file__).with_name("csrc") / "condensed_cpu.cpp"
_BODY = _SOURCE.with_name("condensed_body.inc")
_DISABLE_ENV = "SPARSITY_CORE_NATIVE"
_lock = threading.Lock()
_state: dict[str, Any] = {"tried": False, "op": None, "error": None, "seconds": None}


class NativeKernelWarning(RuntimeWarning):
    """The compiled kernels could not be built; the pure-PyTorch kernels are used instead."""


def _flags() -> tuple[str, list[str]]:
    """The capability tag and compiler flags for this CPU. The kernels are compiled once per
    instruction set inside the library (``#pragma GCC target``) and the widest one the CPU has
    is chosen when it loads, so no flag ties the build to the machine that made it."""
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    if not (platform.machine() in ("x86_64", "AMD64") and capability in ("AVX2", "AVX512")):
        capability = "generic"
    return capability.lower(), ["-O3", "-fopenmp"]


def _disabled() -> bool:
    return os.environ.get(_DISABLE_ENV, "1").strip().lower() in ("0", "off", "false", "no")


def _build() -> None:
    from torch.utils.cpp_extension import load

    capability, flags = _flags()
    sources = _SOURCE.read_bytes() + _BODY.read_bytes() + (CSRC / "isa_select.h").read_bytes()
    digest = hashlib.sha256(sources + " ".join(flags).encode()).hexdigest()[:10]
    name = f"sparsity_formats_{capability}_{digest}"
    start = time.perf_counter()
    with ninja_on_path():
        module = load(
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(_SOURCE.parent), str(CSRC)],
            is_python_module=True,
            verbose=False,
        )
    _state["seconds"] = time.perf_counter() - start
    # The module's binding, not torch.ops.sparsity_formats.condensed_linear: the operator's
    # boxed dispatch cost about 5 us more a call here (a twelfth of a batch-1 (3072, 768) layer).
    _state["op"] = module.condensed_linear
    _state["module"] = module


def _ensure() -> None:
    if _state["tried"]:
        return
    with _lock:
        if _state["tried"]:
            return
        try:
            _build()
        except Exception as exc:  # any build or load failure: fall back, say why once
            _state["error"] = f"{type(exc).__name__}: {str(exc).strip()[-600:]}"
            warnings.warn(
                "sparsity_formats: the compiled CPU kernels could not be built, so the formats "
                f"use their pure-PyTorch kernels (same results, slower). Reason: "
                f"{_state['error']}. Install gcc/g++ (and ninja: pip install ninja) to build "
                f"them, or set {_DISABLE_ENV}=0 to skip the attempt.",
                NativeKernelWarning,
                stacklevel=3,
            )
        finally:
            _state["tried"] = True
        if _state.get("module") is not None:
            # Outside the build's try: a warning about the choice must not discard the module.
            apply_isa_choice(_state["module"], "the condensed kernel")


def condensed_linear() -> Any | None:
    """The compiled condensed kernel, or ``None`` (disabled, or it could not be built).

    It is called as ``f(x, values, cols, rows, bias, in_features, out_features)``: ``x``
    ``[batch, in_features]``; ``values`` and ``cols`` ``[active, k]``; ``rows`` the active output
    neurons (int64), or empty when every neuron is active; ``bias`` ``[out_features]`` or empty.
    It returns ``y`` in ``x``'s dtype, or ``None`` where the kernel does not apply (another
    shape, device or dtype, an autograd graph to record, tracing, vmap, a dispatch mode or a
    tensor subclass), and the caller then computes the product itself. The operator
    ``torch.ops.sparsity_formats.condensed_linear(x, values, cols, rows, bias, out_features)``
    (float32 output, no such checks) is registered by the same build.

    ``SPARSITY_CORE_NATIVE`` is read once, at the first call in the process (reading the
    environment on every call cost about 2.5 us of a 100 us batch-1 layer).
    """
    disabled = _state.get("disabled")
    if disabled is None:
        disabled = _state["disabled"] = _disabled()
    if disabled:
        return None
    if not _state["tried"]:
        _ensure()
    return _state["op"]


def kernel_isas() -> Any | None:
    """The loaded extension's ISA controls (``available_isas()``, ``isa()``, ``set_isa(name)``
    for side-by-side measurements), or None when the kernels are not built."""
    if condensed_linear() is None:
        return None
    return _state.get("module")


def native_status() -> dict[str, Any]:
    """Whether the kernels are available, the build/load time, and the error if any."""
    op = condensed_linear()
    capability, flags = _flags()
    module = _state.get("module")
    return {
        "isa": module.isa() if module is not None else None,
        "available_isas": list(module.available_isas()) if module is not None else [],
        "available": op is not None,
        "disabled": bool(_state.get("disabled")),
        "seconds": _state["seconds"],
        "capability": capability,
        "flags": flags,
        "error": _state["error"],
    }


if __name__ == "__main__":
    import json

    print(json.dumps(native_status(), indent=2))
