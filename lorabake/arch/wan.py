"""Wan 2.1 / 2.2 (T2V, I2V, FLF2V, TI2V 5B, VACE, Fun, Animate; SkyReels V2 shares the layout): the Wan-AI DiT.

Native names are the Wan-AI repository's (`blocks.N.self_attn.q`, `cross_attn.k_img`, `ffn.0`, `head.head`,
5-D Conv3d `patch_embedding`); `blocks.N.modulation` and `head.modulation` are bare parameters, not
`.weight`s. Wan 2.2 A14B ships two such DiTs (high-noise and low-noise experts), each baked on its own.
"""

from lorabake.arch.common import DIT_LORA_PREFIXES, Alias, BlockGroup, Family, Layout, Probe, Renames, Variant

# Block sub-module (native) -> diffusers WanTransformerBlock sub-module, as diffusers
# loaders/single_file_utils.py convert_wan_transformer_to_diffusers renames them (it swaps norm2 and norm3:
# the native norm3 is the cross-attention norm, the only block norm with weights).
_BLOCK = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",  # I2V / FLF2V image cross-attention
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "norm3": "norm2",
    "modulation": "scale_shift_table",
    "before_proj": "proj_in",  # VACE blocks
    "after_proj": "proj_out",
}

WAN_TO_DIFFUSERS: dict[str, tuple[Alias, ...]] = {
    **{f"{blocks}.{{n}}.{k}": (Alias(f"{blocks}.{{n}}.{v}"),) for blocks in ("blocks", "vace_blocks") for k, v in _BLOCK.items()},
    "patch_embedding": (Alias("patch_embedding"),),
    "time_embedding.0": (Alias("condition_embedder.time_embedder.linear_1"),),
    "time_embedding.2": (Alias("condition_embedder.time_embedder.linear_2"),),
    "text_embedding.0": (Alias("condition_embedder.text_embedder.linear_1"),),
    "text_embedding.2": (Alias("condition_embedder.text_embedder.linear_2"),),
    "time_projection.1": (Alias("condition_embedder.time_proj"),),
    "img_emb.proj.0": (Alias("condition_embedder.image_embedder.norm1"),),
    "img_emb.proj.1": (Alias("condition_embedder.image_embedder.ff.net.0.proj"),),
    "img_emb.proj.3": (Alias("condition_embedder.image_embedder.ff.net.2"),),
    "img_emb.proj.4": (Alias("condition_embedder.image_embedder.norm2"),),
    "head.head": (Alias("proj_out"),),
    "head.modulation": (Alias("scale_shift_table"),),
    # Wan 2.2 Animate's face adapter: k and v fused as `linear1_kv` (halves), as diffusers'
    # convert_wan_transformer_to_diffusers splits them; pose_patch_embedding keeps its name
    "face_adapter.fuser_blocks.{n}.linear1_kv": (Alias("face_adapter.{n}.to_k", part="half1"),
                                                 Alias("face_adapter.{n}.to_v", part="half2")),
    "face_adapter.fuser_blocks.{n}.linear1_q": (Alias("face_adapter.{n}.to_q"),),
    "face_adapter.fuser_blocks.{n}.linear2": (Alias("face_adapter.{n}.to_out"),),
    "face_adapter.fuser_blocks.{n}.q_norm": (Alias("face_adapter.{n}.norm_q"),),
    "face_adapter.fuser_blocks.{n}.k_norm": (Alias("face_adapter.{n}.norm_k"),),
    "face_encoder.conv1_local.conv": (Alias("face_encoder.conv1_local"),),
    "face_encoder.conv2.conv": (Alias("face_encoder.conv2"),),
    "face_encoder.conv3.conv": (Alias("face_encoder.conv3"),),
}

# lightx2v distill LoRAs store the delta of a block's (or the head's) modulation parameter as `<block>.diff_m`
# (deepbeepmeep/Wan2GP #1038 lists `blocks.0.diff_m`): the block's own name stands for its modulation.
LIGHTX2V_MODULATION: dict[str, tuple[Alias, ...]] = {
    "blocks.{n}.modulation": (Alias("blocks.{n}"),),
    "vace_blocks.{n}.modulation": (Alias("vace_blocks.{n}"),),
    "head.modulation": (Alias("head"),),
}

_PROBES = (Probe("head.modulation"), Probe("blocks.0.self_attn.q.weight"))
_DIFFUSERS = (Probe("condition_embedder.time_proj.weight"), Probe("blocks.0.attn1.to_q.weight"))

# musubi-tuner networks/lora_wan.py targets the linears of WanAttentionBlock.
_EXTRACT_TARGETS = tuple(
    f"{m}.weight" for m in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q",
                            "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img",
                            "ffn.0", "ffn.2")
)

# Every weight under the bare layout, per variant (scripts/family_structure.py on tests/data/arch key lists).
_T2V_14B = """\
blocks.{0-39}.cross_attn.k.weight 5120x5120
blocks.{0-39}.cross_attn.norm_k.weight 5120
blocks.{0-39}.cross_attn.norm_q.weight 5120
blocks.{0-39}.cross_attn.o.weight 5120x5120
blocks.{0-39}.cross_attn.q.weight 5120x5120
blocks.{0-39}.cross_attn.v.weight 5120x5120
blocks.{0-39}.ffn.0.weight 13824x5120
blocks.{0-39}.ffn.2.weight 5120x13824
blocks.{0-39}.modulation 1x6x5120
blocks.{0-39}.norm3.weight 5120
blocks.{0-39}.self_attn.k.weight 5120x5120
blocks.{0-39}.self_attn.norm_k.weight 5120
blocks.{0-39}.self_attn.norm_q.weight 5120
blocks.{0-39}.self_attn.o.weight 5120x5120
blocks.{0-39}.self_attn.q.weight 5120x5120
blocks.{0-39}.self_attn.v.weight 5120x5120
head.head.weight 64x5120
head.modulation 1x2x5120
patch_embedding.weight 5120x16x1x2x2
text_embedding.0.weight 5120x4096
text_embedding.2.weight 5120x5120
time_embedding.0.weight 5120x256
time_embedding.2.weight 5120x5120
time_projection.1.weight 30720x5120
"""

_I2V_14B = """\
blocks.{0-39}.cross_attn.k.weight 5120x5120
blocks.{0-39}.cross_attn.k_img.weight 5120x5120
blocks.{0-39}.cross_attn.norm_k.weight 5120
blocks.{0-39}.cross_attn.norm_k_img.weight 5120
blocks.{0-39}.cross_attn.norm_q.weight 5120
blocks.{0-39}.cross_attn.o.weight 5120x5120
blocks.{0-39}.cross_attn.q.weight 5120x5120
blocks.{0-39}.cross_attn.v.weight 5120x5120
blocks.{0-39}.cross_attn.v_img.weight 5120x5120
blocks.{0-39}.ffn.0.weight 13824x5120
blocks.{0-39}.ffn.2.weight 5120x13824
blocks.{0-39}.modulation 1x6x5120
blocks.{0-39}.norm3.weight 5120
blocks.{0-39}.self_attn.k.weight 5120x5120
blocks.{0-39}.self_attn.norm_k.weight 5120
blocks.{0-39}.self_attn.norm_q.weight 5120
blocks.{0-39}.self_attn.o.weight 5120x5120
blocks.{0-39}.self_attn.q.weight 5120x5120
blocks.{0-39}.self_attn.v.weight 5120x5120
head.head.weight 64x5120
head.modulation 1x2x5120
img_emb.proj.0.weight 1280
img_emb.proj.1.weight 1280x1280
img_emb.proj.3.weight 5120x1280
img_emb.proj.4.weight 5120
patch_embedding.weight 5120x36x1x2x2
text_embedding.0.weight 5120x4096
text_embedding.2.weight 5120x5120
time_embedding.0.weight 5120x256
time_embedding.2.weight 5120x5120
time_projection.1.weight 30720x5120
"""

_TI2V_5B = """\
blocks.{0-29}.cross_attn.k.weight 3072x3072
blocks.{0-29}.cross_attn.norm_k.weight 3072
blocks.{0-29}.cross_attn.norm_q.weight 3072
blocks.{0-29}.cross_attn.o.weight 3072x3072
blocks.{0-29}.cross_attn.q.weight 3072x3072
blocks.{0-29}.cross_attn.v.weight 3072x3072
blocks.{0-29}.ffn.0.weight 14336x3072
blocks.{0-29}.ffn.2.weight 3072x14336
blocks.{0-29}.modulation 1x6x3072
blocks.{0-29}.norm3.weight 3072
blocks.{0-29}.self_attn.k.weight 3072x3072
blocks.{0-29}.self_attn.norm_k.weight 3072
blocks.{0-29}.self_attn.norm_q.weight 3072
blocks.{0-29}.self_attn.o.weight 3072x3072
blocks.{0-29}.self_attn.q.weight 3072x3072
blocks.{0-29}.self_attn.v.weight 3072x3072
head.head.weight 192x3072
head.modulation 1x2x3072
patch_embedding.weight 3072x48x1x2x2
text_embedding.0.weight 3072x4096
text_embedding.2.weight 3072x3072
time_embedding.0.weight 3072x256
time_embedding.2.weight 3072x3072
time_projection.1.weight 18432x3072
"""

_VACE_14B = """\
blocks.{0-39}.cross_attn.k.weight 5120x5120
blocks.{0-39}.cross_attn.norm_k.weight 5120
blocks.{0-39}.cross_attn.norm_q.weight 5120
blocks.{0-39}.cross_attn.o.weight 5120x5120
blocks.{0-39}.cross_attn.q.weight 5120x5120
blocks.{0-39}.cross_attn.v.weight 5120x5120
blocks.{0-39}.ffn.0.weight 13824x5120
blocks.{0-39}.ffn.2.weight 5120x13824
blocks.{0-39}.modulation 1x6x5120
blocks.{0-39}.norm3.weight 5120
blocks.{0-39}.self_attn.k.weight 5120x5120
blocks.{0-39}.self_attn.norm_k.weight 5120
blocks.{0-39}.self_attn.norm_q.weight 5120
blocks.{0-39}.self_attn.o.weight 5120x5120
blocks.{0-39}.self_attn.q.weight 5120x5120
blocks.{0-39}.self_attn.v.weight 5120x5120
head.head.weight 64x5120
head.modulation 1x2x5120
patch_embedding.weight 5120x16x1x2x2
text_embedding.0.weight 5120x4096
text_embedding.2.weight 5120x5120
time_embedding.0.weight 5120x256
time_embedding.2.weight 5120x5120
time_projection.1.weight 30720x5120
vace_blocks.{0-7}.after_proj.weight 5120x5120
vace_blocks.0.before_proj.weight 5120x5120
vace_blocks.{0-7}.cross_attn.k.weight 5120x5120
vace_blocks.{0-7}.cross_attn.norm_k.weight 5120
vace_blocks.{0-7}.cross_attn.norm_q.weight 5120
vace_blocks.{0-7}.cross_attn.o.weight 5120x5120
vace_blocks.{0-7}.cross_attn.q.weight 5120x5120
vace_blocks.{0-7}.cross_attn.v.weight 5120x5120
vace_blocks.{0-7}.ffn.0.weight 13824x5120
vace_blocks.{0-7}.ffn.2.weight 5120x13824
vace_blocks.{0-7}.modulation 1x6x5120
vace_blocks.{0-7}.norm3.weight 5120
vace_blocks.{0-7}.self_attn.k.weight 5120x5120
vace_blocks.{0-7}.self_attn.norm_k.weight 5120
vace_blocks.{0-7}.self_attn.norm_q.weight 5120
vace_blocks.{0-7}.self_attn.o.weight 5120x5120
vace_blocks.{0-7}.self_attn.q.weight 5120x5120
vace_blocks.{0-7}.self_attn.v.weight 5120x5120
vace_patch_embedding.weight 5120x96x1x2x2
"""

FAMILY = Family(
    arch="wan",
    title="Wan 2.1/2.2",
    modelspec="wan",
    kohya="wan",
    metadata_names=("wan",),
    diffusion="dit",
    diffusion_kind="wan",
    layouts=(
        Layout("dit-only", "", "wan", _PROBES),  # Wan-AI and Comfy-Org repackaged files
        Layout("comfyui", "model.diffusion_model.", "wan", _PROBES),
        Layout("diffusers", "transformer.", "diffusers", _DIFFUSERS),
        Layout("diffusers", "", "diffusers", _DIFFUSERS),
    ),
    text_encoders=(),
    kohya_names={"dit": ("lora_unet_", "wan")},
    renames=(
        Renames("wan", "diffusers", modules=WAN_TO_DIFFUSERS, note="Wan-AI checkpoint -> diffusers"),
        Renames("wan", "lightx2v", modules=LIGHTX2V_MODULATION, note="lightx2v .diff_m: the block names its modulation"),
    ),
    # VideoX-Fun (Wan-Fun) writes `lora_unet__blocks_0_...` (ComfyUI comfy/lora_convert.py convert_lora_wan_fun)
    lora_prefixes=(*DIT_LORA_PREFIXES, "lora_unet__"),
    extract_targets=_EXTRACT_TARGETS,
    variants=(
        # Wan 2.1 and 2.2 differ in the header only where the layout does: 2.2's A14B experts are each a 2.1 14B
        Variant("patch_embedding.weight", dim=1, sizes={
            16: "T2V (16 input channels): Wan 2.1 T2V or a Wan 2.2 T2V A14B expert",
            36: "I2V (36 input channels): Wan 2.1 I2V/FLF2V if image cross-attention follows, else a Wan 2.2 I2V A14B expert",
            48: "TI2V (48 input channels): Wan 2.2 TI2V 5B",
        }),
        Variant("patch_embedding.weight", dim=0, sizes={5120: "14B (width 5120)", 3072: "5B (width 3072)",
                                                        1536: "1.3B (width 1536)"}),
        Variant("blocks.0.cross_attn.k_img.weight", present="image cross-attention (k_img/v_img): Wan 2.1 I2V / FLF2V"),
        Variant("vace_blocks.0.before_proj.weight", present="VACE (vace_blocks): Wan 2.1 VACE or Wan 2.2 VACE-Fun"),
        # the keys ComfyUI comfy/model_detection.py tells these apart by (model_type animate, camera, ref_conv)
        Variant("face_adapter.fuser_blocks.0.k_norm.weight",
                present="Animate (face_adapter, face_encoder, motion_encoder, pose_patch_embedding): Wan 2.2 Animate 14B"),
        Variant("control_adapter.conv.weight", present="Wan-Fun Control-Camera (control_adapter)"),
        Variant("ref_conv.weight", present="Wan-Fun V1.1 reference image (ref_conv): Wan-Fun Control"),
    ),
    quant_keep=("^head.", "time_projection."),
    block_groups=(BlockGroup("block{n}", "blocks.{n}."), BlockGroup("vace{n}", "vace_blocks.{n}.")),
    implementation="https://github.com/Wan-Video/Wan2.1",
    resolution="832x480",
    structures=(_T2V_14B, _I2V_14B, _TI2V_5B, _VACE_14B,),
    order=200,
)
