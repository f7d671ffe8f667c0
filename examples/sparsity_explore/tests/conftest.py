"""The same hypothesis profiles as sparsity-core (HYPOTHESIS_PROFILE=dev|ci)."""

from sparsity_core.testing.profiles import load_profile

load_profile()
