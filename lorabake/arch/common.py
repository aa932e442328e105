"""The row types a family module is written in, and the generic rows every family shares.

Everything here is data; `lorabake.detect`, `lorabake.keymap` and `lorabake.lora_base` hold the
little logic that reads it. The fields of `Family` are the contract a family module fills in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple


class Probe(NamedTuple):
    """A tensor that must exist (relative to the layout's prefix); `size` pins shape[dim] when given."""

    key: str
    dim: int | None = None
    size: int | None = None


class Layout(NamedTuple):
    """One way a family's diffusion model is stored: its root prefix, its naming and its sentinels.

    The first layout whose probes all match decides; the longest prefix wins among several.
    """

    layout: str  # "ldm", "sgm", "comfyui", "bfl", "unet-only", "dit-only", "diffusers", ...
    prefix: str  # diffusion model root, e.g. "model.diffusion_model."; "" for a prefix-less file
    naming: str  # how module names under the root read: the `source` of the Renames that apply
    probes: tuple[Probe, ...]


class TextEncoder(NamedTuple):
    """One text encoder slot: where it may be stored (first present root wins) and its LoRA prefixes."""

    component: str  # "te1" | "te2" | "te3" | "te4"
    roots: tuple[tuple[str, str], ...]  # (key prefix, kind); kind is a row of TEXT_ENCODER_KINDS
    lora_prefixes: tuple[str, ...]  # LoRA-side prefixes; ending in "_" means module path joined with "_"
    # what the encoder is, for a LoRA module skipped on a base without it: "base has no <title> text encoder"
    title: str = ""


def sole_text_encoder(kind: str, title: str) -> TextEncoder:
    """The one text encoder of a DiT family: ComfyUI stores it as `text_encoders.<kind>.transformer.`, a
    diffusers folder as `text_encoder/`; LoRAs name it `lora_te_`/`lora_te1_` (kohya), `text_encoder.`
    (PEFT/diffusers) or by ComfyUI's key. One constructor, since every such family spells it alike."""
    comfy = f"text_encoders.{kind}.transformer."
    return TextEncoder(
        "te1", ((comfy, kind), ("text_encoder.", kind)), ("lora_te_", "lora_te1_", "text_encoder.", comfy), title=title
    )


class TextEncoderKind(NamedTuple):
    """What a text encoder kind (CLIP-L, OpenCLIP-G, T5, ...) is called and which of its modules trainers target."""

    naming: str  # "hf" (transformers names) | "openclip" (raw OpenCLIP with fused in_proj) | ...
    renames: tuple[Renames, ...]
    extract_targets: tuple[str, ...]  # module suffixes (parameter included)
    clip: bool = False  # a CLIP text model: gets the `text_model.`-less spellings (see keymap)
    structure: str = ""  # its weights under its root, as `structure` rows (see Family.structure)


class Alias(NamedTuple):
    """One other name of a checkpoint module: `name` (a template with {n} = block index).

    `part` selects rows of a fused weight: a name in PARTS, or (start, stop) whose bounds are
    rows in units of the weight's in-features H, or (h, r) pairs meaning h·H + r·R with R the
    weight's rows (stop None = to the end). So bands are read from the shape: GQA's k and v share
    what q (H rows) leaves, halves are R/2; a band that does not fit the weight's shape drops the row.
    `transform` is applied to ΔW; `rows`, when set, restricts the row to weights with
    rows == rows × H.
    """

    name: str
    part: str | tuple[float | tuple[float, float], float | tuple[float, float] | None] | None = None
    transform: str | None = None
    rows: int | None = None
    # the name is a fused module spanning several base tensors: the rows of its ΔW that land on this
    # one, a name in SPREAD_PARTS (bounds as in PARTS, with R = this tensor's rows)
    spread: str | None = None


class Block(NamedTuple):
    """A block prefix renamed as a whole: the rest of the module path follows, through `inner` if given."""

    name: str  # the block's prefix in the target naming
    inner: Mapping[str, str] | None = None  # renames of the path under the block (resnet sub-modules)
    rule: str = ""  # the row of the block table this came from, for `inspect --keys`


class Renames(NamedTuple):
    """Names in naming `target` for modules named in naming `source`.

    Three kinds of row, tried in this order: `modules` (exact module path, or the path with its
    first number as {n}), `blocks` (longest block prefix), `tails` (last path parts). Tables apply
    in the family's order and may read names an earlier table made (ldm -> diffusers -> attnproc).
    """

    source: str
    target: str
    modules: Mapping[str, tuple[Alias, ...]] = {}
    blocks: Mapping[str, Block] = {}
    tails: Mapping[str, str] = {}
    note: str = ""  # what the table is and who writes these names


class Variant(NamedTuple):
    """A note detection adds when `key` (under the diffusion root) is present / absent, or has another size."""

    key: str
    present: str | None = None
    absent: str | None = None
    naming: str | None = None  # only for layouts of this naming
    dim: int | None = None  # with `size`: note `present` (with {size}) when shape[dim] != size
    size: int | None = None
    sizes: Mapping[int, str] = {}  # with `dim`: the note for each value of shape[dim] (a variant by its width)


class BlockGroup(NamedTuple):
    """Modules a per-block strength addresses: `name` ({n} = index) -> a module path prefix in any of
    the family's namings (a module belongs to the first group a name of it starts with). Names end in
    their index (`IN04`, `double3`): `double:0-7` addresses double0…double7."""

    name: str
    prefix: str


class Family(NamedTuple):
    """Everything lorabake knows about one model family, as rows. One module under `arch/` fills it in."""

    arch: str  # id: "sd1", "sdxl", "flux", ...
    title: str
    modelspec: str  # modelspec.architecture of a checkpoint (LoRAs append "/lora")
    kohya: str  # ss_base_model_version written by kohya sd-scripts
    metadata_names: tuple[str, ...]  # prefixes of modelspec.architecture / ss_base_model_version naming it
    diffusion: str  # component name: "unet" | "dit"
    diffusion_kind: str  # ComponentInfo.kind of the diffusion model
    layouts: tuple[Layout, ...]
    text_encoders: tuple[TextEncoder, ...]
    # component -> (kohya prefix, naming) of the stem a kohya/musubi trainer writes (extraction names)
    kohya_names: dict[str, tuple[str, str]]
    renames: tuple[Renames, ...] = ()
    lora_prefixes: tuple[str, ...] = ()  # LoRA-side prefixes of the diffusion model (DIT_LORA_PREFIXES, ...)
    # module suffixes (parameter included) trainers target: extraction's default set; conv ones with --conv-rank
    extract_targets: tuple[str, ...] = ()
    extract_conv_targets: tuple[str, ...] = ()
    variants: tuple[Variant, ...] = ()
    block_groups: tuple[BlockGroup, ...] = ()
    # per-block strength vectors (sd-webui-lora-block-weight's): length -> the block each value is for
    # ("BASE": every text encoder; "te1"…: one); blocks a vector does not list get 0, modules in no block 1
    block_vectors: Mapping[int, tuple[str, ...]] = {}
    block_presets: Mapping[str, str] = {}  # preset name -> a vector or a NAME=VALUE list
    # name fragments a quantized output keeps in high precision beyond the generic ones (lorabake.quant.policy):
    # the family's input and output layers, as the quantizers people use for it keep them
    quant_keep: tuple[str, ...] = ()
    implementation: str = "diffusers"  # modelspec.implementation written by extract
    resolution: str = "1024x1024"  # modelspec.resolution written by extract
    order: int = 100  # position in reports and in tie lists; decides nothing
    # a kohya metadata key whose value "True" names this family (old kohya SD2 files: ss_v2)
    legacy_flags: tuple[str, ...] = ()
    text_encoder_kinds: Mapping[str, TextEncoderKind] = {}  # kinds only this family uses
    # what this family's LoRAs of a generic flavour are called: "peft" -> ..., "peft+ai-toolkit" -> ...
    flavours: Mapping[str, str] = {}
    # Every weight of the diffusion model under its first layout's prefix, one `<key> <shape>` row each;
    # {a-b} / {a,b} in a key stand for the numbers it takes; one string per variant (sizes differ).
    # With the text encoders' kinds each makes a virtual checkpoint, so a LoRA alone is matched
    # against the family's rule table (scripts/family_structure.py prints the rows from a key list).
    structures: tuple[str, ...] = ()
    # False: its LoRAs' names and shapes are another family's, block for block. A LoRA alone is called this
    # family only when it wins outright (a module only it has, more blocks, or metadata breaking a tie);
    # otherwise it steps aside and the other family decides (with a base, the base decides)
    lora_alone: bool = True
    # `general.architecture` of a GGUF written for this family, where ComfyUI-GGUF's name is not the family id
    # (city96/ComfyUI-GGUF loader.py refuses a name outside its IMG_ARCH_LIST)
    gguf_arch: str | None = None


# Row ranges of fused weights: [start, end), None = to the end; a bound is a number of H (the weight's
# in-features) or an (h, r) pair meaning h·H + r·R (R = the weight's rows).
Bound = float | tuple[float, float]
PARTS: dict[str, tuple[Bound, Bound | None]] = {
    "q": (0, 1),
    "k": (1, 2),
    "v": (2, 3),
    "qkv": (0, 3),
    "mlp": (3, None),  # a fused q ‖ k ‖ v ‖ mlp-in projection
    # q ‖ k ‖ v with grouped-query attention: q has H rows, k and v split the other R - H equally
    # (equal thirds when there are as many k/v heads as q heads)
    "gqa_q": (0, 1),
    "gqa_k": (1, (0.5, 0.5)),
    "gqa_v": ((0.5, 0.5), None),
    # two stacked projections of equal size (SwiGLU gate ‖ up)
    "half1": (0, (0, 0.5)),
    "half2": ((0, 0.5), None),
}

# Rows of a fused adapter's ΔW that land on one of the separate tensors it spans (bounds as in PARTS,
# R = that tensor's rows): a q ‖ k ‖ v adapter onto separate q (H rows), k and v (equal rows) weights,
# and a gate ‖ up adapter onto separate gate and up weights of equal rows.
SPREAD_PARTS: dict[str, tuple[Bound, Bound]] = {
    "q_of_qkv": (0, (0, 1)),
    "k_of_qkv": (1, (1, 1)),
    "v_of_qkv": ((1, 1), (1, 2)),
    # q ‖ k ‖ v ‖ mlp-in (PARTS "mlp"): the mlp-in band after three H-row bands
    "mlp_of_qkv_mlp": (3, (3, 1)),
    "gate_of_gate_up": (0, (0, 1)),
    "up_of_gate_up": ((0, 1), (0, 2)),
}

# Parameter names that carry a module's weight (the target) and the matching bias parameter.
WEIGHT_PARAMS: dict[str, str | None] = {
    "weight": "bias",
    "in_proj_weight": "in_proj_bias",  # torch MultiheadAttention (OpenCLIP)
    "scale": None,  # RMSNorm
}
BIAS_PARAMS = frozenset({"bias", "in_proj_bias"})

# A diffusers folder as the reader gives it: tensors prefixed by their subfolder.
DIFFUSERS_FOLDERS = (
    "unet.", "transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3.", "text_encoder_4.", "vae.",
)

# The VAE: never a LoRA target, only reported.
VAE_ROOTS: tuple[str, ...] = ("first_stage_model.", "vae.")

# LoRA-side prefixes of the diffusion model: kohya sd-scripts lora_unet_, LyCORIS lycoris_, OneTrainer
# lora_transformer_, ComfyUI diffusion_model., diffusers unet./transformer., PEFT base_model.model.,
# DiffSynth/BFL no prefix. A family lists the ones its trainers write.
UNET_LORA_PREFIXES = (
    "lora_unet_",
    "lycoris_",
    "diffusion_model.",
    "model.diffusion_model.",
    "unet.",
    "unet.base_model.model.",
    "base_model.model.",
    "",
)
DIT_LORA_PREFIXES = (
    "lora_unet_",
    "lycoris_",
    "lora_transformer_",
    "diffusion_model.",
    "model.diffusion_model.",
    "transformer.",
    "transformer.base_model.model.",
    "base_model.model.",
    "",
)

# Which component a LoRA prefix names when the base's own table does not say (planner: "base has no te2").
# "diffusion" stands for the base's diffusion component ("unet" or "dit").
GENERIC_COMPONENT_PREFIXES: dict[str, str] = {
    "lora_unet_": "diffusion",
    "lycoris_": "diffusion",
    "lora_transformer_": "diffusion",
    "oft_unet_": "diffusion",
    "unet.": "diffusion",
    "transformer.": "diffusion",
    "diffusion_model.": "diffusion",
    "model.diffusion_model.": "diffusion",
    "base_model.model.": "diffusion",
    "lora_te_": "te1",
    "lora_te1_": "te1",
    "lora_te2_": "te2",
    "lora_te3_": "te3",
    "text_encoder.": "te1",
    "text_encoder_2.": "te2",
    "text_encoder_3.": "te3",
    "text_encoder_4.": "te4",  # HiDream-I1's Llama
    "text_encoders.clip_l.": "te1",
    "text_encoders.clip_h.": "te1",
    "text_encoders.clip_g.": "te2",
    "text_encoders.t5xxl.": "te3",
}

# Roots looked for when no family matched, so a base without a family module still takes LoRAs
# named after its own keys (keymap's generic fallback).
GENERIC_DIFFUSION_ROOTS: tuple[str, ...] = ("model.diffusion_model.",)
GENERIC_TEXT_ENCODERS: tuple[TextEncoder, ...] = (
    TextEncoder(
        "te1",
        (("text_encoders.clip_l.transformer.", "clip_l"), ("cond_stage_model.transformer.", "clip_l")),
        ("lora_te1_", "lora_te_", "text_encoders.clip_l.transformer."),
    ),
    TextEncoder(
        "te2",
        (("text_encoders.clip_g.transformer.", "clip_g"),),
        ("lora_te2_", "text_encoders.clip_g.transformer."),
    ),
    TextEncoder(
        "te3",
        (("text_encoders.t5xxl.transformer.", "t5xxl"),),
        ("lora_te3_", "text_encoders.t5xxl.transformer."),
    ),
)
