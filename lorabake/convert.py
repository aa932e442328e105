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
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from lorabake import __version__, dtypes
from lorabake.arch import FAMILIES
from lorabake.convert_plan import OutModule, Plan, check_flavour, make_plan
from lorabake.detect import detect_checkpoint
from lorabake.errors import LoraFormatError, MatchError
from lorabake.keymap import build_keymap
from lorabake.lora_base import against_base, identify, virtual_checkpoint
from lorabake.lora_format import LoraFile, parse_lora
from lorabake.st_reader import SafetensorsReader, check_input_path
from lorabake.st_writer import SafetensorsWriter, check_output_path, tensor_bytes

# metadata of the input that describes its bytes or its PEFT config: recomputed, never copied
_DROPPED_METADATA = ("lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


@dataclass(frozen=True)
class ConvertOptions:
    lora: str
    output: str
    to: str
    like: str | None = None
    force: bool = False


@dataclass
class ConvertResult:
    options: ConvertOptions
    architecture: str = "unknown"
    reference: str = ""
    counts: dict[str, int] = field(default_factory=dict)  # renamed / split / fused; "other naming": names not in the flavour's naming
    folded: list[str] = field(default_factory=list)  # output modules with a scale folded into up
    modules: list[dict] = field(default_factory=list)
    output: str | None = None
    sha256: str | None = None
    data_sha256: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def run(opts: ConvertOptions) -> ConvertResult:
    flavour = check_flavour(opts.to)
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
        plan = make_plan(lora, keymap, header, info, flavour, reader.tensors, reference=reference)
        result.architecture, result.reference = info.arch, reference
        data, input_sha = _read(reader)
        items, config = _build(plan, lora, data, result)
        meta = _metadata(opts, plan, lora, result, config, input_sha, info.arch)
        _write(opts, items, meta, result, inputs, [reader, *([base] if base else [])])
        return result
    finally:
        reader.close()
        if base is not None:
            base.close()


def _reference(lora: LoraFile):
    """The family's virtual checkpoint (the declared variant matching most modules), its detection and rule table."""
    family = FAMILIES[lora.arch]
    best = None
    for variant in range(max(len(family.structures), 1)):
        header = virtual_checkpoint(family, variant)
        info = detect_checkpoint(header)
        keymap = build_keymap(header, info)
        hits = sum(1 for stem in lora.modules if stem in keymap.targets or stem in getattr(keymap, "spread", {}))
        if best is None or hits > best[0]:
            best = (hits, header, info, keymap)
    return best[1:]


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


def _build(plan: Plan, lora: LoraFile, data: dict[str, torch.Tensor], result: ConvertResult):
    """(output tensors sorted by name, {component prefix: {module name: (rank, alpha)}} for a PEFT config)."""
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
        elif first.algo == "full":
            parts, rank, scale, alpha_tensor, scale_tensor, alpha = _regroup_full(out, lora, data), None, 1.0, None, None, None
        else:
            parts, rank, scale = _regroup_lora(out, lora, data, result)
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
            config.setdefault(out.prefix, {})[name] = (rank, alpha if alpha is not None else scale * rank)
        elif scale != 1.0:  # fold: no alpha anywhere
            parts["up"] = scaled(parts["up"], scale)
            result.folded.append(out.stem)
        for part, value in parts.items():
            name = flavour.part_as.get(part, part)
            if name != part:
                value = _magnitude_as(value, name, lora, first)
            items[out.stem + flavour.suffixes[name]] = value
        result.modules.append({"output": out.stem, "inputs": [s.stem for s in out.sources], "action": action,
                               "rank": rank, "native_name": out.native})
    if flavour.alpha == "config" and dora and dora != {m.stem for m in lora.modules.values() if m.algo == "lora"}:
        stem = next(iter(dora))
        raise LoraFormatError("PEFT's LoraConfig has one use_dora for the whole file, and only some modules are DoRA",
                              path=lora.path, tensor=next(iter(lora.modules[stem].parts.values())),
                              hint="convert to kohya or comfyui")
    result.counts = {k: v for k, v in counts.items() if v}
    return sorted(items.items()), config


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


def _regroup_lora(out: OutModule, lora: LoraFile, data, result: ConvertResult):
    """(parts, rank, scale) of an output module made from row bands of LoRA modules."""
    ups, downs, shapes = [], [], set()
    scale0 = _scale(lora.modules[out.sources[0].stem])
    dtype = None
    for s in out.sources:
        m = lora.modules[s.stem]
        up, down = data[m.parts["up"]], data[m.parts["down"]]
        rank = down.shape[0]
        band = up.reshape(up.shape[0], rank)[s.start : s.stop]
        if _scale(m) != scale0:
            band = scaled(band, _scale(m) / scale0)
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


def _regroup_full(out: OutModule, lora: LoraFile, data) -> dict[str, torch.Tensor]:
    diffs, biases = [], []
    for s in out.sources:
        m = lora.modules[s.stem]
        if "diff" in m.parts:
            diffs.append((s.at, data[m.parts["diff"]][s.start : s.stop]))
        if "diff_b" in m.parts:
            biases.append((s.at, data[m.parts["diff_b"]][s.start : s.stop]))
    parts = {}
    for part, bands in (("diff", diffs), ("diff_b", biases)):
        if bands:
            first = bands[0][1]
            whole = torch.zeros(out.rows, *first.shape[1:], dtype=first.dtype)
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


# --------------------------------------------------------------------------------------------
# Metadata and output
# --------------------------------------------------------------------------------------------


def _metadata(opts, plan: Plan, lora: LoraFile, result: ConvertResult, config, input_sha: str, arch: str) -> dict[str, str]:
    meta = {k: v for k, v in lora.metadata.items() if k not in _DROPPED_METADATA}
    family = FAMILIES.get(arch)
    if family is not None:
        meta.setdefault("ss_base_model_version", family.kohya)
        meta.setdefault("modelspec.architecture", family.modelspec + "/lora")
    ranks = {m["rank"] for m in result.modules}
    if plan.flavour.alpha == "tensor":
        lycoris = any(m.algo != "lora" or m.dora or "mid" in m.parts for m in lora.modules.values())
        meta.setdefault("ss_network_module", "lycoris.kohya" if lycoris else "networks.lora")
        meta.setdefault("ss_network_dim", str(ranks.pop()) if len(ranks) == 1 and None not in ranks else "Dynamic")
    if config:
        meta["lora_adapter_metadata"] = json.dumps(_peft_config(config, plan, lora), sort_keys=True)
    meta["lorabake.convert"] = json.dumps(
        {
            "version": __version__,
            "input": {"file": os.path.basename(opts.lora), "data_sha256": input_sha},
            "to": plan.flavour.name,
            "like": os.path.basename(opts.like) if opts.like else None,
            "architecture": arch,
            "modules": result.counts,
            "alpha": {"tensor": "alpha tensors", "config": "lora_adapter_metadata",
                      "fold": "alpha/rank folded into lora_B (up)"}[plan.flavour.alpha],
            "folded": len(set(result.folded)),
        },
        separators=(",", ":"), sort_keys=True,
    )
    return meta


def _peft_config(config: dict[str, dict[str, tuple[int, float]]], plan: Plan, lora: LoraFile) -> dict:
    """PEFT LoraConfig fields: the commonest rank and alpha, patterns (anchored, escaped names) for the rest."""
    use_dora = any(m.dora for m in lora.modules.values())
    out: dict = {}
    for prefix, modules in config.items():
        r = Counter(rank for rank, _ in modules.values()).most_common(1)[0][0]
        alpha = Counter(a for _, a in modules.values()).most_common(1)[0][0]
        doc = {
            "peft_type": "LORA", "r": r, "lora_alpha": _number(alpha), "use_dora": use_dora,
            "rank_pattern": {"^" + re.escape(n): rk for n, (rk, _) in modules.items() if rk != r},
            "alpha_pattern": {"^" + re.escape(n): _number(a) for n, (_, a) in modules.items() if a != alpha},
            "target_modules": "(" + "|".join(re.escape(n) for n in sorted(modules)) + ")",
            "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "init_lora_weights": True,
            "lora_bias": any("up_bias" in lora.modules[s].parts for s in lora.modules),
        }  # fmt: skip
        if plan.flavour.config_layout == "model":
            return doc
        out.update({f"{prefix.rstrip('.')}.{k}": v for k, v in doc.items()})
    return out


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _write(opts, items, meta, result: ConvertResult, inputs, sources) -> None:
    if not items:
        raise LoraFormatError("the LoRA has no modules", path=opts.lora)
    sha = hashlib.sha256()
    for _, t in items:
        sha.update(tensor_bytes(t))
    meta["sshs_model_hash"] = sha.hexdigest()
    meta["modelspec.hash_sha256"] = "0x" + sha.hexdigest()
    entries = [(name, dtypes.tag_of(t.dtype), tuple(t.shape)) for name, t in items]
    with SafetensorsWriter(opts.output, entries, meta, inputs=inputs, sources=sources, force=opts.force) as w:
        for name, t in items:
            w.write(name, t.contiguous())
    result.output, result.sha256, result.data_sha256, result.metadata = opts.output, w.sha256, w.data_sha256, meta


def summary_lines(result: ConvertResult) -> list[str]:
    opts = result.options
    done = ", ".join(f"{n} {k}" for k, n in sorted(result.counts.items())) or "none"
    lines = [f"convert: {opts.lora} -> {result.output} ({opts.to} names, {result.architecture})",
             f"modules: {len(result.modules)} ({done}); names from {result.reference}"]
    if result.folded:
        lines.append(f"scale folded into lora_B (up): {len(set(result.folded))} module(s)")
    lines.append(f"sha256: {result.sha256}")
    return lines


def result_json(result: ConvertResult) -> dict:
    return {"command": "convert", "input": result.options.lora, "output": result.output, "to": result.options.to,
            "like": result.options.like, "architecture": result.architecture, "counts": result.counts,
            "folded": sorted(set(result.folded)), "sha256": result.sha256, "data_sha256": result.data_sha256,
            "modules": result.modules}
