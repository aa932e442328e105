"""DoRA: a magnitude that rescales the merged weight of a LoRA, LoHa or LoKr module.

LyCORIS writes `dora_scale` ([out, 1, …] per output row, or [1, in, …] per input column);
PEFT writes `lora_magnitude_vector` [out] (per output row, also when stored [1, out, 1, 1]).
W_dora = (W + ΔW)·m / (‖W + ΔW‖ + eps), the norm taken along the magnitude's axis.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorabake.adapters.base import Shape, Shapes, Suffix, Tensor, fault, prod

PARTS = ("dora_scale", "magnitude")
ALGORITHMS = ("lora", "loha", "lokr")  # the adapters DoRA is defined for
MODES = ("lycoris", "comfy")

SUFFIXES = (
    Suffix(".dora_scale", "dora_scale"),  # LyCORIS DoRA
    Suffix(".lora_magnitude_vector", "magnitude", "peft"),  # PEFT save format
    Suffix(".lora_magnitude_vector.weight", "magnitude", "peft"),  # raw PEFT (after infix strip)
)


def check(algo: str, shapes: Shapes, natural: Shape | None) -> None:
    """The magnitude fits ΔW's natural shape, on an adapter DoRA is defined for."""
    mags = [p for p in PARTS if p in shapes]
    if not mags:
        return
    if algo not in ALGORITHMS:
        raise fault(algo, f"{mags[0]} (DoRA) is only defined for {', '.join(ALGORITHMS)}", mags[0])
    if len(mags) > 1:
        raise fault(algo, "both dora_scale and magnitude given", mags[1])
    m = tuple(shapes[mags[0]])
    out = natural[0] if natural else 0
    if prod(m) == out and (mags[0] == "magnitude" or len(m) == 1 or m[0] == out):
        return
    if natural and len(m) >= 2 and m[0] == 1 and prod(natural[1:]) % max(prod(m), 1) == 0:
        return
    raise fault(algo, f"{mags[0]} shape {list(m)} fits neither the output axis ({out}) nor an input axis of {list(natural or ())}", mags[0])


def per_output_row(part: str, m: Shape, out: int) -> bool:
    """Whether a magnitude of shape `m` scales output rows (as `_axis` decides): then each row of W_dora needs
    only its own row of W + ΔW, so a band of rows is the DoRA of that band (what splitting a fused module needs)."""
    return prod(m) == out and (part == "magnitude" or len(m) == 1 or m[0] == out)


def band(part: str, m: Tensor, rows: slice) -> Tensor:
    """Rows `rows` of a per-output-row magnitude, in the layout it came in ([out] or [out, 1, …])."""
    flat = m.reshape(-1)[rows]
    return flat if part == "magnitude" or m.dim() == 1 else flat.reshape(-1, *m.shape[1:])


def _axis(algo: str, m: Tensor, shape: Sequence[int], *, peft: bool) -> tuple[int, Tensor]:
    """(0, m as [out,1,..]) for a per-output-row magnitude, (1, m as [1,in,1..]) per input column."""
    out = shape[0]
    ones = [1] * (len(shape) - 1)
    if m.numel() == out and (peft or m.dim() == 1 or m.shape[0] == out):
        return 0, m.reshape(out, *ones)
    if len(shape) >= 2 and m.dim() >= 2 and m.shape[0] == 1 and m.numel() == shape[1]:
        return 1, m.reshape(1, shape[1], *ones[1:])
    raise fault(algo, f"DoRA magnitude shape {list(m.shape)} fits neither axis of the weight {list(shape)}")


def _axis_norm(w: Tensor, axis: int) -> Tensor:
    import torch

    keep = [1] * w.dim()
    keep[axis] = w.shape[axis]
    return torch.linalg.vector_norm(w.transpose(0, axis).reshape(w.shape[axis], -1), dim=1).reshape(keep)


def fold(algo: str, w: Tensor, dw: Tensor, m: Tensor, s: float, mode: str, *, peft: bool) -> Tensor:
    """W + s·(W_dora − W): linear in s, W at s = 0 (ComfyUI's and A1111's interpolation).

    `mode="comfy"` reproduces ComfyUI's quirk of normalising the output axis by ‖W‖, not ‖W + ΔW‖.
    """
    import torch

    axis, m = _axis(algo, m, w.shape, peft=peft)
    merged = w + dw
    norm_of = w if (mode == "comfy" and axis == 0) else merged
    norm = _axis_norm(norm_of, axis) + torch.finfo(w.dtype).eps  # LyCORIS adds eps; PEFT does not
    w_dora = merged * (m / norm)
    if s == 1:
        return w_dora
    return w + s * (w_dora - w)
