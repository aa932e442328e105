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

from lorabake import dtypes
from lorabake.arch import FAMILIES
from lorabake.arch.common import (
    ATTN_PROCESSOR,
    BIAS_PARAMS,
    DIT_LORA_PREFIXES,
    GENERIC_COMPONENT_PREFIXES,
    GENERIC_TEXT_ENCODERS,
    OPENCLIP_TO_HF,
    PARTS,
    RESNET_RENAMES,
    UNET_LEAVES,
    UNET_LORA_PREFIXES,
    WEIGHT_PARAMS,
    Alias,
    TextEncoder,
    UnetBlocks,
)
from lorabake.detect import CheckpointInfo
from lorabake.st_header import TensorInfo
from lorabake.types import TEXT_ENCODERS, RowSlice, Target

# Naming family of a text encoder's own keys, by ComponentInfo.kind.
_TE_NAMING = {
    "clip_l": "hf",
    "clip_h": "hf",
    "clip_g": "hf",
    "t5xxl": "hf",
    "openclip_h": "openclip",
    "openclip_g": "openclip",
}


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

    def component_of(self, stem: str) -> str | None:
        """The component a stem's prefix names (even one the base lacks), or None if no prefix says."""
        target = self.targets.get(stem)
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


def build_keymap(tensors: Mapping[str, TensorInfo], info: CheckpointInfo) -> KeyMap:
    """Every LoRA stem the base accepts, from the base's keys and the family tables of `info.arch`."""
    family = FAMILIES.get(info.arch)
    text_encoders = {te.component: te for te in (family.text_encoders if family else GENERIC_TEXT_ENCODERS)}
    if family is None:
        diffusion_prefixes = tuple(dict.fromkeys(UNET_LORA_PREFIXES + DIT_LORA_PREFIXES))
    else:
        diffusion_prefixes = UNET_LORA_PREFIXES if family.diffusion == "unet" else DIT_LORA_PREFIXES
    renames = family.renames if family else {}
    unet = family is not None and family.diffusion == "unet"

    table = _Table()
    modules_by_component = _modules(tensors, info)
    for comp in info.components.values():
        if comp.name == "vae":
            continue
        modules = modules_by_component.get(comp.name, {})
        if comp.name in TEXT_ENCODERS:
            te = text_encoders.get(comp.name)
            prefixes = te.lora_prefixes if te else ()
            names = _text_encoder_names(modules, comp.kind)
        else:
            prefixes = diffusion_prefixes
            names = _diffusion_names(
                modules, info.naming, renames, unet=unet, blocks=family.unet_blocks if family else None
            )
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
                    stem = prefix + (name.name.replace(".", "_") if prefix.endswith("_") else name.name)
                    table.add(stem, target, fallback=name.alias is None)
                    stems_by.setdefault((name.family, prefix), []).append(stem)
            if flavour:
                prefix, naming = flavour
                stems = stems_by.get((naming, prefix)) or stems_by.get((module_names[0].family, prefix))
                if stems:
                    table.kohya[mod.key] = tuple(stems)

    targets, ambiguous, shadowed = table.result()
    return KeyMap(
        arch=info.arch,
        targets=targets,
        kohya_names=table.kohya,
        components_present=set(info.components),
        ambiguous=ambiguous,
        shadowed=shadowed,
        prefixes=_component_prefixes(info, text_encoders, diffusion_prefixes),
    )


class _Name(NamedTuple):
    family: str  # naming family: "ldm", "diffusers", "attnproc", "mmdit", "bfl", "hf", "openclip", ...
    name: str  # dotted module path in that family
    alias: Alias | None  # None for the checkpoint's own name


class _Table:
    def __init__(self) -> None:
        self.tiers: tuple[dict[str, Target], dict[str, Target]] = ({}, {})  # explicit, fallback
        self.clashes: dict[str, list[Target]] = {}
        self.kohya: dict[str, tuple[str, ...]] = {}

    def add(self, stem: str, target: Target, *, fallback: bool) -> None:
        tier = self.tiers[1 if fallback else 0]
        seen = tier.setdefault(stem, target)
        if seen != target:
            clash = self.clashes.setdefault(stem, [seen])
            if target not in clash:
                clash.append(target)

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
        start, end = PARTS[alias.part]
        first, stop = start * hidden, (end * hidden if end is not None else shape[0])
        if stop > shape[0] or stop <= first:
            return None
        row_slice = RowSlice(first, stop - first)
    if row_slice is None and alias.transform is None:
        return base
    return replace(base, slice=row_slice, transform=alias.transform)


# --- the base's modules ---------------------------------------------------------------------------------


class _Module(NamedTuple):
    key: str  # <root><module>.weight / .scale / .in_proj_weight, or a bare parameter's key
    bias_key: str | None


def _modules(tensors: Mapping[str, TensorInfo], info: CheckpointInfo) -> dict[str, dict[str, _Module]]:
    """component -> {module path under its root: _Module}, for float tensors of one dimension or more."""
    roots = sorted(((c.name, c.root) for c in info.components.values()), key=lambda r: -len(r[1]))
    out: dict[str, dict[str, _Module]] = {}
    for key, t in tensors.items():
        if not t.shape or not dtypes.BY_TAG[t.dtype].is_float:
            continue
        owner = next(((name, root) for name, root in roots if key.startswith(root)), None)
        if owner is None or owner[0] == "vae":
            continue
        name, root = owner
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


# --- names of the diffusion model -----------------------------------------------------------------------


def _diffusion_names(
    modules: Mapping[str, _Module],
    naming: str,
    renames: Mapping[str, Mapping[str, tuple[Alias, ...]]],
    *,
    unet: bool,
    blocks: UnetBlocks | None = None,
) -> dict[str, list[_Name]]:
    native = naming if naming != "unknown" else "native"
    names = {m: [_Name(native, m, None)] for m in modules}
    if unet and naming == "ldm":
        pairs = _unet_block_pairs(set(modules), naming="ldm", default=blocks)
        for m, out in names.items():
            d = _translate(m, pairs, RESNET_RENAMES)
            if d is not None:
                out.append(_Name("diffusers", d, Alias(d)))
                out.extend(_attn_processor(d))
    elif unet and naming == "diffusers":
        pairs = {d: ldm for ldm, d in _unet_block_pairs(set(modules), naming="diffusers", default=blocks).items()}
        back = {d: ldm for ldm, d in RESNET_RENAMES.items()}
        for m, out in names.items():
            ldm = _translate(m, pairs, back)
            if ldm is not None:
                out.append(_Name("ldm", ldm, Alias(ldm)))
            out.extend(_attn_processor(m))
    else:
        for m, out in names.items():
            for family, rows in renames.items():
                n, aliases = _lookup(rows, m)
                out.extend(
                    _Name(family, a.name.format(n=n), a._replace(name=a.name.format(n=n))) for a in aliases
                )
    return names


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


def _attn_processor(diffusers_name: str) -> list[_Name]:
    """Old diffusers attn-processor spelling of an attention projection (`attn1.processor.to_q`)."""
    for tail, proc in ATTN_PROCESSOR.items():
        if diffusers_name.endswith("." + tail) and ".attn" in diffusers_name:
            name = diffusers_name[: -len(tail)] + proc
            return [_Name("attnproc", name, Alias(name))]
    return []


def _unet_block_pairs(modules: set[str], *, naming: str, default: UnetBlocks | None) -> dict[str, str]:
    """LDM block prefix -> diffusers block prefix for this UNet, from its own modules.

    Levels, layers per block and which levels have attention are read from the module names when
    the file shows its downsamplers (a whole UNet); a partial file falls back to the family's
    declared structure. Leaf entries (conv_in, downsamplers, upsamplers, time/label embeddings)
    map whole modules.
    """
    blocks = {".".join(m.split(".")[:k]) for m in modules for k in range(1, 5)}
    if naming == "ldm":
        ops = sorted(
            int(b.split(".")[1]) for b in blocks if b.startswith("input_blocks.") and b.endswith(".0.op")
        )
        whole = bool(ops)
        per = ops[0] if ops else 0
        levels = len(ops) + 1
        down_attn = [f"input_blocks.{1 + per * i}.1" in blocks for i in range(levels)]
        up_attn = [f"output_blocks.{per * i}.1" in blocks for i in range(levels)]
    else:
        levels = sum(1 for i in range(16) if f"down_blocks.{i}" in blocks)
        whole = "down_blocks.0.downsamplers.0.conv" in blocks
        per = 1 + sum(1 for j in range(16) if f"down_blocks.0.resnets.{j}" in blocks)
        down_attn = [f"down_blocks.{i}.attentions.0" in blocks for i in range(levels)]
        up_attn = [f"up_blocks.{i}.attentions.0" in blocks for i in range(levels)]
    if not whole and default is not None:
        levels, per, down_attn, up_attn = default
    layers = per - 1  # resnets per down level; up levels have one more

    pairs = dict(UNET_LEAVES)
    for i in range(levels):
        for j in range(layers):
            n = 1 + per * i + j
            pairs[f"input_blocks.{n}.0"] = f"down_blocks.{i}.resnets.{j}"
            if down_attn[i]:
                pairs[f"input_blocks.{n}.1"] = f"down_blocks.{i}.attentions.{j}"
        if i < levels - 1:
            pairs[f"input_blocks.{per * (i + 1)}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
    pairs["middle_block.0"] = "mid_block.resnets.0"
    pairs["middle_block.1"] = "mid_block.attentions.0"
    pairs["middle_block.2"] = "mid_block.resnets.1"
    for i in range(levels):
        for j in range(per):
            n = per * i + j
            pairs[f"output_blocks.{n}.0"] = f"up_blocks.{i}.resnets.{j}"
            if up_attn[i]:
                pairs[f"output_blocks.{n}.1"] = f"up_blocks.{i}.attentions.{j}"
        if i < levels - 1:
            pairs[f"output_blocks.{per * i + layers}.{2 if up_attn[i] else 1}.conv"] = (
                f"up_blocks.{i}.upsamplers.0.conv"
            )
    return pairs


def _translate(module: str, pairs: Mapping[str, str], sub_renames: Mapping[str, str]) -> str | None:
    """Rename `module` by its longest block prefix in `pairs`; resnet sub-modules go through `sub_renames`."""
    parts = module.split(".")
    for k in range(min(len(parts), 5), 0, -1):
        head = ".".join(parts[:k])
        new_head = pairs.get(head)
        if new_head is None:
            continue
        rest = ".".join(parts[k:])
        if not rest:
            return new_head
        if ".resnets." in new_head or ".resnets." in head:
            rest = sub_renames.get(rest, rest)
        return f"{new_head}.{rest}"
    return None


# --- names of the text encoders -------------------------------------------------------------------------


def _text_encoder_names(modules: Mapping[str, _Module], kind: str) -> dict[str, list[_Name]]:
    naming = _TE_NAMING.get(kind, "hf")
    names = {m: [_Name(naming, m, None)] for m in modules}
    if naming == "openclip":
        for m, out in names.items():
            n, aliases = _lookup(OPENCLIP_TO_HF, m)
            out.extend(_Name("hf", a.name.format(n=n), a._replace(name=a.name.format(n=n))) for a in aliases)
    elif kind.startswith("clip") and modules and not any(m.startswith("text_model.") for m in modules):
        # old SD1 files: cond_stage_model.transformer.encoder.* without text_model ([CU] SD15 renames)
        for m, out in names.items():
            if not m.startswith("text_projection"):
                out.append(_Name("hf", "text_model." + m, Alias("text_model." + m)))
    if naming == "openclip" or kind.startswith("clip"):
        # transformers >= 5 CLIPTextModel (not …WithProjection) has no `text_model` level, so PEFT/diffusers
        # LoRAs trained on it say `text_encoder.encoder.layers.0.…`: the module `text_model.encoder.…`.
        # Registered for every CLIP slot: unambiguous, and which class a trainer used is not ours to know.
        for out in names.values():
            for n in list(out):
                if n.family == "hf" and n.name.startswith("text_model."):
                    flat = n.name[len("text_model.") :]
                    out.append(_Name("hf_flat", flat, (n.alias or Alias(n.name))._replace(name=flat)))
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
