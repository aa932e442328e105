"""The cuBLAS block-scale tile layout ComfyUI stores nvfp4/mxfp8 block scales in.

A (rows, cols) grid of block scales is zero-padded to (roundup(rows, 128), roundup(cols, 4)) and
cut into 128×4 tiles, tile after tile in row-major order of tiles. Inside a tile, scale (r, c)
lands at flat offset (r % 32)·16 + (r // 32)·4 + c, so the stored tensor has the padded grid's
shape but a different order (comfy-kitchen `comfy_kitchen/float_utils.py` `to_blocked`;
the cuBLAS "block scaling factors layout").
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def roundup(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_grid(rows: int, cols: int) -> tuple[int, int]:
    """Shape of the stored (swizzled) scale tensor for a (rows, cols) grid of block scales."""
    return roundup(rows, 128), roundup(cols, 4)


def swizzle(grid: Tensor) -> Tensor:
    """(rows, cols) block scales, row-major → the stored tiled layout (padded with zeros)."""
    rows, cols = grid.shape
    big_r, big_c = padded_grid(rows, cols)
    raw = grid.contiguous().view(torch.uint8)  # byte moves only: every fp8 flavour, any device
    padded = torch.zeros((big_r, big_c), dtype=torch.uint8, device=grid.device)
    padded[:rows, :cols] = raw
    tiles = padded.view(big_r // 128, 128, big_c // 4, 4).permute(0, 2, 1, 3)  # (rb, cb, 128, 4)
    inner = tiles.reshape(-1, 4, 32, 4).transpose(1, 2)  # row r of a tile = 32·(r // 32) + r % 32
    return inner.reshape(big_r, big_c).contiguous().view(grid.dtype)


def unswizzle(stored: Tensor, rows: int, cols: int) -> Tensor:
    """The stored tiled layout → the (rows, cols) grid of block scales (padding dropped)."""
    big_r, big_c = stored.shape
    if (big_r, big_c) != padded_grid(rows, cols):
        raise ValueError(f"block scales {list(stored.shape)} do not tile a {rows}×{cols} grid")
    raw = stored.contiguous().view(torch.uint8)
    inner = raw.reshape(-1, 32, 4, 4).transpose(1, 2)  # back to (tile, r // 32, r % 32, c)
    grid = inner.reshape(big_r // 128, big_c // 4, 128, 4).permute(0, 2, 1, 3).reshape(big_r, big_c)
    return grid[:rows, :cols].contiguous().view(stored.dtype)
