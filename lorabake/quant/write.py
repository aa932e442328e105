"""The quantized outputs of `merge`: a GGUF base written back as GGUF in its own types, and a plain
base quantized on the way out (`--quant`): GGUF types and mixes into a `.gguf`, ComfyUI per-layer
formats into a `.safetensors`. The merge's plan and patches come in as callables, so this module
knows formats and files, not LoRAs.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping

import gguf
import torch

from lorabake.arch import FAMILIES
from lorabake.errors import UsageError
from lorabake.quant import policy
from lorabake.quant.ggml import GGMLType, ggml_type
from lorabake.quant.gguf_file import Field, GGUFBase, is_gguf
from lorabake.quant.gguf_merge import SafetensorsSource, output_types, string_fields, write_gguf
from lorabake.quant.quantize_out import write_comfy

Patch = Callable[[torch.Tensor], torch.Tensor]
QUANT_CHOICES = tuple(policy.COMFY) + tuple(policy.GGUF)


def check(quant: str | None, base: str, output: str | None, *, dtype_tag: str | None, requant: str) -> None:
    """Usage errors, before any file is opened."""
    if requant not in ("refuse", "nearest"):
        raise UsageError(f"--gguf-requant must be refuse or nearest, not {requant!r}")
    if quant is not None and quant not in QUANT_CHOICES:
        raise UsageError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANT_CHOICES)}")
    if (is_gguf(base) or quant) and dtype_tag:
        raise UsageError("--dtype does not combine with a GGUF base or --quant", hint="use --dtype keep")
    if is_gguf(base) and quant:
        raise UsageError("--quant needs a plain bf16/fp16/fp32 base; a GGUF base keeps its own types")
    if not output:
        return
    if is_gguf(base) and not is_gguf(output):
        raise UsageError("a GGUF base is written as GGUF: give -o NAME.gguf", path=output)
    if is_gguf(output) and not is_gguf(base) and quant not in policy.GGUF:
        raise UsageError("a .gguf output from a safetensors base needs --quant with a GGUF type (e.g. Q8_0, Q4_K_M)", path=output)
    if quant in policy.GGUF and not is_gguf(output):
        raise UsageError(f"--quant {quant} writes GGUF: give -o NAME.gguf", path=output)
    if quant in policy.COMFY and is_gguf(output):
        raise UsageError(f"--quant {quant} writes ComfyUI's safetensors layout: give -o NAME.safetensors", path=output)


def plan_layout(quant: str | None, base, patched, *, requant: str, arch: str = "unknown") -> dict[str, tuple[GGMLType, tuple[int, ...]]]:
    """GGUF outputs: the (type, stored shape) of each tensor that changes type; raises for a
    patched tensor we cannot re-encode. Runs at planning time, before anything is written."""
    if isinstance(base, GGUFBase):
        kinds = output_types(base, patched, nearest=requant == "nearest")
        return {n: (k, base.entries[n].stored_shape) for n, k in kinds.items() if k != base.entries[n].kind}
    if quant not in policy.GGUF:
        return {}
    layout = {}
    for name, e in SafetensorsSource(base).entries.items():
        kind = ggml_type(policy.gguf_type(quant, name, e.shape, e.kind.name, extra_keep=policy.family_keep(arch)))
        stored = policy.stored_shape(e.shape, kind.block)
        if stored is None:  # rows that are no whole blocks and cannot be rearranged: city96's fallback
            kind, stored = ggml_type(policy.GGUF_FALLBACK), e.shape
        if (kind, stored) != (e.kind, e.stored_shape):
            layout[name] = (kind, stored)
    return layout


def write(
    quant: str | None,
    plan,
    target: str,
    layout: Mapping[str, tuple[GGMLType, tuple[int, ...]]],
    patches: Mapping[str, Patch],
    meta: dict[str, str],
    result,
    *,
    mode: str,
    device: torch.device,
    inputs: list[str],
    force: bool,
    progress: Callable[[int], None] | None,
) -> None:
    def record(name: str, lost: float, error: float | None) -> None:
        result.lost[name] = lost
        if error is not None:
            result.quant_error[name] = error
        result.tensors_changed += 1

    started = time.perf_counter()
    base = plan.base
    if isinstance(base, GGUFBase):
        result.retyped = {n: f"{base.entries[n].kind.name} -> {k.name}" for n, (k, _) in layout.items()}
        fields = [f for f in base.fields if f.name not in meta] + string_fields(meta)
        write_gguf(base, target, patches, layout, fields, base.arch, mode=mode, device=device, on_tensor=record, progress=progress)
    elif is_gguf(target):
        fields = [*string_fields({**meta, "lorabake.quant": quant}),
                  Field("general.quantization_version", gguf.GGML_QUANT_VERSION, gguf.GGUFValueType.UINT32, None)]
        write_gguf(SafetensorsSource(base), target, patches, layout, fields, _gguf_arch(plan.info.arch), mode=mode, device=device, on_tensor=record, progress=progress)
    else:
        keep = policy.family_keep(plan.info.arch)
        formats = {n: f for n, i in base.tensors.items() if (f := policy.comfy_format(quant, n, tuple(i.shape), extra_keep=keep))}
        write_comfy(base, target, patches, formats, meta, mode=mode, device=device, on_tensor=record, inputs=inputs, force=force, progress=progress)
    result.output = target
    result.sha256 = _file_sha256(target)
    result.bytes_written = os.path.getsize(target)
    result.seconds = time.perf_counter() - started


def _file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _gguf_arch(arch: str) -> str:
    """The `general.architecture` a GGUF of family `arch` carries: ComfyUI-GGUF's name where it has its own."""
    family = FAMILIES.get(arch)
    return (family.gguf_arch if family else None) or arch
