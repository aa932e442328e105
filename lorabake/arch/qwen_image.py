"""Qwen-Image (and Edit, Edit-2509/2511, Layered, 2512) and Qwen-Image 2.1: an MMDiT with diffusers names.

The files users download (Qwen's and Comfy-Org's repackaged single files) already use diffusers' module
names with no prefix (diffusers' single-file mapping for QwenImageTransformer2DModel is the identity); a
checkpoint saved by ComfyUI adds `model.diffusion_model.`. So every LoRA spelling is the base's own module
path under a trainer prefix: ai-toolkit/ComfyUI `diffusion_model.`, musubi/kohya `lora_unet_` with `_`
(names are generated from the base's modules, so `add_k_proj`, `to_add_out`, `img_mlp` stay whole),
diffusers/PEFT `transformer.`, DiffSynth bare (+ `.default` adapter infixes, stripped by the LoRA parser),
SimpleTuner `lycoris_`.

Qwen-Image 2.1 stores each block's SwiGLU gate and up projections as one `img_mlp.gate_up` tensor (gate rows
first: diffusers loaders/single_file_utils.py convert_qwen_image21_transformer_checkpoint_to_diffusers);
LoRAs address the halves `img_mlp.gate_layer` and `img_mlp.proj`.
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
    TextEncoderKind,
    Variant,
)

# Qwen-Image: the text-side norm and a block's image modulation exist in no other family.
_QWEN = (Probe("txt_norm.weight"), Probe("transformer_blocks.0.img_mod.1.weight"))
# Qwen-Image 2.1 (diffusers' own detection key, and the fused or split SwiGLU input)
_QWEN21_NATIVE = (Probe("txt_in.text_norm.weight"), Probe("transformer_blocks.0.img_mlp.gate_up.weight"))
_QWEN21_SPLIT = (Probe("txt_in.text_norm.weight"), Probe("transformer_blocks.0.img_mlp.gate_layer.weight"))

GATE_UP: dict[str, tuple[Alias, ...]] = {
    "transformer_blocks.{n}.img_mlp.gate_up": (
        Alias("transformer_blocks.{n}.img_mlp.gate_layer", part="half1"),
        Alias("transformer_blocks.{n}.img_mlp.proj", part="half2"),
    ),
}

# Qwen2.5-VL 7B as ComfyUI stores it in an all-in-one file; LoRAs rarely train it (musubi does not).
_QWEN25_TARGETS = tuple(f"self_attn.{p}_proj.weight" for p in "qkvo") + tuple(
    f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")
)

_EXTRACT_TARGETS = (
    *(f"attn.{p}.weight" for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")),
    "attn.to_out.0.weight",
    "attn.to_add_out.weight",
    "img_mlp.net.0.proj.weight",
    "img_mlp.net.2.weight",
    "txt_mlp.net.0.proj.weight",
    "txt_mlp.net.2.weight",
    "img_mod.1.weight",
    "txt_mod.1.weight",
    # Qwen-Image 2.1
    "img_mlp.gate_up.weight",
    "img_mlp.gate_layer.weight",
    "img_mlp.proj.weight",
    "img_mlp.out.weight",
)

FAMILY = Family(
    arch="qwen-image",
    title="Qwen-Image",
    modelspec="qwen-image",
    kohya="qwen_image",
    metadata_names=("qwen-image", "qwen_image"),
    diffusion="dit",
    diffusion_kind="qwen-image",
    layouts=(
        Layout("comfyui", "model.diffusion_model.", "diffusers", _QWEN),
        Layout("diffusers", "transformer.", "diffusers", _QWEN),
        Layout("native", "", "diffusers", _QWEN),
        Layout("comfyui", "model.diffusion_model.", "diffusers", _QWEN21_NATIVE),
        Layout("native", "", "diffusers", _QWEN21_NATIVE),
        Layout("diffusers", "transformer.", "diffusers", _QWEN21_SPLIT),
        Layout("diffusers", "", "diffusers", _QWEN21_SPLIT),
    ),
    text_encoders=(
        TextEncoder(
            "te1",
            (("text_encoders.qwen25_7b.", "qwen25_7b"), ("text_encoder.", "qwen25_7b")),
            ("lora_te_", "lora_te1_", "text_encoder.", "text_encoders.qwen25_7b."),
        ),
    ),
    kohya_names={"dit": ("lora_unet_", "diffusers"), "te1": ("lora_te_", "hf")},
    renames=(Renames("diffusers", "diffusers", modules=GATE_UP, note="Qwen-Image 2.1 fused gate_up halves"),),
    lora_prefixes=DIT_LORA_PREFIXES,
    extract_targets=_EXTRACT_TARGETS,
    variants=(
        Variant("txt_in.text_norm.weight", present="Qwen-Image 2.1"),
        Variant("__index_timestep_zero__", present="edit-2511 flag tensor (passed through)"),
    ),
    block_groups=(BlockGroup("block{n}", "transformer_blocks.{n}."),),
    implementation="https://github.com/QwenLM/Qwen-Image",
    resolution="1328x1328",
    order=60,
    text_encoder_kinds={"qwen25_7b": TextEncoderKind("hf", (), _QWEN25_TARGETS)},
)
