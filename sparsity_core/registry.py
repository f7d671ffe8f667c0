"""Plugin discovery (pluggy + entry points) and the component registry built from it.

Discovery is lazy: importing :mod:`sparsity_core` loads no plugin. The first call to
:func:`get_registry` (or :func:`get_plugin_manager`) finds the entry points of the
``sparsity_core`` group, loads them, registers them with a fresh pluggy manager, checks that no
hook name is misspelled, and collects the components every plugin registers.

Environment switches:

* ``SPARSITY_CORE_DISABLE_AUTOLOAD=1``: load no entry point (register plugins by hand).
* ``SPARSITY_CORE_BLOCK_PLUGINS=name1,name2``: skip the named entry points.
* ``SPARSITY_CORE_TRACE_HOOKS=1``: print every hook call to stderr.
"""

from __future__ import annotations

import enum
import functools
import importlib.metadata as importlib_metadata
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .errors import (
    DuplicateComponentError,
    NoBuiltinsError,
    PluginLoadError,
    UnknownComponentError,
)
from .hookspecs import RegisterFn

__all__ = [
    "BUILTIN_DISTRIBUTION",
    "ComponentEntry",
    "ComponentType",
    "PluginInfo",
    "RegisterFn",
    "Registry",
    "create_plugin_manager",
    "get_plugin_manager",
    "get_registry",
    "reset_plugin_cache",
]

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
BUILTIN_DISTRIBUTION = "sparsity-core"
ENV_DISABLE_AUTOLOAD = "SPARSITY_CORE_DISABLE_AUTOLOAD"
ENV_BLOCK = "SPARSITY_CORE_BLOCK_PLUGINS"
ENV_TRACE = "SPARSITY_CORE_TRACE_HOOKS"


class ComponentType(str, enum.Enum):
    """The kinds of component a plugin can register, with the hook that registers each."""

    PRUNE = "prune"
    GROWTH = "growth"
    STRUCTURE = "structure"
    DISTRIBUTION = "distribution"
    SCHEDULE = "schedule"
    REINIT = "reinit"
    OPTIMIZER_STATE = "optimizer_state"
    FORMAT = "format"
    PRESET = "preset"
    STRATEGY = "strategy"

    @property
    def hook_name(self) -> str:
        return _HOOKS[self]


_HOOKS = {
    ComponentType.PRUNE: "sparsity_register_prune_criteria",
    ComponentType.GROWTH: "sparsity_register_growth_criteria",
    ComponentType.STRUCTURE: "sparsity_register_structures",
    ComponentType.DISTRIBUTION: "sparsity_register_distributions",
    ComponentType.SCHEDULE: "sparsity_register_schedules",
    ComponentType.REINIT: "sparsity_register_reinits",
    ComponentType.OPTIMIZER_STATE: "sparsity_register_optimizer_state_policies",
    ComponentType.FORMAT: "sparsity_register_formats",
    ComponentType.PRESET: "sparsity_register_presets",
    ComponentType.STRATEGY: "sparsity_register_strategies",
}


@attrs.frozen
class PluginInfo:
    """One loaded (or failed) plugin: its entry point, distribution and version."""

    name: str
    value: str
    distribution: str | None
    version: str | None
    error: str | None = None

    @property
    def is_builtin(self) -> bool:
        return self.distribution == BUILTIN_DISTRIBUTION


@attrs.frozen
class ComponentEntry:
    """A registered component: its type, name, class (or factory), plugin and summary."""

    type: ComponentType
    name: str
    component: Any
    plugin: str
    summary: str = ""


# The plugin name of components added with Registry.with_component.
IN_PROCESS = "<in-process>"

# -- plugin manager ------------------------------------------------------------------------------


def _env_list(name: str) -> tuple[str, ...]:
    raw = os.environ.get(name, "")
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _find_entry_points(blocked: Iterable[str]) -> list[importlib_metadata.EntryPoint]:
    """Entry points of our group, deduplicated by name and sorted (stable across runs)."""
    blocked = set(blocked)
    found: dict[str, importlib_metadata.EntryPoint] = {}
    for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in blocked:
            continue
        # A package installed twice (e.g. editable + site) exposes the same entry point twice.
        found.setdefault(ep.name, ep)
    return [found[name] for name in sorted(found)]


def _dist_of(ep: importlib_metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def create_plugin_manager(
    *,
    autoload: bool | None = None,
    blocked: Iterable[str] | None = None,
    plugins: Mapping[str, object] | None = None,
    strict: bool = True,
    trace: bool | None = None,
) -> pluggy.PluginManager:
    """Build a fresh plugin manager.

    Args:
        autoload: load entry points of the ``sparsity_core`` group (default: on, unless
            ``SPARSITY_CORE_DISABLE_AUTOLOAD`` is set).
        blocked: entry-point names to skip (default: ``SPARSITY_CORE_BLOCK_PLUGINS``).
        plugins: extra plugin objects to register by hand, ``{name: module_or_object}``.
        strict: raise :class:`PluginLoadError` on a plugin that fails to load; when False the
            failure is recorded (see :func:`plugin_infos`) and loading goes on.
        trace: print hook calls to stderr (default: ``SPARSITY_CORE_TRACE_HOOKS``).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    if autoload is None:
        autoload = not _env_flag(ENV_DISABLE_AUTOLOAD)
    if blocked is None:
        blocked = _env_list(ENV_BLOCK)
    blocked = tuple(blocked)
    if autoload:
        for ep in _find_entry_points(blocked):
            dist, version = _dist_of(ep)
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except Exception as exc:
                message = (
                    f"plugin {ep.name!r} (entry point {ep.value!r} in group "
                    f"{ENTRY_POINT_GROUP!r}, distribution {dist or 'unknown'} {version or ''}) "
                    f"failed to load: {type(exc).__name__}: {exc}. Fix or uninstall that "
                    f"distribution, or block it with {ENV_BLOCK}={ep.name}."
                )
                if strict:
                    raise PluginLoadError(message) from exc
                infos.append(PluginInfo(ep.name, ep.value, dist, version, error=message))
                continue
            infos.append(PluginInfo(ep.name, ep.value, dist, version))
    for name, plugin in (plugins or {}).items():
        pm.register(plugin, name=name)
        infos.append(PluginInfo(name, repr(plugin), None, None))
    pm.check_pending()
    if trace if trace is not None else _env_flag(ENV_TRACE):
        pm.trace.root.setwriter(lambda msg: sys.stderr.write(msg))
        pm.enable_tracing()
    pm._sparsity_plugin_infos = infos  # type: ignore[attr-defined]
    pm._sparsity_autoload = autoload  # type: ignore[attr-defined]
    pm._sparsity_blocked = blocked  # type: ignore[attr-defined]
    return pm


def plugin_infos(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """The plugins a manager loaded (and, with ``strict=False``, those that failed)."""
    return list(getattr(pm, "_sparsity_plugin_infos", []))


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    return create_plugin_manager()


@functools.cache
def get_registry() -> Registry:
    """The process-wide component registry, built from :func:`get_plugin_manager`."""
    return Registry.from_plugin_manager(get_plugin_manager())


def reset_plugin_cache() -> None:
    """Forget the cached manager and registry (after installing a plugin, or in tests)."""
    get_registry.cache_clear()
    get_plugin_manager.cache_clear()


# -- registry ------------------------------------------------------------------------------------


class Registry:
    """Components by type and name, collected from a plugin manager's registration hooks."""

    def __init__(
        self,
        entries: Iterable[ComponentEntry] = (),
        plugins: Iterable[PluginInfo] = (),
        *,
        plugin_manager: pluggy.PluginManager | None = None,
    ) -> None:
        self._entries: dict[ComponentType, dict[str, ComponentEntry]] = {
            t: {} for t in ComponentType
        }
        self.plugins: tuple[PluginInfo, ...] = tuple(plugins)
        self.plugin_manager = plugin_manager
        for entry in entries:
            self._add(entry)

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> Registry:
        """Call every registration hook, plugin by plugin, so each entry knows its plugin."""
        infos = plugin_infos(pm)
        registry = cls(plugins=infos, plugin_manager=pm)
        for ctype in ComponentType:
            hook = getattr(pm.hook, ctype.hook_name)
            for impl in hook.get_hookimpls():
                plugin_name = impl.plugin_name

                def register(
                    name: str, component: Any, *, summary: str = "", _t=ctype, _p=plugin_name
                ) -> None:
                    registry._add(ComponentEntry(_t, name, component, _p, summary))

                # Call each implementation on its own so every entry knows its plugin.
                impl.function(**{arg: register for arg in impl.argnames})
        if getattr(pm, "_sparsity_autoload", False) and not any(
            e.plugin in {i.name for i in infos if i.is_builtin}
            for t in ComponentType
            for e in registry._entries[t].values()
        ):
            blocked = getattr(pm, "_sparsity_blocked", ())
            raise NoBuiltinsError(
                "no built-in sparsity-core components were found: the 'sparsity_core' entry "
                "points of the sparsity-core distribution are missing. Install the package "
                "(`pip install -e .` from a checkout, or `pip install sparsity-core`) rather "
                "than importing it from a source tree"
                + (f"; blocked plugins: {', '.join(blocked)}" if blocked else "")
                + "."
            )
        return registry

    def _add(self, entry: ComponentEntry) -> None:
        if not isinstance(entry.name, str) or not entry.name:
            raise ValueError(
                f"plugin {entry.plugin!r} registered a {entry.type.value} with "
                f"an invalid name {entry.name!r}; names are non-empty strings."
            )
        table = self._entries[entry.type]
        if entry.name in table:
            other = table[entry.name]
            raise DuplicateComponentError(
                f"{entry.type.value} {entry.name!r} is registered twice: by plugin "
                f"{other.plugin!r} and by plugin {entry.plugin!r}. Uninstall or block one of "
                f"them ({ENV_BLOCK}=<plugin>), or rename the component in your plugin."
            )
        table[entry.name] = entry

    def with_component(
        self, ctype: ComponentType | str, name: str, component: Any, *, summary: str = ""
    ) -> Registry:
        """A copy of this registry with one more component, registered in this process only.

        For notebooks and tests: pass the result as ``registry=`` to
        :class:`~sparsity_core.DSTScheduler` (and to ``from_state_dict``) so a component of
        yours saves and loads by ``name`` without an installed plugin. A package registers
        through its ``sparsity_register_*`` hook and entry point instead.
        """
        copy = Registry(self.entries(), self.plugins, plugin_manager=self.plugin_manager)
        copy._add(ComponentEntry(ComponentType(ctype), name, component, IN_PROCESS, summary))
        return copy

    def names(self, ctype: ComponentType | str) -> list[str]:
        """Sorted names of the registered components of one type."""
        return sorted(self._entries[ComponentType(ctype)])

    def entries(self, ctype: ComponentType | str | None = None) -> list[ComponentEntry]:
        """Registered entries, optionally of one type, sorted by type then name."""
        types = list(ComponentType) if ctype is None else [ComponentType(ctype)]
        return [self._entries[t][n] for t in types for n in sorted(self._entries[t])]

    def entry(self, ctype: ComponentType | str, name: str) -> ComponentEntry:
        """The entry for ``name``; an unknown name lists what is available and from where."""
        ctype = ComponentType(ctype)
        table = self._entries[ctype]
        if name in table:
            return table[name]
        if table:
            available = ", ".join(f"{n} (from {table[n].plugin})" for n in sorted(table))
        else:
            available = "none"
        hint = ""
        if (
            not table
            and self.plugin_manager is not None
            and not getattr(self.plugin_manager, "_sparsity_autoload", True)
        ):
            hint = f" Plugin autoloading is off ({ENV_DISABLE_AUTOLOAD} is set)."
        blocked = getattr(self.plugin_manager, "_sparsity_blocked", ())
        if blocked:
            hint += f" Blocked plugins ({ENV_BLOCK}): {', '.join(blocked)}."
        raise UnknownComponentError(
            f"unknown {ctype.value} {name!r}. Available: {available}.{hint} Check the spelling, "
            f"or install the plugin that provides it (`sparsity-core plugins` lists them)."
        )

    def get(self, ctype: ComponentType | str, name: str) -> Any:
        """The class (or factory) registered under ``name``."""
        return self.entry(ctype, name).component

    def create(self, ctype: ComponentType | str, name: str, **params: Any) -> Any:
        """Instantiate the component ``name`` with hyper-parameters ``params``."""
        cls = self.get(ctype, name)
        try:
            return cls(**params)
        except TypeError as exc:
            raise UnknownComponentError(
                f"{ComponentType(ctype).value} {name!r} does not accept parameters "
                f"{sorted(params)}: {exc}."
            ) from exc

    def name_of(self, ctype: ComponentType | str, component: Any) -> str:
        """The registry name of a component instance (reverse lookup by class)."""
        ctype = ComponentType(ctype)
        for entry in self._entries[ctype].values():
            if type(component) is entry.component:
                return entry.name
        raise UnknownComponentError(
            f"{ctype.value} {type(component).__qualname__} is not registered by any plugin, so "
            f"it cannot be saved by name. Register it with a `{ctype.hook_name}` hook "
            f"implementation and an entry point, or for this process only with "
            f"registry=get_registry().with_component({ctype.value!r}, '<name>', "
            f"{type(component).__qualname__})."
        )

    def call_observers(self, **kwargs: Any) -> None:
        """Fire the observer hook ``sparsity_after_mask_update``."""
        if self.plugin_manager is not None:
            self.plugin_manager.hook.sparsity_after_mask_update(**kwargs)


def components_by_plugin(registry: Registry) -> dict[str, dict[str, list[str]]]:
    """``{plugin: {type: [names]}}`` for listings."""
    out: dict[str, dict[str, list[str]]] = {}
    for entry in registry.entries():
        out.setdefault(entry.plugin, {}).setdefault(entry.type.value, []).append(entry.name)
    return out
