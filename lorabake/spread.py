"""A fused adapter spread over separate base tensors: its ΔW built whole, each tensor given its rows.

A LoRA trained on a fused projection (`attn.to_qkv`, rank r: down [r, in], up [q+k+v, r]; or LoHa/LoKr
on it) meets a checkpoint that stores q, k and v apart. Row bands of ΔW are exact whatever the adapter
(ΔW[rows] = ΔW of the band), so each base tensor gets `full` diff rows: the module's ΔW with its scale,
cut at the target's `delta_rows`. DoRA with a per-output-row magnitude splits too: a row of W_dora needs
only its own row of W + ΔW, so the band is a DoRA LoRA of the band's factor rows and magnitude rows. Adapters
whose result depends on the whole weight (DoRA normalising input columns, OFT, IA3, ...) are not split: the
planner reports them instead.

torch is imported only when a patch is cut: the planner and the rule table read this module too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from lorabake.arch.common import SPREAD_PARTS
from lorabake.types import RowSlice, Target

if TYPE_CHECKING:
    from lorabake.delta import Patch

# adapters whose ΔW depends only on their own factors: the ones a row band of ΔW can be taken from
SPLITTABLE = ("lora", "loha", "lokr", "full")


def cut(patch: Patch, rows: RowSlice | None) -> Patch:
    """`patch` itself when `rows` is None; else a `full` patch holding rows `rows` of its ΔW (the
    module's scale included, so the new patch's scale is 1; strength, slice and transform kept)."""
    if rows is None:
        return patch
    from lorabake import adapters, delta

    if patch.dora:
        return _dora_band(patch, rows)

    shapes = {k: tuple(v.shape) for k, v in patch.parts.items()}
    natural = adapters.delta_shape(patch.algo, shapes)
    dw = delta.delta(patch.algo, patch.parts, out_shape=natural, scale=patch.scale, alpha_override=patch.alpha_override)
    diff = dw.narrow(0, rows.start, rows.length).contiguous()
    return replace(patch, algo="full", parts={"diff": diff}, scale=None, alpha_override=None)


def _dora_band(patch: Patch, rows: RowSlice) -> Patch:
    """A per-output-row DoRA module's rows as a DoRA LoRA: up = rows of its exact factors (scale folded in),
    down whole, the magnitude's rows (every linear type has such factors: `Adapter.factors`)."""
    from lorabake import adapters, delta
    from lorabake.adapters import dora

    weight = {k: v for k, v in patch.parts.items() if k not in dora.PARTS}
    pair = adapters.exact_factors(patch.algo, weight)
    if pair is None:  # Tucker cores: conv modules, which no fused linear takes
        raise ValueError(f"a {patch.algo} DoRA module with a Tucker core has no row bands")
    up, down = pair
    band = slice(rows.start, rows.start + rows.length)
    parts = {"up": (up[band] * delta.patch_scale(patch)).contiguous(), "down": down}
    parts.update({k: dora.band(k, v, band) for k, v in patch.parts.items() if k in dora.PARTS})
    return replace(patch, algo="lora", parts=parts, scale=1.0, alpha_override=None)


def rows_of(bound: float | tuple[float, float], hidden: int, total: int) -> int | None:
    """A band bound (PARTS, SPREAD_PARTS) as whole rows: `bound` × H, or h·H + r·R for an (h, r) pair
    (H = in-features, R = rows); None when it is not whole (the band does not fit this weight)."""
    h, r = bound if isinstance(bound, tuple) else (bound, 0.0)
    rows = h * hidden + r * total
    return round(rows) if abs(rows - round(rows)) < 1e-6 else None


def delta_rows(part: str, shape: tuple[int, ...]) -> RowSlice | None:
    """The rows of a fused module's ΔW that a base tensor of `shape` takes (SPREAD_PARTS bounds, H = its
    in-features, R = its rows); None when the band is not whole or not R rows long."""
    if len(shape) < 2:
        return None
    first, stop = (rows_of(bound, shape[1], shape[0]) for bound in SPREAD_PARTS[part])
    if first is None or stop is None or stop - first != shape[0]:
        return None
    return RowSlice(first, stop - first)


def tiling(targets: Iterable[Target]) -> tuple[Target, ...] | None:
    """The targets in ΔW row order when their bands tile the ΔW from row 0 without gap or overlap (more
    than one tensor); else None: a block whose q, k and v are not all present cannot take the module."""
    bands = sorted(targets, key=lambda t: t.delta_rows.start)
    stop = 0
    for t in bands:
        if t.delta_rows.start != stop:
            return None
        stop += t.delta_rows.length
    return tuple(bands) if len(bands) > 1 else None
