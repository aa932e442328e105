"""HiDream-O1-Image: detected from its real key names in the layouts it comes in, its `model.`-prefixed LoRAs
baked, a LoRA alone named. Names from the released file as readers of it list them (`model.language_model.*`,
`model.x_embedder.proj1/proj2`, `model.t_embedder1.mlp`, `model.final_layer2.linear`, `model.visual.*`,
`lm_head`); no full key list is committed, so the sizes here are small."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorabake.detect import detect_checkpoint
from tests.cli_helpers import run_main
from tests.test_detect import info

W = 16  # width; the released model's is 4096


def _released(prefix: str = "model.") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    layer = f"{prefix}language_model.layers.0."
    keys = {
        f"{prefix}language_model.embed_tokens.weight": (32, W),
        **{f"{layer}self_attn.{p}_proj.weight": (W, W) for p in "qkvo"},
        f"{layer}self_attn.q_norm.weight": (4,),
        **{f"{layer}mlp.{p}_proj.weight": (2 * W, W) for p in ("gate", "up")},
        f"{layer}mlp.down_proj.weight": (W, 2 * W),
        f"{layer}input_layernorm.weight": (W,),
        f"{prefix}language_model.norm.weight": (W,),
        f"{prefix}x_embedder.proj1.weight": (W // 4, 48),
        f"{prefix}x_embedder.proj2.weight": (W, W // 4),
        f"{prefix}t_embedder1.mlp.0.weight": (W, 8),
        f"{prefix}t_embedder1.mlp.2.weight": (W, W),
        f"{prefix}final_layer2.linear.weight": (48, W),
        f"{prefix}visual.patch_embed.proj.weight": (W, 3, 2, 4, 4),
    }
    out = {k: torch.randn(shape) for k, shape in keys.items()}
    if prefix == "model.":
        out["lm_head.weight"] = torch.randn(32, W)
    return out


@pytest.mark.parametrize("prefix, layout", [("model.", "native"), ("model.diffusion_model.", "comfyui"), ("", "native")])
def test_detected_in_each_layout(prefix, layout):
    got = detect_checkpoint({k: info(k, list(v.shape), "BF16") for k, v in _released(prefix).items()}, {})
    assert (got.arch, got.layout, got.prefix) == ("hidream-o1", layout, prefix)


def test_model_prefixed_lora_bakes_and_alone_is_named(tmp_path):
    base = _released()
    save_file(base, str(tmp_path / "base.safetensors"))
    modules = {"model.language_model.layers.0.self_attn.q_proj": (W, W), "model.language_model.layers.0.mlp.down_proj": (W, 2 * W),
               "model.x_embedder.proj2": (W, W // 4)}
    lora = {}
    for stem, (out, inp) in modules.items():
        lora[f"{stem}.lora_A.weight"] = torch.randn(2, inp)
        lora[f"{stem}.lora_B.weight"] = torch.randn(out, 2)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    code, stdout, err = run_main(["merge", str(tmp_path / "base.safetensors"), "--lora", str(tmp_path / "lora.safetensors"),
                                  "-o", str(tmp_path / "out.safetensors"), "--json"])
    assert code == 0, err
    assert json.loads(stdout)["loras"][0]["applied"] == {"dit": 3}
    ours = load_file(str(tmp_path / "out.safetensors"))
    for stem in modules:
        want = base[stem + ".weight"] + lora[f"{stem}.lora_B.weight"] @ lora[f"{stem}.lora_A.weight"]
        torch.testing.assert_close(ours[stem + ".weight"], want, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours["lm_head.weight"], base["lm_head.weight"])



def test_a_lora_alone_is_named_by_its_modules(tmp_path):
    """At the released sizes (rank 1), a `model.`-prefixed LoRA matches only HiDream-O1's rule table."""
    sizes = {"model.language_model.layers.35.self_attn.k_proj": (1024, 4096), "model.final_layer2.linear": (3072, 4096)}
    lora = {}
    for stem, (out, inp) in sizes.items():
        lora[f"{stem}.lora_A.weight"] = torch.zeros(1, inp, dtype=torch.bfloat16)
        lora[f"{stem}.lora_B.weight"] = torch.zeros(out, 1, dtype=torch.bfloat16)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    code, stdout, err = run_main(["inspect", str(tmp_path / "lora.safetensors")])
    assert code == 0, err
    assert "architecture: hidream-o1" in stdout
