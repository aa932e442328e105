"""Find ComfyUI's quantized layers in a checkpoint header: which format each layer is and which
tensors hold its codes and scales. Nothing here touches tensor data except the tiny
`<layer>.comfy_quant` JSON bytes.

The layout (comfy/ops.py `_load_quantized_module`, comfy/quant_ops.py `QUANT_ALGOS`):
* `<layer>.weight` (codes) and `<layer>.comfy_quant`, a uint8 tensor holding the UTF-8 JSON
  `{"format": "nvfp4", ...}`; without it, the header's `_quantization_metadata` entry
  (`{"layers": {"<layer>": {"format": ...}}}`) may name the format;
* scales `<layer>.weight_scale` (and `weight_scale_2` for nvfp4), and `input_scale` /
  `pre_quant_scale`, which a bake keeps as they are;
* legacy "scaled fp8": an fp8 weight with `<layer>.scale_weight` (or `weight_scale`) and no
  format entry, optionally `scale_input` and the file-wide `scaled_fp8` marker.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from lorabake import dtypes
from lorabake.errors import InputError
from lorabake.quant.codecs import CODECS, KEPT_ROLES, REFUSED, Codec
from lorabake.st_header import TensorInfo

METADATA_KEY = "_quantization_metadata"
MARKER = "comfy_quant"
LEGACY_SCALES = ("scale_weight", "weight_scale")
FP8_FORMATS = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
# Block formats: the block size along a row and the padding of the stored weight.
BLOCKED = {"nvfp4": 16, "mxfp8": 32}


@dataclass(frozen=True)
class QuantLayer:
    """One quantized layer. `keys` maps a role ("weight", "weight_scale", …) to its tensor name."""

    module: str
    format: str
    keys: dict[str, str]
    kept: tuple[str, ...] = ()  # tensors of the layer copied byte for byte (input_scale, marker, …)
    codec: Codec | None = None
    refused: str | None = None  # why this layer cannot be re-quantised; None when it can
    legacy: bool = False

    @property
    def weight(self) -> str:
        return self.keys["weight"]

    @property
    def members(self) -> tuple[str, ...]:
        """The tensors a re-quantisation rewrites (weight first)."""
        return tuple(self.keys.values())


def find_layers(
    tensors: Mapping[str, TensorInfo],
    metadata: Mapping[str, str],
    read_bytes: Callable[[str], bytes],
    *,
    path: str | None = None,
) -> dict[str, QuantLayer]:
    """weight key → QuantLayer for every quantized layer of the file (empty for a plain one)."""
    formats = _metadata_formats(metadata, path)
    marker = "." + MARKER
    for name in tensors:
        if name.endswith(marker):
            formats[name[: -len(MARKER) - 1]] = _marker_format(read_bytes(name), name, path)
    layers = {}
    for module, (fmt, conf) in formats.items():
        if module + ".weight" in tensors:
            layers[module + ".weight"] = _layer(module, fmt, conf, tensors)
    for name, info in tensors.items():
        if info.dtype not in FP8_FORMATS or name in layers or not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        scale = next((f"{module}.{s}" for s in LEGACY_SCALES if f"{module}.{s}" in tensors), None)
        if scale is not None:
            layers[name] = _legacy(module, FP8_FORMATS[info.dtype], scale, tensors)
    return layers


def _metadata_formats(metadata: Mapping[str, str], path: str | None) -> dict[str, tuple[str, dict]]:
    text = metadata.get(METADATA_KEY)
    if text is None:
        return {}
    try:
        layers = json.loads(text).get("layers", {})
        return {m: (str(c.get("format")), c) for m, c in layers.items()}
    except (ValueError, AttributeError):
        raise InputError(
            f"header entry {METADATA_KEY} is not a JSON object with per-layer formats", path=path
        ) from None


def _marker_format(raw: bytes, name: str, path: str | None) -> tuple[str, dict]:
    try:
        conf = json.loads(bytes(raw).rstrip(b"\x00").decode("utf-8"))
        return str(conf["format"]), conf
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InputError("is not the UTF-8 JSON of a ComfyUI quantization format", path=path, tensor=name) from None


def _layer(module: str, fmt: str, conf: dict, tensors: Mapping[str, TensorInfo]) -> QuantLayer:
    kept = tuple(f"{module}.{r}" for r in KEPT_ROLES if f"{module}.{r}" in tensors)
    codec = CODECS.get(fmt)
    keys = {"weight": module + ".weight"}
    if codec is None:
        why = REFUSED.get(fmt, "lorabake does not know this format")
        return QuantLayer(module, fmt, keys, kept, None, why)
    keys.update({r: f"{module}.{r}" for r in codec.roles})
    layer = QuantLayer(module, fmt, keys, kept, codec)
    if conf.get("convrot") or (conf.get("params") or {}).get("convrot"):
        return dataclasses.replace(layer, refused="its weights are stored Hadamard-rotated (convrot)")
    return dataclasses.replace(layer, refused=_shape_problem(layer, tensors))


def _legacy(module: str, fmt: str, scale: str, tensors: Mapping[str, TensorInfo]) -> QuantLayer:
    kept = tuple(f"{module}.{r}" for r in KEPT_ROLES if f"{module}.{r}" in tensors)
    keys = {"weight": module + ".weight", "weight_scale": scale}
    layer = QuantLayer(module, fmt, keys, kept, CODECS[fmt], legacy=True)
    return dataclasses.replace(layer, refused=_shape_problem(layer, tensors))


def _shape_problem(layer: QuantLayer, tensors: Mapping[str, TensorInfo]) -> str | None:
    """Why the stored tensors do not form this format (a missing scale, wrong dtype, bad shape)."""
    missing = [k for k in layer.keys.values() if k not in tensors]
    if missing:
        return f"{layer.format} needs {missing[0]}, which the file lacks"
    weight = tensors[layer.weight]
    if weight.dtype not in layer.codec.weight_tags:
        return f"a {layer.format} weight must be stored as {'/'.join(layer.codec.weight_tags)}, not {weight.dtype}"
    if len(weight.shape) != 2 and layer.format in (*BLOCKED, "nvfp4"):
        return f"{layer.format} weights are 2-D, this one is {list(weight.shape)}"
    rows = weight.shape[0] if weight.shape else 1
    if layer.format in BLOCKED:
        from lorabake.quant.swizzle import padded_grid

        cols = layer.codec.logical_shape(weight.shape)[1]
        block = BLOCKED[layer.format]
        want = padded_grid(rows, cols // block) if cols % block == 0 else None
        got = tensors[layer.keys["weight_scale"]].shape
        if want is None or tuple(got) != want:
            return f"block scales {list(got)} do not fit a {rows}×{cols} {layer.format} weight"
        return None
    scale_key = layer.keys["weight_scale"]
    scale = tensors[scale_key]
    if math.prod(scale.shape) not in (1, rows):
        return f"scale {scale_key} {list(scale.shape)} is block-wise; only per-tensor and per-row scales can be re-quantised"
    return None


def member_index(layers: Iterable[QuantLayer]) -> dict[str, QuantLayer]:
    """Every tensor a re-quantisation rewrites → its layer."""
    return {key: layer for layer in layers for key in layer.members}


def logical_tensors(tensors: Mapping[str, TensorInfo], layers: Mapping[str, QuantLayer]) -> dict[str, TensorInfo]:
    """The header as the planner should see it: quantized weights as float tensors of their logical
    shape (an nvfp4 weight stores two values per byte; int8 codes are not a float dtype)."""
    out = dict(tensors)
    for key, layer in layers.items():
        info = tensors[key]
        tag = info.dtype if dtypes.is_float(info.dtype) else "F32"
        usable = layer.codec is not None and layer.refused is None
        shape = layer.codec.logical_shape(info.shape) if usable else info.shape  # refused: named, not matched by shape
        out[key] = dataclasses.replace(info, dtype=tag, shape=shape)
    return out


def refuse_patched(layers: Mapping[str, QuantLayer], patched: Iterable[str], *, path: str | None) -> None:
    """Raise for the first patched layer whose format cannot be re-quantised, before any write."""
    for key in patched:
        layer = layers.get(key)
        if layer is not None and layer.refused is not None:
            raise InputError(
                f"layer {layer.module} is stored as {layer.format} and cannot be re-quantised: {layer.refused}",
                path=path,
                tensor=key,
                hint="bake into a bf16/fp16 copy of the model instead",
            )


class LogicalBase:
    """A base reader whose `tensors` show quantized weights with their logical shapes (for planning)."""

    def __init__(self, reader, layers: dict[str, QuantLayer]) -> None:
        self._reader = reader
        self.tensors = logical_tensors(reader.tensors, layers)

    def __getattr__(self, name: str):
        return getattr(self._reader, name)


def scaled_fp8_scales(tensors: dict) -> dict[str, str]:
    """weight key -> its scale's key for fp8 weights stored with a per-layer scale (legacy
    `scale_weight` or `weight_scale`); the other quantized formats are `quant.comfy.find_layers`'."""
    out = {}
    for name, info in tensors.items():
        if name.endswith(".weight") and info.dtype in ("F8_E4M3", "F8_E5M2"):
            module = name[: -len(".weight")]
            scale = next((f"{module}.{s}" for s in ("scale_weight", "weight_scale") if f"{module}.{s}" in tensors), None)
            if scale is not None:
                out[name] = scale
    return out
