"""What every adapter module declares, and the small shape helpers they share.

An adapter type (LoRA, LoHa, LoKr, ...) is one `Adapter` value: the key suffixes that name its
parts, when its parts make a module, how its part shapes fit together (giving ΔW's natural shape
and the rank alpha is divided by), how that fits a target weight, and its math. Header checks work
on `{part: shape}` dicts and raise `PartError` naming the part; the parser turns the part into the
tensor's key. The math receives tensors already cast to the compute dtype; torch is imported only
by the functions that need it, so parsing and planning run without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lorabake.errors import LoraFormatError

Shape = tuple[int, ...]
Shapes = Mapping[str, Shape]
Tensor = Any  # torch.Tensor, not imported here

CORRUPT = "the file is damaged or was assembled from different LoRAs; re-export it from the trainer"
ELSEWHERE = "the LoRA was made for a different model or layer"


@dataclass
class PartError(LoraFormatError):
    """A header fault of one part of a module; `part` names it so the caller can name the tensor."""

    part: str | None = None


def fault(algo: str, message: str, part: str | None = None, hint: str | None = CORRUPT) -> PartError:
    return PartError(f"{algo}: {message}", hint=hint, part=part)


@dataclass(frozen=True)
class Suffix:
    """One row of the key grammar: `text` ends a key, `part` is what that tensor is.

    `spelling` names the family that writes the suffix (flavour detection; None for parts every
    family spells the same). `requires` names a guard on the stem (see lora_format's guards).
    """

    text: str
    part: str
    spelling: str | None = None
    requires: str | None = None


def _no_rank(shapes: Shapes) -> int | None:
    return None


@dataclass(frozen=True)
class Adapter:
    """Everything one adapter type is. See the module docstring.

    - `parts`: the parts that belong to this type (a module holding any of them is of this type);
    - `complete(names)`: whether the parts present give a weight change;
    - `natural(shapes)`: checks the parts against each other; ΔW's natural shape, or None when the
      weight decides it (then `fit` must be given);
    - `rank(shapes)`: what alpha is divided by; None: alpha does not scale this type;
    - `fit(shapes, target)`: None when the module can patch a weight of shape `target`, else why not;
    - `flattened`: ΔW may come as [out, in·k…] for a conv target (LyCORIS stores LoHa/LoKr so);
    - `raw(parts)`: unscaled ΔW of a linear adapter; `fresh`: `raw` returns a new tensor;
    - `factors(parts)`: (up [out, r], down [r, in·k…]) with up @ down = raw ΔW flattened, exactly and
      without forming ΔW; None when this module's parts have no such form (then ΔW is factored whole);
    - `apply(w, parts, strength, scale)`: W' of a weight-dependent adapter;
    - `bias_part`: the part that carries a bias delta;
    - `variant(shapes)`: the registered name of the variant these parts make (OFT vs BOFT);
    - `linear_in`: parts ΔW is linear in; multiplying the first one present by c multiplies ΔW by c
      (how a strength is folded into a file's factors). Empty: ΔW is not linear in any part.
    """

    name: str
    parts: tuple[str, ...]
    suffixes: tuple[Suffix, ...]
    complete: Callable[[Collection[str]], bool]
    natural: Callable[[Shapes], Shape | None]
    rank: Callable[[Shapes], int | None] = _no_rank
    fit: Callable[[Shapes, Shape], str | None] | None = None
    flattened: bool = False
    raw: Callable[[Mapping[str, Tensor]], Tensor] | None = None
    fresh: bool = False
    factors: Callable[[Mapping[str, Tensor]], tuple[Tensor, Tensor] | None] | None = None
    apply: Callable[[Tensor, Mapping[str, Tensor], float, float], Tensor] | None = None
    bias_part: str | None = None
    variant: Callable[[Shapes], str] | None = None
    linear_in: tuple[str, ...] = ()

    @property
    def weight_dependent(self) -> bool:
        return self.apply is not None


# --------------------------------------------------------------------------------------------
# Shape helpers for the adapters' `natural` checks.


def prod(dims: Sequence[int]) -> int:
    return math.prod(int(d) for d in dims)


def need(algo: str, shapes: Shapes, *names: str) -> list[Shape]:
    missing = [n for n in names if n not in shapes]
    if missing:
        raise fault(algo, f"missing part(s) {', '.join(missing)} (have {', '.join(sorted(shapes))})", missing[0])
    return [tuple(int(d) for d in shapes[n]) for n in names]


def ndim_in(algo: str, part: str, shape: Shape, ndims: Collection[int]) -> None:
    if len(shape) not in ndims:
        want = " or ".join(f"{n}-D" for n in sorted(ndims))
        raise fault(algo, f"{part} has shape {list(shape)}, expected {want}", part)


def trailing_ones(algo: str, part: str, shape: Shape, keep: int) -> None:
    if any(d != 1 for d in shape[keep:]):
        raise fault(algo, f"{part} has shape {list(shape)}; dimensions after the first {keep} must be 1", part)


def same(algo: str, a: str, da: int, b: str, db: int, what: str) -> None:
    """Dimension `da` of part `a` equals dimension `db` of part `b`, else `what` names the fault."""
    if da != db:
        raise fault(algo, f"{what}: {a} gives {da}, {b} gives {db}", a)


def squeeze_tail(shape: Sequence[int]) -> Shape:
    """[out, in, 1, 1] → [out, in]: a 1x1 conv and a linear layer take the same ΔW."""
    shape = tuple(int(d) for d in shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def layout_fault(natural: Shape, target: Shape, *, flattened: bool) -> str | None:
    """None when ΔW of shape `natural` is a weight of shape `target`, else the fault in words.

    Linear ≡ 1x1 conv; with `flattened`, [out, in·k…] stands for a conv [out, in, k…].
    """
    n, t = squeeze_tail(natural), squeeze_tail(target)
    if n == t:
        return None
    if flattened and len(n) == 2 and len(t) > 2 and n[0] == t[0] and n[1] == prod(t[1:]):
        return None
    if prod(n) == prod(t) and len(n) != len(t):
        kind = {1: "a vector", 2: "a linear layer"}.get(len(t), f"a {len(t)}-D conv")
        return f"ΔW {list(natural)} has {len(n)} dimensions; the target {list(target)} is {kind}"
    return f"ΔW {list(natural)} does not fit the target {list(target)}"


def check_rank(algo: str, part: str, rank: int) -> int:
    if rank < 1:
        raise fault(algo, f"{part} gives rank {rank}; a rank must be at least 1", part)
    return rank


def exact_factors(w):
    """(up, down) with up @ down = w [out, n] exactly (to fp64 rounding): w's SVD cut at its
    numerical rank (singular values at or under its rounding noise dropped), √σ on each side."""
    import torch

    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    keep = max(1, int((s > s[0] * max(w.shape) * torch.finfo(torch.float64).eps).sum())) if s.numel() else 1
    root = torch.sqrt(s[:keep])
    return (u[:, :keep] * root).to(w.dtype), (root[:, None] * vh[:keep]).to(w.dtype)
