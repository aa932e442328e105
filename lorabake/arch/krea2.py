"""Krea 2 (Raw, Turbo): a single-stream DiT with gated GQA attention and a layer-wise text fusion stack.

Original names (`krea/Krea-2-Raw` raw.safetensors) as diffusers loaders/single_file_utils.py
convert_krea2_transformer_checkpoint_to_diffusers renames them: `blocks.N.attn.wq/wk/wv/wo/gate` ->
`transformer_blocks.N.attn.to_q/to_k/to_v/to_out.0/to_gate`, `mlp.gate/up/down` -> `ff.*`,
`txtfusion.*` -> `text_fusion.*`, `first` -> `img_in`, `tmlp` -> `time_embed`, `tproj.1` -> `time_mod_proj`,
`txtmlp` -> `txt_in`, `last.linear` -> `final_layer.linear`. Some tools drop the `.0` of `to_out` (ComfyUI
comfy/utils.py krea2_to_diffusers maps both). The flat `mod.lin` modulation is not a LoRA target.
"""

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

_STACKS = {
    "blocks": "transformer_blocks",
    "txtfusion.layerwise_blocks": "text_fusion.layerwise_blocks",
    "txtfusion.refiner_blocks": "text_fusion.refiner_blocks",
}
_INNER = {
    "attn.wq": ("attn.to_q",),
    "attn.wk": ("attn.to_k",),
    "attn.wv": ("attn.to_v",),
    "attn.wo": ("attn.to_out.0", "attn.to_out"),
    "attn.gate": ("attn.to_gate",),
    "attn.qknorm.qnorm": ("attn.norm_q",),
    "attn.qknorm.knorm": ("attn.norm_k",),
    "mlp.gate": ("ff.gate",),
    "mlp.up": ("ff.up",),
    "mlp.down": ("ff.down",),
    "prenorm": ("norm1",),
    "postnorm": ("norm2",),
}

# SimpleTuner/LyCORIS train Krea 2's q, k and v as one fused `attn.to_qkv` module (ComfyUI
# comfy/lora_convert.py convert_fused_qkv_lora splits it): its ΔW rows are q (H), then k, then v.
_FUSED = {"attn.wq": "q_of_qkv", "attn.wk": "k_of_qkv", "attn.wv": "v_of_qkv"}

NATIVE_TO_DIFFUSERS: dict[str, tuple[Alias, ...]] = {
    **{
        f"{native}.{{n}}.{inner}": tuple(Alias(f"{ours}.{{n}}.{d}") for d in names)
        + ((Alias(f"{ours}.{{n}}.attn.to_qkv", spread=_FUSED[inner]),) if inner in _FUSED else ())
        for native, ours in _STACKS.items()
        for inner, names in _INNER.items()
    },
    "first": (Alias("img_in"),),
    "tmlp.0": (Alias("time_embed.linear_1"),),
    "tmlp.2": (Alias("time_embed.linear_2"),),
    "tproj.1": (Alias("time_mod_proj"),),
    "txtmlp.0": (Alias("txt_in.norm"),),
    "txtmlp.1": (Alias("txt_in.linear_1"),),
    "txtmlp.3": (Alias("txt_in.linear_2"),),
    "txtfusion.projector": (Alias("text_fusion.projector"),),
    "last.linear": (Alias("final_layer.linear"),),
    "last.norm": (Alias("final_layer.norm"),),
}

_NATIVE = (Probe("blocks.0.attn.wq.weight"), Probe("txtfusion.projector.weight"))
_DIFFUSERS = (Probe("transformer_blocks.0.attn.to_gate.weight"), Probe("text_fusion.projector.weight"))

_EXTRACT_TARGETS = tuple(f"attn.{p}.weight" for p in ("wq", "wk", "wv", "wo", "gate")) + tuple(
    f"mlp.{p}.weight" for p in ("gate", "up", "down")
)

# Krea 2 Raw: 28 blocks, width 6144 (GQA k/v 1536), 2 + 2 text fusion blocks (rows printed by scripts/family_structure.py from tests/data/arch/krea2.json.gz).
_STRUCTURE = """\
blocks.{0-27}.attn.gate.weight 6144x6144
blocks.{0-27}.attn.qknorm.knorm.scale 128
blocks.{0-27}.attn.qknorm.qnorm.scale 128
blocks.{0-27}.attn.wk.weight 1536x6144
blocks.{0-27}.attn.wo.weight 6144x6144
blocks.{0-27}.attn.wq.weight 6144x6144
blocks.{0-27}.attn.wv.weight 1536x6144
blocks.{0-27}.mlp.down.weight 6144x16384
blocks.{0-27}.mlp.gate.weight 16384x6144
blocks.{0-27}.mlp.up.weight 16384x6144
blocks.{0-27}.mod.lin 36864
blocks.{0-27}.postnorm.scale 6144
blocks.{0-27}.prenorm.scale 6144
first.weight 6144x64
last.linear.weight 64x6144
last.modulation.lin 2x6144
last.norm.scale 6144
tmlp.0.weight 6144x256
tmlp.2.weight 6144x6144
tproj.1.weight 36864x6144
txtfusion.layerwise_blocks.{0,1}.attn.gate.weight 2560x2560
txtfusion.layerwise_blocks.{0,1}.attn.qknorm.knorm.scale 128
txtfusion.layerwise_blocks.{0,1}.attn.qknorm.qnorm.scale 128
txtfusion.layerwise_blocks.{0,1}.attn.wk.weight 2560x2560
txtfusion.layerwise_blocks.{0,1}.attn.wo.weight 2560x2560
txtfusion.layerwise_blocks.{0,1}.attn.wq.weight 2560x2560
txtfusion.layerwise_blocks.{0,1}.attn.wv.weight 2560x2560
txtfusion.layerwise_blocks.{0,1}.mlp.down.weight 2560x6912
txtfusion.layerwise_blocks.{0,1}.mlp.gate.weight 6912x2560
txtfusion.layerwise_blocks.{0,1}.mlp.up.weight 6912x2560
txtfusion.layerwise_blocks.{0,1}.postnorm.scale 2560
txtfusion.layerwise_blocks.{0,1}.prenorm.scale 2560
txtfusion.projector.weight 1x12
txtfusion.refiner_blocks.{0,1}.attn.gate.weight 2560x2560
txtfusion.refiner_blocks.{0,1}.attn.qknorm.knorm.scale 128
txtfusion.refiner_blocks.{0,1}.attn.qknorm.qnorm.scale 128
txtfusion.refiner_blocks.{0,1}.attn.wk.weight 2560x2560
txtfusion.refiner_blocks.{0,1}.attn.wo.weight 2560x2560
txtfusion.refiner_blocks.{0,1}.attn.wq.weight 2560x2560
txtfusion.refiner_blocks.{0,1}.attn.wv.weight 2560x2560
txtfusion.refiner_blocks.{0,1}.mlp.down.weight 2560x6912
txtfusion.refiner_blocks.{0,1}.mlp.gate.weight 6912x2560
txtfusion.refiner_blocks.{0,1}.mlp.up.weight 6912x2560
txtfusion.refiner_blocks.{0,1}.postnorm.scale 2560
txtfusion.refiner_blocks.{0,1}.prenorm.scale 2560
txtmlp.0.scale 2560
txtmlp.1.weight 6144x2560
txtmlp.3.weight 6144x6144"""

FAMILY = Family(
    arch="krea2",
    title="Krea 2",
    modelspec="krea-2",
    kohya="krea2",
    metadata_names=("krea-2", "krea2", "krea_2"),
    diffusion="dit",
    diffusion_kind="krea2",
    layouts=(
        Layout("comfyui", "model.diffusion_model.", "native", _NATIVE),
        Layout("native", "", "native", _NATIVE),
        Layout("diffusers", "transformer.", "diffusers", _DIFFUSERS),
        Layout("diffusers", "", "diffusers", _DIFFUSERS),
    ),
    # Qwen3-VL-4B: ComfyUI's all-in-one file (comfy/text_encoders/krea2.py name="qwen3vl_4b"), a diffusers folder
    text_encoders=(
        sole_text_encoder("qwen3vl_4b", "Qwen3-VL"),
    ),
    kohya_names={"dit": ("lora_unet_", "native"), "te1": ("lora_te_", "hf_base")},
    renames=(Renames("native", "diffusers", modules=NATIVE_TO_DIFFUSERS, note="Krea 2 original -> diffusers"),),
    lora_prefixes=DIT_LORA_PREFIXES,
    extract_targets=_EXTRACT_TARGETS,
    quant_keep=("^first.", "^last.", "^tmlp.", "^tproj.", "^txtfusion.", "^txtmlp."),
    block_groups=(BlockGroup("block{n}", "blocks.{n}."),),
    implementation="https://github.com/krea-ai",
    order=64,
    structures=(_STRUCTURE,),
)
