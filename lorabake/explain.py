"""Where every LoRA module goes, and why: the rows of `inspect LORA --against BASE --keys`.

One row per module of the plan: its stem, what became of it, the base tensor and row span it lands
on, the family rule that sent it there (`KeyMap.rules`), algorithm, rank, alpha and scale. A module
that matches no name lists the nearest names the base's rule table does accept, with their tensors.
"""

from __future__ import annotations

import difflib
import re
from collections import defaultdict
from collections.abc import Mapping

from lorabake.keymap import KeyMap
from lorabake.plan import MergePlan

NEAREST = 3
_WORDS = re.compile(r"[._]")


def key_rows(
    plan: MergePlan, alphas: Mapping[str, float | None], scales: Mapping[str, float | None]
) -> list[dict]:
    """One dict per module of the plan's first LoRA (JSON-ready); `alphas`/`scales` as the file gives them."""
    keymap = plan.keymap
    lp = plan.loras[0]
    nearest = _Nearest(keymap)
    rows = []
    for outcome in lp.outcomes:
        module = lp.lora.modules.get(outcome.stem)
        target = keymap.targets.get(outcome.stem)
        rule = keymap.rules.get(outcome.stem)
        alpha = alphas.get(outcome.stem)
        rank = module.rank if module else None
        row = {
            "module": outcome.stem,
            "status": outcome.status,
            "component": outcome.component,
            "tensor": target.key if target else None,
            "rows": [target.slice.start, target.slice.start + target.slice.length]
            if target and target.slice
            else None,
            "transform": target.transform if target else None,
            "family": rule.family if rule else None,
            "table": rule.table if rule else None,
            "rule": rule.row if rule else None,
            "prefix": rule.prefix if rule else None,
            "algorithm": module.algo if module else None,
            "rank": rank,
            "alpha": alpha,
            "scale": scales.get(outcome.stem) if module else None,
            "reason": outcome.reason,
        }
        if outcome.status == "unmatched" and target is None:
            row["nearest"] = nearest(outcome.stem)
        rows.append(row)
    return rows


class _Nearest:
    """The rule table's stems closest to a stem that is not in it, searched among those named alike."""

    def __init__(self, keymap: KeyMap) -> None:
        self.keymap = keymap
        self.by_tail: dict[str, list[str]] | None = None

    def __call__(self, stem: str) -> list[dict]:
        if self.by_tail is None:
            self.by_tail = defaultdict(list)
            for known in self.keymap.targets:
                for words in _keys(known):
                    self.by_tail[words].append(known)
        pool = next((self.by_tail[w] for w in _keys(stem) if w in self.by_tail), [])
        close = difflib.get_close_matches(stem, pool, n=NEAREST * 4, cutoff=0.5)
        out, seen = [], set()
        for known in close:
            key = self.keymap.targets[known].key
            if key not in seen:
                seen.add(key)
                out.append({"module": known, "tensor": key})
            if len(out) == NEAREST:
                break
        return out


def _keys(stem: str) -> tuple[str, str, str]:
    """Where to look for a stem's neighbours, nearest first: stems ending in the same two words
    (`…attn2_to_k` -> "to_k"), in the same last word, or starting with the same five words."""
    words = _WORDS.split(stem)
    return ("_".join(words[-2:]), words[-1], "^" + "_".join(words[:5]))
