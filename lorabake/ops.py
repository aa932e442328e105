"""The use cases: the only place where files meet math.

`merge` runs the preflight plan, then streams the base tensor by tensor into the writer:
untouched tensors are copied byte for byte, targeted ones are decoded to fp32 on the compute
device, patched, and re-encoded.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import closing
from dataclasses import dataclass, field

import torch

from lorabake import (
    __version__,
    bake_kernel,
    bake_windows,
    bufpool,
    delta,
    devices,
    dtypes,
    finite,
    pipeline,
    readahead,
    spread,
)
from lorabake.errors import MatchError, UsageError
from lorabake.lora_data import LoraData
from lorabake.plan import BIAS_PARTS, LoraSpec, MergePlan, PlannedPatch, plan_merge
from lorabake.quant import write as quant_write
from lorabake.quant.bake import rebake
from lorabake.quant.comfy import (  # noqa: F401 (fanout)
    LogicalBase,
    QuantLayer,
    find_layers,
    member_index,
    refuse_patched,
    scaled_fp8_scales,
)
from lorabake.quant.gguf_file import GGUFBase, is_gguf, open_gguf
from lorabake.st_reader import SafetensorsReader, check_input_path, to_tensor
from lorabake.st_writer import SafetensorsWriter, check_output_path

Progress = Callable[[int], None]

# Read-ahead budget for the base checkpoint: enough to keep the disk busy while we compute.
DEFAULT_READAHEAD = 32 << 20
# LoRA bytes read by the preflight and kept for the bake instead of being read again.
DEFAULT_LORA_CACHE = 32 << 20
# Bytes handed to the writer's threads but not yet written and hashed.
WRITE_QUEUE_BYTES = 32 << 20


@dataclass(frozen=True)
class MergeOptions:
    base: str
    loras: tuple[LoraSpec, ...]
    output: str | None
    dtype: str = "keep"  # keep | fp32 | fp16 | bf16 | fp8_e4m3fn | fp8_e5m2
    device: str = "auto"
    rounding: str = "nearest"  # nearest | stochastic
    allow_unmatched: bool = False
    dry_run: bool = False
    force: bool = False
    saturate: bool = False  # clamp values beyond the output dtype's range (reported) instead of failing
    readahead_bytes: int = DEFAULT_READAHEAD
    lora_cache_bytes: int = DEFAULT_LORA_CACHE
    # Written last into the output's metadata (a recipe's entry, its hash, input fingerprints).
    extra_metadata: tuple[tuple[str, str], ...] = ()
    gguf_requant: str = "refuse"  # refuse | nearest: a patched GGUF tensor of a type we cannot encode
    quant: str | None = None  # quantize on the way out: fp8 | nvfp4 | mxfp8 | int8 | a GGUF type or mix


@dataclass
class MergeResult:
    plan: MergePlan
    output: str | None = None
    tensors_changed: int = 0
    tensors_cast: int = 0
    bytes_written: int = 0
    sha256: str | None = None
    data_sha256: str | None = None
    seconds: float = 0.0
    lora_data_sha256: list[str] = field(default_factory=list)
    lost: dict[str, float] = field(default_factory=dict)  # tensor -> fraction of its delta lost to rounding
    saturated: dict[str, float] = field(default_factory=dict)  # tensor -> largest |value| clamped (--saturate)
    quant_error: dict[str, float] = field(default_factory=dict)  # quantized tensor -> ‖dequantised − patched‖/‖patched‖
    retyped: dict[str, str] = field(default_factory=dict)  # GGUF tensor -> "IQ4_NL -> Q4_K" (--gguf-requant nearest)

    @property
    def autov2(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None


def open_inputs(base: str, loras: tuple[LoraSpec, ...]) -> tuple[SafetensorsReader, list[SafetensorsReader]]:
    if not os.path.isdir(base):  # a diffusers folder or sharded index is checked by the reader
        check_input_path(base)
    for spec in loras:
        check_input_path(spec.path)
    base_reader = open_gguf(base) if is_gguf(base) else SafetensorsReader(base)
    return base_reader, [SafetensorsReader(s.path) for s in loras]


def merge(opts: MergeOptions, *, progress: Progress | None = None, on_plan: Callable[[MergePlan], None] | None = None) -> MergeResult:
    """Bake `opts.loras` into `opts.base`; see the module docstring."""
    out_tag = _output_tag(opts.dtype)
    device = devices.pick_device(opts.device)
    if not opts.dry_run:
        if not opts.output:
            raise UsageError("missing -o/--output")
        check_output_path(opts.output, inputs=[opts.base, *(s.path for s in opts.loras)], force=opts.force)
    quant_write.check(opts.quant, opts.base, opts.output, dtype_tag=out_tag, requant=opts.gguf_requant)
    base, lora_readers = open_inputs(opts.base, opts.loras)
    try:
        gguf_base = isinstance(base, GGUFBase)
        layers = {} if gguf_base else find_layers(base.tensors, base.metadata, base.read_bytes, path=base.path)
        # the planner sees quantized weights with their logical shapes; I/O uses the file as stored
        plan = plan_merge(LogicalBase(base, layers), list(opts.loras), lora_readers)
        plan.base = base
        refuse_patched(layers, [*plan.patches, *(o.target for _, o in plan.unmatched if o.target)], path=base.path)
        if opts.quant and layers:
            raise UsageError("--quant needs a plain bf16/fp16/fp32 base; this one is already quantized", path=base.path)
        layout = quant_write.plan_layout(opts.quant, base, plan.patches, requant=opts.gguf_requant, arch=plan.info.arch)
        if on_plan:
            on_plan(plan)
        result = MergeResult(plan)
        if plan.unmatched and not opts.allow_unmatched:
            raise _unmatched_error(plan)
        if opts.dry_run:
            return result
        lora_data = LoraData(opts.lora_cache_bytes)
        result.lora_data_sha256 = [lora_data.verify(lp.reader, lp.lora) for lp in plan.loras]
        finite.check_scales(plan, read=lora_data.peek)
        if gguf_base or opts.quant:
            _write_quantized(opts, plan, layout, device, result, progress, lora_data)
        else:
            _write_merged(opts, plan, layers, out_tag, device, result, progress, lora_data)
        return result
    finally:
        base.close()
        for r in lora_readers:
            r.close()


# GGUF outputs and --quant: the writing loop lives with the formats (lorabake.quant.write).
def _write_quantized(opts: MergeOptions, plan: MergePlan, layout: dict, device: torch.device, result: MergeResult, progress: Progress | None, lora_data: LoraData) -> None:
    baker = _Baker(opts, plan, {}, device, result, lora_data, {})  # for its LoRA reads
    patches = {name: functools.partial(_patched, baker, name) for name in plan.patches}  # real fp32 → patched
    meta = _metadata(opts, plan, result.lora_data_sha256)
    if isinstance(plan.base, GGUFBase):
        meta = {k: v for k, v in meta.items() if k.startswith(("lorabake.", "modelspec."))}
    quant_write.write(opts.quant, plan, opts.output, layout, patches, meta, result, mode=opts.rounding, device=device,
                      inputs=[opts.base, *(s.path for s in opts.loras)], force=opts.force, progress=progress)


def _output_tag(name: str) -> str | None:
    if name == "keep":
        return None
    try:
        return dtypes.CLI_NAMES[name]
    except KeyError:
        raise UsageError(f"unknown --dtype {name!r}; choose keep, {', '.join(dtypes.CLI_NAMES)}") from None


def _unmatched_error(plan: MergePlan) -> MatchError:
    rows = plan.unmatched
    lp, first = rows[0]
    listed = "; ".join(f"{o.stem} ({o.reason})" for _, o in rows[:3])
    more = f" and {len(rows) - 3} more" if len(rows) > 3 else ""
    return MatchError(
        f"{len(rows)} LoRA module(s) match nothing in {plan.base.path}: {listed}{more}",
        path=lp.reader.path,
        hint="see `lorabake inspect LORA --against BASE`; pass --allow-unmatched to bake the rest anyway",
    )


def _verify_lora_data(reader: SafetensorsReader, lora) -> str:
    """SHA-256 of a LoRA's data section after refusing NaN/Inf; keeps nothing (see LoraData)."""
    return LoraData(0).verify(reader, lora)


def _metadata(opts: MergeOptions, plan: MergePlan, lora_shas: list[str]) -> dict[str, str]:
    meta = dict(plan.base.metadata)
    loras = [
        {
            "file": os.path.basename(spec.path),
            "data_sha256": sha,
            "strength": spec.strength,
            "te_strength": spec.te_strength if spec.te_strength is not None else spec.strength,
            **({"blocks": spec.blocks} if spec.blocks else {}),
        }
        for spec, sha in zip(opts.loras, lora_shas)
    ]
    meta["lorabake.version"] = __version__
    meta["lorabake.loras"] = json.dumps(loras, separators=(",", ":"))
    titles = [meta.get("modelspec.title") or _stem(opts.base)]
    titles += [lp.lora.metadata.get("modelspec.title") or _stem(lp.spec.path) for lp in plan.loras]
    meta["modelspec.merged_from"] = ", ".join(titles)
    meta["modelspec.title"] = _stem(opts.output)
    meta.update(opts.extra_metadata)
    return meta


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def _patched(baker: _Baker, name: str, w32: torch.Tensor) -> torch.Tensor:
    return delta.apply_patches(w32, [baker._math_patch(p) for p in baker.plan.patches[name]])


class _Baker:
    """Produces each output tensor in base order; holds back the partners of a quantized layer."""

    def __init__(
        self,
        opts: MergeOptions,
        plan: MergePlan,
        out_tags: dict[str, str],
        device: torch.device,
        result: MergeResult,
        lora_data: LoraData | None = None,
        layers: dict[str, QuantLayer] | None = None,
    ):
        self.opts, self.plan, self.out_tags, self.device, self.result = opts, plan, out_tags, device, result
        self.lora_data = lora_data if lora_data is not None else LoraData(0)
        if layers is None:
            base = plan.base
            layers = find_layers(base.tensors, base.metadata, base.read_bytes, path=base.path)
        self.pool: Executor | None = None  # row blocks on its threads, or a device pipeline (pipeline.compute)
        self.workers = 1
        self.pipe: pipeline.Pipeline | None = None
        # quantized layers are re-quantised whole (their scales depend on the whole patched weight)
        self.layers = member_index(layer for w, layer in layers.items() if w in plan.patches)
        self.held: dict[str, torch.Tensor] = {}

    def passes_through(self, name: str) -> bool:
        """Whether the output holds this tensor's stored bytes unchanged (copied file to file)."""
        return (
            name not in self.plan.patches
            and name not in self.layers
            and self.out_tags[name] == self.plan.base.tensors[name].dtype
        )

    def produce(self, name: str, buf: bytearray) -> torch.Tensor | bytearray:
        if name in self.held:
            return self.held.pop(name)
        base = self.plan.base
        info = base.tensors[name]
        tag = self.out_tags[name]
        if name in self.layers:
            return self._requantise(name, buf)
        patches = self.plan.patches.get(name)
        if patches:
            return self._bake(name, buf, patches, tag)
        if tag != info.dtype:
            self.result.tensors_cast += 1
            return self._bake(name, buf, [], tag)
        return buf

    def codec(self, name: str, buf: bytearray | memoryview, tag: str) -> bake_kernel.Codec:
        """The stored tensor as fp32 rows, encoded back as `tag`: the one place a storage format plugs in."""
        stored = to_tensor(buf, self.plan.base.tensors[name]).to(self.device)
        return bake_kernel.FloatRows(stored, dtypes.torch_dtype(tag), rounding_mode=self.opts.rounding, seed_key=name)

    def guarded(self, name: str, codec: bake_kernel.Codec, tag: str) -> finite.Guarded:
        """`codec` with every encoded block checked against `tag`'s range (or clamped: --saturate)."""
        sources = finite.lora_paths(self.plan, name) or [self.plan.base.path]
        return finite.Guarded(codec, tag, tensor=name, sources=sources, saturated=self.result.saturated if self.opts.saturate else None)

    def _bake(self, name: str, buf: bytearray | memoryview, patches: list[PlannedPatch], tag: str) -> torch.Tensor:
        baked = None  # None from the pipeline: the plain path runs (whole-tensor adapters, values out of range)
        if self.pipe is not None:
            host = [self._math_patch(p, device=torch.device("cpu")) for p in patches]
            stored = to_tensor(buf, self.plan.base.tensors[name])
            baked = self.pipe.bake(stored, host, dtypes.torch_dtype(tag), rounding_mode=self.opts.rounding, seed_key=name)
        if baked is None:
            codec = self.guarded(name, self.codec(name, buf, tag), tag)
            lost = bake_kernel.bake_tensor(codec, [self._math_patch(p) for p in patches], device=self.device, pool=self.pool, workers=self.workers)
            baked = codec.result().cpu(), lost
        if patches:
            self.result.lost[name] = baked[1]
            self.result.tensors_changed += 1
        return baked[0]

    def _math_patch(self, p: PlannedPatch, *, device: torch.device | None = None) -> delta.Patch:
        lp = self.plan.loras[p.lora_index]
        wanted = p.module.parts.items()
        if p.param == "weight":
            wanted = [(part, key) for part, key in wanted if part not in BIAS_PARTS]
        parts = {
            part: self.lora_data.read(lp.reader, key).to(device=device or self.device, dtype=torch.float32) for part, key in wanted
        }
        return spread.cut(delta.Patch(  # a fused module spread over separate tensors: this one's ΔW rows
            algo=p.module.algo,
            parts=parts,
            strength=p.strength,
            slice=p.target.slice,
            transform=p.target.transform,
            scale=p.module.scale,
            dora=p.module.dora,
            param=p.param,
        ), p.target.delta_rows)

    def _requantise(self, name: str, buf: bytearray) -> torch.Tensor:
        """Decode a quantized layer, patch it, encode it in its format; hold the partners."""
        layer = self.layers[name]
        base = self.plan.base
        stored = {
            role: (to_tensor(buf, base.tensors[key]) if key == name else base.read(key)).to(self.device)
            for role, key in layer.keys.items()
        }
        pre = f"{layer.module}.pre_quant_scale"
        patches = [self._math_patch(p) for p in self.plan.patches[layer.weight]]
        done = rebake(
            layer,
            stored,
            lambda w32: delta.apply_patches(w32, patches),
            mode=self.opts.rounding,
            seed_key=layer.weight,
            pre_quant_scale=base.read(pre) if pre in base.tensors else None,
        )
        self.result.lost[layer.weight] = done.lost
        self.result.quant_error[layer.weight] = done.error
        self.result.tensors_changed += 1
        for key, t in done.tensors.items():
            if key != name:
                self.held[key] = t.cpu()
        return done.tensors[name].cpu()


def _write_merged(
    opts: MergeOptions,
    plan: MergePlan,
    layers: dict[str, QuantLayer],
    out_tag: str | None,
    device: torch.device,
    result: MergeResult,
    progress: Progress | None,
    lora_data: LoraData,
) -> None:
    base = plan.base
    if out_tag and layers:
        kinds = ", ".join(sorted({f"scaled {q.format}" if q.legacy else q.format for q in layers.values()}))
        raise UsageError(
            f"--dtype cannot convert a quantized checkpoint ({kinds}: its weights need their scales)",
            hint="use --dtype keep",
        )
    out_tags = {
        name: out_tag if (out_tag and dtypes.is_float(info.dtype)) else info.dtype for name, info in base.tensors.items()
    }
    entries = [(name, out_tags[name], info.shape) for name, info in base.tensors.items()]
    baker = _Baker(opts, plan, out_tags, device, result, lora_data, layers)
    started = time.perf_counter()
    inputs = [opts.base, *(s.path for s in opts.loras)]
    meta = _metadata(opts, plan, result.lora_data_sha256)
    # Pipeline: read-ahead thread -> compute (row blocks on one thread per core, or through the device's
    # streams: lorabake.pipeline) -> writer thread
    # (write + file hash) and a data-hash thread, so the copy and both SHA-256 passes overlap the compute.
    with pipeline.compute(device) as (pool, workers, pipe), SafetensorsWriter(
        opts.output, entries, meta, inputs=inputs, force=opts.force, background_bytes=WRITE_QUEUE_BYTES,
        sources=[base, *(lp.reader for lp in plan.loras)],
    ) as writer:
        baker.pool, baker.workers, baker.pipe = pool, workers, pipe
        # unchanged tensors are copied file to file by the kernel; only the others are read, ahead,
        # into reused buffers: targeted float tensors in row windows (bake_windows), the rest whole
        windows = {n: bake_windows.windows_of(baker, n) for n in base.tensors if not baker.passes_through(n)}
        buffers = bufpool.BufferPool(keep=WRITE_QUEUE_BYTES + opts.readahead_bytes)
        computed = readahead.read_ahead(base, bake_windows.pieces(base, windows), opts.readahead_bytes, buffers.take)
        with closing(computed):
            for name, info in base.tensors.items():
                if baker.passes_through(name):
                    fd, offset, _size = base.source_of(name)
                    writer.copy_from(name, fd, offset)
                elif windows[name] is not None:
                    bake_windows.bake(baker, name, windows[name], computed, writer)
                else:
                    _read, _start, buf = next(computed)
                    writer.write(name, baker.produce(name, buf))
                if progress:
                    progress(info.nbytes)
    result.output = opts.output
    result.sha256 = writer.sha256
    result.data_sha256 = writer.data_sha256
    result.bytes_written = writer.total_size
    result.seconds = time.perf_counter() - started
