"""What a quantized checkpoint is made of, from its header: the format of each layer group, the
effective bits per weight, and which weights are kept in high precision. Used by `inspect`.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping

from lorabake import dtypes
from lorabake.quant.comfy import QuantLayer
from lorabake.st_header import TensorInfo

_INDEX = re.compile(r"\.\d+\.")


def group_of(name: str) -> str:
    """`double_blocks.7.img_attn.qkv.weight` → `double_blocks.{n}.img_attn.qkv.weight`."""
    previous = None
    while previous != name:
        previous, name = name, _INDEX.sub(".{n}.", name)
    return name


def summarize(entries: Mapping[str, tuple[str, tuple[int, ...], int]], kept: set[str]) -> dict:
    """entries: weight name → (format, logical shape, stored bytes incl. its scales); `kept`: the
    names stored as plain floats. Returns the report dict."""
    groups: dict[str, Counter] = defaultdict(Counter)
    params = stored = 0
    for name, (fmt, shape, nbytes) in entries.items():
        groups[group_of(name)][fmt] += 1
        params += math.prod(shape)
        stored += nbytes
    high = sorted({group_of(n) for n in kept})
    return {
        "formats": dict(Counter(fmt for fmt, _, _ in entries.values())),
        "groups": {g: dict(c) for g, c in sorted(groups.items())},
        "bits_per_weight": round(8 * stored / params, 3) if params else None,
        "high_precision": high,
    }


def comfy_report(tensors: Mapping[str, TensorInfo], layers: Mapping[str, QuantLayer]) -> dict | None:
    """Report for a ComfyUI checkpoint (None when it has no quantized layer)."""
    if not layers:
        return None
    members = {k for layer in layers.values() for k in (*layer.members, *layer.kept)}
    entries = {}
    for key, layer in layers.items():
        shape = layer.codec.logical_shape(tensors[key].shape) if layer.codec and not layer.refused else tensors[key].shape
        nbytes = sum(tensors[k].nbytes for k in layer.members if k in tensors)
        entries[key] = (("scaled " if layer.legacy else "") + layer.format, shape, nbytes)
    kept = set()
    for name, info in tensors.items():
        if name in members or not dtypes.is_float(info.dtype) or len(info.shape) < 2:
            continue
        entries[name] = (info.dtype, info.shape, info.nbytes)
        kept.add(name)
    return summarize(entries, kept)


def gguf_report(entries) -> dict:
    """Report for a GGUF model: `entries` name → GGUFTensor."""
    rows = {n: (e.kind.name, e.shape, e.nbytes) for n, e in entries.items()}
    kept = {n for n, e in entries.items() if e.kind.name in ("F32", "F16", "BF16") and len(e.shape) >= 2}
    return summarize(rows, kept)


# A LoRA whose patched tensors lost more than this share of their delta on average mostly vanished.
VANISHED_SHARE = 0.5


def vanished_loras(result) -> list[dict]:
    """LoRAs whose effect mostly did not survive the output's rounding or quantization."""
    rows = []
    for i, lp in enumerate(result.plan.loras):
        hit = sorted({key for key, patches in result.plan.patches.items() for p in patches if p.lora_index == i})
        shares = [result.lost[k] for k in hit if k in result.lost]
        if shares and sum(shares) / len(shares) > VANISHED_SHARE:
            rows.append({"path": lp.reader.path, "mean_lost": sum(shares) / len(shares), "tensors": len(shares)})
    return rows
