"""OFT and BOFT (LyCORIS, kohya oft.py): W' = R·W with R block-diagonal orthogonal.

`oft_blocks` [n, b, b] (OFT) or [m, n, b, b] (BOFT, m butterfly stages) hold skew parts; the
rotation is the Cayley transform, its norm clamped to alpha·out when an alpha is given (LyCORIS
and kohya store the constraint per output row). Old LyCORIS `oft_diag` is the rotation itself.
`rescale` scales each output row. Strength s moves each rotation towards identity: s·R + (1−s)·I.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from lorabake.adapters.base import Adapter, Shape, Shapes, Suffix, Tensor, fault, prod

SUFFIXES = (
    Suffix(".oft_blocks", "oft_blocks"),
    Suffix(".oft_diag", "oft_diag"),
    Suffix(".rescale", "rescale"),
)
PARTS = ("oft_blocks", "oft_diag", "rescale")


def complete(parts: Collection[str]) -> bool:
    return "oft_blocks" in parts or "oft_diag" in parts


def variant(shapes: Shapes) -> str:
    return "boft" if "oft_blocks" in shapes and len(shapes["oft_blocks"]) == 4 else "oft"


def _rows(shapes: Shapes) -> int:
    """Output rows the blocks cover; checks the blocks' shape."""
    part = "oft_blocks" if "oft_blocks" in shapes else "oft_diag"
    blocks = tuple(shapes[part])
    if len(blocks) not in (3, 4) or (part == "oft_diag" and len(blocks) != 3):
        raise fault(variant(shapes), f"{part} has shape {list(blocks)}: expected 3-D (OFT) or 4-D (BOFT)", part)
    if blocks[-1] != blocks[-2] or min(blocks) < 1:
        raise fault(variant(shapes), f"{part} has shape {list(blocks)}: blocks must be square and non-empty", part)
    out = blocks[-3] * blocks[-1]
    if "rescale" in shapes and prod(shapes["rescale"]) != out:
        raise fault(variant(shapes), f"rescale has {prod(shapes['rescale'])} values, the blocks cover {out} rows", "rescale")
    return out


def natural(shapes: Shapes) -> None:
    _rows(shapes)
    return None  # the weight decides


def fit(shapes: Shapes, target: Shape) -> str | None:
    out = _rows(shapes)
    if len(target) >= 1 and target[0] == out:
        return None
    return f"the blocks cover {out} rows; the target {list(target)} has {target[0] if target else 0}"


def _cayley(blocks: Tensor, constraint: float) -> Tensor:
    """R = (I + Q)(I − Q)⁻¹ with Q = B − Bᵀ, Q scaled down to norm `constraint` if larger."""
    import torch

    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        q_norm = torch.linalg.vector_norm(q) + 1e-8  # one norm over all blocks, as LyCORIS
        if q_norm > constraint:
            q = q * (constraint / q_norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _towards_identity(r: Tensor, s: float) -> Tensor:
    if s == 1:
        return r
    import torch

    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    return s * r + (1 - s) * eye


def _rescale(new: Tensor, p: Mapping[str, Tensor], s: float) -> Tensor:
    if "rescale" not in p:
        return new
    r = p["rescale"].reshape(new.shape[0], *([1] * (new.dim() - 1)))
    if s != 1:
        r = 1 + s * (r - 1)
    return new * r


def _constraint(p: Mapping[str, Tensor], out_dim: int) -> float:
    # LyCORIS/kohya store the constraint per output dim: clamp ‖Q‖ to alpha·out (ComfyUI: alpha).
    return float(p["alpha"].reshape(-1)[0].item()) * out_dim if "alpha" in p else 0.0


def apply_oft(w: Tensor, p: Mapping[str, Tensor], s: float, scale: float) -> Tensor:
    if "oft_blocks" in p:
        r = _cayley(p["oft_blocks"], _constraint(p, w.shape[0]))
    else:  # old LyCORIS: the rotation itself (A1111 network_oft "oft_diag")
        r = p["oft_diag"]
    n, b, _ = r.shape
    if n * b != w.shape[0]:
        raise fault("oft", f"blocks cover {n * b} rows, the weight has {w.shape[0]}", "oft_blocks")
    r = _towards_identity(r, s)
    blocks = w.reshape(n, b, -1)
    new = (r.transpose(1, 2) @ blocks).reshape(w.shape)  # each block of rows: W_k ← R_kᵀ W_k
    return _rescale(new, p, s)


def apply_boft(w: Tensor, p: Mapping[str, Tensor], s: float, scale: float) -> Tensor:
    m, n, b, _ = p["oft_blocks"].shape
    out = w.shape[0]
    if n * b != out:
        raise fault("boft", f"blocks cover {n * b} rows, the weight has {out}", "oft_blocks")
    if b % 2:
        raise fault("boft", f"block size {b} must be even", "oft_blocks")
    if m > 1 and out % (2 ** (m - 1) * b):
        raise fault("boft", f"{m} butterfly stages do not fit {out} rows with block size {b}", "oft_blocks")
    r = _cayley(p["oft_blocks"], _constraint(p, out))
    x = w.reshape(out, -1)
    for i in range(m):
        k = 2 ** i * (b // 2)
        # Butterfly stage i: rows j·2k + g·k + t (g ∈ {0,1}) are regrouped as (j, t, g) so that each
        # block of b consecutive regrouped rows mixes rows that are k apart; then undo the regrouping.
        perm = x.reshape(-1, 2, k, x.shape[1]).transpose(1, 2).reshape(n, b, -1)
        perm = _towards_identity(r[i], s) @ perm
        x = perm.reshape(-1, k, 2, x.shape[1]).transpose(1, 2).reshape(out, -1)
    return _rescale(x.reshape(w.shape), p, s)


OFT = Adapter(
    name="oft",
    parts=PARTS,
    suffixes=SUFFIXES,
    complete=complete,
    natural=natural,
    fit=fit,
    apply=apply_oft,
    variant=variant,
)
BOFT = Adapter(
    name="boft",
    parts=PARTS,
    suffixes=(),  # same keys as OFT; `variant` tells them apart by the blocks' dimensions
    complete=complete,
    natural=natural,
    fit=fit,
    apply=apply_boft,
    variant=variant,
)
