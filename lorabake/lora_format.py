"""What a LoRA file holds, read from its header: modules, flavour, base architecture, scales.

A LoRA file is a flat dict of `<stem><suffix>` keys. This module peels the adapter suffix off
each key with the adapters' grammar (`lorabake.adapters.SUFFIXES`, longest match first), groups
the parts by stem into `LoraModule`s, has the adapter registry check each module's factors, and
reads the naming flavour and the base architecture the LoRA was trained for. Data is read only
for the scalars (alpha, scale), decoded without torch. It never parses a stem backwards into a
checkpoint name: that is the planner's job.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from lorabake import adapters
from lorabake.adapters import peft
from lorabake.adapters.base import PartError
from lorabake.adapters.grammar import looks_like_lora, split, split_key
from lorabake.adapters.scale import decode_scalar, scale_of
from lorabake.errors import LoraFormatError
from lorabake.st_header import TensorInfo
from lorabake.types import LoraModule

# --------------------------------------------------------------------------------------------
# The key grammar
# --------------------------------------------------------------------------------------------

PART_NAMES = adapters.PART_NAMES
ALGORITHMS = adapters.ALGORITHMS
SUFFIXES = adapters.SUFFIXES
__all__ = ["looks_like_lora", "parse_lora", "split_key"]


# --------------------------------------------------------------------------------------------
# Flavours and components
# --------------------------------------------------------------------------------------------

FLAVOURS = (
    "kohya", "lycoris", "diffusers", "peft", "aitoolkit-flux", "diffusers-flux",
    "comfyui", "xlabs", "onetrainer", "mixed", "unknown",
)  # fmt: skip

# prefix -> flavour family. "diffusers" is split into diffusers/peft by the suffix spelling.
_FLAVOUR_PREFIXES = (
    ("lycoris_", "lycoris"),  # SimpleTuner / LyCORIS wrapper
    ("lora_unet_", "kohya"),
    ("lora_te_", "kohya"),
    ("lora_te1_", "kohya"),
    ("lora_te2_", "kohya"),
    ("lora_te3_", "kohya"),
    ("oft_unet_", "kohya"),  # kohya oft.py
    ("lora_prior_unet_", "kohya"),  # Stable Cascade
    ("lora_prior_te_", "kohya"),
    ("lora_transformer_", "onetrainer"),
    ("model.diffusion_model.", "comfyui"),
    ("diffusion_model.", "comfyui"),
    ("text_encoders.", "comfyui"),
    ("unet.base_model.model.", "peft"),
    ("base_model.model.", "peft"),
    ("unet.", "diffusers"),
    ("transformer.", "diffusers"),
    ("text_encoder.", "diffusers"),
    ("text_encoder_2.", "diffusers"),
    ("text_encoder_3.", "diffusers"),
)
_FLAVOUR_PREFIXES_LONGEST_FIRST = tuple(sorted(_FLAVOUR_PREFIXES, key=lambda p: -len(p[0])))

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
    ("base_model.model.", "body", None),
    ("", "body", None),  # DiffSynth, BFL, XLabs: no prefix
)
_COMPONENT_PREFIXES_LONGEST_FIRST = tuple(sorted(_COMPONENT_PREFIXES, key=lambda p: -len(p[0])))

# Top-level module names of DiT models (Flux BFL/diffusers, SD3 MMDiT/diffusers). UNets have
# `transformer_blocks` only nested inside attentions, never first.
_DIT_BODY_STARTS = (
    "double_blocks_", "single_blocks_", "joint_blocks_", "transformer_blocks_",
    "single_transformer_blocks_", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
    "final_layer", "x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out",
    "pos_embed", "t_embedder", "y_embedder",
)  # fmt: skip


def module_component_hint(stem: str) -> str | None:
    """"unet" | "dit" | "te1" | "te2" | "te3" | None, from the stem's prefix only.

    The index is the prefix's (kohya `lora_te2_`, diffusers `text_encoder_2.`, ComfyUI
    `text_encoders.clip_g.` -> "te2"; `text_encoders.t5xxl.` -> "te3"). Which encoder that is
    depends on the architecture (Flux OneTrainer writes T5 as `lora_te2_`): the planner
    resolves it with the family's text-encoder table. Unprefixed stems are "dit" when they start with
    a DiT block name, else None.
    """
    for prefix, component, default in _COMPONENT_PREFIXES_LONGEST_FIRST:
        if stem.startswith(prefix):
            if component != "body":
                return component
            body = stem[len(prefix):].replace(".", "_")
            return "dit" if body.startswith(_DIT_BODY_STARTS) else default
    return None  # unreachable: "" matches every stem


def _module_flavour(stem: str, module: LoraModule, spelling: str | None) -> str:
    family = None
    for prefix, fam in _FLAVOUR_PREFIXES_LONGEST_FIRST:
        if stem.startswith(prefix):
            family = fam
            break
    if family == "kohya":
        lycoris_only = module.algo != "lora" or module.dora or "mid" in module.parts
        return "lycoris" if lycoris_only else "kohya"
    if family == "diffusers":
        return "diffusers" if spelling == "diffusers" else "peft"
    if family is not None:
        return family
    # no known prefix: the suffix spelling decides
    return {"xlabs": "xlabs", "diffusers": "diffusers", "peft": "peft"}.get(spelling or "", "unknown")


# --------------------------------------------------------------------------------------------
# Base architecture
# --------------------------------------------------------------------------------------------

ARCHS = ("sd1", "sd2", "sdxl", "sd3", "flux", "unknown")

# metadata key -> ((value prefix, arch), ...); first key present wins. Values lower-cased.
_METADATA_ARCH = (
    (
        "modelspec.architecture",  # kohya sai_model_spec: "<arch>/lora"
        (
            ("stable-diffusion-xl", "sdxl"),
            ("stable-diffusion-v1", "sd1"),
            ("stable-diffusion-v2", "sd2"),
            ("stable-diffusion-v3", "sd3"),
            ("stable-diffusion-3", "sd3"),
            ("flux", "flux"),
        ),
    ),
    (
        "ss_base_model_version",  # kohya train_util: sd_v1, sd_v2[_v], sdxl_base_v1-0, sd3, flux1
        (("sdxl", "sdxl"), ("sd_v1", "sd1"), ("sd_v2", "sd2"), ("sd3", "sd3"), ("flux", "flux")),
    ),
    ("ss_v2", (("true", "sd2"),)),  # old kohya files: "True" / "False"
)

# Name signatures, matched against stems with "." spelled "_". Strong ones first; within the
# table, earlier rows win. (arch, regex, why)
_NAME_SIGNATURES = (
    ("flux", r"(^|_)(double_blocks|single_blocks|single_transformer_blocks)_\d", "Flux block names"),
    ("sd3", r"(^|_)joint_blocks_\d|context_block", "SD3 MMDiT block names"),
    # kohya names SDXL UNet modules by SGM path; SD1/SD2 by diffusers path
    ("sdxl", r"^lora_unet_(input_blocks|middle_block|output_blocks)_", "kohya SGM UNet names"),
    # transformer depth > 1 inside a UNet attention exists only in SDXL
    ("sdxl", r"(attentions_\d+|blocks_\d+_1)_transformer_blocks_[1-9]", "UNet transformer depth > 1"),
)
_WEAK_NAME_SIGNATURES = (
    ("sdxl", r"^(lora_te2_|text_encoder_2_)", "a second text encoder"),
)

# Shape signatures: (stem regex, {input features: arch}, why).
_SHAPE_SIGNATURES = (
    (r"attn2(_processor)?_to_k$", {768: "sd1", 1024: "sd2", 2048: "sdxl"}, "cross-attention to_k input width"),
    (r"(^|_)transformer_blocks_\d+_attn_to_q$", {3072: "flux", 1536: "sd3", 2432: "sd3"}, "DiT width"),
    (r"^(lora_te1?_|text_encoder_)text_model_encoder_layers_\d+_self_attn_q_proj$", {1024: "sd2"}, "OpenCLIP-H text width"),
)

_NAME_RES = tuple((arch, re.compile(rx), why) for arch, rx, why in _NAME_SIGNATURES)
_WEAK_NAME_RES = tuple((arch, re.compile(rx), why) for arch, rx, why in _WEAK_NAME_SIGNATURES)
_SHAPE_RES = tuple((re.compile(rx), widths, why) for rx, widths, why in _SHAPE_SIGNATURES)


def _arch_from_metadata(metadata: Mapping[str, str]) -> tuple[str, str] | None:
    for key, table in _METADATA_ARCH:
        value = metadata.get(key)
        if not value:
            continue
        low = value.strip().lower()
        for prefix, arch in table:
            if low.startswith(prefix):
                return arch, f"{key}={value!r}"
    return None


def _in_features(module: LoraModule, tensors: Mapping[str, TensorInfo]) -> int | None:
    """Input width of the adapted layer (kernel excluded) for the factor types that show it."""
    p = module.parts

    def dim(part: str, i: int) -> int:
        return tensors[p[part]].shape[i]

    if module.algo == "lora":
        return dim("down", 1)
    if module.algo == "loha":
        return dim("hada_w1_b", 1)
    if module.algo == "lokr":
        c = dim("lokr_w1", 1) if "lokr_w1" in p else dim("lokr_w1_b", 1)
        d = dim("lokr_w2", 1) if "lokr_w2" in p else dim("lokr_w2_b", 1)
        return c * d
    if module.algo == "full" and "diff" in p and len(tensors[p["diff"]].shape) >= 2:
        return dim("diff", 1)
    return None


def _arch_from_tensors(
    modules: Mapping[str, LoraModule], tensors: Mapping[str, TensorInfo]
) -> tuple[str, str, str] | None:
    """(arch, source, reason) from names, then shapes, then weak names."""
    flat = {stem: stem.replace(".", "_") for stem in modules}
    for arch, rx, why in _NAME_RES:
        for stem, name in flat.items():
            if rx.search(name):
                return arch, "names", f"{why} ({stem})"
    for rx, widths, why in _SHAPE_RES:
        for stem, name in flat.items():
            if rx.search(name):
                width = _in_features(modules[stem], tensors)
                if width in widths:
                    return widths[width], "shapes", f"{why} {width} ({stem})"
    for arch, rx, why in _WEAK_NAME_RES:
        for stem, name in flat.items():
            if rx.search(name):
                return arch, "names", f"{why} ({stem})"
    return None


# --------------------------------------------------------------------------------------------
# Grouping and checks
# --------------------------------------------------------------------------------------------

_CORRUPT = "the file is damaged or was assembled from different LoRAs; re-export it from the trainer"
# Largest magnitude an alpha or scale may have: what fp32, the bake's arithmetic, represents.
_FP32_MAX = 3.4028234663852886e38


def _fail(message: str, path: str, key: str, hint: str | None = None) -> LoraFormatError:
    return LoraFormatError(message, path=path, tensor=key, hint=hint)


def _build_module(
    stem: str, parts: dict[str, str], tensors: Mapping[str, TensorInfo], path: str
) -> LoraModule | None:
    """The module for `stem`, or None when its parts do not make one (orphans)."""
    try:
        algo = adapters.algo_of(parts)
        if algo is None:
            if "alpha" in parts:
                raise PartError(f"module {stem!r} has an alpha but no weights", hint=_CORRUPT, part="alpha")
            return None
        if not adapters.get(algo).complete(parts):
            return None
        adapters.check_dtypes(algo, {p: tensors[k].dtype for p, k in parts.items()})
        algo, _natural, rank = adapters.resolve(algo, {p: tensors[k].shape for p, k in parts.items()})
    except PartError as exc:
        key = parts.get(exc.part) if exc.part else None
        raise _fail(f"module {stem!r}: {exc.message}", path, key or next(iter(parts.values())), exc.hint) from None
    dora = any(p in parts for p in adapters.DORA_PARTS)
    return LoraModule(stem=stem, algo=algo, parts=parts, rank=rank, dora=dora)


def _scalar(read: Callable[[str], bytes], info: TensorInfo, path: str) -> float:
    try:
        value = decode_scalar(read(info.name), info.dtype)
    except ValueError as exc:
        raise _fail(str(exc), path, info.name, _CORRUPT) from None
    if not math.isfinite(value) or abs(value) > _FP32_MAX:
        raise _fail(f"{info.name.rpartition('.')[2]} is {value}, outside what fp32 represents", path, info.name, _CORRUPT)
    return value


def _set_scales(
    modules: Mapping[str, LoraModule],
    tensors: Mapping[str, TensorInfo],
    peft_scales: Mapping[str, float],
    read: Callable[[str], bytes] | None,
    path: str,
) -> None:
    """Each module's alpha and scale, computed once. Without `read`, a module whose scale needs an
    alpha or scale tensor keeps scale None."""
    for stem, module in modules.items():
        needs_data = [p for p in adapters.SCALAR_PARTS if p in module.parts]
        if needs_data and read is None:
            continue
        values = {p: _scalar(read, tensors[module.parts[p]], path) for p in needs_data} if read else {}
        module.alpha = values.get("alpha")
        module.scale = scale_of(
            rank=module.rank, alpha=module.alpha, scale_part=values.get("scale"), peft=peft_scales.get(stem)
        )


# --------------------------------------------------------------------------------------------
# The parsed file
# --------------------------------------------------------------------------------------------


@dataclass
class LoraFile:
    """Everything lorabake knows about a LoRA file from its header.

    - `flavour`: one of FLAVOURS, for the whole file ("mixed" when modules disagree);
      `flavours` counts modules per flavour.
    - `modules`: stem -> LoraModule, in file order. `unknown_keys`: keys that fit no module
      (unknown suffix, orphan parts such as an up without a down), in file order.
    - `arch`: one of ARCHS, the base the LoRA was trained for; `arch_source` is "metadata",
      "names", "shapes" or None; `arch_note` explains a disagreement between metadata and
      tensors (the metadata wins).
    - `peft_scales`: stem -> the scale PEFT's config in `lora_adapter_metadata` gives a module
      without an alpha tensor (alpha/r, or alpha/√r with rsLoRA).
    - `metadata`: the file's `__metadata__`, unchanged.
    """

    path: str
    flavour: str
    flavours: dict[str, int]
    modules: dict[str, LoraModule]
    unknown_keys: list[str]
    arch: str
    arch_source: str | None
    arch_note: str | None
    peft_scales: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def parse_lora(
    tensors: Mapping[str, TensorInfo],
    metadata: dict[str, str],
    *,
    path: str = "",
    read: Callable[[str], bytes] | None = None,
) -> LoraFile:
    """Group a LoRA file's tensors into modules and read its flavour, architecture and scales.

    `tensors` maps key -> TensorInfo (the header, in file order). `read(key)` gives a tensor's raw
    bytes; with it each module's alpha and scale are read (without it, only the scales the header
    and metadata decide). Raises `LoraFormatError` (naming the tensor) when two keys give the same
    part of a module, factor shapes or dtypes are wrong, an alpha is not a finite scalar, a stem
    has an alpha but no weights, or one stem mixes adapter types.
    """
    metadata = dict(metadata or {})
    order = {key: i for i, key in enumerate(tensors)}
    groups: dict[str, dict[str, str]] = {}
    spellings: dict[str, str] = {}
    unknown: list[str] = []
    for key in tensors:
        hit = split(key, tensors)
        if hit is None:
            unknown.append(key)
            continue
        stem, part, spelling = hit
        parts = groups.setdefault(stem, {})
        if part in parts:
            raise _fail(
                f"two tensors give the {part!r} part of module {stem!r}: {parts[part]!r} and {key!r}",
                path,
                key,
                hint="the file holds the same module twice (e.g. with and without a PEFT adapter name)",
            )
        parts[part] = key
        if spelling is not None:
            spellings.setdefault(stem, spelling)

    modules: dict[str, LoraModule] = {}
    for stem, parts in groups.items():
        module = _build_module(stem, parts, tensors, path)
        if module is None:
            unknown.extend(parts.values())
        else:
            modules[stem] = module
    unknown.sort(key=order.__getitem__)

    scales = peft.peft_scales(modules, metadata, path)
    _set_scales(modules, tensors, scales, read, path)
    arch, arch_source, arch_note = _detect_arch(modules, tensors, metadata)
    flavours = _count_flavours(modules, spellings, metadata, arch)
    return LoraFile(
        path=path,
        flavour=_file_flavour(flavours),
        flavours=flavours,
        modules=modules,
        unknown_keys=unknown,
        arch=arch,
        arch_source=arch_source,
        arch_note=arch_note,
        peft_scales=scales,
        metadata=metadata,
    )


def _detect_arch(
    modules: Mapping[str, LoraModule], tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str]
) -> tuple[str, str | None, str | None]:
    from_meta = _arch_from_metadata(metadata)
    from_tensors = _arch_from_tensors(modules, tensors)
    if from_meta is None:
        if from_tensors is None:
            return "unknown", None, None
        return from_tensors[0], from_tensors[1], None
    arch, said = from_meta
    note = None
    if from_tensors is not None and from_tensors[0] != arch:
        note = (
            f"metadata says {arch} ({said}) but tensor {from_tensors[1]} say {from_tensors[0]}: "
            f"{from_tensors[2]}"
        )
    return arch, "metadata", note


def _count_flavours(
    modules: Mapping[str, LoraModule], spellings: Mapping[str, str], metadata: Mapping[str, str], arch: str
) -> dict[str, int]:
    counts: dict[str, int] = {}
    from_lycoris = metadata.get("ss_network_module", "").startswith("lycoris")
    aitoolkit = "ai-toolkit" in metadata.get("software", "")
    for stem, module in modules.items():
        flavour = _module_flavour(stem, module, spellings.get(stem))
        if flavour == "kohya" and from_lycoris:
            flavour = "lycoris"  # LyCORIS LoCon writes kohya names and spelling
        if flavour == "peft" and arch == "flux" and stem.startswith("transformer."):
            # diffusers' Flux pipeline and ai-toolkit write the same names; ai-toolkit says so
            # in its `software` metadata (toolkit/metadata.py)
            flavour = "aitoolkit-flux" if aitoolkit else "diffusers-flux"
        counts[flavour] = counts.get(flavour, 0) + 1
    if "kohya" in counts and "lycoris" in counts:
        # LyCORIS presets mix LoCon (kohya-spelled) and LoHa/LoKr modules in one file
        counts["lycoris"] += counts.pop("kohya")
    return counts


def _file_flavour(counts: Mapping[str, int]) -> str:
    known = [f for f in counts if f != "unknown"]
    if len(known) == 1:
        return known[0]
    if len(known) > 1:
        return "mixed"
    return "unknown"
