"""Video families for the tests: diffusers model configs, diffusers -> native names, diffusers' converters.

A family's native (original / ComfyUI single-file) layout is written from a diffusers model with the rows
below: each row renames a diffusers tensor to its native name, optionally as one band (rows, in order) of a
fused native tensor, optionally with the two halves swapped. The rows are checked against code that is not
ours: the native dict converted back by diffusers' single-file converter equals the model's state dict
(names, shapes and, for tiny models, every value).

`python -m tests.videofam` regenerates tests/data/arch/<variant>.json from the full-size configs on the meta
device (no weights): the full-size key lists the tests and benchmarks use.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH_DIR = os.path.join(ROOT, "tests", "data", "arch")

_W = r"(\.weight|\.bias)$"


@dataclass(frozen=True)
class Row:
    """diffusers name (regex, anchored at the start) -> native name; `band` = position in a fused tensor."""

    pattern: str
    native: str
    band: int | None = None
    swap: bool = False  # the native tensor holds (shift, scale) where diffusers holds (scale, shift)
    lift: bool = False  # the native tensor is [1, C, 1, 1] where diffusers has [C] (Wan Animate's motion encoder)


def _rows(*rows: tuple) -> tuple[Row, ...]:
    return tuple(Row(*r) for r in rows)


# diffusers WanTransformer3DModel / WanVACETransformer3DModel -> Wan-AI original names; read off diffusers
# loaders/single_file_utils.py convert_wan_transformer_to_diffusers (which swaps norm2 and norm3).
WAN_ROWS = _rows(
    (r"condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"condition_embedder\.time_proj\.", "time_projection.1."),
    (r"condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"scale_shift_table$", "head.modulation"),
    (r"proj_out\.", "head.head."),
    (r"(vace_)?blocks\.(\d+)\.scale_shift_table$", r"\1blocks.\2.modulation"),
    (r"vace_blocks\.(\d+)\.proj_in\.", r"vace_blocks.\1.before_proj."),
    (r"vace_blocks\.(\d+)\.proj_out\.", r"vace_blocks.\1.after_proj."),
    (r"((?:vace_)?blocks\.\d+)\.attn1\.to_out\.0\.", r"\1.self_attn.o."),
    (r"((?:vace_)?blocks\.\d+)\.attn1\.to_([qkv])\.", r"\1.self_attn.\2."),
    (r"((?:vace_)?blocks\.\d+)\.attn1\.(norm_[qk])\.", r"\1.self_attn.\2."),
    (r"((?:vace_)?blocks\.\d+)\.attn2\.to_out\.0\.", r"\1.cross_attn.o."),
    (r"((?:vace_)?blocks\.\d+)\.attn2\.to_([qkv])\.", r"\1.cross_attn.\2."),
    (r"((?:vace_)?blocks\.\d+)\.attn2\.(norm_[qk])\.", r"\1.cross_attn.\2."),
    (r"((?:vace_)?blocks\.\d+)\.attn2\.add_([kv])_proj\.", r"\1.cross_attn.\2_img."),
    (r"((?:vace_)?blocks\.\d+)\.attn2\.norm_added_k\.", r"\1.cross_attn.norm_k_img."),
    (r"((?:vace_)?blocks\.\d+)\.ffn\.net\.0\.proj\.", r"\1.ffn.0."),
    (r"((?:vace_)?blocks\.\d+)\.ffn\.net\.2\.", r"\1.ffn.2."),
    (r"((?:vace_)?blocks\.\d+)\.norm2\.", r"\1.norm3."),
)

# Wan 2.2 Animate 14B: an I2V 14B plus the face adapter (fused k|v `linear1_kv`), face encoder, motion encoder and
# pose patch embedding; read off diffusers convert_wan_transformer_to_diffusers (its face_adapter and motion_encoder
# mappings, `linear1_kv` halved into to_k/to_v, the motion encoder's biases stored [1, C, 1, 1]).
_ME = r"motion_encoder\."
WAN_ANIMATE_ROWS = _rows(
    (r"face_adapter\.(\d+)\.to_q\.", r"face_adapter.fuser_blocks.\1.linear1_q."),
    (r"face_adapter\.(\d+)\.to_k\.", r"face_adapter.fuser_blocks.\1.linear1_kv.", 0),
    (r"face_adapter\.(\d+)\.to_v\.", r"face_adapter.fuser_blocks.\1.linear1_kv.", 1),
    (r"face_adapter\.(\d+)\.to_out\.", r"face_adapter.fuser_blocks.\1.linear2."),
    (r"face_adapter\.(\d+)\.norm_([qk])\.", r"face_adapter.fuser_blocks.\1.\2_norm."),
    (r"face_encoder\.(conv1_local|conv2|conv3)\.", r"face_encoder.\1.conv."),
    (_ME + r"motion_synthesis_weight$", "motion_encoder.dec.direction.weight"),
    (_ME + r"conv_in\.weight$", "motion_encoder.enc.net_app.convs.0.0.weight"),
    (_ME + r"conv_in\.act_fn\.bias$", "motion_encoder.enc.net_app.convs.0.1.bias", None, False, True),
    (_ME + r"conv_out\.weight$", "motion_encoder.enc.net_app.convs.8.weight"),
    (_ME + r"motion_network\.", "motion_encoder.enc.fc."),
    *((_ME + rf"res_blocks\.{i}\.conv1\.weight$", f"motion_encoder.enc.net_app.convs.{i + 1}.conv1.0.weight")
      for i in range(7)),
    *((_ME + rf"res_blocks\.{i}\.conv1\.act_fn\.bias$", f"motion_encoder.enc.net_app.convs.{i + 1}.conv1.1.bias",
       None, False, True) for i in range(7)),
    *((_ME + rf"res_blocks\.{i}\.conv2\.weight$", f"motion_encoder.enc.net_app.convs.{i + 1}.conv2.1.weight")
      for i in range(7)),
    *((_ME + rf"res_blocks\.{i}\.conv2\.act_fn\.bias$", f"motion_encoder.enc.net_app.convs.{i + 1}.conv2.2.bias",
       None, False, True) for i in range(7)),
    *((_ME + rf"res_blocks\.{i}\.conv_skip\.weight$", f"motion_encoder.enc.net_app.convs.{i + 1}.skip.1.weight")
      for i in range(7)),
) + WAN_ROWS

# HunyuanVideo 1.0 and 1.5 share the token refiner and most block names; read off diffusers
# convert_hunyuan_video_transformer_to_diffusers (1.0) and scripts/convert_hunyuan_video1_5_to_diffusers.py
# (1.5, not part of the installed package).
_HY_REFINER = _rows(
    (r"context_embedder\.proj_in\.", "txt_in.input_embedder."),
    (r"context_embedder\.time_text_embed\.timestep_embedder\.linear_1\.", "txt_in.t_embedder.mlp.0."),
    (r"context_embedder\.time_text_embed\.timestep_embedder\.linear_2\.", "txt_in.t_embedder.mlp.2."),
    (r"context_embedder\.time_text_embed\.text_embedder\.linear_([12])\.", r"txt_in.c_embedder.linear_\1."),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_q\.", r"txt_in.individual_token_refiner.blocks.\1.self_attn_qkv.", 0),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_k\.", r"txt_in.individual_token_refiner.blocks.\1.self_attn_qkv.", 1),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_v\.", r"txt_in.individual_token_refiner.blocks.\1.self_attn_qkv.", 2),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_out\.0\.", r"txt_in.individual_token_refiner.blocks.\1.self_attn_proj."),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.norm([12])\.", r"txt_in.individual_token_refiner.blocks.\1.norm\2."),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"txt_in.individual_token_refiner.blocks.\1.mlp.fc1."),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.ff\.net\.2\.", r"txt_in.individual_token_refiner.blocks.\1.mlp.fc2."),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.norm_out\.linear\.", r"txt_in.individual_token_refiner.blocks.\1.adaLN_modulation.1."),
    (r"x_embedder\.proj\.", "img_in.proj."),
    (r"norm_out\.linear\.", "final_layer.adaLN_modulation.1.", None, True),
    (r"proj_out\.", "final_layer.linear."),
)
_HY_DOUBLE = _rows(
    (r"transformer_blocks\.(\d+)\.attn\.norm_([qk])\.", r"double_blocks.\1.img_attn_\2_norm."),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_([qk])\.", r"double_blocks.\1.txt_attn_\2_norm."),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"double_blocks.\1.img_attn_proj."),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out\.", r"double_blocks.\1.txt_attn_proj."),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.", r"double_blocks.\1.img_mod.linear."),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear\.", r"double_blocks.\1.txt_mod.linear."),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"double_blocks.\1.img_mlp.fc1."),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.", r"double_blocks.\1.img_mlp.fc2."),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.", r"double_blocks.\1.txt_mlp.fc1."),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2\.", r"double_blocks.\1.txt_mlp.fc2."),
)
HUNYUAN_ROWS = (
    _HY_REFINER
    + _HY_DOUBLE
    + _rows(
        (r"time_text_embed\.timestep_embedder\.linear_1\.", "time_in.mlp.0."),
        (r"time_text_embed\.timestep_embedder\.linear_2\.", "time_in.mlp.2."),
        (r"time_text_embed\.guidance_embedder\.linear_1\.", "guidance_in.mlp.0."),
        (r"time_text_embed\.guidance_embedder\.linear_2\.", "guidance_in.mlp.2."),
        (r"time_text_embed\.text_embedder\.linear_1\.", "vector_in.in_layer."),
        (r"time_text_embed\.text_embedder\.linear_2\.", "vector_in.out_layer."),
        (r"transformer_blocks\.(\d+)\.attn\.to_q\.", r"double_blocks.\1.img_attn_qkv.", 0),
        (r"transformer_blocks\.(\d+)\.attn\.to_k\.", r"double_blocks.\1.img_attn_qkv.", 1),
        (r"transformer_blocks\.(\d+)\.attn\.to_v\.", r"double_blocks.\1.img_attn_qkv.", 2),
        (r"transformer_blocks\.(\d+)\.attn\.add_q_proj\.", r"double_blocks.\1.txt_attn_qkv.", 0),
        (r"transformer_blocks\.(\d+)\.attn\.add_k_proj\.", r"double_blocks.\1.txt_attn_qkv.", 1),
        (r"transformer_blocks\.(\d+)\.attn\.add_v_proj\.", r"double_blocks.\1.txt_attn_qkv.", 2),
        (r"single_transformer_blocks\.(\d+)\.attn\.to_q\.", r"single_blocks.\1.linear1.", 0),
        (r"single_transformer_blocks\.(\d+)\.attn\.to_k\.", r"single_blocks.\1.linear1.", 1),
        (r"single_transformer_blocks\.(\d+)\.attn\.to_v\.", r"single_blocks.\1.linear1.", 2),
        (r"single_transformer_blocks\.(\d+)\.proj_mlp\.", r"single_blocks.\1.linear1.", 3),
        (r"single_transformer_blocks\.(\d+)\.proj_out\.", r"single_blocks.\1.linear2."),
        (r"single_transformer_blocks\.(\d+)\.attn\.norm_([qk])\.", r"single_blocks.\1.\2_norm."),
        (r"single_transformer_blocks\.(\d+)\.norm\.linear\.", r"single_blocks.\1.modulation.linear."),
    )
)
# HunyuanImage 2.1: HunyuanVideo 1.0's Tencent names (fused img_attn_qkv, single blocks' linear1) without vector_in,
# plus byt5_in, and time_r_in (meanflow) / guidance_in in the distilled model; read off diffusers
# scripts/convert_hunyuan_image_to_diffusers.py (its tensor-parallel split of the fused tensors undone here).
HUNYUANIMAGE_ROWS = (
    _rows(
        (r"time_guidance_embed\.timestep_embedder\.linear_1\.", "time_in.mlp.0."),
        (r"time_guidance_embed\.timestep_embedder\.linear_2\.", "time_in.mlp.2."),
        (r"time_guidance_embed\.timestep_embedder_r\.linear_1\.", "time_r_in.mlp.0."),
        (r"time_guidance_embed\.timestep_embedder_r\.linear_2\.", "time_r_in.mlp.2."),
        (r"time_guidance_embed\.guidance_embedder\.linear_1\.", "guidance_in.mlp.0."),
        (r"time_guidance_embed\.guidance_embedder\.linear_2\.", "guidance_in.mlp.2."),
        (r"context_embedder_2\.norm\.", "byt5_in.layernorm."),
        (r"context_embedder_2\.linear_([123])\.", r"byt5_in.fc\1."),
    )
    + tuple(r for r in HUNYUAN_ROWS if not r.pattern.startswith(r"time_text_embed"))
)
HUNYUAN15_ROWS = (
    _HY_REFINER
    + _HY_DOUBLE
    + _rows(
        (r"time_embed\.timestep_embedder\.linear_1\.", "time_in.mlp.0."),
        (r"time_embed\.timestep_embedder\.linear_2\.", "time_in.mlp.2."),
        (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])\.", r"double_blocks.\1.img_attn_\2."),
        (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj\.", r"double_blocks.\1.txt_attn_\2."),
        (r"context_embedder_2\.norm\.", "byt5_in.layernorm."),
        (r"context_embedder_2\.linear_([123])\.", r"byt5_in.fc\1."),
        (r"image_embedder\.norm_in\.", "vision_in.proj.0."),
        (r"image_embedder\.linear_1\.", "vision_in.proj.1."),
        (r"image_embedder\.linear_2\.", "vision_in.proj.3."),
        (r"image_embedder\.norm_out\.", "vision_in.proj.4."),
        (r"cond_type_embed\.", "cond_type_embedding."),
    )
)

# LTX-2 and LTX-Video 0.9: diffusers-like names; read off convert_ltx2_transformer_to_diffusers and
# convert_ltx_transformer_checkpoint_to_diffusers. Everything not listed keeps its name.
LTX2_ROWS = _rows(
    (r"proj_in\.", "patchify_proj."),
    (r"audio_proj_in\.", "audio_patchify_proj."),
    (r"time_embed\.", "adaln_single."),
    (r"audio_time_embed\.", "audio_adaln_single."),
    (r"av_cross_attn_video_scale_shift\.", "av_ca_video_scale_shift_adaln_single."),
    (r"av_cross_attn_video_a2v_gate\.", "av_ca_a2v_gate_adaln_single."),
    (r"av_cross_attn_audio_scale_shift\.", "av_ca_audio_scale_shift_adaln_single."),
    (r"av_cross_attn_audio_v2a_gate\.", "av_ca_v2a_gate_adaln_single."),
    (r"transformer_blocks\.(\d+)\.video_a2v_cross_attn_scale_shift_table$", r"transformer_blocks.\1.scale_shift_table_a2v_ca_video"),
    (r"transformer_blocks\.(\d+)\.audio_a2v_cross_attn_scale_shift_table$", r"transformer_blocks.\1.scale_shift_table_a2v_ca_audio"),
    (r"(transformer_blocks\.\d+\.\w+)\.norm_([qk])\.", r"\1.\2_norm."),
)
LTX_ROWS = _rows(
    (r"proj_in\.", "patchify_proj."),
    (r"time_embed\.", "adaln_single."),
    (r"(transformer_blocks\.\d+\.\w+)\.norm_([qk])\.", r"\1.\2_norm."),
)


# Cosmos Predict2 (NVIDIA; Anima builds on it): `net.` + the names diffusers' convert_cosmos_transformer_checkpoint_to_diffusers
# renames (its Cosmos 2.0 table).
COSMOS_ROWS = _rows(
    (r"time_embed\.t_embedder\.", "t_embedder.1."),
    (r"time_embed\.norm\.", "t_embedding_norm."),
    (r"transformer_blocks\.(\d+)\.norm1\.linear_([12])\.", r"blocks.\1.adaln_modulation_self_attn.\2."),
    (r"transformer_blocks\.(\d+)\.norm2\.linear_([12])\.", r"blocks.\1.adaln_modulation_cross_attn.\2."),
    (r"transformer_blocks\.(\d+)\.norm3\.linear_([12])\.", r"blocks.\1.adaln_modulation_mlp.\2."),
    (r"transformer_blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2_proj."),
    (r"transformer_blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2_proj."),
    (r"transformer_blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.output_proj."),
    (r"transformer_blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.output_proj."),
    (r"transformer_blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.\2_norm."),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.\2_norm."),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"blocks.\1.mlp.layer1."),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.", r"blocks.\1.mlp.layer2."),
    (r"patch_embed\.proj\.", "x_embedder.proj.1."),
    (r"norm_out\.linear_([12])\.", r"final_layer.adaln_modulation.\1."),
    (r"proj_out\.", "final_layer.linear."),
)


def _identity_tail(rows: tuple[Row, ...]) -> tuple[Row, ...]:
    return rows + (Row(r"(.*)$", r"\1"),)


@dataclass(frozen=True)
class Variant:
    """One published model: its diffusers class and config, its native names and its converter."""

    name: str  # tests/data/arch/<name>.json
    family: str
    title: str
    model: str  # diffusers class name
    config: dict
    tiny: dict  # tiny config with the same structure (tests)
    rows: tuple[Row, ...]
    converter: str | None  # diffusers single_file_utils function; None = none in diffusers
    prefix: str = ""  # prefix of the published single file
    source: str = ""
    check: str = ""  # what checked the names when there is no converter
    short: dict = field(default_factory=lambda: {"num_layers": 1})  # full width, one block of each kind


_WAN_TINY = {"num_attention_heads": 2, "attention_head_dim": 8, "ffn_dim": 32, "num_layers": 2,
             "text_dim": 16, "freq_dim": 8, "in_channels": 4, "out_channels": 4, "rope_max_seq_len": 32}
_WAN14 = {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 40}
_WAN_SRC = "diffusers 0.42.1 model at the config of diffusers scripts/convert_wan_to_diffusers.py"
_HY_TINY = {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 1,
            "num_refiner_layers": 1, "mlp_ratio": 2.0, "text_embed_dim": 16, "rope_axes_dim": (2, 2, 4)}
_LTX_TINY = {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8,
             "cross_attention_dim": 16, "num_layers": 1, "caption_channels": 16}
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("wan21-t2v-14b", "wan", "Wan 2.1 T2V 14B (also each Wan 2.2 T2V A14B expert)",
                "WanTransformer3DModel", dict(_WAN14, in_channels=16), _WAN_TINY, _identity_tail(WAN_ROWS),
                "convert_wan_transformer_to_diffusers", source=_WAN_SRC + " (Wan-T2V-14B)"),
        Variant("wan21-i2v-14b", "wan", "Wan 2.1 I2V 14B 480p/720p",
                "WanTransformer3DModel", dict(_WAN14, in_channels=36, image_dim=1280, added_kv_proj_dim=5120),
                dict(_WAN_TINY, in_channels=8, image_dim=12, added_kv_proj_dim=16), _identity_tail(WAN_ROWS),
                "convert_wan_transformer_to_diffusers", source=_WAN_SRC + " (Wan-I2V-14B-480p)"),
        Variant("wan22-ti2v-5b", "wan", "Wan 2.2 TI2V 5B",
                "WanTransformer3DModel", {"num_attention_heads": 24, "attention_head_dim": 128, "ffn_dim": 14336,
                                          "num_layers": 30, "in_channels": 48, "out_channels": 48},
                dict(_WAN_TINY, in_channels=12, out_channels=12), _identity_tail(WAN_ROWS),
                "convert_wan_transformer_to_diffusers", source=_WAN_SRC + " (Wan2.2-TI2V-5B)"),
        Variant("wan21-vace-14b", "wan", "Wan 2.1 VACE 14B (Wan 2.2 VACE-Fun A14B has the same layout)",
                "WanVACETransformer3DModel", dict(_WAN14, in_channels=16, vace_layers=[0, 5, 10, 15, 20, 25, 30, 35],
                                                  vace_in_channels=96),
                dict(_WAN_TINY, vace_layers=[0], vace_in_channels=6), _identity_tail(WAN_ROWS),
                "convert_wan_transformer_to_diffusers", source=_WAN_SRC + " (Wan-VACE-14B)",
                short={"num_layers": 1, "vace_layers": [0]}),
        Variant("wan22-animate-14b", "wan", "Wan 2.2 Animate 14B", "WanAnimateTransformer3DModel", {},
                dict(_WAN_TINY, in_channels=12, latent_channels=4, image_dim=12, motion_encoder_size=16,
                     motion_style_dim=16, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=8,
                     face_encoder_num_heads=2, inject_face_latents_blocks=1, motion_encoder_batch_size=1,
                     motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}),
                _identity_tail(WAN_ANIMATE_ROWS), "convert_wan_transformer_to_diffusers",
                source="diffusers 0.42.1 WanAnimateTransformer3DModel at its default config (= Wan2.2-Animate-14B)",
                short={"num_layers": 1, "inject_face_latents_blocks": 1}),
        Variant("hunyuanvideo-t2v", "hunyuanvideo", "HunyuanVideo 1.0 T2V (13B)",
                "HunyuanVideoTransformer3DModel", {},
                dict(_HY_TINY, num_single_layers=1, pooled_projection_dim=8),
                _identity_tail(HUNYUAN_ROWS), "convert_hunyuan_video_transformer_to_diffusers",
                source="diffusers 0.42.1 HunyuanVideoTransformer3DModel at its default config (= tencent/HunyuanVideo)",
                short={"num_layers": 1, "num_single_layers": 1}),
        Variant("hunyuanimage21", "hunyuanvideo", "HunyuanImage 2.1 (17B, 2-D patches)",
                "HunyuanImageTransformer2DModel", {"text_embed_2_dim": 1472},
                {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8,
                 "num_layers": 1, "num_single_layers": 1, "num_refiner_layers": 1, "mlp_ratio": 2.0,
                 "text_embed_dim": 16, "text_embed_2_dim": 8, "rope_axes_dim": (4, 4)},
                _identity_tail(HUNYUANIMAGE_ROWS), None, short={"num_layers": 1, "num_single_layers": 1},
                source="diffusers 0.42.1 HunyuanImageTransformer2DModel at its default config with ByT5 "
                "(text_embed_2_dim 1472, = tencent/HunyuanImage-2.1 hunyuanimage2.1.safetensors)",
                check="no converter in the diffusers package; diffusers scripts/convert_hunyuan_image_to_diffusers.py "
                "maps these names (its tensor-parallel split of img_attn_qkv and linear1 undone) onto the model's "
                "state dict; ComfyUI comfy/model_detection.py reads the same names (no vector_in, 2-D patch size)"),
        Variant("hunyuanvideo15-i2v", "hunyuanvideo", "HunyuanVideo 1.5 480p I2V (8.3B)",
                "HunyuanVideo15Transformer3DModel", {},
                dict(_HY_TINY, text_embed_2_dim=8, image_embed_dim=12), _identity_tail(HUNYUAN15_ROWS), None,
                source="diffusers 0.42.1 HunyuanVideo15Transformer3DModel at its default config (= 480p_i2v)",
                check="no converter in diffusers 0.42.1; when generated, convert_hyvideo15_transformer_to_diffusers "
                "of diffusers scripts/convert_hunyuan_video1_5_to_diffusers.py mapped these names back onto the "
                "model's state dict (names and shapes)"),
        Variant("ltx2", "ltx2", "LTX-2 (19B, audio + video)", "LTX2VideoTransformer3DModel", {},
                dict(_LTX_TINY, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
                     audio_attention_head_dim=4, audio_cross_attention_dim=8),
                _identity_tail(LTX2_ROWS), "convert_ltx2_transformer_to_diffusers", prefix="model.diffusion_model.",
                source="diffusers 0.42.1 LTX2VideoTransformer3DModel at its default config (= Lightricks/LTX-2 2.0 "
                "in diffusers scripts/convert_ltx2_to_diffusers.py); transformer only"),
        Variant("ltxv-0.9", "ltxv", "LTX-Video 0.9 (2B)", "LTXVideoTransformer3DModel", {}, _LTX_TINY,
                _identity_tail(LTX_ROWS), "convert_ltx_transformer_checkpoint_to_diffusers",
                prefix="model.diffusion_model.",
                source="diffusers 0.42.1 LTXVideoTransformer3DModel at its default config (= Lightricks/LTX-Video); "
                "transformer only"),
        Variant("kandinsky5-lite-t2v", "kandinsky5", "Kandinsky 5.0 Video Lite (2B)", "Kandinsky5Transformer3DModel",
                {"in_visual_dim": 16, "out_visual_dim": 16, "model_dim": 1792, "ff_dim": 7168, "visual_cond": True},
                {"in_visual_dim": 4, "out_visual_dim": 4, "in_text_dim": 16, "in_text_dim2": 8, "time_dim": 16,
                 "model_dim": 32, "ff_dim": 64, "num_text_blocks": 1, "num_visual_blocks": 2, "axes_dims": (4, 6, 6),
                 "visual_cond": True},
                _identity_tail(()), None, short={"num_visual_blocks": 1},
                source="diffusers 0.42.1 Kandinsky5Transformer3DModel at the Lite config (kandinsky-5 configs: "
                "model_dim 1792, ff_dim 7168, 2 text and 32 visual blocks, visual_cond)",
                check="no converter: Kandinsky-5's own module names are diffusers' (ComfyUI maps its LoRAs bare "
                "and with `transformer.`)"),
        Variant("cosmos-predict2-2b-t2i", "cosmos", "Cosmos Predict2 2B Text2Image (Anima builds on it)",
                "CosmosTransformer3DModel",
                {"in_channels": 16, "out_channels": 16, "num_attention_heads": 16, "attention_head_dim": 128,
                 "num_layers": 28, "mlp_ratio": 4.0, "text_embed_dim": 1024, "adaln_lora_dim": 256,
                 "max_size": (128, 240, 240), "patch_size": (1, 2, 2), "rope_scale": (1.0, 4.0, 4.0),
                 "concat_padding_mask": True, "extra_pos_embed_type": None},
                {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 12,
                 "num_layers": 2, "mlp_ratio": 2.0, "text_embed_dim": 16, "adaln_lora_dim": 8,
                 "max_size": (8, 16, 16), "patch_size": (1, 2, 2), "rope_scale": (1.0, 4.0, 4.0),
                 "concat_padding_mask": True, "extra_pos_embed_type": None},
                _identity_tail(COSMOS_ROWS), "convert_cosmos_transformer_checkpoint_to_diffusers", prefix="net.",
                source="diffusers 0.42.1 CosmosTransformer3DModel at the config of diffusers "
                "scripts/convert_cosmos_to_diffusers.py (Cosmos-2.0-Diffusion-2B-Text2Image)"),
    )
}


def to_native(variant: Variant, state: dict[str, torch.Tensor], *, prefix: bool = True) -> dict[str, torch.Tensor]:
    """The native tensors of a diffusers state dict: renamed, fused bands concatenated in order."""
    compiled = [(re.compile(r.pattern), r) for r in variant.rows]
    bands: dict[str, dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for rx, row in compiled:
            m = rx.match(key)
            if m is None:
                continue
            native = m.expand(row.native) + key[m.end():]
            if row.swap:
                tensor = torch.cat(tensor.chunk(2, dim=0)[::-1])
            if row.lift:
                tensor = tensor.reshape(1, -1, 1, 1)
            if row.band is None:
                out[native] = tensor
            else:
                bands.setdefault(native, {})[row.band] = tensor
            break
    for native, parts in bands.items():
        out[native] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
    lead = variant.prefix if prefix else ""
    return {lead + k: v for k, v in sorted(out.items())}


def converter(variant: Variant) -> Callable[[dict], dict]:
    from diffusers.loaders import single_file_utils

    return getattr(single_file_utils, variant.converter)


def to_diffusers(variant: Variant, native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own single-file converter on a native dict (a copy).

    Stand-in for a hard-coded width: diffusers' HunyuanVideo converter splits `single_blocks.N.linear1`
    (q|k|v|mlp) at 3072 rows, the full model's width. A tiny model's linear1 is split here at its own width
    (q, k, v of H rows each, the rest mlp) into the diffusers names the converter would give; every other
    tensor goes through the converter. The full-width split is checked on the meta device instead
    (tests/test_video_layouts.py).
    """
    state = dict(native)
    if variant.family == "hunyuanvideo" and variant.converter:
        for key in [k for k in state if re.search(r"single_blocks\.\d+\.linear1\.", k)]:
            fused = state.pop(key)
            hidden = state[key.replace("linear1.", "linear2.").replace(".bias", ".weight")].shape[0]
            if hidden == 3072:
                state[key] = fused
                continue
            head, param = key.rsplit(".linear1.", 1)
            head = head.replace("single_blocks", "single_transformer_blocks")
            q, k, v, mlp = fused.split([hidden, hidden, hidden, fused.shape[0] - 3 * hidden])
            for name, part in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
                state[f"{head}.{name}.{param}"] = part
    return converter(variant)(state)


def build_model(variant: Variant, *, tiny: bool, short: bool = False, seed: int = 0):
    """The diffusers model: at full size on the meta device (`short`: one block of each kind), or tiny."""
    import diffusers

    cls = getattr(diffusers, variant.model)
    if not tiny:
        with torch.device("meta"):
            return cls(**dict(variant.config, **(variant.short if short else {})))
    torch.manual_seed(seed)
    model = cls(**variant.tiny)
    with torch.no_grad():  # zero-initialised parameters (scale_shift_table, ...) get values too
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def key_list(variant: Variant) -> dict:
    """The committed JSON of one variant: native names, shapes, and the check that produced them."""
    model = build_model(variant, tiny=False)
    state = model.state_dict()
    native = to_native(variant, state)
    if variant.converter is not None:
        back = converter(variant)(dict(native))
        assert sorted(back) == sorted(state), sorted(set(back) ^ set(state))[:10]
        for k, v in back.items():
            assert tuple(v.shape) == tuple(state[k].shape), k
    tensors = {k: {"component": "diffuser", "shape": list(v.shape), "dtype": "bfloat16"} for k, v in native.items()}
    return {
        "identifier": variant.name,
        "title": variant.title,
        "source": variant.source,
        "check": f"diffusers {variant.converter} maps these names back onto the model's state dict"
        if variant.converter else variant.check,
        "components": {"diffuser": len(tensors)},
        "tensors": tensors,
    }


def write_key_lists(names: list[str] | None = None) -> None:
    for name in names or list(VARIANTS):
        doc = key_list(VARIANTS[name])
        path = os.path.join(ARCH_DIR, f"{name}.json")
        with open(path, "w", encoding="utf-8") as fh:
            head = {k: v for k, v in doc.items() if k != "tensors"}
            fh.write(json.dumps(head)[:-1] + ', "tensors": {\n')
            rows = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in doc["tensors"].items()]
            fh.write(",\n".join(rows) + "\n}}\n")
        print(path, len(doc["tensors"]))


if __name__ == "__main__":
    import sys

    write_key_lists(sys.argv[1:] or None)


# ComfyUI's spelling of HunyuanVideo's Tencent names, as ComfyUI comfy/supported_models.py
# HunyuanVideo.process_unet_state_dict renames them on load (applied in this order).
COMFY_HUNYUAN_RENAMES = (
    ("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."),
    ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
    ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."),
    ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
    ("_mod.linear.", "_mod.lin."),
    ("_attn_qkv.", "_attn.qkv."),
    ("mlp.fc1.", "mlp.0."),
    ("mlp.fc2.", "mlp.2."),
    ("_attn_q_norm.weight", "_attn.norm.query_norm.scale"),
    ("_attn_k_norm.weight", "_attn.norm.key_norm.scale"),
    (".q_norm.weight", ".norm.query_norm.scale"),
    (".k_norm.weight", ".norm.key_norm.scale"),
    ("_attn_proj.", "_attn.proj."),
    (".modulation.linear.", ".modulation.lin."),
    ("_in.mlp.2.", "_in.out_layer."),
    ("_in.mlp.0.", "_in.in_layer."),
)


def comfy_hunyuan_name(key: str) -> str:
    for old, new in COMFY_HUNYUAN_RENAMES:
        key = key.replace(old, new)
    return key
