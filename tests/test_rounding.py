"""lorabake.rounding: nearest == torch, stochastic is seeded and unbiased, fp8 saturates."""

from __future__ import annotations

import pytest
import torch

from lorabake import rounding
from lorabake.devices import pick_device
from lorabake.errors import UsageError

TAGS = {"F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _ulp(x, dt):
    """Spacing of dt's grid in the binade of each |x| (subnormal spacing below the normals)."""
    info = torch.finfo(dt)
    emin = round(torch.log2(torch.tensor(info.smallest_normal)).item())
    mbits = round(-torch.log2(torch.tensor(info.eps)).item())
    exp = torch.clamp(torch.frexp(x.abs())[1] - 1, min=emin)
    return torch.ldexp(torch.ones_like(x), exp - mbits)


def _rand(n, seed=0, scale=1.0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("tag", ["F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"])
def test_nearest_is_torch_to(tag):
    x = _rand(4096, scale=3.0)
    got = rounding.cast_to(x, tag)
    want = x.to(TAGS.get(tag, torch.float32))
    assert got.dtype == want.dtype
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_fp8_saturates_instead_of_nan_or_inf():
    x = torch.tensor([1e6, -1e6, 500.0, float("nan")])
    e4 = rounding.cast_to(x, "F8_E4M3").float()
    assert e4[:3].tolist() == [448.0, -448.0, 448.0] and torch.isnan(e4[3])
    e5 = rounding.cast_to(x, "F8_E5M2").float()
    assert e5[:2].tolist() == [57344.0, -57344.0]
    s4 = rounding.cast_to(x, "F8_E4M3", mode="stochastic", seed_key="w").float()
    assert s4[:3].tolist() == [448.0, -448.0, 448.0]


@pytest.mark.parametrize("tag", list(TAGS))
def test_stochastic_lands_on_a_neighbour(tag):
    x = _rand(20000, scale=2.0)
    s = rounding.cast_to(x, tag, mode="stochastic", seed_key="k").float()
    n = rounding.cast_to(x, tag).float()
    # Each result is one of the two grid points around x: the nearest one, or the first grid
    # point on the other side (closer to x than the grid spacing of the smaller of the two).
    spacing = _ulp(torch.minimum(s.abs(), x.abs()), TAGS[tag])
    other_side = ((s - x) * (n - x) < 0) & ((s - x).abs() < spacing)
    assert bool(((s == n) | other_side).all())
    assert 0.2 < (s != n).float().mean().item() < 0.8  # both neighbours do occur
    on_grid = n == x
    assert torch.equal(s[on_grid], x[on_grid])


def test_stochastic_is_deterministic_per_key_and_differs_across_keys():
    x = _rand(10000)
    a = rounding.cast_to(x, "BF16", mode="stochastic", seed_key="model.diffusion_model.out.2.weight")
    b = rounding.cast_to(x, "BF16", mode="stochastic", seed_key="model.diffusion_model.out.2.weight")
    c = rounding.cast_to(x, "BF16", mode="stochastic", seed_key="model.diffusion_model.out.0.weight")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_seed_is_a_stable_sha256_derivation():
    import hashlib

    want = int.from_bytes(hashlib.sha256(b"te.weight").digest()[:8], "little") >> 1
    assert rounding.seed_of("te.weight") == want


def test_stochastic_needs_a_key_and_mode_is_checked():
    with pytest.raises(ValueError):
        rounding.cast_to(_rand(4), "BF16", mode="stochastic")
    with pytest.raises(ValueError):
        rounding.cast_to(_rand(4), "BF16", mode="up")


@pytest.mark.parametrize("tag", ["BF16", "F16"])
def test_stochastic_is_unbiased_between_neighbours(tag):
    ulp = 2.0**-7 if tag == "BF16" else 2.0**-10
    value = 1.0 + 0.3 * ulp  # nearest would always give 1.0
    x = torch.full((200_000,), value)
    s = rounding.cast_to(x, tag, mode="stochastic", seed_key="bias").float()
    assert set(s.unique().tolist()) == {1.0, 1.0 + ulp}
    assert abs(s.double().mean().item() - value) < 4 * ulp * (0.3 * 0.7 / x.numel()) ** 0.5 + 1e-12
    assert rounding.cast_to(x, tag).float().unique().tolist() == [1.0]


def test_tiny_fp8_delta_survives_in_expectation_and_is_wiped_by_nearest():
    base = torch.full((100_000,), 1.0)  # e4m3 ulp at 1.0 is 0.125
    new = base + 0.01  # < half an ulp
    nearest = rounding.cast_to(new, "F8_E4M3")
    assert torch.equal(nearest.float(), base)
    assert rounding.lost_fraction(base, new, nearest) == pytest.approx(1.0)
    sr = rounding.cast_to(new, "F8_E4M3", mode="stochastic", seed_key="blocks.0.attn.qkv.weight")
    assert sr.float().mean().item() == pytest.approx(1.01, abs=2e-3)
    assert abs(rounding.lost_fraction(base, new, sr)) < 0.05
    assert rounding.relative_error(base, new, sr) > 1.0  # per-element noise is large, the mean is not


def test_subnormals_round_stochastically_too():
    tiny = torch.finfo(torch.float8_e4m3fn).smallest_normal * 0.3  # subnormal spacing 2^-9
    x = torch.full((50_000,), tiny)
    s = rounding.cast_to(x, "F8_E4M3", mode="stochastic", seed_key="t").float()
    assert s.mean().item() == pytest.approx(tiny, rel=0.03)


def test_lost_fraction_sensible():
    base = _rand(1000).to(torch.bfloat16).float()  # a bf16 base, decoded exactly
    new = base + _rand(1000, seed=1, scale=0.1)
    assert rounding.lost_fraction(base, new, new.clone()) == 0.0  # fp32 output: nothing lost
    assert rounding.lost_fraction(base, base.clone(), base.to(torch.bfloat16)) == 0.0  # no delta
    bf = rounding.cast_to(new, "BF16")
    assert 0.0 <= rounding.lost_fraction(base, new, bf) < 0.05
    tiny = base + 1e-6
    assert rounding.lost_fraction(base, tiny, rounding.cast_to(tiny, "BF16")) == pytest.approx(1.0)


def test_other_inputs_decode_exactly_and_widening_is_exact():
    x = _rand(100).to(torch.bfloat16)
    assert torch.equal(rounding.to_f32(x).to(torch.bfloat16), x)
    assert torch.equal(rounding.cast_to(x, "F32"), x.float())
    f8 = _rand(100).to(torch.float8_e4m3fn)
    assert torch.equal(rounding.to_f32(f8).to(torch.float8_e4m3fn).view(torch.uint8), f8.view(torch.uint8))


def test_scaled_fp8_round_trip():
    w = _rand(4096, scale=0.02).reshape(64, 64)
    codes, scale = rounding.quantize_scaled(w, "F8_E4M3", scale_like=torch.tensor(1.0))
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == () and scale.dtype == torch.float32
    assert scale.item() == pytest.approx(w.abs().max().item() / 448.0)
    back = rounding.dequantize(codes, scale)
    assert (back - w).abs().max() <= w.abs().max() * 2.0**-4  # within half an e4m3 ulp at the top
    # A requantised weight stays put when quantised again.
    codes2, scale2 = rounding.quantize_scaled(back, "F8_E4M3", scale_like=scale)
    assert torch.allclose(rounding.dequantize(codes2, scale2), back, rtol=1e-6, atol=0)
    # scale_weight in checkpoints is often shape [1]; per-row scales also work.
    _, s1 = rounding.quantize_scaled(w, "F8_E4M3", scale_like=torch.tensor([0.5]))
    assert s1.shape == (1,)
    codes_r, s_r = rounding.quantize_scaled(w, "F8_E5M2", scale_like=torch.ones(64))
    assert s_r.shape == (64,)
    assert torch.allclose(rounding.dequantize(codes_r, s_r), w, rtol=0.13, atol=0)
    kept, s_k = rounding.quantize_scaled(w, "F8_E4M3", scale_like=torch.tensor(0.001), keep_scale=True)
    assert s_k.item() == pytest.approx(0.001)
    zero_codes, zero_scale = rounding.quantize_scaled(torch.zeros(3, 3), "F8_E4M3")
    assert zero_scale.item() == 1.0 and torch.equal(zero_codes.float(), torch.zeros(3, 3))


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(UsageError, match="unknown device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            pick_device("cuda:1")
