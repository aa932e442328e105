"""Where a LoRA's change sits: ‖ΔW‖²_F per block (`inspect LORA --blocks`), to choose per-block strengths.

Plain LoRA/LoCon modules are measured from their factors without forming ΔW
(‖s·U D‖² = s²·Σ (UᵀU ⊙ D Dᵀ)); other linear types (LoHa, LoKr, full, Tucker) through their ΔW, one
module at a time. Weight-dependent types (OFT, GLoRA, IA3, …) have no ΔW without a base and are
counted apart. Blocks come from the LoRA's family (`lorabake.blocks.lora_factors`' virtual checkpoint).
"""

from __future__ import annotations

import math

import torch

from lorabake import adapters, blocks, delta
from lorabake.adapters.scale import scale_of
from lorabake.detect import detect_checkpoint
from lorabake.lora_base import identify, virtual_targets
from lorabake.lora_format import LoraFile, parse_lora
from lorabake.st_reader import SafetensorsReader, check_input_path
from lorabake.types import TEXT_ENCODERS, LoraModule

OUTSIDE = "(no block)"


def block_energy(path: str) -> dict:
    """{"architecture", "blocks": [{"block", "modules", "energy", "share"}], "unmeasured": [stems]}."""
    check_input_path(path)
    reader = SafetensorsReader(path)
    try:
        lora, _ = identify(parse_lora(reader.tensors, reader.metadata, path=path), reader.tensors)
        header, targets = virtual_targets(lora)
        block_of = blocks.block_map(header, detect_checkpoint(header)) if header else {}
        rows: dict[str, list[float]] = {}
        unmeasured = []
        for stem, module in lora.modules.items():
            energy = _energy(reader, lora, module)
            if energy is None:
                unmeasured.append(stem)
                continue
            target = targets.get(stem)
            if target is None:
                where = "(not placed)"
            elif target.component in TEXT_ENCODERS:
                where = target.component
            else:
                where = block_of.get(target.key, OUTSIDE)
            row = rows.setdefault(where, [0, 0.0])
            row[0] += 1
            row[1] += energy
    finally:
        reader.close()
    total = sum(e for _, e in rows.values()) or 1.0
    order = sorted(rows, key=lambda b: (b in TEXT_ENCODERS or b.startswith("("), blocks.block_order(b)))
    return {
        "path": path,
        "architecture": lora.arch,
        "blocks": [{"block": b, "modules": rows[b][0], "energy": rows[b][1], "share": rows[b][1] / total} for b in order],
        "unmeasured": unmeasured,
    }


def _energy(reader: SafetensorsReader, lora: LoraFile, module: LoraModule) -> float | None:
    """‖ΔW‖²_F of one module at strength 1 (its own scale included); None for weight-dependent types."""
    if module.algo in adapters.WEIGHT_DEPENDENT_ALGOS:
        return None
    parts = {p: reader.read(k) for p, k in module.parts.items() if p not in adapters.BIAS_PARTS}
    scalars = {p: float(parts[p].float().reshape(-1)[0]) for p in ("alpha", "scale") if p in parts}
    rank = adapters.rank_of(module.algo, {p: tuple(t.shape) for p, t in parts.items()})
    scale = scale_of(rank=rank, alpha=scalars.get("alpha"), scale_part=scalars.get("scale"), peft=lora.peft_scales.get(module.stem))
    if module.algo == "lora" and set(parts) <= {"up", "down", "alpha", "scale"}:
        up = parts["up"].double().flatten(1)
        down = parts["down"].double().flatten(1)
        return float(((up.T @ up) * (down @ down.T)).sum()) * scale * scale
    shape = adapters.delta_shape(module.algo, {p: tuple(t.shape) for p, t in parts.items()})
    if shape is None:
        return None
    dw = delta.delta(module.algo, parts, out_shape=shape, scale=scale)
    value = float(torch.linalg.vector_norm(dw.double()) ** 2)
    return value if math.isfinite(value) else None
