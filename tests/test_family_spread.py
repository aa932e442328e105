"""A fused adapter onto separate base tensors: ΔW built whole, each tensor given its rows.

  - Krea 2: SimpleTuner/LyCORIS train q, k, v as one `attn.to_qkv` module (rank r, up [q+k+v, r]); the
    original file stores `attn.wq/wk/wv` apart (k and v narrower: GQA). Reference: diffusers'
    `load_lora_weights` + `fuse_lora` of the exact per-projection equivalent (same down, up's bands).
  - LoKr on `to_qkv`: reference is the module's ΔW (fp64) cut into bands and added.
  - Z-Image in diffusers layout (split to_q/k/v) with an original-named fused `attention.qkv` LoRA.
  - DoRA on a fused module is not split: reported, nothing written.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorabake import delta
from tests.cli_helpers import run_main
from tests.famcases import CASES, build_case, tiny_state
from tests.famfix import FAMILIES
from tests.famlora import diffusers_fused, write_lora
from tests.lorafix import make_lora
from tests.test_family_merge import assert_matches, merge

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("peft")


def _attentions(sd) -> list[tuple[str, int, int, int]]:
    """(diffusers attention path, q rows, k rows, v rows) of every Krea 2 attention."""
    return [
        (k[: -len(".to_q.weight")], sd[k].shape[0], sd[k.replace("to_q", "to_k")].shape[0],
         sd[k.replace("to_q", "to_v")].shape[0])
        for k in sorted(sd)
        if k.endswith(".attn.to_q.weight")
    ]


@pytest.mark.parametrize("empty", [False, True], ids=["alone", "with-empty-to_q_k_v"])
@pytest.mark.parametrize("layout", ["native-bf16", "comfyui-fp32"])
def test_krea2_fused_to_qkv_lora_onto_separate_wq_wk_wv(layout, empty, tmp_path):
    """`empty`: the file also holds per-projection entries with an all-zero up (as Krea 2 LoRAs do next to
    the trained `to_qkv`): both modules land on wq/wk/wv, the empty ones adding nothing."""
    fam = FAMILIES["krea2"]
    sd = tiny_state("krea2")
    gen = torch.Generator().manual_seed(11)
    fused, split, zeros = {}, {}, {}
    for path, q, k, v in _attentions(sd):
        down = torch.randn(4, sd[path + ".to_q.weight"].shape[1], generator=gen) * 0.1
        up = torch.randn(q + k + v, 4, generator=gen) * 0.1
        fused[path + ".to_qkv"] = (down, up, 2.0)
        for name, a, b in (("to_q", 0, q), ("to_k", q, q + k), ("to_v", q + k, q + k + v)):
            split[f"{path}.{name}"] = (down, up[a:b], 2.0)
            zeros[f"{path}.{name}"] = (torch.randn(4, down.shape[1], generator=gen), torch.zeros(b - a, 4), 2.0)
    write_lora(tmp_path / "fused.safetensors", {**fused, **zeros} if empty else fused, "lycoris")
    write_lora(tmp_path / "split.safetensors", split, "peft")
    assert len(fused) == 4  # the tiny model's 2 blocks, 1 layer-wise and 1 refiner text-fusion block
    reference = fam.to_native(diffusers_fused(fam, sd, tmp_path / "split.safetensors", 0.7))
    prefix, dtype = ("", torch.bfloat16) if layout == "native-bf16" else ("model.diffusion_model.", torch.float32)
    base = {prefix + k: v.to(dtype) for k, v in fam.to_native(sd).items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    summary = merge(tmp_path / "base.safetensors", f"{tmp_path / 'fused.safetensors'}:0.7", tmp_path / "out.safetensors")
    assert summary["loras"][0]["applied"] == {"dit": len(fused) + (len(zeros) if empty else 0)}
    ours = load_file(str(tmp_path / "out.safetensors"))
    changed = assert_matches(ours, {prefix + k: v for k, v in reference.items()}, base, bf16=dtype == torch.bfloat16)
    assert changed == {k for k in base if k.endswith((".attn.wq.weight", ".attn.wk.weight", ".attn.wv.weight"))}


def test_krea2_fused_lokr_to_qkv_bands_of_the_whole_delta(tmp_path):
    fam = FAMILIES["krea2"]
    native = fam.to_native(tiny_state("krea2"))
    attns = _attentions(tiny_state("krea2"))
    mods = [("lycoris_" + (p + ".to_qkv").replace(".", "_"), q + k + v, native_width(native, p)) for p, q, k, v in attns]
    tensors = make_lora(mods, algo="lokr", rank=4, alpha=2.0, lokr_w1="full", lokr_w2="factored", seed=4)
    save_file(tensors, str(tmp_path / "lokr.safetensors"))
    save_file(native, str(tmp_path / "base.safetensors"))
    merge(tmp_path / "base.safetensors", f"{tmp_path / 'lokr.safetensors'}:0.5", tmp_path / "out.safetensors")
    ours = load_file(str(tmp_path / "out.safetensors"))
    for (path, q, k, v), (stem, rows, cols) in zip(attns, mods, strict=True):
        parts = {
            {"lokr_w1": "lokr_w1", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b", "alpha": "alpha"}[n.split(".")[-1]]:
            t.double() for n, t in tensors.items() if n.startswith(stem + ".")
        }
        dw = delta.delta("lokr", parts, out_shape=(rows, cols))
        native_path = _native_attn(path)
        for name, a, b in (("wq", 0, q), ("wk", q, q + k), ("wv", q + k, q + k + v)):
            key = f"{native_path}.{name}.weight"
            want = native[key].double() + 0.5 * dw[a:b]
            torch.testing.assert_close(ours[key].double(), want, rtol=1e-5, atol=1e-6)


def native_width(native, path: str) -> int:
    return native[f"{_native_attn(path)}.wq.weight"].shape[1]


def _native_attn(path: str) -> str:
    return path.replace("transformer_blocks.", "blocks.").replace("text_fusion.", "txtfusion.")


def test_z_image_diffusers_layout_takes_a_fused_qkv_lora(tmp_path):
    built = build_case(next(c for c in CASES if c.id == "z-image-aitk-native"))
    save_file(built.sd, str(tmp_path / "base.safetensors"))  # diffusers names: to_q / to_k / to_v apart
    merge(tmp_path / "base.safetensors", f"{built.lora_path}:{built.case.strength}", tmp_path / "out.safetensors")
    ours = load_file(str(tmp_path / "out.safetensors"))
    assert_matches(ours, built.reference, built.sd, bf16=False)


def test_dora_on_a_fused_module_is_split_by_rows(tmp_path):
    """A Krea 2 fused `to_qkv` DoRA with dora_scale [out, 1] gives each of wq, wk, wv its rows: the same as the DoRA of the concatenation, cut (DoRA's own math is checked against
    LyCORIS and PEFT in test_lycoris_parity, the split against them in test_family_dora_fused)."""
    native = FAMILIES["krea2"].to_native(tiny_state("krea2"))
    path, q, k, v = _attentions(tiny_state("krea2"))[0]
    stem = "lycoris_" + (path + ".to_qkv").replace(".", "_")
    tensors = make_lora([(stem, q + k + v, native_width(native, path))], algo="lora", rank=4, dora=True)
    save_file(tensors, str(tmp_path / "dora.safetensors"))
    save_file(native, str(tmp_path / "base.safetensors"))
    code, _, err = run_main(["merge", str(tmp_path / "base.safetensors"), "--lora", f"{tmp_path / 'dora.safetensors'}:0.7",
                             "-o", str(tmp_path / "out.safetensors")])
    assert code == 0, err
    keys = [f"{_native_attn(path)}.w{p}.weight" for p in "qkv"]
    fused = torch.cat([native[key] for key in keys]).float()
    parts = {"up": tensors[stem + ".lora_up.weight"], "down": tensors[stem + ".lora_down.weight"],
             "alpha": tensors[stem + ".alpha"], "dora_scale": tensors[stem + ".dora_scale"]}
    want = delta.apply_patches(fused, [delta.Patch("lora", parts, 0.7, dora=True)])
    ours = load_file(str(tmp_path / "out.safetensors"))
    torch.testing.assert_close(torch.cat([ours[key] for key in keys]).float(), want.to(ours[keys[0]].dtype).float())
