"""Where the bake's math runs: threads on the CPU, or a pipeline of row blocks through a device.

On a GPU, baking a tensor whole would copy it up, compute, and copy it back, the host waiting on
each copy. The pipeline instead moves a tensor's row blocks through three streams, so that the
upload of block k+1, the math on block k and the download of block k−1 overlap:

    upload:   the block's stored rows → a pinned host slot (a memcpy) → a device slot
    compute:  decode → one GEMM of the stacked factors (`fold`) → encode → lost-delta statistic
    download: the encoded rows → a pinned host slot → the host result (a memcpy)

Events order them: the math waits for its block's upload, the download for its block's math.
The host waits only for a block's download, before it reuses that block's slot (`SLOTS` blocks
in flight) and at the end of the tensor, so no copy in the loop is synchronous.

The backends say what a device allows: `CudaBackend` (streams, events, pinned memory,
non-blocking copies); `MpsBackend` (one queue: torch gives MPS no user streams and no pinned
memory, so uploads are issued without waiting and the three stages share that queue);
`HostBackend` (CPU tensors: streams and events are no-ops, each copy happens when issued). The
same code runs on all three, so the CPU run in the tests exercises the CUDA path's logic.

The math per block is `bake_kernel`'s (`_bake_blocks` + `_finish` over `FloatRows`), op for op,
so on the CPU the bytes equal the plain path's. The fold runs on the host (its factors are small,
and its finiteness checks would otherwise wait on the device); the factors are uploaded once per
tensor. `bake` returns None when the plain path must run instead: weight-dependent adapters
(DoRA, OFT, …), and tensors with a value beyond the output dtype's range or NaN (each block's
peak magnitude comes back with the block), for which the plain path raises or saturates.
"""

from __future__ import annotations

import ctypes
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager

import torch

from lorabake import bake_kernel, delta, devices, dtypes, finite, fold, rounding

Tensor = torch.Tensor

SLOTS = 3  # blocks in flight: one uploading, one in the math, one downloading
# values per block on a GPU: 4 MiB of fp32, a few hundred µs of PCIe per block, so launch costs
# stay small and a 1280×1280 attention weight is already two blocks (the pipeline drains at the
# end of each tensor: the writer takes tensors in order)
GPU_BLOCK_ELEMS = 1 << 20
ENV = "LORABAKE_PIPELINE"  # "1": run the pipeline on the CPU too (tests, benchmarks)


class HostBackend:
    """CPU tensors: streams and events are None, every copy and every op runs when issued."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device if device is not None else torch.device("cpu")

    def stream(self):
        return None

    def event(self):
        return None

    def run(self, stream, fn) -> None:
        """Issue `fn`'s torch ops on `stream` (returns nothing: on a device they run later)."""
        fn()

    def wait(self, stream, event) -> None:
        """Work issued on `stream` from now on starts after the work recorded by `event`."""

    def record(self, event, stream) -> None:
        """`event` marks the work issued on `stream` so far."""

    def sync(self, event) -> None:
        """The host waits until the work recorded by `event` is done."""

    def host_buffer(self, nbytes: int) -> Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def device_buffer(self, nbytes: int) -> Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, dst: Tensor, src: Tensor) -> None:
        """Between a staging slot and a device slot (issued inside `run`)."""
        dst.copy_(src)

    def upload(self, stream, t: Tensor) -> Tensor:
        """`t` on the device, the copy issued on `stream`."""
        return t.to(self.device)


class CudaBackend(HostBackend):
    def stream(self):
        return torch.cuda.Stream(device=self.device)

    def event(self):
        return torch.cuda.Event()

    def run(self, stream, fn) -> None:
        with torch.cuda.stream(stream):
            fn()

    def wait(self, stream, event) -> None:
        stream.wait_event(event)

    def record(self, event, stream) -> None:
        event.record(stream)

    def sync(self, event) -> None:
        event.synchronize()

    def host_buffer(self, nbytes: int) -> Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy(self, dst: Tensor, src: Tensor) -> None:
        dst.copy_(src, non_blocking=True)  # pinned ↔ device: returns at once

    def upload(self, stream, t: Tensor) -> Tensor:
        # torch's pinned-memory cache keeps the staging copy until the transfer has read it
        with torch.cuda.stream(stream):
            return t.pin_memory().to(self.device, non_blocking=True)


class MpsBackend(HostBackend):
    """One MPS queue: uploads are issued without waiting; a download waits for its block (torch
    has no pinned memory on MPS, and a non-blocking copy to the CPU is not safe to read early)."""

    def event(self):
        return torch.mps.Event()

    def record(self, event, stream) -> None:
        event.record()

    def sync(self, event) -> None:
        event.synchronize()

    def copy(self, dst: Tensor, src: Tensor) -> None:
        dst.copy_(src, non_blocking=dst.device.type != "cpu")

    def upload(self, stream, t: Tensor) -> Tensor:
        return t.to(self.device, non_blocking=True)


def backend_for(device: torch.device) -> HostBackend:
    return {"cuda": CudaBackend, "mps": MpsBackend}.get(device.type, HostBackend)(device)


def wanted(device: torch.device) -> bool:
    """The pipeline runs on a GPU, and on the CPU when `LORABAKE_PIPELINE=1` (else threads do)."""
    return device.type in ("cuda", "mps") or os.environ.get(ENV) == "1"


class _Slot:
    """One block in flight: its staging and device buffers, grown on demand, and its events."""

    def __init__(self, backend: HostBackend) -> None:
        self.b = backend
        self.bufs: dict[str, Tensor] = {}
        self.uploaded, self.computed, self.downloaded = backend.event(), backend.event(), backend.event()

    def view(self, key: str, n: int, cols: int, dtype: torch.dtype) -> Tensor:
        nbytes = n * cols * dtype.itemsize
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < nbytes:  # only between tensors: nothing is in flight then
            make = self.b.host_buffer if key.startswith("host") else self.b.device_buffer
            buf = self.bufs[key] = make(max(nbytes, 64))
        return buf[:nbytes].view(dtype).view(n, cols)


class Pipeline:
    """Bakes one tensor at a time through the streams; see the module docstring."""

    def __init__(self, backend: HostBackend, *, block_elems: int | None = None) -> None:
        self.b = backend
        gpu = backend.device.type != "cpu"
        self.block_elems = block_elems or (GPU_BLOCK_ELEMS if gpu else bake_kernel.BLOCK_ELEMS)
        self.up, self.math, self.down = backend.stream(), backend.stream(), backend.stream()
        self.slots = [_Slot(backend) for _ in range(SLOTS)]
        self.work = _Slot(backend)  # the fp32 block buffers of the math (used on its stream only)
        self.factors_ready = backend.event()

    def bake(
        self, stored: Tensor, patches: Sequence[delta.Patch], out_dtype: torch.dtype, *, rounding_mode: str = "nearest", seed_key: str | None = None
    ) -> tuple[Tensor, float] | None:
        """(the baked host tensor, lost-delta fraction) of host tensor `stored`, or None: run the plain path."""
        shape = tuple(stored.shape)
        segments = fold.fold(shape, patches, device=torch.device("cpu"))
        if segments is None:
            return None
        rows, cols = fold.rows_cols(shape)
        src = stored.reshape(rows, cols)
        out = torch.empty((rows, cols), dtype=out_dtype)
        job = _Job(src, out, rounding_mode, seed_key)
        step = max(1, self.block_elems // max(cols, 1))
        for seg in segments:
            if not seg.touched and job.in_place:
                out[seg.start : seg.stop].copy_(src[seg.start : seg.stop])
        kept = [seg for seg in segments if seg.touched or not job.in_place]
        blocks = bake_kernel.grid_blocks(kept, 0, rows, step)  # the plain path's blocks when `step` is its
        if not blocks:
            return out.reshape(shape), 0.0
        job.cap = max(b - a for _, a, b in blocks)  # every buffer is sized once per tensor, before any use
        on_device = {}  # Segment id → (up, down, dense) on the device; kept until the tensor is done
        for seg in segments:
            if seg.touched:
                up = None if seg.up is None else (self.b.upload(self.up, seg.up), self.b.upload(self.up, seg.down))
                on_device[id(seg)] = (up, tuple((self.b.upload(self.up, dw), first) for dw, first in seg.dense))
        self.b.record(self.factors_ready, self.up)
        self.b.wait(self.math, self.factors_ready)
        lost = rounding.LostDelta()
        overflow = finite.limits(dtypes.tag_of(out_dtype))[1]
        pending: deque = deque()
        in_range = True
        for k, (seg, a, b) in enumerate(blocks):
            if len(pending) == SLOTS:
                in_range &= self._drain(pending.popleft(), job, overflow)
            if not in_range:
                break
            slot = self.slots[k % SLOTS]
            self._issue(slot, job, seg, on_device.get(id(seg)), a, b, lost)
            pending.append((slot, a, b))
        while pending:
            in_range &= self._drain(pending.popleft(), job, overflow)
        if not in_range:
            return None
        return out.reshape(shape), lost.fraction  # every block's math is done: its download waited for it

    def _issue(self, slot: _Slot, job: _Job, seg: fold.Segment, factors, a: int, b: int, lost: rounding.LostDelta) -> None:
        """Stage rows [a, b), then issue their upload, math and download; nothing here waits."""
        n, cols, b_ = b - a, job.cols, self.b

        def view(where: _Slot, key: str, dtype: torch.dtype) -> Tensor:
            return where.view(key, job.cap, cols, dtype)[:n]

        host_in, dev_in = view(slot, "host_in", job.src.dtype), view(slot, "dev_in", job.src.dtype)
        host_in.copy_(job.src[a:b])
        copies = [(dev_in, host_in)]
        noise = None
        if job.noise is not None:
            host_noise = view(slot, "host_noise", torch.int32).reshape(-1)
            host_noise.copy_(job.noise.take(a * cols, n * cols))
            noise = view(slot, "dev_noise", torch.int32).reshape(-1)
            copies.append((noise, host_noise))
        b_.run(self.up, lambda: [b_.copy(d, h) for d, h in copies])
        b_.record(slot.uploaded, self.up)

        b_.wait(self.math, slot.uploaded)
        dev_out = view(slot, "dev_out", job.out.dtype)
        peak = slot.view("dev_peak", 1, 1, torch.float32)
        bufs = [view(self.work, k, torch.float32) for k in ("w", "new", "intended", "realised")]
        step = max(1, self.block_elems // max(cols, 1))
        stat = lost if factors is not None and bake_kernel.sampled(a, step) else None  # the plain path's sample
        b_.run(self.math, lambda: _math(job, seg, factors, a, b, dev_in, dev_out, noise, peak, bufs, stat))
        b_.record(slot.computed, self.math)

        b_.wait(self.down, slot.computed)
        host_out = view(slot, "host_out", job.out.dtype)
        host_peak = slot.view("host_peak", 1, 1, torch.float32)
        b_.run(self.down, lambda: (b_.copy(host_out, dev_out), b_.copy(host_peak, peak)))
        b_.record(slot.downloaded, self.down)

    def _drain(self, item, job: _Job, overflow: float) -> bool:
        """Wait for a block's download; copy it into the result. False if a value is out of range."""
        slot, a, b = item
        self.b.sync(slot.downloaded)
        if not float(slot.view("host_peak", 1, 1, torch.float32)) < overflow:  # NaN too
            return False
        job.out[a:b].copy_(slot.view("host_out", job.cap, job.cols, job.out.dtype)[: b - a])
        return True


class _Job:
    """One tensor: its stored rows, the host result, and how it is encoded (as `FloatRows`)."""

    def __init__(self, src: Tensor, out: Tensor, rounding_mode: str, seed_key: str | None) -> None:
        self.src, self.out, self.cols = src, out, src.shape[1]
        self.cap = 0  # rows of the largest block
        self.in_place = out.dtype == src.dtype
        self.lossless = torch.finfo(out.dtype).bits >= torch.finfo(src.dtype).bits
        self.out_tag = dtypes.tag_of(out.dtype)
        if rounding_mode not in rounding.MODES:
            raise ValueError(f"rounding_mode must be one of {rounding.MODES}, not {rounding_mode!r}")
        self.noise = None
        if rounding_mode == "stochastic" and torch.finfo(out.dtype).bits < 32:
            if seed_key is None:
                raise ValueError("stochastic rounding needs a seed_key (the tensor name)")
            self.noise = rounding.NoiseStream(rounding.seed_of(seed_key), src.numel(), out.dtype)


def _math(job: _Job, seg: fold.Segment, factors, a: int, b: int, dev_in: Tensor, dev_out: Tensor,
          noise: Tensor | None, peak: Tensor, bufs: list[Tensor], lost: rounding.LostDelta | None) -> None:
    """One block on the device: `bake_kernel._bake_blocks` and `_finish` for `FloatRows`, op for op."""
    w, new, intended, realised = bufs
    w.copy_(dev_in)
    if factors is None:  # rows no LoRA touches, re-encoded into another dtype
        new.copy_(w)
    else:
        (low, dense) = factors
        if low is not None:
            torch.addmm(w, low[0][a - seg.start : b - seg.start], low[1], out=new)
        else:
            new.copy_(w)
        for dw, first in dense:
            new.add_(dw[a - first : b - first])
    lo, hi = torch.aminmax(new)  # what `finite.guard` checks, read by the host with the block
    peak.copy_(torch.maximum(hi, lo.neg()).reshape(1, 1))
    if lost is not None:
        torch.sub(new, w, out=intended)
    rounding.cast_into(dev_out, new, noise=noise)  # may clamp `new` in place (fp8 saturation)
    if lost is None:
        return
    realised.copy_(dev_out)
    realised.sub_(w if job.lossless else new.copy_(rounding.cast_to(w, job.out_tag)))
    lost.add(intended, realised)


def _return_big_buffers() -> None:
    """Have glibc mmap every buffer of 4 MiB or more, so a freed tensor goes back to the OS.

    Its default threshold grows to the largest buffer freed so far (up to 32 MiB), after which
    tensor-sized buffers come from per-thread heaps that keep their pages (the reader's thread
    allocates, the writer's frees): peak RSS grew by ~150 MiB on SD1.5 that way.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD (glibc only; elsewhere a no-op)
    except (OSError, AttributeError):
        pass


@contextmanager
def compute(device: torch.device) -> Iterator[tuple[Executor | None, int, Pipeline | None]]:
    """(thread pool, workers, pipeline) for a bake on `device`.

    On the CPU: one compute thread per core, each running torch single-threaded. Coarse row runs
    on threads of our own beat torch's intra-op threads on small blocks: no barrier per op, and
    no spinning workers fighting the I/O threads (or other processes) for the cores. On a GPU the
    device does the parallel work, fed by the pipeline.
    """
    if wanted(device):
        if device.type != "cpu":
            yield None, 1, Pipeline(backend_for(device))
            return
        with devices.one_thread():  # as the threads below: a GEMM's bits depend on its thread count
            yield None, 1, Pipeline(backend_for(device))
        return
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type != "cpu" or workers <= 1:
        yield None, 1, None
        return
    _return_big_buffers()
    with devices.one_thread(), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorabake-bake") as pool:
        yield pool, workers, None
