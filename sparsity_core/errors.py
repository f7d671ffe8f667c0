"""Exception classes. Every message names the component, the offending value and the fix."""

from __future__ import annotations

__all__ = [
    "CapabilityError",
    "CheckpointError",
    "ConfigError",
    "DistributedError",
    "DuplicateComponentError",
    "LayerError",
    "NoBuiltinsError",
    "OptimizerError",
    "PluginLoadError",
    "SchedulerStateError",
    "SparsityError",
    "SparsityWarning",
    "UnknownComponentError",
    "UpdateError",
]


class SparsityError(Exception):
    """Base class of every error raised by sparsity-core."""


class ConfigError(SparsityError, ValueError):
    """A configuration value is invalid (raised before training starts)."""


class LayerError(SparsityError, ValueError):
    """A selected layer cannot hold what the configuration asks of it."""


class OptimizerError(SparsityError, ValueError):
    """The optimizer does not match the sparse model (e.g. missing parameters)."""


class PluginLoadError(SparsityError, ImportError):
    """A plugin's entry point could not be imported or registered."""


class DuplicateComponentError(SparsityError, ValueError):
    """Two plugins registered a component of the same type under the same name."""


class UnknownComponentError(SparsityError, KeyError):
    """A component name is not in the registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class NoBuiltinsError(SparsityError, RuntimeError):
    """No built-in components were found: the package is not installed."""


class CapabilityError(SparsityError, RuntimeError):
    """A component used an input it did not declare, or one that is not available."""


class UpdateError(SparsityError, RuntimeError):
    """A topology update failed; the model and masks are left unchanged."""


class CheckpointError(SparsityError, ValueError):
    """A checkpoint cannot be loaded into this scheduler."""


class DistributedError(SparsityError, RuntimeError):
    """Ranks of a distributed run disagree (e.g. their masks diverged)."""


class SchedulerStateError(SparsityError, RuntimeError):
    """A scheduler was used out of order (stepped after ``remove()``, attached twice)."""


class SparsityWarning(UserWarning):
    """Something was skipped or will not happen as the configuration suggests (say so, or fix)."""
