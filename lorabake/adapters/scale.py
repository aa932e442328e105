"""An adapter module's own multiplier, computed in one place, and the scalars it comes from.

scale = the A1111 `scale` part if present; else alpha / rank when the type has a rank and an alpha
is known (the `alpha` tensor, else PEFT's config gives the scale itself); else 1. alpha = 0 gives
scale 0, as ComfyUI and A1111 do (LyCORIS and kohya only rewrite 0 to the rank when *creating* a
network, so their saved files never carry 0).

Scalars are decoded from their raw bytes with numpy, so header-only commands never import torch;
bf16 and fp8, which numpy has no type for, are decoded from their bits.
"""

from __future__ import annotations

import math

from lorabake.adapters.base import Suffix

SUFFIXES = (
    Suffix(".alpha", "alpha"),
    Suffix(".scale", "scale"),  # A1111-only alpha/rank override
)
PARTS = ("alpha", "scale")
SCALAR_SHAPES = ((), (1,))


def scale_of(*, rank: int | None, alpha: float | None, scale_part: float | None = None, peft: float | None = None) -> float:
    """The module's multiplier; see the module docstring. `peft` is a scale from PEFT's config."""
    if scale_part is not None:
        return scale_part
    if rank is None:
        return 1.0
    if alpha is not None:
        return alpha / rank
    if peft is not None:
        return peft
    return 1.0


# safetensors tag -> numpy dtype string, for the tags numpy reads directly.
_NUMPY = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "I8": "i1", "U8": "u1", "I16": "<i2", "U16": "<u2",
    "I32": "<i4", "U32": "<u4", "I64": "<i8", "U64": "<u8",
}  # fmt: skip


def _e4m3fn(byte: int) -> float:
    """float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no Inf, S.1111.111 is NaN."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    if exp == 0xF and man == 0x7:
        return math.nan
    if exp == 0:
        return sign * man / 8 * 2.0**-6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def decode_scalar(raw: bytes | bytearray | memoryview, tag: str) -> float:
    """The value of a one-element tensor from its bytes. Raises ValueError for a non-number dtype."""
    import numpy as np

    raw = bytes(raw)
    if tag in _NUMPY:
        return float(np.frombuffer(raw, dtype=_NUMPY[tag], count=1)[0])
    if tag == "BF16":  # the top half of an fp32
        bits = int(np.frombuffer(raw, dtype="<u2", count=1)[0])
        return float(np.array([bits << 16], dtype="<u4").view("<f4")[0])
    if tag == "F8_E5M2":  # the top byte of an fp16
        return float(np.array([raw[0] << 8], dtype="<u2").view("<f2")[0])
    if tag == "F8_E4M3":
        return _e4m3fn(raw[0])
    if tag == "F8_E8M0":  # a power of two, 0xFF is NaN
        return math.nan if raw[0] == 0xFF else 2.0 ** (raw[0] - 127)
    raise ValueError(f"dtype {tag} does not hold a number")
