"""Rows Z-Image and Lumina-Image 2.0 share: both are NextDiT, stored with fused `attention.qkv`.

Not a family (no FAMILY). The per-projection LoRAs people train (`attention.to_q/to_k/to_v`, diffusers
names) land on row bands of the fused q ‖ k ‖ v. Lumina 2 uses grouped-query attention (q 2304 rows, k and
v 768 each), so the bands come from the shape: q has H rows (H = in-features) and k, v split the rest
(PARTS gqa_q/k/v); for Z-Image that gives equal thirds.
"""

from lorabake.arch.common import Alias

STACKS = ("layers", "noise_refiner", "context_refiner")


def qkv_rows(attn: str) -> dict[str, tuple[Alias, ...]]:
    """`<stack>.{n}.attention.qkv` -> `<stack>.{n}.<attn>.to_q/to_k/to_v` bands, for each stack."""
    return {
        f"{stack}.{{n}}.attention.qkv": tuple(
            Alias(f"{stack}.{{n}}.{attn}.to_{p}", part=f"gqa_{p}") for p in "qkv"
        )
        for stack in STACKS
    }


def fused_from_split(attn: str) -> dict[str, tuple[Alias, ...]]:
    """On a diffusers-layout file (split q, k, v): an original-named fused `attention.qkv` LoRA (musubi's
    ComfyUI converter writes one) spread over `<attn>.to_q/to_k/to_v`, and the other attention names."""
    rows: dict[str, tuple[Alias, ...]] = {}
    for stack in STACKS:
        for p in "qkv":
            rows[f"{stack}.{{n}}.{attn}.to_{p}"] = (Alias(f"{stack}.{{n}}.attention.qkv", spread=f"{p}_of_qkv"),)
        rows[f"{stack}.{{n}}.{attn}.to_out.0"] = (Alias(f"{stack}.{{n}}.attention.out"),)
    return rows


def attention_rows(attn: str) -> dict[str, tuple[Alias, ...]]:
    """The attention output and q/k norms of each stack, in diffusers names under `attn`."""
    rows: dict[str, tuple[Alias, ...]] = {}
    for stack in STACKS:
        rows[f"{stack}.{{n}}.attention.out"] = (Alias(f"{stack}.{{n}}.{attn}.to_out.0"),)
        rows[f"{stack}.{{n}}.attention.q_norm"] = (Alias(f"{stack}.{{n}}.{attn}.norm_q"),)
        rows[f"{stack}.{{n}}.attention.k_norm"] = (Alias(f"{stack}.{{n}}.{attn}.norm_k"),)
    return rows


# kohya sd-scripts lora_lumina.py / musubi-tuner Z-Image: attention and feed-forward linears
EXTRACT_TARGETS = (
    "attention.qkv.weight",
    "attention.out.weight",
    "feed_forward.w1.weight",
    "feed_forward.w2.weight",
    "feed_forward.w3.weight",
)
