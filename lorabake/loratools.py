"""`lorabake combine` and `lorabake resize`: LoRA files in, one LoRA file out, without a base (or with one).

Flow: parse every input from its header; refuse what a LoRA file cannot carry (DoRA and the
weight-dependent types without `--base`, bias deltas, inputs trained for different families) before
reading data;
then, module by module, take exact low-rank factors of each input (`module_factors`: LoHa, LoKr,
Tucker and full diffs too, reported as such), fold its strength and alpha/rank into `up`, stack the
factors exactly (`lowrank.stack`) and, when a rank is asked for, reduce them optimally
(`lowrank.reduce`); lay the output out in name order, hash it, and write it with the same writer
as `merge` (temporary file, rename, inputs protected).

Decisions:

* Names: a module is written under the stem and suffix spelling of the first input that has it,
  so a kohya file stays kohya and a PEFT file stays PEFT. Modules that exist in only one input are
  carried over at their own strength.
* Alpha: where the spelling has an alpha tensor, alpha = the new rank (stored in the input alpha's
  dtype; the decoded value is the one folded into `up`), i.e. scale 1. Where it has none (ai-toolkit,
  PEFT), the factors carry the whole scale and the PEFT `lora_adapter_metadata` is not copied: a
  loader that reads no alpha applies scale 1, which is then right.
* `resize` at a rank ≥ a module's own keeps that module's bytes as they are (exact, no rounding).
* Errors are exact, not estimated: the dropped σ² of the stacked product's spectrum (the
  Eckart–Young optimum), before rounding the factors to the output dtype.
* With `--base`, a module with a DoRA or weight-dependent term gets its whole change W' − W from the
  base weight (`base_delta`: merge's own math, every input's term in order) and exact factors of it.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field

import torch

from lorabake import adapters, blocks, delta, dtypes, lowrank
from lorabake.adapters.scale import scale_of
from lorabake.base_delta import BaseWeights, Pending
from lorabake.errors import LoraFormatError, UsageError
from lorabake.lora_base import identify, module_component_hint, virtual_targets
from lorabake.lora_format import LoraFile, parse_lora
from lorabake.loratools_out import result_json, summary_lines, write
from lorabake.module_factors import module_factors
from lorabake.plan import LoraSpec
from lorabake.st_reader import SafetensorsReader, check_input_path
from lorabake.st_writer import check_output_path, tensor_bytes
from lorabake.svd import RANK_MODES

__all__ = ["ModuleReport", "ToolOptions", "ToolResult", "result_json", "run", "summary_lines"]

OUTPUT_DTYPES = ("keep", "fp16", "bf16", "fp32")


@dataclass(frozen=True)
class ToolOptions:
    inputs: tuple[LoraSpec, ...]
    output: str
    rank: int | None = None  # None: exact (combine) / required (resize)
    rank_mode: str = "fixed"
    rank_param: float | None = None
    dtype: str = "keep"
    force: bool = False
    command: str = "combine"
    base: str | None = None  # the checkpoint DoRA and weight-dependent modules are computed against


@dataclass(frozen=True)
class ModuleReport:
    stem: str
    shape: tuple[int, ...]
    rank_in: int  # Σ of the inputs' ranks
    rank_out: int
    norm: float  # ‖ΔW‖_F of the exact combination
    error: float  # relative Frobenius error of the written factors (before rounding)
    action: str  # "stacked" | "reduced" | "kept"


@dataclass
class ToolResult:
    options: ToolOptions
    modules: list[ModuleReport] = field(default_factory=list)
    output: str | None = None
    sha256: str | None = None
    data_sha256: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def overall_error(self) -> float:
        total = sum(m.norm**2 for m in self.modules)
        lost = sum((m.error * m.norm) ** 2 for m in self.modules)
        return math.sqrt(lost / total) if total > 0 else 0.0


@dataclass
class _Term:
    """One input's contribution to one module: ΔW = coef · up @ down (flattened to 2-D)."""

    coef: float
    up: torch.Tensor
    down: torch.Tensor
    kernel: tuple[int, ...]  # down's shape after the rank axis ((in,) or (in, kh, kw))
    out_shape: tuple[int, ...]  # up's shape after the rank axis ((), or (1, 1) for LoCon)
    patch: delta.Patch | None = None  # a weight-dependent term (no factors until the base gives its ΔW)


@dataclass
class _Naming:
    up: str
    down: str
    alpha: str | None
    factor_dtype: torch.dtype
    alpha_dtype: torch.dtype | None
    kind: str = "lora"  # the adapter type it was spelled from


def validate(opts: ToolOptions) -> None:
    """Usage errors (exit 2) before any file is opened."""
    if not opts.inputs:
        raise UsageError("no input LoRA given")
    if opts.rank_mode not in RANK_MODES:
        raise UsageError(f"--rank-mode must be one of {', '.join(RANK_MODES)}")
    if opts.rank is not None and opts.rank < 1:
        raise UsageError("--rank must be at least 1")
    if opts.rank_mode != "fixed" and opts.rank_param is None:
        raise UsageError(f"--rank-mode {opts.rank_mode} needs --rank-param")
    if opts.command == "resize" and opts.rank is None:
        raise UsageError("resize needs --rank (the rank, or the cap of a dynamic --rank-mode)")
    if opts.dtype not in OUTPUT_DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}")
    for spec in opts.inputs:
        for value in (spec.strength, spec.te_strength):
            if value is not None and not (math.isfinite(value) and abs(value) < 3.0e38):
                raise UsageError(f"strength {value} for {spec.path} is not a finite fp32 number")


def run(opts: ToolOptions) -> ToolResult:
    """Combine (or resize, with one input) the LoRA files of `opts` into `opts.output`."""
    validate(opts)
    for path in (*(spec.path for spec in opts.inputs), *((opts.base,) if opts.base else ())):
        check_input_path(path)
    readers = [SafetensorsReader(spec.path) for spec in opts.inputs]
    base_reader = SafetensorsReader(opts.base) if opts.base else None
    try:
        inputs = [s.path for s in opts.inputs] + (base_reader.files() if base_reader else [])
        check_output_path(opts.output, inputs=inputs, force=opts.force)
        # each input's family by matching (lorabake.lora_base), so inputs for different families are refused
        loras = [identify(parse_lora(r.tensors, r.metadata, path=r.path), r.tensors)[0] for r in readers]
        base = BaseWeights(base_reader) if base_reader else None
        _check_supported(loras, base)
        modules, namings, input_shas = _collect(opts, readers, loras)
        if not modules:
            raise UsageError("every module is at strength 0 (strengths and block specs): the output would change nothing")
        from_base = _from_base(modules, base, loras)
        result = ToolResult(opts)
        items = _build(opts, modules, namings, result, readers, loras, from_base)
        write(opts, items, result, loras, input_shas, sources=[base_reader] if base_reader else [])
        return result
    finally:
        for r in (*readers, *((base_reader,) if base_reader else ())):
            r.close()


def _check_supported(loras: list[LoraFile], base: BaseWeights | None) -> None:
    archs = {lora.arch for lora in loras if lora.arch not in ("unknown", None)}
    if len(archs) > 1:
        names = ", ".join(f"{os.path.basename(lo.path)} ({lo.arch})" for lo in loras)
        raise UsageError(f"the inputs are for different model families: {names}")
    if base is not None and archs and base.arch not in archs:
        raise UsageError(f"the base {base.reader.path} is {base.arch}; the inputs are for {archs.pop()}")
    for lora in loras:
        if lora.unknown_keys:
            key = lora.unknown_keys[0]
            raise LoraFormatError("tensor belongs to no LoRA module", path=lora.path, tensor=key)
        for m in lora.modules.values():
            bias = sorted(set(m.parts) & set(adapters.BIAS_PARTS))
            first = next(iter(m.parts.values()))
            if bias:
                raise LoraFormatError(f"module {m.stem!r} is {m.algo} with a bias delta ({bias[0]}), which a LoRA "
                                      "file's factors cannot carry", path=lora.path, tensor=m.parts[bias[0]],
                                      hint="bake it into a base with `lorabake merge` instead")
            if not _needs_base(m):
                continue
            if base is None:
                raise LoraFormatError(
                    f"module {m.stem!r} is {'DoRA' if m.dora else m.algo}: its change depends on the base weight",
                    path=lora.path, tensor=first,
                    hint="pass --base BASE (the checkpoint it was trained for) to factor its exact change, "
                    "or bake it with `lorabake merge`")
            base.check(lora, m.stem, first)


def _needs_base(module) -> bool:
    return module.dora or module.algo in adapters.WEIGHT_DEPENDENT_ALGOS


def _collect(opts, readers, loras):
    """stem → terms (file order), stem → naming, and each input's data-section SHA-256."""
    modules: dict[str, list[_Term]] = {}
    namings: dict[str, _Naming] = {}
    shas: list[str] = []
    for spec, reader, lora in zip(opts.inputs, readers, loras):
        data = {name: reader.read(name) for name in reader.tensors}
        sha = hashlib.sha256()
        for name in sorted(reader.tensors, key=lambda n: reader.tensors[n].start):
            sha.update(tensor_bytes(data[name]))
        shas.append(sha.hexdigest())
        factors = blocks.lora_factors(lora, spec.blocks, where=spec.path) if spec.blocks else {}
        header, targets = virtual_targets(lora)
        for stem, m in lora.modules.items():
            parts = {p: data[k] for p, k in m.parts.items()}
            _check_factors(lora, m, parts)
            scale = _scale(lora, m, parts)
            component = module_component_hint(stem) or "unet"
            strength = spec.strength_for(component) * factors.get(stem, 1.0)
            coef = strength * scale
            if coef == 0.0:
                continue  # a removed block (or strength 0): the module is left out, not written as zeros
            terms = modules.setdefault(stem, [])
            if _needs_base(m):  # its ΔW once the base weight is read (`_from_base`)
                patch = delta.Patch(m.algo, {p: t.double() for p, t in parts.items()}, strength, dora=m.dora, scale=scale)
                terms.append(_Term(1.0, None, None, (), (), patch))
                namings.setdefault(stem, _naming(stem, m, parts))
                continue
            target = targets.get(stem)
            f = module_factors(m.algo, parts, tuple(header[target.key].shape) if target and not target.slice else None)
            term = _Term(coef, f.up, f.down, f.kernel, f.out_shape)
            known = next((t for t in terms if t.patch is None), None)
            if known and (known.kernel, known.up.shape[0]) != (term.kernel, term.up.shape[0]):
                raise LoraFormatError(
                    f"module {stem!r} has shape {(term.up.shape[0], *term.kernel)} here but "
                    f"{(known.up.shape[0], *known.kernel)} in an earlier input",
                    path=lora.path, tensor=next(iter(m.parts.values())),
                )
            terms.append(term)
            if stem not in namings or (namings[stem].kind != "lora" and m.algo == "lora"):
                namings[stem] = _naming(stem, m, parts)
    return modules, namings, shas


def _from_base(modules: dict[str, list[_Term]], base: BaseWeights | None, loras: list[LoraFile]) -> dict[str, str]:
    """Modules with a weight-dependent term: replaced by one term, exact factors of W' − W from the base.
    Returns stem -> the kinds folded (for the report)."""
    out: dict[str, str] = {}
    for stem, terms in modules.items():
        if not any(t.patch is not None for t in terms):
            continue
        lora = next(lo for lo in loras if stem in lo.modules)
        tensor = next(iter(lora.modules[stem].parts.values()))
        pending = [Pending(t.coef, t.up, t.down, t.patch) for t in terms]
        up, down, shape = base.delta(stem, pending, path=lora.path, tensor=tensor)
        kernel = shape[1:]
        modules[stem] = [_Term(1.0, up, down, kernel, (1,) * (len(kernel) - 1))]
        out[stem] = "+".join(dict.fromkeys("dora" if t.patch.dora else t.patch.algo for t in terms if t.patch))
    return out


def _check_factors(lora: LoraFile, m, parts: dict[str, torch.Tensor]) -> None:
    for part, t in parts.items():
        if part in ("alpha", "scale"):
            continue
        if not t.dtype.is_floating_point:
            raise LoraFormatError(f"module {m.stem!r} has non-float factors", path=lora.path, tensor=m.parts[part])
        if not torch.isfinite(t).all():
            raise LoraFormatError(f"NaN or Inf in module {m.stem!r}", path=lora.path, tensor=m.parts[part])


def _naming(stem: str, m, parts: dict[str, torch.Tensor]) -> _Naming:
    """The first LoRA input's spelling of a module; a module only other types carry becomes kohya LoRA."""
    alpha_key = m.parts.get("alpha")
    alpha_dtype = parts["alpha"].dtype if alpha_key else None
    if m.algo == "lora":
        return _Naming(m.parts["up"][len(stem):], m.parts["down"][len(stem):],
                       alpha_key[len(stem):] if alpha_key else None, parts["up"].dtype, alpha_dtype, "lora")
    dtype = next(t.dtype for p, t in parts.items() if p not in ("alpha", "scale"))
    return _Naming(".lora_up.weight", ".lora_down.weight", ".alpha", dtype, alpha_dtype or dtype, m.algo)


def _scale(lora: LoraFile, m, parts: dict[str, torch.Tensor]) -> float:
    """The module's own multiplier, by the one rule in `adapters.scale` (alpha tensor, else PEFT's scale)."""
    rank = adapters.rank_of(m.algo, {p: tuple(t.shape) for p, t in parts.items()})
    scalars: dict[str, float] = {}
    for part in ("alpha", "scale"):
        if part in m.parts:
            t = parts[part]
            if t.numel() != 1:
                raise LoraFormatError(f"{part} is not a scalar", path=lora.path, tensor=m.parts[part])
            scalars[part] = float(t.float().reshape(()))
            if not math.isfinite(scalars[part]):
                raise LoraFormatError(f"{part} {scalars[part]} is not finite", path=lora.path, tensor=m.parts[part])
    return scale_of(rank=rank, alpha=scalars.get("alpha"), scale_part=scalars.get("scale"), peft=lora.peft_scales.get(m.stem))


def _build(opts, modules, namings, result, readers, loras, from_base) -> list[tuple[str, torch.Tensor]]:
    """The output tensors, sorted by name (safetensors' canonical order)."""
    items: list[tuple[str, torch.Tensor]] = []
    for stem, terms in modules.items():
        naming = namings[stem]
        out_dtype = naming.factor_dtype if opts.dtype == "keep" else dtypes.torch_dtype(dtypes.CLI_NAMES[opts.dtype])
        rank_in = sum(t.down.shape[0] for t in terms)
        up, down = lowrank.stack([(t.coef, t.up, t.down) for t in terms])
        shape = (up.shape[0], *terms[0].kernel)
        keep_as_is = (
            opts.command == "resize" and opts.rank_mode == "fixed" and rank_in <= opts.rank
            and stem not in loras[0].peft_scales  # PEFT's metadata scale is not copied: fold it instead
            and stem not in from_base
        )
        if keep_as_is:
            norm = math.sqrt(lowrank.reduce(up, down, max_rank=rank_in).total_sq)
            result.modules.append(ModuleReport(stem, shape, rank_in, rank_in, norm, 0.0, "kept"))
            items.extend(_original_items(stem, readers[0], loras[0]))
            continue
        if opts.rank is None:
            reduced = lowrank.reduce(up, down, max_rank=rank_in)
            new_up, new_down, rank, action = up, down, rank_in, "stacked"
            error = 0.0
        else:
            reduced = lowrank.reduce(up, down, max_rank=opts.rank, mode=opts.rank_mode, param=opts.rank_param)
            new_up, new_down, rank, action = reduced.up, reduced.down, reduced.rank, "reduced"
            error = reduced.relative_error
        norm = math.sqrt(reduced.total_sq)
        action += f" from the base ({from_base[stem]})" if stem in from_base else (
            "" if naming.kind == "lora" else f" from {naming.kind}")
        result.modules.append(ModuleReport(stem, shape, rank_in, rank, norm, error, action))
        if naming.alpha is not None:
            stored = torch.tensor(float(rank)).to(naming.alpha_dtype)
            new_up = new_up * (rank / float(stored.float()))
            items.append((stem + naming.alpha, stored))
        items.append((stem + naming.up, new_up.reshape(up.shape[0], rank, *terms[0].out_shape).to(out_dtype)))
        items.append((stem + naming.down, new_down.reshape(rank, *terms[0].kernel).to(out_dtype)))
    for name, t in items:
        if t.dtype.is_floating_point and not bool(torch.isfinite(t.float()).all()):
            raise LoraFormatError("the result does not fit the output dtype (Inf)", path=opts.output, tensor=name,
                                  hint="use --dtype fp32 or smaller strengths")
    items.sort(key=lambda item: item[0])
    return items


def _original_items(stem: str, reader: SafetensorsReader, lora: LoraFile) -> list[tuple[str, torch.Tensor]]:
    return [(key, reader.read(key)) for key in lora.modules[stem].parts.values()]
