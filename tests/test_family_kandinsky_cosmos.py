"""Kandinsky 5 and Cosmos Predict2 / Anima: detection from the full-size key lists, LoRAs against diffusers.

Kandinsky 5's names are the same in its own files and in diffusers, so a LoRA is spelled bare,
`transformer.` (diffusers, ComfyUI's Kandinsky5 map) or `diffusion_model.`. Cosmos Predict2's files carry
`net.`; diffusers-named LoRAs go through the renames of diffusers' single-file converter. The reference is
PEFT through diffusers' `load_lora_adapter` + `fuse_lora` on the same tiny model; diffusers has no reader
for kohya-named Cosmos LoRAs other than Anima's, so those are fed to it in diffusers names (the same
tensors, renamed by tests/videofam.py's rows, which diffusers' converter checks).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorabake.detect import detect_checkpoint
from lorabake.st_header import TensorInfo
from tests.cli_helpers import run_main
from tests.videofam import ARCH_DIR, VARIANTS, build_model, to_native
from tests.videolora import (
    assert_close,
    fused_reference,
    linear_modules,
    random_lora,
    to_diffusers_lora,
    write,
)

pytest.importorskip("diffusers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

STRENGTH = 0.7


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("name", "arch", "prefix", "words"),
    [("kandinsky5-lite-t2v", "kandinsky5", "", ("Lite",)), ("cosmos-predict2-2b-t2i", "cosmos", "net.", ())],
)
def test_full_size_is_detected(name, arch, prefix, words):
    with open(os.path.join(ARCH_DIR, f"{name}.json"), encoding="utf-8") as fh:
        tensors = json.load(fh)["tensors"]
    info = detect_checkpoint({k: TensorInfo(k, "BF16", tuple(v["shape"]), 0, 0) for k, v in tensors.items()})
    assert (info.arch, info.prefix) == (arch, prefix), info.notes
    for word in words:
        assert word in " ".join(info.notes)


def _bake_and_compare(tmp_path, name: str, flavour: str, *, alpha=None):
    variant = VARIANTS[name]
    native = to_native(variant, build_model(variant, tiny=True).state_dict())
    base = tmp_path / "base.safetensors"
    save_file(native, str(base))
    lora = random_lora(native, linear_modules(native), alpha=alpha, seed=1)
    diffusers_lora = to_diffusers_lora(variant, lora, build_model(variant, tiny=True).state_dict())
    tensors = diffusers_lora if flavour == "diffusers" else write(flavour, lora, strip=variant.prefix)
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path))
    out = tmp_path / "out.safetensors"
    code, stdout, err = run_main(["merge", str(base), "--lora", f"{path}:{STRENGTH}", "-o", str(out), "--json"])
    assert code == 0, err
    summary = json.loads(stdout)["loras"][0]
    assert summary["unmatched"] == {} and summary["not_applied"] == []
    reference = fused_reference(variant, diffusers_lora, STRENGTH)
    changed = assert_close(load_file(str(out)), reference, native)
    assert changed == {m + ".weight" for m in lora}
    return changed


@pytest.mark.parametrize(("flavour", "alpha"), [("diffusers", None), ("diffsynth", None), ("musubi", 4.0),
                                                ("comfy_ab", None)])
def test_kandinsky5_lora_flavours(tmp_path, flavour, alpha):
    changed = _bake_and_compare(tmp_path, "kandinsky5-lite-t2v", flavour, alpha=alpha)
    assert "visual_transformer_blocks.0.cross_attention.to_query.weight" in changed


@pytest.mark.parametrize(("flavour", "alpha"), [("diffusers", None), ("musubi", 4.0), ("comfy", 4.0)])
def test_cosmos_predict2_lora_flavours(tmp_path, flavour, alpha):
    changed = _bake_and_compare(tmp_path, "cosmos-predict2-2b-t2i", flavour, alpha=alpha)
    assert {"net.blocks.0.self_attn.q_proj.weight", "net.blocks.1.mlp.layer2.weight",
            "net.x_embedder.proj.1.weight"} <= changed


def test_anima_text_encoder_modules_have_no_target_in_a_dit_base(tmp_path):
    """Anima's kohya LoRAs carry `lora_te_` modules for its Qwen3 text encoder, a separate file: reported as
    skipped by name next to the DiT modules baked; a LoRA of only such modules would change nothing: refused."""
    variant = VARIANTS["cosmos-predict2-2b-t2i"]
    native = to_native(variant, build_model(variant, tiny=True).state_dict())
    base = tmp_path / "base.safetensors"
    save_file(native, str(base))
    te = {"lora_te_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 16),
          "lora_te_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(16, 4)}
    dit = write("musubi", random_lora(native, ["net.blocks.0.self_attn.q_proj"], alpha=4.0), strip="net.")
    save_file({**dit, **te}, str(tmp_path / "both.safetensors"))
    save_file(te, str(tmp_path / "te.safetensors"))

    code, out, err = run_main(["merge", str(base), "--lora", str(tmp_path / "both.safetensors"), "-o",
                               str(tmp_path / "out.safetensors")])
    assert code == 0, err
    assert "lora_te_layers_0_self_attn_q_proj: base has no te1" in out
    changed = {k for k, v in load_file(str(tmp_path / "out.safetensors")).items() if not torch.equal(v, native[k])}
    assert changed == {"net.blocks.0.self_attn.q_proj.weight"}

    code, _, err = run_main(["merge", str(base), "--lora", str(tmp_path / "te.safetensors"), "-o",
                             str(tmp_path / "idle.safetensors")])
    assert code == 1 and "changes no tensor" in err and "lora_te_layers_0_self_attn_q_proj" in err
    assert not (tmp_path / "idle.safetensors").exists()
