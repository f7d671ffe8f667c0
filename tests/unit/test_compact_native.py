"""The compiled kernels of compact layers: every instruction set against the PyTorch path.

Marked slow: the first use builds the extension (about 20 s on two cores). The default run
tests the PyTorch path (SPARSITY_CORE_NATIVE=0); these tests run the compiled one.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

import sparsity_core as sc
from sparsity_core import CompactLinear
from sparsity_core.native import COMPACT, compact_kernels
from sparsity_core.testing import check_method_compact_matches_masked

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(shutil.which(tool) for tool in ("c++", "ninja")),
        reason="needs a C++ compiler and ninja",
    ),
]


@pytest.fixture(scope="module")
def kernels():
    module = compact_kernels()
    if module is None:
        pytest.fail(f"the compact kernels did not build: {COMPACT.error}")
    yield module
    module.set_isa(module.available_isas()[0])


ISAS = ["avx512", "avx2", "portable"]


def use(kernels, isa):
    """Switch to ``isa``, or skip where this CPU cannot run it."""
    if isa not in kernels.available_isas():
        pytest.skip(f"this CPU cannot run the {isa} build")
    kernels.set_isa(isa)


def _pair(out_f, in_f, density, dtype, *, ablated=(), bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    mask = torch.rand(out_f, in_f, generator=gen) < density
    mask[list(ablated)] = False
    capacity = min(int(mask.sum()) + 3, mask.numel())
    native = CompactLinear.from_linear(linear, mask, capacity=capacity)
    reference = CompactLinear.from_linear(linear, mask, capacity=capacity)
    reference.native = False
    return native, reference


CASES = {
    "unstructured": dict(out_f=29, in_f=37, density=0.3),
    "ablated rows": dict(out_f=29, in_f=37, density=0.3, ablated=(0, 5, 28)),
    "empty": dict(out_f=8, in_f=9, density=0.0),
    "dense": dict(out_f=16, in_f=16, density=1.1),
    "no bias": dict(out_f=20, in_f=33, density=0.4, bias=False),
    "int32 indices": dict(out_f=3, in_f=2**15 + 7, density=0.01),
    # Enough work per call (at batch 300) for the rows to be split over the threads, and the
    # input gradient over one buffer per thread.
    "threads": dict(out_f=64, in_f=512, density=0.3),
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lead", [(1,), (7,), (300,), (2, 65)], ids=lambda s: "x".join(map(str, s)))
def test_every_isa_matches_the_pytorch_path(kernels, isa, dtype, case, lead):
    """Output, input gradient, value gradient and bias gradient agree with the PyTorch path
    (which is the masked dense product) on batch 1, odd batches, tiles plus a tail, 3-D
    inputs, ablated rows, an empty layer, no bias and int32 column indices."""
    _check_against_the_pytorch_path(kernels, isa, dtype, CASES[case], lead)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", ["threads", "ablated rows", "int32 indices"])
@pytest.mark.parametrize("lead", [(1100,), (3, 700)], ids=lambda s: "x".join(map(str, s)))
def test_wide_batches_match_the_pytorch_path(kernels, isa, dtype, case, lead):
    """Batches of 1024 and more: the input gradient is split over the threads by columns
    (with a tail past the last whole unit of 128), and the products sweep several column
    blocks."""
    _check_against_the_pytorch_path(kernels, isa, dtype, CASES[case], lead)


def _check_against_the_pytorch_path(kernels, isa, dtype, case, lead):
    use(kernels, isa)
    native, reference = _pair(**case, dtype=dtype)
    x = torch.randn(*lead, native.in_features, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = native(xa), reference(xb)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(ya, yb, **tol)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    torch.testing.assert_close(native.values.grad, reference.values.grad, **tol)
    assert bool((native.values.grad[native.nnz :] == 0).all())
    if native.bias is not None:
        torch.testing.assert_close(native.bias.grad, reference.bias.grad, **tol)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", ["unstructured", "ablated rows", "empty", "no bias"])
def test_gradcheck_float64_through_the_kernels(kernels, isa, case):
    use(kernels, isa)
    layer, _ = _pair(**CASES[case], dtype=torch.float64)
    names = ["values"] + (["bias"] if layer.bias is not None else [])

    def f(inputs, *params):
        return torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (inputs,))

    params = [getattr(layer, n).detach().clone().requires_grad_() for n in names]
    x = torch.randn(3, layer.in_features, dtype=torch.float64, requires_grad=True)
    assert layer._kernels(x, params[0]) is not None
    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("isa", ISAS)
def test_the_captured_dense_gradient_matches(kernels, isa):
    use(kernels, isa)
    native, reference = _pair(12, 20, 0.3, torch.float64)
    for layer in (native, reference):
        layer.capture_grad = True
        layer(torch.ones(5, 20, dtype=torch.float64)).square().sum().backward()
    torch.testing.assert_close(native.captured_grad, reference.captured_grad)


@pytest.mark.parametrize("method", ["rigl", "srigl", "nm_rigl"])
def test_compact_training_on_the_kernels_matches_the_masked_path(kernels, method):
    """The kit's equivalence check with the compiled kernels doing the products."""
    check_method_compact_matches_masked(sc.preset(method, density=0.3), max_examples=4)


def test_the_kernels_run_on_torchs_threads(kernels):
    """The library is built with OpenMP: without it at::parallel_for runs every range on the
    calling thread whatever torch.get_num_threads() says (a build without -fopenmp did, and the
    kernels ran at half speed on two cores)."""
    before = torch.get_num_threads()
    try:
        assert kernels.threads_used(64) == min(before, 64)
        torch.set_num_threads(1)
        assert kernels.threads_used(64) == 1
    finally:
        torch.set_num_threads(before)


def test_an_unknown_isa_is_refused(kernels):
    with pytest.raises(ValueError, match="not available on this CPU"):
        kernels.set_isa("sse9")
