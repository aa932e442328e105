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


def hf_clip(layers: int, width: int, *, projection: bool = False) -> str:
    """The weights of a transformers CLIPTextModel (…WithProjection) as `structure` rows."""
    ff, last = 4 * width, layers - 1
    layer = f"text_model.encoder.layers.{{0-{last}}}."
    rows = [
        f"text_model.embeddings.position_embedding.weight 77x{width}",
        f"text_model.embeddings.token_embedding.weight 49408x{width}",
        *(
            f"{layer}{p}_proj.weight {width}x{width}"
            for p in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.out")
        ),
        f"{layer}mlp.fc1.weight {ff}x{width}",
        f"{layer}mlp.fc2.weight {width}x{ff}",
        f"{layer}layer_norm1.weight {width}",
        f"{layer}layer_norm2.weight {width}",
        f"text_model.final_layer_norm.weight {width}",
    ]
    return "\n".join(rows + ([f"text_projection.weight {width}x{width}"] if projection else []))


def open_clip(layers: int, width: int) -> str:
    """The weights of a raw OpenCLIP text transformer as `structure` rows."""
    ff, block = 4 * width, f"transformer.resblocks.{{0-{layers - 1}}}."
    return "\n".join(
        (
            f"positional_embedding 77x{width}",
            f"token_embedding.weight 49408x{width}",
            f"{block}attn.in_proj_weight {3 * width}x{width}",
            f"{block}attn.out_proj.weight {width}x{width}",
            f"{block}mlp.c_fc.weight {ff}x{width}",
            f"{block}mlp.c_proj.weight {width}x{ff}",
            f"{block}ln_1.weight {width}",
            f"{block}ln_2.weight {width}",
            f"ln_final.weight {width}",
            f"text_projection {width}x{width}",
        )
    )


# T5 v1.1 XXL encoder (gated-GELU feed-forward), as the SD3 and Flux single files store it.
_T5XXL = """\
encoder.block.{0-23}.layer.0.SelfAttention.q.weight 4096x4096
encoder.block.{0-23}.layer.0.SelfAttention.k.weight 4096x4096
encoder.block.{0-23}.layer.0.SelfAttention.v.weight 4096x4096
encoder.block.{0-23}.layer.0.SelfAttention.o.weight 4096x4096
encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight 32x64
encoder.block.{0-23}.layer.{0,1}.layer_norm.weight 4096
encoder.block.{0-23}.layer.1.DenseReluDense.wi_0.weight 10240x4096
encoder.block.{0-23}.layer.1.DenseReluDense.wi_1.weight 10240x4096
encoder.block.{0-23}.layer.1.DenseReluDense.wo.weight 4096x10240
encoder.final_layer_norm.weight 4096
shared.weight 32128x4096"""

# Decoder-only LLMs as text encoders (Qwen2.5-VL, Qwen3, Qwen3-VL, Gemma 2, Mistral 3, Llama 3): stored with
# transformers' causal-LM names (`model.layers.N.self_attn.q_proj`), which is also what ComfyUI keeps under
# `text_encoders.<name>.transformer.` (comfy/text_encoders/llama.py: `self.model = Llama2_(...)`).
_LLM_LINEARS = (
    *(f"self_attn.{p}_proj" for p in "qkvo"),
    *(f"mlp.{p}_proj" for p in ("gate", "up", "down")),
)
_LLM_TARGETS = tuple(f"{m}.weight" for m in _LLM_LINEARS)


def _llm_renames(*, vl: bool) -> tuple[Renames, ...]:
    """Other names of an LLM encoder's linears. kohya sd-scripts trains the base model (Gemma2Model,
    Qwen3Model: no `model.` level), so its LoRAs say `lora_te_layers_0_self_attn_q_proj`; a vision-language
    model in transformers >= 4.52 nests the text model as `model.language_model.` (what PEFT names then)."""
    rows: dict[str, tuple[Alias, ...]] = {}
    for m in _LLM_LINEARS:
        names = [Alias(f"layers.{{n}}.{m}")]
        if vl:
            names.append(Alias(f"model.language_model.layers.{{n}}.{m}"))
        rows[f"model.layers.{{n}}.{m}"] = tuple(names)
    return (Renames("hf", "hf_base", modules=rows, note="LLM text encoder: base-model and VL-model names"),)


def hf_llm(layers: int, width: int, *, heads: int, kv_heads: int, head: int, ff: int, vocab: int,
           qk_norm: bool = False, gemma: bool = False) -> str:
    """The language-model weights of a transformers causal LM as `structure` rows (the LoRA targets)."""
    q, kv, layer = heads * head, kv_heads * head, f"model.layers.{{0-{layers - 1}}}."
    rows = [
        f"model.embed_tokens.weight {vocab}x{width}",
        f"{layer}self_attn.q_proj.weight {q}x{width}",
        f"{layer}self_attn.k_proj.weight {kv}x{width}",
        f"{layer}self_attn.v_proj.weight {kv}x{width}",
        f"{layer}self_attn.o_proj.weight {width}x{q}",
        f"{layer}mlp.gate_proj.weight {ff}x{width}",
        f"{layer}mlp.up_proj.weight {ff}x{width}",
        f"{layer}mlp.down_proj.weight {width}x{ff}",
        f"{layer}input_layernorm.weight {width}",
        f"{layer}post_attention_layernorm.weight {width}",
        f"model.norm.weight {width}",
    ]
    if qk_norm:
        rows += [f"{layer}self_attn.q_norm.weight {head}", f"{layer}self_attn.k_norm.weight {head}"]
    if gemma:
        rows += [f"{layer}pre_feedforward_layernorm.weight {width}", f"{layer}post_feedforward_layernorm.weight {width}"]
    return "\n".join(rows)


def _llm(structure: str, *, vl: bool = False) -> TextEncoderKind:
    return TextEncoderKind("hf", _llm_renames(vl=vl), _LLM_TARGETS, structure=structure)


# Sizes from each model's config.json (hidden, layers, heads, kv heads, head dim, MLP width, vocabulary).
_QWEN3_4B = hf_llm(36, 2560, heads=32, kv_heads=8, head=128, ff=9728, vocab=151936, qk_norm=True)

TEXT_ENCODER_KINDS: dict[str, TextEncoderKind] = {
    "clip_l": TextEncoderKind("hf", (), _HF_CLIP_TARGETS, clip=True, structure=hf_clip(12, 768)),
    "clip_h": TextEncoderKind("hf", (), _HF_CLIP_TARGETS, clip=True, structure=hf_clip(24, 1024)),
    "clip_g": TextEncoderKind(
        "hf", (), _HF_CLIP_TARGETS, clip=True, structure=hf_clip(32, 1280, projection=True)
    ),
    "openclip_h": TextEncoderKind(
        "openclip", _OPENCLIP, _OPENCLIP_TARGETS, clip=True, structure=open_clip(24, 1024)
    ),
    "openclip_g": TextEncoderKind(
        "openclip", _OPENCLIP, _OPENCLIP_TARGETS, clip=True, structure=open_clip(32, 1280)
    ),
    "t5xxl": TextEncoderKind("hf", (), _T5_TARGETS, structure=_T5XXL),
    # ComfyUI's names for them (comfy/text_encoders/*.py `name=`), which are the all-in-one file's roots
    "qwen25_7b": _llm(hf_llm(28, 3584, heads=28, kv_heads=4, head=128, ff=18944, vocab=152064), vl=True),  # Qwen2.5-VL-7B
    "qwen3_4b": _llm(_QWEN3_4B),
    "qwen3_8b": _llm(hf_llm(36, 4096, heads=32, kv_heads=8, head=128, ff=12288, vocab=151936, qk_norm=True)),
    "qwen3vl_4b": _llm(_QWEN3_4B, vl=True),  # Qwen3-VL-4B's text model has Qwen3-4B's sizes
    "gemma2_2b": _llm(hf_llm(26, 2304, heads=8, kv_heads=4, head=256, ff=9216, vocab=256000, gemma=True)),
    "mistral3_24b": _llm(hf_llm(40, 5120, heads=32, kv_heads=8, head=128, ff=32768, vocab=131072)),  # Mistral Small 3.1
    "llama": _llm(hf_llm(32, 4096, heads=32, kv_heads=8, head=128, ff=14336, vocab=128256)),  # Llama 3.1 8B (HiDream)
}
