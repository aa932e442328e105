"""LoRA, LoCon and Tucker LoCon: ΔW = up @ (mid ×) down, the plain low-rank product.

Factors: `up` [out, r(,1,1)], `down` [r, in(, k…)] (LoCon: the conv kernel sits on `down`),
Tucker LoCon (LyCORIS `lora_mid`): `down` [r, in, 1, 1], `mid` [r, r, k…], `up` [out, r, 1, 1].
PEFT `lora_B.bias` (`up_bias`) is a bias delta scaled like the weight's.
The product is written once, here; the bake kernel's fused `addmm_` path computes the same thing.
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

NAME = "lora"

SUFFIXES = (
    # kohya sd-scripts, LyCORIS (LoCon; lora_mid = Tucker core), A1111
    Suffix(".lora_up.weight", "up", "kohya"),
    Suffix(".lora_down.weight", "down", "kohya"),
    Suffix(".lora_mid.weight", "mid", "kohya"),
    # PEFT / diffusers-new; a `.default` / `.default_N` adapter infix is stripped first
    Suffix(".lora_B.weight", "up", "peft"),
    Suffix(".lora_A.weight", "down", "peft"),
    Suffix(".lora_B.bias", "up_bias", "peft"),  # PEFT lora_bias=True, BFL control LoRAs
    # Mochi-style PEFT without `.weight`
    Suffix(".lora_B", "up", "peft"),
    Suffix(".lora_A", "down", "peft"),
    # diffusers save format (state_dict_utils.PEFT_TO_DIFFUSERS), UNet attention
    Suffix(".lora.up.weight", "up", "diffusers"),
    Suffix(".lora.down.weight", "down", "diffusers"),
    # diffusers/transformers text encoder
    Suffix(".lora_linear_layer.up.weight", "up", "diffusers"),
    Suffix(".lora_linear_layer.down.weight", "down", "diffusers"),
    # old diffusers attention processors: `…attn1.processor.to_q_lora.up.weight`, old TE
    # `…self_attn.to_q_lora.up.weight`; the stem keeps `processor.to_q` / `to_q`
    Suffix("_lora.up.weight", "up", "diffusers", requires="attnproc"),
    Suffix("_lora.down.weight", "down", "diffusers", requires="attnproc"),
    # XLabs Flux: `double_blocks.0.processor.qkv_lora1.down.weight`
    Suffix(".up.weight", "up", "xlabs", requires="xlabs"),
    Suffix(".down.weight", "down", "xlabs", requires="xlabs"),
)


def complete(parts: Collection[str]) -> bool:
    return "up" in parts and "down" in parts


def natural(shapes: Shapes) -> Shape:
    up, down = need(NAME, shapes, "up", "down")
    ndim_in(NAME, "up", up, (2, 3, 4, 5))
    ndim_in(NAME, "down", down, (2, 3, 4, 5))
    trailing_ones(NAME, "up", up, 2)
    if "up_bias" in shapes and tuple(shapes["up_bias"]) != (up[0],):
        raise fault(
            NAME,
            f"lora_B.bias has shape {list(shapes['up_bias'])}, expected [{up[0]}] (up's out features)",
            "up_bias",
        )
    if "mid" not in shapes:
        same(NAME, "up", up[1], "down", down[0], "up and down ranks disagree")
        check_rank(NAME, "down", down[0])
        return (up[0], *down[1:])
    (mid,) = need(NAME, shapes, "mid")
    ndim_in(NAME, "mid", mid, (3, 4, 5))
    trailing_ones(NAME, "down", down, 2)
    same(NAME, "mid", mid[1], "down", down[0], "Tucker mid does not fit down")
    same(NAME, "mid", mid[0], "up", up[1], "Tucker mid does not fit up")
    check_rank(NAME, "down", down[0])
    return (up[0], down[1], *mid[2:])


def rank(shapes: Shapes) -> int:
    return int(need(NAME, shapes, "down")[0][0])


def flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def tucker(core: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """M[p, q, k...] = Σ_ij core[i, j, k...] · a[i, p] · b[j, q]  (a: [r, out], b: [r', in])."""
    k = core.shape[2:]
    n_k = 1
    for d in k:
        n_k *= int(d)
    m = a.t() @ core.reshape(core.shape[0], -1)  # [p, j·k]
    m = m.reshape(a.shape[1], core.shape[1], n_k).transpose(1, 2)  # [p, k, j]
    m = m @ b  # [p, k, q]
    return m.transpose(1, 2).reshape(a.shape[1], b.shape[1], *k)


def product(up: Tensor, down: Tensor, *, into: Tensor | None = None, alpha: float = 1.0) -> Tensor:
    """up @ down of 2-D factors; with `into`, `into += alpha·up@down` in one `addmm_` (no ΔW temporary)."""
    if into is None:
        return up @ down
    return into.addmm_(up, down, alpha=alpha)


def raw(p: Mapping[str, Tensor]) -> Tensor:
    up, down = flat(p["up"]), p["down"]
    if "mid" not in p:
        return product(up, flat(down)).reshape(up.shape[0], *down.shape[1:])
    return tucker(p["mid"], up.t(), flat(down))


def factors(p: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """up and down themselves; with a Tucker core, down absorbs it: D'[i, (q, k…)] = Σ_j mid[i, j, k…]·down[j, q]."""
    up, down = flat(p["up"]), flat(p["down"])
    if "mid" not in p:
        return up, down
    mid = p["mid"]
    core = mid.reshape(mid.shape[0], mid.shape[1], -1)  # [i, j, k]
    return up, (core.transpose(1, 2) @ down).transpose(1, 2).reshape(mid.shape[0], -1)  # [i, q·k]


ADAPTER = Adapter(
    name=NAME,
    parts=("up", "down", "mid", "up_bias"),
    suffixes=SUFFIXES,
    complete=complete,
    natural=natural,
    rank=rank,
    raw=raw,
    fresh=True,
    factors=factors,
    bias_part="up_bias",
    linear_in=("up",),
)
