"""lora_format: suffix grammar, module grouping, shape checks, flavours, metadata alphas.

Header-only: tensors are built with tests/lorafix.py and turned into TensorInfo without files,
except where the file path matters. Stems come from real checkpoint names (tests/archfix.py).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from lorabake.errors import LoraFormatError
from lorabake.lora_base import identify
from lorabake.lora_format import (
    ALGORITHMS,
    PART_NAMES,
    SUFFIXES,
    LoraFile,
    looks_like_lora,
    parse_lora,
    split_key,
)
from lorabake.st_header import read_header
from tests.archfix import arch_tensors
from tests.lorafix import fake_header, header_of, make_lora, save_lora


def kohya_mods(arch: str, names: list[str], prefix: str, root: str = "model.diffusion_model.") -> list[tuple]:
    """(stem, out, in[, kernel]) for real weight names, spelled kohya-style (`.` -> `_`)."""
    spec = arch_tensors(arch)
    out = []
    for name in names:
        shape = spec[name]["shape"]
        stem = prefix + name.removeprefix(root).removesuffix(".weight").replace(".", "_")
        out.append((stem, shape[0], shape[1], *(shape[2:3])))
    return out


def dotted_mods(arch: str, names: list[str], prefix: str, root: str = "model.diffusion_model.") -> list[tuple]:
    spec = arch_tensors(arch)
    return [
        (prefix + n.removeprefix(root).removesuffix(".weight"), *spec[n]["shape"][:2], *spec[n]["shape"][2:3])
        for n in names
    ]


def parse(tensors, metadata=None, path="x.safetensors") -> LoraFile:
    """parse_lora, then the family by matching (lorabake.lora_base), as `inspect` of a LoRA alone does."""
    header = header_of(tensors)
    return identify(parse_lora(header, metadata or {}, path=path), header)[0]


# --------------------------------------------------------------------------------------------
# 1. suffix grammar: one row per key shape seen in the wild
# --------------------------------------------------------------------------------------------

SPLIT_ROWS = [
    # kohya sd-scripts networks/lora.py, SD1 UNet (diffusers module path with `_`)
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", "lora_unet_down_blocks_0_attentions_0_proj_in", "up"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "lora_unet_down_blocks_0_attentions_0_proj_in", "down"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.alpha", "lora_unet_down_blocks_0_attentions_0_proj_in", "alpha"),
    # kohya TE
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "up"),
    # A1111 `.scale` override
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.scale", "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "scale"),
    # LyCORIS LoCon Tucker core, DoRA
    ("lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight", "lora_unet_down_blocks_0_resnets_0_conv1", "mid"),
    ("lora_unet_down_blocks_0_resnets_0_conv1.dora_scale", "lora_unet_down_blocks_0_resnets_0_conv1", "dora_scale"),
    # LyCORIS LoHa / LoKr (kohya prefix)
    *[(f"lora_unet_mid_block_attentions_0_proj_out.{p}", "lora_unet_mid_block_attentions_0_proj_out", p)
      for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")],
    # LyCORIS full / norm; ComfyUI bias diff
    ("lycoris_down_blocks_1_attentions_0_proj_in.diff", "lycoris_down_blocks_1_attentions_0_proj_in", "diff"),
    ("lycoris_down_blocks_1_attentions_0_proj_in.diff_b", "lycoris_down_blocks_1_attentions_0_proj_in", "diff_b"),
    ("lycoris_down_blocks_1_attentions_0_norm.w_norm", "lycoris_down_blocks_1_attentions_0_norm", "w_norm"),
    ("lycoris_down_blocks_1_attentions_0_norm.b_norm", "lycoris_down_blocks_1_attentions_0_norm", "b_norm"),
    # kohya oft.py, old LyCORIS oft_diag, LyCORIS rescale
    ("oft_unet_input_blocks_4_1_proj_in.oft_blocks", "oft_unet_input_blocks_4_1_proj_in", "oft_blocks"),
    ("lora_unet_x.oft_diag", "lora_unet_x", "oft_diag"),
    ("lora_unet_x.rescale", "lora_unet_x", "rescale"),
    # LyCORIS GLoRA (Linear weights)
    ("lora_unet_x.a1.weight", "lora_unet_x", "glora_a1"),
    ("lora_unet_x.a2.weight", "lora_unet_x", "glora_a2"),
    ("lora_unet_x.b1.weight", "lora_unet_x", "glora_b1"),
    ("lora_unet_x.b2.weight", "lora_unet_x", "glora_b2"),
    # diffusers Flux pipeline / ai-toolkit: PEFT spelling
    ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", "transformer.single_transformer_blocks.0.attn.to_q", "down"),
    ("transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight", "transformer.single_transformer_blocks.0.attn.to_q", "up"),
    # raw PEFT dump with adapter name; DiffSynth `.default`; `default_0`
    ("base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.default.weight", "base_model.model.down_blocks.0.attentions.0.proj_in", "down"),
    ("transformer_blocks.0.attn.to_q.lora_B.default_0.weight", "transformer_blocks.0.attn.to_q", "up"),
    # BFL Flux control LoRA: lora_B bias, reshape_weight; ComfyUI set_weight
    ("img_in.lora_B.bias", "img_in", "up_bias"),
    ("img_in.reshape_weight", "img_in", "reshape_weight"),
    ("double_blocks.0.img_attn.norm.key_norm.set_weight", "double_blocks.0.img_attn.norm.key_norm", "set_weight"),
    # Mochi-style PEFT without `.weight`
    ("transformer_blocks.0.attn1.to_q.lora_A", "transformer_blocks.0.attn1.to_q", "down"),
    ("transformer_blocks.0.attn1.to_q.lora_B", "transformer_blocks.0.attn1.to_q", "up"),
    # PEFT DoRA magnitude: saved spelling and raw spelling
    ("transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector", "transformer.transformer_blocks.0.attn.to_q", "magnitude"),
    ("transformer_blocks.0.attn.to_q.lora_magnitude_vector.default.weight", "transformer_blocks.0.attn.to_q", "magnitude"),
    # diffusers save format, UNet attention (PEFT_TO_DIFFUSERS)
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight", "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "down"),
    # diffusers TE
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "up"),
    # old diffusers attention processors (the stem keeps `processor.to_*`)
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight", "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q", "up"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out", "down"),
    # old diffusers TE (DIFFUSERS_OLD_TO_DIFFUSERS)
    ("text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight", "text_encoder.text_model.encoder.layers.0.self_attn.to_q", "up"),
    # XLabs Flux: double blocks `qkv_lora1`, single blocks `qkv_lora` (not attn-proc `_lora.`)
    ("double_blocks.0.processor.qkv_lora1.down.weight", "double_blocks.0.processor.qkv_lora1", "down"),
    ("single_blocks.1.processor.qkv_lora.up.weight", "single_blocks.1.processor.qkv_lora", "up"),
    ("single_blocks.1.processor.proj_lora.down.weight", "single_blocks.1.processor.proj_lora", "down"),
    # ComfyUI generic dotted
    ("diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight", "diffusion_model.double_blocks.0.img_attn.qkv", "up"),
    # kohya Flux T5 keeps case
    ("lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight", "lora_te3_encoder_block_0_layer_0_SelfAttention_q", "down"),
]


@pytest.mark.parametrize(("key", "stem", "part"), SPLIT_ROWS)
def test_split_key(key, stem, part):
    assert split_key(key) == (stem, part)


UNKNOWN_ROWS = [
    "lora_unet_x.lora_up.bias",  # nobody writes it; must not be guessed
    "lora_unet_x.bm.weight",  # GLoRA Tucker core: unsupported
    "double_blocks.0.img_attn.qkv.weight",  # a base weight, no `.on_input` sibling
    "down_blocks.0.up.weight",  # `.up.weight` outside an XLabs `.processor.` stem
    "lora_unet_x.lora_B.weight.extra",
    "alpha",  # nothing before the suffix
]


@pytest.mark.parametrize("key", UNKNOWN_ROWS)
def test_split_key_unknown(key):
    assert split_key(key) is None


def test_ia3_weight_needs_on_input_sibling():
    keys = {"lora_unet_x.weight": 0, "lora_unet_x.on_input": 0}
    assert split_key("lora_unet_x.weight", keys) == ("lora_unet_x", "ia3_weight")
    assert split_key("lora_unet_x.on_input", keys) == ("lora_unet_x", "on_input")
    assert split_key("lora_unet_x.weight") is None


def test_suffix_table_uses_only_canonical_parts():
    assert {s.part for s in SUFFIXES} | {"ia3_weight"} == set(PART_NAMES)


# --------------------------------------------------------------------------------------------
# 2. grouping and ranks per algorithm
# --------------------------------------------------------------------------------------------

SD1_CONV = [("lora_unet_down_blocks_0_resnets_0_conv1", 320, 320, 3)]
LINEAR = [("lora_unet_mid_block_attentions_0_proj_out", 1280, 1280)]


@pytest.mark.parametrize(
    ("kwargs", "algo", "rank", "parts"),
    [
        # kohya LoRA, linear
        (dict(algo="lora", rank=8, modules=LINEAR), "lora", 8, {"up", "down", "alpha"}),
        # kohya LoRA-C3Lier / LyCORIS LoCon 3x3 (down [r, in, 3, 3])
        (dict(algo="lora", rank=4, modules=SD1_CONV, conv3x3=True), "lora", 4, {"up", "down", "alpha"}),
        # LyCORIS LoCon Tucker
        (dict(algo="lora", rank=4, modules=SD1_CONV, conv3x3=True, tucker=True), "lora", 4, {"up", "down", "mid", "alpha"}),
        # LyCORIS LoHa, plain and Tucker
        (dict(algo="loha", rank=6, modules=LINEAR), "loha", 6, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
        (dict(algo="loha", rank=6, modules=SD1_CONV, conv3x3=True, tucker=True), "loha", 6,
         {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"}),
        # LyCORIS LoKr: w1 full + w2 factored, w1 factored + w2 full, both full, Tucker t2
        (dict(algo="lokr", rank=5, modules=LINEAR), "lokr", 5, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}),
        (dict(algo="lokr", rank=3, modules=LINEAR, lokr_w1="factored", lokr_w2="full"), "lokr", 3,
         {"lokr_w1_a", "lokr_w1_b", "lokr_w2", "alpha"}),
        (dict(algo="lokr", rank=3, modules=LINEAR, lokr_w2="full"), "lokr", None, {"lokr_w1", "lokr_w2", "alpha"}),
        (dict(algo="lokr", rank=2, modules=SD1_CONV, conv3x3=True, tucker=True), "lokr", 2,
         {"lokr_w1", "lokr_t2", "lokr_w2_a", "lokr_w2_b", "alpha"}),
        # LyCORIS full, norm; IA3; GLoRA; diag-OFT
        (dict(algo="full", modules=LINEAR), "full", None, {"diff", "diff_b"}),
        (dict(algo="full", modules=LINEAR, bias=False), "full", None, {"diff"}),
        (dict(algo="norm", modules=[("lycoris_mid_block_attentions_0_norm", 1280, 1280)]), "norm", None, {"w_norm", "b_norm"}),
        (dict(algo="ia3", modules=LINEAR), "ia3", None, {"ia3_weight", "on_input"}),
        (dict(algo="glora", rank=4, modules=LINEAR), "glora", 4, {"glora_a1", "glora_a2", "glora_b1", "glora_b2", "alpha"}),
        (dict(algo="oft", rank=8, modules=LINEAR), "oft", None, {"oft_blocks", "alpha"}),
    ],
)
def test_grouping_per_algorithm(kwargs, algo, rank, parts):
    modules = kwargs.pop("modules")
    f = parse(make_lora(modules, **kwargs))
    assert f.unknown_keys == []
    (module,) = f.modules.values()
    assert module.stem == modules[0][0]
    assert module.algo == algo and algo in ALGORITHMS
    assert module.rank == rank
    assert set(module.parts) == parts
    assert module.dora is False


def test_lokr_factors_multiply_to_the_target_shape():
    t = make_lora([("lora_unet_x", 1280, 640)], algo="lokr", lokr_w1="factored", lokr_w2="factored", rank=2)
    w1 = t["lora_unet_x.lokr_w1_a"] @ t["lora_unet_x.lokr_w1_b"]
    w2 = t["lora_unet_x.lokr_w2_a"] @ t["lora_unet_x.lokr_w2_b"]
    assert torch.kron(w1, w2).shape == (1280, 640)
    assert parse(t).modules["lora_unet_x"].rank == 2  # w2's rank wins


def test_boft_by_ndim():
    hdr = fake_header({"lycoris_x.oft_blocks": (2, 4, 8, 8), "lycoris_x.alpha": ()})
    assert parse_lora(hdr, {}).modules["lycoris_x"].algo == "boft"


def test_set_and_reshape_weight_modules():
    # BFL control LoRA after ComfyUI's convert_lora_bfl_control
    hdr = fake_header({
        "double_blocks.0.img_attn.norm.key_norm.set_weight": (128,),
        "img_in.lora_A.weight": (128, 128),
        "img_in.lora_B.weight": (3072, 128),
        "img_in.lora_B.bias": (3072,),
        "img_in.reshape_weight": (2,),
    })
    f = parse_lora(hdr, {})
    assert f.modules["double_blocks.0.img_attn.norm.key_norm"].algo == "set"
    img_in = f.modules["img_in"]
    assert (img_in.algo, img_in.rank) == ("lora", 128)
    assert set(img_in.parts) == {"up", "down", "up_bias", "reshape_weight"}


def test_diff_b_rides_along_with_lora():
    hdr = fake_header({"lora_unet_x.lora_up.weight": (8, 2), "lora_unet_x.lora_down.weight": (2, 8),
                       "lora_unet_x.diff_b": (8,)})
    assert parse_lora(hdr, {}).modules["lora_unet_x"].algo == "lora"


@pytest.mark.parametrize(("naming", "part"), [("kohya", "dora_scale"), ("peft", "magnitude")])
def test_dora(naming, part):
    f = parse(make_lora(LINEAR, dora=True, naming=naming))
    (module,) = f.modules.values()
    assert module.dora and part in module.parts


@pytest.mark.parametrize("naming", ["kohya", "peft", "diffusers", "lora_linear_layer", "mochi"])
def test_every_naming_pairs_up_and_down(naming):
    f = parse(make_lora([("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 768, 768)], naming=naming, rank=4))
    (module,) = f.modules.values()
    assert module.stem == "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert (module.algo, module.rank) == ("lora", 4)


def test_modules_keep_file_order_and_parts_point_at_keys():
    mods = kohya_mods("sdxl", [
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.4.1.proj_in.weight",
    ], "lora_unet_")
    t = make_lora(mods, conv3x3=True)
    f = parse(t)
    assert list(f.modules) == [m[0] for m in mods]
    for module in f.modules.values():
        assert all(key in t for key in module.parts.values())
    assert f.modules["lora_unet_output_blocks_2_2_conv"].rank == 4


# --------------------------------------------------------------------------------------------
# 2b. errors, each naming the tensor
# --------------------------------------------------------------------------------------------

ERROR_ROWS = [
    # up/down ranks disagree
    ({"m.lora_up.weight": (320, 8), "m.lora_down.weight": (4, 320)}, "m.lora_up.weight", "ranks disagree"),
    # Tucker mid does not fit
    ({"m.lora_up.weight": (320, 4, 1, 1), "m.lora_down.weight": (4, 320, 1, 1), "m.lora_mid.weight": (4, 8, 3, 3)},
     "m.lora_mid.weight", "mid does not fit down"),
    ({"m.lora_up.weight": (320, 4, 1, 1), "m.lora_down.weight": (4, 320, 1, 1), "m.lora_mid.weight": (4, 4)},
     "m.lora_mid.weight", "expected"),
    # alpha not a scalar
    ({"m.lora_up.weight": (320, 4), "m.lora_down.weight": (4, 320), "m.alpha": (2,)}, "m.alpha", "scalar"),
    # alpha but no weights
    ({"m.alpha": ()}, "m.alpha", "alpha but no weights"),
    # mixed algorithms
    ({"m.lora_up.weight": (320, 4), "m.lora_down.weight": (4, 320), "m.hada_w1_a": (320, 4)},
     "m.lora_up.weight", "mixes adapter types"),
    ({"m.diff": (320, 320), "m.w_norm": (320,)}, "m.diff", "mixes adapter types"),
    # the same part twice (with and without PEFT adapter name)
    ({"m.lora_A.weight": (4, 320), "m.lora_A.default.weight": (4, 320), "m.lora_B.weight": (320, 4)},
     "m.lora_A.default.weight", "two tensors"),
    # LoHa / LoKr factor ranks
    ({"m.hada_w1_a": (320, 4), "m.hada_w1_b": (8, 320), "m.hada_w2_a": (320, 4), "m.hada_w2_b": (4, 320)},
     "m.hada_w1_a", "w1 ranks disagree"),
    ({"m.hada_w1_a": (320, 4), "m.hada_w1_b": (4, 320), "m.hada_w2_a": (320, 4), "m.hada_w2_b": (4, 320),
      "m.hada_t1": (4, 4, 3, 3)}, "m.hada_t1", "no hada_t2"),
    ({"m.lokr_w1": (16, 16), "m.lokr_w1_a": (16, 2), "m.lokr_w1_b": (2, 16), "m.lokr_w2": (20, 20)},
     "m.lokr_w1", "both lokr_w1 and its factors"),
    ({"m.lokr_w1": (16, 16), "m.lokr_w2_a": (20, 4), "m.lokr_w2_b": (2, 20)}, "m.lokr_w2_a", "w2 ranks disagree"),
    # PEFT bias of the wrong size
    ({"m.lora_A.weight": (4, 320), "m.lora_B.weight": (320, 4), "m.lora_B.bias": (640,)}, "m.lora_B.bias", "expected [320]"),
    # OFT blocks of the wrong rank
    ({"m.oft_blocks": (320, 320)}, "m.oft_blocks", "3-D (OFT) or 4-D (BOFT)"),
]


@pytest.mark.parametrize(("shapes", "tensor", "text"), ERROR_ROWS)
def test_errors(shapes, tensor, text):
    with pytest.raises(LoraFormatError) as info:
        parse_lora(fake_header(shapes), {}, path="bad.safetensors")
    err = info.value
    assert err.path == "bad.safetensors"
    assert err.tensor == tensor
    assert text in err.message
    assert err.hint


def test_bad_adapter_metadata_json_is_an_error():
    t = make_lora(LINEAR, naming="peft")
    with pytest.raises(LoraFormatError, match="not valid JSON"):
        parse(t, {"lora_adapter_metadata": "{nope"})


# --------------------------------------------------------------------------------------------
# 2c. unknown keys are listed, in file order, never dropped
# --------------------------------------------------------------------------------------------


def test_unknown_and_orphan_keys_are_listed():
    hdr = fake_header({
        "lora_unet_a.lora_up.weight": (320, 4),  # orphan: no down
        "lora_unet_a.alpha": (),  # goes with the orphan, not an error
        "lora_unet_b.lora_up.weight": (320, 4),
        "lora_unet_b.lora_down.weight": (4, 320),
        "lora_unet_b.bm.weight": (4, 4),  # unknown suffix
        "lora_unet_c.dora_scale": (320, 1),  # orphan modifier
        "lora_unet_d.on_input": (),  # IA3 flag without weight
        "double_blocks.0.img_attn.norm.key_norm.scale": (128,),  # BFL control `.scale`, no weights
    })
    f = parse_lora(hdr, {})
    assert list(f.modules) == ["lora_unet_b"]
    assert f.unknown_keys == [k for k in hdr if not k.startswith("lora_unet_b.lora_")]


# --------------------------------------------------------------------------------------------
# 3. flavours
# --------------------------------------------------------------------------------------------

FLUX_QKV = ["model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
            "model.diffusion_model.single_blocks.7.linear1.weight"]


def _flavour_cases():
    sd1_tok = [("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768)]
    sdxl = ["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"]
    # norm1.linear (per-block modulation) tells FLUX.1 from Chroma, which shares the other names
    diffusers_flux = [("transformer.single_transformer_blocks.0.attn.to_q", 3072, 3072),
                      ("transformer.transformer_blocks.0.attn.add_q_proj", 3072, 3072),
                      ("transformer.transformer_blocks.0.norm1.linear", 18432, 3072)]
    return [
        ("kohya", make_lora(sd1_tok), {}),
        ("kohya", make_lora(kohya_mods("sdxl", sdxl, "lora_unet_")), {}),
        ("lycoris", make_lora(sd1_tok, algo="loha"), {}),  # LyCORIS in kohya names
        ("lycoris", make_lora([("lycoris_down_blocks_1_attentions_0_proj_in", 640, 640)]), {}),  # SimpleTuner
        ("lycoris", make_lora(sd1_tok), {"ss_network_module": "lycoris.kohya"}),  # LyCORIS LoCon
        ("diffusers", make_lora([("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 640, 768)],
                                naming="diffusers"), {}),
        ("diffusers", make_lora([("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q", 640, 640)],
                                naming="diffusers_old"), {}),
        ("diffusers", make_lora([("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 768, 768)],
                                naming="lora_linear_layer"), {}),
        ("peft", make_lora([("base_model.model.down_blocks.0.attentions.0.proj_in", 320, 320)], naming="peft"), {}),
        ("peft", make_lora([("unet.down_blocks.0.attentions.0.proj_in", 320, 320)], naming="peft"), {}),
        ("diffusers-flux", make_lora(diffusers_flux, naming="peft"), {}),
        ("aitoolkit-flux", make_lora(diffusers_flux, naming="peft"),
         {"software": json.dumps({"name": "ai-toolkit", "url": "https://github.com/ostris/ai-toolkit"})}),
        ("comfyui", make_lora(dotted_mods("flux", FLUX_QKV, "diffusion_model.")), {}),
        ("comfyui", make_lora([("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj", 768, 768)]), {}),
        ("xlabs", _xlabs(), {}),
        ("onetrainer", make_lora([("lora_transformer_transformer_blocks_0_attn_to_q", 3072, 3072)]), {}),
        ("mixed", {**make_lora(sd1_tok), **make_lora([("unet.down_blocks.0.attentions.0.proj_in", 320, 320)],
                                                      naming="diffusers")}, {}),
        ("unknown", {}, {}),
        ("unknown", make_lora([("some.module", 8, 8)]), {}),
    ]


def _xlabs() -> dict[str, torch.Tensor]:
    # XLabs Flux: `{down,up}.weight` under `<block>.processor.<name>`, no alpha
    g = torch.Generator().manual_seed(0)
    return {
        "double_blocks.0.processor.qkv_lora1.down.weight": torch.randn(16, 3072, generator=g),
        "double_blocks.0.processor.qkv_lora1.up.weight": torch.randn(9216, 16, generator=g),
        "single_blocks.1.processor.qkv_lora.down.weight": torch.randn(16, 3072, generator=g),
        "single_blocks.1.processor.qkv_lora.up.weight": torch.randn(9216, 16, generator=g),
    }


@pytest.mark.parametrize(("flavour", "tensors", "metadata"), _flavour_cases())
def test_flavour(flavour, tensors, metadata):
    f = parse(tensors, metadata)
    assert f.flavour == flavour
    assert sum(f.flavours.values()) == len(f.modules)


def test_mixed_counts_each_flavour():
    t = {**make_lora([("lora_unet_a", 8, 8), ("lora_unet_b", 8, 8)]),
         **make_lora([("unet.c", 8, 8)], naming="diffusers")}
    assert parse(t).flavours == {"kohya": 2, "diffusers": 1}


# --------------------------------------------------------------------------------------------
# component hint, looks_like_lora
# --------------------------------------------------------------------------------------------


def test_looks_like_lora():
    assert looks_like_lora(header_of(make_lora(LINEAR)))
    assert looks_like_lora(header_of(make_lora(LINEAR, algo="ia3")))
    assert not looks_like_lora({})
    # a Flux checkpoint: `.weight`, `.bias` and RMSNorm `.scale` keys
    names = [n for n in arch_tensors("flux") if n.startswith("model.diffusion_model.double_blocks.0.")]
    assert any(n.endswith(".scale") for n in names)
    assert not looks_like_lora(fake_header({n: tuple(arch_tensors("flux")[n]["shape"]) for n in names}))


# --------------------------------------------------------------------------------------------
# 5. alpha from diffusers' `lora_adapter_metadata`
# --------------------------------------------------------------------------------------------

UNET_TO_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
UNET_PROJ_IN = "down_blocks.1.attentions.0.proj_in"
UNET_TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"


def _peft_unet(prefix: str = "unet.") -> dict[str, torch.Tensor]:
    t = make_lora([(prefix + UNET_TO_K, 640, 768), (prefix + UNET_TO_Q, 640, 640)], naming="peft", rank=4)
    t.update(make_lora([(prefix + UNET_PROJ_IN, 640, 640)], naming="peft", rank=8, seed=1))
    return t


def _config(**kw) -> dict:
    # the LoraConfig fields lorabake reads; a real to_dict() has ~40 more (see the slow test)
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {}, "rank_pattern": {},
            "use_rslora": False, "use_dora": False}
    return {**base, **kw}


def _pipeline_metadata(**configs: dict) -> dict[str, str]:
    # diffusers loaders/lora_base.py `_save_lora_weights`: `_pack_dict_with_prefix(config, prefix)`
    # gives {"unet.r": 4, ...}; `write_lora_layers` dumps it with indent=2, sort_keys=True.
    packed = {f"{prefix}.{k}": v for prefix, config in configs.items() for k, v in config.items()}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}


def test_pipeline_layout_alpha_and_patterns():
    t = _peft_unet()
    t.update(make_lora([("text_encoder." + TE_Q, 768, 768)], naming="peft", rank=4))
    unet = _config(alpha_pattern={"attn2.to_k": 2}, rank_pattern={"proj_in": 8})
    meta = _pipeline_metadata(unet=unet, text_encoder=_config(lora_alpha=4))
    f = parse(t, meta)
    # PEFT's scale itself: alpha / r (ranks: to_k, to_q, te 4; proj_in 8)
    assert f.peft_scales == {
        "unet." + UNET_TO_K: 2.0 / 4,  # alpha_pattern, suffix match after a `.`
        "unet." + UNET_TO_Q: 8.0 / 4,  # lora_alpha
        "unet." + UNET_PROJ_IN: 8.0 / 8,  # rank_pattern r=8, lora_alpha 8 -> scale 1
        "text_encoder." + TE_Q: 4.0 / 4,
    }
    module = f.modules["unet." + UNET_TO_Q]
    assert (module.alpha, module.scale) == (None, 8.0 / 4)  # the module carries the scale, computed once


def test_alpha_tensor_wins_over_metadata():
    t = _peft_unet()
    t["unet." + UNET_TO_Q + ".alpha"] = torch.tensor(1.0)
    f = parse(t, _pipeline_metadata(unet=_config()))
    assert "unet." + UNET_TO_Q not in f.peft_scales
    assert f.peft_scales["unet." + UNET_TO_K] == 8.0 / 4


def test_rslora_scale():
    f = parse(_peft_unet(), _pipeline_metadata(unet=_config(use_rslora=True, lora_alpha=8, r=4, rank_pattern={"proj_in": 8})))
    # PEFT scale alpha/sqrt(r)
    assert f.peft_scales["unet." + UNET_TO_Q] == pytest.approx(8 / math.sqrt(4))
    assert f.peft_scales["unet." + UNET_PROJ_IN] == pytest.approx(8 / math.sqrt(8))


def test_model_layout_and_anchored_patterns():
    # diffusers loaders/peft.py `save_lora_adapter`: the bare LoraConfig dict, unprefixed keys.
    # diffusers' get_peft_kwargs writes `^`-anchored rank_pattern keys (peft PR #2419).
    t = _peft_unet(prefix="")
    config = _config(lora_alpha=16, rank_pattern={f"^{UNET_PROJ_IN}": 8}, alpha_pattern={f"^{UNET_PROJ_IN}": 4})
    f = parse(t, {"lora_adapter_metadata": json.dumps(config, sort_keys=True)})
    assert f.peft_scales == {UNET_TO_K: 16.0 / 4, UNET_TO_Q: 16.0 / 4, UNET_PROJ_IN: 4.0 / 8}


def test_components_without_config_get_no_override():
    t = _peft_unet()
    t.update(make_lora([("text_encoder." + TE_Q, 768, 768)], naming="peft"))
    f = parse(t, _pipeline_metadata(text_encoder=_config(lora_alpha=2)))
    assert f.peft_scales == {"text_encoder." + TE_Q: 2.0 / 4}
    assert parse(t, {}).peft_scales == {}


@pytest.mark.skipif(not os.environ.get("LORABAKE_SLOW_TESTS"), reason="imports diffusers+peft (~10 s); set LORABAKE_SLOW_TESTS=1")
def test_file_written_by_diffusers_save_lora_weights(tmp_path):
    # The real save path: StableDiffusionLoraLoaderMixin.save_lora_weights with
    # unet_lora_adapter_metadata = LoraConfig(...).to_dict() (what the training scripts pass).
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig

    unet = {k.removeprefix("unet."): v for k, v in _peft_unet().items()}
    te = {k.removeprefix("text_encoder."): v
          for k, v in make_lora([("text_encoder." + TE_Q, 768, 768)], naming="peft").items()}
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        tmp_path,
        unet_lora_layers=unet,
        text_encoder_lora_layers=te,
        unet_lora_adapter_metadata=LoraConfig(
            r=4, lora_alpha=8, alpha_pattern={"attn2.to_k": 2}, rank_pattern={"proj_in": 8}
        ).to_dict(),
        text_encoder_lora_adapter_metadata=LoraConfig(r=4, lora_alpha=4, use_rslora=True).to_dict(),
    )
    path = str(tmp_path / "pytorch_lora_weights.safetensors")
    header = read_header(path)
    f = parse_lora(header.tensors, header.metadata, path=path)
    assert f.flavour == "peft"
    assert f.peft_scales == {
        "unet." + UNET_TO_K: 2.0 / 4,
        "unet." + UNET_TO_Q: 8.0 / 4,
        "unet." + UNET_PROJ_IN: 8.0 / 8,
        "text_encoder." + TE_Q: pytest.approx(4 / math.sqrt(4)),
    }


def test_saved_file_round_trip(tmp_path):
    # header read from a real file gives the same result as the in-memory header
    t = make_lora(kohya_mods("sdxl", ["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"],
                             "lora_unet_"), dtype=torch.float16)
    path = save_lora(tmp_path / "l.safetensors", t, {"ss_base_model_version": "sdxl_base_v1-0"})
    header = read_header(path)
    f = identify(parse_lora(header.tensors, header.metadata, path=path), header.tensors)[0]
    assert (f.flavour, f.arch, f.arch_note) == ("kohya", "sdxl", None)
    assert f.modules.keys() == parse(t).modules.keys()
