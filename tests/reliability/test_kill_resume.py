"""Kill the main job with SIGKILL mid-run, resume it, and end exactly where an unbroken run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsity_app.cli import main
from sparsity_core.checkpoint import load_checkpoint

pytestmark = [
    pytest.mark.slow,  # three `train` processes
    pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX-only"),
]

METHODS = ("rigl", "srigl")
EPOCHS = 10  # digits: 1437 training rows, batch 64 -> 23 steps per epoch
TOTAL_STEPS = EPOCHS * 23


def _train_args(
    ckpt_dir: Path, every: int, *extra: str, epochs: int = EPOCHS, methods=METHODS
) -> list[str]:
    args = ["train", "--no-dense", "--dataset", "digits", "--epochs", str(epochs)]
    for method in methods:
        args += ["--method", method]
    args += ["--batch-size", "64", "--hidden", "32,32", "--sparsity", "0.8", "--lr", "0.2"]
    args += ["--delta-t", "5", "--threads", "1"]
    args += ["--checkpoint-dir", str(ckpt_dir), "--checkpoint-every", str(every)]
    return [*args, "--json", str(ckpt_dir / "result.json"), *extra]


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "sparsity_app", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, what: str) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{err[-3000:]}\n{out[-2000:]}"


def _kill_after_first_checkpoint(proc: subprocess.Popen, checkpoint: Path) -> None:
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the job ended ({proc.returncode}) before its first checkpoint:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint appeared within 120 s")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An unbroken run, and a run killed after its first checkpoint then resumed."""
    straight = tmp_path_factory.mktemp("straight")
    broken = tmp_path_factory.mktemp("broken")
    # The unbroken run saves once, at its last step; the other saves every step, so the kill
    # often lands while a checkpoint is being written.
    reference = _start(_train_args(straight, TOTAL_STEPS))
    victim = _start(_train_args(broken, 1))
    first_checkpoint = broken / f"{METHODS[0]}-seed0.pt"
    try:
        _kill_after_first_checkpoint(victim, first_checkpoint)
    finally:
        if victim.poll() is None:
            victim.kill()
    killed_at = int(load_checkpoint(first_checkpoint)["step"])
    assert 1 <= killed_at < TOTAL_STEPS
    assert not (broken / f"{METHODS[1]}-seed0.pt").exists()  # the second run never started
    _finish(_start(_train_args(broken, 1, "--resume")), "the resumed job")
    _finish(reference, "the unbroken job")
    return {"straight": straight, "resumed": broken}


def _final(ckpt_dir: Path, method: str) -> dict:
    state = load_checkpoint(ckpt_dir / f"{method}-seed0.pt")
    assert state["step"] == TOTAL_STEPS
    return state


def _run_of(ckpt_dir: Path, method: str) -> dict:
    runs = json.loads((ckpt_dir / "result.json").read_text())["runs"]
    return next(r for r in runs if r["method"] == method)


def _tensors_equal(a, b, where: str) -> None:
    """Nested dicts/lists of tensors and plain values are exactly equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _tensors_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _tensors_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class TestKillAndResume:
    """A SIGKILLed run resumed from its last checkpoint is bit-identical to an unbroken one."""

    @pytest.mark.parametrize("method", METHODS)
    def test_final_masks_are_identical(self, runs, method):
        """Every layer's final mask, ever-active set and update history match exactly."""
        straight = _final(runs["straight"], method)["sparsity"]
        resumed = _final(runs["resumed"], method)["sparsity"]
        assert straight["history"], "no topology update happened"
        for key in ("masks", "ever_active", "history", "step"):
            _tensors_equal(straight[key], resumed[key], key)

    @pytest.mark.parametrize("method", METHODS)
    def test_final_weights_and_optimizer_state_are_identical(self, runs, method):
        """Model parameters, SGD momenta and the learning-rate schedule match bit for bit."""
        straight, resumed = _final(runs["straight"], method), _final(runs["resumed"], method)
        for key in ("model", "optimizer", "lr_schedule"):
            _tensors_equal(straight[key], resumed[key], key)

    @pytest.mark.parametrize("method", METHODS)
    def test_final_accuracy_and_telemetry_are_identical(self, runs, method):
        """Test accuracy, last loss, density, ITOP and per-layer reports match exactly."""
        straight, resumed = (_run_of(runs[k], method) for k in ("straight", "resumed"))
        for key in ("test_accuracy", "train_loss", "density", "itop", "layers"):
            assert straight[key] == resumed[key], key
        assert straight["test_accuracy"] > 0.8  # it really trained (10 classes)

    def test_no_partial_checkpoint_is_left_as_the_latest(self, runs):
        """Every checkpoint the runs left behind loads (temporary files never replace it)."""
        for folder in runs.values():
            for path in folder.glob("*.pt"):
                assert load_checkpoint(path)["step"] == TOTAL_STEPS


class TestBrokenCheckpointFile:
    """`sparsity-core train --resume` refuses an unreadable checkpoint, naming the file."""

    def test_truncated_checkpoint_is_a_clear_error(self, tmp_path, capsys):
        """A checkpoint cut in half stops the run with exit code 2 and the file's name."""
        threads = torch.get_num_threads()  # `train` sets the thread count of this process
        try:
            assert main(_train_args(tmp_path, 23, epochs=1, methods=["rigl"])) == 0
            path = tmp_path / "rigl-seed0.pt"
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
            capsys.readouterr()
            args = _train_args(tmp_path, 23, "--resume", epochs=1, methods=["rigl"])
            assert main(args) == 2
        finally:
            torch.set_num_threads(threads)
        err = capsys.readouterr().err
        assert "rigl-seed0.pt" in err and "checkpoint" in err
