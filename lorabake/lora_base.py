"""Which family a LoRA is for, decided by matching: every family's rule table against the LoRA's modules.

A LoRA alone has no checkpoint to match, so each family's declared `structures` (plus its text
encoders' kinds) are expanded into a virtual checkpoint header — names and shapes, no data — and its
rule table is built with `build_keymap`, exactly as for a real base. A module matches a family when
its stem is in the table and its ΔW fits the target's shape. The family leaving the fewest modules
unmatched wins; the LoRA's metadata only breaks ties; a tie it does not break is "ambiguous", with
the candidates. No regex and no layer width decides a family on its own.

With a base given (merge, `inspect --against`) none of this runs: the base's family decides.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from lorabake import adapters
from lorabake.arch import FAMILIES, TEXT_ENCODER_KINDS
from lorabake.arch.common import Family
from lorabake.detect import arch_from_metadata, detect_checkpoint
from lorabake.errors import LoraFormatError
from lorabake.keymap import KeyMap, build_keymap
from lorabake.st_header import TensorInfo
from lorabake.types import LoraModule, Target

# A family is named only when it leaves at most this share of the LoRA's modules unmatched: a LoRA for
# another model that happens to share a few names (a DiT's attn.to_q) is not called that family.
MAX_UNMATCHED_SHARE = 0.1
_BRACES = re.compile(r"\{([^}]*)\}")


@dataclass(frozen=True)
class Candidate:
    arch: str
    matched: int
    unmatched: int


@dataclass(frozen=True)
class BaseMatch:
    """The family a LoRA was trained for. `source`: "rule tables" | "metadata" | None (unknown)."""

    arch: str  # family id or "unknown"
    source: str | None
    note: str | None
    candidates: tuple[Candidate, ...] = ()  # families matching at least one module, best first
    ambiguous: bool = False


def match_lora(
    modules: Mapping[str, LoraModule], tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str]
) -> BaseMatch:
    """The family whose rule table leaves the fewest of `modules` unmatched; metadata breaks ties."""
    said = arch_from_metadata(metadata)
    scored = []
    for family in FAMILIES.values():
        matched = max(
            _count(modules, tensors, keymap, base) for base, keymap in _virtual_keymaps(family.arch)
        )
        if matched:
            scored.append(Candidate(family.arch, matched, len(modules) - matched))
    scored.sort(key=lambda c: c.unmatched)
    candidates = tuple(scored)
    if not candidates or candidates[0].unmatched > MAX_UNMATCHED_SHARE * len(modules):
        near = _describe(candidates[:3], len(modules))
        if said:
            note = f"its modules do not match the {said} rule table ({near})" if candidates else None
            return BaseMatch(said, "metadata", note, candidates)
        note = f"no family's rule table matches its modules ({near})" if candidates else None
        return BaseMatch("unknown", None, note, candidates)
    best = [c for c in candidates if c.unmatched == candidates[0].unmatched]
    if len(best) > 1:
        if said in {c.arch for c in best}:
            return BaseMatch(said, "rule tables", None, candidates)
        listed = ", ".join(c.arch for c in best)
        note = f"ambiguous: {listed} match {best[0].matched} of {len(modules)} modules alike; metadata does not say"
        return BaseMatch("unknown", None, note, candidates, ambiguous=True)
    arch = best[0].arch
    note = None
    if said and said != arch:
        note = f"metadata names {said} but its modules match the {arch} rule table ({_describe(candidates[:3], len(modules))})"
    return BaseMatch(arch, "rule tables", note, candidates)


def _describe(candidates: tuple[Candidate, ...], total: int) -> str:
    return ", ".join(f"{c.arch}: {c.matched} of {total} modules" for c in candidates) or "none"


def _count(
    modules: Mapping[str, LoraModule],
    tensors: Mapping[str, TensorInfo],
    keymap: KeyMap,
    base: Mapping[str, TensorInfo],
) -> int:
    return sum(
        1
        for stem, module in modules.items()
        if (target := keymap.targets.get(stem)) is not None and fits(module, tensors, target, base)
    )


def fits(
    module: LoraModule, tensors: Mapping[str, TensorInfo], target: Target, base: Mapping[str, TensorInfo]
) -> bool:
    """Does the module's ΔW fit the target's weight (its row band, if any)? Headers only."""
    weight = adapters.weight_shapes({p: tensors[k].shape for p, k in module.parts.items()})
    if not adapters.has_weight_change(weight):
        return True  # bias-only module: its length is checked when planned against a real base
    shape = base[target.key].shape
    if target.slice is not None:
        shape = (target.slice.length, *shape[1:])
    try:
        return adapters.fits(module.algo, weight, shape)
    except LoraFormatError:
        return False


# --- virtual checkpoints ----------------------------------------------------------------------------------


@cache
def _virtual_keymaps(arch: str) -> tuple[tuple[dict[str, TensorInfo], KeyMap], ...]:
    """(header, rule table) of each declared variant of family `arch`, built once per process."""
    family = FAMILIES[arch]
    out = []
    for variant in range(len(family.structures)):
        header = virtual_checkpoint(family, variant)
        out.append((header, build_keymap(header, detect_checkpoint(header))))
    return tuple(out)


def virtual_checkpoint(family: Family, variant: int = 0) -> dict[str, TensorInfo]:
    """A checkpoint header of `family` from its declared structure: first layout, each text encoder's first root."""
    rows = [(family.layouts[0].prefix, family.structures[variant])]
    for te in family.text_encoders:
        root, kind = te.roots[0]
        rows.append((root, TEXT_ENCODER_KINDS[kind].structure))
    header: dict[str, TensorInfo] = {}
    for root, text in rows:
        for key, shape in structure_rows(text):
            header[root + key] = TensorInfo(root + key, "F16", shape, 0, 0)
    return header


def structure_rows(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every row of a `structure` string, its {a-b} / {a,b} places expanded."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        template, _, dims = line.rpartition(" ")
        shape = () if dims == "-" else tuple(int(d) for d in dims.split("x"))
        pieces = _BRACES.split(template)
        choices = [_values(group) for group in pieces[1::2]]
        for combo in itertools.product(*choices):
            key = pieces[0] + "".join(value + literal for value, literal in zip(combo, pieces[2::2]))
            out.append((key, shape))
    return out


def _values(group: str) -> list[str]:
    values: list[str] = []
    for item in group.split(","):
        first, dash, last = item.partition("-")
        if dash and first.isdigit() and last.isdigit():
            values.extend(str(i) for i in range(int(first), int(last) + 1))
        else:
            values.append(item)
    return values
