"""FLUX.2 (dev; klein 4B/9B and their base variants): BFL DiT with shared modulation and no biases.

The single files (`flux2-dev.safetensors`, `flux-2-klein-4b.safetensors`, ...) use BFL names with no prefix:
fused `double_blocks.N.img_attn.qkv`, SwiGLU `img_mlp.0` (2x rows), `single_blocks.N.linear1` (q|k|v|mlp
in, which diffusers keeps whole as `attn.to_qkv_mlp_proj`), modulation shared by all blocks
(`double_stream_modulation_img.lin`, `double_stream_modulation_txt.lin`, `single_stream_modulation.lin`).
Names as diffusers loaders/single_file_utils.py convert_flux2_transformer_checkpoint_to_diffusers maps them.
FLUX.1 has per-block `img_mod` and Chroma `distilled_guidance_layer`; the shared modulation tells FLUX.2 apart.
"""

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

# BFL module (checkpoint) -> diffusers Flux2Transformer2DModel module. Written by diffusers/PEFT
# (`transformer.`, `base_model.model.`), ai-toolkit (`diffusion_model.` + either naming), musubi/kohya
# (`lora_unet_` + BFL names), SimpleTuner LyCORIS (`lycoris_`).
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
    "double_blocks.{n}.img_mlp.0": (Alias(_D + "ff.linear_in"),),
    "double_blocks.{n}.img_mlp.2": (Alias(_D + "ff.linear_out"),),
    "double_blocks.{n}.txt_mlp.0": (Alias(_D + "ff_context.linear_in"),),
    "double_blocks.{n}.txt_mlp.2": (Alias(_D + "ff_context.linear_out"),),
    "double_blocks.{n}.img_attn.norm.query_norm": (Alias(_D + "attn.norm_q"),),  # RMSNorm .scale
    "double_blocks.{n}.img_attn.norm.key_norm": (Alias(_D + "attn.norm_k"),),
    "double_blocks.{n}.txt_attn.norm.query_norm": (Alias(_D + "attn.norm_added_q"),),
    "double_blocks.{n}.txt_attn.norm.key_norm": (Alias(_D + "attn.norm_added_k"),),
    "single_blocks.{n}.linear1": (Alias(_S + "attn.to_qkv_mlp_proj"),),  # whole: diffusers does not split it
    "single_blocks.{n}.linear2": (Alias(_S + "attn.to_out"),),
    "single_blocks.{n}.norm.query_norm": (Alias(_S + "attn.norm_q"),),
    "single_blocks.{n}.norm.key_norm": (Alias(_S + "attn.norm_k"),),
    "img_in": (Alias("x_embedder"),),
    "txt_in": (Alias("context_embedder"),),
    "time_in.in_layer": (Alias("time_guidance_embed.timestep_embedder.linear_1"),),
    "time_in.out_layer": (Alias("time_guidance_embed.timestep_embedder.linear_2"),),
    "guidance_in.in_layer": (Alias("time_guidance_embed.guidance_embedder.linear_1"),),
    "guidance_in.out_layer": (Alias("time_guidance_embed.guidance_embedder.linear_2"),),
    "double_stream_modulation_img.lin": (Alias("double_stream_modulation_img.linear"),),
    "double_stream_modulation_txt.lin": (Alias("double_stream_modulation_txt.linear"),),
    "single_stream_modulation.lin": (Alias("single_stream_modulation.linear"),),
    "final_layer.linear": (Alias("proj_out"),),
    # diffusers AdaLayerNormContinuous is (scale, shift); BFL is (shift, scale)
    "final_layer.adaLN_modulation.1": (Alias("norm_out.linear", transform="swap_halves"),),
}

_BFL = (Probe("double_blocks.0.img_attn.qkv.weight"), Probe("double_stream_modulation_img.lin.weight"))
_DIFFUSERS = (
    Probe("double_stream_modulation_img.linear.weight"),
    Probe("single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight"),
)

# musubi-tuner / kohya FLUX.2 networks: every block linear (the shared modulations are outside the blocks)
_EXTRACT_TARGETS = tuple(
    f"{s}_{m}.weight" for s in ("img", "txt") for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")
) + ("linear1.weight", "linear2.weight")

# FLUX.2-dev: 8 double blocks, 48 single blocks, width 6144 (klein: fewer, narrower) (rows printed by scripts/family_structure.py from tests/data/arch/flux2.json.gz).
_STRUCTURE = """\
double_blocks.{0-7}.img_attn.norm.key_norm.scale 128
double_blocks.{0-7}.img_attn.norm.query_norm.scale 128
double_blocks.{0-7}.img_attn.proj.weight 6144x6144
double_blocks.{0-7}.img_attn.qkv.weight 18432x6144
double_blocks.{0-7}.img_mlp.0.weight 36864x6144
double_blocks.{0-7}.img_mlp.2.weight 6144x18432
double_blocks.{0-7}.txt_attn.norm.key_norm.scale 128
double_blocks.{0-7}.txt_attn.norm.query_norm.scale 128
double_blocks.{0-7}.txt_attn.proj.weight 6144x6144
double_blocks.{0-7}.txt_attn.qkv.weight 18432x6144
double_blocks.{0-7}.txt_mlp.0.weight 36864x6144
double_blocks.{0-7}.txt_mlp.2.weight 6144x18432
double_stream_modulation_img.lin.weight 36864x6144
double_stream_modulation_txt.lin.weight 36864x6144
final_layer.adaLN_modulation.1.weight 12288x6144
final_layer.linear.weight 128x6144
guidance_in.in_layer.weight 6144x256
guidance_in.out_layer.weight 6144x6144
img_in.weight 6144x128
single_blocks.{0-47}.linear1.weight 55296x6144
single_blocks.{0-47}.linear2.weight 6144x24576
single_blocks.{0-47}.norm.key_norm.scale 128
single_blocks.{0-47}.norm.query_norm.scale 128
single_stream_modulation.lin.weight 18432x6144
time_in.in_layer.weight 6144x256
time_in.out_layer.weight 6144x6144
txt_in.weight 6144x15360"""

FAMILY = Family(
    arch="flux2",
    title="FLUX.2",
    modelspec="flux-2-dev",
    kohya="flux2",
    metadata_names=("flux-2", "flux2", "flux.2"),
    diffusion="dit",
    diffusion_kind="flux2",
    layouts=(
        Layout("comfyui", "model.diffusion_model.", "bfl", _BFL),
        Layout("bfl", "", "bfl", _BFL),
        Layout("diffusers", "transformer.", "diffusers", _DIFFUSERS),
        Layout("diffusers", "", "diffusers", _DIFFUSERS),
    ),
    # dev: Mistral Small 3.1 24B; klein 4B/9B: Qwen3-4B/8B (ComfyUI comfy/text_encoders/flux.py names
    # "mistral3_24b", "qwen3_4b", "qwen3_8b", the all-in-one file's roots); a diffusers folder's text_encoder/
    text_encoders=(
        TextEncoder(
            "te1",
            (
                ("text_encoders.mistral3_24b.transformer.", "mistral3_24b"),
                ("text_encoders.qwen3_4b.transformer.", "qwen3_4b"),
                ("text_encoders.qwen3_8b.transformer.", "qwen3_8b"),
                ("text_encoder.", "mistral3_24b"),  # the kinds differ in sizes only: the names are the same
            ),
            (
                "lora_te_",
                "lora_te1_",
                "text_encoder.",
                "text_encoders.mistral3_24b.transformer.",
                "text_encoders.qwen3_4b.transformer.",
                "text_encoders.qwen3_8b.transformer.",
            ),
            title="Mistral 3 (dev) or Qwen3 (klein)",
        ),
    ),
    kohya_names={"dit": ("lora_unet_", "bfl"), "te1": ("lora_te_", "hf_base")},
    renames=(Renames("bfl", "diffusers", modules=BFL_TO_DIFFUSERS, note="BFL checkpoint -> diffusers"),),
    lora_prefixes=DIT_LORA_PREFIXES,
    extract_targets=_EXTRACT_TARGETS,
    variants=(
        Variant(
            "guidance_in.in_layer.weight",
            present="guidance embedder present (dev-like)",
            absent="no guidance embedder (klein-like)",
            naming="bfl",
        ),
        Variant("img_in.weight", present="hidden width {size} (klein; dev is 6144)", naming="bfl", dim=0, size=6144),
    ),
    quant_keep=("time_in.", "txt_in.", "img_in.", "guidance_in.", "final_layer."),
    block_groups=(
        BlockGroup("double{n}", "double_blocks.{n}."),
        BlockGroup("single{n}", "single_blocks.{n}."),
    ),
    implementation="https://github.com/black-forest-labs/flux2",
    order=51,
    structures=(_STRUCTURE,),
)
