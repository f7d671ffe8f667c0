"""Tests of ``sparsity_core.export``: masked Linear layers become packed inference modules."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparsity_core import ConfigError, DSTScheduler, LayerError, preset
from sparsity_core.exporting import (
    ExportResult,
    ExportSizeWarning,
    PackedConv,
    PackedLinear,
    export,
)

# (preset, density, format): each format exported from a model trained under a matching preset.
CASES = [
    ("rigl", 0.1, "dense_masked"),
    ("rigl", 0.1, "csr"),
    ("srigl", 0.1, "condensed"),
    ("srigl_no_ablation", 0.1, "condensed"),
    ("nm_rigl", 0.5, "nm"),
]
IDS = [f"{fmt}-{name}" for name, _, fmt in CASES]


def mlp(seed: int = 0) -> nn.Sequential:
    """A small MLP whose fan-ins (32, 64, 32) are divisible by 4."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)
    )


def trained(name: str, density: float, steps: int = 30) -> tuple[nn.Module, DSTScheduler]:
    """The MLP trained ``steps`` SGD steps under preset ``name`` (topology updates every 5)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    config = preset(name, density=density, delta_t=5, seed=0)
    scheduler = DSTScheduler(model, opt, config, total_steps=steps)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 32, generator=gen)
        y = torch.randint(0, 8, (32,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        scheduler.step()
    return model, scheduler


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def held_mask(layer: PackedLinear) -> torch.Tensor:
    """The positions a packed layer stores (dense_masked keeps its mask as a field)."""
    if hasattr(layer.fmt, "mask"):
        return layer.fmt.mask(layer.packed)
    return layer.packed.mask


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request):
    name, density, fmt = request.param
    model, scheduler = trained(name, density)
    return model, scheduler, fmt


class TestOutputsMatch:
    """The exported model computes what the masked model computes."""

    @pytest.mark.parametrize("shape", [(1, 32), (64, 32), (32,), (3, 5, 32)])
    def test_outputs_equal_masked_model(self, case, shape):
        """Batch 1, batch 64, a 1-D input and extra leading dims give the masked outputs."""
        model, scheduler, fmt = case
        result = export(model, scheduler, format=fmt)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert_close(result.model(x), model(x))

    def test_every_linear_is_packed_and_original_untouched(self, case):
        """Each masked Linear becomes a PackedLinear in a copy; the input model keeps its layers."""
        model, scheduler, fmt = case
        result = export(model, scheduler, format=fmt)
        for fqn in scheduler.layers:
            assert isinstance(result.model.get_submodule(fqn), PackedLinear)
            assert isinstance(model.get_submodule(fqn), nn.Linear)
        assert {row.format for row in result.report} == {fmt}

    def test_inference_mode_and_no_grad(self, case):
        """Forward works under inference_mode and no_grad, and after either of them."""
        model, scheduler, fmt = case
        exported = export(model, scheduler, format=fmt).model
        x = torch.randn(4, 32)
        with torch.inference_mode():
            first = exported(x)
        with torch.no_grad():
            second = exported(x)
        assert_close(first.clone(), second)
        assert_close(exported(x).detach(), second)

    def test_unpack_equals_masked_weight(self, case):
        """Each packed layer unpacks to the layer's weight times its mask."""
        model, scheduler, fmt = case
        exported = export(model, scheduler, format=fmt).model
        for fqn, layer in scheduler.layers.items():
            packed = exported.get_submodule(fqn)
            expected = layer.module.weight.detach() * layer.mask
            assert torch.equal(packed.unpack(), expected)


class TestZerosAndAblation:
    """Live zero weights stay live and ablated neurons output exactly the bias."""

    def test_live_zero_weight_survives(self, case):
        """An active weight set to 0 before export is still held (the mask count is kept)."""
        model, scheduler, fmt = case
        layer = scheduler.layers["2"]
        row, col = layer.mask.nonzero()[0].tolist()
        original = layer.module.weight.detach()[row, col].item()
        with torch.no_grad():
            layer.module.weight[row, col] = 0.0
        try:
            packed = export(model, scheduler, format=fmt).model.get_submodule("2")
            held = held_mask(packed)
            assert held[row, col]
            assert int(held.sum()) == int(layer.mask.sum())
            assert packed.unpack()[row, col] == 0
        finally:
            with torch.no_grad():
                layer.module.weight[row, col] = original

    @pytest.mark.parametrize("fmt", ["condensed", "csr", "dense_masked"])
    def test_ablated_neurons_give_bias(self, fmt):
        """Output neurons with no active weight output exactly their bias."""
        layer = nn.Linear(16, 6)
        mask = torch.zeros(6, 16, dtype=torch.bool)
        mask[[0, 2, 5], :4] = True  # constant fan-in 4; neurons 1, 3, 4 ablated
        result = export(layer, {"": mask}, format=fmt)
        out = result.model(torch.randn(7, 16))
        for neuron in (1, 3, 4):
            assert torch.equal(out[:, neuron], layer.bias.detach()[neuron].expand(7))

    def test_trained_srigl_ablated_rows_give_bias(self):
        """In a trained SRigL model, every all-off row outputs its bias."""
        model, scheduler = trained("srigl", 0.1)
        exported = export(model, scheduler).model
        x = torch.randn(5, 32)
        with torch.no_grad():
            out = exported.get_submodule("0")(x)
        dead = (~scheduler.layers["0"].mask.any(dim=1)).nonzero().flatten()
        assert dead.numel() > 0, "no neuron was ablated; train longer or sparser"
        bias = model[0].bias.detach()
        for neuron in dead.tolist():
            assert torch.equal(out[:, neuron], bias[neuron].expand(5))


class TestErrors:
    """Unsupported formats are rejected with the layer and a fix, before anything changes."""

    def test_condensed_on_unstructured_raises_before_modifying(self):
        """Condensed on a RigL (unstructured) layer names the layer and leaves the model intact."""
        model, scheduler = trained("rigl", 0.1, steps=5)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(LayerError, match=r"'0'.*condensed|condensed.*'0'") as info:
            export(model, scheduler, format="condensed", inplace=True)
        assert "csr" in str(info.value)
        assert all(isinstance(model.get_submodule(f), nn.Linear) for f in scheduler.layers)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    def test_later_layer_failure_leaves_earlier_layers(self):
        """A failing last layer leaves even the first (packable) layer unchanged in place."""
        model, scheduler = trained("rigl", 0.1, steps=5)
        with pytest.raises(LayerError, match="'4'"):
            export(model, scheduler, format="csr", rules=[("4", "condensed")], inplace=True)
        assert isinstance(model[0], nn.Linear)

    def test_mapping_pack_error_names_layer(self):
        """With plain masks, the format's pack error surfaces with the layer's name."""
        model = mlp()
        masks = {"2": torch.rand(32, 64) < 0.3}  # not constant fan-in
        with pytest.raises(LayerError, match=r"'2'.*constant fan-in"):
            export(model, masks, format="condensed", inplace=True)
        assert isinstance(model[2], nn.Linear)

    def test_unknown_layer_and_bad_shape(self):
        """Masks for missing layers or of the wrong shape are rejected."""
        with pytest.raises(LayerError, match="nope"):
            export(mlp(), {"nope": torch.ones(2, 2, dtype=torch.bool)})
        with pytest.raises(LayerError, match=r"'0'.*\(3, 3\)"):
            export(mlp(), {"0": torch.ones(3, 3, dtype=torch.bool)})

    @pytest.mark.parametrize("rules", [["csr"], [("0",)], [(1, "csr")], [("", "csr")]])
    def test_bad_rules(self, rules):
        """Rules must be (non-empty pattern, format) pairs."""
        with pytest.raises(ConfigError, match="pattern, format"):
            export(mlp(), {}, rules=rules)

    def test_bad_masks_argument(self):
        """Anything but a scheduler or a mapping is rejected."""
        with pytest.raises(ConfigError, match="DSTScheduler or a mapping"):
            export(mlp(), [torch.ones(64, 32, dtype=torch.bool)])


class TestRules:
    """Rules choose formats per layer: first match on the name or class name wins."""

    def test_rules_pick_per_layer_formats(self):
        """A name rule, then a class-name rule, then the default."""
        model, scheduler = trained("srigl", 0.1, steps=10)
        rules = [("4", "csr"), ("2", "dense_masked"), ("Linear", "condensed"), ("0", "csr")]
        result = export(model, scheduler, format="csr", rules=rules)
        assert [(row.fqn, row.format) for row in result.report] == [
            ("0", "condensed"),
            ("2", "dense_masked"),
            ("4", "csr"),
        ]
        x = torch.randn(9, 32)
        with torch.no_grad():
            assert_close(result.model(x), model(x))

    def test_format_as_dict(self):
        """A {'kind': ..., params} format is created through the registry."""
        model = mlp()
        mask = torch.zeros(64, 32, dtype=torch.bool)
        mask[:, ::4] = True  # 1:4
        result = export(model, {"0": mask}, format={"kind": "nm", "n": 1, "m": 4})
        assert result.model[0].format_params == {"n": 1, "m": 4, "semi_structured": False}
        x = torch.randn(3, 32)
        with torch.no_grad():
            assert_close(result.model[0](x), F.linear(x, model[0].weight * mask, model[0].bias))


class TestReport:
    """The report's bytes are the formats' own counts."""

    def test_bytes_are_format_nbytes(self, case):
        """Dense bytes are numel * element_size, packed bytes the format's nbytes."""
        model, scheduler, fmt = case
        result = export(model, scheduler, format=fmt)
        for row in result.report:
            layer = result.model.get_submodule(row.fqn)
            weight = model.get_submodule(row.fqn).weight
            assert row.dense_bytes == weight.numel() * weight.element_size()
            assert row.packed_bytes == layer.fmt.nbytes(layer.packed)
            assert row.saved_bytes == row.dense_bytes - row.packed_bytes
            assert row.ratio == pytest.approx(row.packed_bytes / row.dense_bytes)
        table = result.format_report()
        assert "total" in table and all(row.fqn in table for row in result.report)

    def test_condensed_saves_bytes_at_90_percent(self):
        """At 90% sparsity condensed stores every layer in under a third of the dense bytes."""
        model, scheduler = trained("srigl", 0.1, steps=10)
        result = export(model, scheduler, format="condensed")
        assert result.packed_bytes < result.dense_bytes / 3
        assert all(row.saved_bytes > 0 for row in result.report)

    def test_warns_when_packing_does_not_save_bytes(self):
        """A nearly dense layer packs larger than dense: the export says which, and the fix."""
        model, scheduler = trained("srigl", 0.1, steps=10)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ExportSizeWarning)
            export(model, scheduler, format="condensed")  # every layer is smaller: no warning
        dense_ish, sched = trained("rigl", 0.9, steps=2)
        with pytest.warns(ExportSizeWarning, match="does not save memory") as caught:
            result = export(dense_ish, sched, format="csr")
        larger = [row for row in result.report if row.ratio >= 1]
        message = str(caught[0].message)
        assert larger and all(f"'{row.fqn}' (csr: " in message for row in larger)
        assert f"rules=[('{larger[0].fqn}', None)]" in message
        with warnings.catch_warnings():
            warnings.simplefilter("error", ExportSizeWarning)
            export(dense_ish, sched, format="dense_masked")  # the oracle format never warns

    def test_conv_layers_skipped_with_reason(self):
        """Conv layers no rule names stay dense, masked, and are reported as skipped."""
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 3)
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = DSTScheduler(model, opt, preset("rigl", density=0.3), total_steps=10)
        result = export(model, scheduler, format="csr")
        assert isinstance(result.model[0], nn.Conv1d)
        assert [(s.fqn, s.layer_type) for s in result.skipped] == [("0", "Conv1d")]
        assert "rules=[('Conv1d', 'csr')]" in result.skipped[0].reason
        assert "skipped 0 (Conv1d)" in result.format_report()
        x = torch.randn(5, 2, 8)
        with torch.no_grad():
            assert_close(result.model(x), model(x))

    def test_conv_from_plain_masks_is_masked(self):
        """With plain masks a skipped conv's inactive weights are zeroed in the export."""
        model = nn.Sequential(nn.Conv1d(2, 4, 3))
        mask = torch.rand(4, 2, 3) < 0.5
        result = export(model, {"0": mask})
        assert torch.equal(result.model[0].weight, model[0].weight.detach() * mask)


class TestStateDict:
    """The exported state_dict holds tensors only and restores identical outputs."""

    def test_round_trip_into_fresh_export(self, case):
        """Save, torch.load(weights_only=True), load into an untrained same-mask export."""
        model, scheduler, fmt = case
        exported = export(model, scheduler, format=fmt).model
        buf = io.BytesIO()
        torch.save(exported.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        masks = {fqn: layer.mask.clone() for fqn, layer in scheduler.layers.items()}
        fresh = export(mlp(seed=5), masks, format=scheduler_formats(scheduler, fmt)).model
        x = torch.randn(6, 32)
        assert not torch.allclose(fresh(x), exported(x))
        fresh.load_state_dict(state)
        assert torch.equal(fresh(x), exported(x))

    def test_load_takes_saved_shapes(self):
        """Loading a CSR export with more non-zeros into one with fewer resizes the buffers."""
        model = mlp()
        dense = torch.ones(64, 32, dtype=torch.bool)
        sparse = torch.eye(64, 32, dtype=torch.bool)
        source = export(model, {"0": dense}, format="csr").model
        target = export(mlp(seed=1), {"0": sparse}, format="csr").model
        target.load_state_dict(source.state_dict())
        x = torch.randn(2, 32)
        assert torch.equal(target(x), source(x))

    def test_to_dtype_rebuilds_packed(self):
        """Moving the module (here to float64) refreshes the packed weight."""
        model, scheduler = trained("srigl", 0.1, steps=5)
        exported = export(model, scheduler).model.double()
        x = torch.randn(3, 32, dtype=torch.float64)
        with torch.no_grad():
            assert_close(exported(x), model.double()(x))
        model.float()


def scheduler_formats(scheduler: DSTScheduler, fmt: str) -> str | dict:
    """The format to export plain masks with (nm needs its N:M spelled out)."""
    if fmt != "nm":
        return fmt
    structure = next(iter(scheduler.layers.values())).structure
    return {"kind": "nm", "n": structure.n, "m": structure.m}


class TestProperties:
    """Export of random constant fan-in masks matches the masked layer for every batch size."""

    @settings(max_examples=25, deadline=None)
    @given(
        out_features=st.integers(1, 12),
        in_features=st.integers(1, 20),
        batch=st.integers(1, 70),
        fmt=st.sampled_from(["condensed", "csr", "dense_masked"]),
        data=st.data(),
    )
    def test_export_of_constant_fan_in_equals_masked_linear(
        self, out_features, in_features, batch, fmt, data
    ):
        """For constant fan-in masks with ablated rows, export equals F.linear(x, w*m, b)."""
        k = data.draw(st.integers(1, in_features))
        live = data.draw(st.lists(st.booleans(), min_size=out_features, max_size=out_features))
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
        mask = torch.zeros(out_features, in_features, dtype=torch.bool)
        for row, on in enumerate(live):
            if on:
                mask[row, torch.randperm(in_features, generator=gen)[:k]] = True
        layer = nn.Linear(in_features, out_features)
        result = export(layer, {"": mask}, format=fmt)
        x = torch.randn(batch, in_features, generator=gen)
        with torch.no_grad():
            assert_close(result.model(x), F.linear(x, layer.weight * mask, layer.bias))


class TestEndToEnd:
    """An SRigL model trained at 90% sparsity on digits keeps its predictions when exported."""

    def test_digits_srigl_predictions_preserved(self):
        """Condensed export predicts exactly like the masked model on the digits test set."""
        pytest.importorskip("sklearn")
        from sparsity_app.data import load_dataset
        from sparsity_app.train import Recipe, build_mlp, method_config

        data = load_dataset("digits")
        torch.manual_seed(0)
        model = build_mlp(data.num_features, (256, 256), data.num_classes)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        steps = 200
        config = method_config("srigl", Recipe(sparsity=0.9, delta_t=25), 0, steps, "4")
        scheduler = DSTScheduler(model, opt, config, total_steps=steps)
        gen = torch.Generator().manual_seed(0)
        n = len(data.y_train)
        for _ in range(steps):
            idx = torch.randint(0, n, (64,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
            scheduler.step()
        assert scheduler.density() == pytest.approx(0.1, abs=0.02)
        result = export(model, scheduler, format="condensed")
        assert isinstance(result, ExportResult)
        with torch.inference_mode():
            masked = model(data.x_test)
            packed = result.model(data.x_test)
        assert torch.equal(packed.argmax(1), masked.argmax(1))
        accuracy = (packed.argmax(1) == data.y_test).float().mean().item()
        assert accuracy == (masked.argmax(1) == data.y_test).float().mean().item()
        assert accuracy > 0.8
        assert result.packed_bytes < result.dense_bytes / 3


# --- convolutions ------------------------------------------------------------------------------


def _conv_mask(weight_shape: tuple[int, ...], fmt: str, gen: torch.Generator) -> torch.Tensor:
    """A mask each format stores: constant fan-in with an ablated row (condensed), 2:4 groups
    along the flattened fan-in (nm; the last group may be short), any mask otherwise."""
    out, fan_in = weight_shape[0], int(torch.tensor(weight_shape[1:]).prod())
    scores = torch.rand(out, fan_in, generator=gen)
    if fmt == "condensed":
        k = max(1, fan_in // 3)
        mask = torch.zeros(out, fan_in, dtype=torch.bool)
        mask.scatter_(1, scores.topk(k, dim=1).indices, True)
        mask[0] = False  # an ablated neuron: its output is the bias
    elif fmt == "nm":
        padded = -(-fan_in // 4) * 4
        groups = F.pad(scores, (0, padded - fan_in), value=-1.0).reshape(out, -1, 4)
        mask = torch.zeros_like(groups, dtype=torch.bool)
        mask.scatter_(-1, groups.topk(2, dim=-1).indices, True)
        mask = mask.reshape(out, padded)[:, :fan_in]
    else:
        mask = scores < 0.4
    return mask.reshape(weight_shape)


@st.composite
def conv_layers(draw):
    """A Conv1d or Conv2d with random geometry and an input it accepts."""
    spatial = draw(st.sampled_from([1, 2]))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(spatial))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(spatial))
    padding = draw(st.sampled_from(["int", "same", "valid"]))
    stride = (1,) * spatial if padding == "same" else tuple(draw(st.integers(1, 2)) for _ in kernel)
    # An int, or one value per dimension (so padding the wrong dimension is caught).
    pad = padding
    if padding == "int":
        pad = draw(st.one_of(st.integers(0, 2), st.tuples(*(st.integers(0, 2) for _ in kernel))))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    extent = [d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True)]
    size = tuple(draw(st.integers(e + 2, e + 6)) for e in extent)  # > any padding (reflect)
    cls = nn.Conv1d if spatial == 1 else nn.Conv2d
    conv = cls(
        draw(st.integers(1, 4)),
        draw(st.integers(1, 6)),
        kernel,
        stride=stride,
        padding=pad,
        dilation=dilation,
        bias=draw(st.booleans()),
        padding_mode=mode,
    )
    lead = draw(st.sampled_from([(), (1,), (3,)]))  # () is an unbatched input
    return conv, (*lead, conv.in_channels, *size)


class TestConvolutions:
    """Conv1d / Conv2d layers named by a rule become PackedConv and compute the masked conv."""

    @pytest.mark.filterwarnings("ignore::sparsity_core.exporting.ExportSizeWarning")
    @settings(max_examples=60, deadline=None)
    @given(
        layer=conv_layers(),
        fmt=st.sampled_from(["dense_masked", "csr", "condensed", "nm"]),
        seed=st.integers(0, 2**16),
    )
    def test_packed_conv_matches_the_masked_conv(self, layer, fmt, seed):
        """Any geometry (stride, dilation, int/'same'/'valid' padding, every padding mode,
        batched or not) and format: the packed conv equals the conv on the masked weight."""
        conv, input_shape = layer
        gen = torch.Generator().manual_seed(seed)
        mask = _conv_mask(tuple(conv.weight.shape), fmt, gen)
        result = export(nn.Sequential(conv), {"0": mask}, rules=[("Conv*", fmt)])
        packed = result.model[0]
        assert isinstance(packed, PackedConv) and not result.skipped
        x = torch.randn(input_shape, generator=gen)
        with torch.no_grad():
            conv.weight.mul_(mask)
            expected = conv(x)
        with torch.inference_mode():
            got = packed(x)
        assert got.shape == expected.shape
        assert_close(got, expected)

    def test_trained_srigl_cnn_exports_and_reloads(self):
        """A CNN trained under SRigL: its convolutions packed as condensed give the same
        outputs, survive a state_dict round trip, and save bytes."""
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv1d(2, 16, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(16, 32, 3, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 7, 4),
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sched = DSTScheduler(model, opt, preset("srigl", density=0.2, delta_t=3), total_steps=15)
        gen = torch.Generator().manual_seed(1)
        for _ in range(15):
            opt.zero_grad()
            x = torch.randn(8, 2, 16, generator=gen)
            F.cross_entropy(model(x), torch.randint(0, 4, (8,), generator=gen)).backward()
            opt.step()
            sched.step()
        result = export(model, sched, rules=[("Conv1d", "condensed")])
        assert [type(m).__name__ for m in result.model if hasattr(m, "fmt")] == [
            "PackedConv",
            "PackedConv",
            "PackedLinear",
        ]
        assert all(row.ratio < 1 for row in result.report)
        assert result.packed_bytes < 0.5 * result.dense_bytes
        x = torch.randn(5, 2, 16, generator=gen)
        with torch.no_grad():
            expected = model(x)
        assert_close(result.model(x), expected)
        buf = io.BytesIO()
        torch.save(result.model.state_dict(), buf)
        buf.seek(0)
        masks = {fqn: layer.mask.clone() for fqn, layer in sched.layers.items()}
        fresh = export(copy_of(model), masks, rules=[("Conv1d", "condensed")]).model
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        assert torch.equal(fresh(x), result.model(x))

    def test_grouped_conv_and_none_rule_stay_dense(self):
        """A grouped conv is skipped with its reason; a rule of None keeps any layer dense;
        both are masked."""
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(8, 2))
        masks = {"0": torch.rand(4, 2, 3) < 0.5, "2": torch.rand(2, 8) < 0.5}
        result = export(model, masks, rules=[("Conv1d", "csr"), ("2", None)])
        assert [(s.fqn, s.layer_type) for s in result.skipped] == [("0", "Conv1d"), ("2", "Linear")]
        assert "groups=2" in result.skipped[0].reason
        assert "format is None" in result.skipped[1].reason
        assert isinstance(result.model[0], nn.Conv1d) and isinstance(result.model[2], nn.Linear)
        assert torch.equal(result.model[0].weight, model[0].weight.detach() * masks["0"])
        assert torch.equal(result.model[2].weight, model[2].weight.detach() * masks["2"])
        with pytest.raises(ConfigError, match="groups=2"):
            PackedConv(None, None, conv=model[0])

    @pytest.mark.filterwarnings("ignore::sparsity_core.exporting.ExportSizeWarning")
    def test_wrong_input_is_named(self):
        """A 4-D input, or one with the wrong channel count, to a packed Conv1d is a LayerError
        naming the layer and the shapes it takes."""
        conv = nn.Conv1d(2, 3, 3)
        packed = export(
            nn.Sequential(conv), {"0": torch.ones(3, 2, 3, dtype=torch.bool)}, rules=[("*", "csr")]
        ).model[0]
        accepted = (
            r"Conv1d\(2, 3, kernel_size=\(3,\)\) expects an input \[batch, 2, L\] or \[2, L\]"
        )
        with pytest.raises(LayerError, match=accepted + r", got shape \(4, 5, 6, 7\)"):
            packed(torch.randn(4, 5, 6, 7))
        with pytest.raises(LayerError, match=accepted + r", got shape \(4, 5, 6\)"):
            packed(torch.randn(4, 5, 6))
        assert (packed.in_features, packed.out_features) == (6, 3)


def copy_of(model: nn.Module) -> nn.Module:
    """A same-architecture model with other weights (so loading is what makes it equal)."""
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.normal_()
    return other
