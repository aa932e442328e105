"""Quantize on the way out: a plain (bf16/fp16/fp32) base, baked, written in ComfyUI's per-layer
quantized layout (`<layer>.weight` codes, its scales and the `<layer>.comfy_quant` marker, plus the
`_quantization_metadata` header entry), tensor by tensor.

Which layers are quantized is `policy.comfy_format`; everything else keeps its dtype and bytes
(patched ones are rounded back to their own dtype).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import torch

from lorabake import dtypes, rounding
from lorabake.quant.bake import relative_error
from lorabake.quant.codecs import CODECS
from lorabake.quant.swizzle import padded_grid
from lorabake.st_reader import SafetensorsReader, to_tensor
from lorabake.st_writer import SafetensorsWriter

Patch = Callable[[torch.Tensor], torch.Tensor]
OnTensor = Callable[[str, float, float | None], None]


def stored_layout(fmt: str, rows: int, cols: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """role → (safetensors dtype tag, shape) of one layer written in `fmt`."""
    if fmt in ("float8_e4m3fn", "float8_e5m2"):
        tag = CODECS[fmt].weight_tags[0]
        return {"weight": (tag, (rows, cols)), "weight_scale": ("F32", ())}
    if fmt == "nvfp4":
        return {"weight": ("U8", (rows, cols // 2)), "weight_scale": ("F8_E4M3", padded_grid(rows, cols // 16)), "weight_scale_2": ("F32", ())}
    if fmt == "mxfp8":
        return {"weight": ("F8_E4M3", (rows, cols)), "weight_scale": ("F8_E8M0", padded_grid(rows, cols // 32))}
    if fmt == "int8_tensorwise":
        return {"weight": ("I8", (rows, cols)), "weight_scale": ("F32", ())}
    raise ValueError(f"lorabake does not write {fmt}")


def marker(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode("utf-8")), dtype=torch.uint8)


def write_comfy(
    reader: SafetensorsReader,
    target: str,
    patches: Mapping[str, Patch],
    formats: Mapping[str, str],
    metadata: dict[str, str],
    *,
    mode: str,
    device: torch.device,
    on_tensor: OnTensor,
    inputs: list[str],
    force: bool,
    progress: Callable[[int], None] | None = None,
) -> SafetensorsWriter:
    """Stream `reader` into `target`; `formats[name]` is the format of each weight to quantize."""
    entries = []
    layouts = {}
    for name, info in reader.tensors.items():
        fmt = formats.get(name)
        if fmt is None:
            entries.append((name, info.dtype, info.shape))
            continue
        module = name[: -len(".weight")]
        layouts[name] = stored_layout(fmt, *info.shape)
        entries += [(f"{module}.{role}", tag, shape) for role, (tag, shape) in layouts[name].items()]
        entries.append((f"{module}.comfy_quant", "U8", tuple(marker(fmt).shape)))
    meta = dict(metadata)
    meta["_quantization_metadata"] = json.dumps(
        {"format_version": "1.0", "layers": {n[: -len(".weight")]: {"format": f} for n, f in formats.items()}}
    )
    with SafetensorsWriter(target, entries, meta, inputs=inputs, force=force) as writer:
        for name, buf in reader.iter_bytes(reader.tensors):
            info = reader.tensors[name]
            fmt, patch = formats.get(name), patches.get(name)
            if fmt is None and patch is None:
                writer.write(name, buf)
            elif fmt is None:
                w32 = to_tensor(buf, info).to(device=device, dtype=torch.float32)
                new32 = patch(w32)
                out = rounding.cast_to(new32, info.dtype, mode=mode, seed_key=name)
                on_tensor(name, rounding.lost_fraction(w32, new32, out), None)
                writer.write(name, out.cpu())
            else:
                _write_layer(writer, name, to_tensor(buf, info).to(device=device, dtype=torch.float32), fmt, layouts[name], patch, mode, on_tensor)
            if progress:
                progress(len(buf))
    return writer


def _write_layer(writer, name, w32, fmt, layout, patch, mode, on_tensor) -> None:
    codec = CODECS[fmt]
    like = {role: torch.empty(shape if role != "weight" else (0,), dtype=dtypes.torch_dtype(tag)) for role, (tag, shape) in layout.items()}
    new32 = patch(w32) if patch is not None else w32
    encoded = codec.encode(new32, like, mode=mode, seed_key=name)
    if patch is not None:
        realised = codec.decode(encoded)
        base_cast = codec.decode(codec.encode(w32, like, mode="nearest", seed_key=name))
        on_tensor(name, rounding.lost_fraction(w32, new32, realised, base_cast=base_cast), relative_error(realised, new32))
    module = name[: -len(".weight")]
    for role in layout:
        writer.write(f"{module}.{role}" if role != "weight" else name, encoded[role].contiguous().cpu())
    writer.write(f"{module}.comfy_quant", marker(fmt))
