"""The rule table: every LoRA module stem a base checkpoint accepts, built once from the base's own keys.

Names are only ever derived forward: for each weight of the base, every family of names it goes by
(its own, diffusers', LDM's, HF CLIP's, ...) is generated from the tables in `lorabake.arch`, and each
name is registered under every LoRA prefix of its component (`lora_unet_` + name with `_`,
`unet.` + dotted name, ...). Resolving a LoRA stem is then one dict lookup; nothing parses a
`_`-joined name back into dots.

Two tiers: the checkpoint's own names (the generic fallback, which also covers families without a
table) and the explicit table rows. An explicit row wins over a fallback name; two rows of one tier
giving one alias different targets make it ambiguous (kept out of `targets`, listed in `ambiguous`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from lorabake import dtypes, spread
from lorabake.arch import FAMILIES, TEXT_ENCODER_KINDS
from lorabake.arch.common import (
    BIAS_PARAMS,
    DIT_LORA_PREFIXES,
    GENERIC_COMPONENT_PREFIXES,
    GENERIC_TEXT_ENCODERS,
    PARTS,
    UNET_LORA_PREFIXES,
    WEIGHT_PARAMS,
    Alias,
    Renames,
    TextEncoder,
    TextEncoderKind,
)
from lorabake.detect import CheckpointInfo
from lorabake.st_header import TensorInfo
from lorabake.types import TEXT_ENCODERS, RowSlice, Target

_UNKNOWN_KIND = TextEncoderKind("hf", (), ())


class Rule(NamedTuple):
    """Why a stem lands where it does: the family, the table and row that made the name, the LoRA prefix."""

    family: str  # family id, or "unknown" (the base's own names only)
    table: str  # "own name" or "<source> -> <target> names"
    row: str  # the row of that table, e.g. "double_blocks.{n}.img_attn.qkv -> transformer_blocks.{n}.attn.to_q [q]"
    prefix: str  # the LoRA-side prefix ("lora_unet_" joins the path with "_")

    def __str__(self) -> str:
        where = f"prefix {self.prefix!r}" if self.prefix else "no prefix"
        return f"{self.family}: {self.table}: {self.row} ({where})"


@dataclass(frozen=True)
class KeyMap:
    arch: str
    # LoRA module stem (adapter suffix removed, prefix kept) -> where it lands in the base
    targets: dict[str, Target]
    # base weight key -> the stems a kohya trainer would write for it (one per slice of a fused weight);
    # look each up in `targets` for its slice and transform
    kohya_names: dict[str, tuple[str, ...]]
    components_present: set[str]
    # alias -> the different targets two table rows gave it (a table bug; never resolved)
    ambiguous: dict[str, tuple[Target, ...]] = field(default_factory=dict)
    # base's own names that an explicit row took over (e.g. OpenCLIP text_projection, transposed)
    shadowed: tuple[str, ...] = ()
    # (LoRA prefix, component), longest prefix first, for component_of
    prefixes: tuple[tuple[str, str], ...] = ()
    # stem -> the rule that sent it to its target (for `inspect --keys`)
    rules: dict[str, Rule] = field(default_factory=dict)
    spread: dict[str, tuple[Target, ...]] = field(default_factory=dict)  # fused stem -> its bands (Alias.spread)

    def component_of(self, stem: str) -> str | None:
        """The component a stem's prefix names (even one the base lacks), or None if no prefix says."""
        target = self.targets.get(stem) or next(iter(self.spread.get(stem, ())), None)
        if target is not None:
            return target.component
        for prefix, component in self.prefixes:
            if stem.startswith(prefix):
                return component
        return None

    def kohya_stem(self, key: str, slice_index: int | None = None) -> str | None:
        """The kohya-style stem for base weight `key` (`slice_index` picks q/k/v of a fused weight)."""
        stems = self.kohya_names.get(key, ())
        index = slice_index or 0
        return stems[index] if index < len(stems) else None


def build_keymap(
    tensors: Mapping[str, TensorInfo], info: CheckpointInfo, *, only_prefixes: frozenset[str] | None = None
) -> KeyMap:
    """Every LoRA stem the base accepts, from the base's keys and the family tables of `info.arch`.

    `only_prefixes` keeps the table to stems under those LoRA prefixes (matching a LoRA needs only its own).
    """
    family = FAMILIES.get(info.arch)
    family_id = family.arch if family else "unknown"
    text_encoders = {te.component: te for te in (family.text_encoders if family else GENERIC_TEXT_ENCODERS)}
    if family is None:
        diffusion_prefixes = tuple(dict.fromkeys(UNET_LORA_PREFIXES + DIT_LORA_PREFIXES))
    else:
        diffusion_prefixes = family.lora_prefixes

    table = _Table()
    by_component = modules_by_component(tensors, info)
    for comp in info.components.values():
        if comp.name == "vae":
            continue
        modules = by_component.get(comp.name, {})
        if comp.name in TEXT_ENCODERS:
            te = text_encoders.get(comp.name)
            prefixes = te.lora_prefixes if te else ()
            names = _text_encoder_names(modules, TEXT_ENCODER_KINDS.get(comp.kind, _UNKNOWN_KIND))
        else:
            prefixes = diffusion_prefixes
            native = info.naming if info.naming != "unknown" else "native"
            names = names_of(modules, native, family.renames if family else ())
        flavour = family.kohya_names.get(comp.name) if family else None
        for module, module_names in names.items():
            mod = modules[module]
            shape = tensors[mod.key].shape
            base = Target(key=mod.key, component=comp.name, bias_key=mod.bias_key)
            stems_by: dict[tuple[str, str], list[str]] = {}
            for name in module_names:
                target = base if name.alias is None else _shaped(base, name.alias, shape)
                if target is None:
                    continue
                for prefix in prefixes:
                    if only_prefixes is not None and prefix not in only_prefixes:
                        continue
                    stem = prefix + (name.name.replace(".", "_") if prefix.endswith("_") else name.name)
                    table.add(
                        stem,
                        target,
                        Rule(family_id, name.table, name.row, prefix),
                        fallback=name.alias is None,
                    )
                    stems_by.setdefault((name.naming, prefix), []).append(stem)
            if flavour:
                prefix, naming = flavour
                stems = stems_by.get((naming, prefix)) or stems_by.get((module_names[0].naming, prefix))
                if stems:
                    table.kohya[mod.key] = tuple(stems)

    targets, ambiguous, shadowed = table.result()
    spans = {stem: bands for stem, by_key in table.spread.items() if (bands := spread.tiling(by_key.values()))}
    return KeyMap(
        arch=info.arch,
        targets=targets,
        kohya_names=table.kohya,
        components_present=set(info.components),
        ambiguous=ambiguous,
        shadowed=shadowed,
        prefixes=_component_prefixes(info, text_encoders, diffusion_prefixes),
        rules={stem: rule for stem, rule in table.rules.items() if stem in targets or stem in spans},
        spread=spans,
    )


class _Name(NamedTuple):
    naming: str  # "ldm", "diffusers", "attnproc", "mmdit", "bfl", "hf", "openclip", ...
    name: str  # dotted module path in that naming
    alias: Alias | None  # None for the checkpoint's own name
    table: str = "own name"
    row: str = ""


class _Table:
    def __init__(self) -> None:
        self.tiers: tuple[dict[str, Target], dict[str, Target]] = ({}, {})  # explicit, fallback
        self.why: tuple[dict[str, Rule], dict[str, Rule]] = ({}, {})  # the first rule giving each stem
        self.clashes: dict[str, list[Target]] = {}
        self.kohya: dict[str, tuple[str, ...]] = {}
        self.spread: dict[str, dict[str, Target]] = {}  # fused stem -> {base key: its band}

    def add(self, stem: str, target: Target, rule: Rule, *, fallback: bool) -> None:
        if target.delta_rows is not None:
            self.spread.setdefault(stem, {})[target.key] = target
            self.why[0].setdefault(stem, rule)
            return
        tier = 1 if fallback else 0
        seen = self.tiers[tier].setdefault(stem, target)
        self.why[tier].setdefault(stem, rule)
        if seen != target:
            clash = self.clashes.setdefault(stem, [seen])
            if target not in clash:
                clash.append(target)

    @property
    def rules(self) -> dict[str, Rule]:
        return {**self.why[1], **self.why[0]}

    def result(self) -> tuple[dict[str, Target], dict[str, tuple[Target, ...]], tuple[str, ...]]:
        explicit, fallback = self.tiers
        shadowed = tuple(s for s, t in fallback.items() if s in explicit and explicit[s] != t)
        targets = {**fallback, **explicit}
        for stem in self.clashes:
            targets.pop(stem, None)
        return targets, {s: tuple(ts) for s, ts in self.clashes.items()}, shadowed


def _shaped(base: Target, alias: Alias, shape: tuple[int, ...]) -> Target | None:
    """`base` narrowed to the alias's rows and transform; None when the weight's shape rules the row out."""
    if len(shape) < 2 and (alias.part or alias.rows):
        return None
    if alias.rows is not None and shape[0] != alias.rows * shape[1]:
        return None
    row_slice = None
    if alias.part is not None:
        hidden = shape[1]
        start, end = PARTS[alias.part] if isinstance(alias.part, str) else alias.part
        first = spread.rows_of(start, hidden, shape[0])
        stop = shape[0] if end is None else spread.rows_of(end, hidden, shape[0])
        if first is None or stop is None or stop > shape[0] or stop <= first:
            return None
        row_slice = RowSlice(first, stop - first)
    delta_rows = spread.delta_rows(alias.spread, shape) if alias.spread else None
    if alias.spread and (delta_rows is None or row_slice is not None):
        return None
    if row_slice is None and alias.transform is None and delta_rows is None:
        return base
    return replace(base, slice=row_slice, transform=alias.transform, delta_rows=delta_rows)


# --- the base's modules ---------------------------------------------------------------------------------


class _Module(NamedTuple):
    key: str  # <root><module>.weight / .scale / .in_proj_weight, or a bare parameter's key
    bias_key: str | None


def modules_by_component(tensors: Mapping[str, TensorInfo], info: CheckpointInfo) -> dict[str, dict[str, _Module]]:
    """component -> {module path under its root: _Module}, for float tensors of one dimension or more."""
    roots = sorted(((c.name, c.root) for c in info.components.values()), key=lambda r: -len(r[1]))
    out: dict[str, dict[str, _Module]] = {}
    any_root = tuple(root for _, root in roots)  # one C call rules out a name outside every component
    for key, t in tensors.items():
        if not key.startswith(any_root) or not t.shape or not dtypes.BY_TAG[t.dtype].is_float:
            continue
        name, root = next((name, root) for name, root in roots if key.startswith(root))
        if name == "vae":
            continue
        rel = key[len(root) :]
        head, _, param = rel.rpartition(".")
        if param in BIAS_PARAMS:
            continue
        if param in WEIGHT_PARAMS and head:
            bias = WEIGHT_PARAMS[param]
            bias_key = f"{root}{head}.{bias}" if bias and f"{root}{head}.{bias}" in tensors else None
            out.setdefault(name, {})[head] = _Module(key, bias_key)
        else:  # a bare parameter (pos_embed, text_projection, positional_embedding): the key is the module
            out.setdefault(name, {})[rel] = _Module(key, None)
    return out


# --- other names of a module: the family's rename tables, applied in order ----------------------------


def names_of(
    modules: Mapping[str, object], native: str, tables: tuple[Renames, ...]
) -> dict[str, list[_Name]]:
    """module -> its own name plus every name the tables give it; a table reads names earlier ones made."""
    names = {m: [_Name(native, m, None)] for m in modules}
    for table in tables:
        label = f"{table.source} -> {table.target} names"
        for out in names.values():
            for name in [n for n in out if n.naming == table.source]:
                for alias, row in _apply(table, name.name):
                    composed = _compose(name.alias, alias)
                    if (
                        composed is not None
                        and not any(
                            n.naming == table.target
                            and n.name == composed.name
                            and n.alias in (None, composed)
                            for n in out
                        )
                    ):  # a table back to a naming already there (diffusers -> ldm on an LDM base) adds nothing
                        out.append(_Name(table.target, composed.name, composed, label, row))
    return names


def _apply(table: Renames, module: str) -> list[tuple[Alias, str]]:
    """(alias, row text) for each row of `table` that renames `module`."""
    found = []
    n, aliases = _lookup(table.modules, module)
    for a in aliases:
        name = a.name.format(n=n)
        band = f" [{a.part}]" if a.part else ""
        found.append((a._replace(name=name), f"{_template(module, n)} -> {a.name}{band}"))
    if table.blocks:
        parts = module.split(".")
        for k in range(len(parts), 0, -1):
            head = ".".join(parts[:k])
            block = table.blocks.get(head)
            if block is None:
                continue
            rest = ".".join(parts[k:])
            if rest and block.inner:
                rest = block.inner.get(rest, rest)
            name = f"{block.name}.{rest}" if rest else block.name
            found.append(
                (
                    Alias(name),
                    f"{head} -> {block.name} ({block.rule})" if block.rule else f"{head} -> {block.name}",
                )
            )
            break
    for tail, new_tail in table.tails.items():
        if module.endswith("." + tail):
            found.append((Alias(module[: -len(tail)] + new_tail), f"*.{tail} -> *.{new_tail}"))
    return found


def _compose(first: Alias | None, then: Alias) -> Alias | None:
    """An alias of an alias: the band, transform and row count of `first` carry over (two bands cannot)."""
    if first is None:
        return then
    if first.part and then.part or first.spread or then.spread:  # a spread name is only ever the last
        return None
    return then._replace(
        part=then.part or first.part,
        transform=then.transform or first.transform,
        rows=then.rows or first.rows,
    )


def _template(module: str, n: str | None) -> str:
    if n is None:
        return module
    parts = module.split(".")
    return ".".join("{n}" if p == n and i == parts.index(n) else p for i, p in enumerate(parts))


def _lookup(rows: Mapping[str, tuple[Alias, ...]], module: str) -> tuple[str | None, tuple[Alias, ...]]:
    """A module's rows: by its exact path, else by its path with the block index (first number) as {n}."""
    if module in rows:
        return None, rows[module]
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            template = ".".join([*parts[:i], "{n}", *parts[i + 1 :]])
            return part, rows.get(template, ())
    return None, ()


# --- names of the text encoders -------------------------------------------------------------------------


def _text_encoder_names(modules: Mapping[str, _Module], kind: TextEncoderKind) -> dict[str, list[_Name]]:
    names = names_of(modules, kind.naming, kind.renames)
    if (
        kind.clip
        and kind.naming == "hf"
        and modules
        and not any(m.startswith("text_model.") for m in modules)
    ):
        # old SD1 files: cond_stage_model.transformer.encoder.* without text_model (ComfyUI comfy/lora.py
        # maps both spellings)
        for m, out in names.items():
            if not m.startswith("text_projection"):
                out.append(
                    _Name("hf", "text_model." + m, Alias("text_model." + m), "hf names", "* -> text_model.*")
                )
    if kind.clip:
        # transformers >= 5 CLIPTextModel (not …WithProjection) has no `text_model` level, so PEFT/diffusers
        # LoRAs trained on it say `text_encoder.encoder.layers.0.…`: the module `text_model.encoder.…`.
        # Registered for every CLIP slot: unambiguous, and which class a trainer used is not ours to know.
        for out in names.values():
            for n in list(out):
                if n.naming == "hf" and n.name.startswith("text_model."):
                    flat = n.name[len("text_model.") :]
                    alias = (n.alias or Alias(n.name))._replace(name=flat)
                    out.append(_Name("hf_flat", flat, alias, "hf names", "text_model.* -> *"))
    return names


# --- which component a prefix names ---------------------------------------------------------------------


def _component_prefixes(
    info: CheckpointInfo, text_encoders: Mapping[str, TextEncoder], diffusion_prefixes: tuple[str, ...]
) -> tuple[tuple[str, str], ...]:
    family = FAMILIES.get(info.arch)
    diffusion = (
        family.diffusion if family else next((c for c in ("unet", "dit") if c in info.components), "dit")
    )
    found: dict[str, str] = {}
    for te in text_encoders.values():
        for prefix in te.lora_prefixes:
            found.setdefault(prefix, te.component)
    for prefix in diffusion_prefixes:
        if prefix:
            found.setdefault(prefix, diffusion)
    for prefix, component in GENERIC_COMPONENT_PREFIXES.items():
        found.setdefault(prefix, diffusion if component == "diffusion" else component)
    return tuple(sorted(found.items(), key=lambda pc: -len(pc[0])))
