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
from dataclasses import dataclass, replace
from functools import cache

from lorabake import adapters
from lorabake.arch import FAMILIES, TEXT_ENCODER_KINDS
from lorabake.arch.common import Family
from lorabake.detect import arch_from_metadata, detect_checkpoint
from lorabake.errors import LoraFormatError
from lorabake.keymap import KeyMap, build_keymap
from lorabake.lora_format import LoraFile
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


def identify(lora: LoraFile, tensors: Mapping[str, TensorInfo]) -> tuple[LoraFile, BaseMatch]:
    """A LoRA alone: its family by matching, written into `lora.arch*` (and the family's flavour names)."""
    match = match_lora(lora.modules, tensors, lora.metadata)
    return with_family(lora, match.arch, match.source, match.note), match


def against_base(lora: LoraFile, arch: str, base_path: str) -> LoraFile:
    """A LoRA planned against a base: the base's family decides; metadata naming another is a warning."""
    said = arch_from_metadata(lora.metadata)
    note = None
    if said and arch != "unknown" and said != arch:
        note = f"its metadata says the LoRA is for {said} but the base checkpoint {base_path} is {arch}"
    return with_family(lora, arch, "base", note)


def with_family(lora: LoraFile, arch: str, source: str | None, note: str | None) -> LoraFile:
    """`lora` with its family set; a family may name the generic "peft" flavour (`Family.flavours`)."""
    family = FAMILIES.get(arch)
    names = dict(family.flavours) if family else {}
    if "peft+ai-toolkit" in names and "ai-toolkit" in lora.metadata.get("software", ""):
        names["peft"] = names["peft+ai-toolkit"]  # ai-toolkit says so in its `software` metadata
    flavours = {names.get(f, f): n for f, n in lora.flavours.items()}
    return replace(
        lora,
        arch=arch,
        arch_source=source,
        arch_note=note,
        flavours=flavours,
        flavour=names.get(lora.flavour, lora.flavour),
    )


def match_lora(
    modules: Mapping[str, LoraModule], tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str]
) -> BaseMatch:
    """The family whose rule table leaves the fewest of `modules` unmatched; metadata breaks ties."""
    said = arch_from_metadata(metadata)
    used = frozenset(p for p in _ALL_PREFIXES if any(stem.startswith(p) for stem in modules))
    scored = []
    for family in FAMILIES.values():
        keymaps = _virtual_keymaps(family.arch, used)
        matched = max(_count(modules, tensors, keymap, base) for base, keymap in keymaps)
        if matched:
            scored.append(Candidate(family.arch, matched, len(modules) - matched))
    scored.sort(key=lambda c: c.unmatched)
    candidates = _look_alikes_aside(scored, said, len(modules))
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


def _look_alikes_aside(scored: list[Candidate], said: str | None, total: int) -> tuple[Candidate, ...]:
    """A family whose LoRA names are another's (`Family.lora_alone` False) stays a candidate only when it wins
    outright: within the unmatched share and fewer unmatched than every other family, or as few with metadata
    naming it. Otherwise it steps aside, so a LoRA of the other family is never called ambiguous or it."""
    rest = [c.unmatched for c in scored if FAMILIES[c.arch].lora_alone]
    least = min(rest, default=total + 1)

    def wins(c: Candidate) -> bool:
        return c.unmatched <= MAX_UNMATCHED_SHARE * total and (c.unmatched < least or (c.unmatched == least and said == c.arch))

    return tuple(c for c in scored if FAMILIES[c.arch].lora_alone or wins(c))


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


# --- which component a stem names, from its prefix alone ---------------------------------------------------

# prefix -> component. "body" means: "dit" if the rest starts with a DiT block name, else
# `default` ("unet" or None).
_COMPONENT_PREFIXES = (
    ("lora_unet_", "body", "unet"),
    ("oft_unet_", "body", "unet"),
    ("lycoris_", "body", "unet"),
    ("lora_transformer_", "dit", None),
    ("lora_te_", "te1", None),
    ("lora_te1_", "te1", None),
    ("lora_te2_", "te2", None),
    ("lora_te3_", "te3", None),
    ("model.diffusion_model.", "body", "unet"),
    ("diffusion_model.", "body", "unet"),
    ("text_encoders.clip_l.", "te1", None),
    ("text_encoders.clip_g.", "te2", None),
    ("text_encoders.t5xxl.", "te3", None),
    ("unet.base_model.model.", "unet", None),
    ("unet.", "unet", None),
    ("transformer.", "dit", None),
    ("text_encoder.", "te1", None),
    ("text_encoder_2.", "te2", None),
    ("text_encoder_3.", "te3", None),
    ("text_encoder_4.", "te4", None),
    ("base_model.model.", "body", None),
    ("", "body", None),  # DiffSynth, BFL, XLabs: no prefix
)
_COMPONENT_PREFIXES_LONGEST_FIRST = tuple(sorted(_COMPONENT_PREFIXES, key=lambda p: -len(p[0])))


def _dit_top_names() -> frozenset[str]:
    """Top-level module names of the DiT families (native and renamed), from the registry. UNets have
    `transformer_blocks` only nested inside attentions, never first."""
    names = set()
    for family in FAMILIES.values():
        if family.diffusion != "dit":
            continue
        for structure in family.structures:
            names.update(line.split(".", 1)[0].split(" ", 1)[0] for line in structure.splitlines() if line)
        for table in family.renames:
            names.update(a.name.split(".", 1)[0] for aliases in table.modules.values() for a in aliases)
    return frozenset(names)


_DIT_TOP_NAMES = _dit_top_names()


def module_component_hint(stem: str) -> str | None:
    """ "unet" | "dit" | "te1" | "te2" | "te3" | None, from the stem's prefix only.

    The index is the prefix's (kohya `lora_te2_`, diffusers `text_encoder_2.`, ComfyUI
    `text_encoders.clip_g.` -> "te2"; `text_encoders.t5xxl.` -> "te3"). Which encoder that is
    depends on the family (one family's trainers write T5 as `lora_te2_`): the planner resolves it
    with the family's text-encoder table. Unprefixed stems are "dit" when they start with a top-level
    module name of a DiT family, else None.
    """
    for prefix, component, default in _COMPONENT_PREFIXES_LONGEST_FIRST:
        if stem.startswith(prefix):
            if component != "body":
                return component
            body = stem[len(prefix) :].replace(".", "_")
            dit = any(body == n or body.startswith(n + "_") for n in _DIT_TOP_NAMES)
            return "dit" if dit else default
    return None  # unreachable: "" matches every stem


# --- virtual checkpoints ----------------------------------------------------------------------------------


# Every LoRA-side prefix some family declares: a LoRA's own prefixes are those its stems start with.
_ALL_PREFIXES = frozenset(
    p
    for f in FAMILIES.values()
    for p in (*f.lora_prefixes, *(q for te in f.text_encoders for q in te.lora_prefixes))
)


def virtual_targets(lora: LoraFile) -> tuple[dict[str, TensorInfo], dict[str, Target]]:
    """A LoRA alone: its family's virtual checkpoint (the variant placing most modules) and each module's target."""
    if lora.arch not in FAMILIES or not FAMILIES[lora.arch].structures:
        return {}, {}
    used = frozenset(p for p in _ALL_PREFIXES if any(stem.startswith(p) for stem in lora.modules))
    best: tuple[dict[str, TensorInfo], dict[str, Target]] = ({}, {})
    for header, keymap in _virtual_keymaps(lora.arch, used):
        placed = {stem: keymap.targets[stem] for stem in lora.modules if stem in keymap.targets}
        if len(placed) > len(best[1]):
            best = (header, placed)
    return best


@cache
def _virtual_keymaps(arch: str, prefixes: frozenset[str]) -> tuple[tuple[dict[str, TensorInfo], KeyMap], ...]:
    """(header, rule table under `prefixes`) of each declared variant of family `arch`, built once."""
    family = FAMILIES[arch]
    out = []
    for variant in range(len(family.structures)):
        header = _virtual_header(arch, variant)
        out.append((header, build_keymap(header, detect_checkpoint(header), only_prefixes=prefixes)))
    return tuple(out)


@cache
def _virtual_header(arch: str, variant: int) -> dict[str, TensorInfo]:
    return virtual_checkpoint(FAMILIES[arch], variant)


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
