"""`lorabake inspect`: what a file is, from its header (plus alpha scalars), as a JSON-able dict.

Schema (stable; documented in the README):
- every file: path, kind ("checkpoint" | "lora"), architecture, size, tensors, metadata, and with
  --hash: sha256, autov2, data_sha256, sshs_model_hash_matches (null when the file stores none).
- checkpoint: layout, prefix, candidates, components {name: {kind, root, params, tensors, dtypes}},
  params, dtypes, notes.
- lora: architecture_source, architecture_note, architecture_candidates, flavour, flavours, algorithms, modules,
  components, ranks, alphas, scales, dora_modules, unknown_keys, training, top_tags, and with
  --against: coverage {base, base_architecture, applied, skipped, unmatched, details, and with --keys: keys}.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter

from lorabake import lora_format
from lorabake.detect import detect_checkpoint
from lorabake.explain import key_rows
from lorabake.jobs import entry_toml, recipe_from_metadata
from lorabake.lora_base import identify, module_component_hint
from lorabake.st_reader import SafetensorsReader, check_input_path

# Training metadata worth showing, in this order (kohya `ss_*` keys).
TRAINING_KEYS = (
    "ss_base_model_version",
    "ss_sd_model_name",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_learning_rate",
    "ss_unet_lr",
    "ss_text_encoder_lr",
    "ss_optimizer",
    "ss_lr_scheduler",
    "ss_epoch",
    "ss_num_epochs",
    "ss_steps",
    "ss_max_train_steps",
    "ss_num_train_images",
    "ss_resolution",
    "ss_mixed_precision",
    "ss_training_started_at",
    "ss_training_finished_at",
    "modelspec.architecture",
    "modelspec.title",
)
TOP_TAGS = 15
HASH_CHUNK = 8 << 20


def inspect_file(
    path: str, *, with_hash: bool = False, against: str | None = None, keys: bool = False
) -> dict:
    """The report of one file; with `against` (LoRAs) the merge preflight, with `keys` one row per module."""
    if not os.path.isdir(path):
        check_input_path(path)
    if path.lower().endswith(".gguf"):
        from lorabake.quant.gguf_file import open_gguf  # torch and gguf only for GGUF files
        from lorabake.quant.report import gguf_report

        with open_gguf(path) as base:
            report = _checkpoint_report(base)
            report["quantization"] = gguf_report(base.entries)
        return report
    with SafetensorsReader(path) as reader:
        if lora_format.looks_like_lora(reader.tensors):
            report = _lora_report(reader, against, keys=keys)
        else:
            report = _checkpoint_report(reader)
        if with_hash:
            report.update(file_hashes(reader))
    return report


def _common(reader: SafetensorsReader, kind: str) -> dict:
    return {
        "path": reader.path,
        "kind": kind,
        "size": reader.file_size,
        "tensors": len(reader.tensors),
    }


def _checkpoint_report(reader: SafetensorsReader) -> dict:
    info = detect_checkpoint(reader.tensors, reader.metadata)
    dtype_counts = Counter(t.dtype for t in reader.tensors.values())
    report = _common(reader, "checkpoint")
    report.update(
        {
            "architecture": info.arch,
            "layout": info.layout if reader.layout == "file" else reader.layout,
            "prefix": info.prefix,
            "candidates": list(info.candidates),
            "components": {
                name: {
                    "kind": c.kind,
                    "root": c.root,
                    "params": c.params,
                    "tensors": c.tensors,
                    "dtypes": dict(c.dtypes),
                }
                for name, c in info.components.items()
            },
            "params": sum(t.numel for t in reader.tensors.values()),
            "dtypes": dict(dtype_counts),
            "notes": list(info.notes),
            "metadata": dict(reader.metadata),
        }
    )
    recipe = recipe_from_metadata(reader.metadata)
    if recipe is not None:  # made by `lorabake bake`: the entry that rebuilds it
        recipe["toml"] = entry_toml(recipe["entry"]) if isinstance(recipe["entry"], dict) else None
        report["recipe"] = recipe
    quantized = "_quantization_metadata" in reader.metadata or any(
        n.endswith((".comfy_quant", ".scale_weight", ".weight_scale")) for n in reader.tensors)
    if isinstance(reader, SafetensorsReader) and quantized:  # the codecs import torch: only when needed
        from lorabake.quant.comfy import find_layers
        from lorabake.quant.report import comfy_report

        layers = find_layers(reader.tensors, reader.metadata, reader.read_bytes, path=reader.path)
        if layers:
            report["quantization"] = comfy_report(reader.tensors, layers)
    return report


def _lora_report(reader: SafetensorsReader, against: str | None, *, keys: bool = False) -> dict:
    parsed = lora_format.parse_lora(reader.tensors, reader.metadata, path=reader.path, read=reader.read_bytes)
    lora, match = identify(parsed, reader.tensors)
    alphas = read_alphas(reader, lora)
    ranks = Counter(m.rank for m in lora.modules.values() if m.rank is not None)
    alpha_counts = Counter(_fmt(a) for a in alphas.values() if a is not None)
    scales = Counter(_fmt(m.scale) for m in lora.modules.values() if m.scale is not None)
    components = Counter(module_component_hint(s) or "?" for s in lora.modules)
    report = _common(reader, "lora")
    report.update(
        {
            "architecture": lora.arch,
            "architecture_source": lora.arch_source,
            "architecture_note": lora.arch_note,
            "architecture_candidates": [
                {"architecture": c.arch, "matched": c.matched, "unmatched": c.unmatched}
                for c in match.candidates
            ],
            "flavour": lora.flavour,
            "flavours": dict(lora.flavours),
            "algorithms": dict(Counter(m.algo for m in lora.modules.values())),
            "modules": len(lora.modules),
            "components": dict(components),
            "ranks": {str(k): v for k, v in sorted(ranks.items())},
            "alphas": dict(alpha_counts),
            "scales": dict(scales),
            "dora_modules": sum(1 for m in lora.modules.values() if m.dora),
            "unknown_keys": list(lora.unknown_keys),
            "training": {k: reader.metadata[k] for k in TRAINING_KEYS if k in reader.metadata},
            "top_tags": top_tags(reader.metadata),
            "metadata": dict(reader.metadata),
        }
    )
    if against:
        module_scales = {stem: m.scale for stem, m in lora.modules.items()}
        report["coverage"] = coverage(reader.path, against, keys=keys, alphas=alphas, scales=module_scales)
    return report


def read_alphas(reader: SafetensorsReader, lora) -> dict[str, float | None]:
    """stem -> the module's alpha tensor's value, None without one (PEFT files: their config gives
    the scale, shown under `scales`). `lora` must have been parsed with `read=`."""
    return {stem: module.alpha for stem, module in lora.modules.items()}


def top_tags(metadata: dict[str, str]) -> list[list]:
    """Most frequent training tags from kohya's `ss_tag_frequency` ({dataset: {tag: count}})."""
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return []
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # a display nicety: unreadable tags are no tags
        return []
    total: Counter = Counter()
    if isinstance(doc, dict):
        for tags in doc.values():
            if isinstance(tags, dict):
                for tag, count in tags.items():
                    if isinstance(count, int) or (isinstance(count, float) and math.isfinite(count)):
                        total[str(tag).strip()] += int(count)
    return [[tag, count] for tag, count in total.most_common(TOP_TAGS)]


def coverage(
    lora_path: str, base_path: str, *, keys: bool = False, alphas: dict | None = None, scales: dict | None = None
) -> dict:
    """The merge preflight for one LoRA at strength 1: applied / skipped / unmatched per component.

    With `keys`, "keys" lists every module: where it lands (tensor, rows), the family rule that sent it
    there, algorithm, rank, alpha and scale; an unmatched one lists the nearest base names.
    """
    from lorabake.ops import open_inputs
    from lorabake.plan import LoraSpec, plan_merge

    spec = LoraSpec(lora_path)
    base, readers = open_inputs(base_path, (spec,))
    try:
        plan = plan_merge(base, [spec], readers, require_change=False)
    finally:
        base.close()
        for r in readers:
            r.close()
    lp = plan.loras[0]
    counts = lp.counts()
    report = {
        "base": base_path,
        "base_architecture": plan.info.arch,
        "applied": counts.get("applied", {}),
        "skipped": counts.get("skipped", {}),
        "unmatched": counts.get("unmatched", {}),
        "details": [
            {"module": o.stem, "status": o.status, "component": o.component, "reason": o.reason}
            for o in lp.outcomes
            if o.status != "applied"
        ],
    }
    if keys:
        report["keys"] = key_rows(plan, alphas or {}, scales or {})
    return report


def file_hashes(reader: SafetensorsReader) -> dict:
    """SHA-256 of the file, AutoV2 (its first 10 hex digits), SHA-256 of the data section (kohya's
    `sshs_model_hash` definition), and whether a stored `sshs_model_hash` matches the bytes."""
    if len(reader.headers) != 1:
        return {"sha256": None, "autov2": None, "data_sha256": None, "sshs_model_hash_matches": None}
    header = reader.headers[0]
    whole = hashlib.sha256()
    data = hashlib.sha256()
    with open(header.path, "rb", buffering=0) as fh:
        pos = 0
        while True:
            chunk = fh.read(HASH_CHUNK)
            if not chunk:
                break
            whole.update(chunk)
            if pos + len(chunk) > header.data_offset:
                data.update(chunk[max(0, header.data_offset - pos) :])
            pos += len(chunk)
    sha = whole.hexdigest()
    stored = reader.metadata.get("sshs_model_hash")
    return {
        "sha256": sha,
        "autov2": sha[:10],
        "data_sha256": data.hexdigest(),
        "sshs_model_hash_matches": None
        if stored is None
        else stored.lower().removeprefix("0x") == data.hexdigest(),
    }


def _fmt(x: float) -> str:
    return f"{x:g}"
