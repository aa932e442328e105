"""Lumina-Image 2.0 (and Neta Lumina): NextDiT with grouped-query fused `attention.qkv`, Gemma 2 2B captions.

Original names as the reference code and ComfyUI's all-in-one file (`text_encoders.gemma2_2b.`, `vae.`)
store them; diffusers renames them (loaders/single_file_utils.py convert_lumina2_to_diffusers): `attention`
-> `attn`, q ‖ k ‖ v split (2304, 768, 768 at full size: bands read from the shape here), `w1/w2/w3` ->
`linear_1/2/3`, `adaLN_modulation.1` -> `norm1.linear`, `attention_norm1/2` -> `norm1(.norm)`/`norm2`,
`cap_embedder` / `t_embedder.mlp` -> `time_caption_embed.*`, `final_layer` -> `norm_out.linear_1/2`.
ComfyUI also maps the Z-Image style `attention.to_q` names onto Lumina 2 (comfy/utils.py
z_image_to_diffusers), so both spellings are accepted.
"""

from lorabake.arch import _nextdit
from lorabake.arch.common import (
    DIT_LORA_PREFIXES,
    Alias,
    BlockGroup,
    Family,
    Layout,
    Probe,
    Renames,
    sole_text_encoder,
)

_S = _nextdit.STACKS
_MODULES: dict[str, tuple[Alias, ...]] = {
    **_nextdit.qkv_rows("attn"),
    **_nextdit.attention_rows("attn"),
    **{f"{s}.{{n}}.feed_forward.w{i}": (Alias(f"{s}.{{n}}.feed_forward.linear_{i}"),) for s in _S for i in (1, 2, 3)},
    **{f"{s}.{{n}}.adaLN_modulation.1": (Alias(f"{s}.{{n}}.norm1.linear"),) for s in ("layers", "noise_refiner")},
    **{f"{s}.{{n}}.attention_norm1": (Alias(f"{s}.{{n}}.norm1.norm"),) for s in ("layers", "noise_refiner")},
    "context_refiner.{n}.attention_norm1": (Alias("context_refiner.{n}.norm1"),),
    **{f"{s}.{{n}}.attention_norm2": (Alias(f"{s}.{{n}}.norm2"),) for s in _S},
    "cap_embedder.{n}": (Alias("time_caption_embed.caption_embedder.{n}"),),
    "t_embedder.mlp.0": (Alias("time_caption_embed.timestep_embedder.linear_1"),),
    "t_embedder.mlp.2": (Alias("time_caption_embed.timestep_embedder.linear_2"),),
    "final_layer.adaLN_modulation.1": (Alias("norm_out.linear_1"),),
    "final_layer.linear": (Alias("norm_out.linear_2"),),
}

NATIVE_TO_DIFFUSERS = Renames("native", "diffusers", modules=_MODULES, note="Lumina 2 original -> diffusers")
# ComfyUI's Lumina2 key map (the Z-Image one): `attention.to_q/to_k/to_v/to_out.0` on the original names
COMFY_STYLE = Renames(
    "native",
    "comfy",
    modules={**_nextdit.qkv_rows("attention"), **_nextdit.attention_rows("attention")},
    note="ComfyUI z_image_to_diffusers names on Lumina 2",
)

_NATIVE = (Probe("layers.0.attention.qkv.weight"), Probe("layers.0.adaLN_modulation.1.weight"), Probe("cap_embedder.1.weight"))
_DIFFUSERS = (Probe("layers.0.attn.to_q.weight"), Probe("time_caption_embed.caption_embedder.1.weight"))


# Lumina-Image 2.0: 26 layers + 2 + 2 refiners, width 2304, GQA q|k|v 2304/768/768 (rows printed by scripts/family_structure.py from tests/data/arch/lumina2.json.gz).
_STRUCTURE = """\
cap_embedder.0.weight 2304
cap_embedder.1.weight 2304x2304
context_refiner.{0,1}.attention.k_norm.weight 96
context_refiner.{0,1}.attention.out.weight 2304x2304
context_refiner.{0,1}.attention.q_norm.weight 96
context_refiner.{0,1}.attention.qkv.weight 3840x2304
context_refiner.{0,1}.attention_norm1.weight 2304
context_refiner.{0,1}.attention_norm2.weight 2304
context_refiner.{0,1}.feed_forward.w1.weight 9216x2304
context_refiner.{0,1}.feed_forward.w2.weight 2304x9216
context_refiner.{0,1}.feed_forward.w3.weight 9216x2304
context_refiner.{0,1}.ffn_norm1.weight 2304
context_refiner.{0,1}.ffn_norm2.weight 2304
final_layer.adaLN_modulation.1.weight 2304x1024
final_layer.linear.weight 64x2304
layers.{0-25}.adaLN_modulation.1.weight 9216x1024
layers.{0-25}.attention.k_norm.weight 96
layers.{0-25}.attention.out.weight 2304x2304
layers.{0-25}.attention.q_norm.weight 96
layers.{0-25}.attention.qkv.weight 3840x2304
layers.{0-25}.attention_norm1.weight 2304
layers.{0-25}.attention_norm2.weight 2304
layers.{0-25}.feed_forward.w1.weight 9216x2304
layers.{0-25}.feed_forward.w2.weight 2304x9216
layers.{0-25}.feed_forward.w3.weight 9216x2304
layers.{0-25}.ffn_norm1.weight 2304
layers.{0-25}.ffn_norm2.weight 2304
noise_refiner.{0,1}.adaLN_modulation.1.weight 9216x1024
noise_refiner.{0,1}.attention.k_norm.weight 96
noise_refiner.{0,1}.attention.out.weight 2304x2304
noise_refiner.{0,1}.attention.q_norm.weight 96
noise_refiner.{0,1}.attention.qkv.weight 3840x2304
noise_refiner.{0,1}.attention_norm1.weight 2304
noise_refiner.{0,1}.attention_norm2.weight 2304
noise_refiner.{0,1}.feed_forward.w1.weight 9216x2304
noise_refiner.{0,1}.feed_forward.w2.weight 2304x9216
noise_refiner.{0,1}.feed_forward.w3.weight 9216x2304
noise_refiner.{0,1}.ffn_norm1.weight 2304
noise_refiner.{0,1}.ffn_norm2.weight 2304
t_embedder.mlp.0.weight 1024x256
t_embedder.mlp.2.weight 1024x1024
x_embedder.weight 2304x64"""

FAMILY = Family(
    arch="lumina2",
    title="Lumina-Image 2.0",
    modelspec="lumina-image-2",
    kohya="lumina2",
    metadata_names=("lumina-image-2", "lumina2", "lumina_2", "lumina"),
    diffusion="dit",
    diffusion_kind="lumina2",
    layouts=(
        Layout("comfyui", "model.diffusion_model.", "native", _NATIVE),
        Layout("native", "", "native", _NATIVE),
        Layout("diffusers", "transformer.", "diffusers", _DIFFUSERS),
        Layout("diffusers", "", "diffusers", _DIFFUSERS),
    ),
    # Gemma 2 2B: ComfyUI's all-in-one file (comfy/text_encoders/lumina2.py name="gemma2_2b"), a diffusers
    # folder; kohya sd-scripts lora_lumina.py writes it as lora_te_ (LORA_PREFIX_TEXT_ENCODER)
    text_encoders=(
        sole_text_encoder("gemma2_2b", "Gemma 2"),
    ),
    # kohya sd-scripts lora_lumina.py trains the original module names (lora_unet_layers_0_attention_qkv)
    kohya_names={"dit": ("lora_unet_", "native"), "te1": ("lora_te_", "hf_base")},
    renames=(
        NATIVE_TO_DIFFUSERS,
        Renames("diffusers", "native", modules=_nextdit.fused_from_split("attn"), note="fused LoRAs on a diffusers file"),
        COMFY_STYLE,
    ),
    lora_prefixes=DIT_LORA_PREFIXES,
    extract_targets=_nextdit.EXTRACT_TARGETS,
    quant_keep=("final_layer.",),
    block_groups=(
        BlockGroup("layer{n}", "layers.{n}."),
        BlockGroup("noise_refiner{n}", "noise_refiner.{n}."),
        BlockGroup("context_refiner{n}", "context_refiner.{n}."),
    ),
    implementation="https://github.com/Alpha-VLLM/Lumina-Image-2.0",
    order=62,
    structures=(_STRUCTURE,),
)
