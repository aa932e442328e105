"""SDXL base 1.0: SGM layout, UNet with 3 levels (no attention at level 0) + CLIP-L + OpenCLIP-G."""

from lorabake.arch import _block_weights, _sd_unet
from lorabake.arch.common import UNET_LORA_PREFIXES, Family, Layout, Probe, TextEncoder

_SGM_TO_K = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
_DIFFUSERS_TO_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
BLOCKS = _sd_unet.UnetBlocks(levels=3, per=3, down_attn=(False, True, True), up_attn=(True, True, False))
SHAPE = _sd_unet.UnetShape(
    channels=(320, 640, 1280), depth=(0, 2, 10), context=2048, linear_proj=True, label_in=2816
)

FAMILY = Family(
    arch="sdxl",
    title="Stable Diffusion XL",
    modelspec="stable-diffusion-xl-v1-base",
    kohya="sdxl_base_v1-0",
    metadata_names=("stable-diffusion-xl", "sdxl"),
    diffusion="unet",
    diffusion_kind="unet",
    layouts=(
        Layout("sgm", "model.diffusion_model.", "ldm", (Probe(_SGM_TO_K, 1, 2048),)),
        Layout("unet-only", "", "ldm", (Probe(_SGM_TO_K, 1, 2048),)),
        Layout("diffusers", "unet.", "diffusers", (Probe(_DIFFUSERS_TO_K, 1, 2048),)),
        Layout("diffusers", "", "diffusers", (Probe(_DIFFUSERS_TO_K, 1, 2048),)),
    ),
    text_encoders=(
        TextEncoder(
            "te1",
            (("conditioner.embedders.0.transformer.", "clip_l"), ("text_encoder.", "clip_l")),
            ("lora_te1_", "lora_te_", "text_encoder.", "text_encoders.clip_l.transformer."),
        ),
        TextEncoder(
            "te2",
            # SGM: raw OpenCLIP-G with fused in_proj; diffusers: HF CLIPTextModelWithProjection layout
            (("conditioner.embedders.1.model.", "openclip_g"), ("text_encoder_2.", "clip_g")),
            ("lora_te2_", "text_encoder_2.", "text_encoders.clip_g.transformer."),
        ),
    ),
    # kohya SDXL trains on its own SGM-named UNet, so its LoRA names are the checkpoint's
    kohya_names={"unet": ("lora_unet_", "ldm"), "te1": ("lora_te1_", "hf"), "te2": ("lora_te2_", "hf")},
    renames=_sd_unet.unet_renames(BLOCKS),
    lora_prefixes=UNET_LORA_PREFIXES,
    extract_targets=_sd_unet.EXTRACT_TARGETS,
    extract_conv_targets=_sd_unet.EXTRACT_CONV_TARGETS,
    variants=_sd_unet.VARIANTS,
    quant_keep=("^input_blocks.0.0.", "^out.", "^conv_in.", "^conv_out."),
    block_groups=_sd_unet.unet_block_groups(BLOCKS),
    block_vectors=_block_weights.SDXL_VECTORS,
    block_presets=_block_weights.SDXL_PRESETS,
    implementation="https://github.com/Stability-AI/generative-models",
    order=30,
    structures=(_sd_unet.structure(BLOCKS, SHAPE),),
)
