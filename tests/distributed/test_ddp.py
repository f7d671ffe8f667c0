"""DDP on CPU: two gloo ranks on loopback compute identical masks, equal to a one-process run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _ddp_worker import CASES, train

import sparsity_core as sc
from sparsity_core.errors import ConfigError

pytestmark = [
    pytest.mark.slow,  # spawns ranks (subprocesses)
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="this PyTorch build has no torch.distributed gloo backend",
    ),
]

WORKER = Path(__file__).with_name("_ddp_worker.py")
WORLD = 2
CASE_NAMES = [name for name, _, _ in CASES]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks(out_dir: Path, world: int = WORLD, timeout: float = 180.0) -> None:
    """Start ``world`` worker processes (one gloo rank each) and wait for all of them."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
    }
    if sys.platform.startswith("linux") and "GLOO_SOCKET_IFNAME" not in env:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # stay on loopback whatever the hostname resolves to
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out_dir)],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [(rank, p.returncode) for rank, p in enumerate(procs) if p.returncode != 0]
    if failed:
        logs = "\n".join(f"--- rank {r} ---\n{out[-3000:]}" for r, out in enumerate(outputs))
        pytest.fail(f"DDP workers failed (rank, exit code): {failed}\n{logs}")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What every rank saw, from one 2-process launch that runs all the cases."""
    out_dir = tmp_path_factory.mktemp("ddp")
    launch_ranks(out_dir)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture
def one_thread():
    """Run the in-process reference on one thread, like the workers (far faster on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_masks_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for fqn in a:
        assert a[fqn].dtype == torch.bool
        differ = int((a[fqn] != b[fqn]).sum())
        assert differ == 0, f"{what}: layer {fqn!r} differs at {differ} positions"


class TestRanksAgree:
    """Every rank computes the same masks at every update, with no mask broadcast."""

    @pytest.mark.parametrize("case", CASE_NAMES)
    def test_masks_identical_on_every_rank_after_each_update(self, ranks, case):
        """All 4 updates (ΔT=3) leave rank 1 with exactly rank 0's masks."""
        first, second = ranks[0][case], ranks[1][case]
        assert len(first["updates"]) == len(second["updates"]) == 4
        assert first["dropped"] > 0  # the topology really changed
        for i, (a, b) in enumerate(zip(first["updates"], second["updates"], strict=True)):
            _assert_masks_equal(a, b, f"{case} update {i + 1}")

    @pytest.mark.parametrize("case", CASE_NAMES)
    def test_weights_identical_on_every_rank(self, ranks, case):
        """DDP keeps the replicas bit-identical, masked weights included."""
        for key, value in ranks[0][case]["weights"].items():
            assert torch.equal(value, ranks[1][case]["weights"][key]), key


class TestMatchesOneProcess:
    """Two ranks with half the global batch each train like one process with all of it."""

    @pytest.mark.parametrize(("case", "method", "micro"), CASES, ids=CASE_NAMES)
    def test_two_ranks_match_a_single_process_run(self, ranks, one_thread, case, method, micro):
        """Masks after every update are identical; weights agree within float tolerance."""
        reference = train(method, micro=micro)
        distributed = ranks[0][case]
        assert len(reference["updates"]) == len(distributed["updates"])
        for i, (a, b) in enumerate(zip(reference["updates"], distributed["updates"], strict=True)):
            _assert_masks_equal(a, b, f"{case} update {i + 1} vs one process")
        for key, value in reference["weights"].items():
            torch.testing.assert_close(
                distributed["weights"][key], value, rtol=1e-4, atol=1e-5, msg=key
            )
            if key.endswith("weight"):  # masked weights are exactly zero in both runs
                fqn = key.rsplit(".", 1)[0]
                off = ~reference["masks"][fqn]
                assert bool((distributed["weights"][key][off] == 0).all())


class TestVerifyRanks:
    """The optional cross-rank checksum catches ranks whose masks diverged."""

    def test_a_criterion_using_the_global_rng_is_caught_at_the_first_update(self, ranks):
        """Rank-dependent growth on layer '2' raises DistributedError naming only that layer."""
        results = [r["diverged_growth"] for r in ranks]
        assert results[0]["digests"]["2"] != results[1]["digests"]["2"]  # truly diverged
        for key in ("0", "4"):
            assert results[0]["digests"][key] == results[1]["digests"][key]
        for result in results:
            message = result["error"]
            assert message is not None, "the divergence went unnoticed"
            assert result["step"] == 3
            assert "'2' differs on ranks [1]" in message
            assert "'0'" not in message and "'4'" not in message
            assert "step 3" in message and "ctx.generator" in message

    def test_different_seeds_per_rank_are_caught_before_training(self, ranks):
        """Ranks seeded differently fail at construction and their models are left untouched."""
        for rank in ranks:
            result = rank["diverged_seed"]
            assert result["error"] is not None
            assert "step 0" in result["error"]
            for fqn in ("'0'", "'2'", "'4'"):
                assert fqn in result["error"]
            assert result["untouched"] is True

    def test_ranks_resuming_from_different_checkpoints_are_caught(self, ranks):
        """A checkpoint that differs on one rank fails from_state_dict, naming layer and step."""
        for rank in ranks:
            result = rank["diverged_resume"]
            assert result["error"] is not None
            assert "step 6" in result["error"] and "'4' differs on ranks [1]" in result["error"]
            assert "'0'" not in result["error"]
            assert result["untouched"] is True

    def test_verify_ranks_needs_an_initialised_process_group(self):
        """Without init_process_group the option is a ConfigError saying what to call."""
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ConfigError, match="init_process_group"):
            sc.DSTScheduler(model, optimizer, sc.preset("rigl"), total_steps=10, verify_ranks=True)
