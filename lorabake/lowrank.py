"""Low-rank algebra on LoRA factors: exact stacking, and the optimal rank reduction of a product.

Pure tensor functions, like `lorabake.svd`: nothing here sees a key or a file. A module's update is
held as factors `up [out, r]`, `down [r, n]` (conv kernels flattened to n = in·kh·kw) with every
scalar (strength, alpha/rank) already folded into `up`, so that ΔW = up @ down.

* Stacking is exact: Σ cᵢ·upᵢ@downᵢ = [c₁·up₁ | c₂·up₂ | …] @ [down₁; down₂; …] (rank Σrᵢ). The
  coefficient goes into `up` alone, so a negative strength keeps its sign and nothing is squared
  (kohya's `merge_lora_models` multiplies both sides by √c and then sums them, which adds cross
  terms upᵢ@downⱼ; its `--concat` mode squares the strength).
* Reduction never forms ΔW: with up = Q_u R_u and downᵀ = Q_d R_d (reduced QR), ΔW = Q_u (R_u R_dᵀ) Q_dᵀ,
  so the SVD of the small R×R core gives the whole non-zero spectrum of ΔW, and truncating it is the
  best rank-k approximation of the dense ΔW in the Frobenius norm (Eckart–Young). The squared error
  is the sum of the dropped σ², known exactly without touching ΔW. Cost: O((out + n)·R²), against
  O(out·n·min(out, n)) for an SVD of the dense ΔW (what kohya's resize_lora and svd_merge_lora do).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorabake import svd
from lorabake.adapters.base import exact_factors

Tensor = torch.Tensor


def stack(terms: Sequence[tuple[float, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(coefficient, up [out, rᵢ], down [rᵢ, n]) terms → (up, down) whose product is Σ cᵢ·upᵢ@downᵢ."""
    if not terms:
        raise ValueError("nothing to stack")
    out, n = terms[0][1].shape[0], terms[0][2].shape[1]
    for _, up, down in terms:
        if up.shape[0] != out or down.shape[1] != n or up.shape[1] != down.shape[0]:
            raise ValueError(f"factor shapes {tuple(up.shape)} @ {tuple(down.shape)} do not give [{out}, {n}]")
    ups = [c * up for c, up, _ in terms]
    return torch.cat(ups, dim=1), torch.cat([down for _, _, down in terms], dim=0)


def factor_dense(dw: Tensor) -> tuple[Tensor, Tensor]:
    """up @ down = dw [out, n] exactly (to fp64 rounding): its SVD cut at the numerical rank, √σ each side."""
    return exact_factors(dw)


def product_spectrum(up: Tensor, down: Tensor) -> svd.Spectrum:
    """The SVD of up @ down without forming it: all its non-zero singular triplets.

    `complete` is True: the singular values past the core's size are exactly zero, so sums over
    this spectrum are sums over the whole spectrum of the product (what `cumulative` needs).
    """
    work = torch.float64 if up.dtype == torch.float64 else torch.float32
    q_u, r_u = torch.linalg.qr(up.to(work), mode="reduced")
    q_d, r_d = torch.linalg.qr(down.to(work).T, mode="reduced")
    core = svd.exact_svd(r_u @ r_d.T)
    return svd.Spectrum(q_u @ core.u, core.s, core.vh @ q_d.T, "factored", complete=True)


@dataclass(frozen=True)
class Reduced:
    """A rank-`rank` approximation up @ down of a product, and what it dropped.

    `kept_sq` and `total_sq` are Σσ² kept and Σσ² of the whole product (= ‖ΔW‖²_F); the squared
    Frobenius error of the approximation is their difference.
    """

    up: Tensor
    down: Tensor
    rank: int
    kept_sq: float
    total_sq: float

    @property
    def error_sq(self) -> float:
        return max(self.total_sq - self.kept_sq, 0.0)

    @property
    def relative_error(self) -> float:
        return svd.relative_error(self.error_sq, self.total_sq)

    @property
    def kept_energy(self) -> float:
        return self.kept_sq / self.total_sq if self.total_sq > 0 else 1.0


def reduce(
    up: Tensor,
    down: Tensor,
    *,
    max_rank: int,
    mode: str = "fixed",
    param: float | None = None,
) -> Reduced:
    """The optimal approximation of up @ down at the rank `mode` picks (capped by `max_rank`).

    The kept singular values are split evenly (√σ into each side), so neither factor carries the
    whole magnitude: both stay in the range fp16/bf16 store well.
    """
    spec = product_spectrum(up, down)
    s = spec.s
    total_sq = float(torch.sum(s.double() ** 2))
    full_len = min(up.shape[0], down.shape[1])
    nonzero = max(1, int(torch.count_nonzero(s > s[0] * 1e-7))) if s.numel() and float(s[0]) > 0 else 1
    rank = svd.select_rank(
        s, mode=mode, param=param, max_rank=min(max_rank, s.numel()), full_len=full_len,
        total_sq=total_sq, complete=True,
    )
    if mode != "fixed":
        rank = min(rank, nonzero)
    root = torch.sqrt(s[:rank])
    new_up = (spec.u[:, :rank] * root).to(up.dtype).contiguous()
    new_down = (root[:, None] * spec.vh[:rank]).to(down.dtype).contiguous()
    kept_sq = float(torch.sum(s[:rank].double() ** 2))
    return Reduced(new_up, new_down, rank, kept_sq, total_sq)
