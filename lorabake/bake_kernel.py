"""The bake kernel: one pass over a tensor's rows, whatever the number of LoRAs.

A tensor is seen as a 2-D view (output rows × the rest) through a codec, and processed in row
blocks small enough to stay in cache: decode the stored rows to fp32 → add every LoRA with one
GEMM (`fold` stacks their factors) → encode back to the output dtype → accumulate the lost-delta
statistic, all on the same block. No full-size fp32 copy of the tensor is made; when the output
keeps the stored dtype, the result is written over the stored bytes.

Tensors with a weight-dependent adapter (DoRA, OFT, …) take the whole-tensor path instead:
decoded once, `delta.apply_patches` in patch order (exact), then encoded block by block.

The codec is the seam for other storage formats: anything with `FloatRows`' methods (decode
rows to fp32, encode fp32 rows, the base as the output would hold it, the finished tensor) can
be baked by `bake_tensor`.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Protocol

import torch

from lorabake import delta, dtypes, fold, rounding

Tensor = torch.Tensor

# fp32 values per row block: the four block buffers (w, new, intended, realised) take 4 MiB, and
# the GEMM has rows enough to run at full speed (measured: 64 Ki values is 1.3-2.7x slower).
BLOCK_ELEMS = 1 << 18
# The lost-delta statistic (4 of a block's 7 passes over its fp32 values: half the kernel's time at
# rank 16) is taken on one grid cell in SAMPLE_EVERY: an estimate over a quarter of the rows, the
# first cell of every tensor included. It only reports; the bytes written are the same either way.
SAMPLE_EVERY = 4


class Codec(Protocol):
    rows: int
    cols: int
    shape: tuple[int, ...]
    parallel: bool  # disjoint row blocks may be baked on several threads at once

    def decode(self, start: int, stop: int, out: Tensor) -> Tensor: ...
    def encode(self, start: int, stop: int, x32: Tensor) -> None: ...
    def stored(self, start: int, stop: int, out: Tensor) -> Tensor: ...
    def base_in_output(self, w32: Tensor, out: Tensor) -> Tensor: ...
    def keep(self, start: int, stop: int) -> None: ...
    def result(self) -> Tensor: ...


class FloatRows:
    """A stored float tensor (bf16/fp16/fp8/fp32) as fp32 row blocks, encoded into `out_dtype`.

    When `out_dtype` is the stored dtype the output is the stored buffer itself, rows written
    over as they are baked (the buffer must be the caller's own). Stochastic rounding takes its
    noise from a `rounding.NoiseStream` in row order, so the bits equal `rounding.cast_to`'s.
    """

    def __init__(
        self,
        stored: Tensor,
        out_dtype: torch.dtype,
        *,
        rounding_mode: str = "nearest",
        seed_key: str | None = None,
        first_row: int = 0,
        noise: rounding.NoiseStream | None = None,
    ):
        """`stored` may be rows [first_row, first_row + len) of a larger tensor (a window of it):
        the methods then take that tensor's row numbers, and `noise` is its one stream."""
        self.shape = tuple(stored.shape)
        self.rows, self.cols = fold.rows_cols(self.shape)
        self.first = first_row
        self.src = stored.reshape(self.rows, self.cols)
        self.in_place = out_dtype == stored.dtype
        self.out = self.src if self.in_place else torch.empty((self.rows, self.cols), dtype=out_dtype, device=stored.device)
        # the base survives the output dtype unchanged (same dtype or wider)
        self.lossless = torch.finfo(out_dtype).bits >= torch.finfo(stored.dtype).bits
        self.out_tag = dtypes.tag_of(out_dtype)
        narrowing = torch.finfo(out_dtype).bits < 32
        if rounding_mode not in rounding.MODES:
            raise ValueError(f"rounding_mode must be one of {rounding.MODES}, not {rounding_mode!r}")
        self.noise = None
        self.parallel = True
        if rounding_mode == "stochastic" and narrowing:
            self.parallel = False  # the noise stream is read in row order
            if seed_key is None:
                raise ValueError("stochastic rounding needs a seed_key (the tensor name)")
            self.noise = noise or rounding.NoiseStream(rounding.seed_of(seed_key), self.rows * self.cols, out_dtype)

    def decode(self, start: int, stop: int, out: Tensor) -> Tensor:
        return out.copy_(self.src[start - self.first : stop - self.first])

    def encode(self, start: int, stop: int, x32: Tensor) -> None:
        noise = None
        if self.noise is not None:
            noise = self.noise.take(start * self.cols, (stop - start) * self.cols, device=x32.device)
        rounding.cast_into(self.out[start - self.first : stop - self.first], x32, noise=noise)

    def stored(self, start: int, stop: int, out: Tensor) -> Tensor:
        return out.copy_(self.out[start - self.first : stop - self.first])

    def base_in_output(self, w32: Tensor, out: Tensor) -> Tensor:
        if self.lossless:
            return w32
        return out.copy_(rounding.cast_to(w32, self.out_tag))

    def keep(self, start: int, stop: int) -> None:
        if self.in_place:
            return
        step = _step(self.cols)
        buf = torch.empty((min(step, stop - start), self.cols), dtype=torch.float32, device=self.src.device)
        for a in range(start, stop, step):
            b = min(a + step, stop)
            self.encode(a, b, self.decode(a, b, buf[: b - a]))

    def result(self) -> Tensor:
        return self.out.reshape(self.shape)


def _step(cols: int) -> int:
    return max(1, BLOCK_ELEMS // max(cols, 1))


def grid_blocks(segments: Sequence[fold.Segment], start: int, stop: int, step: int) -> list[tuple[fold.Segment, int, int]]:
    """The (segment, first row, end row) blocks of rows [start, stop): each segment cut on the
    tensor's grid of `step` rows, so a row falls in the same block however the rows are windowed
    (a window's bytes then equal the whole tensor's)."""
    out = []
    for seg in segments:
        a, end = max(seg.start, start), min(seg.stop, stop)
        while a < end:
            b = min((a // step + 1) * step, end)
            out.append((seg, a, b))
            a = b
    return out


def window_rows(cols: int, itemsize: int, window_bytes: int) -> int:
    """Rows per window of a tensor read in pieces: a whole number of grid rows, ≤ `window_bytes`."""
    step = _step(cols)
    return step * max(1, window_bytes // max(1, step * cols * itemsize))


class _Buffers:
    """The four fp32 block buffers, reused for every block of a tensor."""

    def __init__(self, rows: int, cols: int, device: torch.device) -> None:
        self.w, self.new, self.intended, self.realised = (
            torch.empty((rows, cols), dtype=torch.float32, device=device) for _ in range(4)
        )


def bake_tensor(
    codec: Codec, patches: Sequence[delta.Patch], *, device: torch.device, pool: Executor | None = None, workers: int = 1
) -> float:
    """Apply `patches` through `codec`; return the share of the intended delta lost to rounding.

    With a `pool`, the row blocks are cut into `workers` contiguous runs baked on its threads
    (torch ops release the GIL), each with its own buffers and partial statistic.
    """
    segments = fold.fold(codec.shape, patches, device=device)
    if segments is None:
        return _bake_whole(codec, patches, device)
    return bake_rows(codec, segments, 0, codec.rows, device=device, pool=pool, workers=workers).fraction


def bake_rows(
    codec: Codec,
    segments: Sequence[fold.Segment],
    start: int,
    stop: int,
    *,
    device: torch.device,
    pool: Executor | None = None,
    workers: int = 1,
) -> rounding.LostDelta:
    """Rows [start, stop) of a folded tensor (`codec` may hold just those rows); their statistic."""
    if not codec.parallel:  # stochastic rounding reads its noise in row order: segment after segment
        parts = []
        for seg in segments:
            a, b = max(seg.start, start), min(seg.stop, stop)
            if a < b and not seg.touched:
                codec.keep(a, b)
            elif a < b:
                parts.append(_bake_blocks(codec, grid_blocks([seg], a, b, _step(codec.cols)), device))
        return rounding.LostDelta.combine(parts)
    for seg in segments:
        if not seg.touched and max(seg.start, start) < min(seg.stop, stop):
            codec.keep(max(seg.start, start), min(seg.stop, stop))  # elementwise: any cut gives the same bytes
    blocks = grid_blocks([seg for seg in segments if seg.touched], start, stop, _step(codec.cols))
    if not blocks:
        return rounding.LostDelta()
    runs = _split(blocks, workers if (pool is not None and codec.parallel) else 1)
    if len(runs) == 1:
        return _bake_blocks(codec, blocks, device)
    return rounding.LostDelta.combine([f.result() for f in [pool.submit(_bake_blocks, codec, run, device) for run in runs]])


def _split(blocks: list, n: int) -> list[list]:
    """`blocks` in at most `n` contiguous runs of about equal rows."""
    if n <= 1 or len(blocks) == 1:
        return [blocks]
    total = sum(b - a for _, a, b in blocks)
    runs, current, done = [], [], 0
    for item in blocks:
        current.append(item)
        done += item[2] - item[1]
        if done >= total * (len(runs) + 1) / n and len(runs) < n - 1:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def sampled(first_row: int, step: int) -> bool:
    """Whether the block starting at `first_row` feeds the lost-delta statistic: one grid cell in
    `SAMPLE_EVERY`, by its place on the tensor's grid (so windows and devices sample the same rows)."""
    return (first_row // step) % SAMPLE_EVERY == 0


def _bake_blocks(codec: Codec, blocks: list, device: torch.device) -> rounding.LostDelta:
    lost = rounding.LostDelta()
    step = _step(codec.cols)
    bufs = _Buffers(max(b - a for _, a, b in blocks), codec.cols, device)
    for seg, a, b in blocks:
        n = b - a
        w = codec.decode(a, b, bufs.w[:n])
        new = bufs.new[:n]
        if seg.up is not None:
            torch.addmm(w, seg.up[a - seg.start : b - seg.start], seg.down, out=new)
        else:
            new.copy_(w)
        for dw, first in seg.dense:
            new.add_(dw[a - first : b - first])
        _finish(codec, a, b, w, new, bufs, lost if sampled(a, step) else None)
    return lost


def _finish(codec: Codec, a: int, b: int, w: Tensor, new: Tensor, bufs: _Buffers, lost: rounding.LostDelta | None) -> None:
    """Encode rows [a, b) and, for a sampled block, add their (intended, realised) pair to `lost`."""
    if lost is None:
        codec.encode(a, b, new)
        return
    n = b - a
    intended = torch.sub(new, w, out=bufs.intended[:n])
    codec.encode(a, b, new)  # may clamp `new` in place (fp8 saturation)
    realised = codec.stored(a, b, bufs.realised[:n])
    realised.sub_(codec.base_in_output(w, bufs.new[:n]))
    lost.add(intended, realised)


def _bake_whole(codec: Codec, patches: Sequence[delta.Patch], device: torch.device) -> float:
    """Decode the whole tensor, fold every patch in order with `apply_patches`, encode by blocks."""
    w32 = codec.decode(0, codec.rows, torch.empty((codec.rows, codec.cols), dtype=torch.float32, device=device))
    new32 = delta.apply_patches(w32.reshape(codec.shape), list(patches)).reshape(codec.rows, codec.cols)
    lost = rounding.LostDelta()
    step = _step(codec.cols)
    bufs = _Buffers(min(step, codec.rows), codec.cols, device)
    for a in range(0, codec.rows, step):
        b = min(a + step, codec.rows)
        _finish(codec, a, b, w32[a:b], new32[a:b], bufs, lost if sampled(a, step) else None)
    return lost.fraction
