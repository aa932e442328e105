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
    sole_text_encoder,
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


# Z-Image-Turbo: 30 layers + 2 noise / 2 context refiners, width 3840 (rows printed by scripts/family_structure.py from tests/data/arch/z-image.json.gz).
_STRUCTURE = """\
cap_embedder.0.weight 2560
cap_embedder.1.weight 3840x2560
cap_pad_token 1x3840
context_refiner.{0,1}.attention.k_norm.weight 128
context_refiner.{0,1}.attention.out.weight 3840x3840
context_refiner.{0,1}.attention.q_norm.weight 128
context_refiner.{0,1}.attention.qkv.weight 11520x3840
context_refiner.{0,1}.attention_norm1.weight 3840
context_refiner.{0,1}.attention_norm2.weight 3840
context_refiner.{0,1}.feed_forward.w1.weight 10240x3840
context_refiner.{0,1}.feed_forward.w2.weight 3840x10240
context_refiner.{0,1}.feed_forward.w3.weight 10240x3840
context_refiner.{0,1}.ffn_norm1.weight 3840
context_refiner.{0,1}.ffn_norm2.weight 3840
final_layer.adaLN_modulation.1.weight 3840x256
final_layer.linear.weight 64x3840
layers.{0-29}.adaLN_modulation.0.weight 15360x256
layers.{0-29}.attention.k_norm.weight 128
layers.{0-29}.attention.out.weight 3840x3840
layers.{0-29}.attention.q_norm.weight 128
layers.{0-29}.attention.qkv.weight 11520x3840
layers.{0-29}.attention_norm1.weight 3840
layers.{0-29}.attention_norm2.weight 3840
layers.{0-29}.feed_forward.w1.weight 10240x3840
layers.{0-29}.feed_forward.w2.weight 3840x10240
layers.{0-29}.feed_forward.w3.weight 10240x3840
layers.{0-29}.ffn_norm1.weight 3840
layers.{0-29}.ffn_norm2.weight 3840
noise_refiner.{0,1}.adaLN_modulation.0.weight 15360x256
noise_refiner.{0,1}.attention.k_norm.weight 128
noise_refiner.{0,1}.attention.out.weight 3840x3840
noise_refiner.{0,1}.attention.q_norm.weight 128
noise_refiner.{0,1}.attention.qkv.weight 11520x3840
noise_refiner.{0,1}.attention_norm1.weight 3840
noise_refiner.{0,1}.attention_norm2.weight 3840
noise_refiner.{0,1}.feed_forward.w1.weight 10240x3840
noise_refiner.{0,1}.feed_forward.w2.weight 3840x10240
noise_refiner.{0,1}.feed_forward.w3.weight 10240x3840
noise_refiner.{0,1}.ffn_norm1.weight 3840
noise_refiner.{0,1}.ffn_norm2.weight 3840
t_embedder.mlp.0.weight 1024x256
t_embedder.mlp.2.weight 256x1024
x_embedder.weight 3840x64
x_pad_token 1x3840"""

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
    # Qwen3-4B: ComfyUI's all-in-one file (comfy/text_encoders/z_image.py name="qwen3_4b"), a diffusers folder
    text_encoders=(
        sole_text_encoder("qwen3_4b", "Qwen3"),
    ),
    # musubi-tuner names Z-Image modules by their diffusers path (lora_unet_layers_0_attention_to_q)
    kohya_names={"dit": ("lora_unet_", "diffusers"), "te1": ("lora_te_", "hf_base")},
    renames=(
        NATIVE_TO_DIFFUSERS,
        Renames(
            "diffusers",
            "native",
            modules=_nextdit.fused_from_split("attention"),
            blocks={"all_x_embedder.2-1": Block("x_embedder"), "all_final_layer.2-1": Block("final_layer")},
            note="original-named (and fused qkv) LoRAs on a diffusers file",
        ),
    ),
    lora_prefixes=DIT_LORA_PREFIXES,
    extract_targets=_nextdit.EXTRACT_TARGETS,
    quant_keep=("final_layer.",),
    block_groups=(
        BlockGroup("layer{n}", "layers.{n}."),
        BlockGroup("noise_refiner{n}", "noise_refiner.{n}."),
        BlockGroup("context_refiner{n}", "context_refiner.{n}."),
    ),
    implementation="https://github.com/Tongyi-MAI/Z-Image",
    order=61,
    structures=(_STRUCTURE,),
)
