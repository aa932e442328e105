"""Z-Image (Turbo, Base, De-Turbo): NextDiT with fused `attention.qkv`, Qwen3-4B captions.

The original single files (Tongyi-MAI shards, Comfy-Org/z_image) name modules as the reference code does;
diffusers renames them (loaders/single_file_utils.py convert_z_image_transformer_checkpoint_to_diffusers):
q ‖ k ‖ v split into `attention.to_q/k/v`, `attention.out` -> `attention.to_out.0`, `q_norm` -> `norm_q`,
`x_embedder` -> `all_x_embedder.2-1`, `final_layer` -> `all_final_layer.2-1`. LoRAs people share use those
diffusers names (ai-toolkit `diffusion_model.layers.0.attention.to_q`, musubi
`lora_unet_layers_0_attention_to_q`); fused `qkv` LoRAs (musubi's ComfyUI converter) apply whole.
"""

from lorabake.arch import _nextdit
from lorabake.arch.common import (
    DIT_LORA_PREFIXES,
    Block,
    BlockGroup,
    Family,
    Layout,
    Probe,
    Renames,
    TextEncoder,
    TextEncoderKind,
)

NATIVE_TO_DIFFUSERS = Renames(
    "native",
    "diffusers",
    modules={**_nextdit.qkv_rows("attention"), **_nextdit.attention_rows("attention")},
    blocks={"x_embedder": Block("all_x_embedder.2-1"), "final_layer": Block("all_final_layer.2-1")},
    note="Z-Image original -> diffusers",
)

_NATIVE = (Probe("layers.0.attention.qkv.weight"), Probe("x_pad_token"))
_DIFFUSERS = (Probe("layers.0.attention.to_q.weight"), Probe("x_pad_token"), Probe("all_x_embedder.2-1.weight"))

_QWEN3_TARGETS = tuple(f"self_attn.{p}_proj.weight" for p in "qkvo") + tuple(
    f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")
)

FAMILY = Family(
    arch="z-image",
    title="Z-Image",
    modelspec="z-image",
    kohya="z_image",
    metadata_names=("z-image", "z_image", "zimage"),
    diffusion="dit",
    diffusion_kind="z-image",
    layouts=(
        Layout("comfyui", "model.diffusion_model.", "native", _NATIVE),
        Layout("native", "", "native", _NATIVE),
        Layout("diffusers", "transformer.", "diffusers", _DIFFUSERS),
        Layout("diffusers", "", "diffusers", _DIFFUSERS),
    ),
    text_encoders=(
        TextEncoder(
            "te1",
            (("text_encoders.qwen3_4b.", "qwen3_4b"), ("text_encoder.", "qwen3_4b")),
            ("lora_te_", "lora_te1_", "text_encoder.", "text_encoders.qwen3_4b."),
        ),
    ),
    # musubi-tuner names Z-Image modules by their diffusers path (lora_unet_layers_0_attention_to_q)
    kohya_names={"dit": ("lora_unet_", "diffusers"), "te1": ("lora_te_", "hf")},
    renames=(NATIVE_TO_DIFFUSERS,),
    lora_prefixes=DIT_LORA_PREFIXES,
    extract_targets=_nextdit.EXTRACT_TARGETS,
    block_groups=(
        BlockGroup("layer{n}", "layers.{n}."),
        BlockGroup("noise_refiner{n}", "noise_refiner.{n}."),
        BlockGroup("context_refiner{n}", "context_refiner.{n}."),
    ),
    implementation="https://github.com/Tongyi-MAI/Z-Image",
    order=61,
    text_encoder_kinds={"qwen3_4b": TextEncoderKind("hf", (), _QWEN3_TARGETS)},
)
