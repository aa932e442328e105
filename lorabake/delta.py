"""The math: ΔW for every LoRA-family algorithm, and folding patches into one weight.

Pure tensor functions. Nothing here sees a key, a file or a dtype tag: parts arrive as
`{canonical part name: tensor}` and weights as fp32 (fp64 in tests) on the compute device.

Conventions (what the adapter computes is what LyCORIS's modules compute in `forward`, checked in
tests/test_lycoris_parity.py):

* `delta(...)` returns ΔW *including* the adapter's own scale (alpha/rank, or the A1111 `scale`
  part) and *excluding* the user strength. It is built from 2-D matmuls of flattened factors and
  reshaped to the target by element count, so Linear and Conv 1x1 LoRAs are interchangeable.
* Scale: a `scale` part wins; else alpha (`alpha_override` if given, else the `alpha` tensor)
  divided by the rank; no alpha → 1. Full/norm diffs have no rank, so alpha never applies to
  them, and neither does it to a LoKr whose two factors are both full matrices.
  alpha = 0 gives scale 0 exactly as ComfyUI/A1111 do (LyCORIS and kohya only rewrite 0 to the
  rank when *creating* a network, so their saved files never carry 0); see `alpha_of`.
* Linear adapters (lora, loha, lokr, full, norm) add `strength·ΔW`. Weight-dependent ones (DoRA,
  oft, boft, glora, ia3) are folded one after another over the current weight, in patch order.
* A slice narrows rows first; a transform maps the checkpoint's rows to the LoRA's view of the
  module and back (both transforms are involutions), so weight-dependent adapters see the weight
  the way the adapter was trained on it, and linear ones reduce to adding the transformed ΔW.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lorabake.errors import LoraFormatError
from lorabake.types import RowSlice

Tensor = torch.Tensor
Shape = tuple[int, ...]

LINEAR_ALGOS = ("lora", "loha", "lokr", "full", "norm", "set")
WEIGHT_DEPENDENT_ALGOS = ("oft", "boft", "glora", "ia3")
ALGORITHMS = LINEAR_ALGOS + WEIGHT_DEPENDENT_ALGOS
DORA_ALGOS = ("lora", "loha", "lokr")
DORA_PARTS = ("dora_scale", "magnitude")
BIAS_PARTS = ("diff_b", "b_norm", "up_bias")
TRANSFORMS = ("swap_halves", "transpose")
DORA_MODES = ("lycoris", "comfy")


@dataclass(frozen=True)
class Patch:
    """One adapter module applied to one parameter of one base tensor.

    `parts` holds canonical part names → tensors. For `param="bias"` the same module's parts are
    passed and the bias delta is taken from `diff_b` (full), `b_norm` (norm) or `up_bias` (PEFT
    `lora_B.bias`, scaled by alpha/rank with the module's `down` rank); other parts are ignored.
    """

    algo: str
    parts: dict[str, Tensor]
    strength: float
    slice: RowSlice | None = None
    transform: str | None = None  # "swap_halves" | "transpose"
    alpha_override: float | None = None
    dora: bool = False
    param: str = "weight"  # or "bias"


# --------------------------------------------------------------------------------------------
# Header-only checks: shapes in, shapes out.


def _err(algo: str, message: str, hint: str | None = None) -> LoraFormatError:
    return LoraFormatError(f"{algo}: {message}", hint=hint)


def _unsupported(algo: str) -> LoraFormatError:
    return LoraFormatError(
        f"algorithm {algo} is not supported", hint=f"supported: {', '.join(ALGORITHMS)}"
    )


def _prod(dims: Sequence[int]) -> int:
    return math.prod(int(d) for d in dims)


def _need(algo: str, shapes: Mapping[str, Shape], *names: str) -> list[Shape]:
    missing = [n for n in names if n not in shapes]
    if missing:
        raise _err(algo, f"missing part(s) {', '.join(missing)} (have {', '.join(sorted(shapes))})")
    return [tuple(int(d) for d in shapes[n]) for n in names]


def _ndim_at_least(algo: str, name: str, shape: Shape, n: int) -> None:
    if len(shape) < n:
        raise _err(algo, f"{name} has shape {list(shape)}, expected at least {n} dimensions")


def _trailing_ones(algo: str, name: str, shape: Shape, keep: int) -> None:
    if any(d != 1 for d in shape[keep:]):
        raise _err(algo, f"{name} has shape {list(shape)}; dimensions after the first {keep} must be 1")


def _rank_mismatch(algo: str, a: str, ra: int, b: str, rb: int) -> LoraFormatError:
    return _err(algo, f"ranks disagree: {a} gives {ra}, {b} gives {rb}", hint="the LoRA file is damaged or mis-grouped")


def _lora_shape(shapes: Mapping[str, Shape]) -> Shape:
    algo = "lora"
    up, down = _need(algo, shapes, "up", "down")
    _ndim_at_least(algo, "up", up, 2)
    _ndim_at_least(algo, "down", down, 2)
    _trailing_ones(algo, "up", up, 2)
    if "mid" not in shapes:
        if up[1] != down[0]:
            raise _rank_mismatch(algo, "up", up[1], "down", down[0])
        return (up[0], *down[1:])
    (mid,) = _need(algo, shapes, "mid")
    _ndim_at_least(algo, "mid", mid, 3)
    _trailing_ones(algo, "down", down, 2)
    if mid[0] != up[1]:
        raise _rank_mismatch(algo, "up", up[1], "mid", mid[0])
    if mid[1] != down[0]:
        raise _rank_mismatch(algo, "mid", mid[1], "down", down[0])
    return (up[0], down[1], *mid[2:])


def _loha_shape(shapes: Mapping[str, Shape]) -> Shape:
    algo = "loha"
    w1a, w1b, w2a, w2b = _need(algo, shapes, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    has_t = ("hada_t1" in shapes, "hada_t2" in shapes)
    if any(has_t) and not all(has_t):
        raise _err(algo, "Tucker LoHa needs both hada_t1 and hada_t2")
    if all(has_t):
        t1, t2 = _need(algo, shapes, "hada_t1", "hada_t2")
        halves = []
        for i, (t, a, b) in enumerate(((t1, w1a, w1b), (t2, w2a, w2b)), start=1):
            _ndim_at_least(algo, f"hada_t{i}", t, 3)
            if len(a) != 2 or len(b) != 2:
                raise _err(algo, f"Tucker hada_w{i}_a/b must be 2-D, got {list(a)} and {list(b)}")
            if t[0] != a[0]:
                raise _rank_mismatch(algo, f"hada_t{i}", t[0], f"hada_w{i}_a", a[0])
            if t[1] != b[0]:
                raise _rank_mismatch(algo, f"hada_t{i}", t[1], f"hada_w{i}_b", b[0])
            halves.append((a[1], b[1], *t[2:]))
    else:
        halves = []
        for i, (a, b) in enumerate(((w1a, w1b), (w2a, w2b)), start=1):
            _ndim_at_least(algo, f"hada_w{i}_a", a, 2)
            _ndim_at_least(algo, f"hada_w{i}_b", b, 2)
            _trailing_ones(algo, f"hada_w{i}_a", a, 2)
            if a[1] != b[0]:
                raise _rank_mismatch(algo, f"hada_w{i}_a", a[1], f"hada_w{i}_b", b[0])
            halves.append((a[0], *b[1:]))
    if halves[0] != halves[1]:
        raise _err(algo, f"the two Hadamard factors disagree: {list(halves[0])} vs {list(halves[1])}")
    return halves[0]


def _lokr_halves(shapes: Mapping[str, Shape]) -> tuple[Shape, Shape]:
    """Shapes of the two Kronecker factors W1 [a, c] and W2 [b, d(, k...)]."""
    algo = "lokr"
    if "lokr_w1" in shapes:
        (w1,) = _need(algo, shapes, "lokr_w1")
        if len(w1) != 2:
            raise _err(algo, f"lokr_w1 must be 2-D, got {list(w1)}")
    else:
        w1a, w1b = _need(algo, shapes, "lokr_w1_a", "lokr_w1_b")
        if len(w1a) != 2 or len(w1b) != 2:
            raise _err(algo, f"lokr_w1_a/b must be 2-D, got {list(w1a)} and {list(w1b)}")
        if w1a[1] != w1b[0]:
            raise _rank_mismatch(algo, "lokr_w1_a", w1a[1], "lokr_w1_b", w1b[0])
        w1 = (w1a[0], w1b[1])
    if "lokr_w2" in shapes:
        (w2,) = _need(algo, shapes, "lokr_w2")
        _ndim_at_least(algo, "lokr_w2", w2, 2)
        if "lokr_t2" in shapes:
            raise _err(algo, "lokr_t2 given together with a full lokr_w2")
    elif "lokr_t2" in shapes:
        t2, w2a, w2b = _need(algo, shapes, "lokr_t2", "lokr_w2_a", "lokr_w2_b")
        _ndim_at_least(algo, "lokr_t2", t2, 3)
        if len(w2a) != 2 or len(w2b) != 2:
            raise _err(algo, f"Tucker lokr_w2_a/b must be 2-D, got {list(w2a)} and {list(w2b)}")
        if t2[0] != w2a[0]:
            raise _rank_mismatch(algo, "lokr_t2", t2[0], "lokr_w2_a", w2a[0])
        if t2[1] != w2b[0]:
            raise _rank_mismatch(algo, "lokr_t2", t2[1], "lokr_w2_b", w2b[0])
        w2 = (w2a[1], w2b[1], *t2[2:])
    else:
        w2a, w2b = _need(algo, shapes, "lokr_w2_a", "lokr_w2_b")
        if len(w2a) != 2:
            raise _err(algo, f"lokr_w2_a must be 2-D, got {list(w2a)}")
        _ndim_at_least(algo, "lokr_w2_b", w2b, 2)
        if w2a[1] != w2b[0]:
            raise _rank_mismatch(algo, "lokr_w2_a", w2a[1], "lokr_w2_b", w2b[0])
        w2 = (w2a[0], *w2b[1:])
    return w1, w2


def _lokr_shape(shapes: Mapping[str, Shape]) -> Shape:
    (a, c), w2 = _lokr_halves(shapes)
    return (a * w2[0], c * w2[1], *w2[2:])


def _glora_shape(shapes: Mapping[str, Shape]) -> Shape:
    algo = "glora"
    a1, a2, b1, b2 = _need(algo, shapes, "glora_a1", "glora_a2", "glora_b1", "glora_b2")
    for name, s in (("glora_a1", a1), ("glora_a2", a2), ("glora_b1", b1), ("glora_b2", b2)):
        _ndim_at_least(algo, name, s, 2)
    for name, s in (("glora_a1", a1), ("glora_a2", a2), ("glora_b1", b1)):
        _trailing_ones(algo, name, s, 2)
    if a1[1] != a2[0]:
        raise _rank_mismatch(algo, "glora_a1", a1[1], "glora_a2", a2[0])
    if b1[1] != b2[0]:
        raise _rank_mismatch(algo, "glora_b1", b1[1], "glora_b2", b2[0])
    if a1[0] != a2[1] or a2[1] != b2[1]:
        raise _err(
            algo,
            f"input dims disagree: glora_a1 {list(a1)}, glora_a2 {list(a2)}, glora_b2 {list(b2)}",
            hint="old-LyCORIS GLoRA layout (b2@b1 + W@a2@a1) is not supported",
        )
    return (b1[0], *b2[1:])


def _oft_out(shapes: Mapping[str, Shape], algo: str) -> int:
    name = "oft_diag" if (algo == "oft" and "oft_blocks" not in shapes and "oft_diag" in shapes) else "oft_blocks"
    (blocks,) = _need(algo, shapes, name)
    want = 3 if algo == "oft" else 4
    if len(blocks) != want or blocks[-1] != blocks[-2]:
        raise _err(algo, f"{name} must be [{'n, b, b' if want == 3 else 'm, n, b, b'}], got {list(blocks)}")
    out = blocks[-3] * blocks[-1]
    if "rescale" in shapes and _prod(shapes["rescale"]) != out:
        raise _err(algo, f"rescale has {_prod(shapes['rescale'])} values, the blocks cover {out} rows")
    return out


def _check_dora_shape(algo: str, shapes: Mapping[str, Shape], natural: Shape) -> None:
    mags = [p for p in DORA_PARTS if p in shapes]
    if not mags:
        return
    if algo not in DORA_ALGOS:
        raise _err(algo, f"{mags[0]} (DoRA) is only defined for {', '.join(DORA_ALGOS)}")
    if len(mags) > 1:
        raise _err(algo, "both dora_scale and magnitude given")
    m = tuple(shapes[mags[0]])
    out = natural[0]
    if _prod(m) == out and (mags[0] == "magnitude" or len(m) == 1 or m[0] == out):
        return
    if len(m) >= 2 and m[0] == 1 and _prod(natural[1:]) % max(_prod(m), 1) == 0:
        return
    raise _err(algo, f"{mags[0]} shape {list(m)} fits neither the output axis ({out}) nor an input axis of {list(natural)}")


# algo -> the natural shape of ΔW from part shapes (linear adapters and glora).
_NATURAL_SHAPE = {
    "lora": _lora_shape,
    "loha": _loha_shape,
    "lokr": _lokr_shape,
    "full": lambda shapes: _need("full", shapes, "diff")[0],
    "norm": lambda shapes: _need("norm", shapes, "w_norm")[0],
    "set": lambda shapes: _need("set", shapes, "set_weight")[0],
    "glora": _glora_shape,
}
# algo -> header-only check of an adapter whose ΔW shape the weight decides.
_CHECK_WEIGHT_DEPENDENT = {
    "oft": lambda shapes, algo: _oft_out(shapes, algo),
    "boft": lambda shapes, algo: _oft_out(shapes, algo),
    "ia3": lambda shapes, algo: _need(algo, shapes, "ia3_weight"),
}


def delta_shape(algo: str, shapes: Mapping[str, Shape], *, param: str = "weight") -> Shape | None:
    """The natural shape of ΔW (or of the bias delta) from part shapes alone, for preflight.

    Raises LoraFormatError on a missing part or inconsistent ranks/shapes. Returns None when the
    shape depends on the base weight (oft, boft, ia3: only part of it is constrained; use `fits`).
    A natural shape may be flattened (LoHa/LoKr conv factors give [out, in·kh·kw]): compare to
    the target by element count, as `delta` reshapes by element count.
    """
    if algo not in ALGORITHMS:
        raise _unsupported(algo)
    if param == "bias":
        return _bias_shape(algo, shapes)
    if param != "weight":
        raise ValueError(f"param must be 'weight' or 'bias', not {param!r}")
    natural_of = _NATURAL_SHAPE.get(algo)
    if natural_of is None:  # oft, boft, ia3: the weight decides (see `fits`)
        if any(p in shapes for p in DORA_PARTS):
            raise _err(algo, f"DoRA is only defined for {', '.join(DORA_ALGOS)}")
        _CHECK_WEIGHT_DEPENDENT[algo](shapes, algo)
        return None
    natural = natural_of(shapes)
    _check_dora_shape(algo, shapes, natural)
    return natural


# algo -> the part that carries its bias delta.
_BIAS_PART = {"full": "diff_b", "norm": "b_norm", "lora": "up_bias"}


def _bias_shape(algo: str, shapes: Mapping[str, Shape]) -> Shape:
    part = _BIAS_PART.get(algo)
    if part is None:
        raise _err(algo, "has no bias delta (only full diff_b, norm b_norm and lora up_bias do)")
    (s,) = _need(algo, shapes, part)
    if algo == "lora":
        _need(algo, shapes, "down")  # the rank that scales up_bias
        if "up" in shapes and _prod(s) != shapes["up"][0]:
            raise _err(algo, f"up_bias has {_prod(s)} values, up has {shapes['up'][0]} rows")
    return s


def fits(algo: str, shapes: Mapping[str, Shape], target: Shape) -> bool:
    """Whether a module with these part shapes can patch a weight of shape `target`."""
    natural = delta_shape(algo, shapes)
    target = tuple(target)
    if natural is not None:
        return _prod(natural) == _prod(target)
    if algo in ("oft", "boft"):
        return len(target) >= 1 and target[0] == _oft_out(shapes, algo)
    n = _prod(shapes["ia3_weight"])  # ia3: per output row or per input column
    return len(target) >= 2 and n in (target[0], target[1])


def _lokr_rank(shapes: Mapping[str, Shape]) -> int | None:
    """ComfyUI/A1111: w2's rank when w2 is factored, else w1's; both full → alpha ignored."""
    if "lokr_w2" not in shapes:
        return int(_need("lokr", shapes, "lokr_w2_b")[0][0])
    if "lokr_w1" not in shapes:
        return int(_need("lokr", shapes, "lokr_w1_b")[0][0])
    return None


# algo -> the rank alpha is divided by, from part shapes; absent: alpha never applies.
_RANK = {
    "lora": lambda shapes: int(_need("lora", shapes, "down")[0][0]),
    "loha": lambda shapes: int(_need("loha", shapes, "hada_w1_b")[0][0]),
    "lokr": _lokr_rank,
    "glora": lambda shapes: int(_need("glora", shapes, "glora_a2")[0][0]),
}


def rank_of(algo: str, shapes: Mapping[str, Shape]) -> int | None:
    """The rank alpha is divided by, or None when alpha does not apply."""
    if algo not in ALGORITHMS:
        raise _unsupported(algo)
    rank = _RANK.get(algo)
    return rank(shapes) if rank else None


# --------------------------------------------------------------------------------------------
# Scalars.


def _scalar(t: Tensor, name: str, algo: str) -> float:
    if t.numel() != 1:
        raise _err(algo, f"{name} must be a scalar, got shape {list(t.shape)}")
    value = float(t.detach().to(torch.float32).reshape(()).item())  # bf16-safe, no numpy
    if not math.isfinite(value):
        raise _err(algo, f"{name} is {value}")
    return value


def alpha_of(parts: Mapping[str, Tensor], *, algo: str = "lora", alpha_override: float | None = None) -> float | None:
    """The alpha in force: `alpha_override` (PEFT metadata) if given, else the alpha tensor."""
    if alpha_override is not None:
        if not math.isfinite(alpha_override):
            raise _err(algo, f"alpha override is {alpha_override}")
        return float(alpha_override)
    if "alpha" in parts:
        return _scalar(parts["alpha"], "alpha", algo)
    return None


def scale_of(algo: str, parts: Mapping[str, Tensor], *, alpha_override: float | None = None) -> float:
    """The adapter's own multiplier: `scale` part, else alpha/rank, else 1."""
    if "scale" in parts:  # A1111 honours a per-module scale that overrides alpha/rank
        return _scalar(parts["scale"], "scale", algo)
    rank = rank_of(algo, _shapes(parts))
    if rank is None:
        return 1.0
    alpha = alpha_of(parts, algo=algo, alpha_override=alpha_override)
    if alpha is None:
        return 1.0
    return alpha / rank


def _shapes(parts: Mapping[str, Tensor]) -> dict[str, Shape]:
    return {k: tuple(v.shape) for k, v in parts.items()}


def _describe(parts: Mapping[str, Tensor]) -> str:
    return ", ".join(f"{k}{list(v.shape)}" for k, v in sorted(parts.items()))


# --------------------------------------------------------------------------------------------
# ΔW builders (unscaled). Inputs are already in the compute dtype and on one device.


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _tucker(core: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """M[p, q, k...] = Σ_ij core[i, j, k...] · a[i, p] · b[j, q]  (a: [r, out], b: [r', in])."""
    k = core.shape[2:]
    m = a.t() @ core.reshape(core.shape[0], -1)  # [p, j·k]
    m = m.reshape(a.shape[1], core.shape[1], _prod(k)).transpose(1, 2)  # [p, k, j]
    m = m @ b  # [p, k, q]
    return m.transpose(1, 2).reshape(a.shape[1], b.shape[1], *k)


def _lora_raw(p: Mapping[str, Tensor]) -> Tensor:
    up, down = _flat(p["up"]), p["down"]
    if "mid" not in p:
        return (up @ _flat(down)).reshape(up.shape[0], *down.shape[1:])
    return _tucker(p["mid"], up.t(), _flat(down))


def _loha_raw(p: Mapping[str, Tensor]) -> Tensor:
    if "hada_t1" in p:
        m1 = _tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
        m2 = _tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
        return m1 * m2
    b = p["hada_w1_b"]
    m1 = _flat(p["hada_w1_a"]) @ _flat(b)
    m2 = _flat(p["hada_w2_a"]) @ _flat(p["hada_w2_b"])
    return (m1 * m2).reshape(m1.shape[0], *b.shape[1:])


def _lokr_raw(p: Mapping[str, Tensor]) -> Tensor:
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        w2 = _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    else:
        b = p["lokr_w2_b"]
        w2 = (p["lokr_w2_a"] @ _flat(b)).reshape(-1, *b.shape[1:])
    w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))
    return torch.kron(w1, w2.contiguous())


# Algorithms whose raw ΔW is a new tensor (the others return a part itself).
_FRESH_RAW = ("lora", "loha", "lokr")
# algo -> unscaled ΔW from parts already cast to the compute dtype.
_RAW = {
    "lora": _lora_raw,
    "loha": _loha_raw,
    "lokr": _lokr_raw,
    "full": lambda p: p["diff"],
    "norm": lambda p: p["w_norm"],
}


def _cast_parts(parts: Mapping[str, Tensor], dtype: torch.dtype, device: torch.device | None) -> dict[str, Tensor]:
    return {k: v.to(device=device if device is not None else v.device, dtype=dtype) for k, v in parts.items()}


def _compute_dtype(parts: Mapping[str, Tensor], weight: Tensor | None) -> torch.dtype:
    if weight is not None:
        return weight.dtype
    return torch.float64 if any(v.dtype == torch.float64 for v in parts.values()) else torch.float32


def _fit(algo: str, t: Tensor, out_shape: Sequence[int], what: str = "ΔW") -> Tensor:
    out_shape = tuple(int(d) for d in out_shape)
    if tuple(t.shape) == out_shape:
        return t
    if t.numel() != _prod(out_shape):
        raise _err(
            algo,
            f"{what} has shape {list(t.shape)} ({t.numel()} values) but the target has {list(out_shape)} ({_prod(out_shape)} values)",
            hint="the LoRA was made for a different model or layer",
        )
    return t.reshape(out_shape)


def _check_finite(algo: str, t: Tensor, what: str = "ΔW") -> Tensor:
    # One reduction answers for the common case: a NaN/Inf anywhere makes the sum non-finite, and
    # a finite sum proves every value finite; only an overflowing sum needs the elementwise check.
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise _err(algo, f"{what} contains NaN or Inf", hint="the LoRA file holds non-finite values")
    return t


def delta(
    algo: str,
    parts: Mapping[str, Tensor],
    *,
    out_shape: Sequence[int],
    alpha_override: float | None = None,
    weight: Tensor | None = None,
) -> Tensor:
    """ΔW with the adapter's scale included and the user strength not, reshaped to `out_shape`.

    Linear adapters need no weight. For weight-dependent ones (oft, boft, glora, ia3) pass the
    current `weight` (shape `out_shape`); the result is `W'(strength 1) − W`. DoRA's magnitude is
    not applied here (it is a rescale of the merged weight, see `apply_patches`).
    Computed in fp32 (fp64 when the weight or a part is fp64) on the weight's or parts' device.
    """
    if algo not in ALGORITHMS:
        raise _unsupported(algo)
    if algo in WEIGHT_DEPENDENT_ALGOS:
        delta_shape(algo, _shapes(parts))
        if weight is None:
            raise _err(algo, "ΔW depends on the base weight; pass weight=")
        w = _fit(algo, weight, out_shape, "weight")
        new = _apply_weight_dependent(algo, w, parts, 1.0, alpha_override=alpha_override)
        return new - w
    device = weight.device if weight is not None else None
    return _linear_delta(algo, parts, out_shape, alpha_override, _compute_dtype(parts, weight), device)


def _linear_delta(
    algo: str,
    parts: Mapping[str, Tensor],
    out_shape: Sequence[int],
    alpha_override: float | None,
    dtype: torch.dtype,
    device: torch.device | None,
) -> Tensor:
    delta_shape(algo, _shapes(parts))  # consistency first: clear errors instead of matmul ones
    p = _cast_parts({k: v for k, v in parts.items() if k not in BIAS_PARTS}, dtype, device)
    raw = _RAW.get(algo)
    if raw is None:  # set: the new value, not a difference; apply_patches handles it
        raise _err(algo, "set_weight replaces the weight; it has no ΔW")
    dw = raw(p)
    scale = scale_of(algo, parts, alpha_override=alpha_override)
    if scale != 1.0:
        # lora/loha/lokr build a fresh tensor: scale it in place instead of allocating another
        dw = dw.mul_(scale) if algo in _FRESH_RAW else dw * scale
    return _check_finite(algo, _fit(algo, dw, out_shape))


def bias_delta(
    algo: str, parts: Mapping[str, Tensor], *, out_shape: Sequence[int], alpha_override: float | None = None
) -> Tensor:
    """Δb: `diff_b` (full), `b_norm` (norm), or scale·`up_bias` (lora, PEFT lora_B.bias)."""
    _bias_shape(algo, _shapes(parts))
    dtype = _compute_dtype(parts, None)
    db = parts[_BIAS_PART[algo]].to(dtype) * scale_of(algo, parts, alpha_override=alpha_override)
    return _check_finite(algo, _fit(algo, db, out_shape, "bias delta"), "bias delta")


# --------------------------------------------------------------------------------------------
# Weight-dependent adapters: W → W'. `w` is the module-space weight, `s` the user strength.


def _cayley(blocks: Tensor, constraint: float) -> Tensor:
    """R = (I + Q)(I − Q)⁻¹ with Q = B − Bᵀ, Q scaled down to norm `constraint` if larger."""
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
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    return s * r + (1 - s) * eye


def _rescale(algo: str, new: Tensor, p: Mapping[str, Tensor], s: float) -> Tensor:
    if "rescale" not in p:
        return new
    r = p["rescale"].reshape(new.shape[0], *([1] * (new.dim() - 1)))
    if s != 1:
        r = 1 + s * (r - 1)
    return new * r


def _oft_constraint(algo: str, p: Mapping[str, Tensor], out_dim: int) -> float:
    # LyCORIS/kohya store the constraint per output dim: clamp ‖Q‖ to alpha·out (ComfyUI: alpha).
    return _scalar(p["alpha"], "alpha", algo) * out_dim if "alpha" in p else 0.0


def _oft(w: Tensor, p: Mapping[str, Tensor], s: float, alpha_override: float | None = None) -> Tensor:
    algo = "oft"
    if "oft_blocks" in p:
        r = _cayley(p["oft_blocks"], _oft_constraint(algo, p, w.shape[0]))
    else:  # old LyCORIS: the rotation itself (A1111 network_oft "oft_diag")
        r = p["oft_diag"]
    n, b, _ = r.shape
    if n * b != w.shape[0]:
        raise _err(algo, f"blocks cover {n * b} rows, the weight has {w.shape[0]}")
    r = _towards_identity(r, s)
    blocks = w.reshape(n, b, -1)
    new = (r.transpose(1, 2) @ blocks).reshape(w.shape)  # each block of rows: W_k ← R_kᵀ W_k
    return _rescale(algo, new, p, s)


def _boft(w: Tensor, p: Mapping[str, Tensor], s: float, alpha_override: float | None = None) -> Tensor:
    algo = "boft"
    m, n, b, _ = p["oft_blocks"].shape
    out = w.shape[0]
    if n * b != out:
        raise _err(algo, f"blocks cover {n * b} rows, the weight has {out}")
    if b % 2:
        raise _err(algo, f"block size {b} must be even")
    if m > 1 and out % (2 ** (m - 1) * b):
        raise _err(algo, f"{m} butterfly stages do not fit {out} rows with block size {b}")
    r = _cayley(p["oft_blocks"], _oft_constraint(algo, p, out))
    x = w.reshape(out, -1)
    for i in range(m):
        k = 2 ** i * (b // 2)
        # Butterfly stage i: rows j·2k + g·k + t (g ∈ {0,1}) are regrouped as (j, t, g) so that each
        # block of b consecutive regrouped rows mixes rows that are k apart; then undo the regrouping.
        perm = x.reshape(-1, 2, k, x.shape[1]).transpose(1, 2).reshape(n, b, -1)
        perm = _towards_identity(r[i], s) @ perm
        x = perm.reshape(-1, k, 2, x.shape[1]).transpose(1, 2).reshape(out, -1)
    return _rescale(algo, x.reshape(w.shape), p, s)


def _glora(w: Tensor, p: Mapping[str, Tensor], s: float, alpha_override: float | None) -> Tensor:
    algo = "glora"
    natural = _glora_shape(_shapes(p))
    wn = _fit(algo, w, natural, "weight")
    a = _flat(p["glora_a1"]) @ _flat(p["glora_a2"])  # [in, in]
    wa = torch.einsum("oi...,ij->oj...", wn, a)
    b = (_flat(p["glora_b1"]) @ _flat(p["glora_b2"])).reshape(natural)
    dw = (wa + b) * scale_of(algo, p, alpha_override=alpha_override)
    return w + s * _check_finite(algo, dw).reshape(w.shape)


def _ia3(w: Tensor, p: Mapping[str, Tensor], s: float, alpha_override: float | None = None) -> Tensor:
    algo = "ia3"
    vec = p["ia3_weight"].reshape(-1)
    on_input = bool(_scalar(p["on_input"], "on_input", algo)) if "on_input" in p else False
    axis = 1 if on_input else 0
    if w.dim() < 2 or vec.numel() != w.shape[axis]:
        raise _err(
            algo, f"ia3_weight has {vec.numel()} values, the weight has {list(w.shape)} ({'input' if on_input else 'output'} axis)"
        )
    shape = [1] * w.dim()
    shape[axis] = vec.numel()
    return w * (1 + s * vec.reshape(shape))


# algo -> W' = f(W, parts, strength, alpha_override) for adapters whose result depends on W.
_WEIGHT_DEPENDENT = {"oft": _oft, "boft": _boft, "glora": _glora, "ia3": _ia3}


def _apply_weight_dependent(
    algo: str, w: Tensor, parts: Mapping[str, Tensor], s: float, *, alpha_override: float | None
) -> Tensor:
    p = _cast_parts(parts, w.dtype, w.device)
    apply = _WEIGHT_DEPENDENT.get(algo)
    if apply is None:
        raise _unsupported(algo)
    new = apply(w, p, s, alpha_override)
    return _check_finite(algo, new, "patched weight")


# --------------------------------------------------------------------------------------------
# DoRA.


def _dora_axis(algo: str, m: Tensor, shape: Sequence[int], *, peft: bool) -> tuple[int, Tensor]:
    """(0, m as [out,1,..]) for a per-output-row magnitude, (1, m as [1,in,1..]) per input column.

    LyCORIS `dora_scale` says its axis by shape ([out,1,…] or [1,in,…]). PEFT's `magnitude` is
    always per output row, also when stored [1,out,1,1] for a conv (ambiguous when in == out).
    """
    out, rest = shape[0], shape[1:]
    ones = [1] * (len(shape) - 1)
    if m.numel() == out and (peft or m.dim() == 1 or m.shape[0] == out):
        return 0, m.reshape(out, *ones)
    if len(shape) >= 2 and m.dim() >= 2 and m.shape[0] == 1 and m.numel() == shape[1]:
        return 1, m.reshape(1, shape[1], *ones[1:])
    raise _err(algo, f"DoRA magnitude shape {list(m.shape)} fits neither axis of the weight {[out, *rest]}")


def _axis_norm(w: Tensor, axis: int) -> Tensor:
    keep = [1] * w.dim()
    keep[axis] = w.shape[axis]
    return torch.linalg.vector_norm(w.transpose(0, axis).reshape(w.shape[axis], -1), dim=1).reshape(keep)


def _dora(algo: str, w: Tensor, dw: Tensor, m: Tensor, s: float, mode: str, *, peft: bool) -> Tensor:
    axis, m = _dora_axis(algo, m, w.shape, peft=peft)
    merged = w + dw
    # ComfyUI's output-axis branch normalises by the norm of the *original* weight.
    norm_of = w if (mode == "comfy" and axis == 0) else merged
    norm = _axis_norm(norm_of, axis) + torch.finfo(w.dtype).eps  # LyCORIS adds eps; PEFT does not
    w_dora = merged * (m / norm)
    if s == 1:
        return w_dora
    return w + s * (w_dora - w)


# --------------------------------------------------------------------------------------------
# Folding patches.


def _narrow(t: Tensor, sl: RowSlice | None) -> Tensor:
    if sl is None:
        return t
    if not (0 <= sl.dim < t.dim()) or sl.start < 0 or sl.length <= 0 or sl.start + sl.length > t.shape[sl.dim]:
        raise LoraFormatError(f"slice {sl} does not fit a tensor of shape {list(t.shape)}")
    return t.narrow(sl.dim, sl.start, sl.length)


def _transform(t: Tensor, how: str | None, algo: str) -> Tensor:
    """Checkpoint space ↔ LoRA space; both transforms are their own inverse."""
    if how is None:
        return t
    if how == "transpose":
        if t.dim() != 2:
            raise _err(algo, f"transform 'transpose' needs a 2-D tensor, got {list(t.shape)}")
        return t.t()
    if t.shape[0] % 2:
        raise _err(algo, f"transform 'swap_halves' needs an even number of rows, got {t.shape[0]}")
    half = t.shape[0] // 2
    return torch.cat((t[half:], t[:half]), dim=0)


def _check_patch(p: Patch) -> None:
    if p.algo not in ALGORITHMS:
        raise _unsupported(p.algo)
    if p.param not in ("weight", "bias"):
        raise ValueError(f"Patch.param must be 'weight' or 'bias', not {p.param!r}")
    if p.transform is not None and p.transform not in TRANSFORMS:
        raise ValueError(f"Patch.transform must be one of {TRANSFORMS} or None, not {p.transform!r}")
    if not math.isfinite(p.strength):
        raise ValueError(f"Patch.strength must be finite, not {p.strength}")
    has_mag = [k for k in DORA_PARTS if k in p.parts]
    if p.param == "weight" and p.dora != bool(has_mag):
        raise _err(p.algo, f"dora={p.dora} but magnitude parts are {has_mag or 'absent'}")
    if p.param == "weight" and p.dora and p.algo not in DORA_ALGOS:
        raise _err(p.algo, f"DoRA is only defined for {', '.join(DORA_ALGOS)}")


def apply_patches(weight: Tensor, patches: Sequence[Patch], *, dora_mode: str = "lycoris") -> Tensor:
    """Fold `patches`, in order, into `weight` (fp32/fp64, whole tensor) and return the new tensor.

    Strength semantics (s = Patch.strength; every adapter gives W exactly at s = 0 and what the
    adapter computes at run time at s = 1):

    * lora/loha/lokr/full/norm: W + s·ΔW.
    * DoRA (lora/loha/lokr with `dora_scale`/`magnitude`): W_dora = (W + ΔW)·m/(‖W + ΔW‖ + eps),
      norm per output row for an [out,1,…]/[out] magnitude and per input column for [1,in,…];
      W' = W + s·(W_dora − W). This is ComfyUI's and A1111's interpolation: linear in s and exact
      at s = 0 and 1. LyCORIS's `(W+ΔW)·(1 + s·(m/‖·‖ − 1))` was not chosen because its s = 0
      still adds the full ΔW. `dora_mode="comfy"` reproduces ComfyUI's quirk of normalising the
      output axis by ‖W‖ instead of ‖W + ΔW‖.
    * oft/boft: each rotation R becomes s·R + (1−s)·I (as LyCORIS), and `rescale` becomes
      1 + s·(rescale − 1) (LyCORIS would apply the full rescale at any s).
    * glora: W + s·ΔW(W). ia3: W·(1 + s·w). set: W' = set_weight for any s ≠ 0.
    """
    if dora_mode not in DORA_MODES:
        raise ValueError(f"dora_mode must be one of {DORA_MODES}, not {dora_mode!r}")
    if weight.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"apply_patches computes in fp32/fp64; got a {weight.dtype} weight")
    out = weight.clone()
    for p in patches:
        _check_patch(p)
        view = _narrow(out, p.slice)
        if p.param == "bias":
            if p.strength == 0:
                bias_delta(p.algo, p.parts, out_shape=view.shape, alpha_override=p.alpha_override)
                continue
            db = bias_delta(p.algo, p.parts, out_shape=view.shape, alpha_override=p.alpha_override)
            view.add_(_transform(db.to(view), p.transform, p.algo), alpha=p.strength)
            continue
        mod = _transform(view, p.transform, p.algo)  # the weight as the adapter saw it
        if not fits(p.algo, _shapes(p.parts), tuple(mod.shape)):
            raise _err(
                p.algo,
                f"parts {_describe(p.parts)} do not fit the target of shape {list(mod.shape)}",
                hint="the LoRA was made for a different model or layer",
            )
        if p.strength == 0:
            continue
        if p.algo == "set":
            new = _fit(p.algo, p.parts["set_weight"].to(mod), mod.shape, "set_weight")
        elif p.algo in WEIGHT_DEPENDENT_ALGOS:
            new = _apply_weight_dependent(p.algo, mod, p.parts, p.strength, alpha_override=p.alpha_override)
        elif p.dora:
            dw = _linear_delta(p.algo, p.parts, mod.shape, p.alpha_override, mod.dtype, mod.device)
            peft = "magnitude" in p.parts
            mag = p.parts["magnitude" if peft else "dora_scale"].to(mod)
            new = _dora(p.algo, mod, dw, mag, p.strength, dora_mode, peft=peft)
        elif _add_low_rank(view, p):
            continue
        else:
            dw = _linear_delta(p.algo, p.parts, mod.shape, p.alpha_override, mod.dtype, mod.device)
            view.add_(_transform(dw, p.transform, p.algo), alpha=p.strength)
            continue
        view.copy_(_transform(new, p.transform, p.algo))
    return out


def _add_low_rank(view: Tensor, p: Patch) -> bool:
    """W += s·scale·up@down in one `addmm_`, with no full-size ΔW temporary (the common LoRA).

    Only for plain LoRA/LoCon without Tucker `mid` or a transform, on a contiguous target whose
    rows are up's rows; returns False to send anything else down the general path.
    """
    if p.algo != "lora" or p.transform is not None or "mid" in p.parts or not view.is_contiguous():
        return False
    up, down = _flat(p.parts["up"]), _flat(p.parts["down"])
    if up.shape[0] != view.shape[0] or up.shape[0] * down.shape[1] != view.numel():
        return False
    delta_shape(p.algo, _shapes(p.parts))  # consistency first: clear errors instead of matmul ones
    up = _check_finite(p.algo, up.to(view), "up")
    down = _check_finite(p.algo, down.to(view), "down")
    scale = scale_of(p.algo, p.parts, alpha_override=p.alpha_override)
    view.view(view.shape[0], -1).addmm_(up, down, alpha=p.strength * scale)
    return True
