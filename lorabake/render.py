"""Rendering for the CLI: rich tables on a terminal, plain lines otherwise, JSON documents.

Everything that came out of a file (tensor names, metadata) goes through `sanitize` first, and
reaches a terminal through a console that reads no markup and no emoji codes (see `lorabake.text`).
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from lorabake.text import sanitize

META_DISPLAY_LIMIT = 200
# A patched tensor that lost more than this fraction of its delta to rounding is listed.
LOST_DELTA_WARN = 0.05


def _esc(text: object, limit: int | None = None) -> str:
    """File text for a table cell: sanitized (the console reads no markup or emoji codes anyway)."""
    return sanitize(text, limit)


def _console() -> Console:
    """Markup and emoji codes off: a `[sd1]` or `:skull:` from a file is printed as written."""
    return Console(highlight=False, soft_wrap=True, emoji=False, markup=False)


def _tty() -> bool:
    return sys.stdout.isatty()


def _out(line: str = "") -> None:
    """One line of plain text (file text in it already sanitized): never read as markup or emoji."""
    if _tty():
        _console().print(line)
    else:
        print(line)


# -- merge ---------------------------------------------------------------------------------
def merge_json(result) -> dict:
    from lorabake.quant.report import vanished_loras  # torch-free CLI import: only when rendering a merge

    plan = result.plan
    return {
        "base": plan.base.path,
        "base_architecture": plan.info.arch,
        "output": result.output,
        "dry_run": result.output is None,
        "tensors_changed": result.tensors_changed,
        "tensors_cast": result.tensors_cast,
        "tensors_patched_planned": len(plan.patches),
        "bytes_written": result.bytes_written,
        "seconds": round(result.seconds, 3),
        "sha256": result.sha256,
        "autov2": result.autov2,
        "data_sha256": result.data_sha256,
        "loras": [
            {
                "path": lp.reader.path,
                "flavour": lp.lora.flavour,
                "architecture": lp.lora.arch,
                "architecture_note": lp.lora.arch_note,
                "strength": lp.spec.strength,
                "te_strength": lp.spec.te_strength if lp.spec.te_strength is not None else lp.spec.strength,
                "blocks": lp.block_weights and lp.block_weights.as_json(set(plan.block_of.values())),
                "blocks_text": lp.block_weights and lp.block_weights.describe(set(plan.block_of.values())),
                "data_sha256": result.lora_data_sha256[i] if i < len(result.lora_data_sha256) else None,
                "modules": len(lp.lora.modules),
                "applied": lp.counts().get("applied", {}),
                "skipped": lp.counts().get("skipped", {}),
                "unmatched": lp.counts().get("unmatched", {}),
                "not_applied": [
                    {"module": o.stem, "status": o.status, "component": o.component, "reason": o.reason}
                    for o in lp.outcomes
                    if o.status != "applied"
                ],
            }
            for i, lp in enumerate(plan.loras)
        ],
        "lost_to_rounding": {
            # lost_fraction can stray a hair below 0 from fp32 noise; a report says 0 then
            "max": max(0.0, max(result.lost.values(), default=0.0)),
            "tensors_over_5_percent": sorted(k for k, v in result.lost.items() if v > LOST_DELTA_WARN),
            # per targeted tensor: 1 − ⟨realised, intended⟩/‖intended‖² (rounding.lost_fraction)
            "per_tensor": {k: result.lost[k] for k in sorted(result.lost)},
        },
        # --saturate: tensor -> the largest |value| clamped to the output dtype's range (null: Inf)
        "saturated": {k: result.saturated[k] for k in sorted(result.saturated)},
        # re-quantized layers: ‖dequantised output − patched fp32 weight‖ / ‖patched fp32 weight‖
        "quantization_error": {k: result.quant_error[k] for k in sorted(getattr(result, "quant_error", {}))},
        "vanished": vanished_loras(result),
        "retyped": dict(getattr(result, "retyped", {})),
    }


def _counts_text(counts: dict[str, int]) -> str:
    if not counts:
        return "0"
    return f"{sum(counts.values())} (" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")"


def print_merge(result) -> None:
    doc = merge_json(result)
    _out(f"base: {_one(doc['base'])} [{doc['base_architecture']}]")
    for lora in doc["loras"]:
        _out(
            f"lora: {_one(lora['path'])} [{lora['flavour']}, {lora['architecture']}] "
            f"strength {lora['strength']:g} / te {lora['te_strength']:g}"
        )
        if lora["blocks"]:
            _out(f"  blocks {_esc(lora['blocks']['spec'])}: {lora['blocks_text']}")
        if lora["architecture_note"]:
            _out(f"  note: {_esc(lora['architecture_note'])}")
        _out(f"  applied:   {_counts_text(lora['applied'])}")
        _out(f"  skipped:   {_counts_text(lora['skipped'])}")
        _out(f"  unmatched: {_counts_text(lora['unmatched'])}")
        for row in lora["not_applied"][:20]:
            _out(f"    {row['status']}: {_one(row['module'])}: {_one(row['reason'])}")
        if len(lora["not_applied"]) > 20:
            _out(f"    … {len(lora['not_applied']) - 20} more (use --json for all)")
    if doc["dry_run"]:
        _out(f"dry run: {doc['tensors_patched_planned']} tensors would change; nothing written")
        return
    _out(f"output: {_one(doc['output'])}")
    _out(f"  tensors changed: {doc['tensors_changed']}, re-cast: {doc['tensors_cast']}")
    lost = doc["lost_to_rounding"]
    _out(f"  largest fraction of a delta lost to rounding: {lost['max']:.3g}")
    if lost["tensors_over_5_percent"]:
        _out(f"  {len(lost['tensors_over_5_percent'])} tensors lost over 5% of their delta (try --rounding stochastic or a wider --dtype)")
    if doc["saturated"]:
        _out(f"  {len(doc['saturated'])} tensors had values clamped to the output dtype's range (--saturate):")
        for name, peak in list(doc["saturated"].items())[:20]:
            _out(f"    {_one(name)}: largest |value| {peak:.4g}")
    if doc["quantization_error"]:
        worst = max(doc["quantization_error"].values())
        _out(f"  re-quantized {len(doc['quantization_error'])} layers; largest quantization error {worst:.3g} of the weight")
    for name, change in sorted(doc["retyped"].items()):
        _out(f"  written in another type: {_esc(name)} {change}")
    for row in doc["vanished"]:
        _out(
            f"  warning: {_esc(row['path'])} lost {row['mean_lost']:.0%} of its delta on average over {row['tensors']} "
            "tensors: its effect mostly vanished (try --rounding stochastic or a wider format)"
        )
    _out(f"  sha256: {doc['sha256']}  AutoV2: {doc['autov2']}")
    _out(f"  {doc['bytes_written']} bytes in {doc['seconds']:.2f} s")


# -- inspect -------------------------------------------------------------------------------
def print_inspect(reports: list[dict]) -> None:
    for i, rep in enumerate(reports):
        if i:
            _out()
        if _tty():
            _rich_report(rep)
        else:
            _plain_report(rep)
        if rep.get("block_energy"):
            _block_energy(rep["block_energy"])


def _block_energy(doc: dict) -> None:
    """Share of ‖ΔW‖² per block, with a bar: where the LoRA acts, to choose @BLOCKS strengths."""
    _out(f"energy per block ({_esc(doc['architecture'])}; ‖ΔW‖² at strength 1):")
    for row in doc["blocks"]:
        bar = "#" * round(40 * row["share"])
        _out(f"  {_esc(row['block']):<12} {row['modules']:>5} modules {100 * row['share']:6.2f}%  {bar}")
    if doc["unmeasured"]:
        _out(f"  not measured (the change depends on the base weight): {len(doc['unmeasured'])} modules")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _summary_rows(rep: dict) -> list[tuple[str, str]]:
    rows = [("kind", rep["kind"]), ("architecture", rep["architecture"])]
    if rep["kind"] == "checkpoint":
        rows += [
            ("layout", rep["layout"]),
            ("prefix", repr(rep["prefix"])),
            ("params", f"{rep['params']:,}"),
            ("dtypes", ", ".join(f"{k} {v}" for k, v in rep["dtypes"].items())),
        ]
        if rep["candidates"]:
            rows.append(("candidates", ", ".join(rep["candidates"])))
        rows += [("note", n) for n in rep["notes"]]
        rows += _quant_rows(rep.get("quantization"))
    else:
        rows += [
            ("architecture from", str(rep["architecture_source"])),
            ("flavour", rep["flavour"]),
            ("algorithms", ", ".join(f"{k} {v}" for k, v in rep["algorithms"].items())),
            ("modules", str(rep["modules"])),
            ("components", ", ".join(f"{k} {v}" for k, v in rep["components"].items())),
            ("ranks", ", ".join(f"{k}×{v}" for k, v in rep["ranks"].items())),
            ("alphas", ", ".join(f"{k}×{v}" for k, v in rep["alphas"].items()) or "none (scale 1)"),
            ("scale alpha/rank", ", ".join(f"{k}×{v}" for k, v in rep["scales"].items())),
        ]
        if rep.get("architecture_note"):
            rows.append(("note", rep["architecture_note"]))
        if rep["dora_modules"]:
            rows.append(("DoRA modules", str(rep["dora_modules"])))
        if rep["unknown_keys"]:
            rows.append(("unknown keys", f"{len(rep['unknown_keys'])}: " + ", ".join(rep["unknown_keys"][:5])))
        if rep["top_tags"]:
            rows.append(("top tags", ", ".join(f"{t} ({c})" for t, c in rep["top_tags"])))
    rows += [("size", _size(rep["size"])), ("tensors", str(rep["tensors"]))]
    for key in ("sha256", "autov2", "data_sha256", "sshs_model_hash_matches"):
        if key in rep:
            rows.append((key, str(rep[key])))
    return rows


def _quant_rows(q: dict | None) -> list[tuple[str, str]]:
    """A quantized checkpoint: formats, bits per weight, format per layer group, kept layers."""
    if not q:
        return []
    rows = [
        ("quantized", ", ".join(f"{k} {v}" for k, v in q["formats"].items())),
        ("bits per weight", str(q["bits_per_weight"])),
        ("high precision", f"{len(q['high_precision'])} groups: " + ", ".join(q["high_precision"][:8])),
    ]
    rows += [(f"  {group}", ", ".join(f"{k} {v}" for k, v in fmts.items())) for group, fmts in list(q["groups"].items())[:40]]
    return rows


def _plain_report(rep: dict) -> None:
    print(f"{_one(rep['path'])}:")
    for k, v in _summary_rows(rep):
        print(f"  {k}: {_one(v, 500)}")
    if rep["kind"] == "checkpoint":
        for name, c in rep["components"].items():
            dts = ", ".join(f"{k} {v}" for k, v in c["dtypes"].items())
            print(f"  component {name}: {c['kind']} root {c['root']!r} params {c['params']:,} tensors {c['tensors']} ({dts})")
    else:
        for k, v in rep["training"].items():
            print(f"  {k}: {_one(v, META_DISPLAY_LIMIT)}")
    cov = rep.get("coverage")
    if cov:
        _plain_coverage(cov)
    for line in _recipe_lines(rep):
        print(f"  {_one(line, META_DISPLAY_LIMIT * 4)}")
    for k, v in rep["metadata"].items():
        if k not in rep.get("training", {}) and k != "ss_tag_frequency":
            print(f"  meta {_one(k, 80)}: {_one(v, META_DISPLAY_LIMIT)}")


def _recipe_lines(rep: dict) -> list[str]:
    """An output of `lorabake bake`: its recipe hash and the entry that rebuilds it, as recipe text."""
    recipe = rep.get("recipe")
    if not recipe:
        return []
    check = "matches the entry" if recipe["matches"] else "does NOT match the entry"
    lines = [f"recipe sha256: {recipe['sha256']} ({check})"]
    if recipe.get("toml"):
        lines += ["recipe entry (bake it from a recipe in the same folder to rebuild this file):"]
        lines += [f"  {line}" for line in recipe["toml"].splitlines()]
    return lines


def _one(text: object, limit: int | None = None) -> str:
    """Plain output is one fact per line: a newline in a value must not start a fake line."""
    return sanitize(text, limit, one_line=True)


def _plain_coverage(cov: dict) -> None:
    print(f"  against {_one(cov['base'])} [{cov['base_architecture']}]:")
    for status in ("applied", "skipped", "unmatched"):
        print(f"    {status}: {_counts_text(cov[status])}")
    for row in cov["details"]:
        print(f"    {row['status']}: {_one(row['module'])}: {_one(row['reason'])}")
    for row in cov.get("keys", ()):
        print(f"    key {_one(key_line(row))}")


def key_line(row: dict) -> str:
    """One module of `inspect --keys`: where it lands and why, or the nearest names it could have meant."""
    where = row["tensor"] or "no tensor"
    if row["rows"]:
        where += f" rows {row['rows'][0]}..{row['rows'][1]}"
    if row["transform"]:
        where += f" ({row['transform']})"
    text = f"{row['module']} -> {where} [{row['status']}]"
    if row["rule"] is not None:
        text += f" by {row['family']}: {row['table']}" + (f": {row['rule']}" if row["rule"] else "")
    if row["algorithm"]:
        text += f"; {row['algorithm']} rank {row['rank']} alpha {row['alpha']} scale {row['scale']:g}"
    if row["reason"]:
        text += f"; {row['reason']}"
    if row.get("nearest"):
        text += "; nearest: " + ", ".join(f"{n['module']} ({n['tensor']})" for n in row["nearest"])
    return text


def _rich_report(rep: dict) -> None:
    console = _console()
    table = Table(title=_esc(rep["path"]), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in _summary_rows(rep):
        table.add_row(k, _esc(v, 500))
    console.print(table)
    if rep["kind"] == "checkpoint" and rep["components"]:
        comp = Table("component", "kind", "root", "params", "tensors", "dtypes", title="components", title_justify="left")
        for name, c in rep["components"].items():
            comp.add_row(name, c["kind"], _esc(c["root"]), f"{c['params']:,}", str(c["tensors"]),
                         ", ".join(f"{k} {v}" for k, v in c["dtypes"].items()))
        console.print(comp)
    if rep["kind"] == "lora" and rep["training"]:
        tr = Table("training", "value", title="training metadata", title_justify="left")
        for k, v in rep["training"].items():
            tr.add_row(_esc(k), _esc(v, META_DISPLAY_LIMIT))
        console.print(tr)
    cov = rep.get("coverage")
    if cov:
        ct = Table("status", "modules", title=f"coverage against {_esc(cov['base'])} [{cov['base_architecture']}]",
                   title_justify="left")
        for status in ("applied", "skipped", "unmatched"):
            ct.add_row(status, _counts_text(cov[status]))
        console.print(ct)
        if cov["details"]:
            dt = Table("status", "module", "reason")
            for row in cov["details"][:50]:
                dt.add_row(row["status"], _esc(row["module"]), _esc(row["reason"]))
            console.print(dt)
        for row in cov.get("keys", ()):
            console.print(_esc(key_line(row), 2000))
    recipe_lines = _recipe_lines(rep)
    if recipe_lines:
        console.print("\n".join(_esc(line, META_DISPLAY_LIMIT * 4) for line in recipe_lines))
    other = {k: v for k, v in rep["metadata"].items() if k not in rep.get("training", {}) and k != "ss_tag_frequency"}
    if other:
        mt = Table("key", "value", title="metadata", title_justify="left")
        for k, v in other.items():
            mt.add_row(_esc(k, 80), _esc(v, META_DISPLAY_LIMIT))
        console.print(mt)


# -- extract -------------------------------------------------------------------------------
def print_extract(doc: dict) -> None:
    _out(f"extracted {doc['modules']} modules [{doc['arch']}] from {_one(doc['tuned'])} − {_one(doc['base'])}")
    _out(f"  rank {doc['rank_min']}..{doc['rank_max']} ({doc['rank_mode']}), dtype {doc['dtype']}")
    _out(f"  relative error ‖ΔW − up·down·scale‖/‖ΔW‖: {doc['error']:.4g} overall")
    worst = sorted(doc["per_module"], key=lambda m: m["error"], reverse=True)[:5]
    for m in worst:
        _out(f"    {_one(m['stem'])}: rank {m['rank']}, error {m['error']:.4g}")
    if doc["full_deltas"]:
        parts = sorted({name.rpartition(".")[2] for name in doc["full_deltas"]})
        _out(f"  {len(doc['full_deltas'])} full deltas kept whole ({', '.join(parts)}): no LoRA carries them")
    if doc["skipped"]:
        _out("  skipped: " + ", ".join(f"{k} {v}" for k, v in doc["skipped"].items()))
    if doc["unaddressable"]:
        _out(f"  {len(doc['unaddressable'])} changed weights have no LoRA name and were left out")
    _out(f"output: {_one(doc['output'])}")
    _out(f"  sha256: {doc['sha256']}  {doc['bytes_written']} bytes in {doc['timings'].get('total', 0):.2f} s")
