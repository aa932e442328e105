"""Files written by LyCORIS itself, baked by `lorabake merge`, against LyCORIS's own forward.

Each case builds a pico model whose module tree has the real names and shapes of a few SD1.5 or
SDXL UNet/text-encoder layers (diffusers names for SD1, SGM names for SDXL, HF CLIP names for the
text encoders: what kohya sd-scripts hands to LyCORIS) and whose container classes carry the
class names LyCORIS's kohya wrapper targets (`Transformer2DModel`, `ResnetBlock2D`,
`CLIPAttention`). `lycoris.kohya.create_network` wraps it, so the module names (`lora_unet_…`,
`lora_te…`) and the saved keys are LyCORIS's own. Every adapter parameter is randomised (LyCORIS
zero-inits up/w2) with alpha ≠ rank, the network is saved with `save_weights`, and a checkpoint
with the real LDM/SGM names holding the very same weights is written. After `lorabake merge`,
for every wrapped layer `F.linear/conv2d(x, W')` must equal the wrapped layer's forward (fp64):
tightly for an fp32 base, within the fp16 rounding of W' for an fp16 base.
`lycoris.utils.merge` is not the oracle (it applies alpha/rank twice for LoHa/LoKr).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from tests.archfix import arch_tensors, select  # noqa: E402
from tests.cli_helpers import run_main  # noqa: E402
from tests.lorafix import make_lora, save_lora  # noqa: E402

lycoris_kohya = pytest.importorskip("lycoris.kohya")

MEASURED: list[tuple[str, str, str, float, float]] = []  # (case, layer, base dtype, strength, error), for reports


# ----------------------------------------------------------------------------------------------
# Pico models. Class names are what LyCORIS's kohya wrapper matches on.


class Transformer2DModel(nn.Module):
    pass


class ResnetBlock2D(nn.Module):
    pass


class CLIPAttention(nn.Module):
    pass


def _mod(**children: nn.Module) -> nn.Module:
    m = nn.Module()
    for name, child in children.items():
        setattr(m, name, child)
    return m


def _at(index: int, child: nn.Module) -> nn.ModuleList:
    """A ModuleList with `child` at `index` (placeholders before it), for SGM's numbered blocks."""
    return nn.ModuleList([nn.Identity() for _ in range(index)] + [child])


def _clip_layer0(width: int) -> tuple[nn.Module, nn.Linear]:
    attn = CLIPAttention()
    attn.q_proj = nn.Linear(width, width)
    return _mod(text_model=_mod(encoder=_mod(layers=nn.ModuleList([_mod(self_attn=attn)])))), attn.q_proj


@dataclass
class Pico:
    te: nn.Module | list[nn.Module]
    unet: nn.Module
    # LyCORIS module name -> (layer, checkpoint weight key, first row of a fused slice or None)
    layers: dict[str, tuple[nn.Module, str, int | None]]

    def __post_init__(self):
        for m in [*(self.te if isinstance(self.te, list) else [self.te]), self.unet]:
            m.double()


SD1_TB = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0."
SD1_TE = "cond_stage_model.transformer.text_model.encoder.layers.0."


def sd1_pico(*, with_norm: bool = False) -> Pico:
    tb = _mod(
        attn1=_mod(to_q=nn.Linear(320, 320, bias=False)),
        attn2=_mod(to_k=nn.Linear(768, 320, bias=False)),  # cross-attn from CLIP-L
        ff=_mod(net=nn.ModuleList([_mod(proj=nn.Linear(320, 2560))])),
    )
    if with_norm:
        tb.norm1 = nn.LayerNorm(320)
    t2d = Transformer2DModel()
    t2d.proj_in = nn.Conv2d(320, 320, 1)  # SD1 proj_in is a 1x1 conv
    t2d.transformer_blocks = nn.ModuleList([tb])
    rb = ResnetBlock2D()
    rb.conv1 = nn.Conv2d(320, 320, 3, padding=1)
    unet = _mod(down_blocks=nn.ModuleList([_mod(attentions=nn.ModuleList([t2d]), resnets=nn.ModuleList([rb]))]))
    te, q_proj = _clip_layer0(768)
    u = "lora_unet_down_blocks_0_"
    layers = {
        u + "attentions_0_transformer_blocks_0_attn1_to_q": (tb.attn1.to_q, SD1_TB + "attn1.to_q.weight", None),
        u + "attentions_0_transformer_blocks_0_attn2_to_k": (tb.attn2.to_k, SD1_TB + "attn2.to_k.weight", None),
        u + "attentions_0_transformer_blocks_0_ff_net_0_proj": (tb.ff.net[0].proj, SD1_TB + "ff.net.0.proj.weight", None),
        u + "attentions_0_proj_in": (t2d.proj_in, "model.diffusion_model.input_blocks.1.1.proj_in.weight", None),
        u + "resnets_0_conv1": (rb.conv1, "model.diffusion_model.input_blocks.1.0.in_layers.2.weight", None),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (q_proj, SD1_TE + "self_attn.q_proj.weight", None),
    }
    if with_norm:
        layers[u + "attentions_0_transformer_blocks_0_norm1"] = (tb.norm1, SD1_TB + "norm1.weight", None)
    return Pico(te, unet, layers)


def sdxl_pico() -> Pico:
    rb = ResnetBlock2D()
    rb.in_layers = nn.Sequential(nn.Identity(), nn.Identity(), nn.Conv2d(320, 640, 3, padding=1))
    t2d = Transformer2DModel()
    t2d.transformer_blocks = nn.ModuleList([_mod(attn2=_mod(to_k=nn.Linear(2048, 640, bias=False)))])
    unet = _mod(input_blocks=_at(4, nn.ModuleList([rb, t2d])))
    te1, q1 = _clip_layer0(768)
    te2, q2 = _clip_layer0(1280)  # OpenCLIP-G: q is rows 0..1280 of the fused in_proj
    layers = {
        "lora_unet_input_blocks_4_0_in_layers_2": (rb.in_layers[2], "model.diffusion_model.input_blocks.4.0.in_layers.2.weight", None),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (
            t2d.transformer_blocks[0].attn2.to_k,
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
            None,
        ),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (
            q1,
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
            None,
        ),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (
            q2,
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            0,
        ),
    }
    return Pico([te1, te2], unet, layers)


ARCHS = {
    "sd1": (
        sd1_pico,
        [
            r"model\.diffusion_model\.input_blocks\.1\.0\.in_layers\.2\.",
            r"model\.diffusion_model\.input_blocks\.1\.1\.(proj_in|transformer_blocks\.0\.(attn1\.to_q|attn2\.to_k|ff\.net\.0|norm1))\.",
            r"cond_stage_model\.transformer\.text_model\.encoder\.layers\.0\.self_attn\.q_proj\.",
        ],
        {"ss_base_model_version": "sd_v1"},
    ),
    "sdxl": (
        sdxl_pico,
        [
            r"model\.diffusion_model\.input_blocks\.4\.(0\.in_layers\.2|1\.transformer_blocks\.0\.attn2\.to_k)\.",
            r"conditioner\.embedders\.0\.transformer\.text_model\.encoder\.layers\.0\.self_attn\.q_proj\.",
            r"conditioner\.embedders\.1\.model\.transformer\.resblocks\.0\.attn\.in_proj_",
        ],
        {"ss_base_model_version": "sdxl_base_v1-0"},
    ),
}


def _bias_key(key: str) -> str:
    return key.replace("in_proj_weight", "in_proj_bias") if key.endswith("in_proj_weight") else key[: -len("weight")] + "bias"


def _rows(t: torch.Tensor, start: int | None, n: int) -> torch.Tensor:
    return t if start is None else t[start : start + n]


def build_base(path, arch: str, pico: Pico, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Real names/shapes of the arch's selected blocks, random values; the pico layers get the
    very same values (fp64 copies), so the two models are one."""
    _, patterns, _ = ARCHS[arch]
    spec = arch_tensors(arch)
    gen = torch.Generator().manual_seed(seed)
    base = {}
    for name in select(arch, patterns):
        shape = spec[name]["shape"]
        if spec[name]["dtype"] in ("int64", "int32"):
            base[name] = torch.zeros(shape, dtype=torch.int64)
        elif name.endswith(("norm1.weight", "norm.weight")):
            base[name] = (1 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
        else:
            base[name] = (0.02 * torch.randn(shape, generator=gen)).to(dtype)
    save_file(base, str(path))
    with torch.no_grad():
        for layer, key, start in pico.layers.values():
            n = layer.weight.shape[0]
            layer.weight.copy_(_rows(base[key], start, n).double())
            if getattr(layer, "bias", None) is not None:
                layer.bias.copy_(_rows(base[_bias_key(key)], start, n).double())
    return base


def randomise(network: nn.Module, std: float, gen: torch.Generator) -> None:
    """Random adapter parameters, rounded to fp32 (what the saved file holds) so the fp64 forward
    and the file agree exactly. DoRA magnitudes and (IA)³/norm/OFT keep their scale of 1."""
    with torch.no_grad():
        for name, p in network.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if name.endswith("dora_scale"):
                value = p * (1 + 0.1 * noise)
            elif name.endswith(("oft_blocks", ".weight")) and ("oft" in name or p.dim() == 1):
                value = 0.05 * noise  # IA3 `weight`, OFT blocks: small
            else:
                value = std * noise
            p.copy_(value.float().double())


def make_lycoris_file(path, pico: Pico, algo: str, *, dim: int, alpha: float, conv_dim: int, conv_alpha: float, std: float, seed: int, metadata, **kw):
    logging.disable(logging.WARNING)  # LyCORIS logs every unmatched target class
    try:
        net = lycoris_kohya.create_network(
            1.0, dim, alpha, None, pico.te, pico.unet, algo=algo, conv_dim=conv_dim, conv_alpha=conv_alpha, **kw
        )
    finally:
        logging.disable(logging.NOTSET)
    net = net.to(torch.float64)
    net.apply_to(pico.te, pico.unet, True, True)
    randomise(net, std, torch.Generator().manual_seed(seed))
    names = {lora.lora_name for lora in net.loras}
    assert names == set(pico.layers), f"LyCORIS named {sorted(names ^ set(pico.layers))} differently"
    net.save_weights(str(path), torch.float32, dict(metadata))
    return net


# ----------------------------------------------------------------------------------------------
# Checking one baked layer against the wrapped layer's forward.


def _x(layer: nn.Module, gen: torch.Generator) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, layer.in_channels, 6, 6, generator=gen, dtype=torch.float64)
    n = layer.in_features if isinstance(layer, nn.Linear) else layer.normalized_shape[0]
    return torch.randn(3, n, generator=gen, dtype=torch.float64)


def _plain(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, w, b, stride=layer.stride, padding=layer.padding)
    if isinstance(layer, nn.LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, w, b, layer.eps)
    return F.linear(x, w, b)


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fi = torch.finfo(dtype)
    _, e = torch.frexp(x.double().abs())
    mbits = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[dtype]
    emin = {torch.float16: -14, torch.bfloat16: -126, torch.float32: -126}[dtype]
    del fi
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), torch.clamp(e - 1, min=emin) - mbits)


def check_layers(case: str, pico: Pico, base: dict, merged: dict, dtype: torch.dtype, strength: float, *, rtol32: float = 1e-5):
    gen = torch.Generator().manual_seed(7)
    for name, (layer, key, start) in pico.layers.items():
        n = layer.weight.shape[0]
        w_new = _rows(merged[key], start, n)
        assert w_new.dtype == dtype
        bias = getattr(layer, "bias", None)
        b_new = _rows(merged[_bias_key(key)], start, n).double() if bias is not None else None
        x = _x(layer, gen)
        with torch.no_grad():
            want = layer(x)  # LyCORIS's forward (the network is applied with this multiplier)
            plain = _plain(layer, x, layer.weight, bias)
            got = _plain(layer, x, w_new.double(), b_new)
        effect = (want - plain).abs().max().item()
        err = (got - want).abs()
        MEASURED.append((case, name, str(dtype), strength, err.max().item() / effect))
        if dtype == torch.float32:
            assert err.max().item() <= rtol32 * effect, f"{case} {name}: error {err.max().item():.3e} vs effect {effect:.3e}"
        else:
            # Each weight is within one ulp of fp16 of the exact value (half an ulp plus the fp32
            # intermediate), so |Δy| ≤ |x|·ulp(W') summed over the inputs.
            if isinstance(layer, nn.LayerNorm):
                bound = (_plain(layer, x, None, None).abs() * _ulp(w_new, dtype) + _ulp(_rows(merged[_bias_key(key)], start, n), dtype))
            else:
                bound = _plain(layer, x.abs(), _ulp(w_new, dtype), None)
            bound = bound + 1e-9 * want.abs().max()
            assert bool((err <= bound).all()), f"{case} {name}: {(err / bound).max().item():.2f} × the fp16 rounding bound"
            assert effect > 5 * bound.max().item(), f"{case} {name}: the adapter's effect is lost in rounding; test is vacuous"
        if start is not None:  # the rest of a fused tensor is untouched
            rest = torch.cat([merged[key][:start], merged[key][start + n :]])
            assert torch.equal(rest, torch.cat([base[key][:start], base[key][start + n :]]))


def merge(tmp_path, base_path, lora_path, strength: float, name: str):
    out = tmp_path / name
    code, stdout, err = run_main(["merge", str(base_path), "--lora", f"{lora_path}:{strength}", "-o", str(out), "--json"])
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["loras"][0]["not_applied"] == [], doc["loras"][0]["not_applied"]
    return doc, load_file(str(out))


def run_case(tmp_path, case: str, arch: str, algo: str, *, strengths32=(1.0, 0.6), strength16=0.6, rtol32=1e-5, pico_kw=None, **kw):
    build, _, metadata = ARCHS[arch]
    for dtype, strengths in ((torch.float32, strengths32), (torch.float16, (strength16,))):
        pico = build(**(pico_kw or {}))
        base_path = tmp_path / f"base_{str(dtype)[6:]}.safetensors"
        base = build_base(base_path, arch, pico, dtype)
        lora_path = tmp_path / f"{case}_{str(dtype)[6:]}.safetensors"
        net = make_lycoris_file(lora_path, pico, algo, seed=1, metadata=metadata, **kw)
        for s in strengths:
            net.set_multiplier(s)
            doc, merged = merge(tmp_path, base_path, lora_path, s, f"out_{str(dtype)[6:]}_{s}.safetensors")
            assert doc["tensors_changed"] == len({k for _, k, _ in pico.layers.values()})
            check_layers(case, pico, base, merged, dtype, s, rtol32=rtol32)
            for key, t in merged.items():  # everything not wrapped is byte-identical
                if key not in {k for _, k, _ in pico.layers.values()} and key not in {_bias_key(k) for _, k, _ in pico.layers.values()}:
                    assert torch.equal(t, base[key]), key


# (case id, arch, algo, create_network kwargs). dim ≠ alpha everywhere; LoCon/LoHa/LoKr scale
# ΔW by multiplier at run time, so strength 0.6 is defined by LyCORIS's forward too.
CASES = [
    ("sd1-loha", "sd1", "loha", dict(dim=8, alpha=4, conv_dim=4, conv_alpha=2, std=0.25)),  # conv: flattened factors
    # Linears: w1 full + w2 factored; the 3x3 conv: Tucker lokr_t2.
    ("sd1-lokr-tucker", "sd1", "lokr", dict(dim=8, alpha=2, conv_dim=4, conv_alpha=1, std=0.2, use_tucker=True)),
    ("sd1-locon-tucker", "sd1", "locon", dict(dim=8, alpha=3, conv_dim=4, conv_alpha=2, std=0.1, use_tucker=True)),  # lora_mid
    ("sdxl-loha-tucker", "sdxl", "loha", dict(dim=8, alpha=4, conv_dim=4, conv_alpha=3, std=0.25, use_tucker=True)),  # hada_t1/t2
    ("sdxl-lokr-both-factored", "sdxl", "lokr", dict(dim=8, alpha=2, conv_dim=4, conv_alpha=1, std=0.2, decompose_both=True)),
    ("sdxl-locon-tucker", "sdxl", "locon", dict(dim=8, alpha=3, conv_dim=4, conv_alpha=2, std=0.1, use_tucker=True)),
]


@pytest.mark.parametrize(("case", "arch", "algo", "kw"), CASES, ids=[c[0] for c in CASES])
def test_lycoris_file_bakes_to_its_forward(tmp_path, case, arch, algo, kw):
    run_case(tmp_path, case, arch, algo, **kw)


def test_lokr_layouts_are_the_ones_named(tmp_path):
    """Guard the case list: LyCORIS really wrote full w1 + factored w2, both factored, and Tucker t2."""
    seen = set()
    for _case, arch, algo, kw in CASES:
        if algo != "lokr":
            continue
        pico = ARCHS[arch][0]()
        make_lycoris_file(tmp_path / "l.safetensors", pico, algo, seed=1, metadata={}, **kw)
        keys = load_file(str(tmp_path / "l.safetensors"))
        for stem in pico.layers:
            seen.add(tuple(sorted(k.split(".", 1)[1] for k in keys if k.startswith(stem + ".") and "lokr" in k)))
    assert ("lokr_w1", "lokr_w2_a", "lokr_w2_b") in seen
    assert ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b") in seen
    assert ("lokr_t2", "lokr_w1", "lokr_w2_a", "lokr_w2_b") in seen


# DoRA: LyCORIS's forward at multiplier s is (W+ΔW)·(1 + s(m/‖·‖ − 1)); lorabake interpolates
# W + s·(W_dora − W) (delta.apply_patches), so the two agree at s = 1 only.
DORA_CASES = [
    ("sd1-locon-dora-out", "sd1", "locon", dict(dim=8, alpha=4, conv_dim=4, conv_alpha=2, std=0.1, dora_wd=True)),
    ("sd1-loha-dora-in", "sd1", "loha", dict(dim=8, alpha=4, conv_dim=4, conv_alpha=2, std=0.25, dora_wd=True, wd_on_output=False)),
    ("sdxl-lokr-dora-out", "sdxl", "lokr", dict(dim=8, alpha=2, conv_dim=4, conv_alpha=1, std=0.2, dora_wd=True, use_tucker=True)),
]


@pytest.mark.parametrize(("case", "arch", "algo", "kw"), DORA_CASES, ids=[c[0] for c in DORA_CASES])
def test_lycoris_dora_file_bakes_to_its_forward_at_strength_1(tmp_path, case, arch, algo, kw):
    run_case(tmp_path, case, arch, algo, strengths32=(1.0,), strength16=1.0, **kw)


# ----------------------------------------------------------------------------------------------
# The other algorithms LyCORIS writes, once each through the CLI (SD1 layers).

OTHER_CASES = [
    # (IA)³: W·(1 + s·w); LyCORIS's kohya preset puts it on the attention/ff layers only.
    ("sd1-ia3", "ia3", dict(dim=8, alpha=4, conv_dim=4, conv_alpha=2, std=0.05), 1e-5),
    # Diag-OFT and BOFT: LyCORIS inverts the Cayley matrix in fp32, hence the looser bound.
    ("sd1-diag-oft", "diag-oft", dict(dim=16, alpha=4, conv_dim=16, conv_alpha=2, std=0.05), 1e-4),
    ("sd1-boft", "boft", dict(dim=16, alpha=4, conv_dim=16, conv_alpha=2, std=0.05), 1e-4),
]


@pytest.mark.parametrize(("case", "algo", "kw", "rtol"), OTHER_CASES, ids=[c[0] for c in OTHER_CASES])
def test_other_lycoris_algorithms_bake_to_their_forward(tmp_path, case, algo, kw, rtol):
    _, _, metadata = ARCHS["sd1"]
    pico = sd1_pico()
    base_path = tmp_path / "base.safetensors"
    base = build_base(base_path, "sd1", pico, torch.float32)
    lora_path = tmp_path / f"{case}.safetensors"
    logging.disable(logging.WARNING)
    try:
        net = lycoris_kohya.create_network(
            1.0, kw["dim"], kw["alpha"], None, pico.te, pico.unet, algo=algo, conv_dim=kw["conv_dim"], conv_alpha=kw["conv_alpha"]
        )
    finally:
        logging.disable(logging.NOTSET)
    net = net.to(torch.float64)
    net.apply_to(pico.te, pico.unet, True, True)
    randomise(net, kw["std"], torch.Generator().manual_seed(3))
    net.save_weights(str(lora_path), torch.float32, dict(metadata))
    wrapped = {lora.lora_name for lora in net.loras}
    assert wrapped and wrapped <= set(pico.layers), wrapped
    pico.layers = {k: v for k, v in pico.layers.items() if k in wrapped}
    for s in (1.0, 0.6):
        net.set_multiplier(s)
        doc, merged = merge(tmp_path, base_path, lora_path, s, f"out_{s}.safetensors")
        assert sum(doc["loras"][0]["applied"].values()) == len(wrapped)
        check_layers(case, pico, base, merged, torch.float32, s, rtol32=rtol)


def test_full_norm_glora_modules_bake_to_their_formulas(tmp_path):
    """LyCORIS `full` (diff, diff_b), norm tuning (w_norm, b_norm) and GLoRA in one kohya-named
    file (as lorafix writes them; their LyCORIS forwards are checked module-level in
    test_lycoris_parity), each against its formula computed here in fp64."""
    pico = sd1_pico(with_norm=True)
    base_path = tmp_path / "base.safetensors"
    base = build_base(base_path, "sd1", pico, torch.float32)
    u = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
    full_stem, norm_stem, glora_stem = u + "ff_net_0_proj", u + "norm1", u + "attn1_to_q"
    full = make_lora([(full_stem, 2560, 320)], algo="full", seed=1)
    full = {k: v * 0.1 for k, v in full.items()}
    norm = make_lora([(norm_stem, 320, 320)], algo="norm", seed=2)
    glora = make_lora([(glora_stem, 320, 320)], algo="glora", rank=8, alpha=4.0, seed=3)
    lora_path = save_lora(tmp_path / "mixed.safetensors", {**full, **norm, **glora}, {"ss_base_model_version": "sd_v1"})
    s = 0.6
    doc, merged = merge(tmp_path, base_path, lora_path, s, "out.safetensors")
    assert sum(doc["loras"][0]["applied"].values()) == 3
    w = {k: v.double() for k, v in base.items()}
    ff, nrm, q = SD1_TB + "ff.net.0.proj.", SD1_TB + "norm1.", SD1_TB + "attn1.to_q."
    want = {
        ff + "weight": w[ff + "weight"] + s * full[full_stem + ".diff"].double(),
        ff + "bias": w[ff + "bias"] + s * full[full_stem + ".diff_b"].double(),
        nrm + "weight": w[nrm + "weight"] + s * norm[norm_stem + ".w_norm"].double(),
        nrm + "bias": w[nrm + "bias"] + s * norm[norm_stem + ".b_norm"].double(),
    }
    g = {k.split(".", 1)[1]: v.double() for k, v in glora.items()}
    dw = (w[q + "weight"] @ g["a1.weight"] @ g["a2.weight"] + g["b1.weight"] @ g["b2.weight"]) * 4.0 / 8
    want[q + "weight"] = w[q + "weight"] + s * dw
    for key, value in want.items():
        assert not torch.equal(merged[key], base[key]), key
        torch.testing.assert_close(merged[key].double(), value, rtol=0, atol=1e-6 * value.abs().max().item())
    for key in base:
        if key not in want:
            assert torch.equal(merged[key], base[key]), key


# ----------------------------------------------------------------------------------------------
# What lorabake cannot bake is an error (or, with --allow-unmatched, a listed non-application).


@pytest.mark.parametrize(
    ("key", "why"),
    [
        # A made-up block name: no checkpoint tensor has it.
        ("lora_unet_foo_blocks_0_attentions_0_proj_in.lora_down.weight", "no tensor of the base"),
        # A suffix no adapter format uses (LyCORIS never wrote `hada_w3_a`).
        ("lora_unet_down_blocks_0_attentions_0_proj_in.hada_w3_a", "not a tensor of any known adapter format"),
    ],
)
def test_unsupported_module_is_an_error_not_a_silent_skip(tmp_path, key, why):
    pico = sd1_pico()
    base_path = tmp_path / "base.safetensors"
    base = build_base(base_path, "sd1", pico, torch.float16)
    lora_path = tmp_path / "l.safetensors"
    make_lycoris_file(lora_path, pico, "locon", dim=4, alpha=2, conv_dim=4, conv_alpha=2, std=0.1, seed=1, metadata={})
    tensors = load_file(str(lora_path))
    tensors[key] = torch.zeros(4, 320)
    if key.endswith("lora_down.weight"):
        tensors[key.replace("lora_down", "lora_up")] = torch.zeros(320, 4)
    save_lora(lora_path, tensors)
    out = tmp_path / "o.safetensors"
    code, _, err = run_main(["merge", str(base_path), "--lora", str(lora_path), "-o", str(out)])
    assert code == 1, err
    assert key.split(".")[0] in err or key in err, err
    assert "Traceback" not in err and not out.exists()
    code, stdout, err = run_main(["merge", str(base_path), "--lora", str(lora_path), "-o", str(out), "--allow-unmatched", "--json"])
    assert code == 0, err
    not_applied = json.loads(stdout)["loras"][0]["not_applied"]
    assert any(why in row["reason"] for row in not_applied), not_applied
    assert sum(json.loads(stdout)["loras"][0]["applied"].values()) == len(pico.layers)
    del base
