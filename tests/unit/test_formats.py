"""Property tests of the packed storage formats: csr, condensed and nm (issue 4).

Every format is checked against the oracle ``weight.masked_fill(~mask, 0)`` and
``F.linear(x, weight * mask, bias)``. The ``check_*`` functions state one invariant each and take
any format, so the deliberately broken formats at the end show the checks can fail.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import scipy.sparse
import torch
import torch.nn.functional as F
from _broken_components import BiasOnlyWhereLive, InferringCSR
from hypothesis import given
from hypothesis import strategies as st

from sparsity_core import (
    ComponentType,
    ConfigError,
    LayerError,
    LayerSpec,
    StorageFormat,
    get_registry,
)
from sparsity_core.structures import compose_structures
from sparsity_core.testing import strategies as sst
from sparsity_formats._common import index_dtype
from sparsity_formats.condensed import Condensed
from sparsity_formats.csr import CSR
from sparsity_formats.nm import NMFormat
from sparsity_plugins.structure_ablation import NeuronAblation
from sparsity_plugins.structure_fan_in import ConstantFanIn
from sparsity_plugins.structure_nm import NM
from sparsity_plugins.structure_unstructured import Unstructured

# Tolerance per unit of sum(|x| * |w|) + |b|: float32 sums in a different order than F.linear;
# half types round the output (F.linear's and ours) to 8 (bfloat16) or 11 (float16) bits.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
BATCHES = st.one_of(st.sampled_from([0, 1, 2, 7, 8, 9, 255, 256, 300]), st.integers(0, 300))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def held_values(fmt: Any, packed: Any) -> int:
    """How many values the packed form holds (not counting empty padding slots)."""
    if isinstance(fmt, CSR):
        return packed.matrix.values().numel()
    if isinstance(fmt, Condensed):
        return packed.values.numel()
    return int((packed.positions < packed.m).sum())


# -- the checks ---------------------------------------------------------------------------------


def check_round_trip(fmt: Any, weight: torch.Tensor, mask: torch.Tensor) -> None:
    """``unpack(pack(w, m))`` is exactly ``w.masked_fill(~m, 0)``, with its shape and dtype."""
    out = fmt.unpack(fmt.pack(weight, mask))
    expected = weight.masked_fill(~mask, 0)
    assert out.dtype == weight.dtype and out.shape == weight.shape, (out.dtype, out.shape)
    assert torch.equal(out, expected), f"{fmt!r}: unpack(pack(w, m)) != w * m"


def check_live_zeros_kept(fmt: Any, weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Every masked position is held, a live weight equal to 0 included (never ``w != 0``)."""
    packed = fmt.pack(weight, mask)
    held = held_values(fmt, packed)
    assert held == int(mask.sum()), f"{fmt!r} holds {held} values for {int(mask.sum())} live"
    assert torch.equal(fmt.mask(packed), mask), f"{fmt!r}: the held positions are not the mask"


def _tolerance(x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    scale = F.linear(x.double().abs(), dense.double().abs(), None)
    if bias is not None:
        scale = scale + bias.double().abs()
    return RTOL[x.dtype] * scale + 1e-6


def check_linear(
    fmt: Any, weight: torch.Tensor, mask: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """``linear`` matches ``F.linear(x, w * m, b)`` within dtype tolerance, shape and dtype too."""
    dense = weight.masked_fill(~mask, 0).reshape(weight.shape[0], -1)
    out = fmt.linear(fmt.pack(weight, mask), x, bias)
    expected = F.linear(x, dense, bias)
    assert out.shape == expected.shape and out.dtype == expected.dtype, (out.shape, out.dtype)
    error = (out.double() - expected.double()).abs()
    assert bool((error <= _tolerance(x, dense, bias)).all()), (
        f"{fmt!r}: linear is off by {error.max().item():.3g} for x {tuple(x.shape)} {x.dtype}"
    )


def check_empty_rows_give_bias(
    fmt: Any, weight: torch.Tensor, mask: torch.Tensor, x: torch.Tensor, bias: torch.Tensor
) -> None:
    """Outputs of neurons with no active weight are exactly the bias."""
    empty = ~mask.reshape(mask.shape[0], -1).any(dim=1)
    out = fmt.linear(fmt.pack(weight, mask), x, bias)
    assert torch.equal(out[..., empty], bias[empty].expand_as(out[..., empty]))


# -- strategies ---------------------------------------------------------------------------------


def _weight_for(mask: torch.Tensor, seed: int, zero_fraction: float) -> torch.Tensor:
    """Random weights with some live ones exactly 0 and some dead ones non-finite."""
    gen = _generator(seed)
    weight = torch.randn(mask.shape, generator=gen)
    zeros = mask & (torch.rand(mask.shape, generator=gen) < zero_fraction)
    dead = ~mask & (torch.rand(mask.shape, generator=gen) < 0.2)
    return weight.masked_fill(zeros, 0.0).masked_fill(dead, float("inf"))


@st.composite
def _layer(draw: Any, structure: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``(weight, mask)`` pair whose mask satisfies ``structure`` (ablated neurons included)."""
    fine = getattr(structure, "inner", structure)
    if isinstance(fine, NM) and fine.pad:
        spec = LayerSpec("layer", (draw(st.integers(1, 10)), draw(st.integers(1, 30))))
    else:
        spec = draw(sst.structured_specs(structure, max_side=12, max_groups=6))
    budget = None
    if isinstance(fine, NM):  # the sparse budget (a dense layer is not N:M)
        budget = fine.budget(spec, fine.fixed_density(spec))
    mask = draw(sst.structured_masks(structure, spec, budget=budget, ablate=st.booleans()))
    # Empty rows (as ablation leaves them) keep every structure here satisfied.
    gen = _generator(draw(sst.seeds()))
    empty_fraction = draw(st.sampled_from([0.0, 0.0, 0.3, 0.5, 1.0]), label="empty rows")
    empty = torch.rand(spec.fan_out, generator=gen) < empty_fraction
    mask = mask.masked_fill(empty.view(-1, *[1] * (mask.dim() - 1)), False)
    zero_fraction = draw(st.sampled_from([0.0, 0.3, 1.0]), label="live zeros")
    return _weight_for(mask, draw(sst.seeds()), zero_fraction), mask


def _ablated(inner: Any) -> Any:
    return compose_structures((NeuronAblation(), inner))


nm_structures = st.integers(1, 8).flatmap(
    lambda m: st.builds(NM, n=st.integers(1, m), m=st.just(m), pad=st.booleans())
)
fan_in_structures = st.one_of(
    st.just(ConstantFanIn()), st.just(_ablated(ConstantFanIn())), nm_structures.map(_ablated)
)
any_structures = st.one_of(st.just(Unstructured()), fan_in_structures, nm_structures)


@st.composite
def cases(draw: Any, fmt_name: str) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """``(format, weight, mask)`` for a structure the format supports."""
    if fmt_name == "csr":
        structure = draw(any_structures)
        fmt = CSR()
    elif fmt_name.startswith("condensed"):
        structure = draw(st.one_of(fan_in_structures, nm_structures))
        fmt = Condensed(native=fmt_name == "condensed")
    else:
        structure = draw(st.one_of(nm_structures, nm_structures.map(_ablated)))
        fine = getattr(structure, "inner", structure)
        fmt = NMFormat(n=fine.n, m=fine.m)
    weight, mask = draw(_layer(structure))
    return fmt, weight, mask


@st.composite
def inputs(draw: Any, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Inputs ``[..., in_features]``: 1-D, a batch of 0..300, or extra leading dimensions."""
    lead = draw(
        st.one_of(
            st.just(()),
            BATCHES.map(lambda b: (b,)),
            st.tuples(st.integers(1, 3), st.integers(0, 5)),
        )
    )
    x = torch.randn((*lead, in_features), generator=_generator(draw(sst.seeds())))
    return x.to(dtype)


# condensed_torch: the pure-PyTorch kernels, which stand in when the compiled one cannot build.
FORMATS = ["csr", "condensed", "condensed_torch", "nm"]


# -- properties ---------------------------------------------------------------------------------


class TestRoundTrip:
    """Packing then unpacking gives back exactly the masked weight, nothing inferred from it."""

    @pytest.mark.parametrize("fmt_name", FORMATS)
    @given(data=st.data())
    def test_unpack_of_pack_is_masked_weight(self, fmt_name, data):
        """unpack(pack(w, m)) == w.masked_fill(~m, 0), dead non-finite weights included."""
        fmt, weight, mask = data.draw(cases(fmt_name))
        check_round_trip(fmt, weight, mask)
        check_round_trip(fmt, weight.bfloat16(), mask)

    @pytest.mark.parametrize("fmt_name", FORMATS)
    @given(data=st.data())
    def test_live_zero_weights_are_held(self, fmt_name, data):
        """The values held number exactly the mask's count, live zeros included."""
        fmt, weight, mask = data.draw(cases(fmt_name))
        check_live_zeros_kept(fmt, weight, mask)


class TestLinear:
    """``linear`` equals ``F.linear(x, w * m, b)`` for every input shape and both dtypes."""

    @pytest.mark.parametrize("fmt_name", FORMATS)
    @given(data=st.data())
    def test_linear_matches_dense(self, fmt_name, data):
        """Any batch shape (1-D, empty, up to 300, extra dims), float32 and bfloat16, any bias."""
        fmt, weight, mask = data.draw(cases(fmt_name))
        dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
        weight = weight.masked_fill(~mask, 0).to(dtype)  # F.linear's weight must be finite
        in_features = math.prod(weight.shape[1:])
        x = data.draw(inputs(in_features, dtype), label="x")
        bias = None
        if data.draw(st.booleans(), label="bias"):
            bias = torch.randn(weight.shape[0], generator=_generator(0)).to(dtype)
        check_linear(fmt, weight, mask, x, bias)

    @pytest.mark.parametrize("fmt_name", FORMATS)
    @given(data=st.data())
    def test_empty_rows_output_exactly_the_bias(self, fmt_name, data):
        """Ablated (all-off) neurons output exactly the bias at any batch size."""
        fmt, weight, mask = data.draw(cases(fmt_name))
        mask = mask.clone()
        mask[0] = False  # at least one empty row
        in_features = math.prod(weight.shape[1:])
        x = data.draw(inputs(in_features, torch.float32), label="x")
        bias = torch.randn(weight.shape[0], generator=_generator(1))
        check_empty_rows_give_bias(fmt, weight.masked_fill(~mask, 0), mask, x, bias)

    @pytest.mark.parametrize("fmt_name", FORMATS)
    def test_wrong_input_rejected(self, fmt_name):
        """An input whose last dimension is not the fan-in, or of another dtype, is refused."""
        fmt = {
            "csr": CSR(),
            "condensed": Condensed(),
            "condensed_torch": Condensed(native=False),
            "nm": NMFormat(),
        }[fmt_name]
        mask = torch.tensor([[True, False, True, False]] * 3)
        packed = fmt.pack(torch.randn(3, 4), mask)
        with pytest.raises(LayerError, match=rf"{fmt_name.split('_')[0]}\.linear.*\[\.\.\., 4\]"):
            fmt.linear(packed, torch.randn(2, 5))
        with pytest.raises(LayerError, match="float64"):
            fmt.linear(packed, torch.randn(2, 4, dtype=torch.float64))


class TestCSR:
    """CSR converts to and from scipy, which computes the same product."""

    @given(data=st.data())
    def test_scipy_computes_the_same_product(self, data):
        """to_scipy(p) @ x.T == F.linear(x, w * m).T, and explicit zeros survive in scipy."""
        fmt, weight, mask = data.draw(cases("csr"))
        packed = fmt.pack(weight, mask)
        matrix = fmt.to_scipy(packed)
        assert isinstance(matrix, scipy.sparse.csr_matrix)
        assert matrix.nnz == int(mask.sum()) and matrix.has_canonical_format
        dense = weight.masked_fill(~mask, 0).reshape(weight.shape[0], -1)
        x = data.draw(inputs(dense.shape[1], torch.float32).filter(lambda t: t.dim() == 2))
        got = torch.from_numpy(matrix @ x.numpy().T).T
        expected = F.linear(x, dense)
        assert bool(((got - expected.double()).abs() <= _tolerance(x, dense, None)).all())

    @given(data=st.data())
    def test_scipy_round_trip(self, data):
        """from_scipy(to_scipy(p), shape) holds the same weight and the same positions."""
        fmt, weight, mask = data.draw(cases("csr"))
        back = fmt.from_scipy(fmt.to_scipy(fmt.pack(weight, mask)), weight.shape)
        assert torch.equal(fmt.unpack(back), weight.masked_fill(~mask, 0))
        assert torch.equal(fmt.mask(back), mask)

    def test_from_scipy_canonicalises(self):
        """Unsorted and duplicate COO entries are summed into one canonical CSR."""
        coo = scipy.sparse.coo_matrix(([1.0, 2.0, 0.0, 3.0], ([1, 0, 0, 1], [2, 1, 0, 2])), (2, 3))
        packed = CSR().from_scipy(coo, dtype=torch.float32)
        expected = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 4.0]])
        assert torch.equal(CSR().unpack(packed), expected)
        assert torch.equal(CSR().mask(packed), torch.tensor([[1, 1, 0], [0, 0, 1]]).bool())

    def test_from_scipy_rejects_a_wrong_shape(self):
        """A weight shape whose [out, -1] view is not the matrix's shape is refused."""
        with pytest.raises(ConfigError, match=r"not the \[out, -1\] view"):
            CSR().from_scipy(scipy.sparse.eye(4, format="csr"), (4, 3, 2))

    def test_bfloat16_to_scipy_is_float32(self):
        """numpy has no bfloat16, so scipy receives float32 values."""
        packed = CSR().pack(torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(2, 3).bool())
        assert CSR().to_scipy(packed).dtype.name == "float32"


class TestCondensed:
    """The condensed layout: narrow indices, active rows, and a clear error off constant fan-in."""

    @pytest.mark.parametrize(
        ("in_features", "dtype"),
        [
            (1, torch.uint8),
            (256, torch.uint8),
            (257, torch.int16),
            (32768, torch.int16),
            (32769, torch.int32),
        ],
    )
    def test_index_dtype_is_the_narrowest(self, in_features, dtype):
        """Column indices use uint8 up to 256 inputs, int16 up to 32768, else int32."""
        assert index_dtype(in_features) == dtype
        mask = torch.zeros(2, in_features, dtype=torch.bool)
        mask[:, -1] = True
        packed = Condensed().pack(torch.randn(2, in_features), mask)
        assert packed.indices.dtype == dtype
        assert int(packed.indices.long().max()) == in_features - 1

    def test_layout(self):
        """Values and indices are [active, k]; active_rows lists the non-ablated neurons."""
        mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 0]]).bool()
        weight = torch.arange(12.0).reshape(3, 4)
        packed = Condensed().pack(weight, mask)
        assert torch.equal(packed.active_rows, torch.tensor([0, 2]))
        assert torch.equal(packed.indices.long(), torch.tensor([[0, 2], [1, 2]]))
        assert torch.equal(packed.values, torch.tensor([[0.0, 2.0], [9.0, 10.0]]))

    def test_mask_not_constant_fan_in_rejected(self):
        """A mask whose active rows hold different counts raises a LayerError saying so."""
        mask = torch.tensor([[1, 0, 1], [0, 1, 0]]).bool()
        with pytest.raises(LayerError, match=r"not constant fan-in.*between 1 and 2"):
            Condensed().pack(torch.randn(2, 3), mask)

    def test_all_rows_ablated(self):
        """A mask with no active weight packs to nothing and outputs the bias."""
        mask = torch.zeros(3, 5, dtype=torch.bool)
        packed = Condensed().pack(torch.randn(3, 5), mask)
        assert Condensed().nbytes(packed) == 0
        bias = torch.randn(3)
        assert torch.equal(Condensed().linear(packed, torch.randn(4, 5), bias), bias.expand(4, 3))


class TestNM:
    """The N:M layout: uint8 positions, padded fan-ins, too-full groups rejected."""

    def test_layout(self):
        """Values [out, groups, N] with their in-group positions; a short group pads with M."""
        mask = torch.tensor([[1, 0, 0, 1, 0, 1, 0, 0, 1, 0]]).bool()
        weight = torch.arange(10.0).reshape(1, 10)
        packed = NMFormat(n=2, m=4).pack(weight, mask)
        assert packed.positions.dtype == torch.uint8
        assert packed.positions.tolist() == [[[0, 3], [1, 4], [0, 4]]]
        assert packed.values.tolist() == [[[0.0, 3.0], [5.0, 0.0], [8.0, 0.0]]]

    def test_too_many_in_a_group_rejected(self):
        """A group of M holding more than N active weights raises a LayerError."""
        with pytest.raises(LayerError, match=r"not 2:4.*holds 3"):
            NMFormat().pack(torch.randn(2, 8), torch.tensor([[1, 1, 1, 0] * 2] * 2).bool())

    def test_invalid_parameters_rejected(self):
        """N > M, or an M that uint8 positions cannot hold, is a ConfigError."""
        with pytest.raises(ConfigError, match="n=3 > m=2"):
            NMFormat(n=3, m=2)
        with pytest.raises(ConfigError, match=r"\[1, 255\]"):
            NMFormat(n=2, m=256)
        with pytest.raises(ConfigError, match=r"nm.semi_structured='yes' must be True or False"):
            NMFormat(semi_structured="yes")

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    @pytest.mark.parametrize("semi", [False, True])
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("shape", [(128, 256), (6, 12)])
    def test_cuda_2_4_matches_dense(self, dtype, shape, semi):
        """On CUDA, 2:4 (semi-structured when asked, where torch takes the shape) matches
        F.linear."""
        spec = LayerSpec("layer", shape)
        scores = torch.rand(shape, generator=_generator(0))
        empty = torch.zeros(shape, dtype=torch.bool)
        mask = NM().fill(scores, empty, ~empty, NM().budget(spec, 0.5), spec).cuda()
        weight = torch.randn(shape, generator=_generator(1)).cuda().to(dtype) * mask
        bias = torch.randn(shape[0], device="cuda", dtype=dtype)
        for batch in [(), (1,), (3,), (64,), (2, 5)]:
            x = torch.randn((*batch, shape[1]), device="cuda", dtype=dtype)
            check_linear(NMFormat(semi_structured=semi), weight, mask, x, bias)


class TestSupports:
    """Each format says which structures it stores, and refuses the others clearly."""

    FAN_IN = (ConstantFanIn(),)
    ABLATED = (NeuronAblation(), ConstantFanIn())
    NM_24 = (NM(),)

    def test_registered_and_protocol(self):
        """The three formats are registered under their names and are StorageFormats."""
        registry = get_registry()
        for name, cls in [("csr", CSR), ("condensed", Condensed), ("nm", NMFormat)]:
            fmt = registry.create(ComponentType.FORMAT, name)
            assert isinstance(fmt, cls) and isinstance(fmt, StorageFormat)

    def test_csr_supports_everything(self):
        """CSR stores any structure."""
        for structures in [(Unstructured(),), self.FAN_IN, self.ABLATED, self.NM_24]:
            assert CSR().supports(structures)
            CSR().check_supports(structures, LayerSpec("fc", (3, 4)))

    def test_condensed(self):
        """Condensed takes constant fan-in and nm (ablated or not), by instance or by name."""
        for structures in [self.FAN_IN, self.ABLATED, self.NM_24, (NeuronAblation(), NM(1, 8))]:
            assert Condensed().supports(structures)
        assert Condensed().supports(("neuron_ablation", "constant_fan_in"))
        assert Condensed().supports(compose_structures(self.ABLATED))
        assert not Condensed().supports((Unstructured(),))

    def test_condensed_rejects_unstructured(self):
        """The error names the format, the layer, the structure and the fix."""
        with pytest.raises(LayerError) as info:
            Condensed().check_supports(("unstructured",), LayerSpec("encoder.fc1", (3, 4)))
        message = str(info.value)
        for part in ("'condensed'", "'encoder.fc1'", "unstructured", "'csr'", "constant_fan_in"):
            assert part in message
        with pytest.raises(ConfigError, match="'condensed' cannot store a layer"):
            Condensed().check_supports((Unstructured(),))

    def test_nm(self):
        """nm takes its own N:M (padded too, ablated too) and names the format that fits."""
        fmt = NMFormat()
        assert fmt.supports(self.NM_24) and fmt.supports((NeuronAblation(), NM(pad=True)))
        assert not fmt.supports(self.FAN_IN) and not fmt.supports((NM(1, 4),))
        with pytest.raises(LayerError, match=r"'n': 1, 'm': 4"):
            fmt.check_supports((NM(1, 4),), LayerSpec("fc", (3, 4)))
        with pytest.raises(LayerError, match=r"'fc'.*constant_fan_in.*'csr'"):
            fmt.check_supports(self.FAN_IN, LayerSpec("fc", (3, 4)))
        assert NMFormat.for_structures((NeuronAblation(), NM(1, 8))) == NMFormat(n=1, m=8)

    def test_non_bool_mask_rejected(self):
        """pack refuses a mask that is not boolean or not shaped like the weight."""
        for fmt in (CSR(), Condensed(), NMFormat()):
            with pytest.raises(ConfigError, match="boolean mask"):
                fmt.pack(torch.randn(2, 4), torch.ones(2, 4))
            with pytest.raises(ConfigError, match="boolean mask"):
                fmt.pack(torch.randn(2, 4), torch.ones(4, 2, dtype=torch.bool))


class TestBytes:
    """``nbytes`` counts the tensors held; condensed is the smallest for constant fan-in."""

    @pytest.mark.parametrize("fmt_name", FORMATS)
    @given(data=st.data())
    def test_nbytes_is_the_tensors_held(self, fmt_name, data):
        """nbytes equals the exact bytes of each format's tensors."""
        fmt, weight, mask = data.draw(cases(fmt_name))
        packed = fmt.pack(weight, mask)
        live, rows = int(mask.sum()), weight.shape[0]
        if fmt_name == "csr":
            expected = 8 * (rows + 1) + live * (8 + 4)
        elif fmt_name.startswith("condensed"):
            active = int(mask.reshape(rows, -1).any(dim=1).sum())
            expected = live * (4 + packed.indices.element_size()) + 8 * active
        else:
            expected = packed.values.numel() * (4 + 1)
        assert fmt.nbytes(packed) == expected

    def test_condensed_beats_csr_at_90_percent(self):
        """At 90% sparsity with constant fan-in, condensed takes at most 0.6x CSR's bytes."""
        shape = (64, 200)
        spec = LayerSpec("fc", shape)
        scores = torch.rand(shape, generator=_generator(0))
        empty = torch.zeros(shape, dtype=torch.bool)
        mask = ConstantFanIn().fill(scores, empty, ~empty, 20 * 64, spec)
        weight = torch.randn(shape)
        condensed = Condensed().nbytes(Condensed().pack(weight, mask))
        csr = CSR().nbytes(CSR().pack(weight, mask))
        assert condensed <= 0.6 * csr


# -- the checks can fail ------------------------------------------------------------------------


class TestTheChecksCanFail:
    """The checks reject formats that break them on purpose."""

    def _live_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]]).bool()
        weight = torch.randn(3, 4, generator=_generator(0))
        weight[0, 2] = 0.0  # live, yet zero
        return weight, mask

    def test_round_trip_alone_misses_an_inferred_mask(self):
        """Inferring from weight != 0 still round-trips: the dense values agree."""
        check_round_trip(InferringCSR(), *self._live_zero())

    def test_inferred_mask_fails_the_live_zero_check(self):
        """The live-zero check fails the format that infers the mask from weight != 0."""
        weight, mask = self._live_zero()
        check_live_zeros_kept(CSR(), weight, mask)
        with pytest.raises(AssertionError, match="holds 3 values for 4 live"):
            check_live_zeros_kept(InferringCSR(), weight, mask)

    @given(data=st.data())
    def test_inferred_mask_fails_under_hypothesis(self, data):
        """With live zeros drawn by the strategy, the broken format fails whenever one occurs."""
        _, weight, mask = data.draw(cases("csr"))
        if bool((weight[mask] == 0).any()):
            with pytest.raises(AssertionError):
                check_live_zeros_kept(InferringCSR(), weight, mask)
        else:
            check_live_zeros_kept(InferringCSR(), weight, mask)

    def test_missing_bias_fails_the_empty_row_check(self):
        """An all-off neuron that drops its bias fails the empty-row check."""
        weight, mask = self._live_zero()
        x, bias = torch.randn(5, 4), torch.randn(3)
        check_empty_rows_give_bias(CSR(), weight, mask, x, bias)
        with pytest.raises(AssertionError):
            check_empty_rows_give_bias(BiasOnlyWhereLive(), weight, mask, x, bias)
