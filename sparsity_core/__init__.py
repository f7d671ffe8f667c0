"""sparsity-core: dynamic sparse training for PyTorch with pluggable, property-tested parts.

Importing this package loads no plugin; the registry is built on first use.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from .compact import CompactLinear
from .compacting import compact_optimizer_state, masked_optimizer_state, to_compact, to_masked
from .config import DSTConfig, preset
from .context import ScoreContext
from .errors import (
    CapabilityError,
    CheckpointError,
    ConfigError,
    DistributedError,
    DuplicateComponentError,
    LayerError,
    NoBuiltinsError,
    OptimizerError,
    PluginLoadError,
    SchedulerStateError,
    SparsityError,
    SparsityWarning,
    UnknownComponentError,
    UpdateError,
)
from .exporting import ExportResult, ExportSizeWarning, PackedConv, PackedLinear, export
from .hookspecs import hookimpl, hookspec
from .layers import LayerSpec
from .protocols import (
    Capabilities,
    Distribution,
    DropSchedule,
    GrowthCriterion,
    PruneCriterion,
    StorageFormat,
    StructureConstraint,
)
from .registry import ComponentType, Registry, get_plugin_manager, get_registry
from .scheduler import DSTScheduler
from .sparse_safetensors import load_safetensors, save_safetensors
from .telemetry import LayerSummary, UpdateRecord

try:
    __version__ = _version("sparsity-core")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "Capabilities",
    "CapabilityError",
    "CheckpointError",
    "CompactLinear",
    "ComponentType",
    "ConfigError",
    "DSTConfig",
    "DSTScheduler",
    "DistributedError",
    "Distribution",
    "DropSchedule",
    "DuplicateComponentError",
    "ExportResult",
    "ExportSizeWarning",
    "GrowthCriterion",
    "LayerError",
    "LayerSpec",
    "LayerSummary",
    "NoBuiltinsError",
    "OptimizerError",
    "PackedConv",
    "PackedLinear",
    "PluginLoadError",
    "PruneCriterion",
    "Registry",
    "SchedulerStateError",
    "ScoreContext",
    "SparsityError",
    "SparsityWarning",
    "StorageFormat",
    "StructureConstraint",
    "UnknownComponentError",
    "UpdateError",
    "UpdateRecord",
    "__version__",
    "compact_optimizer_state",
    "export",
    "get_plugin_manager",
    "get_registry",
    "hookimpl",
    "hookspec",
    "load_safetensors",
    "masked_optimizer_state",
    "preset",
    "save_safetensors",
    "to_compact",
    "to_masked",
]
