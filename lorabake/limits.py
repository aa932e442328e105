"""fp32's range, for header-only code (no torch): the bake math runs in fp32, so a strength or
alpha it cannot hold would become Inf or 0 there."""

from __future__ import annotations

import math

FP32_MAX = 3.4028234663852886e38
FP32_TINY = 1.401298464324817e-45  # the smallest subnormal: anything closer to 0 becomes 0


def fits_fp32(value: float | int) -> bool:
    """Finite, and neither overflowing nor underflowing to 0 in fp32 (0 itself fits)."""
    try:
        value = float(value)
    except OverflowError:  # an int beyond float64
        return False
    return math.isfinite(value) and (value == 0.0 or FP32_TINY <= abs(value) <= FP32_MAX)
