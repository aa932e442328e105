"""Chroma (and Chroma Radiance): FLUX.1's BFL layout without per-block modulation, plus the
`distilled_guidance_layer` that computes all modulations from the timestep. T5-XXL captions.

Names as diffusers loaders/single_file_utils.py convert_chroma_transformer_checkpoint_to_diffusers maps
them. ComfyUI's Chroma inherits FLUX.1's LoRA key map (comfy/model_base.py `class Chroma(Flux)`), so the
FLUX.1 spellings apply: diffusers per-projection names onto q|k|v and q|k|v|mlp bands, kohya
`lora_unet_` + BFL names, ai-toolkit `diffusion_model.`, ComfyUI's `linear1_qkv`. The distilled guidance
layer tells Chroma apart from FLUX.1 (which has `img_mod`) and FLUX.2 (shared modulation).
"""

from lorabake.arch.common import (
    DIT_LORA_PREFIXES,
    Alias,
    BlockGroup,
    Family,
    Layout,
    Probe,
    Renames,
    Variant,
    sole_text_encoder,
)

_D = "transformer_blocks.{n}."
_S = "single_transformer_blocks.{n}."
_G = "distilled_guidance_layer."

BFL_TO_DIFFUSERS: dict[str, tuple[Alias, ...]] = {
    "double_blocks.{n}.img_attn.qkv": tuple(Alias(_D + f"attn.to_{p}", part=p) for p in "qkv"),
    "double_blocks.{n}.txt_attn.qkv": tuple(Alias(_D + f"attn.add_{p}_proj", part=p) for p in "qkv"),
    "double_blocks.{n}.img_attn.proj": (Alias(_D + "attn.to_out.0"),),
    "double_blocks.{n}.txt_attn.proj": (Alias(_D + "attn.to_add_out"),),
    "double_blocks.{n}.img_mlp.0": (Alias(_D + "ff.net.0.proj"),),
    "double_blocks.{n}.img_mlp.2": (Alias(_D + "ff.net.2"),),
    "double_blocks.{n}.txt_mlp.0": (Alias(_D + "ff_context.net.0.proj"),),
    "double_blocks.{n}.txt_mlp.2": (Alias(_D + "ff_context.net.2"),),
    "double_blocks.{n}.img_attn.norm.query_norm": (Alias(_D + "attn.norm_q"),),
    "double_blocks.{n}.img_attn.norm.key_norm": (Alias(_D + "attn.norm_k"),),
    "double_blocks.{n}.txt_attn.norm.query_norm": (Alias(_D + "attn.norm_added_q"),),
    "double_blocks.{n}.txt_attn.norm.key_norm": (Alias(_D + "attn.norm_added_k"),),
    "single_blocks.{n}.linear1": (
        *(Alias(_S + f"attn.to_{p}", part=p) for p in "qkv"),
        Alias(_S + "proj_mlp", part="mlp"),
    ),
    "single_blocks.{n}.linear2": (Alias(_S + "proj_out"),),
    "single_blocks.{n}.norm.query_norm": (Alias(_S + "attn.norm_q"),),
    "single_blocks.{n}.norm.key_norm": (Alias(_S + "attn.norm_k"),),
    _G + "layers.{n}.in_layer": (Alias(_G + "layers.{n}.linear_1"),),
    _G + "layers.{n}.out_layer": (Alias(_G + "layers.{n}.linear_2"),),
    "img_in": (Alias("x_embedder"),),
    "txt_in": (Alias("context_embedder"),),
    "final_layer.linear": (Alias("proj_out"),),
}

# ComfyUI comfy/lora.py registers linear1_qkv for FLUX-layout models (XLabs/USO single-block qkv LoRAs)
BFL_EXTRAS: dict[str, tuple[Alias, ...]] = {
    "single_blocks.{n}.linear1": (Alias("single_blocks.{n}.linear1_qkv", part="qkv"),),
}

_BFL = (Probe("double_blocks.0.img_attn.qkv.weight"), Probe(_G + "in_proj.weight"))
# FLUX.1's diffusers probes plus the guidance layer: a superset, so detection keeps Chroma over FLUX.1
_DIFFUSERS = (
    Probe("single_transformer_blocks.0.proj_mlp.weight"),
    Probe("transformer_blocks.0.attn.add_q_proj.weight"),
    Probe(_G + "in_proj.weight"),
)

_EXTRACT_TARGETS = tuple(
    f"{s}_{m}.weight" for s in ("img", "txt") for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")
) + ("linear1.weight", "linear2.weight")

# Chroma1-HD: 19 double, 38 single blocks, width 3072, 5-layer guidance approximator (rows printed by scripts/family_structure.py from tests/data/arch/chroma.json.gz).
_STRUCTURE = """\
distilled_guidance_layer.in_proj.weight 5120x64
distilled_guidance_layer.layers.{0-4}.in_layer.weight 5120x5120
distilled_guidance_layer.layers.{0-4}.out_layer.weight 5120x5120
distilled_guidance_layer.norms.{0-4}.scale 5120
distilled_guidance_layer.out_proj.weight 3072x5120
double_blocks.{0-18}.img_attn.norm.key_norm.scale 128
double_blocks.{0-18}.img_attn.norm.query_norm.scale 128
double_blocks.{0-18}.img_attn.proj.weight 3072x3072
double_blocks.{0-18}.img_attn.qkv.weight 9216x3072
double_blocks.{0-18}.img_mlp.0.weight 12288x3072
double_blocks.{0-18}.img_mlp.2.weight 3072x12288
double_blocks.{0-18}.txt_attn.norm.key_norm.scale 128
double_blocks.{0-18}.txt_attn.norm.query_norm.scale 128
double_blocks.{0-18}.txt_attn.proj.weight 3072x3072
double_blocks.{0-18}.txt_attn.qkv.weight 9216x3072
double_blocks.{0-18}.txt_mlp.0.weight 12288x3072
double_blocks.{0-18}.txt_mlp.2.weight 3072x12288
final_layer.linear.weight 64x3072
img_in.weight 3072x64
single_blocks.{0-37}.linear1.weight 21504x3072
single_blocks.{0-37}.linear2.weight 3072x15360
single_blocks.{0-37}.norm.key_norm.scale 128
single_blocks.{0-37}.norm.query_norm.scale 128
txt_in.weight 3072x4096"""

FAMILY = Family(
    arch="chroma",
    title="Chroma",
    modelspec="chroma",
    kohya="chroma",
    metadata_names=("chroma",),
    diffusion="dit",
    diffusion_kind="chroma",
    layouts=(
        Layout("comfyui", "model.diffusion_model.", "bfl", _BFL),
        Layout("bfl", "", "bfl", _BFL),
        Layout("diffusers", "transformer.", "diffusers", _DIFFUSERS),
        Layout("diffusers", "", "diffusers", _DIFFUSERS),
    ),
    text_encoders=(
        sole_text_encoder("t5xxl", "T5-XXL"),
    ),
    kohya_names={"dit": ("lora_unet_", "bfl"), "te1": ("lora_te_", "hf")},
    renames=(
        Renames("bfl", "diffusers", modules=BFL_TO_DIFFUSERS, note="BFL checkpoint -> diffusers (Chroma)"),
        Renames("bfl", "bfl_extra", modules=BFL_EXTRAS, note="ComfyUI's extra BFL names"),
    ),
    lora_prefixes=DIT_LORA_PREFIXES,
    extract_targets=_EXTRACT_TARGETS,
    # Chroma Radiance works in pixel space: a patch conv `img_in_patch` for `img_in` and a NeRF head
    # (`nerf_image_embedder`, `nerf_blocks.N`, `nerf_final_layer(_conv)`: ComfyUI comfy/ldm/chroma_radiance/model.py)
    variants=(Variant("img_in_patch.weight", present="Chroma Radiance (pixel space: img_in_patch and a nerf_* head)", naming="bfl"),),
    quant_keep=("distilled_guidance_layer.", "txt_in.", "img_in.", "final_layer."),
    block_groups=(
        BlockGroup("double{n}", "double_blocks.{n}."),
        BlockGroup("single{n}", "single_blocks.{n}."),
    ),
    implementation="https://github.com/lodestone-rock/flow",
    order=52,
    structures=(_STRUCTURE,),
)
