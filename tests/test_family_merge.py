"""`lorabake merge` of every family × flavour case against diffusers' fused weights (tests/famcases.py).

The tiny model of each family is written in its native layout (bare, bf16, as the official files ship) and in
the ComfyUI layout (`model.diffusion_model.`, fp32); each LoRA flavour is baked at strength 0.7 and every
tensor is compared with diffusers' `load_lora_weights` + `fuse_lora` on the same weights, mapped to native
names by the inverse of diffusers' own single-file converter:

  - exactly the tensors the LoRA targets change; all others are bit-identical to the base;
  - fp32 file: equal to diffusers' fp32 result within rtol 1e-5 (rounding order only);
  - bf16 file: within 1e-3 relative (norm) of diffusers' result rounded to bf16, and equal to it in at
    least 99% of the elements (a different fp32 rounding order can flip a bf16 rounding now and then).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli_helpers import run_main
from tests.famcases import CASES, build_case

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

COMFY = "model.diffusion_model."
# key list (tests/famfix.py) -> the family module in lorabake/arch that owns it
FAMILY_OF = {
    "qwen-image": "qwen-image",
    "qwen-image-2.1": "qwen-image",
    "flux2": "flux2",
    "z-image": "z-image",
    "lumina2": "lumina2",
    "chroma": "chroma",
    "hidream": "hidream",
    "krea2": "krea2",
}
DONE = set(FAMILY_OF)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def merge(base_path, lora_arg: str, out_path) -> dict:
    code, stdout, err = run_main(["merge", str(base_path), "--lora", lora_arg, "-o", str(out_path), "--json"])
    assert code == 0, err
    summary = json.loads(stdout)
    lora = summary["loras"][0]
    assert lora["unmatched"] == {} and lora["not_applied"] == []
    return summary


def assert_matches(ours: dict, want: dict, base: dict, *, bf16: bool) -> set[str]:
    assert set(ours) == set(base)
    changed = {k for k in base if not torch.equal(want[k].to(base[k].dtype), base[k])}
    assert {k for k in base if not torch.equal(ours[k], base[k])} == changed
    for key in changed:
        got, ref = ours[key].float(), want[key].float()
        if bf16:
            ref = ref.bfloat16().float()
            rel = ((got - ref).norm() / ref.norm()).item()
            same = (got == ref).float().mean().item()
            assert rel <= 1e-3 and same >= 0.99, f"{key}: relative {rel:.2e}, equal {same:.4f}"
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    return changed


@pytest.mark.parametrize("layout", ["native-bf16", "comfyui-fp32"])
@pytest.mark.parametrize("case", [c for c in CASES if c.family in DONE], ids=lambda c: c.id)
def test_merge_matches_diffusers_fuse_lora(case, layout, tmp_path):
    built = build_case(case)
    prefix, dtype = ("", torch.bfloat16) if layout == "native-bf16" else (COMFY, torch.float32)
    base = {prefix + k: v.to(dtype) for k, v in built.native.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    merge(tmp_path / "base.safetensors", f"{built.lora_path}:{case.strength}", tmp_path / "out.safetensors")
    ours = load_file(str(tmp_path / "out.safetensors"))
    want = {prefix + k: v for k, v in built.native_reference.items()}
    changed = assert_matches(ours, want, base, bf16=dtype == torch.bfloat16)
    assert len(changed) == len({prefix + k for k in built.native if k[: -len(".weight")] in built.lora}) or (
        built.case.naming == "diffusers"
    )


# another family's LoRA for each family's base: (key list, flavour, naming) of the foreign LoRA
FOREIGN = {
    "qwen-image": ("flux2", "aitk", "native"),
    "flux2": ("qwen-image", "kohya", "diffusers"),
    "z-image": ("lumina2", "peft", "diffusers"),
    "lumina2": ("z-image", "kohya", "diffusers"),
    "chroma": ("krea2", "aitk", "native"),
    "hidream": ("qwen-image", "peft", "diffusers"),
    "krea2": ("hidream", "aitk", "diffusers"),
}


def full_size_lora(keylist: str, flavour: str, naming: str) -> dict[str, torch.Tensor]:
    """A rank-1 LoRA on block 0 of every stack (and the top-level modules) at the real full-size shapes:
    what a user's file of that family looks like to the matcher (values are never read)."""
    from tests.archfix import arch_tensors
    from tests.famfix import FAMILIES as KEYLISTS
    from tests.famlora import lora_tensors, weight_shapes
    from tests.test_family_detect import _first_block

    if naming == "diffusers":
        model = KEYLISTS[keylist].model(full=True)
        shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    else:
        shapes = weight_shapes({k: torch.empty(e["shape"], device="meta") for k, e in arch_tensors(keylist).items()})
    lora = {n: (torch.zeros(1, c), torch.zeros(r, 1), None) for n, (r, c) in _first_block(shapes).items()}
    return lora_tensors(lora, flavour)


@pytest.mark.parametrize("family", sorted(FOREIGN))
def test_lora_of_another_family_is_refused_naming_both(family, tmp_path):
    own = build_case(next(c for c in CASES if c.family == family))
    other = FOREIGN[family]
    save_file({k: v.bfloat16() for k, v in own.native.items()}, str(tmp_path / "base.safetensors"))
    save_file(full_size_lora(*other), str(tmp_path / "lora.safetensors"))
    code, _, err = run_main(
        ["merge", str(tmp_path / "base.safetensors"), "--lora", str(tmp_path / "lora.safetensors"),
         "-o", str(tmp_path / "out.safetensors")]
    )
    assert code != 0 and err.startswith("Error:") and len(err.strip().splitlines()) == 1, err
    assert f"({family})" in err and FAMILY_OF[other[0]] in err.replace(f"({family})", ""), err
    assert not (tmp_path / "out.safetensors").exists()


def test_flag_tensor_passes_through_and_text_encoder_keys_are_skipped(tmp_path):
    """Qwen-Image Edit-2511 files carry `__index_timestep_zero__`; a LoRA's Qwen2.5-VL keys have no
    encoder to land on in a DiT-only file: reported as skipped naming the encoder, the DiT part baked."""
    built = build_case(next(c for c in CASES if c.id == "qwen-image-kohya-diffusers"))
    base = {k: v.bfloat16() for k, v in built.native.items()}
    base["__index_timestep_zero__"] = torch.zeros(1, dtype=torch.bfloat16)
    save_file(base, str(tmp_path / "base.safetensors"))
    lora = load_file(built.lora_path)
    lora["lora_te_model_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 8)
    lora["lora_te_model_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(8, 4)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    code, out, err = run_main(["merge", str(tmp_path / "base.safetensors"), "--lora", f"{tmp_path / 'lora.safetensors'}:0.7",
                               "-o", str(tmp_path / "out.safetensors"), "--json"])
    assert code == 0, err
    summary = json.loads(out)["loras"][0]
    assert summary["applied"] == {"dit": len(built.lora)} and summary["skipped"] == {"te1": 1}
    assert [(o["module"], o["status"], o["reason"]) for o in summary["not_applied"]] == [
        ("lora_te_model_layers_0_self_attn_q_proj", "skipped", "base has no Qwen2.5-VL text encoder")
    ]
    ours = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(ours["__index_timestep_zero__"], base["__index_timestep_zero__"])
    want = built.native_reference
    assert_matches({k: v for k, v in ours.items() if k in want}, want, {k: v for k, v in base.items() if k in want}, bf16=True)
