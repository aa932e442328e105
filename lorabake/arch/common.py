"""Row types and the name tables shared by several families (UNet block map, OpenCLIP <-> HF CLIP).

Everything here is data; `lorabake.detect` and `lorabake.keymap` hold the little logic that reads it.
"""

from __future__ import annotations

from typing import NamedTuple


class Probe(NamedTuple):
    """A tensor that must exist (relative to the layout's prefix); `size` pins shape[dim] when given."""

    key: str
    dim: int | None = None
    size: int | None = None


class Layout(NamedTuple):
    """One way a family's diffusion model is stored: its root prefix, its naming and its sentinels."""

    layout: str  # "ldm", "sgm", "comfyui", "bfl", "unet-only", "dit-only", "diffusers"
    prefix: str  # diffusion model root, e.g. "model.diffusion_model."
    naming: str  # "ldm" | "diffusers" | "mmdit" | "bfl": how module names under the root read
    probes: tuple[Probe, ...]


class TextEncoder(NamedTuple):
    """One text encoder slot: where it may be stored (first present root wins) and its LoRA prefixes."""

    component: str  # "te1" | "te2" | "te3"
    roots: tuple[tuple[str, str], ...]  # (key prefix, kind)
    lora_prefixes: tuple[str, ...]  # LoRA-side prefixes; ending in "_" means module path joined with "_"


class Alias(NamedTuple):
    """One other name of a checkpoint module: `name` (a template with {n} = block index).

    `part` selects rows of a fused weight (see PARTS); `transform` is applied to ΔW; `rows`, when
    set, restricts the row to weights with rows == rows × H (H = in-features).
    """

    name: str
    part: str | None = None
    transform: str | None = None
    rows: int | None = None


# Row ranges of fused weights in units of H (= the weight's in-features): [start, end), None = to the end.
PARTS: dict[str, tuple[int, int | None]] = {
    "q": (0, 1),
    "k": (1, 2),
    "v": (2, 3),
    "qkv": (0, 3),
    "mlp": (3, None),  # Flux single_blocks.linear1 = q ‖ k ‖ v ‖ mlp-in
}

# Parameter names that carry a module's weight (the target) and the matching bias parameter.
WEIGHT_PARAMS: dict[str, str | None] = {
    "weight": "bias",
    "in_proj_weight": "in_proj_bias",  # torch MultiheadAttention (OpenCLIP)
    "scale": None,  # Flux RMSNorm
}
BIAS_PARAMS = frozenset({"bias", "in_proj_bias"})

# A diffusers folder as the reader gives it: tensors prefixed by their subfolder.
DIFFUSERS_FOLDERS = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3.", "vae.")

# The VAE: never a LoRA target, only reported.
VAE_ROOTS: tuple[str, ...] = ("first_stage_model.", "vae.")

# LoRA-side prefixes of the diffusion model (UNet or DiT); every alias family gets all of them.
# [KS] lora_unet_, [LY] lycoris_, OneTrainer lora_transformer_, [CU] generic diffusion_model.,
# diffusers unet./transformer., PEFT base_model.model., DiffSynth/BFL no prefix.
UNET_LORA_PREFIXES = (
    "lora_unet_",
    "lycoris_",
    "diffusion_model.",
    "model.diffusion_model.",
    "unet.",
    "unet.base_model.model.",
    "base_model.model.",
    "",
)
DIT_LORA_PREFIXES = (
    "lora_unet_",
    "lycoris_",
    "lora_transformer_",
    "diffusion_model.",
    "model.diffusion_model.",
    "transformer.",
    "transformer.base_model.model.",
    "base_model.model.",
    "",
)

# Which component a LoRA prefix names when the base's own table does not say (planner: "base has no te2").
# "diffusion" stands for the base's diffusion component ("unet" or "dit").
GENERIC_COMPONENT_PREFIXES: dict[str, str] = {
    "lora_unet_": "diffusion",
    "lycoris_": "diffusion",
    "lora_transformer_": "diffusion",
    "oft_unet_": "diffusion",
    "unet.": "diffusion",
    "transformer.": "diffusion",
    "diffusion_model.": "diffusion",
    "model.diffusion_model.": "diffusion",
    "base_model.model.": "diffusion",
    "lora_te_": "te1",
    "lora_te1_": "te1",
    "lora_te2_": "te2",
    "lora_te3_": "te3",
    "text_encoder.": "te1",
    "text_encoder_2.": "te2",
    "text_encoder_3.": "te3",
    "text_encoders.clip_l.": "te1",
    "text_encoders.clip_h.": "te1",
    "text_encoders.clip_g.": "te2",
    "text_encoders.t5xxl.": "te3",
}

# Roots looked for when no family matched, so a base without a table (Lumina, ...) still takes LoRAs
# named after its own keys (keymap's generic fallback).
GENERIC_DIFFUSION_ROOTS: tuple[str, ...] = ("model.diffusion_model.",)
GENERIC_TEXT_ENCODERS: tuple[TextEncoder, ...] = (
    TextEncoder(
        "te1",
        (("text_encoders.clip_l.transformer.", "clip_l"), ("cond_stage_model.transformer.", "clip_l")),
        ("lora_te1_", "lora_te_", "text_encoders.clip_l.transformer."),
    ),
    TextEncoder(
        "te2",
        (("text_encoders.clip_g.transformer.", "clip_g"),),
        ("lora_te2_", "text_encoders.clip_g.transformer."),
    ),
    TextEncoder(
        "te3",
        (("text_encoders.t5xxl.transformer.", "t5xxl"),),
        ("lora_te3_", "text_encoders.t5xxl.transformer."),
    ),
)

# ---------------------------------------------------------------------------------------------------------
# SD UNet (LDM/SGM names <-> diffusers names). The block structure (levels, layers per
# block, which levels have attention) is read from the checkpoint; these are the fixed sub-name tables.

# LDM ResBlock sub-module -> diffusers ResnetBlock2D sub-module.
RESNET_RENAMES: dict[str, str] = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

# Single modules outside the block grid.
UNET_LEAVES: dict[str, str] = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "label_emb.0.0": "add_embedding.linear_1",  # SDXL
    "label_emb.0.2": "add_embedding.linear_2",
}

# Old diffusers attention-processor LoRAs (`…attn1.processor.to_q_lora.up.weight`): last module parts.
ATTN_PROCESSOR: dict[str, str] = {
    "to_q": "processor.to_q",
    "to_k": "processor.to_k",
    "to_v": "processor.to_v",
    "to_out.0": "processor.to_out",
}

# ---------------------------------------------------------------------------------------------------------
# OpenCLIP text transformer (SD2 OpenCLIP-H, SDXL OpenCLIP-G) -> HF CLIPTextModel names
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


class UnetBlocks(NamedTuple):
    """A UNet's block structure: used when a partial file cannot show it."""

    levels: int
    per: int  # input blocks per level: layers_per_block + 1
    down_attn: tuple[bool, ...]
    up_attn: tuple[bool, ...]


class Family(NamedTuple):
    """Everything lorabake knows about one model family, as rows."""

    arch: str  # "sd1", "sd2", "sdxl", "sd3", "flux"
    title: str
    modelspec: str  # modelspec.architecture of a checkpoint (LoRAs append "/lora")
    kohya: str  # ss_base_model_version written by kohya sd-scripts
    metadata_names: tuple[
        str, ...
    ]  # prefixes of modelspec.architecture / ss_base_model_version meaning this family
    diffusion: str  # component name: "unet" | "dit"
    diffusion_kind: str  # ComponentInfo.kind: "unet" | "mmdit" | "flux"
    layouts: tuple[Layout, ...]
    text_encoders: tuple[TextEncoder, ...]
    # component -> (kohya prefix, naming family) of the stem a kohya trainer writes (extraction names)
    kohya_names: dict[str, tuple[str, str]]
    # naming family -> {module template in the checkpoint's native naming: aliases in that family}
    renames: dict[str, dict[str, tuple[Alias, ...]]]
    unet_blocks: UnetBlocks | None = None
