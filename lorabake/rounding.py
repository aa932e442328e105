"""Going back from fp32 to the output dtype: nearest or stochastic rounding, fp8 and scaled fp8.

* `cast_to(x, tag, mode=...)`: nearest is torch's round-to-nearest-even `.to()`; fp8 values are
  first clamped to the finite range (e4m3fn has no Inf and `.to()` would give NaN; e5m2 would give
  Inf), so out-of-range values saturate. Stochastic rounding rounds each value to one of its two
  neighbours in the target format with probability proportional to proximity, so it is unbiased:
  a delta smaller than half an ulp survives in expectation instead of vanishing.
  Its random numbers come from a seed derived from `seed_key` (sha256, not Python's salted
  `hash()`), drawn on the CPU in fixed-size chunks, so the result is the same on every run and
  every device, and memory stays about twice the tensor.
* `lost_fraction`: how much of the intended delta the cast threw away (see its docstring).
* Scaled fp8 (ComfyUI "scaled_fp8" checkpoints): the real weight is
  `codes.float() · scale`; patch the dequantised weight, then `quantize_scaled` again.
"""

from __future__ import annotations

import functools
import hashlib

import torch

from lorabake import dtypes

Tensor = torch.Tensor

MODES = ("nearest", "stochastic")
FP8_TAGS = ("F8_E4M3", "F8_E5M2")
_CHUNK = 1 << 22  # elements per chunk of random numbers; part of the seed contract, do not change


def seed_of(seed_key: str) -> int:
    """A stable 63-bit seed for a tensor name."""
    return int.from_bytes(hashlib.sha256(seed_key.encode("utf-8")).digest()[:8], "little") >> 1


def _target(tag: str) -> torch.dtype:
    dt = dtypes.torch_dtype(tag)
    if not dt.is_floating_point:
        raise ValueError(f"cast_to needs a float dtype tag, not {tag}")
    return dt


def _finite_max(dt: torch.dtype) -> float:
    return float(torch.finfo(dt).max)


@functools.cache
def _mantissa_bits(dt: torch.dtype) -> int:
    # finfo.eps = 2^-mantissa_bits for every IEEE-like float torch has, fp8 included.
    return round(-torch.log2(torch.tensor(torch.finfo(dt).eps, dtype=torch.float64)).item())


@functools.cache
def _min_normal_exp(dt: torch.dtype) -> int:
    return round(torch.log2(torch.tensor(torch.finfo(dt).smallest_normal, dtype=torch.float64)).item())


def cast_to(x32: Tensor, tag: str, *, mode: str = "nearest", seed_key: str | None = None) -> Tensor:
    """`x32` (fp32, or fp64) as the float dtype `tag` (F64/F32/F16/BF16/F8_E4M3/F8_E5M2)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if not x32.dtype.is_floating_point:
        raise ValueError(f"cast_to needs a float tensor, got {x32.dtype}")
    dt = _target(tag)
    if dt == x32.dtype:
        return x32.clone()
    if dt in (torch.float32, torch.float64) and torch.finfo(dt).bits >= torch.finfo(x32.dtype).bits:
        return x32.to(dt)  # widening is exact
    if x32.dtype not in (torch.float32, torch.float64):
        x32 = x32.to(torch.float32)  # exact decode of a 16/8-bit float before rounding it again
    if tag in FP8_TAGS:
        big = _finite_max(dt)
        x32 = x32.clamp(-big, big)  # NaN stays NaN
    if mode == "nearest":
        return x32.to(dt)
    if seed_key is None:
        raise ValueError("stochastic rounding needs a seed_key (the tensor name)")
    return _stochastic(x32, dt, seed_of(seed_key))


def _stochastic(x: Tensor, dt: torch.dtype, seed: int) -> Tensor:
    """Stochastic rounding of a whole tensor: `round_stochastic` over `NoiseStream` chunks."""
    flat = x.reshape(-1).to(torch.float32)  # fp64 input: the noise resolution is fp32's anyway
    out = torch.empty(flat.shape, dtype=dt, device=x.device)
    noise = NoiseStream(seed, flat.numel(), dt)
    for start in range(0, flat.numel(), _CHUNK):
        v = flat[start : start + _CHUNK]
        out[start : start + _CHUNK] = round_stochastic(v, noise.take(start, v.numel(), device=x.device), dt)
    return out.reshape(x.shape)


class NoiseStream:
    """The random integers of one tensor's stochastic rounding, element by element in flat order.

    Drawn from the CPU generator in fixed `_CHUNK`-sized draws (the seed contract), so a caller
    rounding the tensor block by block in increasing order gets exactly the noise a whole-tensor
    `cast_to` would use. Only the current draw is kept (16 MiB at most).
    """

    def __init__(self, seed: int, numel: int, dt: torch.dtype) -> None:
        self.numel = numel
        self.high = 1 << (23 - _mantissa_bits(dt))
        self.gen = torch.Generator(device="cpu")
        self.gen.manual_seed(seed)
        self.index = -1
        self.chunk: Tensor | None = None

    def _draw(self, index: int) -> Tensor:
        while self.index < index:
            self.index += 1
            size = min(_CHUNK, self.numel - self.index * _CHUNK)
            self.chunk = torch.randint(0, self.high, (size,), generator=self.gen, dtype=torch.int32)
        if self.index != index:
            raise ValueError("NoiseStream is read in increasing order only")
        return self.chunk

    def take(self, start: int, n: int, *, device: torch.device | None = None) -> Tensor:
        """Noise for elements [start, start + n), in increasing `start` order."""
        pieces = []
        pos, stop = start, start + n
        while pos < stop:
            index = pos // _CHUNK
            chunk = self._draw(index)
            lo = pos - index * _CHUNK
            hi = min(stop - index * _CHUNK, chunk.numel())
            pieces.append(chunk[lo:hi])
            pos = index * _CHUNK + hi
        noise = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return noise.to(device) if device is not None else noise


def round_stochastic(v: Tensor, noise: Tensor, dt: torch.dtype) -> Tensor:
    """fp32 values `v` rounded down or up to a grid neighbour in `dt`, P(up) = (v − lower) / spacing.

    On the fp32 bit pattern, `dt` keeps the top `mbits` of fp32's 23 mantissa bits; adding a
    uniform random integer below 2^(23 − mbits) (`noise`, one per value) to the pattern and
    truncating those bits is exactly stochastic rounding (a carry moves into the exponent as it
    should). Below `dt`'s smallest normal the grid spacing stops shrinking, so those values are
    first lifted by 2^emin into the binade where fp32's truncation matches that spacing, then
    lowered back. Unbiased to within 2^-(23 − mbits) of an ulp; integer and power-of-two steps
    only, so every device produces the same bits from the same CPU-drawn noise.
    """
    drop = 23 - _mantissa_bits(dt)
    lift = 2.0 ** _min_normal_exp(dt)
    big = _finite_max(dt)
    keep_mask = -(1 << drop)  # ...1110000 in two's complement: clears the dropped bits
    a = v.abs()
    small = a < lift
    any_small = bool(small.any())
    if any_small:
        a = torch.where(small, a + lift, a)
    r = ((a.view(torch.int32) + noise) & keep_mask).view(torch.float32)
    if any_small:
        r = torch.where(small, r - lift, r)
    r = torch.where(a > big, a, r.clamp(max=big))  # beyond the finite range: .to() decides
    r = torch.copysign(r, v)
    if not bool(torch.isfinite(v).all()):
        r = torch.where(torch.isfinite(v), r, v)
    return r.to(dt)


def lost_fraction(base32: Tensor, new32: Tensor, cast: Tensor, *, base_cast: Tensor | None = None) -> float:
    """The share of the intended delta that did not reach the output: 1 − ⟨realised, intended⟩/‖intended‖².

    intended = new32 − base32 (what the patches asked for, in fp32); realised = cast − base_cast,
    where base_cast is the base as the output dtype would hold it (nearest rounding of base32;
    equal to base32 when the output keeps the base's dtype). 0 when everything survived (fp32
    output), 1 when nothing did (a delta below half an ulp under nearest rounding), ≈0 for
    stochastic rounding, whose per-element noise is uncorrelated with the delta: it measures the
    delta's component that survived, not the noise (use `relative_error` for that). Values may
    leave [0, 1] slightly (overshoot, noise). 0.0 when the intended delta is zero.
    """
    if base32.dtype != torch.float32 or new32.dtype != torch.float32:
        dot = norm2 = 0.0
        for intended, realised in _deltas(base32, new32, cast, base_cast):
            dot += float(torch.dot(intended, realised))
            norm2 += float(torch.dot(intended, intended))
        return 0.0 if norm2 == 0.0 else 1.0 - dot / norm2
    # One pass over cache-sized chunks with two reused fp32 buffers: no full-size temporaries
    # (the base's cast included, which is made chunk by chunk).
    b, n, c = base32.reshape(-1), new32.reshape(-1), cast.reshape(-1)
    bc = base_cast.reshape(-1) if base_cast is not None else None
    narrow_tag = None if cast.dtype in (torch.float32, torch.float64) else dtypes.tag_of(cast.dtype)
    size = min(_FUSED_CHUNK, b.numel())
    ibuf = torch.empty(size, dtype=torch.float32, device=b.device)
    rbuf = torch.empty(size, dtype=torch.float32, device=b.device)
    dot = norm2 = 0.0
    for start in range(0, b.numel(), _FUSED_CHUNK):
        sl = slice(start, start + _FUSED_CHUNK)
        bs = b[sl]
        k = bs.numel()
        intended, realised = ibuf[:k], rbuf[:k]
        torch.sub(n[sl], bs, out=intended)
        realised.copy_(c[sl])
        if bc is not None:
            realised.sub_(bc[sl].float())
        elif narrow_tag is not None:
            realised.sub_(cast_to(bs, narrow_tag).float())
        else:
            realised.sub_(bs)
        dot += float(torch.dot(intended, realised))
        norm2 += float(torch.dot(intended, intended))
    return 0.0 if norm2 == 0.0 else 1.0 - dot / norm2


class LostDelta:
    """`lost_fraction` accumulated block by block: feed (intended, realised) pairs, read `fraction`.

    Sums stay on the blocks' device until read, so a GPU bake never waits on them per block.
    """

    def __init__(self) -> None:
        self._sums: Tensor | None = None

    def add(self, intended: Tensor, realised: Tensor) -> None:
        i, r = intended.reshape(-1), realised.reshape(-1)
        pair = torch.stack((torch.dot(i, r), torch.dot(i, i))).to(torch.float64)
        self._sums = pair if self._sums is None else self._sums.add_(pair)

    @classmethod
    def combine(cls, parts: list[LostDelta]) -> LostDelta:
        """One statistic from the partial ones of disjoint blocks."""
        out = cls()
        for p in parts:
            if p._sums is not None:
                out._sums = p._sums.clone() if out._sums is None else out._sums.add_(p._sums.to(out._sums.device))
        return out

    @property
    def fraction(self) -> float:
        if self._sums is None:
            return 0.0
        dot, norm2 = (float(v) for v in self._sums.cpu())
        return 0.0 if norm2 == 0.0 else 1.0 - dot / norm2


def cast_into(dst: Tensor, x32: Tensor, *, noise: Tensor | None = None) -> None:
    """Store fp32 `x32` into `dst` (any float dtype): nearest, or stochastic with `noise`.

    The block form of `cast_to`: fp8 values saturate (x32 is clamped in place), and the noise of
    a `NoiseStream` gives exactly the bits `cast_to(mode="stochastic")` gives for the same values.
    """
    dt = dst.dtype
    narrowing = torch.finfo(dt).bits < 32
    if dt in (torch.float8_e4m3fn, torch.float8_e5m2):
        big = _finite_max(dt)
        x32.clamp_(-big, big)
    if noise is not None and narrowing:
        dst.copy_(round_stochastic(x32.reshape(-1), noise, dt).reshape(dst.shape))
    else:
        dst.copy_(x32)


def relative_error(base32: Tensor, new32: Tensor, cast: Tensor, *, base_cast: Tensor | None = None) -> float:
    """‖realised − intended‖ / ‖intended‖: the rounding noise relative to the delta (0 for no delta)."""
    err2 = norm2 = 0.0
    for intended, realised in _deltas(base32, new32, cast, base_cast):
        diff = realised - intended
        err2 += float(torch.dot(diff, diff))
        norm2 += float(torch.dot(intended, intended))
    return 0.0 if norm2 == 0.0 else (err2 / norm2) ** 0.5


_STAT_CHUNK = 1 << 20  # fp32 dot products over short runs, summed in Python floats (fp64)
_FUSED_CHUNK = 1 << 18  # lost_fraction's chunk: 1 MiB fp32 buffers stay in cache


def _deltas(base32: Tensor, new32: Tensor, cast: Tensor, base_cast: Tensor | None):
    if base_cast is None:
        wide = cast.dtype in (torch.float32, torch.float64)
        base_cast = base32 if wide else cast_to(base32, dtypes.tag_of(cast.dtype))
    b, n, c, bc = (t.reshape(-1) for t in (base32, new32, cast, base_cast))
    for start in range(0, b.numel(), _STAT_CHUNK):
        sl = slice(start, start + _STAT_CHUNK)
        intended = n[sl].float() - b[sl].float()
        realised = c[sl].float() - bc[sl].float()
        yield intended, realised


# --------------------------------------------------------------------------------------------
# Scaled fp8.


def _broadcast_scale(scale: Tensor, like: Tensor) -> Tensor:
    s = scale.to(device=like.device, dtype=torch.float32)
    if s.numel() == 1:
        return s.reshape(())
    if like.dim() >= 1 and s.numel() == like.shape[0]:  # per output row
        return s.reshape(like.shape[0], *([1] * (like.dim() - 1)))
    raise ValueError(f"scale of shape {list(scale.shape)} fits neither per-tensor nor per-row of {list(like.shape)}")


def dequantize(codes: Tensor, scale: Tensor) -> Tensor:
    """The real fp32 weight of a scaled-fp8 tensor: codes · scale (scalar or per output row)."""
    return codes.to(torch.float32) * _broadcast_scale(scale, codes)


def quantize_scaled(
    w32: Tensor,
    tag: str,
    *,
    scale_like: Tensor | None = None,
    mode: str = "nearest",
    seed_key: str | None = None,
    keep_scale: bool = False,
) -> tuple[Tensor, Tensor]:
    """(codes, scale) with codes · scale ≈ w32, for an fp8 `tag`.

    The scale is recomputed as amax / finfo.max (per tensor, or per output row when `scale_like`
    is per row) so the patched weight uses the full fp8 range; `keep_scale=True` reuses
    `scale_like`'s values instead. The returned scale has `scale_like`'s shape and dtype (fp32
    scalar when not given), so it drops into the same header slot.
    """
    if tag not in FP8_TAGS:
        raise ValueError(f"scaled fp8 needs an fp8 tag, not {tag}")
    dt = _target(tag)
    out_shape = tuple(scale_like.shape) if scale_like is not None else ()
    out_dtype = scale_like.dtype if scale_like is not None else torch.float32
    if keep_scale:
        if scale_like is None:
            raise ValueError("keep_scale needs scale_like")
        scale = _broadcast_scale(scale_like, w32)
    else:
        per_row = scale_like is not None and scale_like.numel() > 1
        if per_row:
            amax = w32.reshape(w32.shape[0], -1).abs().amax(dim=1)
            scale = _broadcast_scale(amax / _finite_max(dt), w32)
        else:
            scale = (w32.abs().amax() / _finite_max(dt)).to(torch.float32).reshape(())
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero weight: scale 1
        scale = scale.to(out_dtype).to(torch.float32)  # the codes must be made with the stored scale
    codes = cast_to(w32.to(torch.float32) / scale, tag, mode=mode, seed_key=seed_key)
    return codes, scale.to(out_dtype).reshape(out_shape)


def to_f32(x: Tensor) -> Tensor:
    """Decode a stored float tensor (bf16/fp16/fp8/fp32) to fp32: exact for all of them."""
    return x.to(torch.float32)
