"""`lorabake convert`, the plan: which output module each input module's rows go to, from headers only.

A LoRA module lands on rows of one or more base weights (its `Target`s in a rule table). The rule
table of a reference checkpoint (the family's virtual checkpoint, or the `--like` base) also lists,
for every base weight, the stems each flavour writes for it: the LoRA prefix and naming of each stem
are in its `Rule`. So converting is re-grouping rows: every input module is cut into pieces (base
weight, rows), each piece goes to the output stems of the wanted (prefix, naming) that cover those
rows, and each output module collects its sources. One source covering one output module whole is a
rename; one source cut in bands is a split (same down, up cut in bands, rank intact); several sources
in one output module are fused (up block-diagonal, downs stacked, rank Σ; rows no source gives are
zero, so ΔW is unchanged).

Nothing is dropped: a module or key without a place in the output is an error naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lorabake import adapters
from lorabake.arch import FAMILIES, TEXT_ENCODER_KINDS
from lorabake.detect import CheckpointInfo
from lorabake.errors import LoraFormatError, UsageError
from lorabake.keymap import KeyMap
from lorabake.lora_format import LoraFile
from lorabake.st_header import TensorInfo
from lorabake.types import TEXT_ENCODERS, LoraModule

# --------------------------------------------------------------------------------------------
# The flavours, as data
# --------------------------------------------------------------------------------------------

# part -> suffix, for the parts a flavour can carry (LoRA factors in the flavour's own spelling; the
# LyCORIS parts, which only kohya-style names carry, in their one spelling)
_LYCORIS_PARTS: dict[str, str] = {}
for _row in adapters.SUFFIXES:  # the first spelling of a part is its canonical one (`.diff`, not `.diff_m`)
    if _row.spelling is None and _row.part not in ("up", "down", "mid", "alpha", "scale", "dora_scale", "magnitude"):
        _LYCORIS_PARTS.setdefault(_row.part, _row.text)
KOHYA_SUFFIXES: dict[str, str] = {
    "up": ".lora_up.weight", "down": ".lora_down.weight", "mid": ".lora_mid.weight",
    "alpha": ".alpha", "scale": ".scale", "dora_scale": ".dora_scale", "ia3_weight": ".weight",
    **_LYCORIS_PARTS,
}  # fmt: skip
PEFT_SUFFIXES: dict[str, str] = {
    "up": ".lora_B.weight", "down": ".lora_A.weight", "up_bias": ".lora_B.bias", "magnitude": ".lora_magnitude_vector",
}  # fmt: skip
# PEFT-format LoKr (diffusers' `load_lora_adapter`, PEFT's LoKrConfig): the LyCORIS part names after the module
# path; no Tucker core (PEFT's `lokr_t2` is its own conv layout)
PEFT_LOKR_SUFFIXES: dict[str, str] = {
    **PEFT_SUFFIXES, **{p: "." + p for p in adapters.ADAPTERS["lokr"].parts if p != "lokr_t2"},
}  # fmt: skip
# parts written under another part's name: PEFT's magnitude [out] is LyCORIS's dora_scale [out, 1]
PART_AS = {
    "kohya": {"magnitude": "dora_scale"},
    "peft": {"dora_scale": "magnitude"},
}


@dataclass(frozen=True)
class Flavour:
    """One output flavour: its suffixes, where alpha goes, and the prefix/naming of each component.

    `alpha`: "tensor" (an `.alpha` scalar per module), "config" (PEFT's LoraConfig in the
    `lora_adapter_metadata` header), "fold" (no alpha: alpha/rank multiplied into `up`).
    `diffusion`: (LoRA prefix, naming); "diffusers" as prefix means `unet.` or `transformer.` as the
    family's diffusion model is a UNet or a DiT. `text_encoders`: the start of the text encoder's LoRA
    prefix (the family's `TextEncoder.lora_prefixes` entry starting so) and naming; None: refused.
    `config_layout`: "pipeline" (keys prefixed per component, as diffusers' save_lora_weights) or "model".
    """

    name: str
    suffixes: Mapping[str, str]
    part_as: Mapping[str, str]
    alpha: str
    diffusion: tuple[str, str]
    text_encoders: tuple[str, str] | None
    config_layout: str | None = None


FLAVOURS: dict[str, Flavour] = {
    # kohya sd-scripts / LyCORIS: `lora_unet_` + the family's kohya naming (its `kohya_names`)
    "kohya": Flavour("kohya", KOHYA_SUFFIXES, PART_AS["kohya"], "tensor", ("kohya", "kohya"), ("kohya", "kohya")),
    # ComfyUI's generic names (comfy/lora.py: `diffusion_model.` + the model's own keys)
    "comfyui": Flavour("comfyui", KOHYA_SUFFIXES, PART_AS["kohya"], "tensor", ("diffusion_model.", "native"),
                       ("text_encoders.", "hf")),
    # diffusers' save_lora_weights: component prefix, diffusers names, PEFT suffixes, config per component
    "diffusers": Flavour("diffusers", PEFT_LOKR_SUFFIXES, PART_AS["peft"], "config", ("diffusers", "diffusers"),
                         ("text_encoder", "hf"), "pipeline"),
    # a PEFT model save (get_peft_model_state_dict): one model, `base_model.model.`, config at top level
    "peft": Flavour("peft", PEFT_LOKR_SUFFIXES, PART_AS["peft"], "config", ("base_model.model.", "diffusers"), None,
                    "model"),
    # ostris ai-toolkit: diffusers names and PEFT suffixes, no alpha anywhere
    "aitoolkit": Flavour("aitoolkit", PEFT_SUFFIXES, PART_AS["peft"], "fold", ("diffusers", "diffusers"),
                         ("text_encoder", "hf")),
}  # fmt: skip
_DIFFUSERS_PREFIX = {"unet": "unet.", "dit": "transformer."}

# adapters whose factors can be cut in row bands and fused block-diagonally (plain LoRA/LoCon, full diff)
_REGROUPABLE = {"lora": ("up", "down", "alpha", "scale"), "full": ("diff", "diff_b")}


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Rows [start, stop) of input module `stem`'s ΔW, placed at row `at` of the output module's ΔW."""

    stem: str
    start: int
    stop: int
    at: int


@dataclass
class OutModule:
    stem: str  # the output stem (prefix included)
    component: str
    prefix: str  # the flavour's LoRA prefix for the component
    rows: int  # rows of its ΔW
    sources: list[Source] = field(default_factory=list)
    transform: str | None = None  # applied to the one source's ΔW (a rename between two transforms)
    native: bool = False  # written under the checkpoint's own name: the flavour's naming has none

    @property
    def action(self) -> str:
        if len(self.sources) > 1 or sum(s.stop - s.start for s in self.sources) != self.rows:
            return "fused"
        return "renamed"


@dataclass
class Plan:
    flavour: Flavour
    outputs: dict[str, OutModule]  # output stem -> module, in input order
    split: set[str]  # input stems cut over several output modules


class _Piece:
    __slots__ = ("key", "start", "length", "at", "transform", "spread")

    def __init__(self, key: str, start: int, length: int, at: int, transform: str | None, spread: bool = False) -> None:
        self.key, self.start, self.length, self.at, self.transform = key, start, length, at, transform
        self.spread = spread  # one of several weights a fused module spans


def pieces(keymap: KeyMap, stem: str, header: Mapping[str, TensorInfo]) -> list[_Piece]:
    """(base weight, rows) pieces of a stem's ΔW; [] when the table has no such stem."""
    found = []
    targets = [keymap.targets[stem]] if stem in keymap.targets else list(getattr(keymap, "spread", {}).get(stem, ()))
    for t in targets:
        rows = header[t.key].shape[0] if header[t.key].shape else 1
        start, length = (t.slice.start, t.slice.length) if t.slice is not None else (0, rows)
        delta = getattr(t, "delta_rows", None)  # a fused module spread over separate weights
        found.append(_Piece(t.key, start, length, delta.start if delta is not None else 0, t.transform, len(targets) > 1))
    return found


def naming_of(keymap: KeyMap, stem: str, native: Mapping[str, str]) -> str | None:
    """The naming a table stem is written in: the component's own, or the target of the rename table that
    made it (keymap labels its tables "own name" and "<source> -> <target> names")."""
    rule = keymap.rules.get(stem)
    if rule is None:
        return None
    if rule.table == "own name":
        return native.get(keymap.targets[stem].component if stem in keymap.targets else "", None)
    source, arrow, target = rule.table.partition(" -> ")
    return target.removesuffix(" names") if arrow else None


def native_namings(info: CheckpointInfo) -> dict[str, str]:
    """component -> the naming of its own keys."""
    out = {}
    for comp in info.components.values():
        if comp.name in TEXT_ENCODERS:
            kind = TEXT_ENCODER_KINDS.get(comp.kind)
            out[comp.name] = kind.naming if kind else "hf"
        else:
            out[comp.name] = info.naming if info.naming != "unknown" else "native"
    return out


def wanted(flavour: Flavour, info: CheckpointInfo, component: str) -> tuple[str, str] | None:
    """(LoRA prefix, naming) the flavour writes for `component`; None when it cannot hold that component."""
    family = FAMILIES.get(info.arch)
    native = native_namings(info).get(component, "native")
    if component in TEXT_ENCODERS:
        if flavour.text_encoders is None:
            return None
        start, naming = flavour.text_encoders
        slot = next((te for te in family.text_encoders if te.component == component), None) if family else None
        prefixes = slot.lora_prefixes if slot else ()
        if start == "kohya":
            if family and component in family.kohya_names:
                return family.kohya_names[component]
            start, naming = "lora_te", "hf"
        prefix = next((p for p in prefixes if p.startswith(start) and not (start == "text_encoder" and p.startswith("text_encoders."))), None)
        return (prefix, naming) if prefix else None
    prefix, naming = flavour.diffusion
    if prefix == "kohya":
        prefix, naming = family.kohya_names.get(component, ("lora_unet_", native)) if family else ("lora_unet_", native)
    elif prefix == "diffusers":
        prefix = _DIFFUSERS_PREFIX.get(component, "transformer.")
    if naming == "native":
        naming = native
    return prefix, naming


def make_plan(
    lora: LoraFile,
    keymap: KeyMap,
    header: Mapping[str, TensorInfo],
    info: CheckpointInfo,
    flavour: Flavour,
    tensors: Mapping[str, TensorInfo],
    *,
    reference: str = "",
) -> Plan:
    """Every input module's rows to output modules; refusals (one error naming file, module and why) first."""
    if lora.unknown_keys:
        raise LoraFormatError("tensor belongs to no LoRA module, so it has no name in the output",
                              path=lora.path, tensor=lora.unknown_keys[0])
    native = native_namings(info)
    family = FAMILIES.get(info.arch)
    layouts = tuple(dict.fromkeys(lay.naming for lay in family.layouts)) if family else ()
    # (base key) -> [(stem, piece, naming, prefix)] of every stem in the table
    index: dict[str, list[tuple[str, _Piece, str | None, str]]] = {}
    for stem, rule in keymap.rules.items():
        for p in pieces(keymap, stem, header):
            index.setdefault(p.key, []).append((stem, p, naming_of(keymap, stem, native), rule.prefix))
    plan = Plan(flavour, {}, set())
    for stem, module in lora.modules.items():
        _check_parts(lora, module, flavour)
        own = pieces(keymap, stem, header)
        if not own:
            raise LoraFormatError(f"module {stem!r} matches no module of {reference}, so it has no name in the output",
                                  path=lora.path, tensor=_first(module),
                                  hint="give --like BASE with a checkpoint the LoRA was trained for")
        component = keymap.component_of(stem) or "?"
        _check_fit(lora, module, own, tensors, reference)
        if module.algo == "lokr" and flavour.alpha == "config" and any(len(header[p.key].shape) > 2 for p in own):
            raise LoraFormatError(f"module {stem!r} is LoKr on a conv weight, which {flavour.name} files cannot carry "
                                  "(PEFT lays a conv LoKr out with its kernel)", path=lora.path, tensor=_first(module),
                                  hint="convert to kohya or comfyui, which carry LyCORIS modules as they are")
        want = wanted(flavour, info, component)
        if want is None:
            raise LoraFormatError(f"module {stem!r} is for the {component} component, which {flavour.name} files do not hold",
                                  path=lora.path, tensor=_first(module),
                                  hint="PEFT files hold one model: convert to diffusers to keep text-encoder modules")
        outs: set[str] = set()
        for p in own:
            chosen, fallback = _choose(index.get(p.key, ()), p, want, native.get(component), layouts)
            if chosen is None:
                raise LoraFormatError(
                    f"module {stem!r}: rows {p.start}..{p.start + p.length} of {p.key} have no {flavour.name} name "
                    f"under prefix {want[0]!r}", path=lora.path, tensor=_first(module))
            for out_stem, q in chosen:
                outs.add(out_stem)
                lo, hi = max(p.start, q.start), min(p.start + p.length, q.start + q.length)
                out = plan.outputs.get(out_stem)
                if out is None:
                    total = sum(x.length for x in pieces(keymap, out_stem, header))
                    out = plan.outputs[out_stem] = OutModule(out_stem, component, want[0], total, native=fallback)
                out.sources.append(Source(stem, p.at + lo - p.start, p.at + hi - p.start, q.at + lo - q.start))
                if p.transform != q.transform:
                    out.transform = _combine(p.transform, q.transform, lora, module)
        if len(outs) > 1:  # its ΔW rows cut over several output modules
            plan.split.add(stem)
    _check_outputs(plan, lora)
    return plan


def _check_fit(lora: LoraFile, module: LoraModule, own: list[_Piece], tensors: Mapping[str, TensorInfo], reference: str) -> None:
    """The module's ΔW has as many rows as the weights (or bands) it lands on in the reference."""
    shapes = {p: tensors[k].shape for p, k in module.parts.items()}
    if not adapters.has_weight_change(shapes):
        return
    try:
        natural = adapters.delta_shape(module.algo, shapes)
    except LoraFormatError:
        natural = None
    rows = sum(p.length for p in own)
    if natural is not None and natural[0] != rows:
        raise LoraFormatError(
            f"module {module.stem!r} has {natural[0]} output rows, its place in {reference} has {rows}",
            path=lora.path, tensor=_first(module), hint="give --like BASE, the checkpoint the LoRA was trained for")


def _choose(cands, p: _Piece, want: tuple[str, str], native: str | None, layouts: tuple[str, ...]):
    """(output pieces, whether not in the wanted naming): the wanted naming's names, else the checkpoint's
    own, else those of the family's other layouts, else any name under the prefix. (The table keeps one
    rule per stem, so a stem two namings spell alike, `_`-joined, is labelled with one of them.)"""
    under = [c for c in cands if c[3] == want[0]]
    for i, naming in enumerate((want[1], native, *layouts, None)):
        tier = [c for c in under if naming is None or c[2] == naming]
        chosen = _cover(tier, p) if tier else None
        if chosen is not None:
            return chosen, i > 0 and naming != want[1]
    return None, False


def _cover(cands: list[tuple[str, _Piece, str | None, str]], p: _Piece) -> list[tuple[str, _Piece]] | None:
    """The output pieces for input piece `p`: the one with its rows, else those tiling them, else one holding them."""
    end = p.start + p.length
    # the same rows; a module of its own before a band of a fused module spread over several weights
    same = sorted(((s, q) for s, q, _, _ in cands if (q.start, q.length) == (p.start, p.length)),
                  key=lambda sq: sq[1].spread)
    if same:
        return same[:1]
    inside = sorted(((s, q) for s, q, _, _ in cands if q.start >= p.start and q.start + q.length <= end),
                    key=lambda sq: sq[1].start)
    at, tiling = p.start, []
    for s, q in inside:
        if q.start == at:
            tiling.append((s, q))
            at += q.length
    if tiling and at == end:
        return tiling
    holding = [(s, q) for s, q, _, _ in cands if q.start <= p.start and q.start + q.length >= end]
    return holding[:1] or None


def _combine(have: str | None, want: str | None, lora: LoraFile, module: LoraModule) -> str:
    """The transform taking the input's ΔW to the output's (both transforms are involutions)."""
    if have is None or want is None:
        return have or want
    raise LoraFormatError(f"module {module.stem!r} would need {have} and then {want}", path=lora.path, tensor=_first(module))


def _check_parts(lora: LoraFile, module: LoraModule, flavour: Flavour) -> None:
    for part, key in module.parts.items():
        name = flavour.part_as.get(part, part)
        if name not in flavour.suffixes and part not in ("alpha", "scale"):
            raise LoraFormatError(
                f"module {module.stem!r} is {kind_of(module)} ({part}), which {flavour.name} files cannot carry",
                path=lora.path, tensor=key, hint="convert to kohya or comfyui, which carry LyCORIS modules as they are")


def _check_outputs(plan: Plan, lora: LoraFile) -> None:
    for out in plan.outputs.values():
        spans = sorted((s.at, s.at + s.stop - s.start, s.stem) for s in out.sources)
        for (_a0, a1, s0), (b0, _b1, s1) in zip(spans, spans[1:]):
            if b0 < a1:
                raise LoraFormatError(f"modules {s0!r} and {s1!r} both give rows {b0}..{min(a1, _b1)} of {out.stem!r}",
                                      path=lora.path, hint="the file holds the same layer twice under two names")
        regroup = out.action == "fused" or any(s.stem in plan.split for s in out.sources) or out.transform
        for s in out.sources:
            module = lora.modules[s.stem]
            allowed = _REGROUPABLE.get(module.algo)
            if regroup and (allowed is None or not set(module.parts) <= set(allowed)):
                why = "fused with other modules" if out.action == "fused" else ("cut in bands" if s.stem in plan.split else f"given a {out.transform}")
                raise LoraFormatError(
                    f"module {s.stem!r} is {kind_of(module)}; in {plan.flavour.name} names it would have to be {why} "
                    f"({out.stem!r}), which only plain LoRA factors and full diffs can be exactly",
                    path=lora.path, tensor=_first(module))


def kind_of(module: LoraModule) -> str:
    if module.dora:
        return "DoRA"
    if "mid" in module.parts:
        return "Tucker LoCon"
    return {"loha": "LoHa", "lokr": "LoKr", "full": "a full diff", "lora": "LoRA"}.get(module.algo, module.algo)


def _first(module: LoraModule) -> str:
    return next(iter(module.parts.values()))


def check_flavour(name: str) -> Flavour:
    if name not in FLAVOURS:
        raise UsageError(f"--to must be one of {', '.join(FLAVOURS)}")
    return FLAVOURS[name]
