"""No non-finite or silently clamped value reaches an output.

A patched or re-cast tensor is checked in fp32 just before it is encoded: a NaN or Inf that its
input did not hold, or a value beyond what the output dtype holds (one that nearest rounding
would turn into Inf, or that fp8 encoding would clamp), is an error naming the tensor, the files
it came from and the largest value. With `saturated` given (`merge --saturate`), such values
(NaN excepted) are clamped to the dtype's largest finite value instead, and the tensor recorded.
The common case costs one min/max reduction over the tensor.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch

from lorabake import dtypes
from lorabake.errors import LorabakeError
from lorabake.limits import FP32_MAX


class RangeError(LorabakeError):
    """A baked value is NaN, Inf or beyond the output dtype's range."""


def limits(tag: str) -> tuple[float, float]:
    """(largest finite value, the magnitude from which nearest rounding to `tag` overflows)."""
    info = torch.finfo(dtypes.torch_dtype(tag))
    big = float(info.max)
    if info.bits >= 32:
        return big, math.inf  # fp32/fp64: only non-finite values are out of range
    half_ulp = 2.0 ** math.floor(math.log2(big)) * float(info.eps) / 2
    return big, big + half_ulp


def guard(
    x32: torch.Tensor,
    tag: str,
    *,
    tensor: str,
    sources: list[str],
    base32: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    saturated: dict[str, float] | None = None,
) -> None:
    """Raise `RangeError` if `x32` (about to be encoded as `tag`) holds a value its output cannot;
    non-finite positions of `base32` (the input, or a function giving it: only needed when
    something is off) are the input's own. With `saturated`, clamp in place instead and record
    the largest magnitude under `tensor`."""
    if x32.numel() == 0:
        return
    big, overflow = limits(tag)
    lo, hi = torch.aminmax(x32)
    peak = max(-float(lo), float(hi))  # NaN when any value is NaN
    if peak < overflow:
        return
    finite = torch.isfinite(x32)
    if callable(base32):
        base32 = base32()
    new_bad = ~finite if base32 is None else ~finite & torch.isfinite(base32)
    largest = float(x32[finite].abs().max()) if bool(finite.any()) else 0.0
    where = sources[0] if sources else None
    also = f" (with {', '.join(sources[1:])})" if len(sources) > 1 else ""
    if bool(new_bad.any()):
        kind = "NaN" if bool((torch.isnan(x32) & new_bad).any()) else "Inf"
        if kind == "NaN" or saturated is None:
            raise RangeError(
                f"baked values would be {kind}{also}; the largest finite magnitude is {largest:.4g}",
                path=where,
                tensor=tensor,
                hint=_HINT if kind == "Inf" else "a strength or alpha this large overflows fp32; lower it",
            )
    elif largest < overflow:
        return  # only the input's own NaN/Inf, carried over unchanged
    elif saturated is None:
        raise RangeError(
            f"baked values reach {largest:.4g}{also}, beyond {tag}'s range (±{big:.6g})",
            path=where,
            tensor=tensor,
            hint=_HINT,
        )
    clamp = new_bad | (finite & (x32.abs() > big))
    x32[clamp] = torch.copysign(torch.tensor(big, dtype=x32.dtype, device=x32.device), x32[clamp])
    saturated[tensor] = max(saturated.get(tensor, 0.0), math.inf if bool(new_bad.any()) else largest)


_HINT = "lower the strength, write a wider --dtype (bf16/fp32), or pass --saturate to clamp such values"


def lora_paths(plan, name: str) -> list[str]:
    """The files of the LoRAs that patch tensor `name`, in order, each once."""
    paths = [plan.loras[p.lora_index].reader.path for p in plan.patches.get(name, ())]
    return list(dict.fromkeys(paths))


def check_scales(plan, *, read=None) -> None:
    """strength · scale of every planned patch is a number fp32 holds (the kernels multiply by it in
    fp32): else a `RangeError` naming the LoRA and the module, before a byte is written.

    `read(reader, key)` gives a LoRA tensor (the preflight's kept copy); default: read the file."""
    if read is None:
        def read(reader, key):
            return reader.read(key)

    from lorabake.adapters.scale import scale_of

    for patches in plan.patches.values():
        for p in patches:
            m, lp = p.module, plan.loras[p.lora_index]
            scale = m.scale
            if scale is None:  # the planner read headers only: the alpha/scale scalars, read here
                values = {k: float(read(lp.reader, m.parts[k]).double().reshape(-1)[0]) for k in ("alpha", "scale") if k in m.parts}
                scale = scale_of(rank=m.rank, alpha=values.get("alpha"), scale_part=values.get("scale"), peft=lp.lora.peft_scales.get(m.stem))
            if not math.isfinite(p.strength * scale) or abs(p.strength * scale) > FP32_MAX:
                raise RangeError(
                    f"strength {p.strength:g} × scale {scale:.4g} of module {m.stem!r} is beyond fp32 (±{FP32_MAX:.4g})",
                    path=lp.reader.path,
                    hint="lower the strength",
                )


class Guarded:
    """A bake-kernel codec whose every encoded row block passes `guard` first (blocks may come
    from several threads; `saturated` is updated under a lock). Untouched rows re-encoded into a
    narrower dtype are guarded too; rows kept as stored are the input's own."""

    def __init__(self, codec, tag: str, *, tensor: str, sources: list[str], saturated: dict[str, float] | None = None):
        self.inner, self.tag, self.tensor, self.sources = codec, tag, tensor, sources
        self.saturated = saturated
        self.rows, self.cols, self.shape, self.parallel = codec.rows, codec.cols, codec.shape, codec.parallel
        self._lock = threading.Lock()

    def encode(self, start: int, stop: int, x32: torch.Tensor) -> None:
        mine = None if self.saturated is None else {}
        base = lambda: self.inner.decode(start, stop, torch.empty_like(x32))  # noqa: E731 - stored rows, not yet overwritten
        guard(x32, self.tag, tensor=self.tensor, sources=self.sources, base32=base, saturated=mine)
        if mine:
            with self._lock:
                self.saturated[self.tensor] = max(self.saturated.get(self.tensor, 0.0), mine[self.tensor])
        self.inner.encode(start, stop, x32)

    def keep(self, start: int, stop: int) -> None:
        if getattr(self.inner, "in_place", True):  # rows stay as stored (or a codec keeps its own bytes)
            self.inner.keep(start, stop)
            return
        from lorabake.bake_kernel import BLOCK_ELEMS

        step = max(1, BLOCK_ELEMS // max(self.cols, 1))
        buf = torch.empty((min(step, stop - start), self.cols), dtype=torch.float32, device=self.inner.src.device)
        for a in range(start, stop, step):
            b = min(a + step, stop)
            self.encode(a, b, self.inner.decode(a, b, buf[: b - a]))

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # decode, stored, base_in_output, result
