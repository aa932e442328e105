"""Folding the linear patches of one tensor into row segments for the bake kernel.

Every plain LoRA/LoCon patch on a target becomes part of one stacked product per row segment:
U = [s₁·scale₁·up₁ | s₂·scale₂·up₂ | …] (rows × Σrᵢ) and D = [down₁; down₂; …] (Σrᵢ × cols),
so any number of LoRAs costs one GEMM per row block. Row slices (q, k, v of a fused qkv) cut the
rows into segments with a fixed set of patches each. The other linear adapters (LoHa, LoKr,
full/norm diffs, Tucker LoCon) are materialised once as strength·ΔW rows and added per block.

Anything whose result depends on the weight (DoRA, OFT, BOFT, GLoRA, IA3, set), or that this
fold does not take (a slice along another axis, a patch that does not fit), gives None: the
caller then runs `delta.apply_patches` on the whole tensor, which is exact, keeps the patches'
order and raises the errors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorabake import adapters, delta
from lorabake.errors import LoraFormatError

Tensor = torch.Tensor

# Adapters whose ΔW does not depend on the weight; "lora" with a Tucker `mid` is materialised.
FOLDABLE = ("lora", "loha", "lokr", "full", "norm")


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of the tensor's 2-D view and what is added to them."""

    start: int
    stop: int
    up: Tensor | None = None  # [stop − start, R], strength·scale folded in
    down: Tensor | None = None  # [R, cols]
    dense: tuple[tuple[Tensor, int], ...] = ()  # (strength·ΔW rows, index of their first row)

    @property
    def touched(self) -> bool:
        return self.up is not None or bool(self.dense)


@dataclass(frozen=True)
class _Piece:
    """One patch in checkpoint row space: a factor pair or materialised rows."""

    start: int
    stop: int
    up: Tensor | None = None
    down: Tensor | None = None
    dense: Tensor | None = None


class _Unfoldable(Exception):
    """This tensor goes through `delta.apply_patches` whole."""


def rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    """The 2-D view the kernel works on: output rows × everything else."""
    rows = int(shape[0]) if len(shape) else 1
    return rows, (math.prod(shape) // rows if rows else 0)


def fold(shape: Sequence[int], patches: Sequence[delta.Patch], *, device: torch.device) -> list[Segment] | None:
    """Row segments covering the whole tensor, or None when the whole-tensor path must run."""
    shape = tuple(int(d) for d in shape)
    if not shape or math.prod(shape) == 0:
        return None
    rows, cols = rows_cols(shape)
    try:
        pieces = [piece for p in patches if (piece := _piece(p, shape, cols, device)) is not None]
    except _Unfoldable:
        return None
    return _segments(rows, pieces)


def _piece(p: delta.Patch, shape: tuple[int, ...], cols: int, device: torch.device) -> _Piece | None:
    if p.param != "weight" or p.dora or p.algo not in FOLDABLE or p.transform not in (None, *delta.TRANSFORMS):
        raise _Unfoldable
    if not math.isfinite(p.strength):
        raise _Unfoldable
    rows = shape[0]
    sl = p.slice
    if sl is not None and (sl.dim != 0 or sl.start < 0 or sl.length <= 0 or sl.start + sl.length > rows):
        raise _Unfoldable
    start, n = (sl.start, sl.length) if sl is not None else (0, rows)
    view = (n, *shape[1:])
    if p.transform == "transpose":
        if len(view) != 2:
            raise _Unfoldable
        module_shape = (view[1], view[0])
    else:
        if p.transform == "swap_halves" and n % 2:
            raise _Unfoldable
        module_shape = view
    shapes = {k: tuple(v.shape) for k, v in p.parts.items()}
    try:
        if not adapters.fits(p.algo, shapes, module_shape):
            raise _Unfoldable
    except LoraFormatError:
        raise _Unfoldable from None
    if p.strength == 0:
        return None
    if p.algo == "lora" and "mid" not in p.parts:
        pair = _factors(p, n, cols, device)
        if pair is not None:
            return _Piece(start, start + n, up=pair[0], down=pair[1])
    dw = delta.delta(p.algo, p.parts, out_shape=module_shape, alpha_override=p.alpha_override, scale=p.scale)
    dw = _to_checkpoint(dw.to(device=device, dtype=torch.float32), p.transform)
    return _Piece(start, start + n, dense=dw.reshape(n, cols) * p.strength)


def _factors(p: delta.Patch, n: int, cols: int, device: torch.device) -> tuple[Tensor, Tensor] | None:
    """(U, D) with U @ D = strength·scale·ΔW in checkpoint rows, or None (materialise instead)."""
    up = p.parts["up"].to(device=device, dtype=torch.float32)
    down = p.parts["down"].to(device=device, dtype=torch.float32)
    up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
    factor = p.strength * delta.patch_scale(p)
    if p.transform == "transpose":  # (up @ down)ᵀ = downᵀ @ upᵀ
        if up.shape[0] != cols or down.shape[1] != n:
            return None
        u, d = down.t() * factor, up.t().contiguous()
    else:
        if up.shape[0] != n or down.shape[1] != cols:
            return None
        u = (_swap_halves(up) if p.transform == "swap_halves" else up) * factor
        d = down
    if not (bool(torch.isfinite(u.sum())) and bool(torch.isfinite(d.sum()))):
        raise _Unfoldable  # the whole-tensor path names the bad part
    return u.contiguous(), d.contiguous()


def _swap_halves(t: Tensor) -> Tensor:
    half = t.shape[0] // 2
    return torch.cat((t[half:], t[:half]), dim=0)


def _to_checkpoint(dw: Tensor, transform: str | None) -> Tensor:
    """ΔW in the LoRA's view of the module → the checkpoint's rows (both transforms are involutions)."""
    if transform == "transpose":
        return dw.t()
    if transform == "swap_halves":
        return _swap_halves(dw)
    return dw


def _segments(rows: int, pieces: list[_Piece]) -> list[Segment]:
    bounds = sorted({0, rows, *(p.start for p in pieces), *(p.stop for p in pieces)})
    out = []
    for a, b in zip(bounds, bounds[1:]):
        active = [p for p in pieces if p.start <= a and b <= p.stop]
        low = [p for p in active if p.up is not None]
        up = down = None
        if low:
            ups = [p.up[a - p.start : b - p.start] for p in low]
            up = ups[0] if len(ups) == 1 else torch.cat(ups, dim=1)
            down = low[0].down if len(low) == 1 else torch.cat([p.down for p in low], dim=0)
        dense = tuple((p.dense, p.start) for p in active if p.dense is not None)
        out.append(Segment(a, b, up, down, dense))
    return out
