"""A sparse model as one safetensors file: weights, bit-packed masks and a small JSON header.

The file is a plain `safetensors <https://github.com/huggingface/safetensors>`_ file (read here
by our own reader, without pickle and without the ``safetensors`` package, and readable by it):

* an 8-byte little-endian header length ``N``, ``N`` bytes of JSON, then the tensors' bytes;
* every tensor of the model's ``state_dict`` under its usual name, so other tools load the
  weights as they would a dense checkpoint (``weights="dense"``, the default; inactive weights
  are zero), or, with ``weights="active"``, each sparse layer's active weights alone as a 1-D
  tensor ``sparsity_core.active.<layer>`` in row-major order of the mask;
* each sparse layer's mask as ``sparsity_core.mask.<layer>``: ``uint8``, the mask flattened in
  row-major (C) order, bit ``i`` in byte ``i // 8`` at bit ``i % 8`` counting from the least
  significant bit (numpy's ``packbits(..., bitorder="little")``), zero bits past the end;
* in the header's ``__metadata__`` (string values, as the format requires):
  ``sparsity_core.format_version`` (``"1"``), ``sparsity_core.weights`` (``dense`` or
  ``active``), ``sparsity_core.step``, ``sparsity_core.config`` (the scheduler's config as JSON,
  by plugin names) and ``sparsity_core.layers``: JSON mapping each sparse layer to its
  ``shape``, ``layer_type``, ``fan_out_axis`` (the mask's axis of output neurons), ``structure``
  (e.g. ``"nm 2:4"``), ``active`` (the count of set bits), ``param`` (the weight's name, or the
  active tensor's) and ``mask`` (the mask tensor's name).

``docs/safetensors.md`` describes the layout for other tools.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from .checkpoint import atomic_file
from .compact import is_compact
from .distributed import unwrap_model
from .errors import CheckpointError, ConfigError
from .structures import describe

__all__ = [
    "FORMAT_VERSION",
    "SparseFile",
    "load_safetensors",
    "pack_bits",
    "read_safetensors",
    "save_safetensors",
    "unpack_bits",
    "write_safetensors",
]

FORMAT_VERSION = 1
_MASK = "sparsity_core.mask."
_ACTIVE = "sparsity_core.active."

# The format's dtype names, and ours.
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in (
        ("BOOL", "bool"),
        ("U8", "uint8"),
        ("I8", "int8"),
        ("I16", "int16"),
        ("U16", "uint16"),  # torch >= 2.3
        ("I32", "int32"),
        ("U32", "uint32"),
        ("I64", "int64"),
        ("U64", "uint64"),
        ("F16", "float16"),
        ("BF16", "bfloat16"),
        ("F32", "float32"),
        ("F64", "float64"),
    )
    if hasattr(torch, attr)
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
# A header larger than this is refused before it is read (the reference reader's own bound).
_MAX_HEADER = 100_000_000


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as ``uint8`` bytes: row-major order, 8 positions a byte, least
    significant bit first, zero padding bits past the end."""
    flat = mask.detach().reshape(-1).to("cpu", torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The boolean tensor of ``shape`` that :func:`pack_bits` packed into ``packed``."""
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 7) // 8:
        raise CheckpointError(
            f"a packed mask of shape {tuple(shape)} takes {(n + 7) // 8} uint8 bytes, got a "
            f"{packed.dtype} tensor of shape {tuple(packed.shape)}."
        )
    bits = (packed.reshape(-1, 1) & _BIT_WEIGHTS) != 0
    flat = bits.reshape(-1)
    if bool(flat[n:].any()):
        raise CheckpointError("a packed mask has bits set past its end: the file is damaged.")
    return flat[:n].reshape(shape).clone()


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` (any device; copied to the CPU) and string ``metadata`` as a
    safetensors file, atomically."""
    header: dict[str, Any] = {}
    if metadata:
        bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(v, str)}
        if bad:
            raise ConfigError(f"safetensors metadata values must be strings, got {bad}.")
        header["__metadata__"] = dict(metadata)
    blobs, offset = [], 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _NAMES:
            raise ConfigError(
                f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot hold "
                f"(supported: {sorted(str(d) for d in _NAMES)})."
            )
        data = tensor.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
        header[name] = {
            "dtype": _NAMES[data.dtype],
            "shape": list(data.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-len(text)) % 8)  # the tensors start 8-byte aligned
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)
    return Path(path)


def read_safetensors(
    path: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (CPU) and metadata of a safetensors file, without pickle; a file that does
    not follow the format raises :class:`~sparsity_core.errors.CheckpointError`."""
    raw = Path(path).read_bytes()
    where = f"safetensors file {str(path)!r}"
    if len(raw) < 8:
        raise CheckpointError(f"{where} is too short for a header ({len(raw)} bytes).")
    (size,) = struct.unpack("<Q", raw[:8])
    if size > min(_MAX_HEADER, len(raw) - 8):
        raise CheckpointError(f"{where} declares a {size}-byte header in {len(raw)} bytes.")
    try:
        header = json.loads(raw[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where} has a header that is not JSON: {exc}.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where} has a header that is not a JSON object.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{where} has __metadata__ that is not a map of strings.")
    data = memoryview(raw)[8 + size :]
    tensors, spans = {}, []
    for name, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: tensor {name!r} has a bad entry ({exc!r}).") from None
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if (
            min(shape, default=0) < 0
            or not 0 <= begin <= end <= len(data)
            or end - begin != expected
        ):
            raise CheckpointError(
                f"{where}: tensor {name!r} ({entry['dtype']} {list(shape)}) spans bytes "
                f"[{begin}, {end}) of {len(data)}, where its size is {expected} bytes."
            )
        spans.append((begin, end, name))
        flat = (
            torch.frombuffer(bytearray(data[begin:end]), dtype=torch.uint8) if end > begin else None
        )
        tensors[name] = (
            flat.view(dtype).reshape(shape) if flat is not None else torch.empty(shape, dtype=dtype)
        )
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise CheckpointError(
                f"{where}: tensor {name!r} starts at byte {begin}, but the previous one ends at "
                f"{position} (tensors must cover the data without gaps or overlaps)."
            )
        position = end
    if position != len(data):
        raise CheckpointError(f"{where}: {len(data) - position} bytes after the last tensor.")
    return tensors, metadata


@attrs.frozen(eq=False)
class SparseFile:
    """What :func:`load_safetensors` read: every tensor, the masks, and the header."""

    tensors: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    layers: dict[str, dict[str, Any]]
    metadata: dict[str, str]

    @property
    def step(self) -> int:
        return int(self.metadata.get("sparsity_core.step", "0"))

    @property
    def config(self) -> dict[str, Any]:
        """The scheduler's config, as ``DSTConfig.to_dict()`` gave it."""
        return json.loads(self.metadata.get("sparsity_core.config", "{}"))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A dense model's ``state_dict``: the masks and active-weight tensors left out, and each
        sparse layer's dense weight rebuilt from its active weights where the file holds only
        those (zeros at inactive weights)."""
        out = {k: v for k, v in self.tensors.items() if not k.startswith((_MASK, _ACTIVE))}
        for fqn, info in self.layers.items():
            if info["param"].startswith(_ACTIVE):
                mask = self.masks[fqn]
                values = self.tensors[info["param"]]
                weight = values.new_zeros(mask.shape)
                weight[mask] = values
                out[f"{fqn}.weight"] = weight
        return out


def save_safetensors(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    scheduler: Any,
    *,
    weights: str = "dense",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save ``model`` (masked or compact layers) with ``scheduler``'s masks as one safetensors
    file (the layout is in this module's docstring and ``docs/safetensors.md``).

    Args:
        weights: ``"dense"`` stores each sparse layer's dense weight (zeros where inactive) under
            its usual name; ``"active"`` stores only its active weights, in row-major mask order.
        metadata: more string entries for the header (keys must not start with
            ``sparsity_core.``).
    """
    if weights not in ("dense", "active"):
        raise ConfigError(f"save_safetensors: weights={weights!r}; choose 'dense' or 'active'.")
    extra = dict(metadata or {})
    clash = [k for k in extra if k.startswith("sparsity_core.")]
    if clash:
        raise ConfigError(
            f"save_safetensors: metadata keys {clash} are reserved (sparsity_core.*)."
        )
    inner = unwrap_model(model)
    tensors = dict(inner.state_dict())
    layers: dict[str, dict[str, Any]] = {}
    for fqn, layer in scheduler.layers.items():
        module = inner.get_submodule(fqn)
        mask = layer.mask.detach()
        if is_compact(module):
            for name in ("values", "cols", "row_ptr"):
                tensors.pop(f"{fqn}.{name}", None)
            dense = module.dense_weight().detach()
        else:
            dense = module.weight.detach()
        param = f"{fqn}.weight"
        if weights == "active":
            tensors.pop(param, None)
            param = f"{_ACTIVE}{fqn}"
            tensors[param] = dense[mask]
        else:
            tensors[param] = dense * mask
        tensors[f"{_MASK}{fqn}"] = pack_bits(mask)
        layers[fqn] = {
            "shape": list(mask.shape),
            "layer_type": layer.spec.layer_type,
            "fan_out_axis": 0,
            "structure": describe(layer.structure),
            "active": int(torch.count_nonzero(mask)),
            "param": param,
            "mask": f"{_MASK}{fqn}",
        }
    header = {
        "sparsity_core.format_version": str(FORMAT_VERSION),
        "sparsity_core.weights": weights,
        "sparsity_core.step": str(scheduler.step_count),
        "sparsity_core.config": json.dumps(scheduler.config.to_dict(scheduler.registry)),
        "sparsity_core.layers": json.dumps(layers),
        **extra,
    }
    return write_safetensors(path, tensors, header)


def load_safetensors(path: str | os.PathLike[str]) -> SparseFile:
    """Read a file :func:`save_safetensors` wrote: every tensor, the unpacked masks and the
    header, checked (format version, mask sizes, active counts) without pickle."""
    tensors, metadata = read_safetensors(path)
    where = f"safetensors file {str(path)!r}"
    version = metadata.get("sparsity_core.format_version")
    if version is None:
        raise CheckpointError(f"{where} was not written by sparsity_core.save_safetensors.")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{where} has format version {version}; this sparsity-core reads version "
            f"{FORMAT_VERSION}. Upgrade sparsity-core to read it."
        )
    try:
        layers = json.loads(metadata["sparsity_core.layers"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where} has no readable layer table ({exc!r}).") from None
    masks = {}
    for fqn, info in layers.items():
        for key in ("mask", "param"):
            if info.get(key) not in tensors:
                raise CheckpointError(
                    f"{where}: layer {fqn!r} names a missing tensor {info.get(key)!r}."
                )
        shape = tuple(info["shape"])
        mask = unpack_bits(tensors[info["mask"]], shape)
        held = int(torch.count_nonzero(mask))
        if held != info["active"]:
            raise CheckpointError(
                f"{where}: layer {fqn!r} says {info['active']} active weights, its mask holds "
                f"{held}."
            )
        param = tensors[info["param"]]
        fits = param.numel() == held if info["param"].startswith(_ACTIVE) else param.shape == shape
        if not fits:
            raise CheckpointError(
                f"{where}: layer {fqn!r}'s weights {info['param']!r} of shape "
                f"{tuple(param.shape)} do not fit its mask {shape} with {held} active weights."
            )
        masks[fqn] = mask
    return SparseFile(tensors=tensors, masks=masks, layers=layers, metadata=metadata)
