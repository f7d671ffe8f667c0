"""The README's code examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import sparsity_core as sc
from sparsity_core.registry import Registry, create_plugin_manager

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


class TestReadme:
    def test_first_lines_give_the_two_commands(self):
        """The README opens with the main-job and the test command, both pinning torch."""
        head = README.read_text().split("## What it does")[0]
        commands = re.findall(r"```bash\n(.*?)\n```", head, flags=re.S)
        assert len(commands) == 2
        assert all("-c constraints.txt" in c for c in commands)
        assert commands[0].endswith("sparsity-core train")
        assert commands[1].endswith('pytest -m "not slow"')
        assert "torch==2.13.0" in (README.parent / "constraints.txt").read_text()

    def test_python_examples_run(self, tmp_path, monkeypatch):
        """Every python block runs, in order, in one namespace; the plugin example registers."""
        monkeypatch.chdir(tmp_path)
        torch.manual_seed(0)
        namespace: dict = {}
        blocks = _python_blocks()
        assert len(blocks) == 6
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
        assert (tmp_path / "checkpoint.pt").exists()

        class Plugin:
            sparsity_register_growth_criteria = staticmethod(
                namespace["sparsity_register_growth_criteria"]
            )

        registry = Registry.from_plugin_manager(
            create_plugin_manager(autoload=False, plugins={"readme_example": Plugin()})
        )
        rule = registry.create("growth", "noisy_gradient", scale=0.5)
        spec = sc.LayerSpec("fc", (3, 4))
        ctx = sc.ScoreContext(
            spec,
            1,
            torch.zeros(3, 4),
            torch.zeros(3, 4, dtype=torch.bool),
            torch.Generator().manual_seed(0),
            grad=torch.ones(3, 4),
        )
        scores = rule.scores(ctx)
        assert scores.shape == (3, 4) and bool((scores >= 1).all()) and bool((scores < 1.5).all())
