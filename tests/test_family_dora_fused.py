"""DoRA across fused and split tensors (Z-Image: fused `attention.qkv` in its own files, separate
`attention.to_q/to_k/to_v` in diffusers'), both directions, against PEFT's own merge.

DoRA rescales each output row of W + ΔW by m / ‖row‖ (PEFT's `lora_magnitude_vector`, LyCORIS's `dora_scale`
[out, 1]). A row's result needs only that row, so:
  - a per-projection DoRA module on a fused base is its band of rows, exactly (the band IS the module's weight);
  - a fused DoRA module on separate bases gives each tensor its rows of ΔW and of m, exactly.
A LyCORIS `dora_scale` [1, in] normalises each input column over all rows of the fused weight, which one
separate tensor does not hold: refused by name.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli_helpers import run_main

peft = pytest.importorskip("peft")

H = 16  # Z-Image's q, k and v have H rows each (its bands: q = H rows, k and v split the rest)


class _Split(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(H, H, bias=False) for _ in range(3))


class _Fused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(H, 3 * H, bias=False)


def _peft_dora(model: torch.nn.Module, targets: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(PEFT's LoRA tensors, the merged weights) of a rank-2 DoRA with alpha = rank and magnitudes moved off ‖W + ΔW‖."""
    torch.manual_seed(3)
    config = peft.LoraConfig(r=2, lora_alpha=2, use_dora=True, target_modules=targets, init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.rand_like(param) + 0.5)  # else m = ‖W + ΔW‖ and DoRA is the plain LoRA
    factors = peft.get_peft_model_state_dict(wrapped)
    return factors, {k: v.detach().clone() for k, v in wrapped.merge_and_unload().state_dict().items()}


def _lora_file(path, factors: dict[str, torch.Tensor], module_of: dict[str, str]) -> None:
    """PEFT's tensors under ai-toolkit/ComfyUI's `diffusion_model.` + the Z-Image module name."""
    out = {}
    for key, value in factors.items():
        rel = key.removeprefix("base_model.model.")
        own, rest = rel.split(".", 1)
        out[f"diffusion_model.{module_of[own]}.{rest}"] = value.contiguous()
    save_file(out, str(path))


def _merge(base, lora, out) -> dict:
    code, stdout, err = run_main(["merge", str(base), "--lora", str(lora), "-o", str(out), "--json"])
    assert code == 0, err
    return json.loads(stdout)


def test_per_projection_dora_on_a_fused_qkv_is_its_band(tmp_path):
    model = _Split()
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    factors, want = _peft_dora(model, ["to_q", "to_k", "to_v"])
    qkv = torch.cat([own[f"to_{p}.weight"] for p in "qkv"])
    save_file({"layers.0.attention.qkv.weight": qkv, "x_pad_token": torch.zeros(1, H)}, str(tmp_path / "base.safetensors"))
    _lora_file(tmp_path / "lora.safetensors", factors, {f"to_{p}": f"layers.0.attention.to_{p}" for p in "qkv"})
    summary = _merge(tmp_path / "base.safetensors", tmp_path / "lora.safetensors", tmp_path / "out.safetensors")
    assert summary["loras"][0]["applied"] == {"dit": 3}
    ours = load_file(str(tmp_path / "out.safetensors"))["layers.0.attention.qkv.weight"]
    torch.testing.assert_close(ours, torch.cat([want[f"to_{p}.weight"] for p in "qkv"]), rtol=1e-5, atol=1e-6)


def _split_base(path, fused: torch.Tensor) -> None:
    tensors = {f"layers.0.attention.to_{p}.weight": band for p, band in zip("qkv", fused.split(H))}
    save_file({**tensors, "x_pad_token": torch.zeros(1, H), "all_x_embedder.2-1.weight": torch.zeros(H, 4)}, str(path))


def test_fused_dora_on_separate_q_k_v_gives_each_its_rows(tmp_path):
    model = _Fused()
    fused = model.qkv.weight.detach().clone()
    factors, want = _peft_dora(model, ["qkv"])
    _split_base(tmp_path / "base.safetensors", fused)
    _lora_file(tmp_path / "lora.safetensors", factors, {"qkv": "layers.0.attention.qkv"})
    summary = _merge(tmp_path / "base.safetensors", tmp_path / "lora.safetensors", tmp_path / "out.safetensors")
    assert summary["loras"][0]["applied"] == {"dit": 1}
    ours = load_file(str(tmp_path / "out.safetensors"))
    torch.testing.assert_close(
        torch.cat([ours[f"layers.0.attention.to_{p}.weight"] for p in "qkv"]), want["qkv.weight"], rtol=1e-5, atol=1e-6
    )


def test_fused_dora_normalising_input_columns_is_refused_by_name(tmp_path):
    torch.manual_seed(4)
    _split_base(tmp_path / "base.safetensors", torch.randn(3 * H, H))
    stem = "lora_unet_layers_0_attention_qkv"  # LyCORIS with wd_on_out=False: dora_scale [1, in]
    lora = {f"{stem}.lora_down.weight": torch.randn(2, H), f"{stem}.lora_up.weight": torch.randn(3 * H, 2),
            f"{stem}.alpha": torch.tensor(2.0), f"{stem}.dora_scale": torch.rand(1, H) + 0.5}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    code, _, err = run_main(["merge", str(tmp_path / "base.safetensors"), "--lora", str(tmp_path / "lora.safetensors"),
                             "-o", str(tmp_path / "out.safetensors")])
    assert code == 1 and not (tmp_path / "out.safetensors").exists()
    assert "DoRA normalising input columns (dora_scale [1, 16]) of a fused module cannot be split over 3 separate tensors" in err, err


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_fused_lycoris_dora_on_separate_q_k_v_matches_its_forward(kind, tmp_path):
    """LoHa and LoKr with DoRA (LyCORIS `weight_decompose`, `wd_on_out`: dora_scale [out, 1]) on a fused qkv,
    baked into separate q, k, v: the rows of the weight LyCORIS's own forward computes."""
    modules = pytest.importorskip("lycoris.modules")
    cls = {"loha": modules.loha.LohaModule, "lokr": modules.lokr.LokrModule}[kind]
    torch.manual_seed(5)
    layer = torch.nn.Linear(H, 3 * H, bias=False).double()
    fused = layer.weight.detach().clone()
    module = cls("qkv", layer, lora_dim=2, alpha=1, weight_decompose=True, wd_on_out=True).double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        want = module(torch.eye(H, dtype=torch.float64)).T  # x @ W'ᵀ with x = I: the weight LyCORIS uses
    stem = "lora_unet_layers_0_attention_qkv"
    save_file({f"{stem}.{k}": v.float().contiguous() for k, v in module.state_dict().items()}, str(tmp_path / "lora.safetensors"))
    _split_base(tmp_path / "base.safetensors", fused.float())
    summary = _merge(tmp_path / "base.safetensors", tmp_path / "lora.safetensors", tmp_path / "out.safetensors")
    assert summary["loras"][0]["applied"] == {"dit": 1}
    ours = load_file(str(tmp_path / "out.safetensors"))
    got = torch.cat([ours[f"layers.0.attention.to_{p}.weight"] for p in "qkv"]).double()
    assert not torch.allclose(want, fused, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
