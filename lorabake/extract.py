"""`lorabake extract`: a kohya-format LoRA from the difference of two checkpoints.

Flow: detect both files and refuse a family or shape mismatch from the headers alone; choose the
modules (trainer targets; `all_modules`: every weight, as full deltas where a LoRA cannot carry one)
and their kohya names from the base's key map; stream the pairs one base tensor at a time (only one pair and its ΔW are in
memory; only the small up/down factors are kept); then lay out the output in name order, hash its
data section from the in-RAM factors, put the hash in the header's metadata and write.

Decisions (the math ones are in `lorabake.svd`):

* Names: `KeyMap.kohya_names` gives the stem(s) a kohya trainer writes for a base weight, one per
  q/k/v row slice of an OpenCLIP fused `in_proj_weight`; a DiT's fused qkv (kohya names it whole)
  gets one whole-matrix stem. A stem is written only if `keymap.targets[stem]` points back at that key and
  slice, so the output always loads through `build_keymap`.
* Skips: a module whose bytes are identical in both files is "unchanged" (bitwise, per row slice
  for fused weights); otherwise one with max|ΔW| ≤ `min_diff` is "below min-diff" (absolute,
  per module; kohya's `--min_diff` uses the same measure but only to drop the whole text encoder).
* Error: per module ‖ΔW − alpha/r·up@down‖_F / ‖ΔW‖_F with up/down as written (after clamping and
  rounding to the output dtype), computed directly in fp64 accumulation; overall
  sqrt(Σ‖err‖² / Σ‖ΔW‖²) over the written modules.
* Alpha: `alpha` (default: each module's rank, i.e. scale 1) is stored in the output dtype and the
  decoded value is the one used to rescale up, so alpha/r·up@down is the approximation exactly as
  a loader will compute it. Conv modules use the same alpha (conv_alpha in ss_network_args).
* Hash: `sshs_model_hash` (and `modelspec.hash_sha256` with 0x) = SHA-256 of the data section,
  tensors in name order (= safetensors' canonical order, since every tensor has one dtype), which is
  what kohya and A1111 compute. It is checked against the writer's hash of the bytes written.
  `sshs_legacy_hash` is not written: kohya's value is of an in-memory blob with only ss_* metadata,
  not of any file, so no reader can verify it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from collections.abc import Callable

import torch

from lorabake import __version__, devices, dtypes, svd
from lorabake.arch import FAMILIES
from lorabake.detect import CheckpointInfo
from lorabake.errors import MatchError, OutputError
from lorabake.extract_full import FullDelta, full_delta
from lorabake.extract_plan import (  # noqa: F401  (ExtractOptions & co. are this command's API)
    COMPONENT_CHOICES,
    OUTPUT_DTYPES,
    ExtractOptions,
    ExtractResult,
    Job,
    ModuleResult,
    Skipped,
    check_pairs,
    keys_in_order,
    kohya_modules,
    plan_jobs,
    same_family,
    stored_alpha,
    validate_options,
)
from lorabake.keymap import build_keymap
from lorabake.st_reader import SafetensorsReader, check_input_path, to_tensor
from lorabake.st_writer import SafetensorsWriter, check_output_path, tensor_bytes
from lorabake.types import RowSlice

Progress = Callable[[int], None]

# --- entry point ----------------------------------------------------------------------------------------


def extract(
    opts: ExtractOptions, *, progress: Progress | None = None, on_start: Callable[[int], None] | None = None
) -> ExtractResult:
    """Extract a LoRA from `opts.tuned − opts.base`; `on_start(total bytes to read)`, `progress(bytes)`."""
    started = time.perf_counter()
    out_tag = validate_options(opts)
    device = devices.pick_device(opts.device)
    for path in (opts.base, opts.tuned):
        if not os.path.isdir(path):  # a diffusers folder or sharded index is checked by the reader
            check_input_path(path)
    check_output_path(opts.output, inputs=[opts.base, opts.tuned], force=opts.force)
    with SafetensorsReader(opts.base) as base, SafetensorsReader(opts.tuned) as tuned:
        info = same_family(base, tuned)
        keymap = build_keymap(base.tensors, info)
        jobs, unaddressable = plan_jobs(base, info, keymap, opts)
        check_pairs(base, tuned, jobs)
        result = ExtractResult(opts, info.arch, unaddressable=unaddressable)
        if on_start:
            on_start(
                sum(base.tensors[k].nbytes + tuned.tensors[k].nbytes for k in keys_in_order(base, jobs))
            )
        _factorize_all(base, tuned, jobs, opts, out_tag, device, result, progress)
        base.verify_unchanged()  # after the last read: the factors come from one version of each file
        tuned.verify_unchanged()
    if not result.modules and not result.full:
        raise MatchError(
            "the two checkpoints do not differ in any selected module: nothing to extract",
            path=opts.tuned,
            hint="check the files, --components, or lower --min-diff",
        )
    _write(opts, info, out_tag, result)
    result.timings["total"] = time.perf_counter() - started
    return result


# --- streaming and factorizing --------------------------------------------------------------------------


def _factorize_all(
    base: SafetensorsReader,
    tuned: SafetensorsReader,
    jobs: list[Job],
    opts: ExtractOptions,
    out_tag: str,
    device: torch.device,
    result: ExtractResult,
    progress: Progress | None,
) -> None:
    by_key: dict[str, list[Job]] = {}
    for j in jobs:
        by_key.setdefault(j.key, []).append(j)
    t_read = t_math = 0.0
    for key in keys_in_order(base, jobs):
        t0 = time.perf_counter()
        raw_b, raw_t = base.read_bytes(key), tuned.read_bytes(key)
        t_read += time.perf_counter() - t0
        result.bytes_read += len(raw_b) + len(raw_t)
        binfo, tinfo = base.tensors[key], tuned.tensors[key]
        # decided on the raw bytes before any decoding: ΔW may be computed in the tuned buffer
        whole = binfo.dtype == tinfo.dtype and raw_b == raw_t
        unchanged = [
            whole
            or (
                binfo.dtype == tinfo.dtype
                and job.rows is not None
                and _rows_equal(raw_b, raw_t, binfo, job.rows)
            )
            for job in by_key[key]
        ]
        dw = None
        for job, same in zip(by_key[key], unchanged):
            if same:
                result.skipped.append(Skipped(job.stem, key, "unchanged"))
                continue
            t0 = time.perf_counter()
            if dw is None:
                dw = to_tensor(raw_t, tinfo).to(device=device, dtype=torch.float32)
                dw -= to_tensor(raw_b, binfo).to(device=device, dtype=torch.float32)
            if job.part:  # --all-modules: kept whole
                module = full_delta(job.stem, job.part, key, job.component, dw, min_diff=opts.min_diff,
                                    out_dtype=dtypes.torch_dtype(out_tag), tuned_path=tuned.path)
                module = module or Skipped(job.stem, key, "below min-diff")
            else:
                module = factorize_module(job, dw, opts, out_tag, tuned_path=tuned.path)
            t_math += time.perf_counter() - t0
            if isinstance(module, Skipped):
                result.skipped.append(module)
            else:
                (result.full if isinstance(module, FullDelta) else result.modules).append(module)
        del dw, raw_b, raw_t
        if progress:
            progress(binfo.nbytes + tinfo.nbytes)
    result.timings["read"] = t_read
    result.timings["factorize"] = t_math


def _rows_equal(raw_b: bytearray, raw_t: bytearray, info, rows: RowSlice) -> bool:
    row_bytes = info.nbytes // info.shape[0]
    lo, hi = rows.start * row_bytes, (rows.start + rows.length) * row_bytes
    return memoryview(raw_b)[lo:hi] == memoryview(raw_t)[lo:hi]


def factorize_module(
    job: Job, dw: torch.Tensor, opts: ExtractOptions, out_tag: str, *, tuned_path: str = ""
) -> ModuleResult | Skipped:
    """Factor the ΔW of one module (rows of `dw` per the job) into written-dtype up/down on the CPU."""
    t0 = time.perf_counter()
    sub = dw if job.rows is None else dw.narrow(0, job.rows.start, job.rows.length)
    mat = sub.reshape(sub.shape[0], -1)
    max_abs = float(mat.abs().max())
    if max_abs != max_abs or max_abs == float("inf"):
        raise MatchError(
            "ΔW contains NaN or Inf",
            path=tuned_path,
            tensor=job.key,
            hint="one of the checkpoints is corrupt",
        )
    if max_abs <= opts.min_diff:
        return Skipped(job.stem, job.key, "unchanged" if max_abs == 0.0 else "below min-diff")
    norm_sq = svd.frobenius_sq(mat)
    spec = svd.leading_spectrum(mat, job.max_rank, mode=opts.rank_mode, sketch=opts.sketch, total_sq=norm_sq)
    rank = svd.select_rank(
        spec.s,
        mode=opts.rank_mode,
        param=opts.rank_param,
        max_rank=job.max_rank,
        full_len=min(mat.shape),
        total_sq=norm_sq,
        complete=spec.complete,
    )
    out_dtype = dtypes.torch_dtype(out_tag)
    alpha = stored_alpha(float(rank) if opts.alpha is None else opts.alpha, out_dtype)
    factors = svd.lora_factors(spec, rank, alpha=alpha, clamp_quantile=opts.clamp_quantile)
    up = factors.up.to(out_dtype)
    down = factors.down.to(out_dtype)
    if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
        raise OutputError(
            f"the factors overflow {out_tag} (alpha {alpha:g} at rank {rank} scales up by {rank / alpha:g})",
            tensor=job.stem,
            hint="use a larger --alpha, or --dtype bf16/fp32",
        )
    err_sq = svd.residual_sq(mat, up.to(mat.dtype), down.to(mat.dtype), factors.scale)
    if job.is_conv:
        up = up.reshape(job.shape[0], rank, 1, 1)
        down = down.reshape(rank, *job.shape[1:])
    return ModuleResult(
        stem=job.stem,
        key=job.key,
        rows=None if job.rows is None else (job.rows.start, job.rows.start + job.rows.length),
        component=job.component,
        shape=job.shape,
        rank=rank,
        alpha=alpha,
        error=svd.relative_error(err_sq, norm_sq),
        norm=norm_sq**0.5,
        max_abs=max_abs,
        method=spec.method,
        power_iters=spec.power_iters,
        seconds=time.perf_counter() - t0,
        up=up.cpu().contiguous(),
        down=down.cpu().contiguous(),
    )


# --- output ---------------------------------------------------------------------------------------------


def output_tensors(result: ExtractResult, out_tag: str) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the output in declared order: by name, i.e. safetensors' canonical order."""
    out_dtype = dtypes.torch_dtype(out_tag)
    items: list[tuple[str, torch.Tensor]] = []
    for m in result.modules:
        items.append((f"{m.stem}.alpha", torch.tensor(m.alpha, dtype=out_dtype)))
        items.append((f"{m.stem}.lora_down.weight", m.down))
        items.append((f"{m.stem}.lora_up.weight", m.up))
    items += [(f"{f.stem}.{f.part}", f.diff) for f in result.full]
    items.sort(key=lambda item: item[0])
    return items


def data_sha256(items: list[tuple[str, torch.Tensor]]) -> str:
    sha = hashlib.sha256()
    for _, t in items:
        sha.update(tensor_bytes(t))
    return sha.hexdigest()


def build_metadata(opts: ExtractOptions, arch: str, result: ExtractResult) -> dict[str, str]:
    family = FAMILIES[arch]
    conv = [m for m in result.modules if _spatial(m.shape)]
    dynamic = opts.rank_mode != "fixed"
    dim = "Dynamic" if dynamic else str(opts.rank)
    # a user alpha is the same for every module (as stored, i.e. rounded to the output dtype)
    alpha = _fmt(result.modules[0].alpha) if opts.alpha is not None and result.modules else dim
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": alpha,
        "ss_base_model_version": family.kohya,
        "ss_v2": str("ss_v2" in family.legacy_flags),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{family.modelspec}/lora",
        "modelspec.implementation": family.implementation,
        "modelspec.title": os.path.splitext(os.path.basename(opts.output))[0],
        "modelspec.resolution": family.resolution,
    }
    # A date only when the caller fixes one (reproducible builds' SOURCE_DATE_EPOCH): the same
    # command must give the same bytes.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.isdigit():
        stamp = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)
        meta["modelspec.date"] = stamp.isoformat()
    if conv:
        conv_dim = "Dynamic" if dynamic else str(opts.conv_rank or opts.rank)
        conv_alpha = alpha if opts.alpha is not None else conv_dim
        meta["ss_network_args"] = json.dumps({"conv_dim": conv_dim, "conv_alpha": conv_alpha})
    ranks = [m.rank for m in result.modules]
    meta["lorabake.extract"] = json.dumps(
        {
            "version": __version__,
            "base": os.path.basename(opts.base),
            "tuned": os.path.basename(opts.tuned),
            "rank_mode": opts.rank_mode,
            "rank_param": opts.rank_param,
            "rank": opts.rank,
            "conv_rank": opts.conv_rank,
            "alpha": opts.alpha,
            "clamp_quantile": opts.clamp_quantile,
            "min_diff": opts.min_diff,
            "split": "S in up",
            "modules": len(result.modules),
            "rank_min": min(ranks, default=None),
            "rank_max": max(ranks, default=None),
            "error": round(result.overall_error, 6),
        },
        separators=(",", ":"),
    )
    return meta


def _spatial(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and (shape[2] > 1 or shape[3] > 1)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _write(opts: ExtractOptions, info: CheckpointInfo, out_tag: str, result: ExtractResult) -> None:
    t0 = time.perf_counter()
    items = output_tensors(result, out_tag)
    digest = data_sha256(items)
    meta = build_metadata(opts, info.arch, result)
    meta["sshs_model_hash"] = digest
    meta["modelspec.hash_sha256"] = "0x" + digest
    entries = [(name, out_tag, tuple(t.shape)) for name, t in items]
    with SafetensorsWriter(
        opts.output, entries, meta, inputs=[opts.base, opts.tuned], force=opts.force
    ) as writer:
        for name, t in items:
            writer.write(name, t)
    if writer.data_sha256 != digest:
        os.unlink(opts.output)
        raise OutputError(
            f"data-section SHA-256 of the written file {writer.data_sha256} differs from the one computed "
            f"for its metadata {digest}; the file was removed",
            path=opts.output,
        )
    result.output = opts.output
    result.sha256 = writer.sha256
    result.data_sha256 = writer.data_sha256
    result.bytes_written = writer.total_size
    result.metadata = meta
    result.timings["write"] = time.perf_counter() - t0


# --- reporting ------------------------------------------------------------------------------------------


def extract_json(result: ExtractResult) -> dict:
    """The `--json` document."""
    opts = result.options
    ranks = [m.rank for m in result.modules]
    reasons: dict[str, int] = {}
    for s in result.skipped:
        reasons[s.reason] = reasons.get(s.reason, 0) + 1
    return {
        "output": result.output,
        "arch": result.arch,
        "base": opts.base,
        "tuned": opts.tuned,
        "rank_mode": opts.rank_mode,
        "rank_param": opts.rank_param,
        "rank": opts.rank,
        "conv_rank": opts.conv_rank,
        "alpha": opts.alpha,
        "dtype": opts.dtype,
        "modules": len(result.modules),
        "full_deltas": [f"{f.stem}.{f.part}" for f in result.full],
        "rank_min": min(ranks) if ranks else None,
        "rank_max": max(ranks) if ranks else None,
        "error": result.overall_error,
        "skipped": reasons,
        "unaddressable": result.unaddressable,
        "sha256": result.sha256,
        "data_sha256": result.data_sha256,
        "bytes_read": result.bytes_read,
        "bytes_written": result.bytes_written,
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
        "per_module": [
            {
                "stem": m.stem,
                "key": m.key,
                "rows": list(m.rows) if m.rows else None,
                "component": m.component,
                "shape": list(m.shape),
                "rank": m.rank,
                "alpha": m.alpha,
                "error": m.error,
                "norm": m.norm,
                "method": m.method,
                "power_iters": m.power_iters,
                "seconds": round(m.seconds, 4),
            }
            for m in result.modules
        ],
    }
