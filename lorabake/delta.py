"""The bake kernel: fold patches into one weight, and ΔW of one module as a tensor.

Pure tensor functions. Nothing here sees a key, a file or a dtype tag: parts arrive as
`{canonical part name: tensor}` and weights as fp32 (fp64 in tests) on the compute device. What
each adapter type is (its shapes, rank, scale and ΔW) lives in `lorabake.adapters`; this module
casts, scales, checks finiteness and folds.

Conventions (what the adapter computes is what LyCORIS's modules compute in `forward`, checked in
tests/test_lycoris_parity.py):

* `delta(...)` returns ΔW *including* the adapter's own scale and *excluding* the user strength.
  ΔW is reshaped to the target by element count, so Linear and Conv 1x1 LoRAs are interchangeable
  (the planner has already checked that the factors' dimensions fit the target).
* Scale: `Patch.scale` when the planner computed it (`adapters.scale`); else the same rule from
  the parts: a `scale` part wins, else alpha (`alpha_override` if given, else the `alpha` tensor)
  divided by the rank, else 1.
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

from lorabake import adapters
from lorabake.adapters import dora, lora
from lorabake.adapters.base import prod
from lorabake.adapters.scale import scale_of as _scale_rule
from lorabake.errors import LoraFormatError
from lorabake.types import RowSlice

Tensor = torch.Tensor
Shape = tuple[int, ...]

LINEAR_ALGOS = adapters.LINEAR_ALGOS
WEIGHT_DEPENDENT_ALGOS = adapters.WEIGHT_DEPENDENT_ALGOS
ALGORITHMS = adapters.ALGORITHMS
DORA_ALGOS = dora.ALGORITHMS
DORA_PARTS = dora.PARTS
BIAS_PARTS = adapters.BIAS_PARTS
TRANSFORMS = ("swap_halves", "transpose")
DORA_MODES = dora.MODES


@dataclass(frozen=True)
class Patch:
    """One adapter module applied to one parameter of one base tensor.

    `parts` holds canonical part names → tensors. `scale` is the module's own multiplier as the
    planner computed it (None: computed here from the parts, with `alpha_override` standing in for
    the alpha tensor). For `param="bias"` the same module's parts are passed and the bias delta is
    the sum of its bias parts: `diff_b`, `b_norm`, and `up_bias` (PEFT `lora_B.bias`) times the
    scale; other parts are ignored.
    """

    algo: str
    parts: dict[str, Tensor]
    strength: float
    slice: RowSlice | None = None
    transform: str | None = None  # "swap_halves" | "transpose"
    alpha_override: float | None = None
    dora: bool = False
    param: str = "weight"  # or "bias"
    scale: float | None = None


def _err(algo: str, message: str, hint: str | None = None) -> LoraFormatError:
    return LoraFormatError(f"{algo}: {message}", hint=hint)


# --------------------------------------------------------------------------------------------
# Scalars and the scale of a module given as tensors.


def _scalar(t: Tensor, name: str, algo: str) -> float:
    if t.numel() != 1:
        raise _err(algo, f"{name} must be a scalar, got shape {list(t.shape)}")
    value = float(t.detach().to(torch.float32).reshape(()).item())  # bf16-safe, no numpy
    if not math.isfinite(value):
        raise _err(algo, f"{name} is {value}")
    return value


def alpha_of(parts: Mapping[str, Tensor], *, algo: str = "lora", alpha_override: float | None = None) -> float | None:
    """The alpha in force: `alpha_override` if given, else the alpha tensor."""
    if alpha_override is not None:
        if not math.isfinite(alpha_override):
            raise _err(algo, f"alpha override is {alpha_override}")
        return float(alpha_override)
    if "alpha" in parts:
        return _scalar(parts["alpha"], "alpha", algo)
    return None


def scale_of(algo: str, parts: Mapping[str, Tensor], *, alpha_override: float | None = None) -> float:
    """The adapter's own multiplier from its parts, by the one rule in `adapters.scale`."""
    scale_part = _scalar(parts["scale"], "scale", algo) if "scale" in parts else None
    rank = adapters.rank_of(algo, _shapes(parts))
    alpha = alpha_of(parts, algo=algo, alpha_override=alpha_override) if rank is not None else None
    return _scale_rule(rank=rank, alpha=alpha, scale_part=scale_part)


def _shapes(parts: Mapping[str, Tensor]) -> dict[str, Shape]:
    return {k: tuple(v.shape) for k, v in parts.items()}


def _describe(parts: Mapping[str, Tensor]) -> str:
    return ", ".join(f"{k}{list(v.shape)}" for k, v in sorted(parts.items()))


def _header_check(algo: str, parts: Mapping[str, Tensor], *, param: str = "weight") -> None:
    """The adapter's own shape checks first: clear errors instead of matmul ones."""
    adapters.delta_shape(algo, _shapes(parts), param=param)


# --------------------------------------------------------------------------------------------
# ΔW as tensors.


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
    if t.numel() != prod(out_shape):
        raise _err(
            algo,
            f"{what} has shape {list(t.shape)} ({t.numel()} values) but the target has {list(out_shape)} ({prod(out_shape)} values)",
            hint="the LoRA was made for a different model or layer",
        )
    return t.reshape(out_shape)


def _check_finite(algo: str, t: Tensor, what: str = "ΔW") -> Tensor:
    # One reduction answers for the common case: a NaN/Inf anywhere makes the sum non-finite, and
    # a finite sum proves every value finite; only an overflowing sum needs the elementwise check.
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise _err(algo, f"{what} contains NaN or Inf", hint="the LoRA file holds non-finite values")
    return t


def _module_scale(algo: str, parts: Mapping[str, Tensor], scale: float | None, alpha_override: float | None) -> float:
    if scale is not None:
        if not math.isfinite(scale):
            raise _err(algo, f"scale is {scale}")
        return float(scale)
    return scale_of(algo, parts, alpha_override=alpha_override)


def delta(
    algo: str,
    parts: Mapping[str, Tensor],
    *,
    out_shape: Sequence[int],
    alpha_override: float | None = None,
    weight: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """ΔW with the adapter's scale included and the user strength not, reshaped to `out_shape`.

    Linear adapters need no weight. For weight-dependent ones (oft, boft, glora, ia3) pass the
    current `weight` (shape `out_shape`); the result is `W'(strength 1) − W`. DoRA's magnitude is
    not applied here (it is a rescale of the merged weight, see `apply_patches`).
    Computed in fp32 (fp64 when the weight or a part is fp64) on the weight's or parts' device.
    """
    adapter = adapters.get(algo)
    if adapter.weight_dependent:
        _header_check(algo, parts)
        if weight is None:
            raise _err(algo, "ΔW depends on the base weight; pass weight=")
        w = _fit(algo, weight, out_shape, "weight")
        new = _apply_weight_dependent(algo, w, parts, 1.0, scale=_module_scale(algo, parts, scale, alpha_override))
        return new - w
    device = weight.device if weight is not None else None
    return _linear_delta(
        algo, parts, out_shape, _module_scale(algo, parts, scale, alpha_override), _compute_dtype(parts, weight), device
    )


def _linear_delta(
    algo: str,
    parts: Mapping[str, Tensor],
    out_shape: Sequence[int],
    scale: float,
    dtype: torch.dtype,
    device: torch.device | None,
) -> Tensor:
    _header_check(algo, parts)
    raw = adapters.get(algo).raw
    if raw is None:  # set: the new value, not a difference; apply_patches handles it
        raise _err(algo, "set_weight replaces the weight; it has no ΔW")
    dw = raw(_cast_parts({k: v for k, v in parts.items() if k not in BIAS_PARTS}, dtype, device))
    if scale != 1.0:
        # lora/loha/lokr build a fresh tensor: scale it in place instead of allocating another
        dw = dw.mul_(scale) if adapters.get(algo).fresh else dw * scale
    return _check_finite(algo, _fit(algo, dw, out_shape))


def bias_delta(
    algo: str,
    parts: Mapping[str, Tensor],
    *,
    out_shape: Sequence[int],
    alpha_override: float | None = None,
    scale: float | None = None,
) -> Tensor:
    """Δb: the sum of `diff_b`, `b_norm` and scale·`up_bias` (PEFT lora_B.bias), as present."""
    _header_check(algo, parts, param="bias")
    dtype = _compute_dtype(parts, None)
    db = None
    for part in BIAS_PARTS:
        if part in parts:
            term = parts[part].to(dtype)
            if part == "up_bias":
                term = term * _module_scale(algo, parts, scale, alpha_override)
            db = term if db is None else db + term.reshape(db.shape)
    return _check_finite(algo, _fit(algo, db, out_shape, "bias delta"), "bias delta")


def _apply_weight_dependent(algo: str, w: Tensor, parts: Mapping[str, Tensor], s: float, *, scale: float) -> Tensor:
    p = _cast_parts(parts, w.dtype, w.device)
    new = adapters.get(algo).apply(w, p, s, scale)
    return _check_finite(algo, new, "patched weight")


# --------------------------------------------------------------------------------------------
# Folding patches.


def _narrow(t: Tensor, sl: RowSlice | None) -> Tensor:
    if sl is None:
        return t
    if not (0 <= sl.dim < t.dim()) or sl.start < 0 or sl.length <= 0 or sl.start + sl.length > t.shape[sl.dim]:
        raise LoraFormatError(f"slice {sl} does not fit a tensor of shape {list(t.shape)}")
    return t.narrow(sl.dim, sl.start, sl.length)


def lora_view(t: Tensor, sl: RowSlice | None, how: str | None) -> Tensor:
    """The rows of checkpoint tensor `t` a module with this slice and transform sees, as it sees them."""
    return _transform(_narrow(t, sl), how, "lora")


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
    adapters.get(p.algo)
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
                bias_delta(p.algo, p.parts, out_shape=view.shape, alpha_override=p.alpha_override, scale=p.scale)
                continue
            db = bias_delta(p.algo, p.parts, out_shape=view.shape, alpha_override=p.alpha_override, scale=p.scale)
            view.add_(_transform(db.to(view), p.transform, p.algo), alpha=p.strength)
            continue
        mod = _transform(view, p.transform, p.algo)  # the weight as the adapter saw it
        if not adapters.fits(p.algo, _shapes(p.parts), tuple(mod.shape)):
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
            new = _apply_weight_dependent(p.algo, mod, p.parts, p.strength, scale=patch_scale(p))
        elif p.dora:
            dw = _linear_delta(p.algo, p.parts, mod.shape, patch_scale(p), mod.dtype, mod.device)
            peft = "magnitude" in p.parts
            mag = p.parts["magnitude" if peft else "dora_scale"].to(mod)
            new = dora.fold(p.algo, mod, dw, mag, p.strength, dora_mode, peft=peft)
        elif _add_low_rank(view, p):
            continue
        else:
            dw = _linear_delta(p.algo, p.parts, mod.shape, patch_scale(p), mod.dtype, mod.device)
            view.add_(_transform(dw, p.transform, p.algo), alpha=p.strength)
            continue
        view.copy_(_transform(new, p.transform, p.algo))
    return out


def patch_scale(p: Patch) -> float:
    """The patch's own multiplier: `Patch.scale` when the planner gave it, else the rule from its parts."""
    return _module_scale(p.algo, p.parts, p.scale, p.alpha_override)


def _add_low_rank(view: Tensor, p: Patch) -> bool:
    """W += s·scale·up@down in one `addmm_`, with no full-size ΔW temporary (the common LoRA).

    Only for plain LoRA/LoCon without Tucker `mid` or a transform, on a contiguous target whose
    rows are up's rows; returns False to send anything else down the general path.
    """
    if p.algo != "lora" or p.transform is not None or "mid" in p.parts or not view.is_contiguous():
        return False
    up, down = lora.flat(p.parts["up"]), lora.flat(p.parts["down"])
    if up.shape[0] != view.shape[0] or up.shape[0] * down.shape[1] != view.numel():
        return False
    _header_check(p.algo, p.parts)
    up = _check_finite(p.algo, up.to(view), "up")
    down = _check_finite(p.algo, down.to(view), "down")
    scale = patch_scale(p)
    lora.product(up, down, into=view.view(view.shape[0], -1), alpha=p.strength * scale)
    return True
