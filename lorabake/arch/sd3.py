"""Stable Diffusion 3 / 3.5 (MMDiT) in the ComfyUI single-file layout."""

from lorabake.arch.common import (
    DIT_LORA_PREFIXES,
    Alias,
    BlockGroup,
    Family,
    Layout,
    Probe,
    Renames,
    TextEncoder,
)

_B = "transformer_blocks.{n}."

# MMDiT module (checkpoint) -> diffusers SD3Transformer2DModel module. As ComfyUI comfy/utils.py
# mmdit_to_diffusers and diffusers loaders/single_file_utils.py convert_sd3_transformer_checkpoint_to_diffusers.
MMDIT_TO_DIFFUSERS: dict[str, tuple[Alias, ...]] = {
    "joint_blocks.{n}.x_block.attn.qkv": (
        Alias(_B + "attn.to_q", part="q"),
        Alias(_B + "attn.to_k", part="k"),
        Alias(_B + "attn.to_v", part="v"),
    ),
    "joint_blocks.{n}.context_block.attn.qkv": (
        Alias(_B + "attn.add_q_proj", part="q"),
        Alias(_B + "attn.add_k_proj", part="k"),
        Alias(_B + "attn.add_v_proj", part="v"),
    ),
    "joint_blocks.{n}.x_block.attn.proj": (Alias(_B + "attn.to_out.0"),),
    "joint_blocks.{n}.context_block.attn.proj": (Alias(_B + "attn.to_add_out"),),
    "joint_blocks.{n}.x_block.mlp.fc1": (Alias(_B + "ff.net.0.proj"),),
    "joint_blocks.{n}.x_block.mlp.fc2": (Alias(_B + "ff.net.2"),),
    "joint_blocks.{n}.context_block.mlp.fc1": (Alias(_B + "ff_context.net.0.proj"),),
    "joint_blocks.{n}.context_block.mlp.fc2": (Alias(_B + "ff_context.net.2"),),
    "joint_blocks.{n}.x_block.adaLN_modulation.1": (Alias(_B + "norm1.linear"),),
    "joint_blocks.{n}.context_block.adaLN_modulation.1": (
        Alias(_B + "norm1_context.linear", rows=6),
        # the last block is context-pre-only: 2H rows (shift, scale) that diffusers stores as (scale, shift)
        Alias(_B + "norm1_context.linear", transform="swap_halves", rows=2),
    ),
    # SD3.5 medium (MMDiT-X) second attention and qk-norms
    "joint_blocks.{n}.x_block.attn2.qkv": (
        Alias(_B + "attn2.to_q", part="q"),
        Alias(_B + "attn2.to_k", part="k"),
        Alias(_B + "attn2.to_v", part="v"),
    ),
    "joint_blocks.{n}.x_block.attn2.proj": (Alias(_B + "attn2.to_out.0"),),
    "joint_blocks.{n}.x_block.attn.ln_q": (Alias(_B + "attn.norm_q"),),
    "joint_blocks.{n}.x_block.attn.ln_k": (Alias(_B + "attn.norm_k"),),
    "joint_blocks.{n}.context_block.attn.ln_q": (Alias(_B + "attn.norm_added_q"),),
    "joint_blocks.{n}.context_block.attn.ln_k": (Alias(_B + "attn.norm_added_k"),),
    "joint_blocks.{n}.x_block.attn2.ln_q": (Alias(_B + "attn2.norm_q"),),
    "joint_blocks.{n}.x_block.attn2.ln_k": (Alias(_B + "attn2.norm_k"),),
    "x_embedder.proj": (Alias("pos_embed.proj"),),
    "context_embedder": (Alias("context_embedder"),),
    "t_embedder.mlp.0": (Alias("time_text_embed.timestep_embedder.linear_1"),),
    "t_embedder.mlp.2": (Alias("time_text_embed.timestep_embedder.linear_2"),),
    "y_embedder.mlp.0": (Alias("time_text_embed.text_embedder.linear_1"),),
    "y_embedder.mlp.2": (Alias("time_text_embed.text_embedder.linear_2"),),
    "final_layer.linear": (Alias("proj_out"),),
    "final_layer.adaLN_modulation.1": (Alias("norm_out.linear", transform="swap_halves"),),
}

# SD3 medium (24 joint blocks, width 1536; the last context block only modulates: 2·1536 rows).
_MEDIUM = """\
context_embedder.weight 1536x4096
final_layer.adaLN_modulation.1.weight 3072x1536
final_layer.linear.weight 64x1536
joint_blocks.{0-22}.context_block.adaLN_modulation.1.weight 9216x1536
joint_blocks.{0-22}.context_block.attn.proj.weight 1536x1536
joint_blocks.{0-23}.context_block.attn.qkv.weight 4608x1536
joint_blocks.{0-22}.context_block.mlp.fc1.weight 6144x1536
joint_blocks.{0-22}.context_block.mlp.fc2.weight 1536x6144
joint_blocks.{0-23}.x_block.adaLN_modulation.1.weight 9216x1536
joint_blocks.{0-23}.x_block.attn.proj.weight 1536x1536
joint_blocks.{0-23}.x_block.attn.qkv.weight 4608x1536
joint_blocks.{0-23}.x_block.mlp.fc1.weight 6144x1536
joint_blocks.{0-23}.x_block.mlp.fc2.weight 1536x6144
joint_blocks.23.context_block.adaLN_modulation.1.weight 3072x1536
pos_embed 1x36864x1536
t_embedder.mlp.0.weight 1536x256
t_embedder.mlp.2.weight 1536x1536
x_embedder.proj.weight 1536x16x2x2
y_embedder.mlp.0.weight 1536x2048
y_embedder.mlp.2.weight 1536x1536"""

# SD3.5 large: 38 joint blocks, width 2432, q/k RMSNorms.
_LARGE = """\
context_embedder.weight 2432x4096
final_layer.adaLN_modulation.1.weight 4864x2432
final_layer.linear.weight 64x2432
joint_blocks.{0-36}.context_block.adaLN_modulation.1.weight 14592x2432
joint_blocks.{0-36}.context_block.attn.proj.weight 2432x2432
joint_blocks.{0-37}.context_block.attn.qkv.weight 7296x2432
joint_blocks.{0-36}.context_block.mlp.fc1.weight 9728x2432
joint_blocks.{0-36}.context_block.mlp.fc2.weight 2432x9728
joint_blocks.{0-37}.x_block.adaLN_modulation.1.weight 14592x2432
joint_blocks.{0-37}.x_block.attn.proj.weight 2432x2432
joint_blocks.{0-37}.x_block.attn.qkv.weight 7296x2432
joint_blocks.{0-37}.x_block.mlp.fc1.weight 9728x2432
joint_blocks.{0-37}.x_block.mlp.fc2.weight 2432x9728
joint_blocks.{0-37}.{x_block,context_block}.attn.ln_{q,k}.weight 64
joint_blocks.37.context_block.adaLN_modulation.1.weight 4864x2432
pos_embed 1x36864x2432
t_embedder.mlp.0.weight 2432x256
t_embedder.mlp.2.weight 2432x2432
x_embedder.proj.weight 2432x16x2x2
y_embedder.mlp.0.weight 2432x2048
y_embedder.mlp.2.weight 2432x2432"""

_QKV = "joint_blocks.0.x_block.attn.qkv.weight"
_DIFFUSERS = (Probe("transformer_blocks.0.attn.add_q_proj.weight"), Probe("pos_embed.proj.weight"))

# kohya sd-scripts networks/lora_sd3.py: the joint blocks' linears, modulation included.
_EXTRACT_TARGETS = tuple(
    f"{b}.{m}.weight"
    for b in ("x_block", "context_block")
    for m in ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
)

FAMILY = Family(
    arch="sd3",
    title="Stable Diffusion 3",
    modelspec="stable-diffusion-3-medium",
    kohya="sd3",
    metadata_names=("stable-diffusion-3", "stable-diffusion-v3", "sd3"),
    diffusion="dit",
    diffusion_kind="mmdit",
    layouts=(
        Layout("comfyui", "model.diffusion_model.", "mmdit", (Probe(_QKV),)),
        Layout("dit-only", "", "mmdit", (Probe(_QKV),)),
        Layout("diffusers", "transformer.", "diffusers", _DIFFUSERS),
        Layout("diffusers", "", "diffusers", _DIFFUSERS),
    ),
    text_encoders=(
        TextEncoder(
            "te1",
            (("text_encoders.clip_l.transformer.", "clip_l"), ("text_encoder.", "clip_l")),
            ("lora_te1_", "lora_te_", "text_encoder.", "text_encoders.clip_l.transformer."),
        ),
        TextEncoder(
            "te2",
            (("text_encoders.clip_g.transformer.", "clip_g"), ("text_encoder_2.", "clip_g")),
            ("lora_te2_", "text_encoder_2.", "text_encoders.clip_g.transformer."),
        ),
        TextEncoder(
            "te3",
            (("text_encoders.t5xxl.transformer.", "t5xxl"), ("text_encoder_3.", "t5xxl")),
            ("lora_te3_", "text_encoder_3.", "text_encoders.t5xxl.transformer."),
        ),
    ),
    # kohya sd-scripts networks/lora_sd3.py: lora_unet_ + MMDiT names, te1/te2/te3
    kohya_names={
        "dit": ("lora_unet_", "mmdit"),
        "te1": ("lora_te1_", "hf"),
        "te2": ("lora_te2_", "hf"),
        "te3": ("lora_te3_", "hf"),
    },
    renames=(
        Renames("mmdit", "diffusers", modules=MMDIT_TO_DIFFUSERS, note="MMDiT checkpoint -> diffusers"),
    ),
    lora_prefixes=DIT_LORA_PREFIXES,
    extract_targets=_EXTRACT_TARGETS,
    quant_keep=("final_layer.",),
    block_groups=(BlockGroup("joint{n}", "joint_blocks.{n}."), BlockGroup("joint{n}", "transformer_blocks.{n}.")),
    implementation="https://github.com/Stability-AI/generative-models",
    order=40,
    structures=(_MEDIUM, _LARGE),
)
