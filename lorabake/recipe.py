"""Recipes: one TOML file describes many bakes; this module turns it into a flat list of jobs.

A recipe has `[[bake]]` entries (one base, its LoRAs, one output; or `parts`, several bases baked
as one model such as Wan 2.2's two experts), `[[matrix]]` entries (bases × LoRA sets ×
strengths, outputs named by a template), optional `[defaults]` and `[pins]` (SHA-256 of inputs).
Relative paths are relative to the recipe's folder. Nothing here reads a model file: the jobs
and their canonical entries (what each output records in its metadata) come from the TOML alone.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

from lorabake.errors import UsageError
from lorabake.jobs import DTYPES, ROUNDINGS, Job, LoraUse, Pin, check_blocks, format_number, parse_lora_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

# Keys each table accepts. Options are the `lorabake merge` flags that change the output bytes.
OPTION_KEYS = ("dtype", "quant", "rounding", "allow_unmatched", "saturate")
TOP_KEYS = ("defaults", "pins", "bake", "matrix")
BAKE_KEYS = ("name", "base", "loras", "output", "parts", *OPTION_KEYS)
PART_KEYS = ("base", "loras", "output", *OPTION_KEYS)
MATRIX_KEYS = ("name", "bases", "loras", "strengths", "output", *OPTION_KEYS)
PIN_KINDS = ("sha256", "data_sha256")
# Keys people will write that lorabake does not support yet, with the reason (refused, never ignored).
NOT_YET = {
    "quantization": "the key is 'quant' (fp8, nvfp4, mxfp8, int8, or a GGUF type such as Q8_0, Q4_K_M)",
    "device": "the device is a command-line choice (bake --device), not part of a recipe",
}
# Fields an output template may use.
TEMPLATE_FIELDS = ("name", "base", "loras", "strength", "dtype", "quant")
_FIELD = re.compile(r"\{([^{}]*)\}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Recipe:
    path: str
    folder: str
    jobs: tuple[Job, ...]
    pins: tuple[Pin, ...]


def load_recipe(path: str) -> Recipe:
    """Read, validate and expand a recipe file. Raises `UsageError` naming the entry and key."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise UsageError(f"cannot read the recipe: {exc.strerror or exc}", path=path) from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"not valid TOML: {exc}", path=path) from None
    return parse_recipe(doc, path=path)


def parse_recipe(doc: dict, *, path: str) -> Recipe:
    folder = os.path.dirname(os.path.abspath(path))
    _check_keys(doc, TOP_KEYS, "the recipe", path)
    defaults = _table(doc.get("defaults", {}), "[defaults]", path)
    _check_keys(defaults, OPTION_KEYS, "[defaults]", path)
    pins = _pins(doc.get("pins", {}), folder, path)
    ctx = _Ctx(path=path, folder=folder, defaults=defaults, pins={p.resolved: p for p in pins})
    jobs: list[Job] = []
    for i, entry in enumerate(_array(doc.get("bake", []), "bake", path)):
        jobs += _bake_entry(entry, f"[[bake]] #{i + 1}", ctx)
    for i, entry in enumerate(_array(doc.get("matrix", []), "matrix", path)):
        jobs += _matrix_entry(entry, f"[[matrix]] #{i + 1}", ctx)
    if not jobs:
        raise UsageError("the recipe has no [[bake]] or [[matrix]] entry", path=path)
    jobs = [j.renumbered(i) for i, j in enumerate(jobs)]
    _check_outputs(jobs, path)
    used = {u.resolved for j in jobs for u in j.inputs}
    for pin in pins:
        if pin.resolved not in used:
            raise UsageError(f"[pins] names {pin.text!r}, which no entry uses", path=path,
                             hint="remove the pin or fix its path (relative to the recipe's folder)")
    return Recipe(path=path, folder=folder, jobs=tuple(jobs), pins=tuple(pins))


@dataclass(frozen=True)
class _Ctx:
    path: str
    folder: str
    defaults: dict
    pins: dict[str, Pin]


def _bake_entry(entry: object, where: str, ctx: _Ctx) -> list[Job]:
    entry = _table(entry, where, ctx.path)
    _check_keys(entry, BAKE_KEYS, where, ctx.path)
    name = _opt_str(entry, "name", where, ctx.path)
    if "parts" in entry:
        for key in ("base", "loras", "output"):
            if key in entry:
                raise UsageError(f"{where}: {key!r} goes inside each of its parts", path=ctx.path)
        shared = {k: entry[k] for k in OPTION_KEYS if k in entry}
        parts = _array(entry["parts"], f"{where} parts", ctx.path)
        if not parts:
            raise UsageError(f"{where}: 'parts' is empty", path=ctx.path)
        jobs = []
        for i, part in enumerate(parts):
            part_where = f"{where} part {i + 1}"
            part = _table(part, part_where, ctx.path)
            _check_keys(part, PART_KEYS, part_where, ctx.path)
            jobs.append(_job(name, {**shared, **part}, part_where, ctx, strength=1.0, set_name=None))
        return jobs
    return [_job(name, entry, where, ctx, strength=1.0, set_name=None)]


def _matrix_entry(entry: object, where: str, ctx: _Ctx) -> list[Job]:
    entry = _table(entry, where, ctx.path)
    _check_keys(entry, MATRIX_KEYS, where, ctx.path)
    for key in ("bases", "loras", "output"):
        if key not in entry:
            raise UsageError(f"{where}: missing {key!r}", path=ctx.path)
    name = _opt_str(entry, "name", where, ctx.path)
    bases = _named(entry["bases"], f"{where} bases", ctx.path, of_lists=False)
    sets = _named(entry["loras"], f"{where} loras", ctx.path, of_lists=True)
    strengths = entry.get("strengths", [1.0])
    if not isinstance(strengths, list) or not strengths or not all(_is_number(s) for s in strengths):
        raise UsageError(f"{where}: 'strengths' must be a non-empty list of numbers", path=ctx.path)
    options = {k: entry[k] for k in OPTION_KEYS if k in entry}
    jobs = []
    for base_name, base in bases:
        for set_name, loras in sets:
            for strength in strengths:
                fields = {"base": base_name, "loras": set_name, "strength": format_number(float(strength))}
                cell = {**options, "base": base, "loras": loras, "output": entry["output"]}
                label = f"{where} base={base_name} loras={set_name} strength={fields['strength']}"
                jobs.append(_job(name, cell, label, ctx, strength=float(strength), set_name=set_name, fields=fields))
    return jobs


def _job(name, entry: dict, where: str, ctx: _Ctx, *, strength: float, set_name, fields=None) -> Job:
    for key in ("base", "loras", "output"):
        if key not in entry:
            raise UsageError(f"{where}: missing {key!r}", path=ctx.path)
    base = _path_text(entry["base"], f"{where} base", ctx.path)
    loras_raw = entry["loras"]
    if not isinstance(loras_raw, list) or not loras_raw:
        raise UsageError(f"{where}: 'loras' must be a non-empty list", path=ctx.path)
    loras = tuple(
        _lora(item, f"{where} loras[{i}]", ctx).scaled(strength) for i, item in enumerate(loras_raw)
    )
    options = {**ctx.defaults, **{k: entry[k] for k in OPTION_KEYS if k in entry}}
    dtype = options.get("dtype", "keep")
    if dtype not in DTYPES:
        raise UsageError(f"{where}: dtype {dtype!r} is not one of {', '.join(DTYPES)}", path=ctx.path)
    rounding = options.get("rounding", "nearest")
    if rounding not in ROUNDINGS:
        raise UsageError(f"{where}: rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}", path=ctx.path)
    allow = options.get("allow_unmatched", False)
    if not isinstance(allow, bool):
        raise UsageError(f"{where}: allow_unmatched must be true or false", path=ctx.path)
    saturate = options.get("saturate", False)
    if not isinstance(saturate, bool):
        raise UsageError(f"{where}: saturate must be true or false", path=ctx.path)
    quant = options.get("quant")
    if quant is not None and (not isinstance(quant, str) or not quant.strip()):
        raise UsageError(f"{where}: quant is a format name (fp8, nvfp4, mxfp8, int8, Q8_0, Q4_K_M, …)", path=ctx.path)
    fields = {"name": name or "", "dtype": dtype, "quant": quant or "", "base": _stem(base),
              "loras": set_name or "+".join(_stem(u.text) for u in loras), **(fields or {})}
    output = _expand(_path_text(entry["output"], f"{where} output", ctx.path), fields, where, ctx.path)
    base_use = LoraUse(text=base, resolved=_resolve(ctx.folder, base), strength=1.0)
    pins = tuple(ctx.pins[u.resolved] for u in (base_use, *loras) if u.resolved in ctx.pins)
    return Job(
        index=0, where=where, name=name, base=base_use, loras=loras, output=output,
        output_path=_resolve(ctx.folder, output), dtype=dtype, rounding=rounding, allow_unmatched=allow, pins=pins,
        quant=quant, saturate=saturate,
    )


def _lora(item: object, where: str, ctx: _Ctx) -> LoraUse:
    if isinstance(item, str):
        text, strength, te, blocks = parse_lora_text(item, where=where, recipe=ctx.path)
    elif isinstance(item, dict):
        _check_keys(item, ("path", "strength", "te_strength", "blocks"), where, ctx.path)
        if "path" not in item:
            raise UsageError(f"{where}: missing 'path'", path=ctx.path)
        text = _path_text(item["path"], where, ctx.path)
        strength, te = item.get("strength", 1.0), item.get("te_strength")
        if not _is_number(strength) or (te is not None and not _is_number(te)):
            raise UsageError(f"{where}: strengths must be numbers", path=ctx.path)
        strength, te = float(strength), (None if te is None else float(te))
        blocks = item.get("blocks")
        if blocks is not None:
            if not isinstance(blocks, str):
                raise UsageError(f"{where}: 'blocks' is a string (a preset, a list of numbers, or NAME=VALUE items)", path=ctx.path)
            check_blocks(blocks, where=where, recipe=ctx.path)
    else:
        raise UsageError(f"{where}: a LoRA is a 'PATH:STRENGTH[:TE_STRENGTH][@BLOCKS]' string or a table", path=ctx.path)
    return LoraUse(text=text, resolved=_resolve(ctx.folder, text), strength=strength, te_strength=te, blocks=blocks)


def _pins(raw: object, folder: str, path: str) -> list[Pin]:
    table = _table(raw, "[pins]", path)
    out = []
    for text, value in table.items():
        where = f"[pins] {text!r}"
        if isinstance(value, str):
            value = {"sha256": value}
        value = _table(value, where, path)
        _check_keys(value, PIN_KINDS, where, path)
        if len(value) != 1:
            raise UsageError(f"{where}: give exactly one of sha256 (whole file) or data_sha256 (data section)", path=path)
        (kind, digest), = value.items()
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest.lower()):
            raise UsageError(f"{where}: {kind} must be 64 hex digits", path=path)
        out.append(Pin(text=text, resolved=_resolve(folder, text), kind=kind, sha256=digest.lower()))
    return out


def _check_outputs(jobs: list[Job], path: str) -> None:
    """Two jobs never write one file, and no output is an input of any job."""
    seen: dict[str, Job] = {}
    inputs = {u.resolved for j in jobs for u in j.inputs}
    for job in jobs:
        key = os.path.normcase(job.output_path)
        if key in seen:
            raise UsageError(
                f"{seen[key].where} and {job.where} both write {job.output!r}", path=path,
                hint="make the output template tell them apart, e.g. with {base}, {loras} and {strength}",
            )
        seen[key] = job
        if job.output_path in inputs:
            raise UsageError(f"{job.where}: output {job.output!r} is an input of the recipe", path=path)
        if not job.output.endswith((".safetensors", ".gguf")):
            raise UsageError(f"{job.where}: output {job.output!r} must end in .safetensors (or .gguf with a GGUF quant)", path=path)


def _expand(template: str, fields: dict[str, str], where: str, path: str) -> str:
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in TEMPLATE_FIELDS:
            raise UsageError(f"{where}: unknown field {{{key}}} in output; use {', '.join(TEMPLATE_FIELDS)}", path=path)
        return fields[key]

    return _FIELD.sub(sub, template)


def _named(raw: object, where: str, path: str, *, of_lists: bool) -> list[tuple[str, object]]:
    """A list (names from file stems) or a table name -> value, in the order written."""
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, list):
        items = [(_set_name(v) if of_lists else _stem(str(v)), v) for v in raw]
    else:
        raise UsageError(f"{where}: must be a list or a table", path=path)
    if not items:
        raise UsageError(f"{where}: is empty", path=path)
    names = [n for n, _ in items]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise UsageError(f"{where}: two entries are named {dup!r}; use a table to name them", path=path)
    for n, v in items:
        if of_lists and not isinstance(v, list):
            raise UsageError(f"{where}: {n!r} must be a list of LoRAs", path=path)
        if not of_lists:
            _path_text(v, f"{where} {n!r}", path)
    return items


def _set_name(loras: object) -> str:
    """A LoRA set written as a bare list is named by its files' stems joined with '+'."""
    if not isinstance(loras, list):
        return str(loras)
    stems = []
    for item in loras:
        text = item.get("path", "") if isinstance(item, dict) else str(item)
        if isinstance(item, str):
            text = parse_lora_text(item, where="", recipe="")[0]
        stems.append(_stem(str(text)))
    return "+".join(stems)


def _check_keys(table: dict, allowed: tuple[str, ...], where: str, path: str) -> None:
    for key in table:
        if key in NOT_YET:
            raise UsageError(f"{where}: {key!r}: {NOT_YET[key]}", path=path)
        if key not in allowed:
            raise UsageError(f"{where}: unknown key {key!r} (known: {', '.join(allowed)})", path=path)


def _table(raw: object, where: str, path: str) -> dict:
    if not isinstance(raw, dict):
        raise UsageError(f"{where} must be a table", path=path)
    return raw


def _array(raw: object, where: str, path: str) -> list:
    if isinstance(raw, dict):  # [matrix] written once as a table is one entry
        return [raw]
    if not isinstance(raw, list):
        raise UsageError(f"[[{where}]] must be an array of tables", path=path)
    return raw


def _opt_str(entry: dict, key: str, where: str, path: str) -> str | None:
    value = entry.get(key)
    if value is not None and not isinstance(value, str):
        raise UsageError(f"{where}: {key!r} must be a string", path=path)
    return value


def _path_text(value: object, where: str, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where}: must be a path (a non-empty string)", path=path)
    return value


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and float(x) == float(x) and abs(x) != float("inf")


def _resolve(folder: str, text: str) -> str:
    return os.path.normpath(os.path.join(folder, os.path.expanduser(text)))


def _stem(text: str) -> str:
    base = os.path.basename(os.path.normpath(text))
    for suffix in (".safetensors.index.json", ".safetensors"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return os.path.splitext(base)[0]
