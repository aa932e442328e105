"""`lorabake extract` on the video families: the attention and MLP linears of every block, named as each
family's kohya/musubi trainers name them, baked back exactly.

A tiny native file of each family (tests/videofam.py, from diffusers' configs) gets a rank-4 change on every
2-D weight; the extracted LoRA (rank 8, so exact up to rounding) must hold exactly the family's extract
targets, and baking it back must give the tuned weights there and the base everywhere else.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorabake.arch import FAMILIES
from lorabake.detect import detect_checkpoint
from lorabake.st_header import TensorInfo
from tests.cli_helpers import run_main
from tests.videofam import VARIANTS, build_model, to_native

pytest.importorskip("diffusers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAMES = ["wan21-i2v-14b", "wan21-vace-14b", "hunyuanvideo-t2v", "hunyuanvideo15-i2v", "ltx2", "kandinsky5-lite-t2v",
         "cosmos-predict2-2b-t2i"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", NAMES)
def test_extract_targets_attention_and_mlp_linears(tmp_path, name):
    variant = VARIANTS[name]
    base = to_native(variant, build_model(variant, tiny=True).state_dict())
    info = detect_checkpoint({k: TensorInfo(k, "F32", tuple(v.shape), 0, 0) for k, v in base.items()})
    family = FAMILIES[info.arch]
    gen = torch.Generator().manual_seed(7)
    tuned = {
        k: (v + 0.05 * torch.randn(v.shape[0], 4, generator=gen) @ torch.randn(4, v.shape[1], generator=gen))
        if v.dim() == 2 else v
        for k, v in base.items()
    }
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    code, out, err = run_main(["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                               "-o", str(tmp_path / "lora.safetensors"), "--rank", "8", "--components", "dit",
                               "--dtype", "fp32", "--json"])
    assert code == 0, err
    targeted = {k for k, v in base.items() if v.dim() == 2 and k.endswith(family.extract_targets)}
    assert any("attn" in k or "attention" in k for k in targeted), sorted(targeted)[:5]
    assert any(m in k for k in targeted for m in ("mlp", "ffn", "ff.", "feed_forward", "linear1")), sorted(targeted)[:5]
    lora = load_file(str(tmp_path / "lora.safetensors"))
    prefix = family.kohya_names["dit"][0]
    assert lora and all(k.startswith(prefix) for k in lora)
    assert len({k.split(".")[0] for k in lora}) == len(targeted)
    code, _, err = run_main(["merge", str(tmp_path / "base.safetensors"), "--lora", str(tmp_path / "lora.safetensors"),
                             "-o", str(tmp_path / "back.safetensors"), "--json"])
    assert code == 0, err
    back = load_file(str(tmp_path / "back.safetensors"))
    for key in base:
        if key in targeted:
            torch.testing.assert_close(back[key], tuned[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
        else:
            assert torch.equal(back[key], base[key]), key
    assert json.loads(out)


def test_all_modules_keeps_modulation_and_patch_embedding_as_full_deltas(tmp_path):
    """`--all-modules` on a Wan pair changed everywhere: the 3-D `modulation` parameters come out as lightx2v's
    `<block>.diff_m`, the 5-D patch embedding and the norms as `diff`, the biases as `diff_b` beside their
    module's LoRA; merging the result into the base gives the tuned model back, tensor for tensor."""
    variant = VARIANTS["wan21-t2v-14b"]
    base = to_native(variant, build_model(variant, tiny=True).state_dict())
    gen = torch.Generator().manual_seed(11)
    tuned = {}
    for k, v in base.items():
        if v.dim() == 2:  # rank 4, so a rank-8 LoRA carries it exactly
            v = v + 0.05 * torch.randn(v.shape[0], 4, generator=gen) @ torch.randn(4, v.shape[1], generator=gen)
        else:
            v = v + 0.05 * torch.randn(v.shape, generator=gen)
        tuned[k] = v.contiguous()
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    code, out, err = run_main(["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                               "-o", str(tmp_path / "lora.safetensors"), "--rank", "8", "--all-modules",
                               "--dtype", "fp32", "--json"])
    assert code == 0, err
    assert json.loads(out)["unaddressable"] == []
    lora = load_file(str(tmp_path / "lora.safetensors"))
    assert torch.equal(lora["lora_unet_blocks_0.diff_m"], tuned["blocks.0.modulation"] - base["blocks.0.modulation"])
    assert lora["lora_unet_head.diff_m"].shape == base["head.modulation"].shape == (1, 2, 16)
    assert lora["lora_unet_patch_embedding.diff"].dim() == 5
    assert {"lora_unet_blocks_0_norm3.diff", "lora_unet_blocks_0_self_attn_q.diff_b",
            "lora_unet_blocks_0_self_attn_q.lora_up.weight"} <= set(lora)
    code, _, err = run_main(["merge", str(tmp_path / "base.safetensors"), "--lora", str(tmp_path / "lora.safetensors"),
                             "-o", str(tmp_path / "back.safetensors"), "--json"])
    assert code == 0, err
    back = load_file(str(tmp_path / "back.safetensors"))
    for key in base:
        torch.testing.assert_close(back[key], tuned[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
