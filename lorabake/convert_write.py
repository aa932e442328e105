"""`lorabake convert`, the output: the metadata (provenance, PEFT config, UI keys), the write and the summary."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter

from lorabake import __version__, dtypes
from lorabake.adapters import lokr
from lorabake.arch import FAMILIES
from lorabake.convert_plan import Plan
from lorabake.errors import LoraFormatError
from lorabake.lora_format import LoraFile
from lorabake.st_writer import SafetensorsWriter, tensor_bytes

# metadata of the input that describes its bytes or its PEFT config: recomputed, never copied
_DROPPED_METADATA = ("lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


# --------------------------------------------------------------------------------------------
# Metadata and output
# --------------------------------------------------------------------------------------------


def metadata(opts, plan: Plan, lora: LoraFile, result, config, input_sha: str, arch: str) -> dict[str, str]:
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
            "input": {"file": os.path.basename(opts.lora), "data_sha256": input_sha, "strength": opts.strength,
                      **({"te_strength": opts.te_strength} if opts.te_strength is not None else {}),
                      **({"blocks": opts.blocks} if opts.blocks else {})},
            "dtype": opts.dtype,
            "weighted": len(result.weighted),
            "removed": len(result.removed),
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


def _peft_config(config: dict[str, dict[str, tuple]], plan: Plan, lora: LoraFile) -> dict:
    """PEFT config fields, per component: a LoraConfig (a LoKrConfig for LoKr modules), the commonest rank and
    alpha, patterns (anchored, escaped names) for the rest."""
    out: dict = {}
    for prefix, entries in config.items():
        if len({shapes is None for _, _, shapes in entries.values()}) > 1:
            raise LoraFormatError(f"{prefix!r} has LoRA and LoKr modules; a PEFT config is one type for a model",
                                  path=lora.path, hint="convert to kohya or comfyui, which carry both as they are")
        if next(iter(entries.values()))[2] is not None:
            modules, alpha_key, fields = _lokr_fields(prefix, entries, lora)
        else:
            modules, alpha_key = {n: (rk, a) for n, (rk, a, _) in entries.items()}, "lora_alpha"
            fields = {
                "peft_type": "LORA", "use_dora": any(m.dora for m in lora.modules.values()), "lora_dropout": 0.0,
                "bias": "none", "use_rslora": False, "init_lora_weights": True,
                "lora_bias": any("up_bias" in lora.modules[s].parts for s in lora.modules),
            }  # fmt: skip
        r = Counter(rank for rank, _ in modules.values()).most_common(1)[0][0]
        alpha = Counter(a for _, a in modules.values()).most_common(1)[0][0]
        doc = {
            "peft_type": fields.pop("peft_type"), "r": r, alpha_key: _number(alpha),
            "rank_pattern": {"^" + re.escape(n): rk for n, (rk, _) in modules.items() if rk != r},
            "alpha_pattern": {"^" + re.escape(n): _number(a) for n, (_, a) in modules.items() if a != alpha},
            "target_modules": "(" + "|".join(re.escape(n) for n in sorted(modules)) + ")",
            **fields,
        }  # fmt: skip
        if plan.flavour.config_layout == "model":
            return doc
        out.update({f"{prefix.rstrip('.')}.{k}": v for k, v in doc.items()})
    return out


def _lokr_fields(prefix: str, entries: dict[str, tuple], lora: LoraFile):
    """({module: (r, alpha)}, "alpha", LoKrConfig's other fields): r as PEFT needs it to rebuild each module's
    factors, alpha = the module's scale × r (PEFT scales by alpha/r)."""
    factor, both, ranks = lokr.peft_layout({n: shapes for n, (_, _, shapes) in entries.items()})
    if factor is None:
        raise LoraFormatError(
            f"module {prefix + ranks!r} is LoKr with factors PEFT's LoKrConfig cannot rebuild (a Tucker or conv w2, "
            "ranks that differ between w1 and w2, or sides PEFT would store whole)", path=lora.path,
            hint="convert to kohya or comfyui, which carry LyCORIS modules as they are")
    modules = {n: (ranks[n], scale * ranks[n]) for n, (_, scale, _) in entries.items()}
    fields = {"peft_type": "LOKR", "decompose_both": both, "decompose_factor": factor, "use_effective_conv2d": False,
              "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True}
    return modules, "alpha", fields


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def write(opts, items, meta, result, inputs, sources) -> None:
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


def summary_lines(result) -> list[str]:
    opts = result.options
    done = ", ".join(f"{n} {k}" for k, n in sorted(result.counts.items())) or "none"
    lines = [f"convert: {opts.lora} -> {result.output} ({opts.to} names, {result.architecture})",
             f"modules: {len(result.modules)} ({done}); names from {result.reference}"]
    if result.folded:
        lines.append(f"scale folded into lora_B (up): {len(set(result.folded))} module(s)")
    if result.weighted or result.removed:
        lines.append(f"strengths folded into the factors: {len(result.weighted)} module(s); "
                     f"removed at strength 0: {len(result.removed)} module(s)")
    lines.append(f"sha256: {result.sha256}")
    return lines


def result_json(result) -> dict:
    return {"command": "convert", "input": result.options.lora, "output": result.output, "to": result.options.to,
            "like": result.options.like, "architecture": result.architecture, "counts": result.counts,
            "folded": sorted(set(result.folded)),
            "weighted": result.weighted, "removed": result.removed, "sha256": result.sha256, "data_sha256": result.data_sha256,
            "modules": result.modules}
