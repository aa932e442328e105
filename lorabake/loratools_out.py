"""`combine`/`resize`, the output: metadata (provenance, kohya keys), the write, and the summary."""

from __future__ import annotations

import hashlib
import json
import os

from lorabake import __version__, dtypes
from lorabake.lora_format import LoraFile
from lorabake.st_writer import SafetensorsWriter, tensor_bytes

# metadata keys that say which base a LoRA is for: carried over when every input agrees
_BASE_KEYS = ("ss_base_model_version", "modelspec.architecture", "ss_v2")


def write(opts, items, result, loras: list[LoraFile], input_shas: list[str], sources=()) -> None:
    sha = hashlib.sha256()
    for _, t in items:
        sha.update(tensor_bytes(t))
    digest = sha.hexdigest()
    meta = _metadata(opts, result, loras, input_shas)
    meta["sshs_model_hash"] = digest
    meta["modelspec.hash_sha256"] = "0x" + digest
    entries = [(name, dtypes.tag_of(t.dtype), tuple(t.shape)) for name, t in items]
    inputs = [s.path for s in opts.inputs] + [f for src in sources for f in src.files()]
    with SafetensorsWriter(opts.output, entries, meta, inputs=inputs, sources=list(sources), force=opts.force) as w:
        for name, t in items:
            w.write(name, t)
    result.output = opts.output
    result.sha256 = w.sha256
    result.data_sha256 = w.data_sha256
    result.metadata = meta


def _metadata(opts, result, loras: list[LoraFile], input_shas: list[str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for key in _BASE_KEYS:
        values = {lo.metadata[key] for lo in loras if key in lo.metadata}
        if len(values) == 1:
            meta[key] = values.pop()
    ranks = {m.rank_out for m in result.modules}
    dim = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    meta.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": dim,
            "ss_network_alpha": dim,
            "ss_training_comment": f"lorabake {opts.command}",
        }
    )
    meta[f"lorabake.{opts.command}"] = json.dumps(
        {
            "version": __version__,
            "inputs": [
                {"file": os.path.basename(s.path), "data_sha256": h, "strength": s.strength,
                 "te_strength": s.te_strength, **({"blocks": s.blocks} if s.blocks else {})}
                for s, h in zip(opts.inputs, input_shas)
            ],
            **({"base": os.path.basename(opts.base)} if opts.base else {}),
            "from_base": sum(1 for m in result.modules if "from the base" in m.action),
            "rank": opts.rank,
            "rank_mode": opts.rank_mode,
            "rank_param": opts.rank_param,
            "modules": len(result.modules),
            "error": round(result.overall_error, 8),
        },
        separators=(",", ":"),
    )
    return meta


def summary_lines(result) -> list[str]:
    """The plain summary printed after a run."""
    opts = result.options
    ranks = [m.rank_out for m in result.modules]
    counts: dict[str, int] = {}
    for m in result.modules:
        counts[m.action] = counts.get(m.action, 0) + 1
    done = ", ".join(f"{n} {action}" for action, n in sorted(counts.items()))
    worst = max(result.modules, key=lambda m: m.error, default=None)
    lines = [
        f"{opts.command}: {len(opts.inputs)} input(s) -> {result.output}",
        f"modules: {len(result.modules)} ({done}); rank {min(ranks, default=0)}..{max(ranks, default=0)}",
        f"error: {result.overall_error:.3e} overall (relative Frobenius, exact)",
    ]
    if worst is not None and worst.error > 0:
        lines.append(f"largest module error: {worst.error:.3e} in {worst.stem}")
    lines.append(f"sha256: {result.sha256}")
    return lines


def result_json(result) -> dict:
    """The `--json` document."""
    ranks = [m.rank_out for m in result.modules]
    return {
        "command": result.options.command,
        "output": result.output,
        "inputs": [s.path for s in result.options.inputs],
        "modules": len(result.modules),
        "rank_min": min(ranks) if ranks else None,
        "rank_max": max(ranks) if ranks else None,
        "error": result.overall_error,
        "sha256": result.sha256,
        "data_sha256": result.data_sha256,
        "per_module": [
            {"stem": m.stem, "shape": list(m.shape), "rank_in": m.rank_in, "rank": m.rank_out,
             "norm": m.norm, "error": m.error, "action": m.action}
            for m in result.modules
        ],
    }
