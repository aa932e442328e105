"""One quantized layer through a bake: decode to fp32, patch, encode in the same format.

The patch sees the layer's real weight. With a `pre_quant_scale` s (ComfyUI multiplies the
input by s before the matmul), the real weight is W·diag(s), so the patched value is divided by s
again before encoding. Reported per layer: the share of the intended delta that did not survive
(`rounding.lost_fraction`) and the quantization error ‖dequantised − patched‖ / ‖patched‖.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorabake import rounding
from lorabake.quant.comfy import QuantLayer

Tensor = torch.Tensor


@dataclass(frozen=True)
class Rebaked:
    tensors: dict[str, Tensor]  # tensor name → new stored tensor (the weight and its scales)
    lost: float
    error: float


def relative_error(got: Tensor, want: Tensor) -> float:
    norm = float(torch.linalg.vector_norm(want.reshape(-1), dtype=torch.float64))
    diff = float(torch.linalg.vector_norm((got - want).reshape(-1), dtype=torch.float64))
    return 0.0 if norm == 0.0 else diff / norm


def rebake(
    layer: QuantLayer,
    stored: dict[str, Tensor],
    patch: Callable[[Tensor], Tensor],
    *,
    mode: str,
    seed_key: str,
    pre_quant_scale: Tensor | None = None,
) -> Rebaked:
    """`stored`: role → tensor as read; `patch`: real fp32 weight → patched fp32 weight."""
    codec = layer.codec
    if codec is None or layer.refused is not None:
        raise ValueError(f"layer {layer.module} ({layer.format}) cannot be re-quantised: {layer.refused}")
    w32 = codec.decode(stored)
    pre = None if pre_quant_scale is None else pre_quant_scale.to(device=w32.device, dtype=torch.float32).reshape(1, -1)
    real = w32 if pre is None else w32 * pre
    new32 = patch(real)
    target = new32 if pre is None else new32 / torch.where(pre != 0, pre, 1.0)
    encoded = codec.encode(target, stored, mode=mode, seed_key=seed_key)
    realised = codec.decode({**stored, **encoded})
    if pre is not None:
        realised = realised * pre
    lost = rounding.lost_fraction(real, new32, realised, base_cast=real)
    out = {layer.keys[role]: t.contiguous() for role, t in encoded.items()}
    return Rebaked(out, lost, relative_error(realised, new32))
