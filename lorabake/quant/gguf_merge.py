"""Bake into a GGUF base and write a GGUF: every tensor keeps its GGML type, name and shape.

Untouched tensors are copied byte for byte. A patched tensor is decoded with the `gguf` package's
dequantizer, patched in fp32 and encoded again in its own type (`ggml.encode`). Types we cannot
re-encode (I-quants, ternary, fp4) are refused before anything is written, or, when the caller
allows it, the patched tensor is written as the nearest type we can encode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import gguf
import numpy as np
import torch

from lorabake import rounding
from lorabake.errors import InputError
from lorabake.quant.bake import relative_error
from lorabake.quant.ggml import REFUSED, REFUSED_WHY, GGMLType, decode, encode, ggml_type
from lorabake.quant.gguf_file import Field, GGUFBase, GGUFTensor
from lorabake.quant.gguf_out import GGUFOut, OutTensor

Patch = Callable[[torch.Tensor], torch.Tensor]


def output_types(base: GGUFBase, patched: Iterable[str], *, nearest: bool) -> dict[str, GGMLType]:
    """The GGML type each patched tensor is written in; raises for one we cannot re-encode."""
    out = {}
    for name in patched:
        e = base.entries[name]
        if e.kind.encodable:
            out[name] = e.kind
            continue
        sub = REFUSED.get(e.kind.name)
        kind = ggml_type(sub) if sub else None
        if not nearest or kind is None or e.stored_shape[-1] % kind.block:
            raise InputError(
                f"stored as {e.kind.name}, which lorabake cannot re-quantise ({REFUSED_WHY})",
                path=base.path,
                tensor=name,
                hint=f"pass --gguf-requant nearest to write it as {sub}" if sub else "bake into a bf16/F16 copy instead",
            )
        out[name] = kind
    return out


class SafetensorsSource:
    """A plain safetensors base seen as GGUF source tensors (F32/F16/BF16, their own shapes)."""

    def __init__(self, reader) -> None:
        self.reader = reader
        self.entries = {}
        for name, info in reader.tensors.items():
            if info.dtype not in ("F32", "F16", "BF16"):
                raise InputError(f"a {info.dtype} tensor cannot be written to GGUF", path=reader.path, tensor=name,
                                 hint="quantize a bf16/fp16/fp32 base")
            shape = tuple(info.shape) or (1,)
            self.entries[name] = GGUFTensor(name, ggml_type(info.dtype), shape, shape, info.start, info.nbytes)

    def read_bytes(self, name: str) -> np.ndarray:
        return np.frombuffer(self.reader.read_view(name), dtype=np.uint8)


def write_gguf(
    source,
    target: str,
    patches: Mapping[str, Patch],
    layout: Mapping[str, tuple[GGMLType, tuple[int, ...]]],
    fields: list[Field],
    arch: str | None,
    *,
    mode: str,
    device: torch.device,
    on_tensor: Callable[[str, float, float], None],
    progress: Callable[[int], None] | None = None,
) -> None:
    """Stream `source` (a GGUFBase or SafetensorsSource) into `target`. `layout[name]` is the
    (type, stored shape) a tensor is written in when it differs from the source's; `patches[name]`
    maps its real fp32 weight to the patched one."""
    decl = []
    for n, e in source.entries.items():
        kind, stored = layout.get(n, (e.kind, e.stored_shape))
        decl.append(OutTensor(n, kind, stored, e.shape))
    with GGUFOut(target, arch, fields, decl) as out:
        for d in decl:
            e = source.entries[d.name]
            raw = source.read_bytes(d.name)
            if d.name in patches or (d.kind, d.stored_shape) != (e.kind, e.stored_shape):
                w32 = decode(raw, e.kind, e.stored_shape).reshape(e.shape).to(device)
                patch = patches.get(d.name)
                new32 = patch(w32) if patch is not None else w32
                raw = encode(new32.reshape(d.stored_shape), d.kind, mode=mode, seed_key=d.name)
                if patch is not None:
                    realised = decode(raw.reshape(-1), d.kind, d.stored_shape).reshape(e.shape).to(device)
                    same = d.kind == e.kind
                    held = w32 if same else decode(encode(w32.reshape(d.stored_shape), d.kind, mode="nearest", seed_key=d.name).reshape(-1), d.kind, d.stored_shape).reshape(e.shape).to(device)
                    on_tensor(d.name, rounding.lost_fraction(w32, new32, realised, base_cast=held), relative_error(realised, new32))
            out.write(d.name, raw)
            if progress:
                progress(e.nbytes)


def string_fields(values: dict[str, str]) -> list[Field]:
    return [Field(k, v, gguf.GGUFValueType.STRING, None) for k, v in values.items()]
