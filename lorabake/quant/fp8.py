"""fp8 (e4m3fn or e5m2) codes with one scale per tensor (or per output row, legacy scaled fp8).

Real weight = codes · weight_scale. Re-encoding recomputes the scale as amax / fp8 max, as
ComfyUI's "recalculate" does (comfy/quant_ops.py `_TensorCoreFP8LayoutBase.quantize`).
"""

from __future__ import annotations

import torch

from lorabake import dtypes, rounding

Tensor = torch.Tensor
ROLES = ("weight_scale",)


def decode(stored: dict[str, Tensor]) -> Tensor:
    return rounding.dequantize(stored["weight"], stored["weight_scale"])


def encode(w32: Tensor, like: dict[str, Tensor], *, mode: str, seed_key: str | None) -> dict[str, Tensor]:
    tag = dtypes.tag_of(like["weight"].dtype)
    codes, scale = rounding.quantize_scaled(w32, tag, scale_like=like["weight_scale"], mode=mode, seed_key=seed_key)
    return {"weight": codes, "weight_scale": scale}


def logical_shape(stored: tuple[int, ...]) -> tuple[int, ...]:
    return stored
