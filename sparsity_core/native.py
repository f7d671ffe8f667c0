"""Compiled CPU extensions, built on first use, cached, optional.

:class:`NativeExtension` builds one C++ source as a torch extension the first time a process
asks for it (the system's gcc/g++; ninja from the ``ninja`` package on PyPI, a dependency, or
from the system; torch's own headers) into torch's extension cache (``$TORCH_EXTENSIONS_DIR``,
by default ``~/.cache/torch_extensions``); later processes load the cached library in well
under a second. The build is keyed by the sources, the flags and the CPU's vector capability,
so a change to any of them rebuilds.

When the build fails (no compiler, no ninja, ...) the callers fall back to their pure-PyTorch
paths, which give the same results, and one :class:`NativeKernelWarning` says why.
``SPARSITY_CORE_NATIVE=0`` skips every compiled kernel; it is read once per process.

The compact-layer kernels (:func:`compact_kernels`) choose their instruction set at load time
(AVX-512, AVX2 + FMA, or the portable baseline): the source is compiled once per ISA inside one
library, so no build flag ties it to the machine that built it.
``SPARSITY_CORE_ISA=avx2`` (or ``avx512``, ``portable``) picks another ISA for every compiled
kernel (the condensed inference kernel too), read when a kernel library loads.
``python -m sparsity_core.native`` builds (or loads) them and prints the build time and ISA.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CSRC",
    "NativeExtension",
    "NativeKernelWarning",
    "apply_isa_choice",
    "compact_kernels",
    "native_disabled",
]

DISABLE_ENV = "SPARSITY_CORE_NATIVE"
ISA_ENV = "SPARSITY_CORE_ISA"
_disabled: list[bool] = []


class NativeKernelWarning(RuntimeWarning):
    """A compiled kernel could not be built; the pure-PyTorch path is used instead."""


def native_disabled() -> bool:
    """Whether ``SPARSITY_CORE_NATIVE`` turns the compiled kernels off (read once)."""
    if not _disabled:
        value = os.environ.get(DISABLE_ENV, "1").strip().lower()
        _disabled.append(value in ("0", "off", "false", "no"))
    return _disabled[0]


def apply_isa_choice(module: Any, what: str) -> None:
    """Switch a loaded kernel module to the ISA named by ``SPARSITY_CORE_ISA`` (``avx512``,
    ``avx2``, ``portable``), if set; the module's default is the widest the CPU has."""
    choice = os.environ.get(ISA_ENV, "").strip().lower()
    if not choice or not hasattr(module, "set_isa"):
        return
    try:
        module.set_isa(choice)
    except ValueError as exc:
        warnings.warn(
            f"sparsity_core: {ISA_ENV}={choice!r} is not available to {what} ({exc}); using "
            f"{module.isa()}.",
            NativeKernelWarning,
            stacklevel=3,
        )


def cpu_capability() -> str:
    """torch's reading of the CPU's vector capability (``avx512``, ``avx2``, ``generic``)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine() in ("x86_64", "AMD64") and capability in ("AVX2", "AVX512"):
        return capability.lower()
    return "generic"


@contextlib.contextmanager
def ninja_on_path():
    """Make the ``ninja`` of the PyPI package visible to torch's build when no ``ninja`` is on
    ``PATH`` (a venv used without activating it); ``PATH`` is restored afterwards."""
    if shutil.which("ninja") is not None:
        yield
        return
    try:
        import ninja

        extra = ninja.BIN_DIR
    except (ImportError, AttributeError):
        extra = None
    saved = os.environ.get("PATH")
    if extra:
        os.environ["PATH"] = extra + os.pathsep + (saved or "")
    try:
        yield
    finally:
        if extra:
            if saved is None:
                os.environ.pop("PATH", None)
            else:
                os.environ["PATH"] = saved


class NativeExtension:
    """One C++ torch extension: built (or loaded from the cache) at the first :meth:`load`.

    Args:
        name: the extension's name prefix.
        source: the ``.cpp`` file; ``depends`` lists files it includes (they key the build).
        flags, ldflags: extra compiler and linker flags. OpenMP is on by default: without it
        ``at::parallel_for`` in the extension's own code runs every range on the calling thread
        (ATen's header parallelises only under ``_OPENMP``).
        what: how warnings name it ("the compact-layer kernels").
    """

    def __init__(
        self,
        name: str,
        source: Path,
        *,
        depends: Sequence[Path] = (),
        flags: Sequence[str] = ("-O3", "-fopenmp"),
        ldflags: Sequence[str] = ("-fopenmp",),
        what: str,
    ) -> None:
        self.name = name
        self.source = Path(source)
        self.depends = tuple(Path(p) for p in depends)
        self.flags = list(flags)
        self.ldflags = list(ldflags)
        self.what = what
        self._lock = threading.Lock()
        self._tried = False
        self.module: Any = None
        self.error: str | None = None
        self.seconds: float | None = None

    def _build(self) -> Any:
        from torch.utils.cpp_extension import load

        digest = hashlib.sha256()
        for path in (self.source, *self.depends):
            digest.update(path.read_bytes())
        digest.update(" ".join(self.flags + self.ldflags).encode())
        name = f"{self.name}_{cpu_capability()}_{digest.hexdigest()[:10]}"
        start = time.perf_counter()
        with ninja_on_path():
            module = load(
                name=name,
                sources=[str(self.source)],
                extra_cflags=self.flags,
                extra_ldflags=self.ldflags,
                extra_include_paths=[str(self.source.parent), str(CSRC)],
                is_python_module=True,
                verbose=False,
            )
        self.seconds = time.perf_counter() - start
        return module

    def load(self) -> Any | None:
        """The extension module, or None (disabled, or it could not be built: warned once)."""
        if native_disabled():
            return None
        if self._tried:
            return self.module
        with self._lock:
            if not self._tried:
                try:
                    self.module = self._build()
                except Exception as exc:  # any build or load failure: fall back, say why once
                    self.error = f"{type(exc).__name__}: {str(exc).strip()[-600:]}"
                    warnings.warn(
                        f"sparsity_core: {self.what} could not be built, so the pure-PyTorch "
                        f"path is used (same results, slower). Reason: {self.error}. Install "
                        f"gcc/g++ (and ninja: pip install ninja) to build them, or set "
                        f"{DISABLE_ENV}=0 to skip the attempt.",
                        NativeKernelWarning,
                        stacklevel=3,
                    )
                finally:
                    self._tried = True
                if self.module is not None:
                    # Outside the build's try: a warning about the choice (an error under
                    # -W error) must not discard a module that built.
                    apply_isa_choice(self.module, self.what)
        return self.module

    def status(self) -> dict[str, Any]:
        """Whether it is available, the build/load time, and the error if any."""
        module = self.load()
        return {
            "available": module is not None,
            "disabled": native_disabled(),
            "seconds": self.seconds,
            "capability": cpu_capability(),
            "error": self.error,
        }


CSRC = Path(__file__).with_name("csrc")
"""The core's C++ sources (``isa_select.h`` is shared with the formats' kernels)."""
COMPACT = NativeExtension(
    "sparsity_core_compact",
    CSRC / "compact_cpu.cpp",
    depends=[CSRC / "compact_body.inc", CSRC / "isa_select.h"],
    what="the compact-layer CPU kernels",
)


def compact_kernels() -> Any | None:
    """The compact-layer kernels (``forward_t``, ``grad_input_t``, ``grad_values_t``,
    ``available_isas``, ``set_isa``, ``isa``), or None."""
    return COMPACT.load()


if __name__ == "__main__":
    import json

    status = COMPACT.status()
    module = COMPACT.module
    if module is not None:
        status["isa"] = module.isa()
        status["available_isas"] = list(module.available_isas())
    print(json.dumps(status, indent=2))
