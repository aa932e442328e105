"""lorabake.svd: randomized vs exact SVD, rank selection boundaries, clamp beyond 2^24, error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lorabake import svd


def realistic_delta(
    m: int, n: int, *, true_rank: int = 64, decay: float = 12.0, noise: float = 0.02, seed: int = 0
):
    """Low-rank part with an exponentially decaying spectrum plus dense noise (a fine-tune-like ΔW)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, true_rank, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, true_rank, generator=g))
    s = torch.exp(-torch.arange(true_rank, dtype=torch.float32) / decay)
    return (u * s) @ v.T + noise * torch.randn(m, n, generator=g) / math.sqrt(max(m, n))


def _err(a: torch.Tensor, spec: svd.Spectrum, rank: int) -> float:
    f = svd.lora_factors(spec, rank)
    return svd.relative_error(svd.residual_sq(a, f.up, f.down, f.scale), svd.frobenius_sq(a))


@pytest.mark.parametrize(
    ("m", "n", "rank", "decay", "noise"),
    [
        (640, 640, 16, 12.0, 0.02),  # SDXL level-1 attention, easy spectrum
        (1920, 480, 32, 12.0, 0.02),  # tall (ff-like)
        (640, 1280, 16, 40.0, 0.2),  # wide, flat spectrum + strong noise: needs more power iterations
    ],
)
def test_randomized_matches_exact_truncation(m, n, rank, decay, noise):
    a = realistic_delta(m, n, decay=decay, noise=noise)
    exact = _err(a, svd.exact_svd(a), rank)
    rand_spec = svd.randomized_svd(a, rank)
    assert rand_spec.method == "randomized" and rand_spec.power_iters >= 2
    assert _err(a, rand_spec, rank) <= 1.01 * exact


def test_randomized_recovers_exact_low_rank_matrix():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(700, 8, generator=g) @ torch.randn(8, 500, generator=g)
    spec = svd.randomized_svd(a, 8)
    assert _err(a, spec, 8) < 1e-5


def test_routine_choice():
    assert svd.use_exact(128, 4096, 8, "fixed")  # small side below EXACT_BELOW
    assert svd.use_exact(1280, 1280, 512, "fixed")  # rank near min(out, in)
    assert svd.use_exact(1280, 1280, 8, "cumulative")  # needs every σ
    assert not svd.use_exact(1280, 1280, 32, "energy")
    assert not svd.use_exact(10240, 1280, 32, "ratio")


# --- rank selection -----------------------------------------------------------------------------------


def _select(s, mode, param, *, max_rank=100, complete=True, total_sq=None):
    s = torch.tensor(s, dtype=torch.float64)
    total = float((s**2).sum()) if total_sq is None else total_sq
    return svd.select_rank(
        s, mode=mode, param=param, max_rank=max_rank, full_len=len(s), total_sq=total, complete=complete
    )


def test_energy_exactly_on_a_boundary():
    # σ² = 9, 4, 1 (total 14): 13/14 is reached with exactly two values, no more
    assert _select([3.0, 2.0, 1.0], "energy", 13 / 14) == 2
    assert _select([3.0, 2.0, 1.0], "energy", 9 / 14) == 1
    assert _select([3.0, 2.0, 1.0], "energy", 13 / 14 + 1e-9) == 3
    assert _select([3.0, 2.0, 1.0], "energy", 1.0) == 3
    assert _select([3.0, 2.0, 1.0], "energy", 13 / 14, max_rank=1) == 1  # always capped


def test_energy_uses_frobenius_total_with_partial_spectrum():
    # only the top two σ known (randomized), total energy from ‖ΔW‖²: 9+4 of 20 < 0.9 → all known, capped
    assert _select([3.0, 2.0], "energy", 0.9, complete=False, total_sq=20.0, max_rank=2) == 2
    assert _select([3.0, 2.0], "energy", 0.45, complete=False, total_sq=20.0) == 1


def _kohya_sv_ratio(s, p):  # sd-scripts resize_lora: index_sv_ratio(S, p) + 1
    s = torch.tensor(s)
    index = int(torch.sum(s > s[0] / p).item())
    return max(1, min(index, len(s) - 1)) + 1


def _kohya_sv_cumulative(s, p):  # sd-scripts resize_lora: index_sv_cumulative(S, p) + 1
    s = torch.tensor(s, dtype=torch.float64)
    cum = torch.cumsum(s, dim=0) / float(torch.sum(s))
    index = int(torch.searchsorted(cum, torch.tensor(p, dtype=torch.float64))) + 1
    return max(1, min(index, len(s) - 1)) + 1


@pytest.mark.parametrize(
    ("param", "expected"),
    [
        (2.0, 3),  # σ > 5: {10, 6} → 2, +1
        (10.0, 5),  # σ > 1: {10, 6, 4, 2} → 4 = n−1, +1
        (1.0, 2),  # σ > 10: none → clamped to 1, +1
        (2.5, 3),  # σ > 4 (strict): {10, 6} → 2, +1
    ],
)
def test_ratio_is_kohya_sv_ratio(param, expected):
    s = [10.0, 6.0, 4.0, 2.0, 1.0]
    assert _kohya_sv_ratio(s, param) == expected
    assert _select(s, "ratio", param) == expected
    assert _select(s, "ratio", param, max_rank=2) == min(expected, 2)


@pytest.mark.parametrize(
    ("param", "expected"),
    [
        (0.7, 3),  # cumsum/Σ = .4 .7 .9 1: first ≥ .7 at index 1 → 2, +1
        (0.4, 2),  # exactly the first value → 1, +1
        (0.95, 4),  # index 3 → 4, clamped to n−1 = 3, +1
        (0.1, 2),
    ],
)
def test_cumulative_is_kohya_sv_cumulative(param, expected):
    s = [4.0, 3.0, 2.0, 1.0]
    assert _kohya_sv_cumulative(s, param) == expected
    assert _select(s, "cumulative", param) == expected


def test_cumulative_needs_the_whole_spectrum():
    with pytest.raises(ValueError, match="whole spectrum"):
        _select([4.0, 3.0], "cumulative", 0.5, complete=False)


def test_fixed_is_capped_by_matrix_size():
    assert (
        svd.select_rank(
            torch.ones(3), mode="fixed", param=None, max_rank=32, full_len=3, total_sq=3.0, complete=True
        )
        == 3
    )


# --- clamp ----------------------------------------------------------------------------------------------


def test_quantile_matches_torch_quantile_small():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10_001, generator=g)
    for q in (0.0, 0.5, 0.99, 0.999, 1.0):
        assert svd.quantile(x, q) == pytest.approx(float(torch.quantile(x, q)), rel=1e-6, abs=1e-7)


def test_quantile_beyond_torch_limit():
    n = (1 << 24) + 10
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, generator=g).to(torch.float16)
    # torch.quantile raises "input tensor is too large" here (sd-scripts#1485), after ~2 s of work
    expected = float(np.quantile(x.float().numpy(), 0.99))
    assert svd.quantile(x, 0.99) == pytest.approx(expected, rel=1e-6)


def test_clamp_factors_is_kohyas_rule():
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(64, 4, generator=g) * 3, torch.randn(4, 32, generator=g)
    cu, cd, bound = svd.clamp_factors(up, down, 0.9)
    hi = float(torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.9))
    assert bound == pytest.approx(hi)
    torch.testing.assert_close(cu, up.clamp(-hi, hi))
    torch.testing.assert_close(cd, down.clamp(-hi, hi))


# --- factors and error ------------------------------------------------------------------------------------


def test_alpha_rescales_up_only():
    a = realistic_delta(300, 200, true_rank=16)
    spec = svd.exact_svd(a)
    f1 = svd.lora_factors(spec, 8)
    f2 = svd.lora_factors(spec, 8, alpha=2.0)
    assert f1.scale == 1.0 and f2.scale == 0.25
    assert torch.equal(f1.down, f2.down)
    torch.testing.assert_close(f2.scale * f2.up @ f2.down, f1.up @ f1.down)


def test_residual_matches_numpy_fp64():
    a = realistic_delta(2500, 200, true_rank=32, noise=0.1)
    f = svd.lora_factors(svd.exact_svd(a), 8, alpha=4.0)
    got = svd.residual_sq(a, f.up, f.down, f.scale, rows_per_chunk=777)
    an, un, dn = (t.double().numpy() for t in (a, f.up, f.down))
    expected = float(np.sum((an - f.scale * un @ dn) ** 2))
    assert got == pytest.approx(expected, rel=1e-5)
    # for an exact truncation it also equals the spectral tail Σ_{i>k} σ_i²
    s = torch.linalg.svdvals(a.double())
    assert got == pytest.approx(float((s[8:] ** 2).sum()), rel=1e-4)
