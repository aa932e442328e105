"""mxfp8: fp8 e4m3 codes in blocks of 32 along a row, one power-of-two (E8M0) scale per block.

Stored (comfy-kitchen `comfy_kitchen/tensor/mxfp8.py`, `backends/eager/quantization.py`):
`weight` fp8 e4m3 (rows, cols), `weight_scale` E8M0 bytes of the (rows, cols / 32) grid in the
cuBLAS tile layout (`swizzle`). A scale byte e means 2^(e − 127) (255 is NaN). Encoding takes
e = ceil(log2(block amax / 448)) + 127 clamped to [0, 254], so no code saturates; an all-zero
block gets the byte 0 and zero codes. Rows and columns are stored padded to multiples of 32.
"""

from __future__ import annotations

import torch

from lorabake import rounding
from lorabake.quant.swizzle import swizzle, unswizzle

Tensor = torch.Tensor
ROLES = ("weight_scale",)
BLOCK = 32
FP8_MAX = 448.0
BIAS = 127


def exponent_scale(e8m0: Tensor) -> Tensor:
    e = e8m0.to(torch.int32)
    scale = torch.ldexp(torch.ones(e.shape, dtype=torch.float32, device=e.device), e - BIAS)
    return torch.where(e == 255, torch.nan, scale)


def decode(stored: dict[str, Tensor]) -> Tensor:
    codes = stored["weight"]
    rows, cols = codes.shape
    if cols % BLOCK:
        raise ValueError(f"mxfp8 weight of {cols} columns is not a whole number of blocks of {BLOCK}")
    grid = unswizzle(stored["weight_scale"].view(torch.uint8), rows, cols // BLOCK)
    scale = exponent_scale(grid).to(codes.device)
    values = codes.to(torch.float32).reshape(rows, cols // BLOCK, BLOCK)
    return (values * scale.unsqueeze(-1)).reshape(rows, cols)


def block_exponents(amax: Tensor) -> Tensor:
    """Biased E8M0 exponent per block: ceil(log2(amax / 448)) + 127 in [0, 254], exact via frexp."""
    need = (amax / FP8_MAX).clamp(min=2.0**-127)
    mantissa, exp = torch.frexp(need)  # need = mantissa · 2^exp, mantissa in [0.5, 1)
    ceil_log2 = torch.where(mantissa == 0.5, exp - 1, exp)
    return (ceil_log2 + BIAS).clamp(0, 254)


def encode(w32: Tensor, like: dict[str, Tensor], *, mode: str, seed_key: str | None) -> dict[str, Tensor]:
    rows, cols = w32.shape
    blocks = w32.reshape(rows, cols // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=-1)
    biased = torch.where(amax > 0, block_exponents(amax), 0)
    scale = exponent_scale(biased).unsqueeze(-1)
    scaled = torch.where(amax.unsqueeze(-1) > 0, blocks / scale, 0.0).clamp(-FP8_MAX, FP8_MAX)
    codes = rounding.cast_to(scaled.reshape(rows, cols), "F8_E4M3", mode=mode, seed_key=seed_key)
    stored = swizzle(biased.to(torch.uint8))
    return {"weight": codes, "weight_scale": stored.view(like["weight_scale"].dtype)}


def logical_shape(stored: tuple[int, ...]) -> tuple[int, ...]:
    return stored
