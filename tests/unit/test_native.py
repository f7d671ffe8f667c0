"""The compiled CPU kernel of the condensed format: built where a compiler is, right, optional."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from sparsity_formats import _native
from sparsity_formats.condensed import Condensed

HAS_TOOLCHAIN = all(shutil.which(tool) for tool in ("c++", "ninja"))


def _layer(out_features: int, in_features: int, k: int, ablated: int, seed: int = 0):
    """A constant fan-in weight and mask with ``ablated`` all-off rows."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(out_features, in_features, dtype=torch.bool)
    for row in range(ablated, out_features):
        mask[row, torch.randperm(in_features, generator=g)[:k]] = True
    weight = torch.randn(out_features, in_features, generator=g)
    weight[mask & (torch.rand(mask.shape, generator=g) < 0.1)] = 0.0  # live zeros
    return weight, mask[torch.randperm(out_features, generator=g)]


@pytest.fixture
def fresh_state(monkeypatch):
    """Forget any earlier build attempt for the duration of a test."""
    monkeypatch.setattr(
        _native, "_state", {"tried": False, "op": None, "error": None, "seconds": None}
    )


@pytest.mark.slow  # builds the kernel (60-80 s on two cores)
@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs a C++ compiler and ninja")
def test_builds_where_a_toolchain_is():
    status = _native.native_status()
    assert status["available"], status["error"]
    assert status["seconds"] is not None and status["seconds"] >= 0


@pytest.mark.slow  # builds the kernel (60-80 s on two cores)
@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs a C++ compiler and ninja")
@pytest.mark.parametrize("in_features", [200, 3000, 40000])  # uint8, int16, int32 indices
@pytest.mark.parametrize("batch", [1, 2, 7, 65, 300])
@pytest.mark.parametrize("ablated", [0, 5])
def test_native_matches_torch_path_and_dense(in_features, batch, ablated):
    weight, mask = _layer(24, in_features, k=37, ablated=ablated)
    bias = torch.randn(24)
    x = torch.randn(batch, in_features)
    fmt, ref = Condensed(), Condensed(native=False)
    packed = fmt.pack(weight, mask)
    with torch.no_grad():
        got = fmt.linear(packed, x, bias)
        want = ref.linear(packed, x, bias)
    dense = F.linear(x, weight * mask, bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    dead = ~mask.any(dim=1)
    assert torch.equal(got[:, dead], bias[dead].expand(batch, -1))


@pytest.mark.slow  # builds the kernel (60-80 s on two cores)
@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs a C++ compiler and ninja")
@pytest.mark.parametrize("k", [1, 3, 4, 5, 8, 12, 19])  # each of the dot product's loops
@pytest.mark.parametrize("rows", [1, 6, 7])  # paired rows, and one left over
def test_batch_one_dot_products(k, rows):
    weight, mask = _layer(rows, 40, k=k, ablated=0)
    x, bias = torch.randn(1, 40), torch.randn(rows)
    with torch.no_grad():
        got = Condensed().linear(Condensed().pack(weight, mask), x, bias)
    torch.testing.assert_close(got, F.linear(x, weight * mask, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # builds the kernel (60-80 s on two cores)
@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs a C++ compiler and ninja")
def test_batch_one_on_a_weight_too_large_to_pair_rows():
    """Above kPairedBytes (4 MiB of values and indices) the kernel takes one row at a time."""
    weight, mask = _layer(1025, 4000, k=700, ablated=2)  # 1023 x 700 x (4 + 2) bytes: 4.3 MB
    x, bias = torch.randn(1, 4000), torch.randn(1025)
    packed = Condensed().pack(weight, mask)
    assert Condensed().nbytes(packed) > 4 << 20
    with torch.no_grad():
        got = Condensed().linear(packed, x, bias)
    torch.testing.assert_close(got, F.linear(x, weight * mask, bias), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # builds the kernel (60-80 s on two cores)
@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs a C++ compiler and ninja")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 9])
def test_native_half_types(dtype, batch):
    weight, mask = _layer(16, 300, k=30, ablated=3)
    weight, x = weight.to(dtype), torch.randn(batch, 300).to(dtype)
    packed = Condensed().pack(weight, mask)
    with torch.no_grad():
        got = Condensed().linear(packed, x)
    assert got.dtype == dtype
    want = F.linear(x.float(), weight.float() * mask)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.slow  # builds the kernel (60-80 s on two cores)
def test_native_used_only_without_autograd(monkeypatch):
    """The compiled op has no backward: inputs that need gradients take the PyTorch path."""
    calls = []
    real = _native.condensed_linear()
    if real is None:
        pytest.skip("compiled kernel unavailable")

    def spy(*args):  # records the calls the kernel computed (None: it did not apply)
        out = real(*args)
        if out is not None:
            calls.append(args)
        return out

    monkeypatch.setattr(_native, "condensed_linear", lambda: spy)
    weight, mask = _layer(8, 20, k=5, ablated=2)
    fmt = Condensed()
    packed = fmt.pack(weight, mask)
    with torch.inference_mode():
        fmt.linear(packed, torch.randn(3, 20))
    assert len(calls) == 1
    x = torch.randn(3, 20, requires_grad=True)
    fmt.linear(packed, x).sum().backward()
    assert len(calls) == 1 and x.grad is not None
    Condensed(native=False).linear(packed, torch.randn(3, 20))
    assert len(calls) == 1


def test_disabled_by_environment(monkeypatch, fresh_state):
    monkeypatch.setenv("SPARSITY_CORE_NATIVE", "0")
    assert _native.condensed_linear() is None
    assert _native.native_status()["disabled"]


def test_build_failure_warns_once_and_falls_back(monkeypatch, fresh_state):
    def broken_build():
        raise OSError("no compiler here")

    monkeypatch.setenv("SPARSITY_CORE_NATIVE", "1")  # the default test run turns it off
    monkeypatch.setattr(_native, "_build", broken_build)
    weight, mask = _layer(10, 40, k=6, ablated=2)
    fmt = Condensed()
    packed = fmt.pack(weight, mask)
    x = torch.randn(4, 40)
    with pytest.warns(_native.NativeKernelWarning, match="no compiler here"):
        first = fmt.linear(packed, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second attempt
        second = fmt.linear(packed, x)
    torch.testing.assert_close(first, F.linear(x, weight * mask), rtol=1e-5, atol=1e-5)
    assert torch.equal(first, second)
    assert "no compiler here" in _native.native_status()["error"]


@pytest.mark.slow  # builds the kernel (60-80 s on two cores)
@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs a C++ compiler and ninja")
def test_kernel_rejects_inconsistent_arguments():
    binding = _native.condensed_linear()
    operator = torch.ops.sparsity_formats.condensed_linear.default  # registered by the build
    values = torch.randn(3, 2)
    cols = torch.zeros(3, 2, dtype=torch.int16)
    x = torch.randn(1, 4)
    cases = [
        ("outside", torch.tensor([0, 1, 9]), torch.empty(0)),
        ("bias has 2 elements", torch.tensor([0, 1, 2]), torch.randn(2)),
        ("rows must list", torch.tensor([0, 1]), torch.empty(0)),
    ]
    for match, rows, bias in cases:
        with pytest.raises(RuntimeError, match=match) as raised:
            binding(x, values, cols, rows, bias, 4, 5)
        assert "Exception raised from" not in str(raised.value)  # the message, no C++ trace
        with pytest.raises(RuntimeError, match=match):
            operator(x, values, cols, rows, bias, 5)


@pytest.mark.slow  # builds the kernel (60-80 s on two cores)
@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs a C++ compiler and ninja")
def test_binding_declines_what_the_kernel_does_not_compute():
    """None (the caller's PyTorch path) for inputs the kernel does not take; else the output."""
    binding = _native.condensed_linear()
    weight, mask = _layer(6, 10, k=3, ablated=1)
    packed = Condensed().pack(weight, mask)
    args = (packed.values, packed.indices, packed.active_rows, torch.empty(0))
    x = torch.randn(2, 10)
    torch.testing.assert_close(binding(x, *args, 10, 6), F.linear(x, weight * mask))
    assert binding(x, *args, 11, 6) is None  # x is not [batch, in_features]
    assert binding(torch.randn(10), *args, 10, 6) is None  # not 2-D
    assert binding(x.double(), *args, 10, 6) is None  # not the values' dtype
    assert binding(x.requires_grad_(), *args, 10, 6) is None  # a graph to record
    needs_grad = packed.values.clone().requires_grad_()
    assert binding(x.detach(), needs_grad, *args[1:], 10, 6) is None
    assert binding(x.detach(), *args[:3], torch.zeros(6, requires_grad=True), 10, 6) is None
    with torch.no_grad():
        assert binding(x, *args, 10, 6) is not None
    as_int = (packed.values.int(), *args[1:])
    assert binding(x.int(), *as_int, 10, 6) is None  # a dtype the kernel does not read


@pytest.mark.slow  # builds the kernel (60-80 s on two cores)
def test_traced_and_vmapped_calls_take_the_pytorch_path():
    """torch.jit.trace and vmap go through the dispatcher, which the compiled binding skips:
    the binding declines, and the trace records (vmap batches) the PyTorch gather instead."""
    weight, mask = _layer(6, 10, k=3, ablated=1)
    fmt, bias = Condensed(), torch.randn(6)
    packed = fmt.pack(weight, mask)

    def layer(x):
        return fmt.linear(packed, x, bias)

    traced = torch.jit.trace(layer, torch.randn(2, 10), check_trace=False)
    x = torch.randn(2, 10)
    torch.testing.assert_close(traced(x), F.linear(x, weight * mask, bias))
    xs = torch.randn(4, 10)
    torch.testing.assert_close(torch.func.vmap(layer)(xs), F.linear(xs, weight * mask, bias))


def test_ninja_from_the_package_when_none_is_on_path(monkeypatch):
    """Without a ninja on PATH, the build sees the one of the ``ninja`` package (a dependency)
    for its duration only."""
    import sparsity_core.native as core_native

    ninja = pytest.importorskip("ninja")
    monkeypatch.setattr(core_native.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "/nowhere")
    with _native.ninja_on_path():
        assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
    assert os.environ["PATH"] == "/nowhere"


ISAS = ["avx512", "avx2", "portable"]


def _use_isa(isa):
    """Switch the built kernel to ``isa``, or skip where this CPU cannot run it."""
    kernels = _native.kernel_isas()
    assert kernels is not None, _native.native_status()["error"]
    if isa not in kernels.available_isas():
        pytest.skip(f"this CPU cannot run the {isa} build")
    kernels.set_isa(isa)
    return kernels


@pytest.mark.slow  # builds the kernel
@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs a C++ compiler and ninja")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 2, 7, 16, 32, 33, 48, 256])
def test_every_isa_matches_the_pytorch_kernels(isa, dtype, batch):
    """Each instruction set's build (chosen at load time, switched here) gives the PyTorch
    path's output, ablated rows and int32 indices included, at tile widths of 1 to 8 vectors
    (16, 32, 48: the 16-lane AVX-512 tiles of 1 to 3 registers)."""
    kernels = _use_isa(isa)
    previous = kernels.isa()
    try:
        for out_f, in_f, k, ablated in ((37, 300, 7, 3), (64, 40, 5, 0), (16, 2**15 + 5, 12, 2)):
            weight, mask = _layer(out_f, in_f, k, ablated)
            packed = Condensed().pack(weight.to(dtype), mask)
            bias = torch.randn(out_f).to(dtype)
            x = torch.randn(batch, in_f).to(dtype)
            with torch.inference_mode():
                fast = Condensed().linear(packed, x, bias)
                slow = Condensed(native=False).linear(packed, x, bias)
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            torch.testing.assert_close(fast.float(), slow.float(), rtol=tol, atol=tol)
    finally:
        kernels.set_isa(previous)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs a C++ compiler and ninja")
def test_the_isa_environment_variable_picks_one_and_warns_on_an_unknown_one(monkeypatch):
    from sparsity_core.native import NativeKernelWarning as CoreWarning
    from sparsity_core.native import apply_isa_choice

    kernels = _native.kernel_isas()
    previous = kernels.isa()
    try:
        monkeypatch.setenv("SPARSITY_CORE_ISA", "portable")
        apply_isa_choice(kernels, "the condensed kernel")
        assert kernels.isa() == "portable"
        monkeypatch.setenv("SPARSITY_CORE_ISA", "sse9")
        with pytest.warns(CoreWarning, match="sse9.*not available"):
            apply_isa_choice(kernels, "the condensed kernel")
        assert kernels.isa() == "portable"
    finally:
        kernels.set_isa(previous)
