"""The tree's rooms: the library core, the built-in plugins, the formats and the application.

Arrows (imports) run only into the core: the core never imports the application, the plugins or
the formats (``python -m sparsity_core``, a deprecated alias, finds the application by name at
run time); the plugins and the formats import only
the core, never each other; the core's import graph has no circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROOMS = {
    "sparsity_core": ROOT / "sparsity_core",
    "sparsity_plugins": ROOT / "plugins" / "sparsity_plugins",
    "sparsity_formats": ROOT / "formats" / "sparsity_formats",
    "sparsity_app": ROOT / "app" / "sparsity_app",
}
# Modules allowed an import across rooms beyond the rules below (none).
DOORS: dict[str, set[str]] = {}


def _module_name(package: str, path: Path) -> str:
    parts = path.relative_to(ROOMS[package]).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join((package, *parts))


def _imports(package: str, path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    module = _module_name(package, path)
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{alias.name}" for alias in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for package, folder in ROOMS.items():
        for path in sorted(folder.rglob("*.py")):
            graph[_module_name(package, path)] = _imports(package, path)
    return graph


def _room(name: str) -> str | None:
    top = name.split(".")[0]
    return top if top in ROOMS else None


GRAPH = _graph()


class TestRooms:
    """Each room imports only the rooms it may."""

    ALLOWED = {
        "sparsity_core": {"sparsity_core"},
        "sparsity_plugins": {"sparsity_core", "sparsity_plugins"},
        "sparsity_formats": {"sparsity_core", "sparsity_formats"},
        "sparsity_app": {"sparsity_core", "sparsity_app"},
    }

    def test_every_room_was_read(self):
        """The rooms exist where the test looks (so the checks below can fail)."""
        rooms = {_room(module) for module in GRAPH}
        assert rooms == set(ROOMS)
        assert "sparsity_app.cli" in GRAPH and "sparsity_core.scheduler" in GRAPH

    def test_imports_run_only_into_allowed_rooms(self):
        bad = []
        for module, imports in GRAPH.items():
            allowed = self.ALLOWED[_room(module)] | DOORS.get(module, set())
            bad += [(module, name) for name in imports if _room(name) not in allowed | {None}]
        assert not bad, f"imports across rooms: {bad}"

    def test_the_library_never_imports_the_application(self):
        """No module outside the application imports it."""
        importers = {
            module
            for module, imports in GRAPH.items()
            if _room(module) != "sparsity_app" and any(_room(n) == "sparsity_app" for n in imports)
        }
        assert importers == set(DOORS)


class TestNoCircles:
    """The core's import graph (TYPE_CHECKING imports included) is acyclic."""

    def test_core_graph_is_acyclic(self):
        core: dict[str, set[str]] = {}
        for module, imports in GRAPH.items():
            if _room(module) != "sparsity_core":
                continue
            targets = {i for i in imports if i in GRAPH and _room(i) == "sparsity_core"}
            # ``from pkg import submodule`` imports the submodule; the package itself is then
            # not an edge (it is being initialised, not read).
            targets -= {t for t in targets if any(i.startswith(t + ".") for i in targets)}
            targets.discard(module)
            core[module] = targets
        state: dict[str, int] = {}
        path: list[str] = []

        def visit(node: str) -> None:
            state[node] = 1
            path.append(node)
            for target in sorted(core.get(node, ())):
                if state.get(target) == 1:
                    cycle = [*path[path.index(target) :], target]
                    raise AssertionError(f"import circle: {' -> '.join(cycle)}")
                if target not in state:
                    visit(target)
            path.pop()
            state[node] = 2

        for node in sorted(core):
            if node not in state:
                visit(node)
