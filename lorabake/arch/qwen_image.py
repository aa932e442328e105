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
    Variant,
    sole_text_encoder,
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

# Qwen-Image: 60 blocks, width 3072 (rows printed by scripts/family_structure.py from tests/data/arch/qwen-image.json.gz).
_STRUCTURE = """\
img_in.weight 3072x64
norm_out.linear.weight 6144x3072
proj_out.weight 64x3072
time_text_embed.timestep_embedder.linear_1.weight 3072x256
time_text_embed.timestep_embedder.linear_2.weight 3072x3072
transformer_blocks.{0-59}.attn.add_k_proj.weight 3072x3072
transformer_blocks.{0-59}.attn.add_q_proj.weight 3072x3072
transformer_blocks.{0-59}.attn.add_v_proj.weight 3072x3072
transformer_blocks.{0-59}.attn.norm_added_k.weight 128
transformer_blocks.{0-59}.attn.norm_added_q.weight 128
transformer_blocks.{0-59}.attn.norm_k.weight 128
transformer_blocks.{0-59}.attn.norm_q.weight 128
transformer_blocks.{0-59}.attn.to_add_out.weight 3072x3072
transformer_blocks.{0-59}.attn.to_k.weight 3072x3072
transformer_blocks.{0-59}.attn.to_out.0.weight 3072x3072
transformer_blocks.{0-59}.attn.to_q.weight 3072x3072
transformer_blocks.{0-59}.attn.to_v.weight 3072x3072
transformer_blocks.{0-59}.img_mlp.net.0.proj.weight 12288x3072
transformer_blocks.{0-59}.img_mlp.net.2.weight 3072x12288
transformer_blocks.{0-59}.img_mod.1.weight 18432x3072
transformer_blocks.{0-59}.txt_mlp.net.0.proj.weight 12288x3072
transformer_blocks.{0-59}.txt_mlp.net.2.weight 3072x12288
transformer_blocks.{0-59}.txt_mod.1.weight 18432x3072
txt_in.weight 3072x3584
txt_norm.weight 3584"""

# Qwen-Image 2.1: 32 blocks, width 4096, fused gate_up (rows printed by scripts/family_structure.py from tests/data/arch/qwen-image-2.1.json.gz).
_STRUCTURE_2 = """\
img_in.weight 4096x64
modulation.1.weight 16384x4096
norm_out.linear.weight 4096x4096
proj_out.weight 64x4096
time_text_embed.timestep_embedder.linear_1.weight 4096x256
time_text_embed.timestep_embedder.linear_2.weight 4096x4096
transformer_blocks.{0-31}.attn.norm_k.weight 128
transformer_blocks.{0-31}.attn.norm_q.weight 128
transformer_blocks.{0-31}.attn.to_k.weight 4096x4096
transformer_blocks.{0-31}.attn.to_out.0.weight 4096x4096
transformer_blocks.{0-31}.attn.to_q.weight 4096x4096
transformer_blocks.{0-31}.attn.to_v.weight 4096x4096
transformer_blocks.{0-31}.img_mlp.gate_up.weight 24576x4096
transformer_blocks.{0-31}.img_mlp.out.weight 4096x12288
txt_in.in_layer.weight 4096x4096
txt_in.out_layer.weight 4096x4096
txt_in.text_norm.weight 4096"""

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
    # Qwen2.5-VL-7B: ComfyUI's all-in-one file (comfy/text_encoders/qwen_image.py name="qwen25_7b"), a
    # diffusers folder's text_encoder/
    text_encoders=(
        sole_text_encoder("qwen25_7b", "Qwen2.5-VL"),
    ),
    kohya_names={"dit": ("lora_unet_", "diffusers"), "te1": ("lora_te_", "hf_base")},
    renames=(Renames("diffusers", "split", modules=GATE_UP, note="Qwen-Image 2.1 fused gate_up halves"),),
    lora_prefixes=DIT_LORA_PREFIXES,
    extract_targets=_EXTRACT_TARGETS,
    # What the keys tell apart (diffusers QwenImageTransformer2DModel, ComfyUI comfy/ldm/qwen_image): the base
    # model, 2512, Edit and Edit-2509 have one key set and one set of shapes; Edit-2511 adds a flag tensor
    # (default_ref_method "index_timestep_zero"), Layered its addition_t_embedding (use_additional_t_cond)
    variants=(
        Variant("txt_norm.weight", present="Qwen-Image layout: base, 2512, Edit and Edit-2509 share it (not told apart by keys)"),
        Variant("txt_in.text_norm.weight", present="Qwen-Image 2.1"),
        Variant("__index_timestep_zero__", present="Qwen-Image-Edit-2511 (its __index_timestep_zero__ flag, passed through)"),
        Variant("time_text_embed.addition_t_embedding.weight", present="Qwen-Image-Layered (time_text_embed.addition_t_embedding)"),
    ),
    quant_keep=("img_in.", "txt_in.", "^proj_out."),
    block_groups=(BlockGroup("block{n}", "transformer_blocks.{n}."),),
    implementation="https://github.com/QwenLM/Qwen-Image",
    resolution="1328x1328",
    order=60,
    structures=(_STRUCTURE, _STRUCTURE_2,),
)
