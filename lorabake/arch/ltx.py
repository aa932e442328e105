"""LTX-2 (audio + video) and LTX-Video 0.9 (Lightricks): diffusers-like names under `model.diffusion_model.`.

Lightricks' files are all-in-one (DiT + text projection + VAE, LTX-2 also the audio VAE and vocoder); a bake
keeps every tensor. The DiT's names are diffusers' except for the renames below; `scale_shift_table*` are
bare parameters (targets of full `diff` deltas).
"""

from lorabake.arch.common import (
    DIT_LORA_PREFIXES,
    Alias,
    Block,
    BlockGroup,
    Family,
    Layout,
    Probe,
    Renames,
    Variant,
)

# Lightricks module prefix -> diffusers LTX2VideoTransformer3DModel / LTXVideoTransformer3DModel, as diffusers
# loaders/single_file_utils.py convert_ltx2_transformer_to_diffusers and
# convert_ltx_transformer_checkpoint_to_diffusers rename them.
_PREFIXES = {
    "patchify_proj": "proj_in",
    "audio_patchify_proj": "audio_proj_in",
    "adaln_single": "time_embed",
    "audio_adaln_single": "audio_time_embed",
    "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
    "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
    "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
    "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate",
}
_BLOCK_PARAMS = {
    "transformer_blocks.{n}.scale_shift_table_a2v_ca_video": (
        Alias("transformer_blocks.{n}.video_a2v_cross_attn_scale_shift_table"),
    ),
    "transformer_blocks.{n}.scale_shift_table_a2v_ca_audio": (
        Alias("transformer_blocks.{n}.audio_a2v_cross_attn_scale_shift_table"),
    ),
}
LTX_TO_DIFFUSERS = Renames(
    "ltx", "diffusers",
    modules=_BLOCK_PARAMS,
    blocks={k: Block(v) for k, v in _PREFIXES.items()},
    tails={"q_norm": "norm_q", "k_norm": "norm_k"},
    note="Lightricks checkpoint -> diffusers",
)

_LTX = (Probe("adaln_single.linear.weight"), Probe("transformer_blocks.0.attn1.to_q.weight"), Probe("patchify_proj.weight"))
_DIFFUSERS = (Probe("time_embed.linear.weight"), Probe("transformer_blocks.0.attn1.to_q.weight"), Probe("proj_in.weight"))

# The LTX trainers (LTX-Video-Trainer, musubi LTX-2) target the attention and feed-forward linears.
_EXTRACT_TARGETS = tuple(
    f"{a}.{m}.weight"
    for a in ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
    for m in ("to_q", "to_k", "to_v", "to_out.0")
) + tuple(f"{f}.{m}.weight" for f in ("ff", "audio_ff") for m in ("net.0.proj", "net.2"))

# Every weight under the bare layout, per variant (scripts/family_structure.py on tests/data/arch key lists).
_LTX2 = """\
adaln_single.emb.timestep_embedder.linear_1.weight 4096x256
adaln_single.emb.timestep_embedder.linear_2.weight 4096x4096
adaln_single.linear.weight 24576x4096
audio_adaln_single.emb.timestep_embedder.linear_1.weight 2048x256
audio_adaln_single.emb.timestep_embedder.linear_2.weight 2048x2048
audio_adaln_single.linear.weight 12288x2048
audio_caption_projection.linear_1.weight 2048x3840
audio_caption_projection.linear_2.weight 2048x2048
audio_patchify_proj.weight 2048x128
audio_proj_out.weight 128x2048
audio_scale_shift_table 2x2048
av_ca_a2v_gate_adaln_single.emb.timestep_embedder.linear_1.weight 4096x256
av_ca_a2v_gate_adaln_single.emb.timestep_embedder.linear_2.weight 4096x4096
av_ca_a2v_gate_adaln_single.linear.weight 4096x4096
av_ca_audio_scale_shift_adaln_single.emb.timestep_embedder.linear_1.weight 2048x256
av_ca_audio_scale_shift_adaln_single.emb.timestep_embedder.linear_2.weight 2048x2048
av_ca_audio_scale_shift_adaln_single.linear.weight 8192x2048
av_ca_v2a_gate_adaln_single.emb.timestep_embedder.linear_1.weight 2048x256
av_ca_v2a_gate_adaln_single.emb.timestep_embedder.linear_2.weight 2048x2048
av_ca_v2a_gate_adaln_single.linear.weight 2048x2048
av_ca_video_scale_shift_adaln_single.emb.timestep_embedder.linear_1.weight 4096x256
av_ca_video_scale_shift_adaln_single.emb.timestep_embedder.linear_2.weight 4096x4096
av_ca_video_scale_shift_adaln_single.linear.weight 16384x4096
caption_projection.linear_1.weight 4096x3840
caption_projection.linear_2.weight 4096x4096
patchify_proj.weight 4096x128
proj_out.weight 128x4096
scale_shift_table 2x4096
transformer_blocks.{0-47}.attn1.k_norm.weight 4096
transformer_blocks.{0-47}.attn1.q_norm.weight 4096
transformer_blocks.{0-47}.attn1.to_k.weight 4096x4096
transformer_blocks.{0-47}.attn1.to_out.0.weight 4096x4096
transformer_blocks.{0-47}.attn1.to_q.weight 4096x4096
transformer_blocks.{0-47}.attn1.to_v.weight 4096x4096
transformer_blocks.{0-47}.attn2.k_norm.weight 4096
transformer_blocks.{0-47}.attn2.q_norm.weight 4096
transformer_blocks.{0-47}.attn2.to_k.weight 4096x4096
transformer_blocks.{0-47}.attn2.to_out.0.weight 4096x4096
transformer_blocks.{0-47}.attn2.to_q.weight 4096x4096
transformer_blocks.{0-47}.attn2.to_v.weight 4096x4096
transformer_blocks.{0-47}.audio_attn1.k_norm.weight 2048
transformer_blocks.{0-47}.audio_attn1.q_norm.weight 2048
transformer_blocks.{0-47}.audio_attn1.to_k.weight 2048x2048
transformer_blocks.{0-47}.audio_attn1.to_out.0.weight 2048x2048
transformer_blocks.{0-47}.audio_attn1.to_q.weight 2048x2048
transformer_blocks.{0-47}.audio_attn1.to_v.weight 2048x2048
transformer_blocks.{0-47}.audio_attn2.k_norm.weight 2048
transformer_blocks.{0-47}.audio_attn2.q_norm.weight 2048
transformer_blocks.{0-47}.audio_attn2.to_k.weight 2048x2048
transformer_blocks.{0-47}.audio_attn2.to_out.0.weight 2048x2048
transformer_blocks.{0-47}.audio_attn2.to_q.weight 2048x2048
transformer_blocks.{0-47}.audio_attn2.to_v.weight 2048x2048
transformer_blocks.{0-47}.audio_ff.net.0.proj.weight 8192x2048
transformer_blocks.{0-47}.audio_ff.net.2.weight 2048x8192
transformer_blocks.{0-47}.audio_scale_shift_table 6x2048
transformer_blocks.{0-47}.audio_to_video_attn.k_norm.weight 2048
transformer_blocks.{0-47}.audio_to_video_attn.q_norm.weight 2048
transformer_blocks.{0-47}.audio_to_video_attn.to_k.weight 2048x2048
transformer_blocks.{0-47}.audio_to_video_attn.to_out.0.weight 4096x2048
transformer_blocks.{0-47}.audio_to_video_attn.to_q.weight 2048x4096
transformer_blocks.{0-47}.audio_to_video_attn.to_v.weight 2048x2048
transformer_blocks.{0-47}.ff.net.0.proj.weight 16384x4096
transformer_blocks.{0-47}.ff.net.2.weight 4096x16384
transformer_blocks.{0-47}.scale_shift_table 6x4096
transformer_blocks.{0-47}.scale_shift_table_a2v_ca_audio 5x2048
transformer_blocks.{0-47}.scale_shift_table_a2v_ca_video 5x4096
transformer_blocks.{0-47}.video_to_audio_attn.k_norm.weight 2048
transformer_blocks.{0-47}.video_to_audio_attn.q_norm.weight 2048
transformer_blocks.{0-47}.video_to_audio_attn.to_k.weight 2048x4096
transformer_blocks.{0-47}.video_to_audio_attn.to_out.0.weight 2048x2048
transformer_blocks.{0-47}.video_to_audio_attn.to_q.weight 2048x2048
transformer_blocks.{0-47}.video_to_audio_attn.to_v.weight 2048x4096
"""

_LTXV = """\
adaln_single.emb.timestep_embedder.linear_1.weight 2048x256
adaln_single.emb.timestep_embedder.linear_2.weight 2048x2048
adaln_single.linear.weight 12288x2048
caption_projection.linear_1.weight 2048x4096
caption_projection.linear_2.weight 2048x2048
patchify_proj.weight 2048x128
proj_out.weight 128x2048
scale_shift_table 2x2048
transformer_blocks.{0-27}.attn1.k_norm.weight 2048
transformer_blocks.{0-27}.attn1.q_norm.weight 2048
transformer_blocks.{0-27}.attn1.to_k.weight 2048x2048
transformer_blocks.{0-27}.attn1.to_out.0.weight 2048x2048
transformer_blocks.{0-27}.attn1.to_q.weight 2048x2048
transformer_blocks.{0-27}.attn1.to_v.weight 2048x2048
transformer_blocks.{0-27}.attn2.k_norm.weight 2048
transformer_blocks.{0-27}.attn2.q_norm.weight 2048
transformer_blocks.{0-27}.attn2.to_k.weight 2048x2048
transformer_blocks.{0-27}.attn2.to_out.0.weight 2048x2048
transformer_blocks.{0-27}.attn2.to_q.weight 2048x2048
transformer_blocks.{0-27}.attn2.to_v.weight 2048x2048
transformer_blocks.{0-27}.ff.net.0.proj.weight 8192x2048
transformer_blocks.{0-27}.ff.net.2.weight 2048x8192
transformer_blocks.{0-27}.scale_shift_table 6x2048
"""

FAMILY = Family(
    arch="ltx",
    title="LTX-Video / LTX-2",
    modelspec="ltx-video",
    kohya="ltx",
    metadata_names=("ltx-video", "ltxv", "ltx-2", "ltx2", "ltx"),
    diffusion="dit",
    diffusion_kind="ltx",
    layouts=(
        Layout("dit-only", "", "ltx", _LTX),
        Layout("comfyui", "model.diffusion_model.", "ltx", _LTX),  # as Lightricks ships it
        Layout("diffusers", "transformer.", "diffusers", _DIFFUSERS),
        Layout("diffusers", "", "diffusers", _DIFFUSERS),
    ),
    text_encoders=(),
    kohya_names={"dit": ("lora_unet_", "ltx")},
    renames=(LTX_TO_DIFFUSERS,),
    lora_prefixes=DIT_LORA_PREFIXES,
    extract_targets=_EXTRACT_TARGETS,
    variants=(
        Variant("transformer_blocks.0.audio_attn1.to_q.weight", present="LTX-2 (audio + video)",
                absent="LTX-Video 0.9 (video only)"),
        Variant("transformer_blocks.0.attn1.to_q.weight", dim=0, sizes={2048: "2B (width 2048)",
                                                                          4096: "width 4096 (LTX-2 19B, LTX-Video 13B)"}),
    ),
    quant_keep=("patchify_proj", "caption_projection", "^proj_out.", "^audio_proj_out."),
    block_groups=(BlockGroup("block{n}", "transformer_blocks.{n}."),),
    implementation="https://github.com/Lightricks/LTX-2",
    resolution="768x512",
    structures=(_LTX2, _LTXV,),
    gguf_arch="ltxv",  # city96/ComfyUI-GGUF tools/convert.py and loader.py
    order=220,
)
