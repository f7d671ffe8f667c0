"""A sparse model as a safetensors file: bit-packed masks, a JSON header, no pickle."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparsity_core as sc
from sparsity_core.errors import CheckpointError, ConfigError
from sparsity_core.sparse_safetensors import (
    FORMAT_VERSION,
    pack_bits,
    read_safetensors,
    unpack_bits,
    write_safetensors,
)


def _trained(method="rigl", *, compact=False, steps=12):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    config = sc.preset(method, density=0.3, delta_t=4)
    if compact:
        sc.to_compact(model, config, total_steps=40)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = sc.DSTScheduler(model, opt, config, total_steps=40)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(
            model(torch.randn(8, 16, generator=gen)), torch.randn(8, 4, generator=gen)
        ).backward()
        opt.step()
        scheduler.step()
    return model, scheduler


@given(st.lists(st.integers(1, 9), min_size=1, max_size=3), st.integers(0, 2**32 - 1))
def test_bits_round_trip(shape, seed):
    mask = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < 0.4
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, tuple(shape)), mask)


def test_bit_order_is_row_major_least_significant_bit_first():
    mask = torch.tensor([[True, False, False, True, False], [False, False, False, True, True]])
    # flat: 1 0 0 1 0 0 0 0 | 1 1 -> 0b00001001, 0b00000011
    assert pack_bits(mask).tolist() == [9, 3]
    with pytest.raises(CheckpointError, match="bits set past its end"):
        unpack_bits(torch.tensor([9, 7], dtype=torch.uint8), (2, 5))


@pytest.mark.parametrize("method", ["rigl", "srigl", "nm_rigl"])
def test_a_masked_model_round_trips(tmp_path, method):
    model, scheduler = _trained(method)
    path = sc.save_safetensors(tmp_path / "model.safetensors", model, scheduler)
    loaded = sc.load_safetensors(path)
    assert loaded.step == scheduler.step_count == 12
    assert loaded.metadata["sparsity_core.format_version"] == str(FORMAT_VERSION)
    assert loaded.config == scheduler.config.to_dict(scheduler.registry)
    for fqn, mask in scheduler.masks.items():
        assert torch.equal(loaded.masks[fqn], mask)
        info = loaded.layers[fqn]
        assert info["active"] == int(mask.sum()) and info["shape"] == list(mask.shape)
        assert info["fan_out_axis"] == 0 and info["layer_type"] == "Linear"
    if method == "nm_rigl":
        assert loaded.layers["0"]["structure"].startswith("nm ")
    state = loaded.state_dict()
    assert state.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor)
    fresh = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    fresh.load_state_dict(state)  # a dense model loads it as it is


def test_active_weights_only_rebuild_the_dense_weights_in_fewer_bytes(tmp_path):
    model, scheduler = _trained("rigl")
    dense = sc.save_safetensors(tmp_path / "dense.safetensors", model, scheduler)
    active = sc.save_safetensors(
        tmp_path / "active.safetensors", model, scheduler, weights="active"
    )
    assert active.stat().st_size < dense.stat().st_size
    loaded = sc.load_safetensors(active)
    assert "0.weight" not in loaded.tensors
    for fqn, mask in scheduler.masks.items():  # the active weights alone, in mask order
        values = loaded.tensors[f"sparsity_core.active.{fqn}"]
        assert torch.equal(values, model.get_submodule(fqn).weight.detach()[mask])
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_a_compact_model_saves_its_dense_weights_and_loads_into_a_masked_one(tmp_path):
    model, scheduler = _trained("srigl", compact=True)
    loaded = sc.load_safetensors(sc.save_safetensors(tmp_path / "c.safetensors", model, scheduler))
    assert not any(k.endswith((".values", ".cols", ".row_ptr")) for k in loaded.tensors)
    for fqn, mask in scheduler.masks.items():
        layer = model.get_submodule(fqn)
        assert torch.equal(loaded.state_dict()[f"{fqn}.weight"], layer.dense_weight().detach())
        assert torch.equal(loaded.masks[fqn], mask)


def test_the_reader_needs_no_pickle(tmp_path, monkeypatch):
    model, scheduler = _trained("rigl")
    path = sc.save_safetensors(tmp_path / "m.safetensors", model, scheduler)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr("pickle.loads", refuse)
    monkeypatch.setattr("pickle.load", refuse)
    assert sc.load_safetensors(path).masks


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])


def test_damaged_files_are_refused_with_the_reason(tmp_path):
    model, scheduler = _trained("rigl")
    good = sc.save_safetensors(tmp_path / "m.safetensors", model, scheduler)
    raw = good.read_bytes()
    cases = {
        "short": (raw[:5], "too short"),
        "header": (struct.pack("<Q", 10**12) + raw[8:], "header"),
        "json": (raw[:8] + b"x" + raw[9:], "not JSON"),
        "truncated": (raw[:-3], "spans bytes"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            sc.load_safetensors(path)

    def overlap(header):
        header["0.bias"]["data_offsets"] = header["0.weight"]["data_offsets"][:1] * 2
        header["0.bias"]["shape"] = [0]

    def version(header):
        header["__metadata__"]["sparsity_core.format_version"] = "99"

    def count(header):
        layers = json.loads(header["__metadata__"]["sparsity_core.layers"])
        layers["2"]["active"] += 1
        header["__metadata__"]["sparsity_core.layers"] = json.dumps(layers)

    for edit, message in (
        (overlap, "gaps or overlaps"),
        (version, "format version 99"),
        (count, "active weights"),
    ):
        path = tmp_path / f"{edit.__name__}.safetensors"
        path.write_bytes(raw)
        _rewrite_header(path, edit)
        with pytest.raises(CheckpointError, match=message):
            sc.load_safetensors(path)


def test_bad_arguments_are_refused(tmp_path):
    model, scheduler = _trained("rigl", steps=1)
    with pytest.raises(ConfigError, match="weights='sparse'"):
        sc.save_safetensors(tmp_path / "x", model, scheduler, weights="sparse")
    with pytest.raises(ConfigError, match="reserved"):
        sc.save_safetensors(tmp_path / "x", model, scheduler, metadata={"sparsity_core.step": "1"})
    with pytest.raises(ConfigError, match="strings"):
        write_safetensors(tmp_path / "x", {}, {"a": 1})
    with pytest.raises(ConfigError, match="complex"):
        write_safetensors(tmp_path / "x", {"z": torch.zeros(2, dtype=torch.complex64)})


def test_the_safetensors_package_reads_our_files_and_we_read_its_files(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model, scheduler = _trained("srigl")
    ours = sc.save_safetensors(tmp_path / "ours.safetensors", model, scheduler)
    theirs = safetensors_torch.load_file(str(ours))
    mine, metadata = read_safetensors(ours)
    assert theirs.keys() == mine.keys()
    for name, tensor in mine.items():
        assert torch.equal(theirs[name], tensor)
    from safetensors import safe_open

    with safe_open(str(ours), framework="pt") as f:
        assert f.metadata() == metadata
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int16),
        "c": torch.rand(4, 4) < 0.5,
        "d": torch.randn(2, 3).to(torch.bfloat16),
        "e": torch.zeros(0, 3),
    }
    safetensors_torch.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"k": "v"})
    read, meta = read_safetensors(tmp_path / "theirs.safetensors")
    assert meta == {"k": "v"}
    for name, tensor in tensors.items():
        assert torch.equal(read[name], tensor)
