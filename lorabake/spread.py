"""A fused adapter spread over separate base tensors: its ΔW built whole, each tensor given its rows.

A LoRA trained on a fused projection (`attn.to_qkv`, rank r: down [r, in], up [q+k+v, r]; or LoHa/LoKr
on it) meets a checkpoint that stores q, k and v apart. Row bands of ΔW are exact whatever the adapter
(ΔW[rows] = ΔW of the band), so each base tensor gets `full` diff rows: the module's ΔW with its scale,
cut at the target's `delta_rows`. Adapters whose result depends on the weight (DoRA, OFT, IA3, ...) are
not split: the planner reports them instead.

torch is imported only when a patch is cut: the planner and the rule table read this module too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from lorabake.types import RowSlice

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

    shapes = {k: tuple(v.shape) for k, v in patch.parts.items()}
    natural = adapters.delta_shape(patch.algo, shapes)
    dw = delta.delta(patch.algo, patch.parts, out_shape=natural, scale=patch.scale, alpha_override=patch.alpha_override)
    diff = dw.narrow(0, rows.start, rows.length).contiguous()
    return replace(patch, algo="full", parts={"diff": diff}, scale=None, alpha_override=None)
