"""Preflight: headers + rule table -> patches per base tensor, with every LoRA key accounted for.

Nothing here reads tensor data. `inspect --against`, `merge --dry-run` and the merge itself all
print or run the same `MergePlan`, so what the dry run says is what the merge does.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace

from lorabake import adapters, blocks, spread
from lorabake.arch import FAMILIES
from lorabake.detect import CheckpointInfo, detect_checkpoint
from lorabake.errors import LoraFormatError, MatchError
from lorabake.keymap import KeyMap, build_keymap
from lorabake.lora_base import against_base, match_lora, module_component_hint
from lorabake.lora_format import LoraFile, parse_lora
from lorabake.st_reader import SafetensorsReader
from lorabake.types import TEXT_ENCODERS, LoraModule, Target

# Parts that land on the module's bias tensor rather than its weight.
BIAS_PARTS = adapters.BIAS_PARTS
# Parts lorabake refuses (reported as unmatched, never skipped in silence), with the reason.
UNSUPPORTED_PARTS = adapters.REFUSED_PARTS


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora PATH[:STRENGTH[:TE_STRENGTH]]` argument."""

    path: str
    strength: float = 1.0
    te_strength: float | None = None
    blocks: str | None = None  # a per-block strength spec (lorabake.block_spec), resolved against the base

    def strength_for(self, component: str) -> float:
        if component in TEXT_ENCODERS and self.te_strength is not None:
            return self.te_strength
        return self.strength


@dataclass(frozen=True)
class PlannedPatch:
    """One module of one LoRA applied to one base tensor (weight or bias)."""

    lora_index: int
    module: LoraModule
    target: Target
    param: str  # "weight" | "bias"
    strength: float


@dataclass
class Outcome:
    """What became of one module: applied, skipped (component absent) or unmatched (why)."""

    stem: str
    status: str  # "applied" | "skipped" | "unmatched"
    component: str | None
    reason: str = ""
    target: str | None = None


@dataclass
class LoraPlan:
    spec: LoraSpec
    lora: LoraFile
    reader: SafetensorsReader
    outcomes: list[Outcome] = field(default_factory=list)
    block_weights: blocks.BlockWeights | None = None  # from the spec's `@BLOCKS`, resolved on the base

    def by_status(self, status: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == status]

    def counts(self) -> dict[str, dict[str, int]]:
        """status -> component -> module count."""
        out: dict[str, Counter] = {}
        for o in self.outcomes:
            out.setdefault(o.status, Counter())[o.component or "?"] += 1
        return {k: dict(v) for k, v in out.items()}


@dataclass
class MergePlan:
    base: SafetensorsReader
    info: CheckpointInfo
    keymap: KeyMap
    loras: list[LoraPlan]
    patches: dict[str, list[PlannedPatch]]  # base key -> patches, in --lora order
    block_of: dict[str, str] = field(default_factory=dict)  # weight key -> block (when a spec asked)

    @property
    def unmatched(self) -> list[tuple[LoraPlan, Outcome]]:
        return [(lp, o) for lp in self.loras for o in lp.by_status("unmatched")]


def plan_merge(
    base: SafetensorsReader,
    specs: list[LoraSpec],
    lora_readers: list[SafetensorsReader],
    *,
    require_change: bool = True,
) -> MergePlan:
    """Resolve every module of every LoRA against `base`; the base's family decides.

    With `require_change` (a merge, dry run or not), a LoRA that would change no tensor is a
    MatchError naming the LoRA, the base and why; `inspect --against` reports it instead.
    """
    info = detect_checkpoint(base.tensors, base.metadata)
    keymap = build_keymap(base.tensors, info)
    block_of = blocks.block_map(base.tensors, info) if any(s.blocks for s in specs) else {}
    patches: dict[str, list[PlannedPatch]] = {}
    plans = []
    for index, (spec, reader) in enumerate(zip(specs, lora_readers)):
        weights = None
        if spec.blocks:
            present = set(block_of.values())
            weights = blocks.resolve(spec.blocks, info.arch, present, set(info.components), lora=spec.path)
        # header only: a module's alpha tensor is read with its factors at bake time, where the
        # kernel applies the same scale rule (adapters.scale); PEFT scales come from the metadata
        lora = against_base(parse_lora(reader.tensors, reader.metadata, path=reader.path), info.arch, base.path)
        plan = LoraPlan(spec, lora, reader, block_weights=weights)
        claimed: dict[tuple[str, object], str] = {}
        for stem, module in lora.modules.items():
            outcome, planned = _resolve(index, spec, module, reader, base, keymap)
            if weights is not None:
                planned = [replace(p, strength=p.strength * weights.factor(block_of.get(p.target.key), p.target.component))
                           for p in planned]
            plan.outcomes.append(outcome)
            for p in planned:
                # a fused module's rows (spread) and the tensor's own module are two modules, both applied: files
                # carry a trained `to_qkv` next to empty (all-zero) `to_q`/`to_k`/`to_v` entries
                spread_rows = p.target.delta_rows is not None
                slot = (p.target.key if p.param == "weight" else p.target.bias_key, p.target.slice, p.param, spread_rows)
                if slot in claimed:
                    raise MatchError(
                        f"modules {claimed[slot]!r} and {stem!r} both target {slot[0]}"
                        + (f" rows {p.target.slice.start}..{p.target.slice.start + p.target.slice.length}" if p.target.slice else ""),
                        path=reader.path,
                        hint="the file names one module twice (e.g. kohya and diffusers spellings); remove one",
                    )
                claimed[slot] = stem
                patches.setdefault(slot[0], []).append(p)
        for key in lora.unknown_keys:
            plan.outcomes.append(
                Outcome(key, "unmatched", module_component_hint(key), "not a tensor of any known adapter format")
            )
        if require_change:
            mine = [p.strength for ps in patches.values() for p in ps if p.lora_index == index]
            _check_changes(plan, info, base.path, mine)
        plans.append(plan)
    return MergePlan(base, info, keymap, plans, patches, block_of)


def _check_changes(plan: LoraPlan, info: CheckpointInfo, base_path: str, strengths: list[float]) -> None:
    """A LoRA that changes no tensor of the base is an error, never a silent no-op."""
    applied = plan.by_status("applied")
    if applied and set(strengths) != {0.0}:
        return
    lora = plan.lora
    if applied:
        blocks_said = f" (block spec {plan.spec.blocks!r})" if plan.spec.blocks else ""
        why = f"its {len(applied)} matching module(s) are all at strength 0{blocks_said}"
    elif not plan.outcomes:
        why = "it holds no adapter module"
    else:
        unmatched = len(plan.by_status("unmatched"))
        why = (f"{unmatched} module(s) match nothing in it: " if unmatched else "") + "; ".join(_reasons(plan))
        other = match_lora(lora.modules, plan.reader.tensors, lora.metadata).arch
        if other not in ("unknown", info.arch):  # say whose LoRA it is: both families named
            why = f"it is a {other} LoRA (its modules match the {other} rule table); {why}"
    said = f"; {lora.arch_note}" if lora.arch_note else ""
    raise MatchError(
        f"the LoRA changes no tensor of {base_path} ({info.arch}): {why}{said}",
        path=lora.path,
        hint="use a LoRA trained for this base; `lorabake inspect LORA --against BASE --keys` shows where each module goes",
    )


def _reasons(plan: LoraPlan) -> list[str]:
    """The outcomes grouped by status and reason, most common first, e.g. '12 unmatched (no tensor ...)'."""
    groups = Counter((o.status, o.reason) for o in plan.outcomes)
    rows = [
        f"{n} {status} ({reason}, e.g. {next(o.stem for o in plan.outcomes if (o.status, o.reason) == (status, reason))})"
        for (status, reason), n in groups.most_common(3)
    ]
    if len(groups) > 3:
        rows.append(f"{sum(groups.values()) - sum(n for _, n in groups.most_common(3))} more")
    return rows


def _resolve(
    index: int,
    spec: LoraSpec,
    module: LoraModule,
    reader: SafetensorsReader,
    base: SafetensorsReader,
    keymap: KeyMap,
) -> tuple[Outcome, list[PlannedPatch]]:
    stem = module.stem
    target = keymap.targets.get(stem)
    if target is None and stem in keymap.spread:
        return _resolve_spread(index, spec, module, reader, base, keymap.spread[stem])
    if target is None:
        component = keymap.component_of(stem) or module_component_hint(stem)
        # skipped only when the base is known to lack the component; a base of unknown family is not
        # known to lack anything, so there a name that matches nothing is unmatched
        known = keymap.arch != "unknown"
        if known and component is not None and component not in keymap.components_present:
            return Outcome(stem, "skipped", component, f"base has no {_missing(keymap.arch, component)}"), []
        return Outcome(stem, "unmatched", component, "no tensor of the base has this name"), []
    refused = set(UNSUPPORTED_PARTS).intersection(module.parts)
    if refused:
        part = sorted(refused)[0]
        return Outcome(stem, "unmatched", target.component, f"{part}: {UNSUPPORTED_PARTS[part]}", target.key), []
    shapes = {part: reader.tensors[key].shape for part, key in module.parts.items()}
    weight_parts = adapters.weight_shapes(shapes)
    bias_parts = {p: s for p, s in shapes.items() if p in BIAS_PARTS}
    planned: list[PlannedPatch] = []
    strength = spec.strength_for(target.component)
    base_shape = base.tensors[target.key].shape
    if target.slice is not None:
        base_shape = (target.slice.length, *base_shape[1:])
    if adapters.has_weight_change(weight_parts):
        if target.transform == "transpose":  # the LoRA sees the weight transposed
            base_shape = tuple(reversed(base_shape))
        misfit = _misfit(module, weight_parts, base_shape, reader, target.key)
        if misfit:
            return Outcome(stem, "unmatched", target.component, misfit, target.key), []
        planned.append(PlannedPatch(index, module, target, "weight", strength))
    if bias_parts:
        if target.bias_key is None:
            return Outcome(stem, "unmatched", target.component, f"{target.key} has no bias for {sorted(bias_parts)}", target.key), []
        bias_len = base.tensors[target.bias_key].shape[0] if target.slice is None else target.slice.length
        for part, shape in bias_parts.items():
            if math.prod(shape) != bias_len:
                return (
                    Outcome(stem, "unmatched", target.component, f"{part} has {math.prod(shape)} values, bias has {bias_len}", target.key),
                    [],
                )
        planned.append(PlannedPatch(index, module, target, "bias", strength))
    return Outcome(stem, "applied", target.component, "", target.key), planned


def _unsplittable_dora(shapes: dict[str, tuple[int, ...]], natural: tuple[int, ...] | None) -> str | None:
    """Why a DoRA module cannot be cut into row bands, or None: its magnitude must scale output rows."""
    part = next(p for p in adapters.DORA_PARTS if p in shapes)
    if natural is None or not adapters.dora.per_output_row(part, shapes[part], natural[0]):
        return f"DoRA normalising input columns ({part} {list(shapes[part])})"
    return None


def _missing(arch: str, component: str) -> str:
    """What a base lacks, as its family names the slot ("Qwen2.5-VL text encoder"), else the component."""
    family = FAMILIES.get(arch)
    title = next((te.title for te in family.text_encoders if te.component == component), "") if family else ""
    return f"{title} text encoder" if title else component


def _misfit(
    module: LoraModule, shapes: dict[str, tuple[int, ...]], target_shape: tuple[int, ...], reader: SafetensorsReader, key: str
) -> str | None:
    """Why the module cannot patch `key` (an unmatched reason), or None when it fits.

    A factor whose number of dimensions cannot be the target's (a 3-D `lora_down` on a linear
    layer) is an error even when the element counts agree: the file is wrong, not the base.
    """
    fault = adapters.target_fault(module.algo, shapes, target_shape)
    if fault is None:
        return None
    try:
        natural = adapters.delta_shape(module.algo, shapes)
    except LoraFormatError:
        natural = None
    if natural is not None and math.prod(natural) == math.prod(target_shape):
        part = max((p for p in shapes if p not in adapters.SCALAR_PARTS), key=lambda p: len(shapes[p]))
        raise LoraFormatError(
            f"module {module.stem!r} on {key} {list(target_shape)}: {part} has shape {list(shapes[part])}; {fault}",
            path=reader.path,
            tensor=module.parts[part],
            hint="the factors do not have the layout of the target layer; the file is damaged or mis-converted",
        )
    return f"{fault} ({key})"


def _resolve_spread(
    index: int,
    spec: LoraSpec,
    module: LoraModule,
    reader: SafetensorsReader,
    base: SafetensorsReader,
    targets: tuple[Target, ...],
) -> tuple[Outcome, list[PlannedPatch]]:
    """A fused module over several base tensors: its whole ΔW must have their rows together."""
    stem, first = module.stem, targets[0]
    where = " + ".join(t.key for t in targets)
    shapes = {part: reader.tensors[key].shape for part, key in module.parts.items()}
    refused = "a bias part" if set(BIAS_PARTS).intersection(shapes) else None
    if refused is None and module.algo not in spread.SPLITTABLE:
        refused = module.algo
    try:
        natural = adapters.delta_shape(module.algo, shapes)
    except LoraFormatError as exc:
        exc.path = exc.path or reader.path
        exc.tensor = exc.tensor or stem
        raise
    if refused is None and module.dora:
        refused = _unsplittable_dora(shapes, natural)
    if refused:
        why = f"{refused} of a fused module cannot be split over {len(targets)} separate tensors"
        return Outcome(stem, "unmatched", first.component, why, where), []
    rows = sum(t.delta_rows.length for t in targets)
    cols = {math.prod(base.tensors[t.key].shape[1:]) for t in targets}
    if natural is None or natural[0] != rows or {math.prod(natural[1:])} != cols:
        shown = list(natural) if natural is not None else module.algo
        return Outcome(stem, "unmatched", first.component, f"ΔW {shown} does not fit {where}", where), []
    strength = spec.strength_for(first.component)
    return Outcome(stem, "applied", first.component, "", where), [
        PlannedPatch(index, module, t, "weight", strength) for t in targets
    ]

