"""Any linear adapter module as exact low-rank factors, so combine and resize treat every type alike.

LoRA/LoCon are their own factors; LoHa and LoKr have exact factor forms of rank r₁·r₂ (the adapter
modules say how: `adapters.exact_factors`); a full diff or a Tucker variant without one is factored
through its ΔW (SVD cut at the numerical rank, exact to fp64 rounding). The result is what
`lowrank.stack` and `lowrank.reduce` take.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from lorabake import adapters, lowrank

Tensor = torch.Tensor


class Factors(NamedTuple):
    up: Tensor  # [out, r]
    down: Tensor  # [r, n], n = prod(kernel)
    kernel: tuple[int, ...]  # down's dims after the rank axis: (in,) or (in, kh, kw…)
    out_shape: tuple[int, ...]  # up's dims after the rank axis: () for a linear, (1, 1…) for a conv
    how: str  # "factors" | "structure" | "svd": where the factors came from


def module_factors(algo: str, parts: Mapping[str, Tensor], target_shape: tuple[int, ...] | None = None) -> Factors:
    """Exact (up, down) of the module's unscaled ΔW; `target_shape` restores a conv kernel that
    LyCORIS stores flattened ([out, in·k])."""
    parts = {p: t for p, t in parts.items() if p not in adapters.BIAS_PARTS and p not in ("alpha", "scale")}
    if algo == "lora" and "mid" not in parts:
        up, down = parts["up"], parts["down"]
        rank = down.shape[0]
        # fp32, as the other types' factors: strengths and scales are folded into up before stacking
        return Factors(up.reshape(up.shape[0], rank).float(), down.reshape(rank, -1).float(), tuple(down.shape[1:]),
                       tuple(up.shape[2:]), "factors")
    shape = tuple(adapters.delta_shape(algo, {p: tuple(t.shape) for p, t in parts.items()}))
    if len(shape) == 2 and target_shape and len(target_shape) > 2 and math.prod(target_shape[1:]) == shape[1]:
        shape = (shape[0], *target_shape[1:])
    work = {p: t.double() for p, t in parts.items()}
    found = adapters.exact_factors(algo, work)
    how = "structure"
    if found is None:
        raw = adapters.get(algo).raw(work)
        found, how = lowrank.factor_dense(raw.reshape(shape[0], -1)), "svd"
    up, down = found
    kernel = tuple(shape[1:])
    return Factors(up.float(), down.float(), kernel, (1,) * (len(kernel) - 1), how)
