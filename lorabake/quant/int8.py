"""int8_tensorwise: int8 codes times one fp32 scale (or one per output row).

Real weight = codes · weight_scale; encoding uses scale = amax / 127 and clamps codes to
[-128, 127] (comfy-kitchen `comfy_kitchen/tensor/int8.py` `TensorWiseINT8Layout`).
"""

from __future__ import annotations

import torch

from lorabake.quant.stochastic import uniform

Tensor = torch.Tensor
ROLES = ("weight_scale",)
QMAX = 127.0


def _per_row(scale: Tensor, weight_shape: tuple[int, ...]) -> bool:
    return scale.numel() > 1 and scale.numel() == weight_shape[0]


def _broadcast(scale: Tensor, weight_shape: tuple[int, ...]) -> Tensor:
    s = scale.to(torch.float32)
    if _per_row(scale, weight_shape):
        return s.reshape(weight_shape[0], *([1] * (len(weight_shape) - 1)))
    if s.numel() != 1:
        raise ValueError(f"int8 scale {list(scale.shape)} is neither per-tensor nor per-row of {list(weight_shape)}")
    return s.reshape(())


def decode(stored: dict[str, Tensor]) -> Tensor:
    codes = stored["weight"]
    return codes.to(torch.float32) * _broadcast(stored["weight_scale"], tuple(codes.shape)).to(codes.device)


def encode(w32: Tensor, like: dict[str, Tensor], *, mode: str, seed_key: str | None) -> dict[str, Tensor]:
    like_scale = like["weight_scale"]
    shape = tuple(w32.shape)
    if _per_row(like_scale, shape):
        amax = w32.reshape(shape[0], -1).abs().amax(dim=1)
    else:
        amax = w32.abs().amax()
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    scale = scale.to(like_scale.dtype).reshape(like_scale.shape)  # codes are made with the stored scale
    q = w32 / _broadcast(scale, shape).to(w32.device)
    if mode == "stochastic":
        q = torch.floor(q + uniform(shape, seed_key, w32.device))
    elif mode == "nearest":
        q = torch.round(q)  # half to even
    else:
        raise ValueError(f"mode must be nearest or stochastic, not {mode!r}")
    return {"weight": q.clamp(-128, 127).to(torch.int8), "weight_scale": scale}


def logical_shape(stored: tuple[int, ...]) -> tuple[int, ...]:
    return stored
