"""`lorabake extract`: a kohya-format LoRA from the difference of two checkpoints.

Flow: detect both files and refuse a family or shape mismatch from the headers alone; choose the
modules (trainer targets, or every 2-D/4-D weight with `all_modules`) and their kohya names from
the base's key map; stream the pairs one base tensor at a time (only one pair and its ΔW are in
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
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorabake import __version__, devices, dtypes, svd
from lorabake.arch import FAMILIES, TEXT_ENCODER_KINDS
from lorabake.detect import CheckpointInfo, detect_checkpoint
from lorabake.errors import MatchError, OutputError, UsageError
from lorabake.keymap import KeyMap, build_keymap
from lorabake.st_reader import SafetensorsReader, check_input_path, to_tensor
from lorabake.st_writer import SafetensorsWriter, check_output_path, tensor_bytes
from lorabake.types import TEXT_ENCODERS, RowSlice

Progress = Callable[[int], None]

OUTPUT_DTYPES = ("fp16", "bf16", "fp32")
COMPONENT_CHOICES = ("unet", "dit", "te", "te1", "te2", "te3")  # unet and dit both mean the diffusion model

@dataclass(frozen=True)
class ExtractOptions:
    base: str
    tuned: str
    output: str
    rank: int = 32
    conv_rank: int | None = None
    rank_mode: str = "fixed"  # fixed | energy | ratio | cumulative
    rank_param: float | None = None
    alpha: float | None = None  # None: alpha = each module's rank (scale 1)
    clamp_quantile: float | None = None
    components: tuple[str, ...] = ("unet", "te")
    all_modules: bool = False
    min_diff: float = 0.0
    device: str = "auto"
    dtype: str = "fp16"
    force: bool = False
    sketch: svd.SketchSettings = field(default_factory=svd.SketchSettings)


@dataclass(frozen=True)
class Job:
    """One LoRA module to extract: rows `rows` (None = all) of base weight `key`."""

    key: str
    stem: str
    component: str
    rows: RowSlice | None
    shape: tuple[int, ...]  # of the module's ΔW (rows applied)
    max_rank: int

    @property
    def is_conv(self) -> bool:
        return len(self.shape) == 4


@dataclass
class ModuleResult:
    stem: str
    key: str
    rows: tuple[int, int] | None
    component: str
    shape: tuple[int, ...]
    rank: int
    alpha: float
    error: float  # relative Frobenius error of the written factors
    norm: float  # ‖ΔW‖_F
    max_abs: float
    method: str  # exact | randomized
    power_iters: int
    seconds: float
    up: torch.Tensor = field(repr=False, default=None)
    down: torch.Tensor = field(repr=False, default=None)

    @property
    def err_sq(self) -> float:
        return (self.error * self.norm) ** 2


@dataclass
class Skipped:
    stem: str
    key: str
    reason: str  # "unchanged" | "below min-diff" | ...


@dataclass
class ExtractResult:
    options: ExtractOptions
    arch: str
    modules: list[ModuleResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    unaddressable: list[str] = field(default_factory=list)  # weights with no kohya name in the key map
    output: str | None = None
    sha256: str | None = None
    data_sha256: str | None = None
    bytes_read: int = 0
    bytes_written: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def overall_error(self) -> float:
        num = sum(m.err_sq for m in self.modules)
        den = sum(m.norm**2 for m in self.modules)
        return svd.relative_error(num, den)


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
        info = _same_family(base, tuned)
        keymap = build_keymap(base.tensors, info)
        jobs, unaddressable = plan_jobs(base, info, keymap, opts)
        check_pairs(base, tuned, jobs)
        result = ExtractResult(opts, info.arch, unaddressable=unaddressable)
        if on_start:
            on_start(
                sum(base.tensors[k].nbytes + tuned.tensors[k].nbytes for k in _keys_in_order(base, jobs))
            )
        _factorize_all(base, tuned, jobs, opts, out_tag, device, result, progress)
        base.verify_unchanged()  # after the last read: the factors come from one version of each file
        tuned.verify_unchanged()
    if not result.modules:
        raise MatchError(
            "the two checkpoints do not differ in any selected module: nothing to extract",
            path=opts.tuned,
            hint="check the files, --components, or lower --min-diff",
        )
    _write(opts, info, out_tag, result)
    result.timings["total"] = time.perf_counter() - started
    return result


def validate_options(opts: ExtractOptions) -> str:
    """UsageError for impossible option values; returns the output dtype tag."""
    if opts.dtype not in OUTPUT_DTYPES:
        raise UsageError(f"--dtype {opts.dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    if opts.rank < 1:
        raise UsageError("--rank must be at least 1")
    if opts.conv_rank is not None and opts.conv_rank < 1:
        raise UsageError("--conv-rank must be at least 1")
    if opts.rank_mode not in svd.RANK_MODES:
        raise UsageError(f"--rank-mode {opts.rank_mode!r} is not one of {', '.join(svd.RANK_MODES)}")
    if opts.rank_mode == "fixed":
        if opts.rank_param is not None:
            raise UsageError("--rank-param needs --rank-mode energy, ratio or cumulative")
    else:
        p = opts.rank_param
        if p is None:
            raise UsageError(f"--rank-mode {opts.rank_mode} needs --rank-param")
        if opts.rank_mode == "ratio" and not p >= 1.0:
            raise UsageError("--rank-param for ratio must be ≥ 1 (keep σ > σ₁/ratio)")
        if opts.rank_mode in ("energy", "cumulative") and not 0.0 < p <= 1.0:
            raise UsageError(f"--rank-param for {opts.rank_mode} must be in (0, 1]")
    if opts.alpha is not None and not opts.alpha > 0.0:
        raise UsageError("--alpha must be positive")
    stored = None if opts.alpha is None else stored_alpha(opts.alpha, dtypes.torch_dtype(dtypes.CLI_NAMES[opts.dtype]))
    if stored is not None and not (math.isfinite(stored) and stored > 0.0):
        raise UsageError(f"--alpha {opts.alpha:g} is {stored:g} in {opts.dtype}", hint="choose an alpha the output dtype holds")
    if opts.clamp_quantile is not None and not 0.0 < opts.clamp_quantile <= 1.0:
        raise UsageError("--clamp-quantile must be in (0, 1]")
    if opts.min_diff < 0.0:
        raise UsageError("--min-diff must be ≥ 0")
    bad = [c for c in opts.components if c not in COMPONENT_CHOICES]
    if bad or not opts.components:
        raise UsageError(
            f"--components takes a comma list of {', '.join(COMPONENT_CHOICES)}; got {','.join(opts.components)!r}"
        )
    return dtypes.CLI_NAMES[opts.dtype]


# --- planning (headers only) ----------------------------------------------------------------------------


def _same_family(base: SafetensorsReader, tuned: SafetensorsReader) -> CheckpointInfo:
    info = detect_checkpoint(base.tensors, base.metadata)
    other = detect_checkpoint(tuned.tensors, tuned.metadata)
    if info.arch == "unknown":
        raise MatchError(
            "cannot tell which model family the base checkpoint is"
            + (f" ({'; '.join(info.notes)})" if info.notes else ""),
            path=base.path,
            hint="extract supports checkpoints of " + ", ".join(f.title for f in FAMILIES.values()),
        )
    if other.arch != info.arch:
        raise MatchError(
            f"the tuned checkpoint is {other.arch} but the base {base.path} is {info.arch}",
            path=tuned.path,
            hint="extract needs a fine-tune and the base it was trained from",
        )
    return info


def _wanted_components(info: CheckpointInfo, selected: tuple[str, ...]) -> list[str]:
    out = []
    for comp in info.components.values():
        if comp.name == "vae":
            continue
        if comp.name in TEXT_ENCODERS:
            if "te" in selected or comp.name in selected:
                out.append(comp.name)
        elif "unet" in selected or "dit" in selected:
            out.append(comp.name)
    return out


def _targets(info: CheckpointInfo, component: str, kind: str, *, conv: bool) -> tuple[str, ...]:
    """Module suffixes trainers target in `component`: the family's rows, or the text encoder kind's."""
    if component in TEXT_ENCODERS:
        row = TEXT_ENCODER_KINDS.get(kind)
        return row.extract_targets if row else ()
    family = FAMILIES[info.arch]
    return family.extract_targets + (family.extract_conv_targets if conv else ())


def _is_target(rel: str, suffixes: tuple[str, ...]) -> bool:
    dotted = "." + rel
    return any(dotted.endswith("." + s) for s in suffixes)


def plan_jobs(
    base: SafetensorsReader, info: CheckpointInfo, keymap: KeyMap, opts: ExtractOptions
) -> tuple[list[Job], list[str]]:
    """The modules to extract (in base file order) and the selected weights no kohya name reaches."""
    comps = {name: info.components[name] for name in _wanted_components(info, opts.components)}
    roots = sorted(comps.values(), key=lambda c: -len(c.root))
    conv = opts.conv_rank is not None
    targets = {c.name: _targets(info, c.name, c.kind, conv=conv) for c in comps.values()}
    jobs: list[Job] = []
    unaddressable: list[str] = []
    for key, tinfo in base.tensors.items():
        if len(tinfo.shape) not in (2, 4) or not dtypes.is_float(tinfo.dtype):
            continue
        comp = next((c for c in roots if key.startswith(c.root)), None)
        if comp is None:
            continue
        rel = key[len(comp.root) :]
        if not opts.all_modules and not _is_target(rel, targets[comp.name]):
            continue
        if opts.all_modules and not (rel.endswith("weight") or rel.endswith("in_proj_weight")):
            continue
        named = kohya_modules(keymap, key)
        if not named:
            unaddressable.append(key)
            continue
        for stem, rows in named:
            shape = tinfo.shape if rows is None else (rows.length, *tinfo.shape[1:])
            jobs.append(Job(key, stem, comp.name, rows, tuple(shape), _max_rank(shape, opts)))
    return jobs, unaddressable


def kohya_modules(keymap: KeyMap, key: str) -> list[tuple[str, RowSlice | None]]:
    """(stem, row slice) of each kohya module of base weight `key`, verified against `keymap.targets`.

    The one place naming is decided: a stem is used only if loading it back resolves to this key
    and slice with no transform, so the output always round-trips through `build_keymap`.
    """
    out = []
    for stem in keymap.kohya_names.get(key, ()):
        target = keymap.targets.get(stem)
        if target is None or target.key != key or target.transform is not None:
            continue
        out.append((stem, target.slice))
    return out


def _max_rank(shape: tuple[int, ...], opts: ExtractOptions) -> int:
    spatial = len(shape) == 4 and (shape[2] > 1 or shape[3] > 1)
    rank = opts.conv_rank if (spatial and opts.conv_rank is not None) else opts.rank
    flat_in = 1
    for d in shape[1:]:
        flat_in *= d
    return max(1, min(rank, shape[0], flat_in))


def check_pairs(base: SafetensorsReader, tuned: SafetensorsReader, jobs: list[Job]) -> None:
    """Every planned weight must exist in the tuned file with the same shape (headers only)."""
    for key in dict.fromkeys(j.key for j in jobs):
        other = tuned.tensors.get(key)
        if other is None:
            raise MatchError(
                "the tuned checkpoint has no tensor of this name",
                path=tuned.path,
                tensor=key,
                hint="base and tuned must use the same layout (both SGM/LDM single files, or both unet-only, ...)",
            )
        if other.shape != base.tensors[key].shape:
            raise MatchError(
                f"shape {list(other.shape)} differs from the base's {list(base.tensors[key].shape)} ({base.path})",
                path=tuned.path,
                tensor=key,
                hint="the tuned model is not a fine-tune of this base",
            )
        if not dtypes.is_float(other.dtype) or dtypes.BY_TAG[other.dtype].torch is None:
            raise MatchError(f"dtype {other.dtype} cannot be read as floats", path=tuned.path, tensor=key)


def _keys_in_order(base: SafetensorsReader, jobs: list[Job]) -> list[str]:
    wanted = {j.key for j in jobs}
    return [k for k in base.tensors if k in wanted]


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
    for key in _keys_in_order(base, jobs):
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
            module = factorize_module(job, dw, opts, out_tag, tuned_path=tuned.path)
            t_math += time.perf_counter() - t0
            if isinstance(module, Skipped):
                result.skipped.append(module)
            else:
                result.modules.append(module)
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


def stored_alpha(alpha: float, dtype: torch.dtype) -> float:
    """The alpha a loader will read back from a scalar tensor of `dtype`."""
    return float(torch.tensor(alpha, dtype=torch.float32).to(dtype).float())


# --- output ---------------------------------------------------------------------------------------------


def output_tensors(result: ExtractResult, out_tag: str) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the output in declared order: by name, i.e. safetensors' canonical order."""
    out_dtype = dtypes.torch_dtype(out_tag)
    items: list[tuple[str, torch.Tensor]] = []
    for m in result.modules:
        items.append((f"{m.stem}.alpha", torch.tensor(m.alpha, dtype=out_dtype)))
        items.append((f"{m.stem}.lora_down.weight", m.down))
        items.append((f"{m.stem}.lora_up.weight", m.up))
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
    alpha = _fmt(result.modules[0].alpha) if opts.alpha is not None else dim
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
            "rank_min": min(ranks),
            "rank_max": max(ranks),
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
