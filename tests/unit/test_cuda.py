"""The engine on CUDA tensors (skipped on machines without a GPU)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsity_core as sc
from sparsity_core.testing import check_checkpoint_resume, check_method_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"


class Net(nn.Module):
    """Conv2d and Linear layers whose fan-ins (16, 64, 64) suit N:M groups."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 64, 2)
        self.fc = nn.Linear(64, 64)
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(h)))


def build() -> nn.Module:
    with torch.random.fork_rng(devices=[0]):
        torch.manual_seed(0)
        return Net().to(DEVICE)


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def data():
    gen = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(16, 4, 5, 5, generator=gen).to(DEVICE),
            torch.randn(16, 3, generator=gen).to(DEVICE),
        )
        for _ in range(4)
    ]


@pytest.mark.parametrize(
    ("preset", "density"),
    [("rigl", 0.2), ("set", 0.2), ("srigl", 0.2), ("srigl_no_ablation", 0.2), ("nm_rigl", 0.5)],
)
class TestOnCuda:
    def test_run_invariants_hold_on_cuda(self, preset, density):
        """Budgets, structure, zero inactive weights and optimizer state hold with CUDA masks."""
        config = sc.preset(preset, density=density, delta_t=3)
        scheduler = check_method_run(config, build, steps=20, optimizer_factory=adam, data=data())
        assert all(layer.mask.device.type == "cuda" for layer in scheduler.layers.values())
        assert scheduler.history

    def test_checkpoint_resume_is_bit_identical_on_cuda(self, preset, density):
        """A CUDA run resumed from a checkpoint ends identical to an uninterrupted one."""
        config = sc.preset(preset, density=density, delta_t=3)
        check_checkpoint_resume(
            config, build, steps=20, resume_at=10, optimizer_factory=adam, data=data()
        )


def test_cuda_state_dict_loads_on_cpu():
    """A checkpoint written from CUDA masks loads with weights_only=True into a CPU model."""
    model = build()
    opt = adam(model.parameters())
    sched = sc.DSTScheduler(model, opt, sc.preset("srigl", density=0.2, delta_t=2), total_steps=10)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    cpu_model = Net()
    cpu = sc.DSTScheduler.from_state_dict(cpu_model, adam(cpu_model.parameters()), state)
    for fqn, mask in sched.masks.items():
        assert torch.equal(cpu.masks[fqn], mask.cpu())


# --- storage formats and export on CUDA -------------------------------------------------------

FORMATS = {
    "dense_masked": {},
    "csr": {},
    "condensed": {},
    "nm": {"n": 2, "m": 4},
    "nm-semi_structured": {"n": 2, "m": 4, "semi_structured": True},
}
FORMAT_CHECKS = [
    "check_format_round_trip",
    "check_format_linear_matches_dense",
    "check_format_keeps_live_zeros",
    "check_format_rejects_unsupported",
]


@pytest.mark.parametrize("check", FORMAT_CHECKS)
@pytest.mark.parametrize("name", list(FORMATS))
def test_format_checks_hold_on_cuda(name, check):
    """The kit's format checks, with every tensor on the GPU (linear in float32 and bfloat16)."""
    from sparsity_core import testing

    kind = name.split("-")[0]
    fmt = sc.get_registry().create(sc.ComponentType.FORMAT, kind, **FORMATS[name])
    getattr(testing, check)(fmt, max_examples=40, device=DEVICE)


def _mlp() -> nn.Sequential:
    with torch.random.fork_rng(devices=[0]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)
        ).to(DEVICE)


@pytest.mark.parametrize(
    ("preset", "density", "fmt"),
    [("rigl", 0.1, "csr"), ("srigl", 0.1, "condensed"), ("nm_rigl", 0.5, "nm")],
)
def test_export_on_cuda_matches_and_loads_on_cpu(preset, density, fmt):
    """A model trained on CUDA exports on CUDA (same outputs as the masked model, under
    inference_mode too) and its state_dict loads into a fresh CPU export of the same masks."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = sc.DSTScheduler(
        model, opt, sc.preset(preset, density=density, delta_t=3), total_steps=12
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        opt.zero_grad()
        model(torch.randn(16, 32, generator=gen).to(DEVICE)).square().mean().backward()
        opt.step()
        sched.step()
    result = sc.export(model, sched, format=fmt)
    x = torch.randn(5, 32, device=DEVICE)
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():
        got = result.model(x)
        again = result.model(x)  # the cached packed weight, built under inference_mode
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-5)
    assert all(b.device.type == DEVICE for b in result.model.buffers())
    buf = io.BytesIO()
    torch.save(result.model.state_dict(), buf)
    buf.seek(0)
    masks = {fqn: layer.mask.cpu() for fqn, layer in sched.layers.items()}
    fresh = sc.export(_mlp().cpu(), masks, format=fmt).model  # the untrained weights
    assert not torch.allclose(fresh(x.cpu()), expected.cpu())
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(fresh(x.cpu()), expected.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0),
    reason="torch's 2:4 semi-structured kernels need compute capability 8.0 or newer",
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nm_2_4_uses_semi_structured_kernel(dtype):
    """On an Ampere-or-newer GPU, 2:4 in half types runs torch's semi-structured kernel when
    asked (the cached weight is a SparseSemiStructuredTensor) and matches F.linear; by default
    the dense path runs and nothing is cached."""
    from sparsity_formats.nm import NMFormat
    from sparsity_plugins.structure_nm import NM

    shape = (256, 512)
    gen = torch.Generator().manual_seed(0)
    nm = NM()
    spec = sc.LayerSpec("layer", shape)
    empty = torch.zeros(shape, dtype=torch.bool)
    mask = nm.fill(torch.rand(shape, generator=gen), empty, ~empty, nm.budget(spec, 0.5), spec)
    weight = (torch.randn(shape, generator=gen) * mask).to(DEVICE, dtype)
    x = torch.randn(64, shape[1], generator=gen).to(DEVICE, dtype)
    bias = torch.randn(shape[0], generator=gen).to(DEVICE, dtype)
    for fmt in (NMFormat(), NMFormat(semi_structured=True)):
        packed = fmt.pack(weight, mask.to(DEVICE))
        out = fmt.linear(packed, x, bias)
        semi = type(packed.semi).__name__.startswith("SparseSemiStructuredTensor")
        assert semi is fmt.semi_structured
        torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("preset", ["rigl", "srigl", "nm_rigl"])
def test_compact_training_on_cuda_matches_the_masked_path(preset):
    """Compact layers on CUDA (the PyTorch path): the masked run's masks after every update
    and its weights within float tolerance, the convolution kept masked beside them."""
    config = sc.preset(preset, density=0.5 if preset == "nm_rigl" else 0.2, delta_t=2)
    runs = []
    for compact in (False, True):
        model = build()
        if compact:
            with pytest.warns(sc.SparsityWarning, match="PyTorch path"):
                sc.to_compact(model, config, total_steps=12, keep_masked=["conv"])
                model(data()[0][0])
        optimizer = adam(model.parameters())
        scheduler = sc.DSTScheduler(model, optimizer, config, total_steps=12)
        trace = []
        for step in range(10):
            x, y = data()[step % 4]
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()
            if scheduler.step():
                trace.append({k: v.clone() for k, v in scheduler.masks.items()})
        runs.append((model, trace))
    (masked, a), (compact, b) = runs
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    for name in ("fc", "head"):
        dense = getattr(compact, name).dense_weight()
        torch.testing.assert_close(dense, getattr(masked, name).weight.detach())
