"""The use cases: the only place where files meet math.

`merge` runs the preflight plan, then streams the base tensor by tensor into the writer:
untouched tensors are copied byte for byte, targeted ones are decoded to fp32 on the compute
device, patched, and re-encoded.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorabake import __version__, delta, devices, dtypes, rounding
from lorabake.errors import LoraFormatError, MatchError, UsageError
from lorabake.plan import BIAS_PARTS, LoraSpec, MergePlan, PlannedPatch, plan_merge
from lorabake.st_reader import SafetensorsReader, check_input_path, to_tensor
from lorabake.st_writer import SafetensorsWriter, check_output_path

Progress = Callable[[int], None]

# Read-ahead budget for the base checkpoint: enough to keep the disk busy while we compute.
DEFAULT_READAHEAD = 256 << 20
# A targeted tensor whose delta lost more than this fraction to rounding is listed in the summary.
LOST_DELTA_WARN = 0.05


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
    readahead_bytes: int = DEFAULT_READAHEAD


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

    @property
    def autov2(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None


def open_inputs(base: str, loras: tuple[LoraSpec, ...]) -> tuple[SafetensorsReader, list[SafetensorsReader]]:
    check_input_path(base) if not os.path.isdir(base) else None
    for spec in loras:
        check_input_path(spec.path)
    base_reader = SafetensorsReader(base)
    return base_reader, [SafetensorsReader(s.path) for s in loras]


def merge(opts: MergeOptions, *, progress: Progress | None = None, on_plan: Callable[[MergePlan], None] | None = None) -> MergeResult:
    """Bake `opts.loras` into `opts.base`; see the module docstring."""
    out_tag = _output_tag(opts.dtype)
    device = devices.pick_device(opts.device)
    if not opts.dry_run:
        if not opts.output:
            raise UsageError("missing -o/--output")
        check_output_path(opts.output, inputs=[opts.base, *(s.path for s in opts.loras)], force=opts.force)
    base, lora_readers = open_inputs(opts.base, opts.loras)
    try:
        plan = plan_merge(base, list(opts.loras), lora_readers)
        if on_plan:
            on_plan(plan)
        result = MergeResult(plan)
        if plan.unmatched and not opts.allow_unmatched:
            raise _unmatched_error(plan)
        if opts.dry_run:
            return result
        result.lora_data_sha256 = [_verify_lora_data(lp.reader, lp.lora) for lp in plan.loras]
        _write_merged(opts, plan, out_tag, device, result, progress)
        return result
    finally:
        base.close()
        for r in lora_readers:
            r.close()


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
    """Read the LoRA once: SHA-256 of its data section, and refuse NaN/Inf naming the module."""
    owner = {key: m.stem for m in lora.modules.values() for key in m.parts.values()}
    sha = hashlib.sha256()
    for name, buf in reader.iter_bytes(reader.tensors):
        sha.update(buf)
        info = reader.tensors[name]
        if dtypes.is_float(info.dtype) and info.numel and dtypes.BY_TAG[info.dtype].torch is not None:
            t = to_tensor(buf, info)
            if not bool(torch.isfinite(t.float()).all()):
                bad = "NaN" if bool(torch.isnan(t.float()).any()) else "Inf"
                raise LoraFormatError(
                    f"{bad} in module {owner.get(name, name)!r}",
                    path=reader.path,
                    tensor=name,
                    hint="the LoRA is corrupt or diverged in training",
                )
    return sha.hexdigest()


def _metadata(opts: MergeOptions, plan: MergePlan, lora_shas: list[str]) -> dict[str, str]:
    meta = dict(plan.base.metadata)
    loras = [
        {
            "file": os.path.basename(spec.path),
            "data_sha256": sha,
            "strength": spec.strength,
            "te_strength": spec.te_strength if spec.te_strength is not None else spec.strength,
        }
        for spec, sha in zip(opts.loras, lora_shas)
    ]
    meta["lorabake.version"] = __version__
    meta["lorabake.loras"] = json.dumps(loras, separators=(",", ":"))
    titles = [meta.get("modelspec.title") or _stem(opts.base)]
    for lp in plan.loras:
        titles.append(lp.lora.metadata.get("modelspec.title") or _stem(lp.spec.path))
    meta["modelspec.merged_from"] = ", ".join(titles)
    meta["modelspec.title"] = _stem(opts.output)
    return meta


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def _write_merged(
    opts: MergeOptions,
    plan: MergePlan,
    out_tag: str | None,
    device: torch.device,
    result: MergeResult,
    progress: Progress | None,
) -> None:
    base = plan.base
    entries = []
    for name, info in base.tensors.items():
        tag = out_tag if (out_tag and dtypes.is_float(info.dtype)) else info.dtype
        entries.append((name, tag, info.shape))
    out_tags = {n: t for n, t, _ in entries}
    started = time.perf_counter()
    inputs = [opts.base, *(s.path for s in opts.loras)]
    with SafetensorsWriter(opts.output, entries, _metadata(opts, plan, result.lora_data_sha256), inputs=inputs, force=opts.force) as writer:
        for name, buf in base.iter_bytes(base.tensors, readahead_bytes=opts.readahead_bytes):
            info = base.tensors[name]
            tag = out_tags[name]
            patches = plan.patches.get(name)
            if patches:
                w32 = to_tensor(buf, info).to(device=device, dtype=torch.float32)
                new32 = delta.apply_patches(w32, [_math_patch(plan, p, device) for p in patches])
                out = rounding.cast_to(new32, tag, mode=opts.rounding, seed_key=name)
                result.lost[name] = rounding.lost_fraction(w32, new32, out)
                writer.write(name, out.cpu())
                result.tensors_changed += 1
            elif tag != info.dtype:
                t = to_tensor(buf, info).to(device=device, dtype=torch.float32)
                writer.write(name, rounding.cast_to(t, tag, mode=opts.rounding, seed_key=name).cpu())
                result.tensors_cast += 1
            else:
                writer.write(name, buf)
            if progress:
                progress(len(buf))
    result.output = opts.output
    result.sha256 = writer.sha256
    result.data_sha256 = writer.data_sha256
    result.bytes_written = writer.total_size
    result.seconds = time.perf_counter() - started


def _math_patch(plan: MergePlan, p: PlannedPatch, device: torch.device) -> delta.Patch:
    lp = plan.loras[p.lora_index]
    reader = lp.reader
    wanted = p.module.parts.items()
    if p.param == "weight":
        wanted = [(part, key) for part, key in wanted if part not in BIAS_PARTS]
    parts = {part: reader.read(key).to(device=device, dtype=torch.float32) for part, key in wanted}
    return delta.Patch(
        algo=p.module.algo,
        parts=parts,
        strength=p.strength,
        slice=p.target.slice,
        transform=p.target.transform,
        alpha_override=lp.lora.alpha_overrides.get(p.module.stem),
        dora=p.module.dora,
        param=p.param,
    )
