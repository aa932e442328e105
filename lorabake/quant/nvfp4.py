"""nvfp4: fp4 e2m1 codes in blocks of 16, an fp8 e4m3 scale per block, one fp32 scale per tensor.

Stored (comfy-kitchen `comfy_kitchen/tensor/nvfp4.py`, `backends/eager/quantization.py`):
* `weight`: uint8 (rows, cols / 2), two codes per byte, the even column in the HIGH nibble;
  a code is sign·8 + index into E2M1 = 0, ½, 1, 1½, 2, 3, 4, 6;
* `weight_scale`: fp8 e4m3 block scales of the (rows, cols / 16) grid, in the cuBLAS tile
  layout (`swizzle`);
* `weight_scale_2`: fp32 per-tensor scale.
Real value = E2M1[code] · block_scale · weight_scale_2. Encoding: weight_scale_2 = amax / (448·6);
block scale = block amax / 6 / weight_scale_2, clamped to 448 and rounded to e4m3; codes =
value / (block scale · weight_scale_2), clamped to ±6, rounded to the e2m1 grid (ties to even).
Rows and columns are stored padded to multiples of 16; the planner sees the padded shape.
"""

from __future__ import annotations

import torch

from lorabake.quant.stochastic import uniform
from lorabake.quant.swizzle import swizzle, unswizzle

Tensor = torch.Tensor
ROLES = ("weight_scale", "weight_scale_2")
BLOCK = 16
FP4_MAX = 6.0
FP8_MAX = 448.0
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# 2·value → index, for the values on the grid (2·6 = 12 is the largest)
_INDEX_OF_DOUBLE = torch.tensor([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7], dtype=torch.uint8)


def unpack(packed: Tensor) -> Tensor:
    """uint8 (rows, n) → codes (rows, 2n), high nibble first."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(packed.shape[0], -1)


def pack(codes: Tensor) -> Tensor:
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def code_values(codes: Tensor) -> Tensor:
    mag = E2M1.to(codes.device)[(codes & 0x7).long()]
    return torch.where((codes & 0x8) != 0, -mag, mag)


def to_codes(x: Tensor, *, mode: str, seed_key: str | None) -> Tensor:
    """fp32 values within ±6 → e2m1 codes (uint8); zero keeps a clear sign bit.

    The grid spacing is ½ below 2, 1 in [2, 4) and 2 in [4, 6]: rounding |x| / spacing to an
    integer (half to even, or down/up at random for stochastic) lands on the right neighbour,
    also across a binade edge, and halfway cases go to the code with a zero mantissa bit.
    """
    a = x.abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    if mode == "nearest":
        units = torch.round(a / step)
    elif mode == "stochastic":
        units = torch.floor(a / step + uniform(tuple(a.shape), seed_key, a.device))
    else:
        raise ValueError(f"mode must be nearest or stochastic, not {mode!r}")
    idx = _INDEX_OF_DOUBLE.to(a.device)[(units * step * 2).clamp(max=12).long()]
    negative = (x < 0) & (idx > 0)
    return idx | (negative.to(torch.uint8) << 3)


def _as_fp8(scale: Tensor) -> Tensor:
    return scale.view(torch.float8_e4m3fn) if scale.dtype == torch.uint8 else scale


def decode(stored: dict[str, Tensor]) -> Tensor:
    packed = stored["weight"]
    rows, cols = packed.shape[0], packed.shape[1] * 2
    if cols % BLOCK:
        raise ValueError(f"nvfp4 weight of {cols} columns is not a whole number of blocks of {BLOCK}")
    grid = unswizzle(_as_fp8(stored["weight_scale"]), rows, cols // BLOCK).to(torch.float32)
    total = stored["weight_scale_2"].to(torch.float32).reshape(()).to(packed.device) * grid
    values = code_values(unpack(packed)).reshape(rows, cols // BLOCK, BLOCK)
    return (values * total.unsqueeze(-1)).reshape(rows, cols)


def encode(w32: Tensor, like: dict[str, Tensor], *, mode: str, seed_key: str | None) -> dict[str, Tensor]:
    rows, cols = w32.shape
    like_block, like_tensor = like["weight_scale"], like["weight_scale_2"]
    amax = w32.abs().amax()
    per_tensor = amax / (FP8_MAX * FP4_MAX) if float(amax) > 0 else torch.ones((), device=w32.device)
    per_tensor = per_tensor.to(like_tensor.dtype).to(torch.float32)  # codes are made with the stored value
    blocks = w32.reshape(rows, cols // BLOCK, BLOCK)
    block_scale = (blocks.abs().amax(dim=-1) / FP4_MAX / per_tensor).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    total = (per_tensor * block_scale.to(torch.float32)).unsqueeze(-1)
    scaled = torch.where(total > 0, blocks / torch.where(total > 0, total, 1.0), 0.0).clamp(-FP4_MAX, FP4_MAX)
    codes = to_codes(scaled.reshape(rows, cols), mode=mode, seed_key=seed_key)
    stored_blocks = swizzle(block_scale)
    return {
        "weight": pack(codes),
        "weight_scale": stored_blocks.view(like_block.dtype) if like_block.dtype == torch.uint8 else stored_blocks,
        "weight_scale_2": per_tensor.to(like_tensor.dtype).reshape(like_tensor.shape),
    }


def logical_shape(stored: tuple[int, ...]) -> tuple[int, ...]:
    return (stored[0], stored[1] * 2)
