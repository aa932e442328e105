"""`extract --all-modules`: what a LoRA cannot carry, kept as full deltas.

A LoRA is a pair of 2-D (or 4-D conv) factors on a `.weight`. A fine-tune also changes tensors that are not:
a block's `modulation` parameter (Wan: [1, 6, dim], a bare parameter), 5-D Conv3d patch embeddings, norms,
biases, `scale_shift_table`s. They are written whole, the way lightx2v's distill LoRAs write them and
`lorabake.adapters.full` reads them back:

* `<stem>.diff_m`: a parameter the family names by its block (its rename table to `MODULATION_NAMING`), as
  lightx2v writes `blocks.0.diff_m` for `blocks.0.modulation`;
* `<stem>.diff_b`: a bias, on its weight's stem (beside that module's LoRA factors when it has them);
* `<stem>.diff`: anything else, on the tensor's own stem. A 5-D patch embedding could be a LoCon, but it is
  small and its full delta is exact.

The stem's prefix and naming are the family's kohya ones (`Family.kohya_names`), as for the LoRA modules,
and every name is checked to load back onto its tensor (`KeyMap.targets`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from lorabake.adapters.full import MODULATION_NAMING
from lorabake.arch import FAMILIES
from lorabake.arch.common import BIAS_PARAMS, WEIGHT_PARAMS
from lorabake.detect import CheckpointInfo
from lorabake.errors import MatchError, OutputError
from lorabake.keymap import KeyMap, names_of
from lorabake.st_header import TensorInfo


@dataclass
class FullDelta:
    stem: str
    part: str  # "diff" | "diff_b" | "diff_m"
    key: str
    component: str
    max_abs: float
    diff: torch.Tensor = field(repr=False, default=None)


def full_name(
    keymap: KeyMap, info: CheckpointInfo, tensors: Mapping[str, TensorInfo], key: str, root: str, component: str
) -> tuple[str, str] | None:
    """(stem, part) the full delta of base tensor `key` is written as, or None when no name loads back onto it."""
    rel = key[len(root) :]
    head, _, param = rel.rpartition(".")
    if param in BIAS_PARAMS:
        weights = [f"{root}{head}.{w}" for w, b in WEIGHT_PARAMS.items() if b == param]
        for weight in (w for w in weights if w in tensors):
            stem = _own_stem(keymap, weight)
            if stem is not None and keymap.targets[stem].bias_key == key:
                return stem, "diff_b"
        return None
    module = head if param in WEIGHT_PARAMS and head else rel  # a bare parameter is its own module
    family = FAMILIES.get(info.arch)
    flavour = family.kohya_names.get(component) if family else None
    if flavour:
        prefix = flavour[0]
        for name in names_of({module: None}, info.naming, family.renames)[module]:
            if name.naming != MODULATION_NAMING:
                continue
            stem = prefix + (name.name.replace(".", "_") if prefix.endswith("_") else name.name)
            if _lands_whole(keymap, stem, key):
                return stem, "diff_m"
    stem = _own_stem(keymap, key)
    return None if stem is None else (stem, "diff")


def _own_stem(keymap: KeyMap, key: str) -> str | None:
    return next((s for s in keymap.kohya_names.get(key, ()) if _lands_whole(keymap, s, key)), None)


def _lands_whole(keymap: KeyMap, stem: str, key: str) -> bool:
    target = keymap.targets.get(stem)
    return target is not None and target.key == key and target.slice is None and target.transform is None


def full_delta(
    stem: str, part: str, key: str, component: str, dw: torch.Tensor, *, min_diff: float, out_dtype: torch.dtype,
    tuned_path: str = "",
) -> FullDelta | None:
    """The delta `dw` as written (in `out_dtype`), or None when max|ΔW| ≤ `min_diff`."""
    max_abs = float(dw.abs().max())
    if max_abs != max_abs or max_abs == float("inf"):
        raise MatchError("ΔW contains NaN or Inf", path=tuned_path, tensor=key, hint="one of the checkpoints is corrupt")
    if max_abs <= min_diff:
        return None
    diff = dw.to(out_dtype)
    if not bool(torch.isfinite(diff).all()):
        raise OutputError(f"the full delta of {key} overflows {out_dtype}", tensor=f"{stem}.{part}",
                          hint="use --dtype bf16 or fp32")
    return FullDelta(stem, part, key, component, max_abs, diff.cpu().contiguous())
