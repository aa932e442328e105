"""The rule table: one row per LoRA module stem seen in the wild -> the base key (and rows) it lands on.

Each row names the trainer/tool that writes that spelling. Below the rows, the names are cross-checked
against diffusers' own LDM/BFL/MMDiT -> diffusers converters over every key of the real checkpoints.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

from lorabake.detect import detect_checkpoint
from lorabake.keymap import KeyMap, build_keymap
from lorabake.types import RowSlice, Target
from tests.test_detect import SD1_OLD_CLIP, UNET_ROOT, diffusers_folder, info, infos, sd2_tensors, strip

U = UNET_ROOT
SD1_TE = "cond_stage_model.transformer.text_model."
SD2_TE = "cond_stage_model.model.transformer.resblocks."
XL_TE1 = "conditioner.embedders.0.transformer.text_model."
XL_TE2 = "conditioner.embedders.1.model."
CL = "text_encoders.clip_l.transformer.text_model."
CG = "text_encoders.clip_g.transformer.text_model."
T5 = "text_encoders.t5xxl.transformer."

BASES = {
    "sd1": lambda: infos("sd1"),
    "sd1-old-clip": lambda: infos("sd1", rename=lambda k: SD1_OLD_CLIP.get(k, k)),
    "sd2": sd2_tensors,
    "sdxl": lambda: infos("sdxl"),
    "sdxl-diffusers": lambda: diffusers_folder("sdxl"),
    "sd1-diffusers": lambda: diffusers_folder("sd1"),
    "sd3": lambda: infos("sd3"),
    "flux": lambda: infos("flux"),
    "flux-bfl": lambda: infos("flux", components={"diffuser"}, rename=strip(U)),
    "flux-diffusers": lambda: diffusers_folder("flux"),
}


@cache
def keymap(base: str) -> KeyMap:
    tensors = BASES[base]()
    return build_keymap(tensors, detect_checkpoint(tensors, {}))


# (base, stem, target key, (row start, row count) or None, transform) — comment: who writes it
ROWS = [
    # --- SD1 --------------------------------------------------------------------------------------------
    # kohya sd-scripts LoRA (diffusers module path, "_"-joined)
    ("sd1", "lora_unet_down_blocks_0_attentions_0_proj_in", U + "input_blocks.1.1.proj_in.weight", None, None),
    ("sd1", "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0",
     U + "input_blocks.2.1.transformer_blocks.0.attn1.to_out.0.weight", None, None),
    ("sd1", "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k",
     U + "output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight", None, None),
    ("sd1", "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
     U + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight", None, None),
    # kohya LoCon (conv_dim): resnets, down/upsamplers; SD1 up_blocks.0 has no attention -> upsampler at .1
    ("sd1", "lora_unet_down_blocks_1_resnets_0_conv1", U + "input_blocks.4.0.in_layers.2.weight", None, None),
    ("sd1", "lora_unet_down_blocks_1_resnets_0_conv_shortcut", U + "input_blocks.4.0.skip_connection.weight", None, None),
    ("sd1", "lora_unet_up_blocks_0_resnets_2_time_emb_proj", U + "output_blocks.2.0.emb_layers.1.weight", None, None),
    ("sd1", "lora_unet_down_blocks_0_downsamplers_0_conv", U + "input_blocks.3.0.op.weight", None, None),
    ("sd1", "lora_unet_up_blocks_0_upsamplers_0_conv", U + "output_blocks.2.1.conv.weight", None, None),
    ("sd1", "lora_unet_up_blocks_1_upsamplers_0_conv", U + "output_blocks.5.2.conv.weight", None, None),
    ("sd1", "lora_unet_mid_block_resnets_1_conv2", U + "middle_block.2.out_layers.3.weight", None, None),
    ("sd1", "lora_unet_conv_in", U + "input_blocks.0.0.weight", None, None),
    ("sd1", "lora_unet_conv_out", U + "out.2.weight", None, None),
    ("sd1", "lora_unet_time_embedding_linear_1", U + "time_embed.0.weight", None, None),
    # kohya TE; A1111-era SD1 files also say lora_te1_
    ("sd1", "lora_te_text_model_encoder_layers_0_self_attn_q_proj", SD1_TE + "encoder.layers.0.self_attn.q_proj.weight", None, None),
    ("sd1", "lora_te_text_model_encoder_layers_11_mlp_fc2", SD1_TE + "encoder.layers.11.mlp.fc2.weight", None, None),
    ("sd1", "lora_te1_text_model_encoder_layers_3_self_attn_k_proj", SD1_TE + "encoder.layers.3.self_attn.k_proj.weight", None, None),
    # diffusers old attention-processor LoRA (`…processor.to_q_lora.up.weight`), with and without `unet.`
    ("sd1", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q",
     U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", None, None),
    ("sd1", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out",
     U + "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.weight", None, None),
    # diffusers/PEFT (`lora_A/lora_B`), PEFT raw base_model.model.
    ("sd1", "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_v",
     U + "output_blocks.11.1.transformer_blocks.0.attn1.to_v.weight", None, None),
    ("sd1", "base_model.model.down_blocks.2.attentions.1.proj_out", U + "input_blocks.8.1.proj_out.weight", None, None),
    ("sd1", "unet.base_model.model.mid_block.resnets.1.conv2", U + "middle_block.2.out_layers.3.weight", None, None),
    ("sd1", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", SD1_TE + "encoder.layers.0.self_attn.q_proj.weight", None, None),
    # diffusers training scripts on transformers 5: CLIPTextModel lost its `text_model.` level
    ("sd1", "text_encoder.encoder.layers.0.self_attn.q_proj", SD1_TE + "encoder.layers.0.self_attn.q_proj.weight", None, None),
    ("sd1", "lora_te_encoder_layers_0_mlp_fc1", SD1_TE + "encoder.layers.0.mlp.fc1.weight", None, None),
    # LyCORIS wrapper / SimpleTuner
    ("sd1", "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",
     U + "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight", None, None),
    # ComfyUI generic dotted names; A1111 compvis-style lora_unet_ + LDM names (generic fallback)
    ("sd1", "diffusion_model.input_blocks.1.1.proj_in", U + "input_blocks.1.1.proj_in.weight", None, None),
    ("sd1", "text_encoders.clip_l.transformer.text_model.encoder.layers.5.mlp.fc1", SD1_TE + "encoder.layers.5.mlp.fc1.weight", None, None),
    ("sd1", "lora_unet_input_blocks_1_1_proj_in", U + "input_blocks.1.1.proj_in.weight", None, None),
    # old SD1 files without text_model: HF names still land (and the file's own names too)
    ("sd1-old-clip", "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
     "cond_stage_model.transformer.encoder.layers.0.self_attn.q_proj.weight", None, None),
    ("sd1-old-clip", "lora_te_encoder_layers_0_self_attn_q_proj",
     "cond_stage_model.transformer.encoder.layers.0.self_attn.q_proj.weight", None, None),
    # SD1 diffusers folder as base: kohya names are its own names
    ("sd1-diffusers", "lora_unet_down_blocks_0_attentions_0_proj_in", "unet.down_blocks.0.attentions.0.proj_in.weight", None, None),
    ("sd1-diffusers", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight", None, None),
    ("sd1-diffusers", "lora_te_text_model_encoder_layers_2_mlp_fc1", "text_encoder.text_model.encoder.layers.2.mlp.fc1.weight", None, None),
    # --- SD2 (OpenCLIP-H fused in_proj, d = 1024) --------------------------------------------------------
    ("sd2", "lora_te_text_model_encoder_layers_0_self_attn_q_proj", SD2_TE + "0.attn.in_proj_weight", (0, 1024), None),
    ("sd2", "lora_te_text_model_encoder_layers_0_self_attn_k_proj", SD2_TE + "0.attn.in_proj_weight", (1024, 1024), None),
    ("sd2", "lora_te_text_model_encoder_layers_0_self_attn_v_proj", SD2_TE + "0.attn.in_proj_weight", (2048, 1024), None),
    ("sd2", "lora_te_text_model_encoder_layers_22_self_attn_out_proj", SD2_TE + "22.attn.out_proj.weight", None, None),
    ("sd2", "lora_te_text_model_encoder_layers_5_mlp_fc1", SD2_TE + "5.mlp.c_fc.weight", None, None),
    ("sd2", "lora_te_text_model_encoder_layers_5_mlp_fc2", SD2_TE + "5.mlp.c_proj.weight", None, None),
    ("sd2", "text_encoder.text_model.encoder.layers.1.self_attn.v_proj", SD2_TE + "1.attn.in_proj_weight", (2048, 1024), None),
    ("sd2", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
     U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", None, None),
    ("sd2", "lora_unet_down_blocks_0_attentions_0_proj_in", U + "input_blocks.1.1.proj_in.weight", None, None),
    # --- SDXL ---------------------------------------------------------------------------------------------
    # kohya SDXL: SGM names
    ("sdxl", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
     U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", None, None),
    ("sdxl", "lora_unet_input_blocks_7_1_transformer_blocks_3_attn1_to_out_0",
     U + "input_blocks.7.1.transformer_blocks.3.attn1.to_out.0.weight", None, None),
    ("sdxl", "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2", U + "middle_block.1.transformer_blocks.9.ff.net.2.weight", None, None),
    ("sdxl", "lora_unet_output_blocks_2_2_conv", U + "output_blocks.2.2.conv.weight", None, None),
    ("sdxl", "lora_unet_label_emb_0_0", U + "label_emb.0.0.weight", None, None),
    # diffusers-named SDXL (diffusers, OneTrainer, sd-mecha sdxl-kohya_but_diffusers): 3 levels, up 0 and 1 attend
    ("sdxl", "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
     U + "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight", None, None),
    ("sdxl", "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v",
     U + "output_blocks.0.1.transformer_blocks.0.attn2.to_v.weight", None, None),
    ("sdxl", "unet.up_blocks.0.upsamplers.0.conv", U + "output_blocks.2.2.conv.weight", None, None),
    ("sdxl", "unet.up_blocks.1.upsamplers.0.conv", U + "output_blocks.5.2.conv.weight", None, None),
    ("sdxl", "lora_unet_add_embedding_linear_1", U + "label_emb.0.0.weight", None, None),
    # te1 = CLIP-L, te2 = OpenCLIP-G (fused in_proj, d = 1280)
    ("sdxl", "lora_te1_text_model_encoder_layers_11_self_attn_out_proj", XL_TE1 + "encoder.layers.11.self_attn.out_proj.weight", None, None),
    ("sdxl", "text_encoder.text_model.encoder.layers.0.mlp.fc1", XL_TE1 + "encoder.layers.0.mlp.fc1.weight", None, None),
    ("sdxl", "lora_te2_text_model_encoder_layers_31_self_attn_k_proj",
     XL_TE2 + "transformer.resblocks.31.attn.in_proj_weight", (1280, 1280), None),
    ("sdxl", "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
     XL_TE2 + "transformer.resblocks.0.attn.in_proj_weight", (0, 1280), None),
    ("sdxl", "lora_te2_text_model_encoder_layers_0_mlp_fc1", XL_TE2 + "transformer.resblocks.0.mlp.c_fc.weight", None, None),
    ("sdxl", "lora_te2_text_projection", XL_TE2 + "text_projection", None, "transpose"),  # OneTrainer
    # SDXL diffusers folder as base: kohya SGM names still land
    ("sdxl-diffusers", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
     "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", None, None),
    ("sdxl-diffusers", "lora_unet_output_blocks_2_2_conv", "unet.up_blocks.0.upsamplers.0.conv.weight", None, None),
    ("sdxl-diffusers", "lora_te2_text_model_encoder_layers_3_self_attn_q_proj",
     "text_encoder_2.text_model.encoder.layers.3.self_attn.q_proj.weight", None, None),
    # --- SD3 ----------------------------------------------------------------------------------------------
    # kohya lora_sd3.py: MMDiT names, fused qkv whole
    ("sd3", "lora_unet_joint_blocks_3_x_block_attn_qkv", U + "joint_blocks.3.x_block.attn.qkv.weight", None, None),
    ("sd3", "lora_unet_joint_blocks_0_context_block_adaLN_modulation_1",
     U + "joint_blocks.0.context_block.adaLN_modulation.1.weight", None, None),
    ("sd3", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", CL + "encoder.layers.0.self_attn.q_proj.weight", None, None),
    ("sd3", "lora_te2_text_model_encoder_layers_31_mlp_fc2", CG + "encoder.layers.31.mlp.fc2.weight", None, None),
    ("sd3", "lora_te3_encoder_block_0_layer_0_SelfAttention_q", T5 + "encoder.block.0.layer.0.SelfAttention.q.weight", None, None),
    ("sd3", "text_encoder_3.encoder.block.0.layer.1.DenseReluDense.wi_0",
     T5 + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", None, None),
    # diffusers / SimpleTuner / PEFT: q/k/v slices of qkv (H = 1536)
    ("sd3", "transformer.transformer_blocks.0.attn.to_q", U + "joint_blocks.0.x_block.attn.qkv.weight", (0, 1536), None),
    ("sd3", "transformer.transformer_blocks.5.attn.add_v_proj", U + "joint_blocks.5.context_block.attn.qkv.weight", (3072, 1536), None),
    ("sd3", "base_model.model.transformer_blocks.1.attn.to_add_out", U + "joint_blocks.1.context_block.attn.proj.weight", None, None),
    ("sd3", "lora_transformer_transformer_blocks_0_ff_context_net_0_proj",  # OneTrainer
     U + "joint_blocks.0.context_block.mlp.fc1.weight", None, None),
    ("sd3", "transformer.transformer_blocks.2.norm1_context.linear", U + "joint_blocks.2.context_block.adaLN_modulation.1.weight", None, None),
    ("sd3", "transformer.transformer_blocks.23.norm1_context.linear",  # context-pre-only last block
     U + "joint_blocks.23.context_block.adaLN_modulation.1.weight", None, "swap_halves"),
    ("sd3", "transformer.norm_out.linear", U + "final_layer.adaLN_modulation.1.weight", None, "swap_halves"),
    ("sd3", "transformer.proj_out", U + "final_layer.linear.weight", None, None),
    ("sd3", "transformer.pos_embed.proj", U + "x_embedder.proj.weight", None, None),
    ("sd3", "text_encoder_2.text_model.encoder.layers.4.self_attn.v_proj", CG + "encoder.layers.4.self_attn.v_proj.weight", None, None),
    # --- Flux ---------------------------------------------------------------------------------------------
    # kohya lora_flux.py: BFL names, fused layers whole; te1 = CLIP-L, te3 = T5 (OneTrainer: lora_te2_ = T5)
    ("flux", "lora_unet_double_blocks_0_img_attn_qkv", U + "double_blocks.0.img_attn.qkv.weight", None, None),
    ("flux", "lora_unet_single_blocks_7_linear1", U + "single_blocks.7.linear1.weight", None, None),
    ("flux", "lora_unet_double_blocks_18_txt_mod_lin", U + "double_blocks.18.txt_mod.lin.weight", None, None),
    ("flux", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", CL + "encoder.layers.0.self_attn.q_proj.weight", None, None),
    ("flux", "lora_te3_encoder_block_0_layer_0_SelfAttention_q", T5 + "encoder.block.0.layer.0.SelfAttention.q.weight", None, None),
    ("flux", "lora_te2_encoder_block_23_layer_1_DenseReluDense_wo", T5 + "encoder.block.23.layer.1.DenseReluDense.wo.weight", None, None),
    # diffusers / ai-toolkit / SimpleTuner: slices of img_attn.qkv, txt_attn.qkv, linear1 (H = 3072, M = 12288)
    ("flux", "transformer.transformer_blocks.0.attn.to_q", U + "double_blocks.0.img_attn.qkv.weight", (0, 3072), None),
    ("flux", "transformer.transformer_blocks.0.attn.to_k", U + "double_blocks.0.img_attn.qkv.weight", (3072, 3072), None),
    ("flux", "transformer.transformer_blocks.18.attn.add_v_proj", U + "double_blocks.18.txt_attn.qkv.weight", (6144, 3072), None),
    ("flux", "transformer.single_transformer_blocks.0.attn.to_v", U + "single_blocks.0.linear1.weight", (6144, 3072), None),
    ("flux", "transformer.single_transformer_blocks.37.proj_mlp", U + "single_blocks.37.linear1.weight", (9216, 12288), None),
    ("flux", "transformer.single_transformer_blocks.3.proj_out", U + "single_blocks.3.linear2.weight", None, None),
    ("flux", "transformer.norm_out.linear", U + "final_layer.adaLN_modulation.1.weight", None, "swap_halves"),
    ("flux", "transformer.transformer_blocks.4.attn.norm_added_k", U + "double_blocks.4.txt_attn.norm.key_norm.scale", None, None),
    ("flux", "transformer.x_embedder", U + "img_in.weight", None, None),
    ("flux", "transformer.time_text_embed.guidance_embedder.linear_2", U + "guidance_in.out_layer.weight", None, None),
    ("flux", "lycoris_transformer_blocks_0_ff_context_net_2", U + "double_blocks.0.txt_mlp.2.weight", None, None),
    ("flux", "lora_transformer_single_transformer_blocks_0_norm_linear", U + "single_blocks.0.modulation.lin.weight", None, None),
    ("flux", "transformer_blocks.0.attn.to_out.0", U + "double_blocks.0.img_attn.proj.weight", None, None),  # DiffSynth
    ("flux", "diffusion_model.double_blocks.0.img_attn.qkv", U + "double_blocks.0.img_attn.qkv.weight", None, None),  # ComfyUI
    ("flux", "diffusion_model.single_blocks.0.linear1_qkv", U + "single_blocks.0.linear1.weight", (0, 9216), None),  # ComfyUI/USO
    ("flux", "double_blocks.5.processor.qkv_lora2", U + "double_blocks.5.txt_attn.qkv.weight", None, None),  # XLabs
    ("flux", "single_blocks.1.processor.qkv_lora", U + "single_blocks.1.linear1.weight", (0, 9216), None),  # XLabs
    ("flux", "double_blocks.0.img_attn.norm.query_norm", U + "double_blocks.0.img_attn.norm.query_norm.scale", None, None),  # BFL control
    ("flux", "text_encoder.text_model.encoder.layers.1.mlp.fc2", CL + "encoder.layers.1.mlp.fc2.weight", None, None),
    # Flux as BFL ships it (no prefix in the base)
    ("flux-bfl", "lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv.weight", None, None),
    ("flux-bfl", "transformer.single_transformer_blocks.2.attn.to_k", "single_blocks.2.linear1.weight", (3072, 3072), None),
    # Flux diffusers folder as base: its own names
    ("flux-diffusers", "transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_q.weight", None, None),
    ("flux-diffusers", "lora_transformer_single_transformer_blocks_0_proj_mlp",
     "transformer.single_transformer_blocks.0.proj_mlp.weight", None, None),
]


@pytest.mark.parametrize("base, stem, key, rows, transform", ROWS, ids=[f"{r[0]}:{r[1]}" for r in ROWS])
def test_stem_lands_on(base, stem, key, rows, transform):
    target = keymap(base).targets.get(stem)
    assert target is not None, f"{stem} not accepted by the {base} base"
    assert target.key == key
    assert target.slice == (RowSlice(*rows) if rows else None)
    assert target.transform == transform


# --- bias keys, components, scoping ---------------------------------------------------------------------

BIAS_ROWS = [
    ("sd1", "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0",
     U + "input_blocks.2.1.transformer_blocks.0.attn1.to_out.0.bias"),
    ("sd1", "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q", None),  # to_q has no bias
    ("sd2", "lora_te_text_model_encoder_layers_0_self_attn_k_proj", SD2_TE + "0.attn.in_proj_bias"),  # same slice
    ("flux", "transformer.transformer_blocks.0.attn.to_q", U + "double_blocks.0.img_attn.qkv.bias"),
    ("flux", "transformer.transformer_blocks.0.attn.norm_q", None),  # RMSNorm .scale
    ("sd3", "lora_te3_encoder_block_0_layer_0_SelfAttention_q", None),  # T5 linears have no bias
]


@pytest.mark.parametrize("base, stem, bias_key", BIAS_ROWS)
def test_bias_key(base, stem, bias_key):
    assert keymap(base).targets[stem].bias_key == bias_key


COMPONENT_ROWS = [
    # (base, stem, component_of, in targets?)
    ("sd1", "lora_unet_down_blocks_0_attentions_0_proj_in", "unet", True),
    ("sd1", "lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "te2", False),  # SDXL LoRA on SD1
    ("sd1", "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj", "te2", False),
    ("sd1", "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q", "unet", False),  # SDXL depth
    ("sdxl", "lora_te3_encoder_block_0_layer_0_SelfAttention_q", "te3", False),
    # CLIP-L has 12 layers; layer 12 exists only in OpenCLIP-G: never map a te1 name into te2
    ("sdxl", "lora_te1_text_model_encoder_layers_12_self_attn_q_proj", "te1", False),
    ("flux", "lora_unet_double_blocks_0_img_attn_qkv", "dit", True),
    ("flux", "lora_te2_encoder_block_0_layer_0_SelfAttention_q", "te3", True),  # OneTrainer T5
    ("flux", "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q", "te3", True),  # diffusers Flux T5
    ("flux", "lora_unet_joint_blocks_0_x_block_attn_qkv", "dit", False),  # SD3 LoRA on Flux
    ("flux-bfl", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "te1", False),  # base has no TE
    ("sd3", "transformer.transformer_blocks.23.attn.to_add_out", "dit", False),  # pre-only block has none
    ("sd3", "something_else", None, False),
]


@pytest.mark.parametrize("base, stem, component, accepted", COMPONENT_ROWS)
def test_component_of(base, stem, component, accepted):
    km = keymap(base)
    assert km.component_of(stem) == component
    assert (stem in km.targets) is accepted


def test_components_present():
    assert keymap("sdxl").components_present == {"unet", "te1", "te2", "vae"}
    assert keymap("flux-bfl").components_present == {"dit"}


def test_targets_are_weights_never_biases_or_vae():
    for base in BASES:
        km = keymap(base)
        keys = {t.key for t in km.targets.values()}
        assert not any(k.endswith((".bias", "in_proj_bias")) for k in keys), base
        assert not any(k.startswith(("first_stage_model.", "vae.", "model_ema.")) for k in keys), base


@pytest.mark.parametrize("base", list(BASES))
def test_table_has_no_conflicting_aliases(base):
    km = keymap(base)
    assert km.ambiguous == {}
    # the only names an explicit row takes over from the checkpoint's own: OpenCLIP's raw text_projection
    assert all(s.endswith("text_projection") for s in km.shadowed)


def test_every_weight_of_every_component_is_reachable():
    for base in ("sd1", "sdxl", "sd3", "flux"):
        tensors = BASES[base]()
        km = keymap(base)
        reached = {t.key for t in km.targets.values()}
        for key, t in tensors.items():
            if t.dtype in ("F32", "F16", "BF16") and t.shape and key.endswith((".weight", ".scale", "in_proj_weight")):
                if key.startswith((U, "cond_stage_model.", "conditioner.", "text_encoders.")):
                    assert key in reached, key


def test_generic_fallback_covers_families_without_a_table():
    # Lumina-like DiT under model.diffusion_model.: LoRAs named after the checkpoint's own keys still land
    names = {
        U + "layers.0.attention.qkv.weight": (6912, 2304),
        U + "layers.0.attention.qkv.bias": (6912,),
        U + "layers.0.feed_forward.w1.weight": (6144, 2304),
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096),
    }
    tensors = {k: info(k, s) for k, s in names.items()}
    km = build_keymap(tensors, detect_checkpoint(tensors, {}))
    assert km.arch == "unknown"
    assert km.targets["lora_unet_layers_0_attention_qkv"] == Target(
        U + "layers.0.attention.qkv.weight", "dit", U + "layers.0.attention.qkv.bias"
    )
    assert km.targets["diffusion_model.layers.0.feed_forward.w1"].key == U + "layers.0.feed_forward.w1.weight"
    assert km.targets["lora_te3_encoder_block_0_layer_0_SelfAttention_q"].component == "te3"


# --- kohya names (what extraction writes), and they load back -------------------------------------------

KOHYA_ROWS = [
    ("sd1", U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
     ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",)),
    ("sd1", U + "input_blocks.4.0.in_layers.2.weight", ("lora_unet_down_blocks_1_resnets_0_conv1",)),
    ("sd1", SD1_TE + "encoder.layers.0.self_attn.q_proj.weight", ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",)),
    ("sd2", SD2_TE + "3.attn.in_proj_weight", tuple(
        f"lora_te_text_model_encoder_layers_3_self_attn_{p}_proj" for p in "qkv")),
    ("sdxl", U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
     ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",)),
    ("sdxl", XL_TE1 + "encoder.layers.0.mlp.fc1.weight", ("lora_te1_text_model_encoder_layers_0_mlp_fc1",)),
    ("sdxl", XL_TE2 + "transformer.resblocks.0.attn.in_proj_weight", tuple(
        f"lora_te2_text_model_encoder_layers_0_self_attn_{p}_proj" for p in "qkv")),
    ("sdxl", XL_TE2 + "transformer.resblocks.0.mlp.c_proj.weight", ("lora_te2_text_model_encoder_layers_0_mlp_fc2",)),
    ("sdxl-diffusers", "unet.down_blocks.1.attentions.0.proj_in.weight", ("lora_unet_input_blocks_4_1_proj_in",)),
    ("sd3", U + "joint_blocks.0.x_block.attn.qkv.weight", ("lora_unet_joint_blocks_0_x_block_attn_qkv",)),
    ("sd3", T5 + "encoder.block.0.layer.0.SelfAttention.q.weight", ("lora_te3_encoder_block_0_layer_0_SelfAttention_q",)),
    ("flux", U + "double_blocks.0.img_attn.qkv.weight", ("lora_unet_double_blocks_0_img_attn_qkv",)),
    ("flux", U + "single_blocks.0.linear1.weight", ("lora_unet_single_blocks_0_linear1",)),
    ("flux", CL + "encoder.layers.0.self_attn.q_proj.weight", ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",)),
    ("flux", T5 + "encoder.block.0.layer.0.SelfAttention.q.weight", ("lora_te3_encoder_block_0_layer_0_SelfAttention_q",)),
    ("flux-diffusers", "transformer.transformer_blocks.0.attn.to_q.weight", ("lora_unet_transformer_blocks_0_attn_to_q",)),
]


@pytest.mark.parametrize("base, key, stems", KOHYA_ROWS)
def test_kohya_names(base, key, stems):
    km = keymap(base)
    assert km.kohya_names[key] == stems
    assert km.kohya_stem(key, len(stems) - 1) == stems[-1]


@pytest.mark.parametrize("base", list(BASES))
def test_kohya_names_load_back_onto_their_key(base):
    km = keymap(base)
    assert km.kohya_names
    for key, stems in km.kohya_names.items():
        for stem in stems:
            assert km.targets[stem].key == key


# --- cross-check against diffusers' own converters ------------------------------------------------------


def _tagged(tensors: dict, base_index: dict[str, int]) -> dict[str, torch.Tensor]:
    """Each tensor as a column of (key number · 1e6 + row index), so converted rows tell their origin."""
    out = {}
    for key, t in tensors.items():
        rows = t.shape[0] if t.shape else 1
        col = torch.arange(rows, dtype=torch.float64) + base_index[key] * 1e6
        out[key] = col.unsqueeze(1) if len(t.shape) >= 2 else col
    return out


def _origin(value: torch.Tensor, names: list[str]) -> tuple[str, int, int, bool]:
    """(source key, first row, row count, halves swapped) of a converted tagged tensor."""
    flat = value.flatten()
    index = int(flat[0].item() // 1e6)
    rows = (flat - index * 1e6).long().tolist()
    n = len(rows)
    if rows == list(range(rows[0], rows[0] + n)):
        return names[index], rows[0], n, False
    half = n // 2
    assert rows == list(range(half, n)) + list(range(half)), "neither a slice nor swapped halves"
    return names[index], 0, n, True


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_unet_aliases_equal_diffusers_single_file_conversion(arch):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    tensors = infos(arch)
    km = keymap(arch)
    unet = {k: k for k in tensors if k.startswith(U)}
    config = {"layers_per_block": 2, **({"addition_embed_type": "text_time"} if arch == "sdxl" else {})}
    converted = convert_ldm_unet_checkpoint(unet, config)
    checked = 0
    for diffusers_key, ldm_key in converted.items():
        if not diffusers_key.endswith(".weight"):
            continue
        module = diffusers_key[: -len(".weight")]
        for stem in ("unet." + module, "lora_unet_" + module.replace(".", "_")):
            assert km.targets[stem].key == ldm_key, stem
        checked += 1
    assert checked == sum(1 for k in unet if k.endswith(".weight"))


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_dit_aliases_equal_diffusers_single_file_conversion(arch):
    from diffusers.loaders import single_file_utils as sfu

    convert = {
        "sd3": sfu.convert_sd3_transformer_checkpoint_to_diffusers,
        "flux": sfu.convert_flux_transformer_checkpoint_to_diffusers,
    }[arch]
    tensors = {k: t for k, t in infos(arch).items() if k.startswith(U)}
    names = list(tensors)
    converted = convert(_tagged(tensors, {k: i for i, k in enumerate(names)}))
    km = keymap(arch)
    checked = 0
    for diffusers_key, value in converted.items():
        if not diffusers_key.endswith(".weight"):
            continue
        source, start, length, swapped = _origin(value, names)
        target = km.targets["transformer." + diffusers_key[: -len(".weight")]]
        assert target.key == source, diffusers_key
        whole = tensors[source].shape[0] if tensors[source].shape else 1
        expected_slice = None if length == whole else RowSlice(start, length)
        assert target.slice == expected_slice, diffusers_key
        assert target.transform == ("swap_halves" if swapped else None), diffusers_key
        checked += 1
    assert checked > (300 if arch == "flux" else 200)


@pytest.mark.parametrize("base, prefix, diffusers_prefix", [("sd2", "cond_stage_model.model.", "text_encoder."),
                                                           ("sdxl", XL_TE2, "text_encoder_2.")])
def test_openclip_aliases_equal_diffusers_conversion(base, prefix, diffusers_prefix):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    tensors = {k: t for k, t in BASES[base]().items() if k.startswith(prefix)}
    names = list(tensors)
    tagged = _tagged(tensors, {k: i for i, k in enumerate(names)})
    # text_proj_dim is read from text_projection's rows; keep its real (square) shape
    proj = prefix + "text_projection"
    tagged[proj] = tagged[proj].expand(-1, tensors[proj].shape[1]).contiguous()
    converted = convert_open_clip_checkpoint(None, tagged, prefix=prefix)
    km = keymap(base)
    checked = 0
    for diffusers_key, value in converted.items():
        if not diffusers_key.endswith(".weight"):
            continue
        module = diffusers_key[: -len(".weight")]
        target = km.targets[diffusers_prefix + module]
        if module == "text_projection":
            assert (target.key, target.transform) == (proj, "transpose")
            continue
        if value.dim() == 2 and value.shape[1] > 1:  # an embedding kept 2-D by the converter
            value = value[:, 0]
        source, start, length, _ = _origin(value, names)
        assert target.key == source, diffusers_key
        whole = tensors[source].shape[0]
        assert target.slice == (None if length == whole else RowSlice(start, length)), diffusers_key
        checked += 1
    assert checked > 100


def test_kohya_flux_names_equal_diffusers_kohya_conversion():
    """Our kohya Flux stems, converted by diffusers' kohya->diffusers converter, land on the same rows."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    km = keymap("flux")
    rank = 2
    lora = {}
    for key, stems in km.kohya_names.items():
        if not key.startswith(U) or not key.endswith(".weight"):
            continue
        if ".double_blocks.0." not in key and ".single_blocks.0." not in key:
            continue
        rows = infos("flux")[key].shape[0]
        (stem,) = stems
        lora[stem + ".lora_down.weight"] = torch.zeros(rank, 4)
        lora[stem + ".lora_up.weight"] = torch.arange(rows, dtype=torch.float64).unsqueeze(1).expand(-1, rank)
        lora[stem + ".alpha"] = torch.tensor(float(rank))
    converted = _convert_kohya_flux_lora_to_diffusers(dict(lora))
    checked = 0
    for name, value in converted.items():
        if not name.endswith(".lora_B.weight"):
            continue
        stem = name[: -len(".lora_B.weight")]
        target = km.targets[stem]
        first = int(value[0, 0].item())
        whole = infos("flux")[target.key].shape[0]
        expected = None if value.shape[0] == whole else RowSlice(first, value.shape[0])
        assert target.slice == expected, stem
        checked += 1
    assert checked >= 10
