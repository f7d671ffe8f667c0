"""The torchrun example runs on 2 CPU ranks and its checkpoint resumes in a single process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsity_core as sc
from sparsity_core.checkpoint import load_checkpoint

pytestmark = [
    pytest.mark.slow,  # spawns ranks (subprocesses)
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="this PyTorch build has no torch.distributed gloo backend",
    ),
]

EXAMPLE = Path(__file__).parents[2] / "examples" / "ddp" / "train_ddp.py"


def test_torchrun_example_on_two_cpu_ranks(tmp_path):
    """`torchrun --nproc_per_node=2` trains with verified masks; one process can resume it."""
    checkpoint = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(EXAMPLE), "--cpu", "--epochs", "1", "--delta-t", "5"]
    command += ["--hidden", "32", "--accumulate", "2", "--checkpoint", str(checkpoint)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "step 5: regrew" in done.stdout
    assert "masks identical on 2 ranks" in done.stdout
    assert "test accuracy" in done.stdout

    # The checkpoint has the bare model's layer names, so a plain model loads it.
    state = load_checkpoint(checkpoint)
    model = nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = sc.DSTScheduler.from_state_dict(model, optimizer, state["sparsity"])
    model.load_state_dict(state["model"])
    assert list(scheduler.masks) == ["0", "2", "4"]
    assert scheduler.history  # updates happened in the distributed run
    for layer in scheduler.layers.values():
        assert bool((layer.weight.detach()[~layer.mask] == 0).all())
