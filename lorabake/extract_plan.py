"""`lorabake extract`, before any tensor is read: options, the modules to extract and their kohya names.

Headers only. Which modules trainers target comes from the registry (`Family.extract_targets` and the
text encoder kinds); names come from the base's key map (`KeyMap.kohya_names`), kept only when they
load back onto the same key and rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lorabake import dtypes, svd
from lorabake.arch import FAMILIES, TEXT_ENCODER_KINDS
from lorabake.detect import CheckpointInfo, detect_checkpoint
from lorabake.errors import MatchError, UsageError
from lorabake.extract_full import FullDelta, full_name
from lorabake.keymap import KeyMap
from lorabake.st_reader import SafetensorsReader
from lorabake.types import TEXT_ENCODERS, RowSlice

OUTPUT_DTYPES = ("fp16", "bf16", "fp32")
COMPONENT_CHOICES = ("unet", "dit", "te", "te1", "te2", "te3", "te4")  # unet and dit both mean the diffusion model


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
    part: str | None = None  # a full delta written as `<stem>.<part>` (diff, diff_b, diff_m); None: LoRA factors

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
    full: list[FullDelta] = field(default_factory=list)  # --all-modules: deltas a LoRA cannot carry
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


def same_family(base: SafetensorsReader, tuned: SafetensorsReader) -> CheckpointInfo:
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
        if not tinfo.shape or not dtypes.is_float(tinfo.dtype):
            continue
        comp = next((c for c in roots if key.startswith(c.root)), None)
        if comp is None:
            continue
        rel = key[len(comp.root) :]
        lora = len(tinfo.shape) in (2, 4) and rel.endswith("weight")  # in_proj_weight too
        if not opts.all_modules and not (lora and _is_target(rel, targets[comp.name])):
            continue
        if not lora:  # --all-modules: a full delta (modulation, 5-D patch embedding, norm, bias)
            full = full_name(keymap, info, base.tensors, key, comp.root, comp.name)
            if full is None:
                unaddressable.append(key)
            else:
                jobs.append(Job(key, full[0], comp.name, None, tuple(tinfo.shape), 0, part=full[1]))
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


def keys_in_order(base: SafetensorsReader, jobs: list[Job]) -> list[str]:
    wanted = {j.key for j in jobs}
    return [k for k in base.tensors if k in wanted]


def stored_alpha(alpha: float, dtype: torch.dtype) -> float:
    """The alpha a loader will read back from a scalar tensor of `dtype`."""
    return float(torch.tensor(alpha, dtype=torch.float32).to(dtype).float())
