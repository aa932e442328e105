"""LoKr (LyCORIS, PEFT): ΔW = W1 ⊗ W2, a Kronecker product.

W1 [a, c] is `lokr_w1` or `lokr_w1_a @ lokr_w1_b`; W2 [b, d(, k…)] is `lokr_w2`,
`lokr_w2_a @ lokr_w2_b` (w2_b may hold the flattened conv kernel) or the Tucker product of
`lokr_t2` [r, r, k…] with `lokr_w2_a` [r, b] and `lokr_w2_b` [r, d].
The rank alpha is divided by is w2's when w2 is factored, else w1's; with both factors full,
alpha does not scale (ComfyUI and A1111 agree).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

from lorabake.adapters.base import (
    Adapter,
    Shape,
    Shapes,
    Suffix,
    Tensor,
    check_rank,
    exact_factors,
    fault,
    ndim_in,
    need,
    same,
)
from lorabake.adapters.lora import flat, tucker

NAME = "lokr"
PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

SUFFIXES = tuple(Suffix(f".{p}", p) for p in PARTS)


def complete(parts: Collection[str]) -> bool:
    w1 = "lokr_w1" in parts or ("lokr_w1_a" in parts and "lokr_w1_b" in parts)
    w2 = "lokr_w2" in parts or ("lokr_w2_a" in parts and "lokr_w2_b" in parts)
    return w1 and w2


def _w1(shapes: Shapes) -> Shape:
    if "lokr_w1" in shapes:
        for p in ("lokr_w1_a", "lokr_w1_b"):
            if p in shapes:
                raise fault(NAME, "LoKr module has both lokr_w1 and its factors lokr_w1_a/lokr_w1_b", "lokr_w1")
        (w1,) = need(NAME, shapes, "lokr_w1")
        ndim_in(NAME, "lokr_w1", w1, (2,))
        return w1
    w1a, w1b = need(NAME, shapes, "lokr_w1_a", "lokr_w1_b")
    ndim_in(NAME, "lokr_w1_a", w1a, (2,))
    ndim_in(NAME, "lokr_w1_b", w1b, (2,))
    same(NAME, "lokr_w1_a", w1a[1], "lokr_w1_b", w1b[0], "LoKr w1 ranks disagree")
    check_rank(NAME, "lokr_w1_b", w1b[0])
    return (w1a[0], w1b[1])


def _w2(shapes: Shapes) -> Shape:
    if "lokr_w2" in shapes:
        for p in ("lokr_w2_a", "lokr_w2_b", "lokr_t2"):
            if p in shapes:
                raise fault(NAME, f"LoKr module has both lokr_w2 and {p}", "lokr_w2")
        (w2,) = need(NAME, shapes, "lokr_w2")
        ndim_in(NAME, "lokr_w2", w2, (2, 3, 4, 5))
        return w2
    w2a, w2b = need(NAME, shapes, "lokr_w2_a", "lokr_w2_b")
    ndim_in(NAME, "lokr_w2_a", w2a, (2,))
    ndim_in(NAME, "lokr_w2_b", w2b, (2,) if "lokr_t2" in shapes else (2, 3, 4, 5))
    check_rank(NAME, "lokr_w2_b", w2b[0])
    if "lokr_t2" in shapes:  # t2 [r, r, k…], w2_a [r, b], w2_b [r, d]
        (t2,) = need(NAME, shapes, "lokr_t2")
        ndim_in(NAME, "lokr_t2", t2, (3, 4, 5))
        same(NAME, "lokr_t2", t2[0], "lokr_w2_a", w2a[0], "LoKr Tucker core does not fit w2_a")
        same(NAME, "lokr_t2", t2[1], "lokr_w2_b", w2b[0], "LoKr Tucker core does not fit w2_b")
        return (w2a[1], w2b[1], *t2[2:])
    same(NAME, "lokr_w2_a", w2a[1], "lokr_w2_b", w2b[0], "LoKr w2 ranks disagree")
    return (w2a[0], *w2b[1:])


def natural(shapes: Shapes) -> Shape:
    (a, c), w2 = _w1(shapes), _w2(shapes)
    return (a * w2[0], c * w2[1], *w2[2:])


def rank(shapes: Shapes) -> int | None:
    if "lokr_w2" not in shapes:
        return int(need(NAME, shapes, "lokr_w2_b")[0][0])
    if "lokr_w1" not in shapes:
        return int(need(NAME, shapes, "lokr_w1_b")[0][0])
    return None


def raw(p: Mapping[str, Tensor]) -> Tensor:
    import torch

    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        w2 = tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    else:
        b = p["lokr_w2_b"]
        w2 = (p["lokr_w2_a"] @ flat(b)).reshape(-1, *b.shape[1:])
    w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))
    return torch.kron(w1, w2.contiguous())


def factors(p: Mapping[str, Tensor]) -> tuple[Tensor, Tensor] | None:
    """kron(U₁V₁, U₂V₂) = kron(U₁, U₂)·kron(V₁, V₂): exact factors of rank r₁·r₂ from each side's own
    (its a/b factors, or the exact SVD of a full w1/w2 cut at its numerical rank)."""
    import torch

    if "lokr_t2" in p:
        return None
    u1, v1 = (p["lokr_w1_a"], p["lokr_w1_b"]) if "lokr_w1" not in p else exact_factors(p["lokr_w1"])
    u2, v2 = (flat(p["lokr_w2_a"]), flat(p["lokr_w2_b"])) if "lokr_w2" not in p else exact_factors(flat(p["lokr_w2"]))
    return torch.kron(u1.contiguous(), u2.contiguous()), torch.kron(v1.contiguous(), v2.contiguous())


# --------------------------------------------------------------------------------------------
# PEFT's LoKr (peft.LoKrConfig): one r, alpha, decompose_both and decompose_factor per model (r and alpha
# per module by pattern), from which PEFT rebuilds each linear layer's factors: out = a·b and in = c·d split by
# `factorization(·, decompose_factor)`, w1 [a, c] factored iff decompose_both and r < max(a, c)/2, w2 [b, d]
# factored iff r < max(b, d)/2, ΔW scaled by alpha/r (peft/tuners/lokr/layer.py, LoKrLayer.update_layer).


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m ≤ n, m·n = dimension: (factor, dimension/factor) when `factor` divides it, else the divisor
    pair nearest √dimension whose smaller side is at most `factor` (-1: no limit). LyCORIS and PEFT split LoKr
    dimensions by this rule."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    cap = dimension if factor == -1 else factor
    m, n, d = 1, dimension, 2
    while m < n:
        while dimension % d:
            d += 1
        if d > cap:
            break
        m, n, d = d, dimension // d, d + 1
    return min(m, n), max(m, n)


def peft_rank(shapes: Shapes, *, factor: int, decompose_both: bool) -> int | None:
    """The r under which PEFT builds exactly these parts for a linear layer, or None when no r does
    (a Tucker or conv w2, another split of the dimensions, or factors PEFT would make full)."""
    (a, c), w2 = _w1(shapes), _w2(shapes)
    if "lokr_t2" in shapes or len(w2) != 2:
        return None
    b, d = w2
    if factorization(a * b, factor) != (a, b) or factorization(c * d, factor) != (c, d):
        return None
    ranks = {int(shapes[p][0]) for p in ("lokr_w1_b", "lokr_w2_b") if p in shapes}
    if len(ranks) > 1:
        return None  # PEFT has one r for both sides
    r = ranks.pop() if ranks else math.ceil(max(b, d, *((a, c) if decompose_both else ())) / 2)
    full_w1 = not (decompose_both and r < max(a, c) / 2)
    full_w2 = r >= max(b, d) / 2
    return r if (full_w1, full_w2) == ("lokr_w1" in shapes, "lokr_w2" in shapes) else None


def peft_layout(modules: Mapping[str, Shapes]) -> tuple[int, bool, dict[str, int]] | tuple[None, bool, str]:
    """(decompose_factor, decompose_both, {module: r}) under which PEFT rebuilds every module's factors;
    (None, decompose_both, the first module no factor fits) when there is none. Factors tried: each module's
    w1 rows (a fixed factor shows there), then -1."""
    both = any("lokr_w1" not in shapes for shapes in modules.values())
    candidates = sorted({_w1(shapes)[0] for shapes in modules.values()}) + [-1]
    for factor in candidates:
        ranks = {name: peft_rank(shapes, factor=factor, decompose_both=both) for name, shapes in modules.items()}
        if None not in ranks.values():
            return factor, both, ranks  # type: ignore[return-value]
    misfit = next(n for n, s in modules.items() if peft_rank(s, factor=-1, decompose_both=both) is None)
    return None, both, misfit


ADAPTER = Adapter(
    name=NAME,
    parts=PARTS,
    suffixes=SUFFIXES,
    complete=complete,
    natural=natural,
    rank=rank,
    flattened=True,
    raw=raw,
    fresh=True,
    factors=factors,
    linear_in=("lokr_w1", "lokr_w1_a"),  # ΔW = W1 ⊗ W2, W1 whole or w1_a·w1_b
)
