"""The `PATH[:STRENGTH[:TE_STRENGTH]][@BLOCKS]` argument of merge, combine, resize and convert."""

from __future__ import annotations

import math
import os

from lorabake import block_spec, limits
from lorabake.errors import UsageError


def parse_lora_arg(text: str):
    """PATH[:STRENGTH[:TE_STRENGTH]][@BLOCKS], numbers taken from the right so paths may contain ':'."""
    from lorabake.plan import LoraSpec  # torch comes with it: not at import, where no handler runs yet

    whole = text
    if not os.path.exists(text):
        text, blocks = block_spec.split(text)
    else:
        blocks = None
    if blocks is not None:
        try:
            block_spec.parse(blocks)
        except block_spec.BlockSpecError as exc:
            raise UsageError(f"--lora {whole!r}: {exc}") from None
    pieces = text.split(":")
    numbers: list[float] = []
    while len(pieces) > 1 and len(numbers) < 2:
        value = _number(pieces[-1])
        if value is None:
            break
        numbers.insert(0, value)
        pieces.pop()
    path = ":".join(pieces)
    if ":" in path and not os.path.exists(path):
        _explain_bad_strengths(text)
    strength = numbers[0] if numbers else 1.0
    te = numbers[1] if len(numbers) > 1 else None
    return LoraSpec(path=path, strength=strength, te_strength=te, blocks=blocks)


def _explain_bad_strengths(text: str) -> None:
    """The path as parsed does not exist: if a shorter prefix does, the rest were meant as
    strengths, so say which one is wrong (a usage error) instead of "no such file"."""
    pieces = text.split(":")
    for cut in range(len(pieces) - 1, 0, -1):
        if os.path.exists(":".join(pieces[:cut])):
            rest = pieces[cut:]
            if len(rest) > 2:
                raise UsageError(f"--lora {text!r} has more than two strengths")
            for piece in rest:
                if _number(piece) is None:
                    raise UsageError(f"strength {piece!r} in --lora {text!r} is not a number")
            return


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        raise UsageError(f"strength {text!r} is not a finite number")
    if not limits.fits_fp32(value):
        raise UsageError(f"strength {text!r} is outside what fp32 holds (±{limits.FP32_MAX:.4g}, smallest {limits.FP32_TINY:.4g})")
    return value
