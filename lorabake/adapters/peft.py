"""PEFT's LoraConfig in a LoRA file's `lora_adapter_metadata`: the scale of modules without alpha.

PEFT files carry no alpha tensors; the config does: scale = lora_alpha / r (LoKrConfig: alpha / r),
or lora_alpha / √r with rsLoRA, with `alpha_pattern` / `rank_pattern` overriding per module. This
module returns that scale itself, never a stand-in alpha.

Two layouts, both JSON (diffusers `loaders/lora_base.py` LORA_ADAPTER_METADATA_KEY):
 - model save (`loaders/peft.py` save_lora_adapter): the LoraConfig dict itself,
   {"r": 4, "lora_alpha": 8, "alpha_pattern": {...}, ...}, tensor keys unprefixed;
 - pipeline save (`_save_lora_weights` -> `_pack_dict_with_prefix`): each component's config
   flattened with its prefix, {"unet.r": 4, "unet.lora_alpha": 8, "text_encoder.r": 8, ...},
   tensor keys prefixed the same way ("unet.", "text_encoder.", "transformer.", ...).
Patterns are matched as peft `get_pattern_key` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from lorabake import limits, peft_patterns
from lorabake.errors import LoraFormatError
from lorabake.st_header import parse_json
from lorabake.types import LoraModule

ADAPTER_METADATA_KEY = "lora_adapter_metadata"
_CONFIG_MARKERS = ("r", "lora_alpha", "alpha", "peft_type")
# algo -> the config field holding its alpha
_ALPHA_FIELD = {"lora": "lora_alpha", "lokr": "alpha"}


def _adapter_configs(metadata: Mapping[str, str], path: str) -> list[tuple[str, dict]]:
    """[(prefix, config)], prefix "" for the unprefixed model layout."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return []
    doc = parse_json(raw, what=f"metadata {ADAPTER_METADATA_KEY!r}", path=path, error=LoraFormatError)
    if not isinstance(doc, dict):
        raise LoraFormatError(
            f"metadata {ADAPTER_METADATA_KEY!r} is a JSON {type(doc).__name__}, not an object", path=path
        )
    if any(k in doc for k in _CONFIG_MARKERS):
        return [("", doc)]
    grouped: dict[str, dict] = {}
    for key, value in doc.items():
        prefix, sep, name = key.partition(".")
        if sep:
            grouped.setdefault(prefix, {})[name] = value
    return list(grouped.items())


def _pattern_value(patterns: object, name: str, path: str) -> object | None:
    """peft `get_pattern_key`: first pattern P (dict order) with re.match(rf"(.*\\.)?({P})$", name),
    under the length and time bounds of `peft_patterns`."""
    return peft_patterns.pattern_value(patterns, name, path=path)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def peft_scales(modules: Mapping[str, LoraModule], metadata: Mapping[str, str], path: str) -> dict[str, float]:
    """stem -> PEFT's scale, for LoRA/LoKr modules without an alpha tensor whose config gives one."""
    configs = _adapter_configs(metadata, path)
    if not configs:
        return {}
    out: dict[str, float] = {}
    for stem, module in modules.items():
        if "alpha" in module.parts or module.rank is None or module.algo not in _ALPHA_FIELD:
            # PEFT LoKr with both factors full still scales by alpha/r, but without a rank in the
            # file lorabake keeps scale 1 there, as ComfyUI does.
            continue
        for prefix, config in configs:
            if prefix and not stem.startswith(prefix + "."):
                continue
            name = stem[len(prefix) + 1:] if prefix else stem
            name = name.removeprefix("base_model.model.")
            alpha = _pattern_value(config.get("alpha_pattern"), name, path)
            if alpha is None:
                alpha = config.get(_ALPHA_FIELD[module.algo])
            if not _number(alpha):
                break
            if not limits.fits_fp32(alpha):
                raise LoraFormatError(f"{ADAPTER_METADATA_KEY} alpha {str(alpha)[:24]} is outside what fp32 holds", path=path, tensor=stem)
            r = _pattern_value(config.get("rank_pattern"), name, path)
            if r is None:
                r = config.get("r")
            if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
                r = module.rank
            rslora = config.get("use_rslora") and module.algo == "lora"
            out[stem] = alpha / math.sqrt(r) if rslora else alpha / r
            break
    return out
