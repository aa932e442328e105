"""LoHa (LyCORIS): ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b), a Hadamard product of two low-rank terms.

Plain: w?_a [out, r], w?_b [r, in·k…] (LyCORIS flattens a conv kernel into w?_b).
Tucker: w?_a [r, out], w?_b [r, in], t? [r, r, k…]; each term is the Tucker product.
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
from lorabake.adapters.lora import flat, tucker

NAME = "loha"
FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

SUFFIXES = tuple(Suffix(f".{p}", p) for p in (*FACTORS, "hada_t1", "hada_t2"))


def complete(parts: Collection[str]) -> bool:
    return all(p in parts for p in FACTORS)


def natural(shapes: Shapes) -> Shape:
    w1a, w1b, w2a, w2b = need(NAME, shapes, *FACTORS)
    if ("hada_t1" in shapes) != ("hada_t2" in shapes):
        have, miss = ("hada_t1", "hada_t2") if "hada_t1" in shapes else ("hada_t2", "hada_t1")
        raise fault(NAME, f"Tucker LoHa has {have} but no {miss}", have)
    for p, s in zip(FACTORS, (w1a, w1b, w2a, w2b)):
        ndim_in(NAME, p, s, (2,) if "hada_t1" in shapes else (2, 3, 4, 5))
    halves = []
    if "hada_t1" in shapes:  # w?_a [r, out], w?_b [r, in], t? [r, r, k…]
        for n, a, b in (("1", w1a, w1b), ("2", w2a, w2b)):
            (t,) = need(NAME, shapes, f"hada_t{n}")
            ndim_in(NAME, f"hada_t{n}", t, (3, 4, 5))
            same(NAME, f"hada_t{n}", t[0], f"hada_w{n}_a", a[0], "LoHa Tucker core does not fit w_a")
            same(NAME, f"hada_t{n}", t[1], f"hada_w{n}_b", b[0], "LoHa Tucker core does not fit w_b")
            halves.append((a[1], b[1], *t[2:]))
    else:  # w?_a [out, r], w?_b [r, in·k…]
        for n, a, b in (("1", w1a, w1b), ("2", w2a, w2b)):
            trailing_ones(NAME, f"hada_w{n}_a", a, 2)
            same(NAME, f"hada_w{n}_a", a[1], f"hada_w{n}_b", b[0], f"LoHa w{n} ranks disagree")
            halves.append((a[0], *b[1:]))
    if halves[0][0] != halves[1][0]:
        raise fault(NAME, f"LoHa factors disagree on out features: {halves[0][0]} vs {halves[1][0]}", "hada_w1_a")
    if halves[0] != halves[1]:
        raise fault(NAME, f"LoHa factors disagree on in features: {list(halves[0])} vs {list(halves[1])}", "hada_w1_b")
    check_rank(NAME, "hada_w1_b", w1b[0])
    check_rank(NAME, "hada_w2_b", w2b[0])
    return halves[0]


def rank(shapes: Shapes) -> int:
    return int(need(NAME, shapes, "hada_w1_b")[0][0])


def raw(p: Mapping[str, Tensor]) -> Tensor:
    if "hada_t1" in p:
        m1 = tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
        m2 = tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
        return m1 * m2
    b = p["hada_w1_b"]
    m1 = flat(p["hada_w1_a"]) @ flat(b)
    m2 = flat(p["hada_w2_a"]) @ flat(p["hada_w2_b"])
    return (m1 * m2).reshape(m1.shape[0], *b.shape[1:])


def factors(p: Mapping[str, Tensor]) -> tuple[Tensor, Tensor] | None:
    """(A₁A₂ᵀ)⊙(B₁B₂ᵀ) = (A₁•A₂)(B₁•B₂)ᵀ with • the row-wise Kronecker product: rank r₁·r₂, exact."""
    if "hada_t1" in p:
        return None
    a1, a2 = flat(p["hada_w1_a"]), flat(p["hada_w2_a"])  # [out, r1], [out, r2]
    b1, b2 = flat(p["hada_w1_b"]), flat(p["hada_w2_b"])  # [r1, n], [r2, n]
    up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
    down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
    return up, down


ADAPTER = Adapter(
    name=NAME,
    parts=(*FACTORS, "hada_t1", "hada_t2"),
    suffixes=SUFFIXES,
    complete=complete,
    natural=natural,
    rank=rank,
    flattened=True,
    raw=raw,
    fresh=True,
    factors=factors,
    linear_in=("hada_w1_a",),  # ΔW = (w1a·w1b) ⊙ (w2a·w2b)
)
