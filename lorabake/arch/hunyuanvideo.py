"""HunyuanVideo 1.0 and 1.5, and HunyuanImage 2.1 (1.0's layout with 2-D patches): Tencent names, ComfyUI's renames,
diffusers' names.

Two spellings of one checkpoint are in use and both are bases: Tencent's (`double_blocks.N.img_attn_qkv`,
`img_mlp.fc1`, `img_mod.linear`, `single_blocks.N.modulation.linear`) and ComfyUI's (`img_attn.qkv`,
`img_mlp.0`, `img_mod.lin`, `modulation.lin`). LoRAs in either spelling land on either. 1.0 fuses q|k|v
(`img_attn_qkv`) and q|k|v|mlp (`single_blocks.N.linear1`); 1.5 has split `img_attn_q/k/v` and no single
blocks. The token refiner's `self_attn_qkv` is fused in both.
"""

from lorabake.arch.common import DIT_LORA_PREFIXES, Alias, BlockGroup, Family, Layout, Probe, Renames, Variant

_D = "transformer_blocks.{n}."
_S = "single_transformer_blocks.{n}."
_R = "context_embedder.token_refiner.refiner_blocks.{n}."


def _qkv(prefix: str, names: tuple[str, ...]) -> tuple[Alias, ...]:
    return tuple(Alias(prefix + name, part=part) for name, part in zip(names, ("q", "k", "v", "mlp")))


# Tencent module -> diffusers HunyuanVideoTransformer3DModel / HunyuanVideo15Transformer3DModel module, as
# diffusers loaders/single_file_utils.py convert_hunyuan_video_transformer_to_diffusers (1.0) and diffusers
# scripts/convert_hunyuan_video1_5_to_diffusers.py (1.5) rename them.
TENCENT_TO_DIFFUSERS: dict[str, tuple[Alias, ...]] = {
    "double_blocks.{n}.img_attn_qkv": _qkv(_D + "attn.", ("to_q", "to_k", "to_v")),
    "double_blocks.{n}.txt_attn_qkv": _qkv(_D + "attn.", ("add_q_proj", "add_k_proj", "add_v_proj")),
    "double_blocks.{n}.img_attn_q": (Alias(_D + "attn.to_q"),),  # 1.5
    "double_blocks.{n}.img_attn_k": (Alias(_D + "attn.to_k"),),
    "double_blocks.{n}.img_attn_v": (Alias(_D + "attn.to_v"),),
    "double_blocks.{n}.txt_attn_q": (Alias(_D + "attn.add_q_proj"),),
    "double_blocks.{n}.txt_attn_k": (Alias(_D + "attn.add_k_proj"),),
    "double_blocks.{n}.txt_attn_v": (Alias(_D + "attn.add_v_proj"),),
    "double_blocks.{n}.img_attn_proj": (Alias(_D + "attn.to_out.0"),),
    "double_blocks.{n}.txt_attn_proj": (Alias(_D + "attn.to_add_out"),),
    "double_blocks.{n}.img_attn_q_norm": (Alias(_D + "attn.norm_q"),),
    "double_blocks.{n}.img_attn_k_norm": (Alias(_D + "attn.norm_k"),),
    "double_blocks.{n}.txt_attn_q_norm": (Alias(_D + "attn.norm_added_q"),),
    "double_blocks.{n}.txt_attn_k_norm": (Alias(_D + "attn.norm_added_k"),),
    "double_blocks.{n}.img_mlp.fc1": (Alias(_D + "ff.net.0.proj"),),
    "double_blocks.{n}.img_mlp.fc2": (Alias(_D + "ff.net.2"),),
    "double_blocks.{n}.txt_mlp.fc1": (Alias(_D + "ff_context.net.0.proj"),),
    "double_blocks.{n}.txt_mlp.fc2": (Alias(_D + "ff_context.net.2"),),
    "double_blocks.{n}.img_mod.linear": (Alias(_D + "norm1.linear"),),
    "double_blocks.{n}.txt_mod.linear": (Alias(_D + "norm1_context.linear"),),
    "single_blocks.{n}.linear1": _qkv(_S, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    "single_blocks.{n}.linear2": (Alias(_S + "proj_out"),),
    "single_blocks.{n}.modulation.linear": (Alias(_S + "norm.linear"),),
    "single_blocks.{n}.q_norm": (Alias(_S + "attn.norm_q"),),
    "single_blocks.{n}.k_norm": (Alias(_S + "attn.norm_k"),),
    "txt_in.individual_token_refiner.blocks.{n}.self_attn_qkv": _qkv(_R + "attn.", ("to_q", "to_k", "to_v")),
    "txt_in.individual_token_refiner.blocks.{n}.self_attn_proj": (Alias(_R + "attn.to_out.0"),),
    "txt_in.individual_token_refiner.blocks.{n}.mlp.fc1": (Alias(_R + "ff.net.0.proj"),),
    "txt_in.individual_token_refiner.blocks.{n}.mlp.fc2": (Alias(_R + "ff.net.2"),),
    "txt_in.individual_token_refiner.blocks.{n}.adaLN_modulation.1": (Alias(_R + "norm_out.linear"),),
    "txt_in.individual_token_refiner.blocks.{n}.norm1": (Alias(_R + "norm1"),),
    "txt_in.individual_token_refiner.blocks.{n}.norm2": (Alias(_R + "norm2"),),
    "txt_in.input_embedder": (Alias("context_embedder.proj_in"),),
    "txt_in.t_embedder.mlp.0": (Alias("context_embedder.time_text_embed.timestep_embedder.linear_1"),),
    "txt_in.t_embedder.mlp.2": (Alias("context_embedder.time_text_embed.timestep_embedder.linear_2"),),
    "txt_in.c_embedder.linear_1": (Alias("context_embedder.time_text_embed.text_embedder.linear_1"),),
    "txt_in.c_embedder.linear_2": (Alias("context_embedder.time_text_embed.text_embedder.linear_2"),),
    "img_in.proj": (Alias("x_embedder.proj"),),
    # 1.0 names the time embedder time_text_embed.timestep_embedder, 1.5 time_embed.timestep_embedder, HunyuanImage
    # 2.1 time_guidance_embed.timestep_embedder (diffusers scripts/convert_hunyuan_image_to_diffusers.py)
    **{f"time_in.mlp.{i}": tuple(Alias(f"{e}.timestep_embedder.linear_{j}")
                                 for e in ("time_text_embed", "time_embed", "time_guidance_embed"))
       for i, j in ((0, 1), (2, 2))},
    **{f"guidance_in.mlp.{i}": (Alias(f"time_text_embed.guidance_embedder.linear_{j}"),
                                Alias(f"time_guidance_embed.guidance_embedder.linear_{j}")) for i, j in ((0, 1), (2, 2))},
    # HunyuanImage 2.1 distilled (meanflow): the second time embedder
    **{f"time_r_in.mlp.{i}": (Alias(f"time_guidance_embed.timestep_embedder_r.linear_{j}"),) for i, j in ((0, 1), (2, 2))},
    "vector_in.in_layer": (Alias("time_text_embed.text_embedder.linear_1"),),
    "vector_in.out_layer": (Alias("time_text_embed.text_embedder.linear_2"),),
    "byt5_in.fc1": (Alias("context_embedder_2.linear_1"),),  # 1.5
    "byt5_in.fc2": (Alias("context_embedder_2.linear_2"),),
    "byt5_in.fc3": (Alias("context_embedder_2.linear_3"),),
    "vision_in.proj.1": (Alias("image_embedder.linear_1"),),
    "vision_in.proj.3": (Alias("image_embedder.linear_2"),),
    "final_layer.linear": (Alias("proj_out"),),
    # diffusers AdaLayerNormContinuous is (scale, shift); Tencent's final layer is (shift, scale)
    "final_layer.adaLN_modulation.1": (Alias("norm_out.linear", transform="swap_halves"),),
}

# ComfyUI's names for Tencent's, as ComfyUI comfy/supported_models.py HunyuanVideo.process_unet_state_dict
# renames them on load (and comfy/lora.py maps diffusion-pipe LoRAs back): block tails, then top-level modules.
_COMFY_TAILS = {
    "img_attn.qkv": "img_attn_qkv",
    "txt_attn.qkv": "txt_attn_qkv",
    "img_attn.proj": "img_attn_proj",
    "txt_attn.proj": "txt_attn_proj",
    "self_attn.qkv": "self_attn_qkv",
    "self_attn.proj": "self_attn_proj",
    "img_mlp.0": "img_mlp.fc1",
    "img_mlp.2": "img_mlp.fc2",
    "txt_mlp.0": "txt_mlp.fc1",
    "txt_mlp.2": "txt_mlp.fc2",
    "mlp.0": "mlp.fc1",  # token refiner
    "mlp.2": "mlp.fc2",
    "img_mod.lin": "img_mod.linear",
    "txt_mod.lin": "txt_mod.linear",
    "modulation.lin": "modulation.linear",
    "img_attn.norm.query_norm": "img_attn_q_norm",  # RMSNorm .scale (ComfyUI) / .weight (Tencent)
    "img_attn.norm.key_norm": "img_attn_k_norm",
    "txt_attn.norm.query_norm": "txt_attn_q_norm",
    "txt_attn.norm.key_norm": "txt_attn_k_norm",
}
_COMFY_TOP = {
    "txt_in.t_embedder.in_layer": "txt_in.t_embedder.mlp.0",
    "txt_in.t_embedder.out_layer": "txt_in.t_embedder.mlp.2",
    "txt_in.c_embedder.in_layer": "txt_in.c_embedder.linear_1",
    "txt_in.c_embedder.out_layer": "txt_in.c_embedder.linear_2",
    "time_in.in_layer": "time_in.mlp.0",
    "time_in.out_layer": "time_in.mlp.2",
    "guidance_in.in_layer": "guidance_in.mlp.0",
    "guidance_in.out_layer": "guidance_in.mlp.2",
}
COMFY_TO_TENCENT = Renames(
    "comfy", "tencent", modules={k: (Alias(v),) for k, v in _COMFY_TOP.items()}, tails=_COMFY_TAILS,
    note="ComfyUI checkpoint -> Tencent names (diffusion-pipe, musubi, Tencent LoRAs)",
)
TENCENT_TO_COMFY = Renames(
    "tencent", "comfy", modules={v: (Alias(k),) for k, v in _COMFY_TOP.items()},
    tails={v: k for k, v in _COMFY_TAILS.items()}, note="Tencent checkpoint -> ComfyUI names",
)

# A diffusers-layout base (HunyuanVideoTransformer3DModel / HunyuanVideo15Transformer3DModel, q/k/v split): LoRAs
# in Tencent's or ComfyUI's names land on it through TENCENT_TO_DIFFUSERS read backwards; a LoRA on a fused tensor
# (`img_attn_qkv`, `linear1` = q|k|v|mlp, the refiner's `self_attn_qkv`) is spread over the split ones.
_SPREAD = {"q": "q_of_qkv", "k": "k_of_qkv", "v": "v_of_qkv", "mlp": "mlp_of_qkv_mlp"}
_TENCENT_TO_COMFY_TOP = {v: k for k, v in _COMFY_TOP.items()}
_TENCENT_TO_COMFY_TAILS = sorted(((v, k) for k, v in _COMFY_TAILS.items()), key=lambda row: -len(row[0]))


def _comfy_name(tencent: str) -> str:
    """ComfyUI's name of a Tencent module template (the renames above, read backwards; longest tail first)."""
    if tencent in _TENCENT_TO_COMFY_TOP:
        return _TENCENT_TO_COMFY_TOP[tencent]
    for tail, comfy in _TENCENT_TO_COMFY_TAILS:
        if tencent.endswith("." + tail):
            return tencent[: -len(tail)] + comfy
    return tencent


def _from_diffusers(naming) -> dict[str, tuple[Alias, ...]]:
    rows: dict[str, tuple[Alias, ...]] = {}
    for tencent, aliases in TENCENT_TO_DIFFUSERS.items():
        for a in aliases:  # swap_halves undoes itself
            back = Alias(naming(tencent), spread=_SPREAD.get(a.part) if a.part else None, transform=a.transform)
            rows[a.name] = (*rows.get(a.name, ()), back)
    return rows


DIFFUSERS_TO_TENCENT = Renames("diffusers", "tencent", modules=_from_diffusers(lambda n: n),
                               note="diffusers checkpoint -> Tencent names (diffusion-pipe, musubi, Tencent LoRAs)")
DIFFUSERS_TO_COMFY = Renames("diffusers", "comfy", modules=_from_diffusers(_comfy_name),
                             note="diffusers checkpoint -> ComfyUI names")

_REFINER = Probe("txt_in.individual_token_refiner.blocks.0.norm1.weight")
_TENCENT = (Probe("double_blocks.0.img_attn_proj.weight"), _REFINER)
# ComfyUI's names are Flux's double blocks: probing Flux's own sentinel plus the token refiner (only here) makes
# this layout's probes a superset of Flux's, so detection keeps the more specific family
_COMFY = (Probe("double_blocks.0.img_attn.qkv.weight"), _REFINER)
# diffusers' names are Flux's too: Flux's two diffusers probes plus the token refiner (1.0), or the refiner and the
# double blocks' text projection (1.5, no single blocks), so a HunyuanVideo folder is not taken for Flux
_D_REFINER = Probe("context_embedder.token_refiner.refiner_blocks.0.norm1.weight")
_DIFFUSERS_10 = (Probe("single_transformer_blocks.0.proj_mlp.weight"), Probe("transformer_blocks.0.attn.add_q_proj.weight"),
                 _D_REFINER)
_DIFFUSERS_15 = (Probe("transformer_blocks.0.attn.add_q_proj.weight"), _D_REFINER)

# musubi-tuner / diffusion-pipe target the double and single blocks' linears.
_EXTRACT_TARGETS = tuple(
    f"{m}.weight" for m in ("img_attn_qkv", "txt_attn_qkv", "img_attn_q", "img_attn_k", "img_attn_v", "txt_attn_q",
                            "txt_attn_k", "txt_attn_v", "img_attn_proj", "txt_attn_proj", "img_mlp.fc1", "img_mlp.fc2",
                            "txt_mlp.fc1", "txt_mlp.fc2", "img_mod.linear", "txt_mod.linear", "linear1", "linear2",
                            "modulation.linear")
)

# Every weight under the bare layout, per variant (scripts/family_structure.py on tests/data/arch key lists).
_HV_10 = """\
double_blocks.{0-19}.img_attn_k_norm.weight 128
double_blocks.{0-19}.img_attn_proj.weight 3072x3072
double_blocks.{0-19}.img_attn_q_norm.weight 128
double_blocks.{0-19}.img_attn_qkv.weight 9216x3072
double_blocks.{0-19}.img_mlp.fc1.weight 12288x3072
double_blocks.{0-19}.img_mlp.fc2.weight 3072x12288
double_blocks.{0-19}.img_mod.linear.weight 18432x3072
double_blocks.{0-19}.txt_attn_k_norm.weight 128
double_blocks.{0-19}.txt_attn_proj.weight 3072x3072
double_blocks.{0-19}.txt_attn_q_norm.weight 128
double_blocks.{0-19}.txt_attn_qkv.weight 9216x3072
double_blocks.{0-19}.txt_mlp.fc1.weight 12288x3072
double_blocks.{0-19}.txt_mlp.fc2.weight 3072x12288
double_blocks.{0-19}.txt_mod.linear.weight 18432x3072
final_layer.adaLN_modulation.1.weight 6144x3072
final_layer.linear.weight 64x3072
guidance_in.mlp.0.weight 3072x256
guidance_in.mlp.2.weight 3072x3072
img_in.proj.weight 3072x16x1x2x2
single_blocks.{0-39}.k_norm.weight 128
single_blocks.{0-39}.linear1.weight 21504x3072
single_blocks.{0-39}.linear2.weight 3072x15360
single_blocks.{0-39}.modulation.linear.weight 9216x3072
single_blocks.{0-39}.q_norm.weight 128
time_in.mlp.0.weight 3072x256
time_in.mlp.2.weight 3072x3072
txt_in.c_embedder.linear_1.weight 3072x4096
txt_in.c_embedder.linear_2.weight 3072x3072
txt_in.individual_token_refiner.blocks.{0,1}.adaLN_modulation.1.weight 6144x3072
txt_in.individual_token_refiner.blocks.{0,1}.mlp.fc1.weight 12288x3072
txt_in.individual_token_refiner.blocks.{0,1}.mlp.fc2.weight 3072x12288
txt_in.individual_token_refiner.blocks.{0,1}.norm1.weight 3072
txt_in.individual_token_refiner.blocks.{0,1}.norm2.weight 3072
txt_in.individual_token_refiner.blocks.{0,1}.self_attn_proj.weight 3072x3072
txt_in.individual_token_refiner.blocks.{0,1}.self_attn_qkv.weight 9216x3072
txt_in.input_embedder.weight 3072x4096
txt_in.t_embedder.mlp.0.weight 3072x256
txt_in.t_embedder.mlp.2.weight 3072x3072
vector_in.in_layer.weight 3072x768
vector_in.out_layer.weight 3072x3072
"""

# HunyuanImage 2.1 (tencent/HunyuanImage-2.1 hunyuanimage2.1.safetensors): 1.0's names, width 3584, 2-D patches
_HI_21 = """\
byt5_in.fc1.weight 2048x1472
byt5_in.fc2.weight 2048x2048
byt5_in.fc3.weight 3584x2048
byt5_in.layernorm.weight 1472
double_blocks.{0-19}.img_attn_k_norm.weight 128
double_blocks.{0-19}.img_attn_proj.weight 3584x3584
double_blocks.{0-19}.img_attn_q_norm.weight 128
double_blocks.{0-19}.img_attn_qkv.weight 10752x3584
double_blocks.{0-19}.img_mlp.fc1.weight 14336x3584
double_blocks.{0-19}.img_mlp.fc2.weight 3584x14336
double_blocks.{0-19}.img_mod.linear.weight 21504x3584
double_blocks.{0-19}.txt_attn_k_norm.weight 128
double_blocks.{0-19}.txt_attn_proj.weight 3584x3584
double_blocks.{0-19}.txt_attn_q_norm.weight 128
double_blocks.{0-19}.txt_attn_qkv.weight 10752x3584
double_blocks.{0-19}.txt_mlp.fc1.weight 14336x3584
double_blocks.{0-19}.txt_mlp.fc2.weight 3584x14336
double_blocks.{0-19}.txt_mod.linear.weight 21504x3584
final_layer.adaLN_modulation.1.weight 7168x3584
final_layer.linear.weight 64x3584
img_in.proj.weight 3584x64x1x1
single_blocks.{0-39}.k_norm.weight 128
single_blocks.{0-39}.linear1.weight 25088x3584
single_blocks.{0-39}.linear2.weight 3584x17920
single_blocks.{0-39}.modulation.linear.weight 10752x3584
single_blocks.{0-39}.q_norm.weight 128
time_in.mlp.0.weight 3584x256
time_in.mlp.2.weight 3584x3584
txt_in.c_embedder.linear_1.weight 3584x3584
txt_in.c_embedder.linear_2.weight 3584x3584
txt_in.individual_token_refiner.blocks.{0,1}.adaLN_modulation.1.weight 7168x3584
txt_in.individual_token_refiner.blocks.{0,1}.mlp.fc1.weight 14336x3584
txt_in.individual_token_refiner.blocks.{0,1}.mlp.fc2.weight 3584x14336
txt_in.individual_token_refiner.blocks.{0,1}.norm1.weight 3584
txt_in.individual_token_refiner.blocks.{0,1}.norm2.weight 3584
txt_in.individual_token_refiner.blocks.{0,1}.self_attn_proj.weight 3584x3584
txt_in.individual_token_refiner.blocks.{0,1}.self_attn_qkv.weight 10752x3584
txt_in.input_embedder.weight 3584x3584
txt_in.t_embedder.mlp.0.weight 3584x256
txt_in.t_embedder.mlp.2.weight 3584x3584
"""

_HV_15 = """\
byt5_in.fc1.weight 2048x1472
byt5_in.fc2.weight 2048x2048
byt5_in.fc3.weight 2048x2048
byt5_in.layernorm.weight 1472
cond_type_embedding.weight 3x2048
double_blocks.{0-53}.img_attn_k.weight 2048x2048
double_blocks.{0-53}.img_attn_k_norm.weight 128
double_blocks.{0-53}.img_attn_proj.weight 2048x2048
double_blocks.{0-53}.img_attn_q.weight 2048x2048
double_blocks.{0-53}.img_attn_q_norm.weight 128
double_blocks.{0-53}.img_attn_v.weight 2048x2048
double_blocks.{0-53}.img_mlp.fc1.weight 8192x2048
double_blocks.{0-53}.img_mlp.fc2.weight 2048x8192
double_blocks.{0-53}.img_mod.linear.weight 12288x2048
double_blocks.{0-53}.txt_attn_k.weight 2048x2048
double_blocks.{0-53}.txt_attn_k_norm.weight 128
double_blocks.{0-53}.txt_attn_proj.weight 2048x2048
double_blocks.{0-53}.txt_attn_q.weight 2048x2048
double_blocks.{0-53}.txt_attn_q_norm.weight 128
double_blocks.{0-53}.txt_attn_v.weight 2048x2048
double_blocks.{0-53}.txt_mlp.fc1.weight 8192x2048
double_blocks.{0-53}.txt_mlp.fc2.weight 2048x8192
double_blocks.{0-53}.txt_mod.linear.weight 12288x2048
final_layer.adaLN_modulation.1.weight 4096x2048
final_layer.linear.weight 32x2048
img_in.proj.weight 2048x65x1x1x1
time_in.mlp.0.weight 2048x256
time_in.mlp.2.weight 2048x2048
txt_in.c_embedder.linear_1.weight 2048x3584
txt_in.c_embedder.linear_2.weight 2048x2048
txt_in.individual_token_refiner.blocks.{0,1}.adaLN_modulation.1.weight 4096x2048
txt_in.individual_token_refiner.blocks.{0,1}.mlp.fc1.weight 8192x2048
txt_in.individual_token_refiner.blocks.{0,1}.mlp.fc2.weight 2048x8192
txt_in.individual_token_refiner.blocks.{0,1}.norm1.weight 2048
txt_in.individual_token_refiner.blocks.{0,1}.norm2.weight 2048
txt_in.individual_token_refiner.blocks.{0,1}.self_attn_proj.weight 2048x2048
txt_in.individual_token_refiner.blocks.{0,1}.self_attn_qkv.weight 6144x2048
txt_in.input_embedder.weight 2048x3584
txt_in.t_embedder.mlp.0.weight 2048x256
txt_in.t_embedder.mlp.2.weight 2048x2048
vision_in.proj.0.weight 1152
vision_in.proj.1.weight 1152x1152
vision_in.proj.3.weight 2048x1152
vision_in.proj.4.weight 2048
"""

_IN_CHANNELS = {16: "T2V (16 input channels)", 33: "I2V (33 input channels)", 65: "1.5 (65 input channels: T2V and I2V)",
                64: "HunyuanImage 2.1 (64 input channels, 2-D patches: its 32x VAE's latents)"}

FAMILY = Family(
    arch="hunyuanvideo",
    title="HunyuanVideo",
    modelspec="hunyuan-video",
    kohya="hunyuan_video",
    metadata_names=("hunyuan-video", "hunyuan_video", "hunyuanvideo"),
    diffusion="dit",
    diffusion_kind="hunyuanvideo",
    layouts=(
        Layout("dit-only", "", "tencent", _TENCENT),  # Tencent release
        Layout("dit-only", "", "comfy", _COMFY),  # Comfy-Org repackaged
        Layout("comfyui", "model.diffusion_model.", "tencent", _TENCENT),
        Layout("comfyui", "model.diffusion_model.", "comfy", _COMFY),
        Layout("diffusers", "transformer.", "diffusers", _DIFFUSERS_10),  # hunyuanvideo-community/HunyuanVideo
        Layout("diffusers", "", "diffusers", _DIFFUSERS_10),
        Layout("diffusers", "transformer.", "diffusers", _DIFFUSERS_15),
        Layout("diffusers", "", "diffusers", _DIFFUSERS_15),
    ),
    text_encoders=(),
    kohya_names={"dit": ("lora_unet_", "tencent")},
    renames=(
        COMFY_TO_TENCENT,
        TENCENT_TO_COMFY,
        # before the tables that make diffusers names, so they read a diffusers base's own names only
        DIFFUSERS_TO_TENCENT,
        DIFFUSERS_TO_COMFY,
        Renames("tencent", "diffusers", modules=TENCENT_TO_DIFFUSERS, note="Tencent checkpoint -> diffusers"),
        # modules ComfyUI does not rename (txt_in.input_embedder, final_layer.*) reach diffusers' names directly
        Renames("comfy", "diffusers", modules=TENCENT_TO_DIFFUSERS, note="ComfyUI checkpoint -> diffusers"),
    ),
    # the official HunyuanVideo-I2V LoRA prefix (Tencent-Hunyuan/HunyuanVideo-I2V)
    lora_prefixes=(*DIT_LORA_PREFIXES, "Hunyuan_video_I2V_lora_"),
    extract_targets=_EXTRACT_TARGETS,
    variants=(
        *(Variant("single_blocks.0.linear1.weight", naming=naming,
                  present="HunyuanVideo 1.0 layout (fused q|k|v, single blocks; HunyuanImage 2.1 shares it)")
          for naming in ("tencent", "comfy")),
        Variant("double_blocks.0.img_attn_q.weight", present="HunyuanVideo 1.5 (split q/k/v, no single blocks)",
                naming="tencent"),
        Variant("single_transformer_blocks.0.proj_mlp.weight", naming="diffusers",
                present="HunyuanVideo 1.0 layout (single blocks; HunyuanImage 2.1 shares it)"),
        Variant("time_embed.timestep_embedder.linear_1.weight", present="HunyuanVideo 1.5 (no single blocks)",
                naming="diffusers"),
        Variant("x_embedder.proj.weight", dim=1, naming="diffusers", sizes=_IN_CHANNELS),
        Variant("img_in.proj.weight", dim=1, sizes=_IN_CHANNELS),
    ),
    quant_keep=("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer."),
    block_groups=(BlockGroup("double{n}", "double_blocks.{n}."), BlockGroup("single{n}", "single_blocks.{n}.")),
    implementation="https://github.com/Tencent/HunyuanVideo",
    resolution="1280x720",
    structures=(_HV_10, _HV_15, _HI_21),
    # HunyuanVideo's ComfyUI and diffusers names are Flux's, block for block and shape for shape: every module
    # of a Flux LoRA fits it as well. A LoRA alone is called HunyuanVideo only when it wins outright (more
    # blocks, the token refiner, Tencent's fused names, or metadata breaking a tie); with a base, the base decides.
    lora_alone=False,
    gguf_arch="hyvid",  # city96/ComfyUI-GGUF tools/convert.py and loader.py
    order=210,
)
