"""Text-encoder LoRA modules of the image families: applied where the base holds that encoder, skipped naming
it where it does not.

The encoders are decoder-only LLMs (Qwen2.5-VL, Qwen3, Qwen3-VL, Gemma 2, Mistral 3, Llama 3.1), stored with
transformers' causal-LM names: under `text_encoders.<ComfyUI name>.transformer.` in a ComfyUI all-in-one
file (comfy/text_encoders/*.py), under `text_encoder/` in a diffusers folder. Their LoRAs say
`text_encoder.model.layers.0.self_attn.q_proj` (PEFT/diffusers), `lora_te_layers_0_self_attn_q_proj`
(kohya sd-scripts trains the base model, no `model.` level) or the all-in-one file's own key (ComfyUI).

Oracle: PEFT's `merge_and_unload` on a tiny transformers Qwen3 for the whole encoder; the other families'
rows check the names on one real-named tensor each (ΔW = scale · up @ down).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorabake.arch import FAMILIES
from tests.cli_helpers import run_main

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _dit_probes(arch: str) -> dict[str, torch.Tensor]:
    """The family's probe tensors under `model.diffusion_model.`: enough for detection, real names."""
    layout = next(lay for lay in FAMILIES[arch].layouts if lay.prefix == "model.diffusion_model.")
    return {layout.prefix + p.key: torch.zeros(8, 8) for p in layout.probes}


def _merge(base, lora, out) -> tuple[int, dict | str]:
    code, stdout, err = run_main(["merge", str(base), "--lora", str(lora), "-o", str(out), "--json"])
    return code, (json.loads(stdout) if code == 0 else err)


# (family, ComfyUI's name of its encoder, what the skip line calls it, the LoRA's spelling of the module):
# each spelling is used by some row
ENCODERS = [
    ("qwen-image", "qwen25_7b", "Qwen2.5-VL", "lora_te_layers_3_mlp_down_proj"),  # kohya: the base model's path
    ("qwen-image", "qwen25_7b", "Qwen2.5-VL", "text_encoder.model.language_model.layers.3.mlp.down_proj"),  # PEFT on transformers >= 4.52
    ("z-image", "qwen3_4b", "Qwen3", "text_encoder.model.layers.3.mlp.down_proj"),  # PEFT/diffusers
    ("flux2", "mistral3_24b", "Mistral 3 (dev) or Qwen3 (klein)", "text_encoders.mistral3_24b.transformer.model.layers.3.mlp.down_proj"),
    ("flux2", "qwen3_8b", "Mistral 3 (dev) or Qwen3 (klein)", "lora_te_model_layers_3_mlp_down_proj"),  # kohya, the causal LM's path
    ("lumina2", "gemma2_2b", "Gemma 2", "lora_te_layers_3_mlp_down_proj"),  # kohya sd-scripts lora_lumina.py
    ("krea2", "qwen3vl_4b", "Qwen3-VL", "text_encoders.qwen3vl_4b.transformer.model.layers.3.mlp.down_proj"),  # ComfyUI
    ("hidream", "llama", "Llama 3.1", "text_encoder_4.model.layers.3.mlp.down_proj"),  # diffusers' fourth encoder
]


@pytest.mark.parametrize("arch, name, title, stem", ENCODERS, ids=[f"{a}-{n}-{s.split('.')[0]}" for a, n, _, s in ENCODERS])
def test_encoder_modules_apply_in_an_all_in_one_file_and_are_skipped_by_name_without_it(arch, name, title, stem, tmp_path):
    te_key = f"text_encoders.{name}.transformer.model.layers.3.mlp.down_proj.weight"
    dit = _dit_probes(arch)
    dit_module = next(iter(dit)).removeprefix("model.diffusion_model.").removesuffix(".weight")
    torch.manual_seed(0)
    base = {**dit, te_key: torch.randn(16, 24)}
    save_file(base, str(tmp_path / "aio.safetensors"))
    save_file(dit, str(tmp_path / "dit.safetensors"))
    down, up = torch.randn(2, 24), torch.randn(16, 2)
    lora = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(1.0),
            f"diffusion_model.{dit_module}.lora_down.weight": torch.randn(2, 8),
            f"diffusion_model.{dit_module}.lora_up.weight": torch.randn(8, 2)}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    code, summary = _merge(tmp_path / "aio.safetensors", tmp_path / "lora.safetensors", tmp_path / "out.safetensors")
    assert code == 0, summary
    assert summary["loras"][0]["applied"] == {"dit": 1, "te4" if arch == "hidream" else "te1": 1}
    ours = load_file(str(tmp_path / "out.safetensors"))[te_key]
    torch.testing.assert_close(ours, base[te_key] + 0.5 * up @ down, rtol=1e-6, atol=1e-6)

    code, stdout, err = run_main(["merge", str(tmp_path / "dit.safetensors"), "--lora", str(tmp_path / "lora.safetensors"),
                                  "-o", str(tmp_path / "dit-out.safetensors")])
    assert code == 0, err
    assert f"{stem}: base has no {title} text encoder" in stdout


def _tiny_qwen3():
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    torch.manual_seed(1)
    return transformers.Qwen3ForCausalLM(config).eval()


@pytest.mark.parametrize("layout", ["comfyui", "diffusers"])
def test_qwen3_encoder_lora_matches_peft_merge(layout, tmp_path):
    """Z-Image with its Qwen3: a PEFT LoRA on every linear of the encoder, baked by us into the all-in-one
    file and into a diffusers folder, equals PEFT's own merge; the same factors in kohya names too."""
    peft = pytest.importorskip("peft")
    model = _tiny_qwen3()
    own = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    factors = peft.get_peft_model_state_dict(peft_model)  # base_model.model.<module>.lora_A.weight
    want = peft_model.merge_and_unload().state_dict()
    dit = _dit_probes("z-image")
    if layout == "comfyui":
        root = "text_encoders.qwen3_4b.transformer."
        save_file({**dit, **{root + k: v for k, v in own.items()}}, str(tmp_path / "base.safetensors"))
        base, out_root = tmp_path / "base.safetensors", root
    else:  # model_index.json, transformer/ (the diffusers names) and text_encoder/
        base = tmp_path / "folder"
        (base / "transformer").mkdir(parents=True)
        (base / "text_encoder").mkdir()
        (base / "model_index.json").write_text("{}")
        names = ("layers.0.attention.to_q.weight", "x_pad_token", "all_x_embedder.2-1.weight")
        save_file({k: torch.zeros(8, 8) for k in names}, str(base / "transformer" / "diffusion_pytorch_model.safetensors"))
        save_file(own, str(base / "text_encoder" / "model.safetensors"))
        out_root = "text_encoder."
    peft_names = {k.replace("base_model.model.", "text_encoder.", 1): v for k, v in factors.items()}
    kohya: dict[str, torch.Tensor] = {}
    for key, value in factors.items():
        module, part = key.removeprefix("base_model.model.model.").rsplit(".lora_", 1)
        stem = "lora_te_" + module.replace(".", "_")
        kohya[f"{stem}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
        kohya[f"{stem}.alpha"] = torch.tensor(8.0)
    for name, lora in (("peft", peft_names), ("kohya", kohya)):
        # PEFT files carry no alpha: a diffusers pipeline save's metadata does (lora_alpha 8 / r 4); kohya's alpha tensors
        meta = {"lora_adapter_metadata": json.dumps({"text_encoder.r": 4, "text_encoder.lora_alpha": 8})} if name == "peft" else None
        save_file(lora, str(tmp_path / f"{name}.safetensors"), metadata=meta)
        code, summary = _merge(base, tmp_path / f"{name}.safetensors", tmp_path / f"{name}-out.safetensors")
        assert code == 0, summary
        assert summary["loras"][0]["applied"] == {"te1": 2 * len(targets)}, name
        ours = load_file(str(tmp_path / f"{name}-out.safetensors"))
        for key in own:
            torch.testing.assert_close(ours[out_root + key], want[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
