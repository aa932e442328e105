"""GLoRA (LyCORIS): ΔW = W·(a1 @ a2) + b1 @ b2, scaled by alpha/rank; it depends on W.

a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in(, k…)] (LyCORIS's current layout; the older
`b2@b1 + W@a2@a1` layout and the Tucker core `bm.weight` are not supported).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from lorabake.adapters.base import (
    Adapter,
    Shape,
    Shapes,
    Suffix,
    Tensor,
    check_rank,
    fault,
    ndim_in,
    need,
    same,
    trailing_ones,
)
from lorabake.adapters.lora import flat

NAME = "glora"
PARTS = ("glora_a1", "glora_a2", "glora_b1", "glora_b2")

SUFFIXES = (
    Suffix(".a1.weight", "glora_a1"),
    Suffix(".a2.weight", "glora_a2"),
    Suffix(".b1.weight", "glora_b1"),
    Suffix(".b2.weight", "glora_b2"),
)


def complete(parts: Collection[str]) -> bool:
    return all(p in parts for p in PARTS)


def natural(shapes: Shapes) -> Shape:
    a1, a2, b1, b2 = need(NAME, shapes, *PARTS)
    for part, s in zip(PARTS, (a1, a2, b1, b2)):
        ndim_in(NAME, part, s, (2, 3, 4, 5))
    for part, s in zip(PARTS[:3], (a1, a2, b1)):
        trailing_ones(NAME, part, s, 2)
    same(NAME, "glora_a1", a1[1], "glora_a2", a2[0], "GLoRA a ranks disagree")
    same(NAME, "glora_b1", b1[1], "glora_b2", b2[0], "GLoRA b ranks disagree")
    check_rank(NAME, "glora_a2", a2[0])
    check_rank(NAME, "glora_b2", b2[0])
    if a1[0] != a2[1] or a2[1] != b2[1]:
        raise fault(
            NAME,
            f"input dims disagree: glora_a1 {list(a1)}, glora_a2 {list(a2)}, glora_b2 {list(b2)}",
            "glora_a1",
            hint="old-LyCORIS GLoRA layout (b2@b1 + W@a2@a1) is not supported",
        )
    return (b1[0], *b2[1:])


def rank(shapes: Shapes) -> int:
    return int(need(NAME, shapes, "glora_a2")[0][0])


def apply(w: Tensor, p: Mapping[str, Tensor], s: float, scale: float) -> Tensor:
    import torch

    shape = natural({k: tuple(v.shape) for k, v in p.items()})
    wn = w.reshape(shape)
    a = flat(p["glora_a1"]) @ flat(p["glora_a2"])  # [in, in]
    wa = torch.einsum("oi...,ij->oj...", wn, a)
    b = (flat(p["glora_b1"]) @ flat(p["glora_b2"])).reshape(shape)
    return w + s * ((wa + b) * scale).reshape(w.shape)


ADAPTER = Adapter(
    name=NAME,
    parts=PARTS,
    suffixes=SUFFIXES,
    complete=complete,
    natural=natural,
    rank=rank,
    apply=apply,
)
