"""Text encoder kinds shared by families (CLIP-L/H/G, OpenCLIP, T5): their naming, renames and trainer targets.

Not a family (no FAMILY): a family's `TextEncoder.roots` name a kind from `TEXT_ENCODER_KINDS` or from
its own `Family.text_encoder_kinds`.
"""

from __future__ import annotations

from lorabake.arch.common import Alias, Renames, TextEncoderKind

# OpenCLIP text transformer (OpenCLIP-H, OpenCLIP-G) -> HF CLIPTextModel names.
# LoRAs are trained on the HF model, so their names are the HF ones; the fused in_proj is q ‖ k ‖ v.
OPENCLIP_TO_HF: dict[str, tuple[Alias, ...]] = {
    "transformer.resblocks.{n}.attn": (  # the in_proj_weight parameter
        Alias("text_model.encoder.layers.{n}.self_attn.q_proj", part="q"),
        Alias("text_model.encoder.layers.{n}.self_attn.k_proj", part="k"),
        Alias("text_model.encoder.layers.{n}.self_attn.v_proj", part="v"),
    ),
    "transformer.resblocks.{n}.attn.out_proj": (Alias("text_model.encoder.layers.{n}.self_attn.out_proj"),),
    "transformer.resblocks.{n}.mlp.c_fc": (Alias("text_model.encoder.layers.{n}.mlp.fc1"),),
    "transformer.resblocks.{n}.mlp.c_proj": (Alias("text_model.encoder.layers.{n}.mlp.fc2"),),
    "transformer.resblocks.{n}.ln_1": (Alias("text_model.encoder.layers.{n}.layer_norm1"),),
    "transformer.resblocks.{n}.ln_2": (Alias("text_model.encoder.layers.{n}.layer_norm2"),),
    "ln_final": (Alias("text_model.final_layer_norm"),),
    "token_embedding": (Alias("text_model.embeddings.token_embedding"),),
    "positional_embedding": (Alias("text_model.embeddings.position_embedding"),),
    # OpenCLIP multiplies x @ P; HF's Linear weight is Pᵀ (OneTrainer lora_te2_text_projection).
    "text_projection": (Alias("text_projection", transform="transpose"),),
}
_OPENCLIP = (Renames("openclip", "hf", modules=OPENCLIP_TO_HF, note="raw OpenCLIP -> HF CLIPTextModel"),)

_HF_CLIP_TARGETS = tuple(f"self_attn.{p}_proj.weight" for p in "qkv") + (
    "self_attn.out_proj.weight",
    "mlp.fc1.weight",
    "mlp.fc2.weight",
)
_OPENCLIP_TARGETS = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_T5_TARGETS = tuple(f"SelfAttention.{p}.weight" for p in "qkvo") + tuple(
    f"DenseReluDense.{p}.weight" for p in ("wi", "wi_0", "wi_1", "wo")
)

TEXT_ENCODER_KINDS: dict[str, TextEncoderKind] = {
    "clip_l": TextEncoderKind("hf", (), _HF_CLIP_TARGETS, clip=True),
    "clip_h": TextEncoderKind("hf", (), _HF_CLIP_TARGETS, clip=True),
    "clip_g": TextEncoderKind("hf", (), _HF_CLIP_TARGETS, clip=True),
    "openclip_h": TextEncoderKind("openclip", _OPENCLIP, _OPENCLIP_TARGETS, clip=True),
    "openclip_g": TextEncoderKind("openclip", _OPENCLIP, _OPENCLIP_TARGETS, clip=True),
    "t5xxl": TextEncoderKind("hf", (), _T5_TARGETS),
}
