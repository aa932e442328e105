"""The layouts of the image families beyond the single native file, baked against diffusers' fuse_lora.

  - a diffusers folder (`model_index.json`, `transformer/` in two shards with their index), diffusers names:
    the output holds the transformer under `transformer.`, each tensor compared with diffusers' result;
  - a ComfyUI all-in-one file: `model.diffusion_model.` next to `vae.` and `text_encoders.<name>.` tensors,
    which pass through bit for bit while the DiT part is compared as in tests/test_family_merge.py.

One PEFT LoRA in diffusers names per family (tests/famcases.py); the other flavours meet the same rule
table through the native files of test_family_merge.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.famcases import CASES, build_case
from tests.test_family_merge import assert_matches, merge

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

PEFT_CASES = [c for c in CASES if c.flavour == "peft" and c.naming == "diffusers"]

# the text encoder a ComfyUI all-in-one file of the family carries (one tensor of it, in its own names)
AIO_ENCODER = {
    "qwen-image": "text_encoders.qwen25_7b.transformer.model.layers.0.self_attn.q_proj.weight",
    "qwen-image-2.1": "text_encoders.qwen25_7b.transformer.model.layers.0.self_attn.q_proj.weight",
    "flux2": "text_encoders.mistral3_24b.transformer.model.layers.0.self_attn.q_proj.weight",
    "z-image": "text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_proj.weight",
    "lumina2": "text_encoders.gemma2_2b.transformer.model.layers.0.self_attn.q_proj.weight",
    "chroma": "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight",
    "hidream": "text_encoders.llama.transformer.model.layers.0.self_attn.q_proj.weight",
    "krea2": "text_encoders.qwen3vl_4b.transformer.model.layers.0.self_attn.q_proj.weight",
}


def test_every_family_has_a_case():
    assert {c.family for c in PEFT_CASES} == set(AIO_ENCODER)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_diffusers_folder(root, sd: dict[str, torch.Tensor]) -> None:
    """`model_index.json` and `transformer/` in two shards with their index, as diffusers saves them."""
    (root / "transformer").mkdir(parents=True)
    keys = sorted(sd)
    names = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    weight_map = {}
    for name, part in zip(names, (keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        save_file({k: sd[k] for k in part}, str(root / "transformer" / name))
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Pipeline", "transformer": ["diffusers", "X"]}))


@pytest.mark.parametrize("case", PEFT_CASES, ids=lambda c: c.family)
def test_diffusers_folder_in_shards(case, tmp_path):
    built = build_case(case)
    write_diffusers_folder(tmp_path / "base", {k: v.bfloat16() for k, v in built.sd.items()})
    summary = merge(tmp_path / "base", f"{built.lora_path}:{case.strength}", tmp_path / "out.safetensors")
    assert summary["base_architecture"] == case.family.removesuffix("-2.1")
    ours = load_file(str(tmp_path / "out.safetensors"))
    base = {"transformer." + k: v.bfloat16() for k, v in built.sd.items()}
    want = {"transformer." + k: v for k, v in built.reference.items()}
    changed = assert_matches(ours, want, base, bf16=True)
    assert len(changed) >= len(built.lora)  # every LoRA module changed its tensor (fused ones count once)


@pytest.mark.parametrize("case", PEFT_CASES, ids=lambda c: c.family)
def test_comfyui_all_in_one_file(case, tmp_path):
    built = build_case(case)
    base = {"model.diffusion_model." + k: v.bfloat16() for k, v in built.native.items()}
    others = {
        "vae.decoder.conv_in.weight": torch.randn(8, 4, 3, 3).bfloat16(),
        AIO_ENCODER[case.family]: torch.randn(16, 16).bfloat16(),
    }
    save_file({**base, **others}, str(tmp_path / "base.safetensors"))
    summary = merge(tmp_path / "base.safetensors", f"{built.lora_path}:{case.strength}", tmp_path / "out.safetensors")
    assert summary["base_architecture"] == case.family.removesuffix("-2.1")
    ours = load_file(str(tmp_path / "out.safetensors"))
    for key, value in others.items():
        assert torch.equal(ours.pop(key), value), key
    want = {"model.diffusion_model." + k: v for k, v in built.native_reference.items()}
    assert_matches(ours, want, base, bf16=True)
