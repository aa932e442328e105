"""The key grammar of LoRA files: which adapter part a key is, and of which module (its stem).

The rows come from the adapter modules (`lorabake.adapters.SUFFIXES`); they are matched longest
first, after stripping PEFT's adapter-name infix. Two rows carry a guard on the stem, because their
suffix alone would also match checkpoint names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from lorabake.adapters import PART_NAMES, SUFFIXES

_GUARDS = {
    # old attn-proc spells `to_q_lora`, `to_out_lora`: the stem's last segment is `to_*`
    "attnproc": lambda stem: stem.rpartition(".")[2].startswith("to_"),
    # XLabs puts its factors under `<block>.processor.<name>`
    "xlabs": lambda stem: ".processor." in stem,
}

_SUFFIXES_LONGEST_FIRST = tuple(sorted(SUFFIXES, key=lambda s: -len(s.text)))
_ANY_SUFFIX = tuple(row.text for row in _SUFFIXES_LONGEST_FIRST)  # one C call rules out most checkpoint keys

# PEFT writes `<module>.lora_A.<adapter>.weight` in raw dumps; `.default`/`.default_N` is the
# adapter name PEFT and DiffSynth use, and DiffSynth-Studio's Qwen-Image LoRAs nest it once more
# (`lora_A.default_0.default.weight`, DiffSynth-Studio #886). Strip it before suffix matching.
_ADAPTER_INFIX = re.compile(
    r"\.(lora_A|lora_B|lora_magnitude_vector)\.default(?:_\d+)?(?:\.default)?(?=\.weight$|\.bias$|$)"
)


def split(key: str, keys: Mapping[str, object]) -> tuple[str, str, str | None] | None:
    """(stem, part, spelling) of `key`, or None when no suffix fits."""
    norm = _ADAPTER_INFIX.sub(r".\1", key) if ".default" in key else key
    if norm.endswith(_ANY_SUFFIX):
        for row in _SUFFIXES_LONGEST_FIRST:
            if norm.endswith(row.text) and len(norm) > len(row.text):
                stem = norm[: -len(row.text)]
                if row.requires and not _GUARDS[row.requires](stem):
                    continue
                return stem, row.part, row.spelling
    if key.endswith(".weight") and key[: -len(".weight")] + ".on_input" in keys:
        return key[: -len(".weight")], "ia3_weight", None
    return None


def split_key(key: str, keys: Mapping[str, object] | None = None) -> tuple[str, str] | None:
    """(stem, canonical part) of one LoRA key, or None for an unknown suffix.

    `keys` (all keys of the file) is only needed to recognise an IA3 `<stem>.weight`, which is
    one only when `<stem>.on_input` exists.
    """
    hit = split(key, keys or {})
    return (hit[0], hit[1]) if hit else None


# Parts only adapter files have (checkpoints end in .weight/.bias/.scale).
_DISTINCTIVE_PARTS = frozenset(PART_NAMES) - {"scale"}


def looks_like_lora(tensors: Mapping[str, object]) -> bool:
    """True when at least half the keys are adapter parts: a LoRA, not a checkpoint.

    Checkpoints never end keys in `lora_up.weight`, `lora_A.weight`, `hada_w1_a`, `alpha`, ...;
    the half threshold keeps a checkpoint with a stray leftover adapter tensor a checkpoint.
    """
    if not tensors:
        return False
    # Only a key with an adapter suffix or PEFT's infix can be a part, and a plain `.weight` only
    # beside an IA3 `.on_input` (a suffix): one C call per key for the 10^6 names of a checkpoint.
    maybe = [k for k in tensors if k.endswith(_ANY_SUFFIX) or ".default" in k]
    if any(k.endswith(".on_input") for k in maybe):
        maybe = list(tensors)
    hits = 0
    for key in maybe:
        hit = split(key, tensors)
        if hit is not None and hit[1] in _DISTINCTIVE_PARTS:
            hits += 1
    return 2 * hits >= len(tensors)
