"""What a LoRA file holds, read from its header: modules, flavour, scales.

A LoRA file is a flat dict of `<stem><suffix>` keys. This module peels the adapter suffix off
each key with the adapters' grammar (`lorabake.adapters.SUFFIXES`, longest match first), groups
the parts by stem into `LoraModule`s, has the adapter registry check each module's factors, and
reads the naming flavour (which family the LoRA is for is `lorabake.lora_base`'s to decide). Data is read only
for the scalars (alpha, scale), decoded without torch. It never parses a stem backwards into a
checkpoint name: that is the planner's job.
"""

from __future__ import annotations

import math
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

# A family may rename "peft" once the LoRA's family is known (`Family.flavours`).
FLAVOURS = (
    "kohya", "lycoris", "diffusers", "peft",
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
    - `arch`: the family the LoRA is for, as `lorabake.lora_base` decided it ("unknown" until
      then); `arch_source` says how ("rule tables", "metadata", "base"); `arch_note` explains a
      disagreement or an ambiguity.
    - `peft_scales`: stem -> the scale PEFT's config in `lora_adapter_metadata` gives a module
      without an alpha tensor (alpha/r, or alpha/√r with rsLoRA).
    - `metadata`: the file's `__metadata__`, unchanged.
    """

    path: str
    flavour: str
    flavours: dict[str, int]
    modules: dict[str, LoraModule]
    unknown_keys: list[str]
    peft_scales: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    # filled by `lorabake.lora_base` (matching, or the base's family), never by parsing
    arch: str = "unknown"
    arch_source: str | None = None
    arch_note: str | None = None


def parse_lora(
    tensors: Mapping[str, TensorInfo],
    metadata: dict[str, str],
    *,
    path: str = "",
    read: Callable[[str], bytes] | None = None,
) -> LoraFile:
    """Group a LoRA file's tensors into modules and read its flavour and scales.

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
    flavours = _count_flavours(modules, spellings, metadata)
    return LoraFile(
        path=path,
        flavour=_file_flavour(flavours),
        flavours=flavours,
        modules=modules,
        unknown_keys=unknown,
        peft_scales=scales,
        metadata=metadata,
    )


def _count_flavours(
    modules: Mapping[str, LoraModule], spellings: Mapping[str, str], metadata: Mapping[str, str]
) -> dict[str, int]:
    counts: dict[str, int] = {}
    from_lycoris = metadata.get("ss_network_module", "").startswith("lycoris")
    for stem, module in modules.items():
        flavour = _module_flavour(stem, module, spellings.get(stem))
        if flavour == "kohya" and from_lycoris:
            flavour = "lycoris"  # LyCORIS LoCon writes kohya names and spelling
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
