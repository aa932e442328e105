"""lorabake.lora_base: which family a LoRA is for, by matching every family's rule table against it.

Rows are LoRAs trainers write (real names and shapes from tests/data/arch); the expected family is the
one whose virtual checkpoint leaves the fewest modules unmatched.
"""

from __future__ import annotations

import pytest

from lorabake.arch import FAMILIES
from lorabake.lora_base import identify, module_component_hint
from lorabake.lora_format import parse_lora
from tests.archfix import arch_tensors
from tests.lorafix import header_of, make_lora
from tests.test_lora_format import FLUX_QKV, dotted_mods, kohya_mods, parse

# Chroma shares FLUX.1's block names and widths; a FLUX.1 LoRA is told apart by the per-block modulation
# (img_mod / norm1) that FLUX.1 trainers also train and Chroma does not have.
FLUX_ONLY = [*FLUX_QKV, "model.diffusion_model.double_blocks.0.img_mod.lin.weight"]
FLUX_MOD = ("transformer.transformer_blocks.0.norm1.linear", 18432, 3072)

# --------------------------------------------------------------------------------------------
# a LoRA alone: metadata decides only when no rule table matches
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "arch"),
    [
        ({"ss_base_model_version": "sd_v1"}, "sd1"),
        ({"ss_base_model_version": "sd_v2_v"}, "sd2"),
        ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
        ({"ss_base_model_version": "sd3"}, "sd3"),
        ({"ss_base_model_version": "flux1"}, "flux"),
        ({"ss_v2": "True"}, "sd2"),
        ({"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd1"),
        ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2"),
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
        ({"modelspec.architecture": "stable-diffusion-3-medium/lora"}, "sd3"),
        ({"modelspec.architecture": "flux-1-dev/lora"}, "flux"),
        # modelspec is read before ss_*
        ({"modelspec.architecture": "flux-1-dev/lora", "ss_base_model_version": "sd_v1"}, "flux"),
    ],
)
def test_arch_from_metadata(metadata, arch):
    f = parse(make_lora([("lora_unet_x", 8, 8)]), metadata)
    assert (f.arch, f.arch_source, f.arch_note) == (arch, "metadata", None)


def _sd3_mods():
    return kohya_mods("sd3", ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
                              "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight"], "lora_unet_")


@pytest.mark.parametrize(
    ("modules", "naming", "arch", "source"),
    [
        # kohya Flux (lora_flux.py): BFL names
        (lambda: kohya_mods("flux", FLUX_ONLY, "lora_unet_"), "kohya", "flux", "rule tables"),
        # diffusers Flux
        (lambda: [("transformer.single_transformer_blocks.0.proj_mlp", 12288, 3072), FLUX_MOD], "peft", "flux", "rule tables"),
        # XLabs-style BFL names without prefix
        (lambda: dotted_mods("flux", FLUX_ONLY, ""), "peft", "flux", "rule tables"),
        # kohya SD3 (lora_sd3.py)
        (_sd3_mods, "kohya", "sd3", "rule tables"),
        # kohya SDXL: SGM names; transformer depth 2 at input_blocks.4.1 exists only in SDXL
        (lambda: kohya_mods("sdxl", ["model.diffusion_model.input_blocks.4.1.proj_in.weight",
                                     "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight"],
                            "lora_unet_"), "kohya", "sdxl", "rule tables"),
        # SDXL in diffusers names: cross-attn to_k reads the 2048-wide text embedding
        (lambda: [("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 640, 2048)], "diffusers", "sdxl", "rule tables"),
        # ComfyUI-generic SD1 with LDM names: to_k in-dim 768 (real shape from sd1-ldm.json)
        (lambda: dotted_mods("sd1", ["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"],
                             "diffusion_model."), "kohya", "sd1", "rule tables"),
        # kohya SD1/SD2 use diffusers names; only to_k's width tells them apart
        (lambda: [("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768)], "kohya", "sd1", "rule tables"),
        (lambda: [("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 1024)], "kohya", "sd2", "rule tables"),
        # old attn-proc spelling
        (lambda: [("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k", 320, 1024)],
         "diffusers_old", "sd2", "rule tables"),
        # SD2 TE-only LoRA: OpenCLIP-H width 1024
        (lambda: [("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 1024, 1024)], "kohya", "sd2", "rule tables"),
        # diffusers Flux double blocks only: width 3072
        (lambda: [("transformer.transformer_blocks.0.attn.to_q", 3072, 3072), FLUX_MOD], "peft", "flux", "rule tables"),
        # OneTrainer Flux, double blocks only
        (lambda: [("lora_transformer_transformer_blocks_0_attn_to_q", 3072, 3072),
                  ("lora_transformer_transformer_blocks_0_norm1_linear", 18432, 3072)], "kohya", "flux", "rule tables"),
        # diffusers SD3 medium: width 1536
        (lambda: [("transformer.transformer_blocks.0.attn.to_q", 1536, 1536)], "peft", "sd3", "rule tables"),
        # SDXL: te1 CLIP-L and te2 CLIP-G (SD3 has the same pair, see TIES) with one UNet module only SDXL has
        (lambda: [("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
                  ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280),
                  ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q", 640, 640)], "kohya", "sdxl", "rule tables"),
    ],
)
def test_arch_from_tensors(modules, naming, arch, source):
    f = parse(make_lora(modules(), naming=naming, conv3x3=True))
    assert (f.arch, f.arch_source, f.arch_note) == (arch, source, None)


def test_rule_tables_win_over_disagreeing_metadata_with_a_note():
    # the rule: fewest modules unmatched wins, metadata only breaks ties (0.1 let metadata win)
    f = parse(make_lora(kohya_mods("flux", FLUX_ONLY, "lora_unet_")), {"ss_base_model_version": "sdxl_base_v1-0"})
    assert (f.arch, f.arch_source) == ("flux", "rule tables")
    assert "flux" in f.arch_note and "sdxl" in f.arch_note


# (why, modules, metadata, candidates that tie): a real tie is reported with its candidates
TIES = [
    # a resnet conv of the first level: the same name and shape in SD1, SD2 and SDXL
    ("first-level resnet", [("lora_unet_down_blocks_0_resnets_0_conv1", 320, 320, 3)], {"sd1", "sd2", "sdxl"}),
    # CLIP-G te2 alone: SDXL, SD3 and HiDream-I1 all have it as lora_te2_
    ("te2 alone", [("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280)], {"sdxl", "sd3", "hidream"}),
]


@pytest.mark.parametrize("why, modules, tied", TIES, ids=[t[0] for t in TIES])
def test_a_real_tie_is_ambiguous_and_metadata_breaks_it(why, modules, tied):
    tensors = make_lora(modules, conv3x3=True)
    header = header_of(tensors)
    lora, match = identify(parse_lora(header, {}), header)
    assert (lora.arch, lora.arch_source, match.ambiguous) == ("unknown", None, True)
    assert {c.arch for c in match.candidates if c.unmatched == 0} == tied
    assert "ambiguous" in lora.arch_note and all(a in lora.arch_note for a in tied)
    for arch in tied:  # metadata naming one of them breaks the tie
        kohya = FAMILIES[arch].kohya
        f = parse(tensors, {"ss_base_model_version": kohya})
        assert (f.arch, f.arch_source, f.arch_note) == (arch, "rule tables", None)


def _ldm_sd1_kohya() -> list[tuple]:
    """A kohya LoRA named after the SD1 LDM checkpoint (`lora_unet_output_blocks_…`), real shapes."""
    names = [k for k in arch_tensors("sd1") if k.startswith("model.diffusion_model.")
             and k.endswith(("attn1.to_q.weight", "attn2.to_k.weight", "proj_in.weight"))]
    return kohya_mods("sd1", names, "lora_unet_")


def test_ldm_named_sd1_kohya_lora_without_metadata_is_sd1():
    # 0.1 called it SDXL (its regex took `lora_unet_output_blocks_` for SGM names) and merge refused it
    f = parse(make_lora(_ldm_sd1_kohya()))
    assert (f.arch, f.arch_source, f.arch_note) == ("sd1", "rule tables", None)


def _qwen_image_like() -> list[tuple]:
    """Qwen-Image's diffusers names and widths (60 blocks of width 3072, img/txt MLPs and modulation)."""
    out = []
    for n in range(60):
        b = f"transformer.transformer_blocks.{n}."
        out += [(b + p, 3072, 3072) for p in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj",
                                              "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out")]
        out += [(b + "img_mlp.net.0.proj", 12288, 3072), (b + "img_mlp.net.2", 3072, 12288),
                (b + "txt_mlp.net.0.proj", 12288, 3072), (b + "txt_mlp.net.2", 3072, 12288),
                (b + "img_mod.1", 18432, 3072), (b + "txt_mod.1", 18432, 3072)]
    return out


def test_qwen_image_shaped_lora_is_not_flux():
    # 0.1 called it flux because its width is 3072; Flux's table matches only its first 19 blocks' attention
    header = header_of(make_lora(_qwen_image_like(), naming="peft", rank=2))
    f, match = identify(parse_lora(header, {}), header)
    assert f.arch != "flux"
    # with the Qwen-Image family module (lorabake/arch/qwen_image.py) it is matched to its own family
    assert f.arch == "qwen-image" and f.arch_source == "rule tables"
    assert match.candidates[0].arch == "qwen-image" and match.candidates[0].unmatched == 0




@pytest.mark.parametrize(
    ("stem", "component"),
    [
        ("lora_unet_down_blocks_0_attentions_0_proj_in", "unet"),
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", "unet"),
        ("lora_unet_double_blocks_0_img_attn_qkv", "dit"),
        ("lora_unet_joint_blocks_3_x_block_attn_qkv", "dit"),
        ("lora_transformer_transformer_blocks_0_attn_to_q", "dit"),
        ("lora_te_text_model_encoder_layers_3_self_attn_q_proj", "te1"),
        ("lora_te1_text_model_encoder_layers_3_self_attn_q_proj", "te1"),
        ("lora_te2_text_model_encoder_layers_3_self_attn_q_proj", "te2"),
        ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", "te3"),
        ("unet.down_blocks.0.attentions.0.proj_in", "unet"),
        ("transformer.single_transformer_blocks.0.attn.to_q", "dit"),
        ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "te1"),
        ("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj", "te2"),
        ("text_encoder_3.encoder.block.0.layer.0.SelfAttention.q", "te3"),
        ("diffusion_model.double_blocks.0.img_attn.qkv", "dit"),
        ("diffusion_model.input_blocks.1.1.proj_in", "unet"),
        ("text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj", "te2"),
        ("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q", "te3"),
        ("double_blocks.0.processor.qkv_lora1", "dit"),
        ("transformer_blocks.0.attn.to_q", "dit"),
        ("base_model.model.down_blocks.0.attentions.0.proj_in", None),
        ("something_else", None),
    ],
)
def test_module_component_hint(stem, component):
    # from the prefix alone; DiT top-level names come from the registry
    assert module_component_hint(stem) == component


