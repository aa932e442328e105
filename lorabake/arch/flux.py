"""FLUX.1 (dev/schnell): BFL DiT (double_blocks / single_blocks) + CLIP-L + T5-XXL."""

from lorabake.arch.common import (
    DIT_LORA_PREFIXES,
    Alias,
    BlockGroup,
    Family,
    Layout,
    Probe,
    Renames,
    TextEncoder,
    Variant,
)

_D = "transformer_blocks.{n}."
_S = "single_transformer_blocks.{n}."

# BFL module (checkpoint) -> diffusers FluxTransformer2DModel module, as ComfyUI comfy/utils.py
# flux_to_diffusers and diffusers loaders/single_file_utils.py convert_flux_transformer_checkpoint_to_diffusers.
# Written by diffusers, ai-toolkit, SimpleTuner (transformer.), OneTrainer (lora_transformer_), DiffSynth (no prefix).
BFL_TO_DIFFUSERS: dict[str, tuple[Alias, ...]] = {
    "double_blocks.{n}.img_attn.qkv": (
        Alias(_D + "attn.to_q", part="q"),
        Alias(_D + "attn.to_k", part="k"),
        Alias(_D + "attn.to_v", part="v"),
    ),
    "double_blocks.{n}.txt_attn.qkv": (
        Alias(_D + "attn.add_q_proj", part="q"),
        Alias(_D + "attn.add_k_proj", part="k"),
        Alias(_D + "attn.add_v_proj", part="v"),
    ),
    "double_blocks.{n}.img_attn.proj": (Alias(_D + "attn.to_out.0"),),
    "double_blocks.{n}.txt_attn.proj": (Alias(_D + "attn.to_add_out"),),
    "double_blocks.{n}.img_mlp.0": (Alias(_D + "ff.net.0.proj"),),
    "double_blocks.{n}.img_mlp.2": (Alias(_D + "ff.net.2"),),
    "double_blocks.{n}.txt_mlp.0": (Alias(_D + "ff_context.net.0.proj"),),
    "double_blocks.{n}.txt_mlp.2": (Alias(_D + "ff_context.net.2"),),
    "double_blocks.{n}.img_mod.lin": (Alias(_D + "norm1.linear"),),
    "double_blocks.{n}.txt_mod.lin": (Alias(_D + "norm1_context.linear"),),
    "double_blocks.{n}.img_attn.norm.query_norm": (Alias(_D + "attn.norm_q"),),  # RMSNorm .scale
    "double_blocks.{n}.img_attn.norm.key_norm": (Alias(_D + "attn.norm_k"),),
    "double_blocks.{n}.txt_attn.norm.query_norm": (Alias(_D + "attn.norm_added_q"),),
    "double_blocks.{n}.txt_attn.norm.key_norm": (Alias(_D + "attn.norm_added_k"),),
    "single_blocks.{n}.linear1": (
        Alias(_S + "attn.to_q", part="q"),
        Alias(_S + "attn.to_k", part="k"),
        Alias(_S + "attn.to_v", part="v"),
        Alias(_S + "proj_mlp", part="mlp"),
    ),
    "single_blocks.{n}.linear2": (Alias(_S + "proj_out"),),
    "single_blocks.{n}.modulation.lin": (Alias(_S + "norm.linear"),),
    "single_blocks.{n}.norm.query_norm": (Alias(_S + "attn.norm_q"),),
    "single_blocks.{n}.norm.key_norm": (Alias(_S + "attn.norm_k"),),
    "img_in": (Alias("x_embedder"),),
    "txt_in": (Alias("context_embedder"),),
    "time_in.in_layer": (Alias("time_text_embed.timestep_embedder.linear_1"),),
    "time_in.out_layer": (Alias("time_text_embed.timestep_embedder.linear_2"),),
    "vector_in.in_layer": (Alias("time_text_embed.text_embedder.linear_1"),),
    "vector_in.out_layer": (Alias("time_text_embed.text_embedder.linear_2"),),
    "guidance_in.in_layer": (Alias("time_text_embed.guidance_embedder.linear_1"),),
    "guidance_in.out_layer": (Alias("time_text_embed.guidance_embedder.linear_2"),),
    "final_layer.linear": (Alias("proj_out"),),
    # diffusers AdaLayerNormContinuous is (scale, shift); BFL is (shift, scale)
    "final_layer.adaLN_modulation.1": (Alias("norm_out.linear", transform="swap_halves"),),
}

# Extra BFL-style names: ComfyUI comfy/lora.py registers linear1_qkv (target of XLabs/USO single-block qkv LoRAs).
BFL_EXTRAS: dict[str, tuple[Alias, ...]] = {
    "single_blocks.{n}.linear1": (Alias("single_blocks.{n}.linear1_qkv", part="qkv"),),
}

# XLabs Flux LoRAs: down/up pairs under a per-block `processor`, no alpha (diffusers
# loaders/lora_conversion_utils.py _convert_xlabs_flux_lora_to_diffusers).
XLABS: dict[str, tuple[Alias, ...]] = {
    "double_blocks.{n}.img_attn.qkv": (Alias("double_blocks.{n}.processor.qkv_lora1"),),
    "double_blocks.{n}.txt_attn.qkv": (Alias("double_blocks.{n}.processor.qkv_lora2"),),
    "double_blocks.{n}.img_attn.proj": (Alias("double_blocks.{n}.processor.proj_lora1"),),
    "double_blocks.{n}.txt_attn.proj": (Alias("double_blocks.{n}.processor.proj_lora2"),),
    "single_blocks.{n}.linear1": (Alias("single_blocks.{n}.processor.qkv_lora", part="qkv"),),
    "single_blocks.{n}.linear2": (Alias("single_blocks.{n}.processor.proj_lora"),),
}

# FLUX.1-dev: 19 double blocks, 38 single blocks, width 3072 (schnell lacks guidance_in).
_DEV = """\
double_blocks.{0-18}.img_attn.norm.key_norm.scale 128
double_blocks.{0-18}.img_attn.norm.query_norm.scale 128
double_blocks.{0-18}.img_attn.proj.weight 3072x3072
double_blocks.{0-18}.img_attn.qkv.weight 9216x3072
double_blocks.{0-18}.img_mlp.0.weight 12288x3072
double_blocks.{0-18}.img_mlp.2.weight 3072x12288
double_blocks.{0-18}.img_mod.lin.weight 18432x3072
double_blocks.{0-18}.txt_attn.norm.key_norm.scale 128
double_blocks.{0-18}.txt_attn.norm.query_norm.scale 128
double_blocks.{0-18}.txt_attn.proj.weight 3072x3072
double_blocks.{0-18}.txt_attn.qkv.weight 9216x3072
double_blocks.{0-18}.txt_mlp.0.weight 12288x3072
double_blocks.{0-18}.txt_mlp.2.weight 3072x12288
double_blocks.{0-18}.txt_mod.lin.weight 18432x3072
final_layer.adaLN_modulation.1.weight 6144x3072
final_layer.linear.weight 64x3072
guidance_in.in_layer.weight 3072x256
guidance_in.out_layer.weight 3072x3072
img_in.weight 3072x64
single_blocks.{0-37}.linear1.weight 21504x3072
single_blocks.{0-37}.linear2.weight 3072x15360
single_blocks.{0-37}.modulation.lin.weight 9216x3072
single_blocks.{0-37}.norm.key_norm.scale 128
single_blocks.{0-37}.norm.query_norm.scale 128
time_in.in_layer.weight 3072x256
time_in.out_layer.weight 3072x3072
txt_in.weight 3072x4096
vector_in.in_layer.weight 3072x768
vector_in.out_layer.weight 3072x3072"""

_QKV = "double_blocks.0.img_attn.qkv.weight"
_DIFFUSERS = (
    Probe("single_transformer_blocks.0.proj_mlp.weight"),
    Probe("transformer_blocks.0.attn.add_q_proj.weight"),
)

# kohya sd-scripts networks/lora_flux.py: every block linear, modulation included.
_EXTRACT_TARGETS = tuple(
    f"{s}_{m}.weight" for s in ("img", "txt") for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2", "mod.lin")
) + ("linear1.weight", "linear2.weight", "modulation.lin.weight")

# Per-block strengths: the streams by index; IN (the input embedders) and OUT (the final layer) as
# sd-webui-lora-block-weight's 61-value FLUX vector names them (CLIP, T5, IN, D00-D18, S00-S37, OUT).
_BLOCK_GROUPS = (
    BlockGroup("double{n}", "double_blocks.{n}."),
    BlockGroup("single{n}", "single_blocks.{n}."),
    BlockGroup("double{n}", _D),
    BlockGroup("single{n}", _S),
    *(BlockGroup("IN", p) for p in ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.")),
    *(BlockGroup("IN", p) for p in ("x_embedder.", "context_embedder.", "time_text_embed.")),
    BlockGroup("OUT", "final_layer."),
    *(BlockGroup("OUT", p) for p in ("norm_out.", "proj_out.")),
)

FAMILY = Family(
    arch="flux",
    title="FLUX.1",
    modelspec="flux-1-dev",
    kohya="flux1",
    metadata_names=("flux-1", "flux1", "flux"),
    diffusion="dit",
    diffusion_kind="flux",
    layouts=(
        Layout("comfyui", "model.diffusion_model.", "bfl", (Probe(_QKV),)),
        Layout("bfl", "", "bfl", (Probe(_QKV),)),  # as BFL ships flux1-dev.safetensors
        Layout("diffusers", "transformer.", "diffusers", _DIFFUSERS),
        Layout("diffusers", "", "diffusers", _DIFFUSERS),
    ),
    text_encoders=(
        TextEncoder(
            "te1",
            (("text_encoders.clip_l.transformer.", "clip_l"), ("text_encoder.", "clip_l")),
            ("lora_te1_", "lora_te_", "text_encoder.", "text_encoders.clip_l.transformer."),
        ),
        # T5 is te3 as in kohya sd-scripts networks/lora_flux.py (lora_te3_); OneTrainer writes lora_te2_ and diffusers calls it
        # text_encoder_2, both accepted here since Flux has no second CLIP.
        TextEncoder(
            "te3",
            (("text_encoders.t5xxl.transformer.", "t5xxl"), ("text_encoder_2.", "t5xxl")),
            ("lora_te3_", "lora_te2_", "text_encoder_2.", "text_encoders.t5xxl.transformer."),
        ),
    ),
    kohya_names={"dit": ("lora_unet_", "bfl"), "te1": ("lora_te1_", "hf"), "te3": ("lora_te3_", "hf")},
    renames=(
        Renames("bfl", "diffusers", modules=BFL_TO_DIFFUSERS, note="BFL checkpoint -> diffusers"),
        Renames("bfl", "bfl_extra", modules=BFL_EXTRAS, note="ComfyUI's extra BFL names"),
        Renames("bfl", "xlabs", modules=XLABS, note="XLabs processor LoRAs"),
    ),
    lora_prefixes=DIT_LORA_PREFIXES,
    extract_targets=_EXTRACT_TARGETS,
    variants=(
        Variant(
            "guidance_in.in_layer.weight",
            present="guidance embedder present (FLUX.1-dev-like)",
            absent="no guidance embedder (FLUX.1-schnell-like)",
            naming="bfl",
        ),
    ),
    quant_keep=("time_in.", "txt_in.", "img_in.", "vector_in.", "guidance_in.", "final_layer."),
    block_groups=_BLOCK_GROUPS,
    block_vectors={61: ("te1", "te3", "IN", *(f"double{n}" for n in range(19)), *(f"single{n}" for n in range(38)), "OUT")},
    implementation="https://github.com/black-forest-labs/flux",
    order=50,
    # diffusers' Flux pipeline and ai-toolkit write the same PEFT names; ai-toolkit says so in its
    # `software` metadata (ostris/ai-toolkit toolkit/metadata.py)
    flavours={"peft": "diffusers-flux", "peft+ai-toolkit": "aitoolkit-flux"},
    structures=(_DEV,),
)
