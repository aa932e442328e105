"""Per-block strengths: which block each base weight sits in, and what a block spec makes of it.

The block of a weight comes from the family's `block_groups`, matched against every name the
family's rename tables give the weight (so an SD UNet in diffusers layout has LDM block numbers,
and a FLUX.1 file in diffusers layout has its double/single indices). A spec (`lorabake.block_spec`)
is resolved against the blocks the base actually has: a block, stream or index it does not have is a
usage error naming what it has, never a silently ignored value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache

from lorabake.arch import FAMILIES
from lorabake.arch.common import BlockGroup, Family
from lorabake.block_spec import BlockSpec, BlockSpecError, parse
from lorabake.detect import CheckpointInfo, detect_checkpoint
from lorabake.errors import UsageError
from lorabake.keymap import modules_by_component, names_of
from lorabake.lora_base import virtual_targets
from lorabake.lora_format import LoraFile
from lorabake.st_header import TensorInfo
from lorabake.types import TEXT_ENCODERS

TEXT_SLOT = "BASE"  # a vector's value for every text encoder
OTHER = "other"  # modules in no block
_INDEXED = re.compile(r"(?P<stream>.*?)(?P<index>\d+)")


@dataclass(frozen=True)
class BlockWeights:
    """Multipliers of one LoRA's strength: per block, per text encoder, and for modules in no block."""

    text: str
    by_block: Mapping[str, float]
    text_encoders: Mapping[str, float] = field(default_factory=dict)  # component -> multiplier
    other: float = 1.0

    def factor(self, block: str | None, component: str) -> float:
        if component in TEXT_ENCODERS:
            return self.text_encoders.get(component, 1.0)
        if block is None:
            return self.other
        return self.by_block.get(block, 1.0)

    def as_json(self, present: set[str]) -> dict:
        """Every block of the base with its multiplier, in block order."""
        return {
            "spec": self.text,
            "blocks": {b: self.by_block.get(b, 1.0) for b in sorted(present, key=block_order)},
            "text_encoders": dict(self.text_encoders),
            "other": self.other,
        }

    def describe(self, present: set[str]) -> str:
        """One line: `×0 IN00-IN11, M00; ×1 OUT00-OUT11; te ×1`, runs of blocks with one value joined."""
        runs: dict[float, list[list[str]]] = {}
        last: float | None = None
        for block in sorted(present, key=block_order):
            value = self.by_block.get(block, 1.0)
            group = runs.setdefault(value, [])
            if value == last and block_order(group[-1][-1])[0] == block_order(block)[0]:
                group[-1].append(block)
            else:
                group.append([block])
            last = value
        parts = [f"×{v:g} " + ", ".join(r[0] if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in rs) for v, rs in runs.items()]
        parts += [f"{te} ×{v:g}" for te, v in sorted(self.text_encoders.items())]
        if self.other != 1.0:
            parts.append(f"other ×{self.other:g}")
        return "; ".join(parts)


def block_map(tensors: Mapping[str, TensorInfo], info: CheckpointInfo) -> dict[str, str]:
    """Weight key -> block name, for every weight of the diffusion model that sits in a block."""
    family = FAMILIES.get(info.arch)
    if family is None or not family.block_groups:
        return {}
    matchers = _matchers(family.arch)
    native = info.naming if info.naming != "unknown" else "native"
    out: dict[str, str] = {}
    for component, modules in modules_by_component(tensors, info).items():
        if component in TEXT_ENCODERS:
            continue
        for module, names in names_of(modules, native, family.renames).items():
            block = next((b for n in names for b in [_block_of(matchers, n.name)] if b), None)
            if block is not None:
                out[modules[module].key] = block
    return out


def lora_factors(lora: LoraFile, text: str, *, where: str) -> dict[str, float]:
    """stem -> multiplier for a LoRA alone (combine, convert): blocks from its family's virtual checkpoint."""
    header, targets = virtual_targets(lora)
    if not targets:
        raise UsageError(f"block spec {text!r} of {where}: its family is {lora.arch}, whose blocks lorabake does not know")
    info = detect_checkpoint(header)
    block_of = block_map(header, info)
    weights = resolve(text, lora.arch, set(block_of.values()), set(info.components), lora=where)
    out = {}
    for stem in lora.modules:
        target = targets.get(stem)
        out[stem] = 1.0 if target is None else weights.factor(block_of.get(target.key), target.component)
    return out


def resolve(text: str, arch: str, present: set[str], components: set[str], *, lora: str) -> BlockWeights:
    """The multipliers `text` asks for on a base of family `arch` whose blocks are `present`."""
    family = FAMILIES.get(arch)
    where = f"block spec {text!r} of --lora {lora}"
    if family is None or not family.block_groups:
        raise UsageError(f"{where}: per-block strengths need a base of a known family with blocks (this one is {arch})")
    try:
        spec = parse(text)
    except BlockSpecError as exc:
        raise UsageError(str(exc)) from None
    if spec.preset is not None:
        spec = _preset(family, spec, where)
    te = sorted(c for c in components if c in TEXT_ENCODERS)
    if spec.vector is not None:
        return _from_vector(family, spec, present, te, where)
    return _from_items(spec, present, te, where)


def _preset(family: Family, spec: BlockSpec, where: str) -> BlockSpec:
    presets = {name.upper(): value for name, value in family.block_presets.items()}
    value = presets.get(spec.preset.upper())
    if value is None:
        names = ", ".join(family.block_presets) or "none"
        raise UsageError(f"{where}: no preset {spec.preset!r} for {family.title} (presets: {names})")
    return replace(parse(value), text=spec.text)


def _from_vector(family: Family, spec: BlockSpec, present: set[str], te: list[str], where: str) -> BlockWeights:
    ids = family.block_vectors.get(len(spec.vector))
    if ids is None:
        lengths = "/".join(str(n) for n in sorted(family.block_vectors)) or "no"
        raise UsageError(f"{where}: {len(spec.vector)} values; {family.title} takes {lengths} values, or NAME=VALUE items")
    by_block = dict.fromkeys(present, 0.0)  # blocks the vector does not list get 0, as the extension does
    te_weights: dict[str, float] = {}
    for name, value in zip(ids, spec.vector):
        if name == TEXT_SLOT:
            te_weights.update(dict.fromkeys(te, value))
        elif name in TEXT_ENCODERS:
            te_weights[name] = value
        else:
            by_block[name] = value
    return BlockWeights(spec.text, by_block, te_weights)


def _from_items(spec: BlockSpec, present: set[str], te: list[str], where: str) -> BlockWeights:
    by_block: dict[str, float] = {}
    te_weights: dict[str, float] = {}
    other = 1.0
    streams = _streams(present)
    for item in spec.items:
        if item.ranged:
            # `blocks:0-9` and `block:0-9` alike: a family names its stream one way, people write both
            name = next((n for n in (item.name, item.name.removesuffix("s"), item.name + "s") if n in streams), item.name)
            indices = streams.get(name)
            if indices is None:
                raise UsageError(f"{where}: the base has no stream {item.name!r} ({_say(streams)})")
            lo, hi = item.first, item.last
            if lo is not None and (lo < indices[0] or hi > indices[-1]):
                raise UsageError(f"{where}: {name} has blocks {min(indices)}-{max(indices)}, not {lo}-{hi}")
            for block in present:
                stream, index = _stream_index(block) or ("", -1)
                if stream == name and (lo is None or lo <= index <= hi):
                    by_block[block] = item.value
        elif item.name == "*":
            by_block.update(dict.fromkeys(present, item.value))
        elif item.name == OTHER:
            other = item.value
        elif item.name == "te":
            te_weights.update(dict.fromkeys(te, item.value))
        elif item.name in TEXT_ENCODERS:
            if item.name not in te:
                raise UsageError(f"{where}: the base has no {item.name} (it has {', '.join(te) or 'no text encoder'})")
            te_weights[item.name] = item.value
        elif item.name in present:
            by_block[item.name] = item.value
        else:
            raise UsageError(f"{where}: the base has no block {item.name!r} ({_say(streams)})")
    return BlockWeights(spec.text, {n: v for n, v in by_block.items() if n in present}, te_weights, other)


def _streams(present: set[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for name in present:
        si = _stream_index(name)
        if si is not None:
            out.setdefault(si[0], []).append(si[1])
    return {s: sorted(v) for s, v in out.items()}


def _stream_index(name: str) -> tuple[str, int] | None:
    m = _INDEXED.fullmatch(name)
    return (m["stream"], int(m["index"])) if m and m["stream"] else None


def block_order(name: str) -> tuple[str, int]:
    """Blocks in reading order: by stream, then index (IN02 before IN10, double2 before double10)."""
    return _stream_index(name) or (name, -1)


def _say(streams: Mapping[str, list[int]]) -> str:
    rows = [f"{s}:{min(v)}-{max(v)}" for s, v in sorted(streams.items())]
    return "blocks " + ", ".join(rows) if rows else "it has no numbered blocks"


@cache
def _matchers(arch: str) -> tuple[tuple[re.Pattern[str], BlockGroup], ...]:
    return tuple((_prefix_pattern(g.prefix), g) for g in FAMILIES[arch].block_groups)


def _prefix_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix).replace(re.escape("{n}"), r"(?P<n>\d+)"))


def _block_of(matchers: tuple[tuple[re.Pattern[str], BlockGroup], ...], name: str) -> str | None:
    for pattern, group in matchers:
        m = pattern.match(name + ".")
        if m:
            return group.name.format(n=m.groupdict().get("n", ""))
    return None
