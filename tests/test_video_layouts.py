"""The video families' native layouts against diffusers: key lists at full size, tiny files bit for bit.

The key lists in tests/data/arch (written by `python -m tests.videofam`) must be what diffusers' own
single-file converter maps onto the diffusers model at full width, and a native file written from a tiny
model must convert back to that model's state dict exactly. HunyuanVideo 1.5 has no converter in diffusers
0.42.1: its list was checked against diffusers' conversion script when generated (see the file's "check");
here it is checked against the rows of tests/videofam.py at full width.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.videofam import ARCH_DIR, VARIANTS, build_model, to_diffusers, to_native

pytest.importorskip("diffusers")

_LATER_BLOCK = re.compile(r"^(model\.diffusion_model\.|net\.)?(blocks|vace_blocks|double_blocks|single_blocks|"
                          r"transformer_blocks|visual_transformer_blocks|face_adapter\.fuser_blocks)\.([1-9]\d*)\.")


def _doc(name: str) -> dict:
    with open(os.path.join(ARCH_DIR, f"{name}.json"), encoding="utf-8") as fh:
        return json.load(fh)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_key_list_is_what_diffusers_converts_at_full_width(name):
    variant = VARIANTS[name]
    doc = _doc(name)
    assert doc["components"]["diffuser"] == len(doc["tensors"])
    kept = {k: tuple(v["shape"]) for k, v in doc["tensors"].items() if not _LATER_BLOCK.match(k)}
    state = build_model(variant, tiny=False, short=True).state_dict()
    if variant.converter is None:
        ours = {k: tuple(v.shape) for k, v in to_native(variant, state).items()}
        assert kept == ours
        return
    native = {k: torch.empty(shape, device="meta") for k, shape in kept.items()}
    back = to_diffusers(variant, native)
    assert sorted(back) == sorted(state)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("name", sorted(n for n, v in VARIANTS.items() if v.converter))
def test_tiny_native_file_converts_back_bit_for_bit(name, tmp_path):
    variant = VARIANTS[name]
    state = build_model(variant, tiny=True).state_dict()
    path = str(tmp_path / "native.safetensors")
    save_file(to_native(variant, state), path)
    native = load_file(path)
    assert all(k.startswith(variant.prefix) for k in native)
    back = to_diffusers(variant, native)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key


def test_native_names_seen_in_the_wild_are_in_the_key_lists():
    # one row per name users meet (ComfyUI detection sentinels, LoRA targets named in trainer docs)
    rows = {
        "wan21-t2v-14b": ("blocks.0.modulation", "head.modulation", "blocks.39.cross_attn.o.weight",
                          "blocks.0.ffn.2.weight", "blocks.0.norm3.weight"),
        "wan21-i2v-14b": ("blocks.0.cross_attn.k_img.weight", "blocks.0.cross_attn.norm_k_img.weight",
                          "img_emb.proj.1.weight"),
        "wan21-vace-14b": ("vace_blocks.7.after_proj.weight", "vace_patch_embedding.weight"),
        "hunyuanvideo-t2v": ("double_blocks.19.img_attn_qkv.weight", "single_blocks.39.linear1.weight",
                             "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight",
                             "double_blocks.0.img_mod.linear.weight", "single_blocks.0.modulation.linear.weight",
                             "final_layer.adaLN_modulation.1.weight"),
        "hunyuanvideo15-i2v": ("double_blocks.53.img_attn_q.weight", "double_blocks.0.txt_attn_v.weight",
                               "byt5_in.fc1.weight", "vision_in.proj.1.weight"),
        "ltx2": ("model.diffusion_model.transformer_blocks.0.audio_attn1.q_norm.weight",
                 "model.diffusion_model.patchify_proj.weight",
                 "model.diffusion_model.adaln_single.emb.timestep_embedder.linear_1.weight",
                 "model.diffusion_model.av_ca_video_scale_shift_adaln_single.linear.weight",
                 "model.diffusion_model.transformer_blocks.0.scale_shift_table_a2v_ca_video"),
        "ltxv-0.9": ("model.diffusion_model.transformer_blocks.27.attn1.q_norm.weight",
                     "model.diffusion_model.scale_shift_table"),
    }
    for name, keys in rows.items():
        tensors = _doc(name)["tensors"]
        missing = [k for k in keys if k not in tensors]
        assert not missing, (name, missing)
    wan = _doc("wan21-t2v-14b")["tensors"]
    assert wan["patch_embedding.weight"]["shape"] == [5120, 16, 1, 2, 2]
    assert wan["blocks.0.modulation"]["shape"] == [1, 6, 5120]
    hy = _doc("hunyuanvideo-t2v")["tensors"]
    assert hy["single_blocks.0.linear1.weight"]["shape"] == [3 * 3072 + 4 * 3072, 3072]
