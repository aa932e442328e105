"""The table of storage formats lorabake can decode and re-encode faithfully, as data.

A `Codec` names the stored dtypes its weight may have, the scale tensors it rewrites (`roles`,
the suffix after `<layer>.`), and its effective bits per weight (codes plus block scales).
Formats ComfyUI knows but we cannot re-quantise as they were made are listed in `REFUSED` with
the reason, so a bake into them fails before a byte is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from lorabake.quant import fp8, int8, mxfp8, nvfp4

Tensor = torch.Tensor


@dataclass(frozen=True)
class Codec:
    name: str  # the `format` of ComfyUI's comfy_quant JSON
    weight_tags: tuple[str, ...]  # safetensors dtype tags the stored weight may have
    roles: tuple[str, ...]  # scale tensors (suffix after "<layer>.") that decode reads and encode rewrites
    bits: float  # effective bits per weight, block scales included
    impl: ModuleType

    @property
    def decode(self) -> Callable[[dict[str, Tensor]], Tensor]:
        return self.impl.decode

    @property
    def encode(self) -> Callable[..., dict[str, Tensor]]:
        return self.impl.encode

    def logical_shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        return self.impl.logical_shape(stored)


CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        Codec("float8_e4m3fn", ("F8_E4M3",), fp8.ROLES, 8.0, fp8),
        Codec("float8_e5m2", ("F8_E5M2",), fp8.ROLES, 8.0, fp8),
        Codec("nvfp4", ("U8",), nvfp4.ROLES, 4.0 + 8.0 / nvfp4.BLOCK, nvfp4),
        Codec("mxfp8", ("F8_E4M3",), mxfp8.ROLES, 8.0 + 8.0 / mxfp8.BLOCK, mxfp8),
        Codec("int8_tensorwise", ("I8",), int8.ROLES, 8.0, int8),
    )
}

# comfy_quant formats that cannot be re-quantised faithfully: the reason, said to the user.
REFUSED: dict[str, str] = {
    "awq_w4a16": "AWQ int4 needs activation statistics to choose its scales",
    "asym_w4a8_int8": "w4a8 stores int4 codes with a learned codebook and per-group scales",
    "convrot_w4a4": "rotated w4a4 stores Hadamard-rotated int4 weights",
    "svdquant_w4a4": "SVDQuant splits the weight into a low-rank branch and a smoothed int4 residual",
    "hybrid_mxfp8": "hybrid mxfp8 carries an extra tensor-wise fallback scale",
}
# Keys next to a quantized weight that a bake keeps byte for byte.
KEPT_ROLES = ("input_scale", "pre_quant_scale", "comfy_quant", "scale_input")
