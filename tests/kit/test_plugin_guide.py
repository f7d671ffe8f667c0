"""docs/plugins.md runs as written: its plugin module, entry point, kit test and examples."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

import sparsity_core.registry as registry_module
from sparsity_core import get_registry
from sparsity_core.registry import reset_plugin_cache
from sparsity_core.testing import CHECKS
from sparsity_core.testing.profiles import check_settings

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
FILE_MARK = "# file: "


def _blocks(language: str) -> list[str]:
    return [
        code
        for lang, code in re.findall(r"```(\w+)\n(.*?)```", GUIDE.read_text(), re.S)
        if lang == language
    ]


def _files() -> dict[str, str]:
    """The python blocks that are files, by the path their first line names."""
    return {
        code.splitlines()[0][len(FILE_MARK) :].strip(): code
        for code in _blocks("python")
        if code.startswith(FILE_MARK)
    }


@pytest.fixture
def installed_guide_plugin(tmp_path, monkeypatch):
    """The guide's package written to disk and registered as its entry point says, as after
    ``pip install``: the process-wide registry includes it for the test's duration."""
    for path, code in _files().items():
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        (target.parent / "__init__.py").touch()
        target.write_text(code)
    (toml,) = _blocks("toml")
    ((name, value),) = tomllib.loads(toml)["project"]["entry-points"]["sparsity_core"].items()
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(value)
    real = registry_module.create_plugin_manager

    def with_plugin(**kwargs):
        return real(plugins={**(kwargs.pop("plugins", None) or {}), name: module}, **kwargs)

    monkeypatch.setattr(registry_module, "create_plugin_manager", with_plugin)
    reset_plugin_cache()
    yield name, module
    monkeypatch.undo()
    reset_plugin_cache()
    package = value.split(".")[0]
    for loaded in [m for m in sys.modules if m == package or m.startswith(f"{package}.")]:
        del sys.modules[loaded]


class TestPluginGuide:
    """The guide's growth rule registers, passes its kit test and trains under structures."""

    def test_the_rule_is_about_twenty_lines(self):
        rules = _files()["my_sparsity/rules.py"]
        code = [line for line in rules.splitlines() if line.strip()]
        assert len(code) <= 25, f"the guide's growth rule grew to {len(code)} lines"

    def test_the_entry_point_names_the_rule_module(self):
        (toml,) = _blocks("toml")
        ((_, value),) = tomllib.loads(toml)["project"]["entry-points"]["sparsity_core"].items()
        assert f"{value.replace('.', '/')}.py" in _files()

    def test_the_guide_runs(self, installed_guide_plugin):
        """Registered by its entry point, the kit test passes every check and the examples run."""
        name, module = installed_guide_plugin
        entry = get_registry().entry("growth", "neuron_gradient")
        assert entry.plugin == name and entry.component is module.NeuronGradientGrowth
        namespace: dict = {}
        exec(compile(_files()["tests/test_rules.py"], "tests/test_rules.py", "exec"), namespace)
        test = namespace["test_neuron_gradient_passes_the_kit"]
        (mark,) = test.pytestmark
        params = mark.args[1]
        # the rule's checks, then three methods'
        assert len(params) == len(CHECKS["criterion"]) + 3 * len(CHECKS["method"])
        with check_settings(max_examples=2):
            for param in params:
                test(*param.values)
            examples = [code for code in _blocks("python") if not code.startswith(FILE_MARK)]
            assert len(examples) == 3  # the two usage examples and the in-process registry
            for code in examples:
                exec(compile(code, str(GUIDE), "exec"), {})
