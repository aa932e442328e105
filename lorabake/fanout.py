"""Fan-out: several bakes of one base in one streamed read of it, K outputs written side by side.

Each output has what `ops.merge` gives a single one (its own plan, baker, writer, temporary file
and hashes), so its bytes are those of `lorabake merge` with the same options. The base is read
once: a tensor no job touches is handed, as the same buffer, to all K writers; a job that
patches or casts a tensor gets its own copy of the buffer (the bake kernel may work in place),
except the last such job when no writer holds the buffer itself. Memory: the read-ahead budget, plus per
output its write queue and the tensor being baked. An error in any job aborts every output of
the read (no partial file); outputs of earlier reads stay whole.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence

from lorabake import devices, dtypes, finite, ops, pipeline
from lorabake.errors import UsageError
from lorabake.plan import plan_merge
from lorabake.st_reader import SafetensorsReader, check_input_path
from lorabake.st_writer import SafetensorsWriter, check_output_path


def merge_many(outputs: Sequence[ops.MergeOptions], *, progress: ops.Progress | None = None) -> list[ops.MergeResult]:
    """Bake every `outputs[k]` (all with the same base and device) in one read of the base."""
    if not outputs:
        return []
    first = outputs[0]
    if any(o.base != first.base or o.device != first.device or o.dry_run for o in outputs):
        raise UsageError("merge_many takes outputs of one base and device, none a dry run")
    device = devices.pick_device(first.device)
    for o in outputs:
        if not o.output:
            raise UsageError("missing an output path")
        check_output_path(o.output, inputs=[o.base, *(s.path for s in o.loras)], force=o.force)
    base = ops.open_inputs(first.base, ())[0]
    with contextlib.ExitStack() as stack:
        stack.callback(base.close)
        loras = _Loras(stack)
        jobs = [_prepare(o, base, loras) for o in outputs]
        _bake_all(base, jobs, device, progress, stack)
    return [job.result for job in jobs]


class _Loras:
    """Each LoRA file of the read opened once and checked (NaN/Inf, data SHA-256) once, however
    many outputs use it."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack
        self.readers: dict[str, SafetensorsReader] = {}
        self.shas: dict[str, str] = {}

    def reader(self, path: str) -> SafetensorsReader:
        key = os.path.realpath(path)
        if key not in self.readers:
            check_input_path(path)
            self.readers[key] = self.stack.enter_context(SafetensorsReader(path))
        return self.readers[key]

    def data_sha256(self, lora_plan) -> str:
        key = os.path.realpath(lora_plan.reader.path)
        if key not in self.shas:
            self.shas[key] = ops._verify_lora_data(lora_plan.reader, lora_plan.lora)
        return self.shas[key]


class _Job:
    """One output of the read: its options, plan, result, baker and writer."""

    def __init__(self, opts: ops.MergeOptions, plan, result: ops.MergeResult, out_tags: dict[str, str]) -> None:
        self.opts, self.plan, self.result, self.out_tags = opts, plan, result, out_tags
        self.baker = None
        self.writer: SafetensorsWriter | None = None
        self.scaled = ops.scaled_fp8_scales(plan.base.tensors)

    def touches(self, name: str) -> bool:
        """Whether this output decodes the tensor (patched, cast, or half of a scaled-fp8 pair)."""
        return name in self.plan.patches or self.out_tags[name] != self.plan.base.tensors[name].dtype or (
            name in self.scaled or name in self.scaled.values())


def _prepare(opts: ops.MergeOptions, base: SafetensorsReader, loras: _Loras) -> _Job:
    out_tag = ops._output_tag(opts.dtype)
    plan = plan_merge(base, list(opts.loras), [loras.reader(s.path) for s in opts.loras])
    if plan.unmatched and not opts.allow_unmatched:
        raise ops._unmatched_error(plan)
    result = ops.MergeResult(plan)
    result.lora_data_sha256 = [loras.data_sha256(lp) for lp in plan.loras]
    finite.check_scales(plan)
    if out_tag and ops.scaled_fp8_scales(base.tensors):
        raise UsageError("--dtype cannot convert a scaled-fp8 checkpoint (its fp8 weights need their scales)",
                         hint="use --dtype keep")
    out_tags = {n: out_tag if (out_tag and dtypes.is_float(i.dtype)) else i.dtype for n, i in base.tensors.items()}
    return _Job(opts, plan, result, out_tags)


def _bake_all(base: SafetensorsReader, jobs: list[_Job], device, progress, stack: contextlib.ExitStack) -> None:
    started = time.perf_counter()
    pool, workers, pipe = stack.enter_context(pipeline.compute(device))  # shared by the K bakers, one at a time
    for job in jobs:
        job.baker = ops._Baker(job.opts, job.plan, job.out_tags, device, job.result)
        job.baker.pool, job.baker.workers, job.baker.pipe = pool, workers, pipe
        entries = [(n, job.out_tags[n], i.shape) for n, i in base.tensors.items()]
        meta = ops._metadata(job.opts, job.plan, job.result.lora_data_sha256)
        job.writer = stack.enter_context(SafetensorsWriter(
            job.opts.output, entries, meta, inputs=[job.opts.base, *(s.path for s in job.opts.loras)],
            force=job.opts.force, background_bytes=ops.WRITE_QUEUE_BYTES,
            sources=[base, *(lp.reader for lp in job.plan.loras)]))
    for name, buf in base.iter_bytes(base.tensors, readahead_bytes=jobs[0].opts.readahead_bytes):
        users = [job for job in jobs if job.touches(name)]
        # The buffer itself goes to writers that pass it through, and may be baked in place only
        # when no writer holds it: then the last job that decodes it takes it, the others copies.
        owner = users[-1] if users and len(users) == len(jobs) else None
        for job in jobs:
            src = _copy(buf) if job in users and job is not owner else buf
            job.writer.write(name, job.baker.produce(name, src))
        if progress:
            progress(len(buf))
    for job in jobs:  # commit in order, each with its own hashes
        job.writer.commit()
        job.result.output = job.opts.output
        job.result.sha256 = job.writer.sha256
        job.result.data_sha256 = job.writer.data_sha256
        job.result.bytes_written = job.writer.total_size
        job.result.seconds = time.perf_counter() - started


def _copy(buf) -> memoryview:
    return memoryview(bytearray(buf))
