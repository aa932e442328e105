"""Baking a targeted tensor window by window, so memory follows a window, not the tensor.

A float tensor whose patches fold (`fold`) into the kernel's stacked product is read in row
windows of about `WINDOW_BYTES` (a whole number of the kernel's grid rows, so the bytes equal a
whole-tensor bake), each baked in place in a pooled buffer (`bufpool`) and handed to the writer
as soon as it is done (`write_part`). The largest tensors of the video models (135 MiB in Wan)
then cost a few windows of memory, and no buffer is zero-filled twice. Everything else (quantized
layers, weight-dependent adapters, a changed dtype, the device pipeline) is read and baked whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from lorabake import bake_kernel, dtypes, fold, rounding

WINDOW_BYTES = 8 << 20

Window = tuple[int, int]  # rows [first, end) of the tensor's 2-D view


def windows_of(baker, name: str) -> list[Window] | None:
    """The row windows tensor `name` is read and baked in, or None: read and bake it whole."""
    info = baker.plan.base.tensors[name]
    if (
        baker.pipe is not None
        or baker.device.type != "cpu"
        or name not in baker.plan.patches
        or name in baker.layers
        or baker.out_tags[name] != info.dtype
        or not dtypes.is_float(info.dtype)
        or dtypes.BY_TAG[info.dtype].torch is None
        or not info.shape
        or math.prod(info.shape) == 0
    ):
        return None
    rows, cols = fold.rows_cols(info.shape)
    step = bake_kernel.window_rows(cols, info.nbytes // (rows * cols), WINDOW_BYTES)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def pieces(base, plan: dict[str, list[Window] | None]) -> list[tuple[str, int, int]]:
    """The (tensor, first byte, byte count) reads for `plan`'s tensors, in its order."""
    out = []
    for name, windows in plan.items():
        info = base.tensors[name]
        if windows is None:
            out.append((name, 0, info.nbytes))
            continue
        row_bytes = info.nbytes // fold.rows_cols(info.shape)[0]
        out += [(name, a * row_bytes, (b - a) * row_bytes) for a, b in windows]
    return out


def bake(baker, name: str, windows: list[Window], reads: Iterator, writer) -> None:
    """Read, bake and write tensor `name` window by window (`reads` yields its windows next)."""
    info = baker.plan.base.tensors[name]
    segments = fold.fold(info.shape, [baker._math_patch(p) for p in baker.plan.patches[name]], device=baker.device)
    if segments is None:  # not foldable after all (e.g. a non-finite factor): the whole path says why
        writer.write(name, baker.produce(name, _gather(info.nbytes, windows, reads)))
        return
    dt = dtypes.torch_dtype(info.dtype)
    rows, cols = fold.rows_cols(info.shape)
    noise = None
    if baker.opts.rounding == "stochastic" and torch.finfo(dt).bits < 32:
        noise = rounding.NoiseStream(rounding.seed_of(name), rows * cols, dt)  # one stream, read in row order
    parts = []
    row_bytes = info.nbytes // rows
    for a, b in windows:
        got, start, buf = next(reads)
        if (got, start, len(buf)) != (name, a * row_bytes, (b - a) * row_bytes):  # `pieces` and this loop disagree
            raise RuntimeError(f"read-ahead gave {got!r} bytes [{start}, +{len(buf)}) for rows [{a}, {b}) of {name!r}")
        stored = torch.frombuffer(buf, dtype=dt).reshape(b - a, *info.shape[1:])
        rows_codec = bake_kernel.FloatRows(stored, dt, rounding_mode=baker.opts.rounding, seed_key=name, first_row=a, noise=noise)
        codec = baker.guarded(name, rows_codec, info.dtype)
        parts.append(bake_kernel.bake_rows(codec, segments, a, b, device=baker.device, pool=baker.pool, workers=baker.workers))
        writer.write_part(name, rows_codec.result())
    baker.result.lost[name] = rounding.LostDelta.combine(parts).fraction
    baker.result.tensors_changed += 1


def _gather(nbytes: int, windows: list[Window], reads: Iterator) -> memoryview:
    import numpy

    whole = memoryview(numpy.empty(nbytes, dtype=numpy.uint8))
    for _ in windows:
        _name, start, buf = next(reads)
        whole[start : start + len(buf)] = buf
    return whole
