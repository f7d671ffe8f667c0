"""Shared test configuration: hypothesis profiles (choose with HYPOTHESIS_PROFILE=dev|ci), and
the compiled kernel kept out of the default run."""

from __future__ import annotations

import os

import pytest

from sparsity_core.testing.profiles import load_profile

load_profile()


def pytest_configure(config: pytest.Config) -> None:
    # Building the compiled condensed kernel takes 60-80 s on two cores. The default run
    # (-m "not slow") uses the PyTorch kernels, which give the same results; the slow run
    # builds the compiled one and tests it. An explicit SPARSITY_CORE_NATIVE wins.
    if "not slow" in (config.option.markexpr or ""):
        os.environ.setdefault("SPARSITY_CORE_NATIVE", "0")
