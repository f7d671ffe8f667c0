"""The kit's own tests only need pass or fail: skip hypothesis's shrinking and explanation."""

from __future__ import annotations

import pytest
from hypothesis import Phase

from sparsity_core.testing.profiles import check_settings


@pytest.fixture(autouse=True)
def _no_shrinking():
    with check_settings(phases=[Phase.explicit, Phase.reuse, Phase.generate]):
        yield
