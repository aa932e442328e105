"""Stable Diffusion 2.x: SD1's UNet (linear proj_in/out, cross-attn in 1024) + OpenCLIP-H."""

from lorabake.arch import _block_weights, _sd_unet
from lorabake.arch.common import UNET_LORA_PREFIXES, Family, Layout, Probe, TextEncoder

_LDM_TO_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_DIFFUSERS_TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
BLOCKS = _sd_unet.UnetBlocks(
    levels=4, per=3, down_attn=(True, True, True, False), up_attn=(False, True, True, True)
)
SHAPE = _sd_unet.UnetShape(
    channels=(320, 640, 1280, 1280), depth=(1, 1, 1, 1), context=1024, linear_proj=True
)

FAMILY = Family(
    arch="sd2",
    title="Stable Diffusion 2.x",
    modelspec="stable-diffusion-v2-512",
    kohya="sd_v2",
    metadata_names=("stable-diffusion-v2", "sd_v2"),
    diffusion="unet",
    diffusion_kind="unet",
    layouts=(
        Layout("ldm", "model.diffusion_model.", "ldm", (Probe(_LDM_TO_K, 1, 1024),)),
        Layout("unet-only", "", "ldm", (Probe(_LDM_TO_K, 1, 1024),)),
        Layout("diffusers", "unet.", "diffusers", (Probe(_DIFFUSERS_TO_K, 1, 1024),)),
        Layout("diffusers", "", "diffusers", (Probe(_DIFFUSERS_TO_K, 1, 1024),)),
    ),
    text_encoders=(
        TextEncoder(
            "te1",
            (
                ("cond_stage_model.model.", "openclip_h"),  # raw OpenCLIP, fused attn.in_proj_weight
                ("conditioner.embedders.0.model.", "openclip_h"),  # SGM-packed SD2 (ComfyUI loads it)
                ("text_encoder.", "clip_h"),  # diffusers: HF CLIPTextModel layout
            ),
            ("lora_te_", "lora_te1_", "text_encoder.", "text_encoders.clip_h.transformer."),
        ),
    ),
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
    order=20,
    structures=(_sd_unet.structure(BLOCKS, SHAPE),),
    legacy_flags=("ss_v2",),  # old kohya files say ss_v2 = "True"
)
