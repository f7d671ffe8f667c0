"""Checkpoint files: atomic writes that survive a kill, and clear errors for unreadable files."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import sparsity_core as sc
from sparsity_core.checkpoint import load_checkpoint, save_checkpoint


def _scheduler_state() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = sc.DSTScheduler(model, optimizer, sc.preset("rigl", delta_t=2), total_steps=20)
    return {"model": model.state_dict(), "sparsity": scheduler.state_dict()}


class Payload:
    """An object whose unpickling would run code (print), which weights_only must refuse."""

    def __reduce__(self):
        return (print, ("this must never be printed",))


class TestLoadCheckpoint:
    """Every unreadable file is a CheckpointError naming the file and what is wrong."""

    def test_round_trip(self, tmp_path):
        """A saved scheduler state loads back with weights_only=True and rebuilds a scheduler."""
        state = _scheduler_state()
        path = save_checkpoint(state, tmp_path / "ck.pt")
        loaded = load_checkpoint(path)
        for fqn, mask in state["sparsity"]["masks"].items():
            assert torch.equal(loaded["sparsity"]["masks"][fqn], mask)
        assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left

    @pytest.mark.parametrize("keep", [0.5, 0.1, 0.0])
    def test_truncated_file(self, tmp_path, keep):
        """A file cut short says truncated or corrupt, with its name and size."""
        path = save_checkpoint(_scheduler_state(), tmp_path / "ck.pt")
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(sc.CheckpointError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert "ck.pt" in message and "truncated or corrupt" in message
        assert f"({int(len(data) * keep)} bytes)" in message

    def test_garbage_file(self, tmp_path):
        """Bytes that are no checkpoint at all give the same clear error."""
        path = tmp_path / "notes.pt"
        path.write_bytes(b"these are not the weights you are looking for")
        with pytest.raises(sc.CheckpointError, match=r"notes\.pt.*truncated or corrupt"):
            load_checkpoint(path)

    def test_missing_file(self, tmp_path):
        """A path that does not exist is named."""
        with pytest.raises(sc.CheckpointError, match=r"nowhere\.pt' does not exist"):
            load_checkpoint(tmp_path / "nowhere.pt")

    def test_pickled_code_is_refused_not_run(self, tmp_path, capsys):
        """A file that would call a function when unpickled is refused without calling it."""
        path = tmp_path / "evil.pt"
        torch.save({"step": 1, "payload": Payload()}, path)
        with pytest.raises(sc.CheckpointError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert "evil.pt" in message and "weights_only=True" in message
        assert "print" in message  # names the refused global
        assert "this must never be printed" not in capsys.readouterr().out


class TestAtomicSave:
    """A write that dies part-way leaves the previous checkpoint readable."""

    def test_failure_mid_write_keeps_the_previous_file(self, tmp_path, monkeypatch):
        """If torch.save dies after writing some bytes, the old file is intact, no temp is left."""
        path = save_checkpoint({"step": 1, "w": torch.ones(4)}, tmp_path / "ck.pt")

        def dying_save(obj, handle):
            handle.write(b"PK\x03\x04 half a zip archive")
            raise KeyboardInterrupt  # what a Ctrl-C during the write looks like

        monkeypatch.setattr(torch, "save", dying_save)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint({"step": 2, "w": torch.zeros(4)}, path)
        monkeypatch.undo()
        assert load_checkpoint(path)["step"] == 1
        assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]

    def test_sigkill_during_writes_never_corrupts_the_latest(self, tmp_path):
        """A process rewriting a 16 MB checkpoint in a loop is SIGKILLed; the file still loads."""
        path = tmp_path / "ck.pt"
        script = textwrap.dedent(
            f"""
            import torch
            from sparsity_core.checkpoint import save_checkpoint
            big = torch.randn(4_000_000, generator=torch.Generator().manual_seed(0))
            step = 0
            while True:
                step += 1
                save_checkpoint({{"step": step, "big": big + step}}, {str(path)!r})
            """
        )
        proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while not path.exists():
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "no checkpoint was written in 120 s"
                time.sleep(0.005)
            time.sleep(0.3)  # several more writes; the kill lands at an arbitrary point
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        state = load_checkpoint(path)
        base = torch.randn(4_000_000, generator=torch.Generator().manual_seed(0))
        assert state["step"] >= 1
        assert torch.equal(state["big"], base + state["step"])  # one complete write
        # Only the final name and at most one abandoned temporary file exist.
        leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "ck.pt")
        assert all(name.startswith(".ck.pt.") and name.endswith(".tmp") for name in leftovers)
        assert len(leftovers) <= 1
