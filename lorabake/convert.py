"""`lorabake convert LORA --to FLAVOUR [--like BASE] -o OUT`: the same LoRA under another trainer's names.

Flow: parse the LoRA (its scalars read) and find its family (`lora_base`), or take the `--like` base's;
build the rule table of a reference checkpoint (the family's virtual checkpoint, or the base's own
header); plan where every module's rows go (`convert_plan`, headers only, refusals first); then build
the output tensors and write them with the writer every command uses (temporary file, no-replace
commit, inputs protected).

Exactness: a renamed module keeps its tensors' bytes. A split keeps down and cuts up in row bands
(rank intact); a fusion stacks the downs and lays the ups block-diagonally (rank Σ), with zeros where no
source gives rows. Alpha is carried where the flavour has it: an `.alpha` tensor (kohya, ComfyUI),
PEFT's LoraConfig in `lora_adapter_metadata` (diffusers, PEFT: `lora_alpha`, `r`, and per-module
`alpha_pattern`/`rank_pattern`), or folded into `up` (ai-toolkit, which has none: up·alpha/rank, one
rounding to the factor dtype; exact when alpha/rank is a power of two). Sources of one fused module
with different scales have the ratio folded into their up block, and that is reported.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cache

import torch

from lorabake import adapters, blocks, dtypes
from lorabake.arch import FAMILIES
from lorabake.convert_plan import OutModule, Plan, check_flavour, kind_of, make_plan
from lorabake.convert_write import metadata, result_json, summary_lines, write
from lorabake.detect import detect_checkpoint
from lorabake.errors import LoraFormatError, MatchError, UsageError
from lorabake.keymap import build_keymap
from lorabake.lora_base import against_base, identify, virtual_checkpoint
from lorabake.lora_format import LoraFile, parse_lora
from lorabake.plan import LoraSpec
from lorabake.st_reader import SafetensorsReader, check_input_path
from lorabake.st_writer import check_output_path, tensor_bytes

__all__ = ["ConvertOptions", "ConvertResult", "result_json", "run", "scaled", "summary_lines"]
OUTPUT_DTYPES = ("keep", "fp16", "bf16", "fp32")


@dataclass(frozen=True)
class ConvertOptions:
    """`strength`, `te_strength` and `blocks` (a per-block spec, `lorabake.block_spec`) are folded into
    the factors; modules they leave at 0 are not written. `dtype`: of the written factors ("keep": the input's)."""

    lora: str
    output: str
    to: str
    like: str | None = None
    force: bool = False
    strength: float = 1.0
    te_strength: float | None = None
    blocks: str | None = None
    dtype: str = "keep"


@dataclass
class ConvertResult:
    options: ConvertOptions
    architecture: str = "unknown"
    reference: str = ""
    counts: dict[str, int] = field(default_factory=dict)  # renamed / split / fused; "other naming": names not in the flavour's naming
    folded: list[str] = field(default_factory=list)  # output modules with a scale folded into up
    weighted: list[str] = field(default_factory=list)  # input modules with a strength ≠ 1 folded in
    removed: list[str] = field(default_factory=list)  # input modules at strength 0, not written
    modules: list[dict] = field(default_factory=list)
    output: str | None = None
    sha256: str | None = None
    data_sha256: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def run(opts: ConvertOptions) -> ConvertResult:
    flavour = check_flavour(opts.to)
    if opts.dtype not in OUTPUT_DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}")
    for value in (opts.strength, opts.te_strength):
        if value is not None and not (math.isfinite(value) and abs(value) < 3.0e38):
            raise UsageError(f"strength {value} for {opts.lora} is not a finite fp32 number")
    check_input_path(opts.lora)
    if opts.like:
        check_input_path(opts.like)
    reader = SafetensorsReader(opts.lora)
    base = SafetensorsReader(opts.like) if opts.like else None
    try:
        inputs = [opts.lora, *(base.files() if base else ())]
        check_output_path(opts.output, inputs=inputs, force=opts.force)
        lora = parse_lora(reader.tensors, reader.metadata, path=reader.path, read=reader.read_bytes)
        result = ConvertResult(opts)
        if base is not None:
            header = dict(base.tensors)
            info = detect_checkpoint(header, base.metadata)
            lora = against_base(lora, info.arch, opts.like)
            keymap = build_keymap(header, info)
            reference = f"the base {opts.like} ({info.arch})"
        else:
            lora, match = identify(lora, reader.tensors)
            if lora.arch not in FAMILIES:
                raise MatchError(f"which model family the LoRA is for is unknown ({match.note or 'no family matches'})",
                                 path=opts.lora, hint="give --like BASE, a checkpoint it was trained for")
            header, info, keymap = _reference(lora)
            reference = f"the {FAMILIES[lora.arch].title} rule table"
        strengths = _strengths(opts, lora, keymap, header, info)
        result.removed = [stem for stem, value in strengths.items() if value == 0.0]
        if result.removed:
            lora = replace(lora, modules={s: m for s, m in lora.modules.items() if strengths[s] != 0.0})
            if not lora.modules:
                raise UsageError(f"every module of {opts.lora} is at strength 0 (strengths and block specs): "
                                 "the output would hold nothing")
        plan = make_plan(lora, keymap, header, info, flavour, reader.tensors, reference=reference)
        result.architecture, result.reference = info.arch, reference
        data, input_sha = _read(reader)
        out_dtype = None if opts.dtype == "keep" else dtypes.torch_dtype(dtypes.CLI_NAMES[opts.dtype])
        items, config = _build(plan, lora, data, result, strengths=strengths, dtype=out_dtype)
        meta = metadata(opts, plan, lora, result, config, input_sha, info.arch)
        write(opts, items, meta, result, inputs, [reader, *([base] if base else [])])
        return result
    finally:
        reader.close()
        if base is not None:
            base.close()


def _reference(lora: LoraFile):
    """The family's virtual checkpoint (the declared variant matching most modules), its detection and rule table."""
    best = None
    for variant in range(max(len(FAMILIES[lora.arch].structures), 1)):
        header, info, keymap = _variant_table(lora.arch, variant)
        hits = sum(1 for stem in lora.modules if stem in keymap.targets or stem in getattr(keymap, "spread", {}))
        if best is None or hits > best[0]:
            best = (hits, header, info, keymap)
    return best[1:]


@cache
def _variant_table(arch: str, variant: int):
    """(header, detection, rule table) of one declared variant of `arch`: built once per process, since a
    batch of conversions (or the tests) asks for the same family again and again. Nothing mutates them."""
    header = virtual_checkpoint(FAMILIES[arch], variant)
    info = detect_checkpoint(header)
    return header, info, build_keymap(header, info)


def _strengths(opts: ConvertOptions, lora: LoraFile, keymap, header, info) -> dict[str, float]:
    """stem -> the multiplier folded into its factors (strength × its block's value), as `merge` applies
    them to the same weights; {} when none is asked."""
    if opts.blocks is None and opts.strength == 1.0 and opts.te_strength is None:
        return {}
    spec = LoraSpec(opts.lora, opts.strength, opts.te_strength, opts.blocks)
    weights, block_of = None, {}
    if opts.blocks:
        block_of = blocks.block_map(header, info)
        weights = blocks.resolve(opts.blocks, info.arch, set(block_of.values()), set(info.components), lora=opts.lora)
    out: dict[str, float] = {}
    for stem in lora.modules:
        targets = [keymap.targets[stem]] if stem in keymap.targets else list(keymap.spread.get(stem, ()))
        values = {spec.strength_for(t.component) * (weights.factor(block_of.get(t.key), t.component) if weights else 1.0)
                  for t in targets}
        if len(values) > 1:
            raise UsageError(f"block spec {opts.blocks!r} of {opts.lora}: module {stem!r} spans weights given "
                             f"different values ({', '.join(f'{v:g}' for v in sorted(values))}); one file cannot carry that")
        out[stem] = values.pop() if values else opts.strength  # no place in the table: make_plan names it
    return out


def _read(reader: SafetensorsReader) -> tuple[dict[str, torch.Tensor], str]:
    """Every tensor, and the SHA-256 of the data section (tensors in offset order)."""
    data = {name: reader.read(name) for name in reader.tensors}
    sha = hashlib.sha256()
    for name in sorted(reader.tensors, key=lambda n: reader.tensors[n].start):
        sha.update(tensor_bytes(data[name]))
    return data, sha.hexdigest()


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def _build(plan: Plan, lora: LoraFile, data: dict[str, torch.Tensor], result: ConvertResult, *,
           strengths: dict[str, float], dtype: torch.dtype | None):
    """(output tensors sorted by name, {component prefix: {module name: (rank, alpha, LoKr shapes)}} for a PEFT config).

    A strength ≠ 1 goes into the part ΔW is linear in (`adapters.strength_parts`: LoRA's up, LoHa's
    w1_a, LoKr's w1, a diff, and the bias deltas), in the input's dtype when exact, else in fp32;
    `dtype` then casts every factor (alpha and scale tensors keep theirs)."""
    flavour = plan.flavour
    items: dict[str, torch.Tensor] = {}
    config: dict[str, dict[str, tuple[int, float]]] = {}
    dora = {m.stem for m in lora.modules.values() if m.dora}
    counts: Counter[str] = Counter()
    for out in plan.outputs.values():
        sources = [lora.modules[s.stem] for s in out.sources]
        first = sources[0]
        action = "split" if out.action == "renamed" and first.stem in plan.split else out.action
        counts[action] += 1
        counts["other naming"] += out.native
        if action == "renamed" and out.transform is None:
            parts = {p: data[k] for p, k in first.parts.items()}
            rank, scale, alpha_tensor = first.rank, _scale(first), parts.pop("alpha", None)
            scale_tensor = parts.pop("scale", None)
            alpha = first.alpha if (alpha_tensor is not None and scale_tensor is None) else None
            parts = _with_strength(parts, strengths.get(first.stem, 1.0), lora, first)
        elif first.algo == "full":
            parts = _regroup_full(out, lora, data, strengths)
            rank, scale, alpha_tensor, scale_tensor, alpha = None, 1.0, None, None, None
        else:
            parts, rank, scale = _regroup_lora(out, lora, data, result, strengths)
            split_only = len(out.sources) == 1
            alpha_tensor = data[first.parts["alpha"]] if split_only and "alpha" in first.parts else None
            scale_tensor = data[first.parts["scale"]] if split_only and "scale" in first.parts else None
            alpha = first.alpha if split_only and alpha_tensor is not None and scale_tensor is None else None
        if flavour.alpha == "tensor":
            if alpha_tensor is not None or scale_tensor is not None:
                parts.update({k: v for k, v in (("alpha", alpha_tensor), ("scale", scale_tensor)) if v is not None})
            elif rank is not None and scale != 1.0:
                parts["alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
        elif flavour.alpha == "config":
            name = out.stem[len(out.prefix):]
            if first.algo == "lokr":  # PEFT's LoKrConfig: r and alpha from the factors' shapes (convert_write)
                config.setdefault(out.prefix, {})[name] = (None, scale, {p: tuple(t.shape) for p, t in parts.items()})
            else:
                config.setdefault(out.prefix, {})[name] = (rank, alpha if alpha is not None else scale * rank, None)
        elif scale != 1.0:  # fold: no alpha anywhere
            parts["up"] = scaled(parts["up"], scale)
            result.folded.append(out.stem)
        for part, value in parts.items():
            name = flavour.part_as.get(part, part)
            if name != part:
                value = _magnitude_as(value, name, lora, first)
            if dtype is not None and part not in ("alpha", "scale") and value.is_floating_point():
                value = value.to(dtype)
            items[out.stem + flavour.suffixes[name]] = value
        result.modules.append({"output": out.stem, "inputs": [s.stem for s in out.sources], "action": action,
                               "rank": rank, "native_name": out.native})
    if flavour.alpha == "config" and dora and dora != {m.stem for m in lora.modules.values() if m.algo == "lora"}:
        stem = next(iter(dora))
        raise LoraFormatError("PEFT's LoraConfig has one use_dora for the whole file, and only some modules are DoRA",
                              path=lora.path, tensor=next(iter(lora.modules[stem].parts.values())),
                              hint="convert to kohya or comfyui")
    result.counts = {k: v for k, v in counts.items() if v}
    result.weighted = [stem for stem, value in strengths.items() if value not in (0.0, 1.0)]
    if dtype is not None or result.weighted:
        for name, t in items.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise LoraFormatError("the result does not fit the output dtype (Inf)", path=result.options.output,
                                      tensor=name, hint="use --dtype fp32 or a smaller strength")
    return sorted(items.items()), config


def _with_strength(parts: dict[str, torch.Tensor], factor: float, lora: LoraFile, module) -> dict[str, torch.Tensor]:
    """The module's parts with `factor` folded into the part(s) its change is linear in."""
    if factor == 1.0:
        return parts
    names = adapters.strength_parts(module.algo, parts)
    if names is None:
        raise LoraFormatError(
            f"module {module.stem!r} is {kind_of(module)}: its change is not linear in its factors, so a strength of "
            f"{factor:g} cannot be folded into them", path=lora.path, tensor=next(iter(module.parts.values())),
            hint="leave its block at 1 (or 0 to remove it), or bake it with `lorabake merge`")
    return {p: scaled(t, factor) if p in names else t for p, t in parts.items()}


def _scale(module) -> float:
    return module.scale if module.scale is not None else 1.0


def scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    """`t`·factor in t's dtype when that is exact, else in fp32 (fp16 subnormals lose bits even when halved)."""
    exact = t.double() * factor
    out = exact.to(t.dtype)
    if torch.equal(out.double(), exact) or t.dtype in (torch.float32, torch.float64):
        return out
    return exact.to(torch.float32)


def _magnitude_as(value: torch.Tensor, name: str, lora: LoraFile, module) -> torch.Tensor:
    """PEFT's magnitude [out] ↔ LyCORIS's dora_scale [out, 1, …] (per output row; [1, in] has no PEFT form)."""
    if name == "dora_scale":
        return value.reshape(-1, 1)
    if value.dim() >= 2 and value.shape[0] == 1 and value.numel() > 1:
        raise LoraFormatError(f"module {module.stem!r}: dora_scale is per input column, PEFT's magnitude per output row",
                              path=lora.path, tensor=module.parts.get("dora_scale"), hint="convert to kohya or comfyui")
    return value.reshape(-1)


def _regroup_lora(out: OutModule, lora: LoraFile, data, result: ConvertResult, strengths: dict[str, float]):
    """(parts, rank, scale) of an output module made from row bands of LoRA modules; each band carries its
    strength and its scale relative to the first source's (which the output's alpha gives)."""
    ups, downs, shapes = [], [], set()
    scale0 = _scale(lora.modules[out.sources[0].stem])
    dtype = None
    for s in out.sources:
        m = lora.modules[s.stem]
        up, down = data[m.parts["up"]], data[m.parts["down"]]
        rank = down.shape[0]
        band = up.reshape(up.shape[0], rank)[s.start : s.stop]
        factor = strengths.get(s.stem, 1.0) * _scale(m) / scale0
        if factor != 1.0:
            band = scaled(band, factor)
        if _scale(m) != scale0:
            result.folded.append(out.stem)
        ups.append((s.at, band))
        downs.append(down)
        shapes.add((tuple(down.shape[1:]), tuple(up.shape[2:])))
        dtype = band.dtype if dtype is None else torch.promote_types(dtype, band.dtype)
    if len(shapes) > 1:
        raise LoraFormatError(f"the modules fused into {out.stem!r} have different kernel shapes",
                              path=lora.path, tensor=out.sources[0].stem)
    kernel, tail = shapes.pop()
    total = sum(d.shape[0] for d in downs)
    if len(out.sources) == 1 and ups[0][1].shape[0] == out.rows:
        up = ups[0][1]
    else:
        up = torch.zeros(out.rows, total, dtype=dtype)
        col = 0
        for (at, band), down in zip(ups, downs):
            up[at : at + band.shape[0], col : col + down.shape[0]] = band
            col += down.shape[0]
    down = torch.cat([d.to(dtype) for d in downs]) if len(downs) > 1 else downs[0]
    up = _transformed(up, out.transform, lora, out)
    if out.transform == "transpose":
        up, down = down.reshape(total, -1).T.contiguous(), up.T.contiguous()
        return {"up": up, "down": down}, total, scale0
    return {"up": up.reshape(out.rows, total, *tail).contiguous(), "down": down.contiguous()}, total, scale0


def _regroup_full(out: OutModule, lora: LoraFile, data, strengths: dict[str, float]) -> dict[str, torch.Tensor]:
    diffs, biases = [], []
    for s in out.sources:
        m = lora.modules[s.stem]
        factor = strengths.get(s.stem, 1.0)
        for part, bands in (("diff", diffs), ("diff_b", biases)):
            if part in m.parts:
                band = data[m.parts[part]][s.start : s.stop]
                bands.append((s.at, band if factor == 1.0 else scaled(band, factor)))
    parts = {}
    for part, bands in (("diff", diffs), ("diff_b", biases)):
        if bands:
            first = bands[0][1]
            dtype = first.dtype
            for _, band in bands[1:]:
                dtype = torch.promote_types(dtype, band.dtype)
            whole = torch.zeros(out.rows, *first.shape[1:], dtype=dtype)
            for at, band in bands:
                whole[at : at + band.shape[0]] = band
            parts[part] = _transformed(whole, out.transform if part == "diff" else None, lora, out)
    return parts


def _transformed(rows: torch.Tensor, transform: str | None, lora: LoraFile, out: OutModule) -> torch.Tensor:
    """Rows of ΔW (up, or a full diff) under the output's transform: the two halves swapped (diffusers'
    AdaLayerNormContinuous is scale ‖ shift where the checkpoint is shift ‖ scale). A transpose is done by
    the caller, on the factors."""
    if transform == "swap_halves":
        if rows.shape[0] % 2:
            raise LoraFormatError(f"{out.stem!r}: halves of an odd number of rows", path=lora.path)
        first, second = rows.chunk(2)
        return torch.cat([second, first])
    return rows
