"""Which model family a checkpoint is, from its header alone (names and shapes).

Every family's layouts (`lorabake.arch.*.FAMILY.layouts`) are tried: a layout matches when all its
probe tensors exist under its prefix with the pinned sizes. One family matching is the answer; none or
several is "unknown", with the candidates and what was seen in `notes`.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field

from lorabake import dtypes
from lorabake.arch import ARCH_NAMES, FAMILIES
from lorabake.arch.common import (
    DIFFUSERS_FOLDERS,
    GENERIC_DIFFUSION_ROOTS,
    GENERIC_TEXT_ENCODERS,
    VAE_ROOTS,
    Family,
    Layout,
    TextEncoder,
)
from lorabake.st_header import TensorInfo

__all__ = ["ARCH_NAMES", "CheckpointInfo", "ComponentInfo", "detect_checkpoint", "arch_from_metadata"]

# Metadata keys that name a base family, most specific first.
METADATA_ARCH_KEYS = ("modelspec.architecture", "ss_base_model_version")


@dataclass(frozen=True)
class ComponentInfo:
    name: str  # "unet" | "dit" | "te1" | "te2" | "te3" | "te4" | "vae"
    root: str  # key prefix, e.g. "cond_stage_model.transformer."
    kind: str  # a text encoder kind ("clip_l", "t5xxl", ...), the family's diffusion_kind, or "vae"
    params: int  # sum of numel of its float tensors
    dtypes: dict[str, int]  # dtype tag -> tensor count
    tensors: int


@dataclass(frozen=True)
class CheckpointInfo:
    arch: str  # a family id of `lorabake.arch.FAMILIES`, or "unknown"
    layout: str  # the matching Layout.layout ("ldm", "comfyui", "diffusers", ...) or "unknown"
    prefix: str  # diffusion model root, e.g. "model.diffusion_model." or ""
    components: dict[str, ComponentInfo] = field(default_factory=dict)
    candidates: tuple[str, ...] = ()  # when unknown: the families the evidence points to
    notes: tuple[str, ...] = ()
    naming: str = "unknown"  # how the diffusion model's modules are named: the matching Layout.naming


def detect_checkpoint(
    tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str] | None = None
) -> CheckpointInfo:
    metadata = metadata or {}
    matches = [(fam, lay) for fam in FAMILIES.values() for lay in fam.layouts if _matches(lay, tensors)]
    # A bare-prefix layout also matches a prefixed file's keys only if they are bare too, so several matches
    # of one family cannot happen with real files; keep the longest prefix to be safe.
    matches = _most_specific(matches)
    archs = sorted({fam.arch for fam, _ in matches}, key=list(FAMILIES).index)
    notes: list[str] = []
    said = arch_from_metadata(metadata)
    names = _Names(tensors)

    if len(archs) != 1:
        candidates = archs or _near_misses(tensors, names, notes)
        if said and said not in candidates:
            candidates = [*candidates, said]
        if said:
            notes.append(f"metadata names {said}")
        if len(archs) > 1:
            notes.insert(0, f"tensor names match several families: {', '.join(archs)}")
        elif not candidates:
            notes.insert(
                0, "no known diffusion model (of the families lorabake knows) found in the tensor names"
            )
        # Still name what is there, so LoRAs that follow the checkpoint's own key names can apply.
        roots = [("dit", r, "unknown") for r in GENERIC_DIFFUSION_ROOTS if names.has_prefix(r)][:1]
        roots += _text_encoder_roots(GENERIC_TEXT_ENCODERS, names)
        components = _components(tensors, names, roots)
        prefix = roots[0][1] if roots and roots[0][0] == "dit" else ""
        return CheckpointInfo("unknown", "unknown", prefix, components, tuple(candidates), tuple(notes))

    fam, lay = max((m for m in matches), key=lambda m: len(m[1].prefix))
    roots = [
        (fam.diffusion, lay.prefix, fam.diffusion_kind),
        *_text_encoder_roots(fam.text_encoders, names),
    ]
    components = _components(tensors, names, roots)
    notes.extend(_notes(fam, lay, tensors, names))
    if said and said != fam.arch:
        notes.append(f"metadata names {said} but the tensors are {fam.arch}")
    return CheckpointInfo(fam.arch, lay.layout, lay.prefix, components, (), tuple(notes), lay.naming)


def arch_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The family a modelspec.architecture / ss_base_model_version value names, or None."""
    for key in METADATA_ARCH_KEYS:
        value = (metadata.get(key) or "").strip().lower()
        if not value:
            continue
        # longest matching name wins ("stable-diffusion-v1" must not take "stable-diffusion-v1x")
        best = max(
            (
                (len(n), fam.arch)
                for fam in FAMILIES.values()
                for n in fam.metadata_names
                if value.startswith(n)
            ),
            default=None,
        )
        if best:
            return best[1]
    for fam in FAMILIES.values():  # old kohya files: ss_v2 = "True"
        if any((metadata.get(flag) or "").strip().lower() == "true" for flag in fam.legacy_flags):
            return fam.arch
    return None


def _most_specific(matches: list[tuple[Family, Layout]]) -> list[tuple[Family, Layout]]:
    """Drop a match whose probe tensors are a strict subset of another family's match.

    Families built on another's layout (Chroma and FLUX.2 on FLUX.1's `double_blocks`) add probes for what
    only they have; the older family's probes then say nothing against them, and the new module does not
    have to edit the old one.
    """
    keys = [(fam, {lay.prefix + p.key for p in lay.probes}) for fam, lay in matches]
    return [
        m
        for m, (fam, own) in zip(matches, keys, strict=True)
        if not any(other is not fam and own < theirs for other, theirs in keys)
    ]


def _matches(layout: Layout, tensors: Mapping[str, TensorInfo]) -> bool:
    for probe in layout.probes:
        info = tensors.get(layout.prefix + probe.key)
        if info is None:
            return False
        if probe.dim is not None and (len(info.shape) <= probe.dim or info.shape[probe.dim] != probe.size):
            return False
    return True


def _near_misses(tensors: Mapping[str, TensorInfo], names: _Names, notes: list[str]) -> list[str]:
    """Families whose sentinel tensors exist but with other sizes (a refiner, a distilled UNet, ...)."""
    found: list[str] = []
    for fam in FAMILIES.values():
        for lay in fam.layouts:
            present = [p for p in lay.probes if lay.prefix + p.key in tensors]
            if present and fam.arch not in found:
                found.append(fam.arch)
                for p in present:
                    shape = list(tensors[lay.prefix + p.key].shape)
                    if p.dim is not None:
                        notes.append(
                            f"{lay.prefix + p.key} is {shape}; {fam.arch} has {p.size} at dim {p.dim}"
                        )
    if not found:
        for fam in FAMILIES.values():
            te_roots = [
                root for te in fam.text_encoders for root, _ in te.roots if root not in DIFFUSERS_FOLDERS
            ]
            if any(names.has_prefix(root) for root in te_roots):
                found.append(fam.arch)
        if found:
            notes.append("only text encoder tensors recognised")
    return found


def _text_encoder_roots(text_encoders: tuple[TextEncoder, ...], names: _Names) -> list[tuple[str, str, str]]:
    """(component, root, kind) of each text encoder slot whose root has tensors (first root that does)."""
    found = []
    for te in text_encoders:
        for root, kind in te.roots:
            if names.has_prefix(root):
                found.append((te.component, root, kind))
                break
    return found


class _Names:
    """A checkpoint's tensor names, sorted: whether one starts with a prefix is a bisection. Detection
    asks ~20 prefixes; a scan of every name per prefix is seconds for a header of 10^6 tensors."""

    def __init__(self, tensors: Mapping[str, TensorInfo]) -> None:
        self._sorted = sorted(tensors)

    def has_prefix(self, prefix: str) -> bool:
        i = bisect.bisect_left(self._sorted, prefix)  # names starting with `prefix` come first from here
        return i < len(self._sorted) and self._sorted[i].startswith(prefix)


def _components(
    tensors: Mapping[str, TensorInfo], names: _Names, roots: list[tuple[str, str, str]]
) -> dict[str, ComponentInfo]:
    """Assign every tensor to the longest root it starts with (the VAE's too) and sum up each component."""
    roots = list(roots)
    for root in VAE_ROOTS:
        if names.has_prefix(root):
            roots.append(("vae", root, "vae"))
            break
    by_length = sorted(roots, key=lambda r: len(r[1]), reverse=True)
    counts: dict[str, list] = {name: [0, {}, 0] for name, _, _ in roots}
    any_root = tuple(root for _, root, _ in roots)
    for key, info in tensors.items():
        if not key.startswith(any_root):  # one C call for a name outside every component
            continue
        for name, root, _ in by_length:
            if key.startswith(root):
                entry = counts[name]
                if dtypes.BY_TAG[info.dtype].is_float:
                    entry[0] += info.numel
                entry[1][info.dtype] = entry[1].get(info.dtype, 0) + 1
                entry[2] += 1
                break
    return {
        name: ComponentInfo(name, root, kind, counts[name][0], counts[name][1], counts[name][2])
        for name, root, kind in roots
    }


def _notes(fam: Family, lay: Layout, tensors: Mapping[str, TensorInfo], names: _Names) -> list[str]:
    notes = []
    if names.has_prefix("model_ema."):
        notes.append("has an EMA copy (model_ema.*); it is never patched")
    for variant in fam.variants:
        if variant.naming is not None and variant.naming != lay.naming:
            continue
        info = tensors.get(lay.prefix + variant.key)
        if variant.sizes:
            if info is not None and len(info.shape) > variant.dim and info.shape[variant.dim] in variant.sizes:
                notes.append(variant.sizes[info.shape[variant.dim]])
        elif variant.dim is not None:
            if info is not None and len(info.shape) > variant.dim and info.shape[variant.dim] != variant.size:
                notes.append((variant.present or "").format(size=info.shape[variant.dim]))
        elif info is not None and variant.present:
            notes.append(variant.present)
        elif info is None and variant.absent:
            notes.append(variant.absent)
    if any(k.endswith("scaled_fp8") for k in tensors):
        notes.append("scaled fp8 checkpoint (scale_weight per layer)")
    return notes
