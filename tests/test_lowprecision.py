"""`lorabake merge` on low-precision Flux bases: bf16, plain fp8, ComfyUI scaled fp8, fp8 output.

Bases carry real Flux names and shapes (a few of the smaller tensors of double block 0, `img_in`,
`time_in`, `final_layer`; the fused `img_attn.qkv` only so detection sees Flux). The expected
result is recomputed here in fp64 from the file's bytes and the LoRA's factors, never through
lorabake's own math. Rounding claims are checked against the fp8/bf16 grid (`ulp` below):
nearest lands on one of the two neighbours of the exact value (at most one ulp off when our fp32
intermediate and the fp64 value round differently at a tie); stochastic rounding is deterministic
(same bytes on every run) and unbiased (the realised delta's projection on the intended one is
≈1, where nearest keeps ≈0 of a sub-half-ulp delta: the "LoRA has no effect on fp8" bug). Scaled fp8: real weight = codes·scale_weight, patched and re-quantised with
a fresh per-tensor scale.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lorabake import dtypes
from lorabake.st_reader import SafetensorsReader
from lorabake.st_writer import SafetensorsWriter
from tests.archfix import arch_tensors, select
from tests.cli_helpers import run_main
from tests.lorafix import make_lora, save_lora

P = "model.diffusion_model."
FLUX_PATTERNS = [
    r"double_blocks\.0\.img_attn\.(qkv|proj|norm)\.",
    r"diffusion_model\.img_in\.",
    r"diffusion_model\.time_in\.in_layer\.",
    r"diffusion_model\.final_layer\.linear\.",
]
# kohya flux_train_network.py stems → the Flux (BFL) weight each one patches.
TARGETS = {
    "lora_unet_img_in": P + "img_in.weight",  # [3072, 64]
    "lora_unet_final_layer_linear": P + "final_layer.linear.weight",  # [64, 3072]
    "lora_unet_time_in_in_layer": P + "time_in.in_layer.weight",  # [3072, 256]
}
PROJ = ("lora_unet_double_blocks_0_img_attn_proj", P + "double_blocks.0.img_attn.proj.weight")  # [3072, 3072]
UNTOUCHED_WEIGHT = P + "double_blocks.0.img_attn.qkv.weight"
# A "small" weight: ~85% of N(0, 0.02) weights are larger, so their fp8 spacing is at least the
# spacing here and a delta of 0.1 of it is below half their ulp (e4m3's subnormal spacing 2^-9
# floors it; e5m2 keeps refining down to 2^-16, so its smallest weights do keep some delta).
REF_W = 0.004
FP8 = {"fp8_e4m3fn": ("F8_E4M3", torch.float8_e4m3fn), "fp8_e5m2": ("F8_E5M2", torch.float8_e5m2)}


# ----------------------------------------------------------------------------------------------
# Fixtures.


def flux_values(seed: int = 0) -> dict[str, torch.Tensor]:
    """Real-valued (fp32) Flux tensors: weights/biases ~N(0, 0.02), RMSNorm scales ~1."""
    spec = arch_tensors("flux")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in select("flux", FLUX_PATTERNS):
        shape = spec[name]["shape"]
        if name == UNTOUCHED_WEIGHT:  # 28M values only there for detection: random rows, tiled
            t = torch.randn(64, shape[1], generator=gen).repeat(shape[0] // 64, 1)
        else:
            t = torch.randn(shape, generator=gen)
        out[name] = 1 + 0.1 * t if name.endswith(".scale") else 0.02 * t
    return out


def saturating(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    big = torch.finfo(dt).max
    return x.float().clamp(-big, big).to(dt)


def write_ordered(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """A safetensors file whose data order is `tensors`' order (safetensors.torch sorts by dtype)."""
    entries = [(k, dtypes.tag_of(v.dtype), tuple(v.shape)) for k, v in tensors.items()]
    with SafetensorsWriter(str(path), entries, metadata, check_space=False) as w:
        for k, v in tensors.items():
            w.write(k, v.contiguous())
    return str(path)


def plain_base(path, dtype: torch.dtype, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every float tensor stored as `dtype` (fp8 saturating), as Kijai-style fp8 Flux files are."""
    base = {k: saturating(v, dtype) for k, v in values.items()}
    write_ordered(path, base)
    return base


def scaled_base(path, dtype: torch.dtype, values: dict[str, torch.Tensor], *, scale_first: bool) -> dict[str, torch.Tensor]:
    """ComfyUI scaled fp8: 2-D weights as fp8 codes + fp32 scalar `scale_weight` (amax/fp8 max),
    the rest bf16, and the empty marker tensor `scaled_fp8` whose dtype names the format
    (comfy/model_base.py `state_dict_for_saving`; comfy/ops.py scale_weight = ones(()) fp32)."""
    base: dict[str, torch.Tensor] = {}
    for k, v in values.items():
        if k.endswith(".weight") and v.dim() == 2:
            scale = (v.abs().max() / torch.finfo(dtype).max).float().reshape(())
            pair = {k: saturating(v / scale, dtype), k[: -len("weight")] + "scale_weight": scale}
            base.update(dict(reversed(pair.items())) if scale_first else pair)
        else:
            base[k] = v.to(torch.bfloat16)
    base[P + "scaled_fp8"] = torch.tensor([], dtype=dtype)
    write_ordered(path, base)
    return base


def real_weight(base: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """fp64 value of a base weight (codes·scale for scaled fp8)."""
    scale_key = key[: -len("weight")] + "scale_weight"
    w = base[key].double()
    return w * base[scale_key].double() if scale_key in base else w


def lora_for(stems: dict[str, str], shapes: dict[str, tuple[int, ...]], *, rank: int = 4, alpha: float = 2.0, seed: int = 0):
    return make_lora([(s, *shapes[k]) for s, k in stems.items()], rank=rank, alpha=alpha, seed=seed)


def delta64(lora: dict[str, torch.Tensor], stem: str, strength: float) -> torch.Tensor:
    up, down = lora[stem + ".lora_up.weight"].double(), lora[stem + ".lora_down.weight"].double()
    return (up @ down) * float(lora[stem + ".alpha"]) / down.shape[0] * strength


def delta_terms64(lora: dict[str, torch.Tensor], stem: str, strength: float) -> torch.Tensor:
    """Σ|up||down|·|scale·s|: the size of the terms that make ΔW, for fp32 error bounds."""
    up, down = lora[stem + ".lora_up.weight"].double(), lora[stem + ".lora_down.weight"].double()
    return (up.abs() @ down.abs()) * abs(float(lora[stem + ".alpha"]) / down.shape[0] * strength)


def ulp(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """Grid spacing of `dt` at |x| (the subnormal spacing below the smallest normal)."""
    fi = torch.finfo(dt)
    mbits = round(-math.log2(fi.eps))
    emin = round(math.log2(fi.smallest_normal))
    _, e = torch.frexp(x.double().abs())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), torch.clamp(e - 1, min=emin) - mbits)


def merge(tmp_path, base_path, lora_path, *args, out="out.safetensors", strength=1.0):
    out_path = tmp_path / out
    out_path.parent.mkdir(exist_ok=True)
    code, stdout, err = run_main(["merge", str(base_path), "--lora", f"{lora_path}:{strength}", "-o", str(out_path), "--json", "--force", *args])
    return code, (json.loads(stdout) if code == 0 else None), err, out_path


def assert_nearest(got: torch.Tensor, want64: torch.Tensor, key: str, *, terms: torch.Tensor, max_off_share: float = 0.01):
    """`got` is `want64` rounded to its dtype: within one ulp, and exactly nearest for ≥99%.

    `terms` = |W| + |ΔW|: where W and ΔW cancel, our fp32 sum may be off by a few fp32 ulps of
    the terms, which can exceed the output ulp of the tiny result (as in test_merge)."""
    dt = got.dtype
    big = torch.finfo(dt).max
    want = want64.clamp(-big, big)
    diff = (got.double() - want).abs()
    spacing = torch.maximum(ulp(want, dt), ulp(got.double(), dt)) + 4 * 2.0**-24 * terms
    assert bool((diff <= spacing).all()), f"{key}: {(diff / spacing).max().item():.3f} ulp off"
    off = (got != want.float().to(dt)).float().mean().item()
    assert off <= max_off_share, f"{key}: {off:.4f} of values are not the nearest neighbour"


def retained(base64: torch.Tensor, out64: torch.Tensor, intended: torch.Tensor) -> float:
    """⟨realised, intended⟩/‖intended‖²: 1 when the delta arrived, 0 when rounding ate it."""
    realised = (out64 - base64).reshape(-1)
    intended = intended.reshape(-1)
    return float(realised @ intended / (intended @ intended))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.contiguous().reshape(-1).view(torch.uint8).equal(b.contiguous().reshape(-1).view(torch.uint8))


@pytest.fixture(scope="module")
def values():
    return flux_values()


@pytest.fixture(scope="module")
def bases(tmp_path_factory, values):
    """Base files shared by the tests of this module: (kind, dtype[, scale_first]) → (path, tensors)."""
    made: dict[tuple, tuple] = {}

    def get(kind: str, dtype: torch.dtype, scale_first: bool = False):
        key = (kind, dtype, scale_first)
        if key not in made:
            path = tmp_path_factory.mktemp("base") / "base.safetensors"
            if kind == "plain":
                made[key] = (path, plain_base(path, dtype, values))
            else:
                made[key] = (path, scaled_base(path, dtype, values, scale_first=scale_first))
        return made[key]

    return get


# ----------------------------------------------------------------------------------------------
# bf16 base.


def test_bf16_flux_base_nearest(tmp_path, bases):
    base_path, base = bases("plain", torch.bfloat16)
    stems = {**TARGETS, PROJ[0]: PROJ[1]}
    shapes = {k: tuple(base[k].shape) for k in stems.values()}
    lora = lora_for(stems, shapes)
    lora_path = save_lora(tmp_path / "l.safetensors", lora, {"ss_base_model_version": "flux1"})
    code, doc, err, out = merge(tmp_path, base_path, lora_path, strength=0.8)
    assert code == 0, err
    merged = load_file(str(out))
    assert list(merged) == list(base)
    for stem, key in stems.items():
        assert merged[key].dtype == torch.bfloat16
        d = delta64(lora, stem, 0.8)
        assert_nearest(merged[key], base[key].double() + d, key, terms=base[key].double().abs() + delta_terms64(lora, stem, 0.8))
    for key in base:
        if key not in stems.values():
            assert same_bytes(merged[key], base[key]), key
    lost = doc["lost_to_rounding"]
    assert set(lost["per_tensor"]) == set(stems.values())
    assert lost["max"] < 0.01 and lost["tensors_over_5_percent"] == []


# ----------------------------------------------------------------------------------------------
# Plain fp8 base (weights stored as fp8, no scale): nearest, stochastic, the lost-delta report.


@pytest.mark.parametrize("fmt", list(FP8))
def test_fp8_base_nearest_rounds_to_the_fp8_grid(tmp_path, bases, fmt):
    tag, dt = FP8[fmt]
    base_path, base = bases("plain", dt)
    lora = lora_for(TARGETS, {k: tuple(base[k].shape) for k in TARGETS.values()})
    lora_path = save_lora(tmp_path / "l.safetensors", lora)
    code, doc, err, out = merge(tmp_path, base_path, lora_path, strength=0.7)
    assert code == 0, err
    merged = load_file(str(out))
    for stem, key in TARGETS.items():
        assert merged[key].dtype == dt
        d = delta64(lora, stem, 0.7)
        assert_nearest(merged[key], base[key].double() + d, key, terms=base[key].double().abs() + delta_terms64(lora, stem, 0.7))
    for key in base:
        if key not in TARGETS.values():
            assert same_bytes(merged[key], base[key]), key
    assert doc["tensors_cast"] == 0 and doc["tensors_changed"] == len(TARGETS)


def _tiny_lora(tmp_path, base, *, delta_ulps: float, dt: torch.dtype, seed: int = 0):
    """A random LoRA scaled so that its ΔW has rms `delta_ulps` of the fp8 spacing at REF_W."""
    lora = lora_for(TARGETS, {k: tuple(base[k].shape) for k in TARGETS.values()}, seed=seed)
    rms = math.sqrt(sum(float(delta64(lora, s, 1.0).pow(2).mean()) for s in TARGETS) / len(TARGETS))
    strength = delta_ulps * float(ulp(torch.tensor(REF_W), dt)) / rms
    return lora, save_lora(tmp_path / f"tiny{seed}.safetensors", lora), strength


@pytest.mark.parametrize("fmt", list(FP8))
def test_fp8_tiny_delta_lost_with_nearest_kept_with_stochastic(tmp_path, bases, fmt):
    tag, dt = FP8[fmt]
    base_path, base = bases("plain", dt)
    lora, lora_path, s = _tiny_lora(tmp_path, base, delta_ulps=0.05, dt=dt)

    code, near, err, out_n = merge(tmp_path, base_path, lora_path, "--rounding", "nearest", out="n.safetensors", strength=s)
    assert code == 0, err
    code, sto, err, out_s = merge(tmp_path, base_path, lora_path, "--rounding", "stochastic", out="run1/s.safetensors", strength=s)
    assert code == 0, err
    code, sto2, err, out_s2 = merge(tmp_path, base_path, lora_path, "--rounding", "stochastic", out="run2/s.safetensors", strength=s)
    assert code == 0, err
    assert out_s.read_bytes() == out_s2.read_bytes()  # seeded per tensor name: same bytes every run
    assert sto["sha256"] == sto2["sha256"]

    mn, ms = load_file(str(out_n)), load_file(str(out_s))
    for stem, key in TARGETS.items():
        intended = delta64(lora, stem, s)
        b = base[key].double()
        kept_n = retained(b, mn[key].double(), intended)
        kept_s = retained(b, ms[key].double(), intended)
        assert kept_n < 0.2, f"{key}: nearest kept {kept_n:.3f} of a 0.05-ulp delta"
        assert abs(kept_s - 1) < 0.1, f"{key}: stochastic kept {kept_s:.3f}"
        # The report measures the same thing from the fp32 side.
        assert near["lost_to_rounding"]["per_tensor"][key] > 0.8
        assert abs(near["lost_to_rounding"]["per_tensor"][key] - (1 - kept_n)) < 0.02
        assert abs(sto["lost_to_rounding"]["per_tensor"][key]) < 0.1
        # Stochastic rounding only ever picks one of the two grid neighbours.
        exact = b + intended
        assert bool(((ms[key].double() - exact).abs() <= ulp(exact, dt)).all())
    assert sorted(near["lost_to_rounding"]["tensors_over_5_percent"]) == sorted(TARGETS.values())
    assert sto["lost_to_rounding"]["tensors_over_5_percent"] == []


@pytest.mark.parametrize("fmt", list(FP8))
def test_fp8_constant_tiny_delta_is_unbiased_with_stochastic(tmp_path, bases, fmt):
    """ΔW = δ everywhere, δ = 0.1 ulp: the mean shift over 196k weights is δ, not 0."""
    tag, dt = FP8[fmt]
    base_path, base = bases("plain", dt)
    key = TARGETS["lora_unet_img_in"]
    out_f, in_f = base[key].shape
    delta = 0.1 * float(ulp(torch.tensor(REF_W), dt))
    c = math.sqrt(delta)
    lora = {
        "lora_unet_img_in.lora_up.weight": torch.full((out_f, 1), c),
        "lora_unet_img_in.lora_down.weight": torch.full((1, in_f), c),
        "lora_unet_img_in.alpha": torch.tensor(1.0),
    }
    lora_path = save_lora(tmp_path / "const.safetensors", lora)
    b = base[key].double()
    shifts = {}
    for mode in ("nearest", "stochastic"):
        code, _, err, out = merge(tmp_path, base_path, lora_path, "--rounding", mode, out=f"{mode}.safetensors")
        assert code == 0, err
        shifts[mode] = float((load_file(str(out))[key].double() - b).mean()) / delta
    assert abs(shifts["nearest"]) < 0.1, shifts
    assert abs(shifts["stochastic"] - 1) < 0.05, shifts


# ----------------------------------------------------------------------------------------------
# fp8 output from a bf16 base.


@pytest.mark.parametrize("fmt", list(FP8))
def test_fp8_output_from_bf16_base_converts_every_float_and_saturates(tmp_path, values, fmt):
    tag, dt = FP8[fmt]
    vals = dict(values)
    huge = 4 * torch.finfo(dt).max  # bf16 holds it; fp8 must saturate, not give NaN/Inf
    bias = P + "time_in.in_layer.bias"
    vals[bias] = vals[bias].clone()
    vals[bias][:2] = torch.tensor([huge, -huge])
    img_in = TARGETS["lora_unet_img_in"]
    vals[img_in] = vals[img_in].clone()
    vals[img_in][0, 0] = huge  # a targeted weight saturates too
    base = plain_base(tmp_path / "base.safetensors", torch.bfloat16, vals)
    lora = lora_for(TARGETS, {k: tuple(base[k].shape) for k in TARGETS.values()})
    lora_path = save_lora(tmp_path / "l.safetensors", lora)
    # beyond the output format's range is an error by default, naming the tensor; --saturate clamps
    code, _, err, out = merge(tmp_path, tmp_path / "base.safetensors", lora_path, "--dtype", fmt)
    assert code == 1 and "Error:" in err and not out.exists(), err
    code, doc, err, out = merge(tmp_path, tmp_path / "base.safetensors", lora_path, "--dtype", fmt, "--saturate")
    assert code == 0, err
    with SafetensorsReader(out) as r:
        assert {i.dtype for i in r.tensors.values()} == {tag}
    merged = load_file(str(out))
    big = torch.finfo(dt).max
    for key, t in merged.items():
        assert bool(torch.isfinite(t.float()).all()), key
        if key in TARGETS.values():
            stem = next(s for s, k in TARGETS.items() if k == key)
            d = delta64(lora, stem, 1.0)
            assert_nearest(t, base[key].double() + d, key, terms=base[key].double().abs() + delta_terms64(lora, stem, 1.0))
        else:
            assert same_bytes(t, saturating(base[key], dt)), key  # nearest, clamped
    assert merged[bias][:2].float().tolist() == [big, -big]
    assert merged[img_in][0, 0].float().item() == big
    assert doc["tensors_cast"] == len(base) - len(TARGETS)


# ----------------------------------------------------------------------------------------------
# ComfyUI scaled fp8.


@pytest.mark.parametrize(
    ("fmt", "scale_first"),
    [("fp8_e4m3fn", False), ("fp8_e5m2", True)],
    ids=["e4m3-weight-then-scale", "e5m2-scale-then-weight"],
)
def test_scaled_fp8_dequantise_patch_requantise(tmp_path, bases, fmt, scale_first):
    tag, dt = FP8[fmt]
    base_path, base = bases("scaled", dt, scale_first)
    with SafetensorsReader(base_path) as r:  # the layout really is as named
        order = sorted(r.tensors, key=lambda k: r.tensors[k].start)
    for key in TARGETS.values():
        w_at, s_at = order.index(key), order.index(key[: -len("weight")] + "scale_weight")
        assert (s_at < w_at) == scale_first
    stems = TARGETS
    lora = lora_for(stems, {k: tuple(base[k].shape) for k in stems.values()}, alpha=8.0)  # ΔW ≈ 2·W: amax moves
    lora_path = save_lora(tmp_path / "l.safetensors", lora)
    code, doc, err, out = merge(tmp_path, base_path, lora_path, strength=0.9)
    assert code == 0, err
    with SafetensorsReader(base_path) as b, SafetensorsReader(out) as o:
        assert list(o.tensors) == list(b.tensors)
        assert {k: (i.dtype, i.shape) for k, i in o.tensors.items()} == {k: (i.dtype, i.shape) for k, i in b.tensors.items()}
    merged = load_file(str(out))
    big = torch.finfo(dt).max
    for stem, key in stems.items():
        scale_key = key[: -len("weight")] + "scale_weight"
        want = real_weight(base, key) + delta64(lora, stem, 0.9)
        new_scale = merged[scale_key].double()
        assert merged[scale_key].dtype == torch.float32 and merged[scale_key].shape == ()
        assert not torch.equal(merged[scale_key], base[scale_key]), f"{scale_key}: amax changed, the scale must too"
        assert math.isclose(float(new_scale), float(want.abs().max()) / big, rel_tol=1e-6)
        codes = merged[key].double()
        assert float(codes.abs().max()) >= big * (1 - 2 ** -3)  # the new scale uses the full range
        # Within half an fp8 ulp of the exact patched value (+ fp32 rounding of W/scale).
        slack = 4 * 2.0**-24 * (real_weight(base, key).abs() + delta_terms64(lora, stem, 0.9)) / new_scale  # fp32 sum where W, ΔW cancel
        err_codes = (codes - want / new_scale).abs()
        assert bool((err_codes <= 0.5 * ulp(want / new_scale, dt) + slack).all()), key
        assert (merged[key] != saturating(want / new_scale, dt)).float().mean().item() < 0.01
    for key in base:  # untouched weights, their scales, biases, norms and the marker: byte-identical
        if key in stems.values() or key[: -len("scale_weight")] + "weight" in stems.values():
            continue
        assert same_bytes(merged[key], base[key]), key
    assert merged[P + "scaled_fp8"].dtype == dt and merged[P + "scaled_fp8"].numel() == 0
    assert doc["lost_to_rounding"]["max"] < 0.01
    assert set(doc["lost_to_rounding"]["per_tensor"]) == set(stems.values())


def test_scaled_fp8_stochastic_is_deterministic_and_keeps_a_tiny_delta(tmp_path, bases):
    dt = torch.float8_e4m3fn
    base_path, base = bases("scaled", dt)
    lora = lora_for(TARGETS, {k: tuple(base[k].shape) for k in TARGETS.values()})
    # ΔW rms = 0.1 of the fp8 spacing near the weights' rms (in real units).
    rms = {k: float(real_weight(base, k).pow(2).mean().sqrt()) for k in TARGETS.values()}
    spacing = min(float(ulp(torch.tensor(rms[k]) / base[k[:-6] + "scale_weight"].double(), dt)) * float(base[k[:-6] + "scale_weight"]) for k in TARGETS.values())
    d_rms = math.sqrt(sum(float(delta64(lora, s, 1.0).pow(2).mean()) for s in TARGETS) / len(TARGETS))
    s = 0.1 * spacing / d_rms
    lora_path = save_lora(tmp_path / "l.safetensors", lora)
    outs = []
    for name in ("a", "b"):
        code, doc, err, out = merge(tmp_path, base_path, lora_path, "--rounding", "stochastic", out=f"{name}/out.safetensors", strength=s)
        assert code == 0, err
        outs.append((doc, out))
    assert outs[0][1].read_bytes() == outs[1][1].read_bytes()
    merged = load_file(str(outs[0][1]))
    for stem, key in TARGETS.items():
        scale_key = key[:-6] + "scale_weight"
        got = merged[key].double() * merged[scale_key].double()
        kept = retained(real_weight(base, key), got, delta64(lora, stem, s))
        assert abs(kept - 1) < 0.15, f"{key}: kept {kept:.3f}"
        assert abs(outs[0][0]["lost_to_rounding"]["per_tensor"][key]) < 0.15


@pytest.mark.parametrize("target", ["fp16", "bf16", "fp8_e4m3fn"])
def test_scaled_fp8_refuses_dtype_conversion(tmp_path, bases, target):
    base_path, base = bases("scaled", torch.float8_e4m3fn)
    lora = lora_for(TARGETS, {k: tuple(base[k].shape) for k in TARGETS.values()})
    lora_path = save_lora(tmp_path / "l.safetensors", lora)
    code, _, err, out = merge(tmp_path, base_path, lora_path, "--dtype", target)
    assert code == 2, err
    assert "scaled" in err and "Traceback" not in err
    assert not out.exists()


def test_fp8_weight_with_a_weight_scale_but_no_marker_is_dequantised(tmp_path, values):
    """ComfyUI's newer per-layer quant files name the scale `weight_scale` and drop the marker;
    patching the raw codes would be off by the scale (≈1e-4 here), so they are treated as scaled."""
    dt = torch.float8_e4m3fn
    base = scaled_base(tmp_path / "scaled.safetensors", dt, values, scale_first=False)
    base = {(k[: -len("scale_weight")] + "weight_scale" if k.endswith(".scale_weight") else k): v for k, v in base.items()}
    del base[P + "scaled_fp8"]
    base_path = write_ordered(tmp_path / "base.safetensors", base)
    lora = lora_for(TARGETS, {k: tuple(base[k].shape) for k in TARGETS.values()}, alpha=8.0)
    lora_path = save_lora(tmp_path / "l.safetensors", lora)
    code, doc, err, out = merge(tmp_path, base_path, lora_path)
    assert code == 0, err
    merged = load_file(str(out))
    for stem, key in TARGETS.items():
        scale_key = key[: -len("weight")] + "weight_scale"
        want = base[key].double() * base[scale_key].double() + delta64(lora, stem, 1.0)
        got = merged[key].double() * merged[scale_key].double()
        assert (got - want).abs().max().item() <= 2 ** -4 * want.abs().max().item()  # half an e4m3 ulp at amax
        assert abs(retained(want - delta64(lora, stem, 1.0), got, delta64(lora, stem, 1.0)) - 1) < 0.01


def test_block_wise_fp8_scale_is_refused_before_writing(tmp_path, values):
    dt = torch.float8_e4m3fn
    base = scaled_base(tmp_path / "scaled.safetensors", dt, values, scale_first=False)
    key = TARGETS["lora_unet_img_in"]
    scale_key = key[: -len("weight")] + "scale_weight"
    base[scale_key] = base[scale_key].expand(3072, 2).contiguous()  # one scale per 32-column block
    base_path = write_ordered(tmp_path / "base.safetensors", base)
    lora_path = save_lora(tmp_path / "l.safetensors", lora_for({"lora_unet_img_in": key}, {key: (3072, 64)}))
    code, _, err, out = merge(tmp_path, base_path, lora_path)
    assert code == 1, err
    assert "block-wise" in err and scale_key in err and "Traceback" not in err
    assert not out.exists()
