"""Meta tests: entry points, plugin modules, hookspecs, docs and tests stay in step."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

import sparsity_core.testing as kit
from sparsity_core import hookspecs

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
DOCS = ROOT / "docs"
EXAMPLE = ROOT / "examples" / "sparsity_explore"
PLUGIN_PACKAGES = {"sparsity_plugins": ROOT / "plugins", "sparsity_formats": ROOT / "formats"}
IMPL_MARKER = f"{hookspecs.PROJECT_NAME}_impl"
SPEC_MARKER = f"{hookspecs.PROJECT_NAME}_spec"


def _declared_entry_points() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        data = tomllib.load(f)
    return dict(data["project"]["entry-points"][hookspecs.PROJECT_NAME])


def _hookimpl_names(module) -> list[str]:
    return sorted(name for name, value in vars(module).items() if hasattr(value, IMPL_MARKER))


def _plugin_modules() -> dict[str, list[str]]:
    """``{module name: [hookimpl names]}`` for every module of the built-in plugin packages."""
    found = {}
    for package, source_root in PLUGIN_PACKAGES.items():
        for path in sorted((source_root / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = _hookimpl_names(importlib.import_module(name))
    return found


def _hookspec_names() -> list[str]:
    return sorted(
        name
        for name, value in vars(hookspecs).items()
        if inspect.isfunction(value) and hasattr(value, SPEC_MARKER)
    )


class TestEntryPoints:
    """Every built-in plugin module has exactly one entry point, and vice versa."""

    def test_plugin_packages_exist(self):
        """The scanned source roots hold plugin modules (the scan itself is not vacuous)."""
        modules = _plugin_modules()
        assert sum(bool(impls) for impls in modules.values()) >= 7

    def test_every_hookimpl_module_has_an_entry_point(self):
        """A module defining hook implementations is declared in pyproject.toml."""
        declared = set(_declared_entry_points().values())
        missing = sorted(
            name for name, impls in _plugin_modules().items() if impls and name not in declared
        )
        assert missing == [], f"add entry points for {missing} to pyproject.toml"

    def test_every_entry_point_resolves_to_a_hookimpl_module(self):
        """Each declared entry point imports a module that implements at least one hook."""
        modules = _plugin_modules()
        for ep_name, value in _declared_entry_points().items():
            assert ":" not in value, f"entry point {ep_name!r} should name a module: {value!r}"
            assert value in modules, f"entry point {ep_name!r} -> {value!r} is not a plugin module"
            assert modules[value], f"entry point {ep_name!r} -> {value!r} implements no hook"

    def test_entry_point_names_are_unique_per_module(self):
        """No module is declared twice under different entry-point names."""
        values = list(_declared_entry_points().values())
        assert len(values) == len(set(values))

    def test_installed_metadata_matches_pyproject(self):
        """The installed distribution exposes the entry points pyproject.toml declares."""
        dist = importlib.metadata.distribution("sparsity-core")
        installed = {
            ep.name: ep.value for ep in dist.entry_points if ep.group == hookspecs.PROJECT_NAME
        }
        assert installed == _declared_entry_points(), (
            "installed entry points are stale: run `pip install -e .` again"
        )

    def test_hookimpls_implement_known_hooks(self):
        """Every hook implementation in the built-in modules has a matching hookspec."""
        specs = set(_hookspec_names())
        for module, impls in _plugin_modules().items():
            assert set(impls) <= specs, (module, sorted(set(impls) - specs))


class TestHookspecs:
    """The hook specifications follow the naming and documentation rules."""

    def test_hookspecs_found(self):
        """The spec module defines the registration hooks and the observer hook."""
        names = _hookspec_names()
        assert "sparsity_after_mask_update" in names
        assert sum(name.startswith("sparsity_register_") for name in names) >= 8

    @pytest.mark.parametrize("name", _hookspec_names())
    def test_prefix_and_docstring(self, name):
        """Each hookspec is prefixed 'sparsity_' and documents its contract."""
        spec = getattr(hookspecs, name)
        assert name.startswith("sparsity_")
        assert spec.__doc__ is not None
        assert len(spec.__doc__.strip()) > 20

    @pytest.mark.parametrize("name", _hookspec_names())
    def test_every_hook_has_a_test(self, name):
        """Each hookspec name appears in some test module other than this meta test."""
        me = Path(__file__).resolve()
        pattern = re.compile(rf"\b{re.escape(name)}\b")
        users = [
            path.relative_to(ROOT).as_posix()
            for path in sorted(TESTS.rglob("test_*.py"))
            if path.resolve() != me and pattern.search(path.read_text(encoding="utf-8"))
        ]
        assert users, f"no test exercises the hook {name!r}"

    @pytest.mark.parametrize("name", _hookspec_names())
    def test_every_hook_is_documented_with_its_signature(self, name):
        """docs/plugins.md names each hook with its exact arguments, e.g. ``hook(register)``."""
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"`{name}({params})`" in (DOCS / "plugins.md").read_text(encoding="utf-8")


class TestKitDocs:
    """docs/testing.md lists exactly the kit's public checks."""

    def test_every_check_is_documented_and_every_documented_check_exists(self):
        """The tables list exactly the checks check_component runs; the rest are mentioned."""
        text = (DOCS / "testing.md").read_text(encoding="utf-8")
        tabled = set(re.findall(r"^\| `(check_\w+)`", text, flags=re.M))
        in_suites = {c.__name__ for checks in kit.CHECKS.values() for c in checks}
        assert tabled == in_suites
        public = {name for name in kit.__all__ if name.startswith("check_")}
        mentioned = set(re.findall(r"`(check_\w+)", text))
        assert public - mentioned == set(), "document these checks in docs/testing.md"

    def test_every_drawn_check_runs_in_some_suite(self):
        """Each public check that draws its inputs is run by check_component for some kind."""
        in_suites = {c.__name__ for checks in kit.CHECKS.values() for c in checks}
        explicit = {
            "check_component",
            "check_method_run",
            "check_checkpoint_resume",
            "check_same_seed_same_masks",
            "check_zero_drop_is_identity",
        }
        drawn = {n for n in kit.__all__ if n.startswith("check_") and n not in explicit}
        assert drawn == in_suites


class TestExamplePlugin:
    """The third-party example declares its module in our group, implementing real hooks.

    Read from its sources, so this holds whether or not the example is installed.
    """

    def test_entry_point_module_implements_known_hooks(self):
        with open(EXAMPLE / "pyproject.toml", "rb") as f:
            entry_points = tomllib.load(f)["project"]["entry-points"][hookspecs.PROJECT_NAME]
        assert entry_points == {"sparsity_explore": "sparsity_explore.plugin"}
        source = EXAMPLE / "src" / "sparsity_explore" / "plugin.py"
        tree = ast.parse(source.read_text(encoding="utf-8"))
        hooks = {
            node.name
            for node in tree.body
            if isinstance(node, ast.FunctionDef)
            and any(ast.unparse(d) == "hookimpl" for d in node.decorator_list)
        }
        assert hooks and hooks <= set(_hookspec_names())
        assert "sparsity_register_growth_criteria" in hooks
