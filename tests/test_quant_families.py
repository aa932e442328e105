"""Quantizing a family's checkpoint keeps that family's own input and output layers in high precision
(`Family.quant_keep`, beyond the generic norms/biases/embedders/modulation rows), and the quantized
output takes the next LoRA in the same format. Real names and full-size shapes from the key lists."""

from __future__ import annotations

import json
import os

import gguf
import pytest
import torch
from safetensors.torch import load_file

from lorabake.quant.comfy import find_layers
from lorabake.st_reader import SafetensorsReader
from tests.famfix import ARCH_DIR, read_fixture
from tests.lorafix import save_lora
from tests.test_lowprecision import delta64, lora_for, merge, write_ordered

R = "model.diffusion_model."
# family -> (key-list name, the keys of the base: probes, the family's own in/out layers, block linears,
#            the LoRA's stems -> keys, kept high by the family rows, quantized, the `_M` mixes' one-up layer)
CASES = {
    "qwen-image": (
        "qwen-image",
        ["txt_norm.weight", "transformer_blocks.0.img_mod.1.weight", "img_in.weight", "img_in.bias",
         "txt_in.weight", "proj_out.weight", "transformer_blocks.0.attn.to_q.weight",
         "transformer_blocks.0.attn.to_out.0.weight"],
        {"lora_unet_img_in": "img_in.weight", "lora_unet_transformer_blocks_0_attn_to_q": "transformer_blocks.0.attn.to_q.weight"},
        {"img_in.weight", "txt_in.weight", "proj_out.weight", "transformer_blocks.0.img_mod.1.weight"},
        {"transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_out.0.weight"},
        "transformer_blocks.0.attn.to_out.0.weight",
    ),
    "wan": (
        "wan22-ti2v-5b",
        ["head.modulation", "blocks.0.self_attn.q.weight", "blocks.0.self_attn.o.weight", "head.head.weight",
         "text_embedding.0.weight"],
        {"lora_unet_blocks_0_self_attn_q": "blocks.0.self_attn.q.weight", "lora_unet_head_head": "head.head.weight"},
        {"head.head.weight", "text_embedding.0.weight"},
        {"blocks.0.self_attn.q.weight", "blocks.0.self_attn.o.weight"},
        "blocks.0.self_attn.o.weight",
    ),
}


# Each family is baked in one ComfyUI format and one GGUF type, so that between them the two families take all
# four (Qwen-Image's 18432-row modulation makes every output big; the codecs themselves are tested on every
# format in test_quant_codecs, test_quant_comfy and test_quant_gguf, Flux-shaped bases in test_quant_out).
COMFY_CASES = [("qwen-image", "fp8"), ("wan", "nvfp4")]
# (family, format, the type of the quantized layers, the type of the `_M` mix's one-up layer)
GGUF_CASES = [("qwen-image", "Q4_K_M", "Q4_K", "Q6_K"), ("wan", "Q8_0", "Q8_0", "Q8_0")]


def _shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key list: tests/data/arch/<name>.json.gz (image families) or <name>.json (video families)."""
    path = os.path.join(ARCH_DIR, name + ".json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            return {k: tuple(v["shape"]) for k, v in json.load(fh)["tensors"].items()}
    return {k: tuple(v["shape"]) for k, v in read_fixture(name)["tensors"].items()}


@pytest.fixture(scope="module")
def family_bases(tmp_path_factory):
    """family -> its base and LoRA, each built once for the module."""
    made = {}

    def get(family: str):
        if family not in made:
            made[family] = _build(family, tmp_path_factory)
        return made[family]

    return get


def _build(family: str, tmp_path_factory):
    name, keys, stems, kept, quantized, one_up = CASES[family]
    shapes = _shapes(name)
    gen = torch.Generator().manual_seed(0)
    values = {R + k: (torch.randn(shapes[k], generator=gen) * 0.02).to(torch.bfloat16) for k in keys}
    path = write_ordered(tmp_path_factory.mktemp("base") / f"{name}.safetensors", values)
    stems = {s: R + k for s, k in stems.items()}
    lora = lora_for(stems, {k: tuple(values[k].shape) for k in stems.values()}, alpha=4.0)
    lora_path = save_lora(tmp_path_factory.mktemp("lora") / "l.safetensors", lora)
    return family, path, values, lora, lora_path, stems, {R + k for k in kept}, {R + k for k in quantized}, R + one_up


@pytest.mark.parametrize("family, quant", COMFY_CASES, ids=["-".join(c) for c in COMFY_CASES])
def test_comfy_quant_keeps_the_family_layers_and_rebakes(tmp_path, family_bases, family, quant):
    arch, base, values, lora, lora_path, stems, kept, quantized, _ = family_bases(family)
    code, doc, err, out = merge(tmp_path, base, lora_path, "--quant", quant, strength=0.5)
    assert code == 0, err
    assert doc["base_architecture"] == arch
    with SafetensorsReader(out) as r:
        layers = find_layers(r.tensors, r.metadata, r.read_bytes, path=str(out))
    assert set(layers) == quantized
    got = load_file(str(out))
    for key in kept:
        assert got[key].dtype == torch.bfloat16, key
    for stem, key in stems.items():  # a kept layer the LoRA patches: patched in bf16, in place
        if key in kept:
            want = values[key].double() + delta64(lora, stem, 0.5)
            assert float((got[key].double() - want).abs().max()) < 0.01
    # the fp8 output is a base: the next LoRA bakes into it in the same format, the rest byte-identical
    code, _, err, again = merge(tmp_path, out, lora_path, out="again.safetensors", strength=0.1)
    assert code == 0, err
    second = load_file(str(again))
    assert second.keys() == got.keys()
    assert all(second[k].dtype == got[k].dtype and second[k].shape == got[k].shape for k in got)
    modules = {k[: -len(".weight")] for k in stems.values()}
    assert all(torch.equal(second[k], got[k]) for k in got if k.rsplit(".", 1)[0] not in modules)
    assert any(not torch.equal(second[k], got[k]) for k in stems.values())


@pytest.mark.parametrize("family, quant, low, high", GGUF_CASES, ids=[f"{c[0]}-{c[1]}" for c in GGUF_CASES])
def test_gguf_keeps_the_family_layers_and_rebakes(tmp_path, family_bases, family, quant, low, high):
    arch, base, _, _, lora_path, stems, kept, quantized, one_up = family_bases(family)
    code, _, err, out = merge(tmp_path, base, lora_path, "--quant", quant, out="out.gguf", strength=0.5)
    assert code == 0, err
    first = {t.name: (t.tensor_type.name, bytes(t.data)) for t in gguf.GGUFReader(str(out)).tensors}
    assert all(first[k][0] == "F32" for k in kept), {k: first[k][0] for k in kept}
    assert {first[k][0] for k in quantized - {one_up}} == {low} and first[one_up][0] == high
    # the GGUF output is a base: the next LoRA bakes into it, types kept, untouched tensors byte-identical
    code, _, err, again = merge(tmp_path, out, lora_path, out="again.gguf", strength=0.1)
    assert code == 0, err
    second = {t.name: (t.tensor_type.name, bytes(t.data)) for t in gguf.GGUFReader(str(again)).tensors}
    assert {k: v[0] for k, v in second.items()} == {k: v[0] for k, v in first.items()}
    assert all(second[k] == first[k] for k in first if k not in stems.values())
    assert all(second[k] != first[k] for k in stems.values())
