"""What a LoRA file holds, read from its header only: modules, flavour, base architecture, alphas.

A LoRA file is a flat dict of `<stem><suffix>` keys. This module peels the adapter suffix off
each key with one data table (`SUFFIXES`, longest match first), groups the parts by stem into
`LoraModule`s, checks that the factor shapes fit together, and reads the naming flavour and the
base architecture the LoRA was trained for. It never reads a tensor's data, and never parses a
stem backwards into a checkpoint name: that is the planner's job.

The PEFT config in `lora_adapter_metadata` follows diffusers `loaders/lora_base.py` and peft `get_pattern_key`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from lorabake.errors import LoraFormatError
from lorabake.st_header import TensorInfo
from lorabake.types import LoraModule

# --------------------------------------------------------------------------------------------
# Canonical parts and algorithms
# --------------------------------------------------------------------------------------------

PART_NAMES = (
    "up", "down", "mid", "up_bias", "alpha", "scale", "dora_scale", "magnitude",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b", "w_norm", "b_norm", "ia3_weight", "on_input",
    "oft_blocks", "oft_diag", "rescale",
    "glora_a1", "glora_a2", "glora_b1", "glora_b2",
    "set_weight", "reshape_weight",
)  # fmt: skip

ALGORITHMS = ("lora", "loha", "lokr", "full", "norm", "ia3", "oft", "boft", "glora", "set")

# Which algorithm a part belongs to. Parts not listed here are modifiers that ride along with
# any algorithm: alpha, scale, dora_scale, magnitude, reshape_weight, and diff_b (a bias delta;
# alone it makes a "full" module).
_PART_ALGO = {
    "up": "lora", "down": "lora", "mid": "lora", "up_bias": "lora",
    "hada_w1_a": "loha", "hada_w1_b": "loha", "hada_w2_a": "loha", "hada_w2_b": "loha",
    "hada_t1": "loha", "hada_t2": "loha",
    "lokr_w1": "lokr", "lokr_w1_a": "lokr", "lokr_w1_b": "lokr", "lokr_w2": "lokr",
    "lokr_w2_a": "lokr", "lokr_w2_b": "lokr", "lokr_t2": "lokr",
    "diff": "full", "w_norm": "norm", "b_norm": "norm",
    "ia3_weight": "ia3", "on_input": "ia3",
    "oft_blocks": "oft", "oft_diag": "oft", "rescale": "oft",
    "glora_a1": "glora", "glora_a2": "glora", "glora_b1": "glora", "glora_b2": "glora",
    "set_weight": "set",
}  # fmt: skip


@dataclass(frozen=True)
class Suffix:
    """One row of the suffix grammar: `text` ends a key, `part` is what that tensor is.

    `spelling` names the family that writes the suffix (used for flavour detection; None for
    parts every family spells the same). `requires` names a guard on the stem (see `_GUARDS`).
    """

    text: str
    part: str
    spelling: str | None = None
    requires: str | None = None


# Every adapter suffix seen in the wild. Order here is for reading; matching sorts longest first.
SUFFIXES: tuple[Suffix, ...] = (
    # kohya sd-scripts, LyCORIS (LoCon; lora_mid = Tucker core), A1111
    Suffix(".lora_up.weight", "up", "kohya"),
    Suffix(".lora_down.weight", "down", "kohya"),
    Suffix(".lora_mid.weight", "mid", "kohya"),
    # PEFT / diffusers-new; a `.default` / `.default_N` adapter infix is stripped first
    Suffix(".lora_B.weight", "up", "peft"),
    Suffix(".lora_A.weight", "down", "peft"),
    Suffix(".lora_B.bias", "up_bias", "peft"),  # PEFT lora_bias=True, BFL control LoRAs
    # Mochi-style PEFT without `.weight`
    Suffix(".lora_B", "up", "peft"),
    Suffix(".lora_A", "down", "peft"),
    # diffusers save format (state_dict_utils.PEFT_TO_DIFFUSERS), UNet attention
    Suffix(".lora.up.weight", "up", "diffusers"),
    Suffix(".lora.down.weight", "down", "diffusers"),
    # diffusers/transformers text encoder
    Suffix(".lora_linear_layer.up.weight", "up", "diffusers"),
    Suffix(".lora_linear_layer.down.weight", "down", "diffusers"),
    # old diffusers attention processors: `…attn1.processor.to_q_lora.up.weight`, old TE
    # `…self_attn.to_q_lora.up.weight`; the stem keeps `processor.to_q` / `to_q`
    Suffix("_lora.up.weight", "up", "diffusers", requires="attnproc"),
    Suffix("_lora.down.weight", "down", "diffusers", requires="attnproc"),
    # XLabs Flux: `double_blocks.0.processor.qkv_lora1.down.weight`
    Suffix(".up.weight", "up", "xlabs", requires="xlabs"),
    Suffix(".down.weight", "down", "xlabs", requires="xlabs"),
    # scalars and DoRA
    Suffix(".alpha", "alpha"),
    Suffix(".scale", "scale"),  # A1111-only alpha/rank override
    Suffix(".dora_scale", "dora_scale"),  # LyCORIS DoRA
    Suffix(".lora_magnitude_vector", "magnitude", "peft"),  # PEFT save format
    Suffix(".lora_magnitude_vector.weight", "magnitude", "peft"),  # raw PEFT (after infix strip)
    # LyCORIS LoHa
    Suffix(".hada_w1_a", "hada_w1_a"),
    Suffix(".hada_w1_b", "hada_w1_b"),
    Suffix(".hada_w2_a", "hada_w2_a"),
    Suffix(".hada_w2_b", "hada_w2_b"),
    Suffix(".hada_t1", "hada_t1"),
    Suffix(".hada_t2", "hada_t2"),
    # LyCORIS / PEFT LoKr
    Suffix(".lokr_w1", "lokr_w1"),
    Suffix(".lokr_w1_a", "lokr_w1_a"),
    Suffix(".lokr_w1_b", "lokr_w1_b"),
    Suffix(".lokr_w2", "lokr_w2"),
    Suffix(".lokr_w2_a", "lokr_w2_a"),
    Suffix(".lokr_w2_b", "lokr_w2_b"),
    Suffix(".lokr_t2", "lokr_t2"),
    # LyCORIS full / norm, ComfyUI bias diff
    Suffix(".diff", "diff"),
    Suffix(".diff_b", "diff_b"),
    Suffix(".w_norm", "w_norm"),
    Suffix(".b_norm", "b_norm"),
    # IA3: `<stem>.on_input`; `<stem>.weight` is only IA3 next to it (handled in `_split`)
    Suffix(".on_input", "on_input"),
    # LyCORIS / kohya OFT, BOFT; old LyCORIS `oft_diag`
    Suffix(".oft_blocks", "oft_blocks"),
    Suffix(".oft_diag", "oft_diag"),
    Suffix(".rescale", "rescale"),
    # LyCORIS GLoRA (`bm.weight`, the Tucker core, is not supported: listed as unknown)
    Suffix(".a1.weight", "glora_a1"),
    Suffix(".a2.weight", "glora_a2"),
    Suffix(".b1.weight", "glora_b1"),
    Suffix(".b2.weight", "glora_b2"),
    # ComfyUI-only
    Suffix(".set_weight", "set_weight"),
    Suffix(".reshape_weight", "reshape_weight"),
)

_GUARDS = {
    # old attn-proc spells `to_q_lora`, `to_out_lora`: the stem's last segment is `to_*`
    "attnproc": lambda stem: stem.rpartition(".")[2].startswith("to_"),
    # XLabs puts its factors under `<block>.processor.<name>`
    "xlabs": lambda stem: ".processor." in stem,
}

_SUFFIXES_LONGEST_FIRST = tuple(sorted(SUFFIXES, key=lambda s: -len(s.text)))

# PEFT writes `<module>.lora_A.<adapter>.weight` in raw dumps; `.default`/`.default_N` is the
# adapter name PEFT and DiffSynth use. Strip one such segment before suffix matching.
_ADAPTER_INFIX = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)\.default(?:_\d+)?(?=\.weight$|\.bias$|$)")


def _split(key: str, keys: Mapping[str, object]) -> tuple[str, str, str | None] | None:
    """(stem, part, spelling) of `key`, or None when no suffix fits."""
    norm = _ADAPTER_INFIX.sub(r".\1", key) if ".default" in key else key
    for row in _SUFFIXES_LONGEST_FIRST:
        if norm.endswith(row.text) and len(norm) > len(row.text):
            stem = norm[: -len(row.text)]
            if row.requires and not _GUARDS[row.requires](stem):
                continue
            return stem, row.part, row.spelling
    if key.endswith(".weight") and key[: -len(".weight")] + ".on_input" in keys:
        return key[: -len(".weight")], "ia3_weight", None
    return None


def split_key(key: str, keys: Mapping[str, object] | None = None) -> tuple[str, str] | None:
    """(stem, canonical part) of one LoRA key, or None for an unknown suffix.

    `keys` (all keys of the file) is only needed to recognise an IA3 `<stem>.weight`, which is
    one only when `<stem>.on_input` exists.
    """
    hit = _split(key, keys or {})
    return (hit[0], hit[1]) if hit else None


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
# PEFT LoraConfig in `lora_adapter_metadata`
# --------------------------------------------------------------------------------------------

# diffusers `loaders/lora_base.py` LORA_ADAPTER_METADATA_KEY. Two layouts, both JSON:
#  - model save (`loaders/peft.py` save_lora_adapter): the LoraConfig dict itself,
#    {"r": 4, "lora_alpha": 8, "alpha_pattern": {...}, ...}, tensor keys unprefixed;
#  - pipeline save (`_save_lora_weights` -> `_pack_dict_with_prefix`): each component's config
#    flattened with its prefix, {"unet.r": 4, "unet.lora_alpha": 8, "text_encoder.r": 8, ...},
#    tensor keys prefixed the same way ("unet.", "text_encoder.", "transformer.", ...).
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
_CONFIG_MARKERS = ("r", "lora_alpha", "alpha", "peft_type")


def _adapter_configs(metadata: Mapping[str, str], path: str) -> list[tuple[str, dict]]:
    """[(prefix, config)], prefix "" for the unprefixed model layout."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return []
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoraFormatError(
            f"metadata {ADAPTER_METADATA_KEY!r} is not valid JSON ({exc.msg} at char {exc.pos})",
            path=path,
            hint="the PEFT config that holds this LoRA's alphas is unreadable; fix or remove it",
        ) from None
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
    """peft `get_pattern_key`: first pattern P (dict order) with re.match(rf"(.*\\.)?({P})$", name)."""
    if not isinstance(patterns, dict):
        return None
    for pattern, value in patterns.items():
        try:
            hit = re.match(rf"(.*\.)?({pattern})$", name)
        except re.error as exc:
            raise LoraFormatError(
                f"{ADAPTER_METADATA_KEY} pattern {pattern!r} is not a valid regex ({exc})", path=path
            ) from None
        if hit:
            return value
    return None


def _alpha_overrides(
    modules: Mapping[str, LoraModule], metadata: Mapping[str, str], path: str
) -> dict[str, float]:
    """stem -> effective alpha (scale = alpha / module.rank) for modules without an alpha tensor."""
    configs = _adapter_configs(metadata, path)
    if not configs:
        return {}
    out: dict[str, float] = {}
    for stem, module in modules.items():
        if "alpha" in module.parts or module.rank is None or module.algo not in ("lora", "lokr"):
            # PEFT LoKr with both factors full still scales by alpha/r; that cannot be spelled
            # as alpha/rank without a rank, so such modules keep scale 1 (as in ComfyUI).
            continue
        for prefix, config in configs:
            if prefix and not stem.startswith(prefix + "."):
                continue
            name = stem[len(prefix) + 1:] if prefix else stem
            name = name.removeprefix("base_model.model.")
            alpha_field = "lora_alpha" if module.algo == "lora" else "alpha"  # LoKrConfig.alpha
            alpha = _pattern_value(config.get("alpha_pattern"), name, path)
            if alpha is None:
                alpha = config.get(alpha_field)
            if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
                break
            r = _pattern_value(config.get("rank_pattern"), name, path)
            if r is None:
                r = config.get("r")
            if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
                r = module.rank
            if config.get("use_rslora") and module.algo == "lora":
                out[stem] = alpha / math.sqrt(r) * module.rank  # PEFT: scale = alpha / sqrt(r)
            elif r == module.rank:
                out[stem] = float(alpha)
            else:
                out[stem] = alpha / r * module.rank
            break
    return out


def metadata_alpha(lora_file: LoraFile, module: LoraModule) -> float | None:
    """Alpha for `module` from the file's `lora_adapter_metadata`, None when the config gives none.

    Same value as `lora_file.alpha_overrides.get(module.stem)`: an effective alpha, so that
    scale = alpha / module.rank reproduces PEFT's alpha/r (or alpha/sqrt(r) with rsLoRA).
    """
    return lora_file.alpha_overrides.get(module.stem)


# --------------------------------------------------------------------------------------------
# Grouping and shape checks
# --------------------------------------------------------------------------------------------

_SCALAR_SHAPES = ((), (1,))


def _fail(message: str, path: str, key: str, hint: str | None = None) -> LoraFormatError:
    return LoraFormatError(message, path=path, tensor=key, hint=hint)


_CORRUPT = "the file is damaged or was assembled from different LoRAs; re-export it from the trainer"


def _complete(algo: str, parts: Mapping[str, str]) -> bool:
    """Are the parts `algo` needs to give a weight change all there?"""
    has = parts.__contains__
    if algo == "lora":
        return has("up") and has("down")
    if algo == "loha":
        return all(has(p) for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    if algo == "lokr":
        w1 = has("lokr_w1") or (has("lokr_w1_a") and has("lokr_w1_b"))
        w2 = has("lokr_w2") or (has("lokr_w2_a") and has("lokr_w2_b"))
        return w1 and w2
    if algo == "ia3":
        return has("ia3_weight") and has("on_input")
    if algo == "oft":
        return has("oft_blocks") or has("oft_diag")
    if algo == "glora":
        return all(has(p) for p in ("glora_a1", "glora_a2", "glora_b1", "glora_b2"))
    return True  # full, norm, set: any one of their parts is a module


def _build_module(
    stem: str, parts: dict[str, str], tensors: Mapping[str, TensorInfo], path: str
) -> LoraModule | None:
    """The module for `stem`, or None when its parts do not make one (orphans)."""
    families = {_PART_ALGO[p] for p in parts if p in _PART_ALGO}
    if not families and "diff_b" in parts:
        families = {"full"}
    if len(families) > 1:
        listed = ", ".join(f"{p} ({_PART_ALGO[p]})" for p in parts if p in _PART_ALGO)
        raise _fail(
            f"module {stem!r} mixes adapter types that do not combine: {listed}",
            path,
            next(iter(parts.values())),
            hint="a stem holds one adapter (plus alpha/dora/bias diff); the file mixes two trainers' outputs",
        )
    if not families:
        if "alpha" in parts:
            raise _fail(
                f"module {stem!r} has an alpha but no weights", path, parts["alpha"], hint=_CORRUPT
            )
        return None
    algo = families.pop()

    def shape(part: str) -> tuple[int, ...]:
        return tensors[parts[part]].shape

    for scalar in ("alpha", "scale"):
        if scalar in parts and shape(scalar) not in _SCALAR_SHAPES:
            raise _fail(
                f"{scalar} has shape {list(shape(scalar))}, expected a scalar ([] or [1])",
                path,
                parts[scalar],
                hint=_CORRUPT,
            )
    if algo == "loha" and ("hada_t1" in parts) != ("hada_t2" in parts):
        have, miss = ("hada_t1", "hada_t2") if "hada_t1" in parts else ("hada_t2", "hada_t1")
        raise _fail(f"LoHa Tucker module {stem!r} has {have} but no {miss}", path, parts[have], hint=_CORRUPT)
    if algo == "lokr":
        for full, fa, fb in (("lokr_w1", "lokr_w1_a", "lokr_w1_b"), ("lokr_w2", "lokr_w2_a", "lokr_w2_b")):
            if full in parts and (fa in parts or fb in parts):
                raise _fail(
                    f"LoKr module {stem!r} has both {full} and its factors {fa}/{fb}",
                    path,
                    parts[full],
                    hint=_CORRUPT,
                )
    if not _complete(algo, parts):
        return None

    rank = _check_and_rank(algo, stem, parts, shape, path)
    if algo == "oft" and "oft_blocks" in parts:
        ndim = len(shape("oft_blocks"))
        if ndim not in (3, 4):
            raise _fail(
                f"oft_blocks has shape {list(shape('oft_blocks'))}: expected 3-D (OFT) or 4-D (BOFT)",
                path,
                parts["oft_blocks"],
                hint=_CORRUPT,
            )
        algo = "oft" if ndim == 3 else "boft"
    return LoraModule(
        stem=stem,
        algo=algo,
        parts=parts,
        rank=rank,
        dora="dora_scale" in parts or "magnitude" in parts,
    )


def _check_and_rank(algo: str, stem: str, parts: Mapping[str, str], shape, path: str) -> int | None:
    """Check factor shapes against each other (header only) and return the rank, if any."""

    def need_ndim(part: str, ndims: tuple[int, ...]) -> None:
        if len(shape(part)) not in ndims:
            want = " or ".join(f"{n}-D" for n in ndims)
            raise _fail(f"{part} has shape {list(shape(part))}, expected {want}", path, parts[part], hint=_CORRUPT)

    def need_eq(a: str, ai: int, b: str, bi: int, what: str) -> None:
        if shape(a)[ai] != shape(b)[bi]:
            raise _fail(
                f"{what}: {a} {list(shape(a))} dim {ai} is {shape(a)[ai]} but {b} {list(shape(b))} "
                f"dim {bi} is {shape(b)[bi]}",
                path,
                parts[a],
                hint=_CORRUPT,
            )

    if algo == "lora":
        need_ndim("up", (2, 3, 4, 5))
        need_ndim("down", (2, 3, 4, 5))
        if "mid" in parts:
            need_ndim("mid", (4, 3, 5))
            need_eq("mid", 1, "down", 0, "Tucker mid does not fit down")
            need_eq("mid", 0, "up", 1, "Tucker mid does not fit up")
        else:
            need_eq("up", 1, "down", 0, "up and down ranks disagree")
        if "up_bias" in parts and shape("up_bias") != (shape("up")[0],):
            raise _fail(
                f"lora_B.bias has shape {list(shape('up_bias'))}, expected [{shape('up')[0]}] (up's out features)",
                path,
                parts["up_bias"],
                hint=_CORRUPT,
            )
        return shape("down")[0]
    if algo == "loha":
        for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            need_ndim(p, (2,))
        if "hada_t1" in parts:  # Tucker: w?_a [r, out], w?_b [r, in], t? [r, r, kh, kw]
            for n in ("1", "2"):
                need_ndim(f"hada_t{n}", (3, 4, 5))
                need_eq(f"hada_t{n}", 0, f"hada_w{n}_a", 0, "LoHa Tucker core does not fit w_a")
                need_eq(f"hada_t{n}", 1, f"hada_w{n}_b", 0, "LoHa Tucker core does not fit w_b")
            need_eq("hada_w1_a", 1, "hada_w2_a", 1, "LoHa factors disagree on out features")
        else:  # w?_a [out, r], w?_b [r, in*k]
            need_eq("hada_w1_a", 1, "hada_w1_b", 0, "LoHa w1 ranks disagree")
            need_eq("hada_w2_a", 1, "hada_w2_b", 0, "LoHa w2 ranks disagree")
            need_eq("hada_w1_a", 0, "hada_w2_a", 0, "LoHa factors disagree on out features")
        need_eq("hada_w1_b", 1, "hada_w2_b", 1, "LoHa factors disagree on in features")
        return shape("hada_w1_b")[0]
    if algo == "lokr":
        if "lokr_w1_a" in parts:
            need_ndim("lokr_w1_a", (2,))
            need_ndim("lokr_w1_b", (2,))
            need_eq("lokr_w1_a", 1, "lokr_w1_b", 0, "LoKr w1 ranks disagree")
        if "lokr_w2_a" in parts:
            need_ndim("lokr_w2_a", (2,))
            need_ndim("lokr_w2_b", (2,))
            if "lokr_t2" in parts:  # t2 [r, r, kh, kw], w2_a [r, b], w2_b [r, d]
                need_ndim("lokr_t2", (3, 4, 5))
                need_eq("lokr_t2", 0, "lokr_w2_a", 0, "LoKr Tucker core does not fit w2_a")
                need_eq("lokr_t2", 1, "lokr_w2_b", 0, "LoKr Tucker core does not fit w2_b")
            else:
                need_eq("lokr_w2_a", 1, "lokr_w2_b", 0, "LoKr w2 ranks disagree")
        # LoKr: rank from w2's factors, else w1's; both full -> no rank, alpha ignored
        if "lokr_w2_b" in parts:
            return shape("lokr_w2_b")[0]
        if "lokr_w1_b" in parts:
            return shape("lokr_w1_b")[0]
        return None
    if algo == "glora":
        for p in ("glora_a1", "glora_a2", "glora_b1", "glora_b2"):
            need_ndim(p, (2, 3, 4, 5))
        return shape("glora_a2")[0]
    return None


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
    - `alpha_overrides`: stem -> alpha from the PEFT config in `lora_adapter_metadata`, for
      modules without an alpha tensor; an effective alpha so that scale = alpha / rank.
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
    alpha_overrides: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def parse_lora(tensors: Mapping[str, TensorInfo], metadata: dict[str, str], *, path: str = "") -> LoraFile:
    """Group a LoRA file's tensors into modules and read its flavour, architecture and alphas.

    `tensors` maps key -> TensorInfo (the header, in file order); only names and shapes are
    used. Raises `LoraFormatError` (naming the tensor) when two keys give the same part of a
    module, factor shapes disagree, an alpha is not a scalar, a stem has an alpha but no
    weights, or one stem mixes adapter types.
    """
    metadata = dict(metadata or {})
    order = {key: i for i, key in enumerate(tensors)}
    groups: dict[str, dict[str, str]] = {}
    spellings: dict[str, str] = {}
    unknown: list[str] = []
    for key in tensors:
        hit = _split(key, tensors)
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
        alpha_overrides=_alpha_overrides(modules, metadata, path),
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


# Parts only adapter files have (checkpoints end in .weight/.bias/.scale).
_DISTINCTIVE_PARTS = frozenset(PART_NAMES) - {"scale"}


def looks_like_lora(tensors: Mapping[str, TensorInfo]) -> bool:
    """True when at least half the keys are adapter parts: a LoRA, not a checkpoint.

    Checkpoints never end keys in `lora_up.weight`, `lora_A.weight`, `hada_w1_a`, `alpha`, ...;
    the half threshold keeps a checkpoint with a stray leftover adapter tensor a checkpoint.
    """
    if not tensors:
        return False
    hits = 0
    for key in tensors:
        hit = _split(key, tensors)
        if hit is not None and hit[1] in _DISTINCTIVE_PARTS:
            hits += 1
    return 2 * hits >= len(tensors)
