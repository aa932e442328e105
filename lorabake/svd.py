"""Truncated SVD of a weight difference, rank selection, error and clamping: pure tensor math.

Nothing here sees a key or a file. Matrices arrive 2-D (conv weights flattened to
[out, in·kh·kw] by the caller) as fp32 on the compute device.

Decisions:

* Two routines. `randomized_svd` (Halko–Martinsson–Tropp: Gaussian sketch with oversampling,
  power iterations re-orthonormalised by QR after every product) is used when the sketch width
  is small next to min(out, in); `exact_svd` (`torch.linalg.svd(full_matrices=False)`) for small
  matrices, for ranks near min(out, in), and for the `cumulative` rank mode, which needs the sum
  of *all* singular values. The other modes only need the top singular values plus Σσ², and
  Σσ² = ‖ΔW‖_F² is known exactly without any SVD.
* Power iterations are adaptive: after each one the rank-k residual energy ‖ΔW‖² − Σσ_k² is
  recomputed (it is exact for the randomized factors too, because Q·Ub_k·S_k·Vh_k is the
  orthogonal projection of ΔW onto span(Q·Ub_k)); iteration stops when it improves by less than
  `tol` relative, or once it is negligible. A flat fine-tune spectrum thus gets more iterations
  than an easy one, instead of a fixed count that is either slow or unfaithful.
* On MPS the small dense SVDs run on the CPU (native MPS SVD is not trusted).
* Rank modes (`select_rank`), always capped by the caller's maximum rank:
  `fixed`      – the maximum rank.
  `energy` X   – smallest k with Σ_{i≤k} σ_i² ≥ X·‖ΔW‖_F² (no +1).
  `ratio` p    – kohya `sv_ratio` exactly: k = #{σ_i > σ_1/p}, clamped to [1, n−1], plus one.
  `cumulative` p – kohya `sv_cumulative` exactly: k = searchsorted(cumsum(σ)/Σσ, p) + 1,
                 clamped to [1, n−1], plus one. (n = min(out, in).) The trailing "+1" is kohya's
                 resize_lora behaviour, kept so `--rank-param` means the same as there.
* Comparisons against a fraction allow 1e-12 slack so that a target exactly on a boundary
  (X = 13/14 for energies 9, 4, 1) picks the boundary rank despite rounding.
* Clamp: kohya's rule (one symmetric bound, the Q-quantile of the signed values of up and down
  together, linear interpolation as `torch.quantile`) computed with `torch.kthvalue`, which has
  no 2^24-element limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

RANK_MODES = ("fixed", "energy", "ratio", "cumulative")
# Modes whose rank follows from the top singular values and ‖ΔW‖² alone.
PARTIAL_SPECTRUM_MODES = ("fixed", "energy", "ratio")

FRACTION_SLACK = 1e-12
# Below this min(out, in) an exact SVD is as fast as a sketch.
EXACT_BELOW = 256
# Use the sketch only while its width is at most this fraction of min(out, in).
SKETCH_MAX_FRACTION = 0.25


@dataclass(frozen=True)
class SketchSettings:
    """Randomized SVD knobs: width = rank + max(oversample, ⌈oversample_fraction·rank⌉)."""

    oversample: int = 16
    oversample_fraction: float = 0.1
    min_power_iters: int = 2
    max_power_iters: int = 12
    tol: float = 1e-3  # stop when the residual energy improves by less than this fraction
    negligible: float = 1e-10  # ... or is below this fraction of ‖ΔW‖² (far under fp16 rounding)
    seed: int = 0

    def width(self, rank: int) -> int:
        return rank + max(self.oversample, math.ceil(self.oversample_fraction * rank))


@dataclass(frozen=True)
class Spectrum:
    """Leading singular triplets of a matrix: u [m, l], s [l] (descending), vh [l, n].

    `complete` is True when s holds all min(m, n) singular values (exact SVD).
    `power_iters` is the number of power iterations used (0 for exact).
    """

    u: Tensor
    s: Tensor
    vh: Tensor
    method: str  # "exact" | "randomized"
    complete: bool
    power_iters: int = 0


def _linalg_device(device: torch.device) -> torch.device:
    return torch.device("cpu") if device.type == "mps" else device


def frobenius_sq(a: Tensor) -> float:
    """‖a‖_F² accumulated in fp64 (on the CPU for MPS, which has no fp64)."""
    if a.device.type == "mps":
        a = a.cpu()
    return float(torch.linalg.vector_norm(a.reshape(-1), dtype=torch.float64) ** 2)


def use_exact(m: int, n: int, max_rank: int, mode: str, sketch: SketchSettings = SketchSettings()) -> bool:
    """Whether an exact reduced SVD is the right routine for an m×n matrix."""
    small = min(m, n)
    if mode not in PARTIAL_SPECTRUM_MODES or small < EXACT_BELOW:
        return True
    return sketch.width(max_rank) > SKETCH_MAX_FRACTION * small


def exact_svd(a: Tensor) -> Spectrum:
    """Reduced SVD, all min(m, n) singular values."""
    dev = a.device
    u, s, vh = torch.linalg.svd(a.to(_linalg_device(dev)), full_matrices=False)
    return Spectrum(u.to(dev), s.to(dev), vh.to(dev), "exact", complete=True)


def _orth(y: Tensor) -> Tensor:
    q, _ = torch.linalg.qr(y.to(_linalg_device(y.device)), mode="reduced")
    return q.to(y.device)


def randomized_svd(
    a: Tensor, rank: int, *, sketch: SketchSettings = SketchSettings(), total_sq: float | None = None
) -> Spectrum:
    """Leading `sketch.width(rank)` singular triplets of `a` by a power-iterated Gaussian sketch.

    `total_sq` = ‖a‖_F² (computed if not given) drives the adaptive stop: the residual energy of
    the rank-`rank` truncation is total_sq − Σσ_k², exact for these factors.
    """
    m, n = a.shape
    width = min(sketch.width(rank), m, n)
    k = min(rank, width)
    if total_sq is None:
        total_sq = frobenius_sq(a)
    gen = torch.Generator().manual_seed(sketch.seed)
    omega = torch.randn(n, width, generator=gen, dtype=torch.float32).to(a.device)
    q = _orth(a @ omega)
    previous = math.inf
    iters = 0
    while True:
        b = q.T @ a  # [width, n]
        ub, s, vh = torch.linalg.svd(
            b.to(device=_linalg_device(a.device), dtype=torch.float64), full_matrices=False
        )
        residual = max(total_sq - float((s[:k] ** 2).sum()), 0.0)
        done = (
            iters >= sketch.max_power_iters
            or residual <= sketch.negligible * total_sq
            or (iters >= sketch.min_power_iters and previous - residual <= sketch.tol * residual)
        )
        if done:
            break
        previous = residual
        z = _orth(b.T)  # = orth(aᵀ q)
        q = _orth(a @ z)
        iters += 1
    u = q @ ub.to(device=a.device, dtype=a.dtype)
    return Spectrum(
        u,
        s.to(device=a.device, dtype=a.dtype),
        vh.to(device=a.device, dtype=a.dtype),
        "randomized",
        complete=width == min(m, n),
        power_iters=iters,
    )


def leading_spectrum(
    a: Tensor,
    max_rank: int,
    *,
    mode: str,
    sketch: SketchSettings = SketchSettings(),
    total_sq: float | None = None,
) -> Spectrum:
    """The singular triplets `select_rank` needs for `mode`, by the cheaper faithful routine."""
    m, n = a.shape
    if use_exact(m, n, max_rank, mode, sketch):
        return exact_svd(a)
    return randomized_svd(a, max_rank, sketch=sketch, total_sq=total_sq)


def select_rank(
    s: Tensor,
    *,
    mode: str,
    param: float | None,
    max_rank: int,
    full_len: int,
    total_sq: float,
    complete: bool,
) -> int:
    """Rank to keep (1 ≤ rank ≤ min(max_rank, full_len)) from singular values `s` (descending).

    `full_len` = min(out, in); `total_sq` = ‖ΔW‖_F²; `complete` says whether `s` holds the whole
    spectrum (required by `cumulative`). See the module docstring for each mode.
    """
    cap = max(1, min(max_rank, full_len))
    sv = s.detach().to(device="cpu", dtype=torch.float64)
    if mode == "fixed":
        return cap
    if param is None:
        raise ValueError(f"rank mode {mode!r} needs a parameter")
    if mode == "energy":
        if not 0.0 < param <= 1.0:
            raise ValueError("energy fraction must be in (0, 1]")
        if total_sq <= 0.0:
            return 1
        frac = torch.cumsum(sv**2, 0) / total_sq
        reached = torch.nonzero(frac >= param - FRACTION_SLACK)
        k = int(reached[0]) + 1 if len(reached) else len(sv)
        return max(1, min(k, cap))
    if mode == "ratio":
        if param < 1.0:
            raise ValueError("ratio must be ≥ 1 (keep singular values above σ₁/ratio)")
        if float(sv[0]) <= 0.0:
            return 1
        count = int((sv > sv[0] / param).sum())
        return min(_kohya_clamp(count, full_len) + 1, cap)
    if mode == "cumulative":
        if not complete:
            raise ValueError("cumulative rank mode needs the whole spectrum (exact SVD)")
        if not 0.0 < param <= 1.0:
            raise ValueError("cumulative fraction must be in (0, 1]")
        total = float(sv.sum())
        if total <= 0.0:
            return 1
        frac = torch.cumsum(sv, 0) / total
        # searchsorted(frac, p) = first i with frac[i] ≥ p (left insertion), with the same slack.
        reached = torch.nonzero(frac >= param - FRACTION_SLACK)
        index = (int(reached[0]) if len(reached) else len(sv)) + 1
        return min(_kohya_clamp(index, full_len) + 1, cap)
    raise ValueError(f"unknown rank mode {mode!r}; choose one of {', '.join(RANK_MODES)}")


def _kohya_clamp(index: int, full_len: int) -> int:
    return max(1, min(index, full_len - 1))


def quantile(values: Tensor, q: float) -> float:
    """`torch.quantile(values, q)` (linear interpolation) for any size, via two `kthvalue` calls."""
    if not 0.0 <= q <= 1.0:
        raise ValueError("quantile must be in [0, 1]")
    flat = values.detach().reshape(-1)
    if flat.device.type == "mps":
        flat = flat.cpu()
    flat = flat.to(torch.float32)
    n = flat.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    v_lo = float(torch.kthvalue(flat, lo + 1).values)
    if hi == lo or pos == lo:
        return v_lo
    v_hi = float(torch.kthvalue(flat, hi + 1).values)
    return v_lo + (v_hi - v_lo) * (pos - lo)


def clamp_factors(up: Tensor, down: Tensor, q: float) -> tuple[Tensor, Tensor, float]:
    """kohya's clamp: bound = Q-quantile of the signed values of up and down together."""
    bound = quantile(torch.cat([up.reshape(-1), down.reshape(-1)]), q)
    bound = abs(bound)
    return up.clamp(-bound, bound), down.clamp(-bound, bound), bound


@dataclass(frozen=True)
class LoraFactors:
    """up [m, k] and down [k, n] with `scale` = alpha/k so that ΔW ≈ scale · up @ down."""

    up: Tensor
    down: Tensor
    rank: int
    alpha: float
    clamp_bound: float | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_factors(
    spec: Spectrum, rank: int, *, alpha: float | None = None, clamp_quantile: float | None = None
) -> LoraFactors:
    """All of S into up (kohya): up = U_k·S_k, down = Vh_k; clamp (optional) at scale 1, then
    up is divided by alpha/k so that alpha/k · up @ down is the truncation. alpha=None → k."""
    up = spec.u[:, :rank] * spec.s[:rank]
    down = spec.vh[:rank]
    bound = None
    if clamp_quantile is not None:
        up, down, bound = clamp_factors(up, down, clamp_quantile)
    a = float(rank) if alpha is None else float(alpha)
    if a <= 0.0:
        raise ValueError("alpha must be positive")
    if a != rank:
        up = up * (rank / a)
    return LoraFactors(up.contiguous(), down.contiguous(), rank, a, bound)


def residual_sq(
    delta: Tensor, up: Tensor, down: Tensor, scale: float, *, rows_per_chunk: int = 4096
) -> float:
    """‖delta − scale·up@down‖_F², accumulated in fp64, computed directly in row chunks.

    Direct rather than ‖ΔW‖² − ‖projection‖² so that it also holds after clamping and after
    rounding the factors to the output dtype (pass the rounded factors, decoded to fp32).
    """
    total = 0.0
    for start in range(0, delta.shape[0], rows_per_chunk):
        stop = start + rows_per_chunk
        r = delta[start:stop] - scale * (up[start:stop] @ down)
        total += frobenius_sq(r)
    return total


def relative_error(err_sq: float, norm_sq: float) -> float:
    return math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0
