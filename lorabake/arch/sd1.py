"""Stable Diffusion 1.x: LDM UNet + HF CLIP-L."""

from lorabake.arch import _block_weights, _sd_unet
from lorabake.arch.common import UNET_LORA_PREFIXES, Family, Layout, Probe, TextEncoder

# Cross-attention K reads the text encoder's width: 768 (CLIP-L) for SD1, 1024 for SD2, 2048 for SDXL.
_LDM_TO_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_DIFFUSERS_TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
BLOCKS = _sd_unet.UnetBlocks(
    levels=4, per=3, down_attn=(True, True, True, False), up_attn=(False, True, True, True)
)
SHAPE = _sd_unet.UnetShape(
    channels=(320, 640, 1280, 1280), depth=(1, 1, 1, 1), context=768, linear_proj=False
)

FAMILY = Family(
    arch="sd1",
    title="Stable Diffusion 1.x",
    modelspec="stable-diffusion-v1",
    kohya="sd_v1",
    metadata_names=("stable-diffusion-v1", "sd_v1"),
    diffusion="unet",
    diffusion_kind="unet",
    layouts=(
        Layout("ldm", "model.diffusion_model.", "ldm", (Probe(_LDM_TO_K, 1, 768),)),
        Layout("unet-only", "", "ldm", (Probe(_LDM_TO_K, 1, 768),)),
        Layout("diffusers", "unet.", "diffusers", (Probe(_DIFFUSERS_TO_K, 1, 768),)),
        Layout("diffusers", "", "diffusers", (Probe(_DIFFUSERS_TO_K, 1, 768),)),
    ),
    text_encoders=(
        TextEncoder(
            "te1",
            # old files: cond_stage_model.transformer.encoder.* without text_model (keymap adds it)
            (("cond_stage_model.transformer.", "clip_l"), ("text_encoder.", "clip_l")),
            # kohya lora_te_; some SD1 LoRAs say lora_te1_ (A1111 and ComfyUI map both); diffusers; ComfyUI
            ("lora_te_", "lora_te1_", "text_encoder.", "text_encoders.clip_l.transformer."),
        ),
    ),
    # kohya SD1/SD2 LoRAs name UNet modules by their diffusers path (LoRANetwork on the diffusers UNet)
    kohya_names={"unet": ("lora_unet_", "diffusers"), "te1": ("lora_te_", "hf")},
    renames=_sd_unet.unet_renames(BLOCKS),
    lora_prefixes=UNET_LORA_PREFIXES,
    extract_targets=_sd_unet.EXTRACT_TARGETS,
    extract_conv_targets=_sd_unet.EXTRACT_CONV_TARGETS,
    variants=_sd_unet.VARIANTS,
    quant_keep=("^input_blocks.0.0.", "^out.", "^conv_in.", "^conv_out."),
    block_groups=_sd_unet.unet_block_groups(BLOCKS),
    block_vectors=_block_weights.SD_VECTORS,
    block_presets=_block_weights.SD_PRESETS,
    resolution="512x512",
    order=10,
    structures=(_sd_unet.structure(BLOCKS, SHAPE),),
)
