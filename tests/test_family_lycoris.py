"""LoHa, LoKr and DoRA on per-projection names onto fused q ‖ k ‖ v (Z-Image: equal bands; Lumina 2: GQA).

ΔW is built whole for each projection and added to its band of the fused tensor. Two checks:

  - LoHa / LoKr: baking into the native file (fused `attention.qkv`) equals baking the same LoRA into the
    diffusers layout of the same weights (split `attention.to_q/k/v`, no bands) and fusing the result with
    the inverse of diffusers' single-file converter (tests/famfix.py). The per-module ΔW math itself is
    checked against LyCORIS' module forward in test_lycoris_parity.py; here the band placement is.
  - DoRA: PEFT (`use_dora=True`) on the tiny diffusers model is the oracle: its merge against our bake of
    the PEFT state dict into the fused native file.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.famcases import tiny_state
from tests.famfix import FAMILIES
from tests.lorafix import make_lora
from tests.test_family_merge import merge

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")


def _projections(sd):
    """(module, out, in) of every attention to_q/to_k/to_v (what the bands hold)."""
    return [
        (k[: -len(".weight")], *sd[k].shape)
        for k in sorted(sd)
        if k.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight"))
    ]


@pytest.mark.parametrize("family", ["z-image", "lumina2"])
@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_on_fused_bands_equals_bake_on_split_then_fuse(family, algo, tmp_path):
    fam = FAMILIES[family]
    sd = tiny_state(family)
    mods = [("lycoris_" + m.replace(".", "_"), o, i) for m, o, i in _projections(sd)]
    save_file(make_lora(mods, algo=algo, rank=4, alpha=2.0, lokr_w1="factored", seed=3), str(tmp_path / "l.safetensors"))
    save_file(fam.to_native(sd), str(tmp_path / "native.safetensors"))
    save_file(sd, str(tmp_path / "split.safetensors"))
    merge(tmp_path / "native.safetensors", f"{tmp_path / 'l.safetensors'}:0.8", tmp_path / "a.safetensors")
    merge(tmp_path / "split.safetensors", f"{tmp_path / 'l.safetensors'}:0.8", tmp_path / "b.safetensors")
    ours = load_file(str(tmp_path / "a.safetensors"))
    split = fam.to_native(load_file(str(tmp_path / "b.safetensors")))
    changed = {k for k in ours if not torch.equal(ours[k], fam.to_native(sd)[k])}
    assert changed == {k for k in ours if k.endswith("attention.qkv.weight")}
    for key in ours:
        torch.testing.assert_close(ours[key], split[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", ["z-image", "lumina2"])
def test_peft_dora_on_fused_bands_matches_peft_merge(family, tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from tests.test_crosscheck import peft_merged_state_dict, randomize_lora_b

    fam = FAMILIES[family]
    model = fam.model()
    model.load_state_dict(tiny_state(family))
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["to_q", "to_k", "to_v"])
    model = inject_adapter_in_model(config, model)
    randomize_lora_b(model, seed=5)
    with torch.no_grad():  # a trained magnitude is not the weight norm
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    lora = {"transformer." + k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    # PEFT alpha/r = 2: written as the file's alpha per module, as kohya-style tools do
    for key in [k for k in lora if k.endswith(".lora_A.weight")]:
        lora[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(8.0)
    save_file(lora, str(tmp_path / "dora.safetensors"))
    reference = fam.to_native(peft_merged_state_dict(model))
    base = fam.to_native(tiny_state(family))
    save_file(base, str(tmp_path / "native.safetensors"))
    merge(tmp_path / "native.safetensors", str(tmp_path / "dora.safetensors"), tmp_path / "out.safetensors")
    ours = load_file(str(tmp_path / "out.safetensors"))
    for key, want in reference.items():
        torch.testing.assert_close(ours[key], want, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    assert {k for k in base if not torch.equal(ours[k], base[k])} == {k for k in base if k.endswith("qkv.weight")}
