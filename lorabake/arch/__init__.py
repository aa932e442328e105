"""The family registry: every module of this package that defines `FAMILY` is a model family.

How to add a family (say `lorabake/arch/myfam.py`):

1. Write one module with `FAMILY = Family(...)` (row types in `lorabake.arch.common`). It declares,
   as data: the id and title; `metadata_names` (prefixes of `modelspec.architecture` /
   `ss_base_model_version`) and the `modelspec`/`kohya` values extract writes; the `layouts` a
   checkpoint comes in (native, ComfyUI `model.diffusion_model.`, diffusers `transformer.`, bare)
   with probe tensors and the sizes that tell it from look-alikes; its `text_encoders` (roots per
   layout, kind, LoRA prefixes); `renames` tables from the checkpoint's naming to diffusers'/trainers'
   (a comment on each row that is not obvious; fused targets as `Alias(part=...)` bands);
   `lora_prefixes`; `kohya_names`; `extract_targets`; `variants` (notes); `block_groups`; and
   `structures`, every weight of the diffusion model as `<key> <shape>` rows (scripts/family_structure.py
   prints them from a key list), from which `lorabake.lora_base` builds a virtual checkpoint to match
   a LoRA alone against. A text encoder kind no family has yet goes in `text_encoder_kinds`.
2. Add its key list to `tests/data/arch/` (real names, real shapes) and rows to the tests: a
   detection row, rule-table rows (LoRA stem -> base key) per trainer spelling, and a cross-check
   against diffusers' converter or `fuse_lora` where one exists.

Nothing else is edited: detection, the rule table, LoRA base matching, extraction and inspect all
read `FAMILIES`. Modules whose name starts with `_` hold rows several families share (the SD UNet
block table, text encoder kinds); `common` holds the row types.
"""

from __future__ import annotations

import importlib
import pkgutil

from lorabake.arch._text import TEXT_ENCODER_KINDS as _SHARED_KINDS
from lorabake.arch.common import Family, TextEncoderKind


def _discover() -> dict[str, Family]:
    found: list[Family] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "common":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if not isinstance(family, Family):
            raise ImportError(
                f"lorabake.arch.{info.name} defines no FAMILY (rows shared by families go in a _module)"
            )
        found.append(family)
    found.sort(key=lambda f: (f.order, f.arch))
    ids = [f.arch for f in found]
    if len(set(ids)) != len(ids):
        raise ImportError(f"two family modules declare the same id: {sorted(ids)}")
    return {f.arch: f for f in found}


# id -> Family, in report order (`Family.order`); the order decides nothing.
FAMILIES: dict[str, Family] = _discover()

# Text encoder kinds: the shared ones plus those a family declares for itself.
TEXT_ENCODER_KINDS: dict[str, TextEncoderKind] = {
    **_SHARED_KINDS,
    **{kind: row for f in FAMILIES.values() for kind, row in f.text_encoder_kinds.items()},
}

# arch -> names other tools use for it: modelspec.architecture and kohya's ss_base_model_version.
ARCH_NAMES: dict[str, dict[str, str]] = {
    f.arch: {"title": f.title, "modelspec": f.modelspec, "kohya": f.kohya} for f in FAMILIES.values()
}

__all__ = ["ARCH_NAMES", "FAMILIES", "TEXT_ENCODER_KINDS", "Family"]
