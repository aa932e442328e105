"""GGML tensor types as data: block size, bytes per block, how to encode, what we refuse.

Decoding always goes through the `gguf` package's dequantizer (gguf-py `gguf/quants.py`).
Encoding uses its quantizers for Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, our `kquants` for Q2_K…Q6_K and
torch casts for F32/F16/BF16. Stochastic rounding on the legacy block types dithers the input:
every value but the ones that set the block's scale moves by (u − ½) of the block's step before
gguf's round-to-nearest quantizer, which is exactly rounding down or up at random (the block's
scale does not change because its extreme values are left alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

from lorabake import rounding
from lorabake.quant import kquants
from lorabake.quant.stochastic import uniform

QT = gguf.GGMLQuantizationType
FLOATS = {"F32": "F32", "F16": "F16", "BF16": "BF16"}  # GGML name → safetensors tag
# Legacy block types: ("sym", n) step = amax / n; ("aff", n) step = (max − min) / n.
LEGACY = {"Q8_0": ("sym", 127), "Q4_0": ("sym", 8), "Q5_0": ("sym", 16), "Q4_1": ("aff", 15), "Q5_1": ("aff", 31)}
# Types we read but cannot re-encode faithfully, with the type written instead when the user
# allows it (--gguf-requant nearest).
REFUSED = {
    **{t: "Q2_K" for t in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "TQ1_0", "TQ2_0")},
    **{t: "Q3_K" for t in ("IQ3_XXS", "IQ3_S")},
    **{t: "Q4_K" for t in ("IQ4_NL", "IQ4_XS", "MXFP4", "NVFP4")},
}
REFUSED_WHY = "needs an importance matrix or a codebook lorabake does not build"


@dataclass(frozen=True)
class GGMLType:
    name: str
    block: int  # values per block
    nbytes: int  # bytes per block

    @property
    def qtype(self) -> gguf.GGMLQuantizationType:
        return QT[self.name]

    @property
    def bits(self) -> float:
        return self.nbytes * 8 / self.block

    @property
    def encodable(self) -> bool:
        return self.name in FLOATS or self.name in LEGACY or self.name in kquants.ENCODERS

    def row_bytes(self, cols: int) -> int:
        return cols // self.block * self.nbytes


def ggml_type(name: str) -> GGMLType:
    block, nbytes = gguf.GGML_QUANT_SIZES[QT[name]]
    return GGMLType(name, block, nbytes)


def decode(raw: np.ndarray, kind: GGMLType, stored_shape: tuple[int, ...]) -> torch.Tensor:
    """Raw bytes of one tensor (numpy uint8) → fp32 torch tensor of its stored shape."""
    if kind.name == "BF16":
        return torch.from_numpy(raw.copy()).view(torch.bfloat16).float().reshape(stored_shape)
    rows = raw.reshape(*stored_shape[:-1], kind.row_bytes(stored_shape[-1]))
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(rows, kind.qtype), dtype=np.float32))


def encode(x: torch.Tensor, kind: GGMLType, *, mode: str, seed_key: str | None) -> np.ndarray:
    """fp32 tensor of the stored shape → raw bytes (uint8, rows × row bytes) of type `kind`."""
    shape = tuple(x.shape)
    if kind.name in FLOATS:
        cast = rounding.cast_to(x.float(), FLOATS[kind.name], mode=mode, seed_key=seed_key)
        return cast.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().reshape(*shape[:-1], -1)
    if shape[-1] % kind.block:
        raise ValueError(f"rows of {shape[-1]} values are not whole {kind.name} blocks of {kind.block}")
    blocks = x.detach().float().cpu().reshape(-1, kind.block).numpy()
    noise = uniform(blocks.shape, seed_key, torch.device("cpu")).numpy() if mode == "stochastic" else None
    if kind.name in kquants.ENCODERS:
        out = kquants.ENCODERS[kind.name](blocks, noise)
    elif kind.name in LEGACY:
        src = blocks if noise is None else _dither(blocks, *LEGACY[kind.name], noise)
        # whole rows: gguf quantizes 16 rows per numpy call, and rows of one block each made that a call
        # per 16 blocks (33x slower on a 3072-wide weight; the bytes are the same, blocks are independent)
        out = gguf.quants.quantize(src.reshape(-1, shape[-1]), kind.qtype)
    else:
        raise ValueError(f"lorabake cannot encode GGML type {kind.name}")
    return np.ascontiguousarray(out, dtype=np.uint8).reshape(*shape[:-1], kind.row_bytes(shape[-1]))


def _dither(blocks: np.ndarray, kind: str, n: int, noise: np.ndarray) -> np.ndarray:
    rows = np.arange(blocks.shape[0])
    if kind == "sym":
        at = np.abs(blocks).argmax(axis=1)
        amax = np.abs(blocks[rows, at])[:, None]
        step, lo, hi = amax / n, -amax * (1 - 2.0**-20), amax * (1 - 2.0**-20)  # the first max stays the max
        keep = [at]
    else:
        lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
        step = (hi - lo) / n
        keep = [blocks.argmin(axis=1), blocks.argmax(axis=1)]
    out = np.clip(blocks + (noise - 0.5) * step, lo, hi).astype(np.float32)
    for at in keep:
        out[rows, at] = blocks[rows, at]
    return out
