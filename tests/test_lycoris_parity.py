"""Parity with what adapters compute at run time: LyCORIS modules' forward, PEFT's merge.

Each case builds a real-shaped layer, wraps it in the library's own module, randomises every
parameter (LyCORIS zero-inits up/w2), runs its forward, then bakes the module's saved state dict
through `apply_patches` and runs the plain layer with the baked weight. Everything is fp64, so
the tolerance only has to absorb summation order. `lycoris.utils.merge` is deliberately not the
oracle (it applies alpha/rank twice for LoHa/LoKr).
"""

from __future__ import annotations

import os

os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lorabake.delta import Patch, apply_patches  # noqa: E402

lycoris_modules = pytest.importorskip("lycoris.modules")
from lycoris.modules.boft import ButterflyOFTModule  # noqa: E402
from lycoris.modules.diag_oft import DiagOFTModule  # noqa: E402
from lycoris.modules.glora import GLoRAModule  # noqa: E402
from lycoris.modules.ia3 import IA3Module  # noqa: E402
from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

RTOL = 1e-12  # max |Δy| relative to max |y|, fp64; measured ≤ 3e-14
# LyCORIS inverts the OFT Cayley matrix in fp32 whatever the module dtype, so OFT/BOFT run in fp32.
RTOL_FP32 = 1e-5
MEASURED: list[tuple[str, str, float, float]] = []  # (module, layer, strength, error), for reports

# LyCORIS saved name → canonical part name.
CANONICAL = {
    "lora_up.weight": "up",
    "lora_down.weight": "down",
    "lora_mid.weight": "mid",
    "alpha": "alpha",
    "dora_scale": "dora_scale",
    "weight": "ia3_weight",
    "on_input": "on_input",
    "oft_blocks": "oft_blocks",
    "rescale": "rescale",
    "a1.weight": "glora_a1",
    "a2.weight": "glora_a2",
    "b1.weight": "glora_b1",
    "b2.weight": "glora_b2",
    **{
        k: k
        for k in (
            "hada_w1_a hada_w1_b hada_w2_a hada_w2_b hada_t1 hada_t2 "
            "lokr_w1 lokr_w1_a lokr_w1_b lokr_w2 lokr_w2_a lokr_w2_b lokr_t2"
        ).split()
    },
}

ALGO = {
    LoConModule: "lora",
    LohaModule: "loha",
    LokrModule: "lokr",
    DiagOFTModule: "oft",
    ButterflyOFTModule: "boft",
    GLoRAModule: "glora",
    IA3Module: "ia3",
}


def _layer(kind: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    # Real SD1/SDXL shapes: attn to_q, ff proj, resnet conv 3x3, SDXL attn.
    layer = {
        "q320": lambda: nn.Linear(320, 320),
        "ff320": lambda: nn.Linear(320, 2560),
        "q1280": lambda: nn.Linear(1280, 1280),
        "conv320": lambda: nn.Conv2d(320, 320, 3, padding=1),
        "conv320x640": lambda: nn.Conv2d(320, 640, 3, padding=1),
        "conv1x1": lambda: nn.Conv2d(320, 640, 1),
    }[kind]()
    return layer.to(dtype)


def _input(layer: nn.Module, gen: torch.Generator) -> torch.Tensor:
    dtype = layer.weight.dtype
    if isinstance(layer, nn.Linear):
        return torch.randn(3, layer.in_features, generator=gen, dtype=dtype)
    return torch.randn(2, layer.in_channels, 6, 6, generator=gen, dtype=dtype)


def _plain(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return F.conv2d(x, weight, layer.bias, stride=layer.stride, padding=layer.padding)


def _run(cls, kind: str, strength: float, *, seed: int = 0, std: float = 0.05, dtype=torch.float64, rtol=RTOL, **kw):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    layer = _layer(kind, dtype)
    module = cls("parity", layer, multiplier=strength, **kw).to(dtype)
    with torch.no_grad():
        for name, p in module.named_parameters():
            around = 1.0 if name == "rescale" else 0.0  # a rescale near 0 would wipe the weight
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std + around)
    x = _input(layer, gen)
    with torch.no_grad():
        want = module(x)
        parts = {CANONICAL[k]: v.detach().clone() for k, v in module.state_dict().items()}
        patch = Patch(algo=ALGO[cls], parts=parts, strength=strength, dora="dora_scale" in parts)
        baked = apply_patches(layer.weight.detach().clone(), [patch])
        got = _plain(layer, x, baked)
        unpatched = _plain(layer, x, layer.weight)
    assert not torch.allclose(want, unpatched), "the adapter must change the output"
    err = ((want - got).abs().max() / want.abs().max()).item()
    MEASURED.append((cls.__name__, kind, strength, err))
    assert err < rtol, f"{cls.__name__} {kind} {kw} s={strength}: relative error {err:.3e}"
    return parts


LINEAR_CASES = [
    # (module class, layer, kwargs) with alpha ≠ rank everywhere.
    (LoConModule, "q320", dict(lora_dim=8, alpha=4)),
    (LoConModule, "ff320", dict(lora_dim=16, alpha=1)),
    (LoConModule, "conv320", dict(lora_dim=8, alpha=3)),  # LoCon 3x3: down [r,in,3,3], up [out,r,1,1]
    (LoConModule, "conv320x640", dict(lora_dim=8, alpha=3, use_tucker=True)),  # Tucker mid
    (LoConModule, "conv1x1", dict(lora_dim=4, alpha=2)),
    (LohaModule, "q320", dict(lora_dim=8, alpha=4)),
    (LohaModule, "conv320", dict(lora_dim=4, alpha=2)),  # flattened [r, in·9] factors
    (LohaModule, "conv320x640", dict(lora_dim=4, alpha=2, use_tucker=True)),
    (LokrModule, "ff320", dict(lora_dim=8, alpha=4)),  # w1 full, w2 factored
    (LokrModule, "q1280", dict(lora_dim=8, alpha=2, decompose_both=True)),  # both factored
    # w1 factored, w2 full: rank from w1_b
    (LokrModule, "ff320", dict(lora_dim=24, alpha=6, decompose_both=True, unbalanced_factorization=True)),
    (LokrModule, "q320", dict(lora_dim=8, alpha=4, full_matrix=True)),  # both full: scale 1
    (LokrModule, "q320", dict(lora_dim=4, alpha=2, factor=8)),
    (LokrModule, "conv320", dict(lora_dim=4, alpha=2)),  # conv w2_b [r, d·9]
    (LokrModule, "conv320x640", dict(lora_dim=4, alpha=2, use_tucker=True)),  # Tucker t2
]


@pytest.mark.parametrize("strength", [1.0, 0.7])
@pytest.mark.parametrize(("cls", "kind", "kw"), LINEAR_CASES)
def test_linear_adapters_match_forward(cls, kind, kw, strength):
    _run(cls, kind, strength, **kw)


def test_lokr_layouts_are_the_ones_named():
    """Guard the case list: each LoKr case really produces the factor layout it claims."""
    layouts = []
    for cls, kind, kw in LINEAR_CASES:
        if cls is LokrModule:
            parts = _run(cls, kind, 1.0, **kw)
            layouts.append(tuple(sorted(k for k in parts if k.startswith("lokr"))))
    assert ("lokr_w1", "lokr_w2_a", "lokr_w2_b") in layouts
    assert ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b") in layouts
    assert ("lokr_w1_a", "lokr_w1_b", "lokr_w2") in layouts
    assert ("lokr_w1", "lokr_w2") in layouts
    assert ("lokr_t2", "lokr_w1", "lokr_w2_a", "lokr_w2_b") in layouts


def test_lokr_full_matrix_ignores_a_foreign_alpha():
    """With both factors full, a stored alpha ≠ rank must not scale ΔW (LyCORIS applies 1)."""
    parts = _run(LokrModule, "q320", 1.0, lora_dim=4, alpha=2, full_matrix=True)
    layer = _layer("q320")
    w = layer.weight.detach()
    a = apply_patches(w, [Patch("lokr", parts, 1.0)])
    b = apply_patches(w, [Patch("lokr", {**parts, "alpha": torch.tensor(123.0)}, 1.0)])
    assert torch.equal(a, b)


DORA_CASES = [
    (LoConModule, "q320", dict(lora_dim=8, alpha=4)),
    (LoConModule, "conv320", dict(lora_dim=8, alpha=4)),
    (LohaModule, "q320", dict(lora_dim=8, alpha=4)),
    (LohaModule, "conv320x640", dict(lora_dim=4, alpha=2, use_tucker=True)),
    (LokrModule, "ff320", dict(lora_dim=8, alpha=4)),
    (LokrModule, "conv320", dict(lora_dim=4, alpha=2)),
]


@pytest.mark.parametrize("wd_on_out", [True, False])
@pytest.mark.parametrize(("cls", "kind", "kw"), DORA_CASES)
def test_dora_matches_forward_at_strength_1(cls, kind, kw, wd_on_out):
    # LyCORIS's runtime strength for DoRA is (W+ΔW)·(1 + s(m/‖·‖ − 1)); ours interpolates from W
    # (see apply_patches), so the two agree at s = 1 only. A large std makes ΔW matter to the norm.
    parts = _run(cls, kind, 1.0, std=0.2, weight_decompose=True, wd_on_out=wd_on_out, **kw)
    m = parts["dora_scale"]
    assert (m.shape[0] != 1) == wd_on_out  # [out,1,..] vs [1,in,..]


OFT_CASES = [
    (DiagOFTModule, "q320", dict(lora_dim=16, constraint=0)),
    (DiagOFTModule, "q320", dict(lora_dim=16, constraint=1e-4)),  # clamp active: ‖Q‖ > 1e-4·320
    (DiagOFTModule, "conv320x640", dict(lora_dim=8, constraint=0)),
    (ButterflyOFTModule, "q320", dict(lora_dim=10, constraint=0)),  # 6 butterfly stages, b = 10
    (ButterflyOFTModule, "conv320", dict(lora_dim=10, constraint=1e-4)),
]


@pytest.mark.parametrize("strength", [1.0, 0.7])
@pytest.mark.parametrize(("cls", "kind", "kw"), OFT_CASES)
def test_oft_boft_match_forward(cls, kind, kw, strength):
    _run(cls, kind, strength, dtype=torch.float32, rtol=RTOL_FP32, **kw)


@pytest.mark.parametrize(("cls", "kind"), [(DiagOFTModule, "q320"), (ButterflyOFTModule, "conv320")])
def test_oft_rescale_matches_forward_at_strength_1(cls, kind):
    # LyCORIS applies the full rescale at any strength; we interpolate it (s = 0 → W), so s = 1 only.
    parts = _run(cls, kind, 1.0, dtype=torch.float32, rtol=RTOL_FP32, lora_dim=10, rescaled=True)
    assert "rescale" in parts


@pytest.mark.parametrize("strength", [1.0, 0.7])
@pytest.mark.parametrize("kind", ["q320", "ff320", "conv320x640"])
def test_glora_matches_forward(kind, strength):
    _run(GLoRAModule, kind, strength, lora_dim=8, alpha=2)


@pytest.mark.parametrize("strength", [1.0, 0.7])
@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize("kind", ["ff320", "conv320x640"])
def test_ia3_matches_forward(kind, on_input, strength):
    _run(IA3Module, kind, strength, train_on_input=on_input)


# ----------------------------------------------------------------------------------------------
# PEFT: plain LoRA, DoRA ([out] magnitude, and [1,out,1,1] on a conv), lora_B.bias.

peft = pytest.importorskip("peft")


class _Net(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("kind", ["q320", "conv320x640"])
def test_peft_merge(kind, use_dora):
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    net = _Net(_layer(kind))
    base_w = net.layer.weight.detach().clone()
    base_b = net.layer.bias.detach().clone()
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["layer"], use_dora=use_dora, lora_bias=not use_dora)
    model = peft.get_peft_model(net, cfg)
    wrapped = model.base_model.model.layer
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2 + (1.0 if "magnitude" in name else 0))
        parts = {"up": wrapped.lora_B["default"].weight.clone(), "down": wrapped.lora_A["default"].weight.clone()}
        if use_dora:
            parts["magnitude"] = wrapped.lora_magnitude_vector["default"].weight.clone()
        else:
            parts["up_bias"] = wrapped.lora_B["default"].bias.clone()
    merged = model.merge_and_unload().layer
    patches = [Patch("lora", parts, 1.0, alpha_override=12.0, dora=use_dora)]
    got_w = apply_patches(base_w, patches)
    scale = (merged.weight - base_w).abs().max()
    assert ((got_w - merged.weight).abs().max() / scale).item() < 1e-10
    if not use_dora:  # PEFT refuses lora_bias together with DoRA
        got_b = apply_patches(base_b, [Patch("lora", parts, 1.0, alpha_override=12.0, param="bias")])
        assert not torch.equal(merged.bias, base_b)
        assert torch.allclose(got_b, merged.bias, rtol=0, atol=1e-12)
