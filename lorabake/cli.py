"""Thin command line: parse, build one options object, call one function in `ops`, render.

Exit codes: 0 success, 1 failure on data or files, 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import gc
import sys
import traceback

import click

from lorabake import __version__, cli_loratools, interrupts, stdio
from lorabake.errors import EXIT_CODES_HELP, LorabakeError, UsageError, from_os_error
from lorabake.lora_args import parse_lora_arg
from lorabake.text import sanitize, to_json

MERGE_EXAMPLES = """
\b
Examples:
  lorabake merge base.safetensors --lora moxin.safetensors:0.5 --lora light.safetensors:1.0 -o out.safetensors
  lorabake merge sdxl.safetensors --lora style.safetensors:0.8:0.4 -o out.safetensors --dtype fp16
  lorabake merge flux1-dev.safetensors --lora detail.safetensors:-0.5 -o less_detail.safetensors
  lorabake merge sdxl.safetensors --lora style.safetensors:0.8@OUTD -o out.safetensors
  lorabake merge flux1-dev.safetensors --lora a.safetensors@double:0-7=0,single:*=0.5 -o out.safetensors
  lorabake merge base.safetensors --lora a.safetensors --dry-run
"""

INSPECT_EXAMPLES = """
\b
Examples:
  lorabake inspect sd_xl_base_1.0.safetensors
  lorabake inspect my_lora.safetensors --json
  lorabake inspect my_lora.safetensors --against sd_xl_base_1.0.safetensors
  lorabake inspect my_lora.safetensors --against sd_xl_base_1.0.safetensors --keys
  lorabake inspect *.safetensors --hash
  lorabake inspect my_lora.safetensors --blocks
"""

EXTRACT_EXAMPLES = """
\b
Examples:
  lorabake extract base.safetensors tuned.safetensors -o diff_lora.safetensors --rank 32
  lorabake extract base.safetensors tuned.safetensors -o diff.safetensors --rank-mode energy --rank-param 0.9
"""


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps errors to one `Error:` line and the documented exit codes.

    Anything that escapes as a Python exception (an `OSError` from a race after the up-front
    checks, or a bug) is still one `Error:` line; `--debug` adds the traceback above it.
    SIGINT and SIGTERM from here on are one line and exit 130 (see `interrupts`).

    As the process's entry (`argv` None), the cyclic GC is off until the heavy imports are in
    (`_imports_done`), and what exists at exit is frozen so the interpreter's last collection skips
    it: torch's ~10^5 objects live until exit, and traversing them during the import and again at
    exit was ~1 s of CPU per run (py-spy: 5 % of an SD1.5 merge's CPU samples at exit alone).
    """
    own_process = argv is None
    if own_process:
        gc.disable()
    try:
        interrupts.install()
        stdio.ensure_open()
        _run(argv)
    except (click.exceptions.Abort, KeyboardInterrupt, interrupts.Interrupted):
        _interrupted()
    finally:
        if own_process:
            gc.freeze()


def _imports_done() -> None:
    """Collect cycles again once a command has imported what it needs (see `main`)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def _interrupted() -> None:
    interrupts.ignore()
    written = interrupts.written()
    if written:
        line = "Interrupted after the output was written: " + ", ".join(sanitize(p, one_line=True) for p in written)
    else:
        line = "Interrupted: nothing was written."
    try:
        click.echo(line, err=True)
    except (OSError, ValueError):
        pass
    sys.exit(130)


def _run(argv: list[str] | None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="lorabake", standalone_mode=False)
    except click.exceptions.Abort:  # click's name for a KeyboardInterrupt: handled by main
        raise
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except LorabakeError as exc:
        _fail(exc, debug=debug)
    except OSError as exc:
        _fail(from_os_error(exc), debug=debug)
    except Exception as exc:  # a bug: still one line, the traceback on request
        _fail(
            LorabakeError(
                f"internal error: {type(exc).__name__}: {exc}",
                hint="this is a bug in lorabake; rerun with --debug and report the traceback",
            ),
            debug=debug,
        )


def _fail(exc: LorabakeError, *, debug: bool) -> None:
    interrupts.ignore()  # one line: a signal now must not add a second
    if debug:
        traceback.print_exc()
    click.echo(f"Error: {sanitize(str(exc), one_line=True)}", err=True)
    sys.exit(exc.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="lorabake")
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
def cli(debug: bool) -> None:  # noqa: ARG001
    """Bake LoRA adapters into diffusion checkpoints, one tensor at a time."""


# -- merge ---------------------------------------------------------------------------------
@cli.command(epilog=MERGE_EXAMPLES + "\n" + EXIT_CODES_HELP)
@click.argument("base", type=click.Path())
@click.option("--lora", "loras", multiple=True, required=True, metavar="PATH[:STRENGTH[:TE_STRENGTH]][@BLOCKS]",
              help="A LoRA to bake; strength defaults to 1.0, text-encoder strength to the strength. "
                   "@BLOCKS: per-block strengths, a preset (OUTD), a block-weight vector (17/26 SD1, 12/20 SDXL) "
                   "or NAME=VALUE items (double:0-7=0,single:*=1; IN04=0; te=0.5).")
@click.option("-o", "--output", type=click.Path(), help="Output .safetensors file.")
@click.option("--dtype", type=click.Choice(["keep", "fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2"]), default="keep",
              show_default=True, help="Dtype of the output's float tensors.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--rounding", type=click.Choice(["nearest", "stochastic"]), default="nearest", show_default=True,
              help="How patched tensors are re-encoded (stochastic: seeded per tensor name, deterministic).")
@click.option("--allow-unmatched", is_flag=True, help="Bake the modules that fit even if some match nothing.")
@click.option("--quant", default=None, metavar="FORMAT",
              help="Quantize the output: fp8, fp8_e5m2, nvfp4, mxfp8, int8 (ComfyUI .safetensors) or a GGUF type "
                   "(Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, …; -o NAME.gguf). Norms, biases, embedders and small tensors stay high precision.")
@click.option("--gguf-requant", type=click.Choice(["refuse", "nearest"]), default="refuse", show_default=True,
              help="GGUF base: a patched tensor of a type lorabake cannot encode (I-quants) is refused, or written as the nearest K-quant.")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file (a regular file or symlink).")
@click.option("--saturate", is_flag=True,
              help="Clamp baked values beyond the output dtype's range to its largest value (listed) instead of failing.")
@click.option("--quiet", is_flag=True, help="Print only errors.")
def merge(base, loras, output, dtype, device, rounding, allow_unmatched, quant, gguf_requant, dry_run, as_json, force, saturate, quiet):
    """Bake LoRAs into BASE: W' = W + Σ strength · scale · ΔW, streamed tensor by tensor."""
    from lorabake import ops, progress, render
    _imports_done()

    specs = tuple(parse_lora_arg(text) for text in loras)
    if not dry_run and not output:
        raise UsageError("missing -o/--output (or pass --dry-run)")
    opts = ops.MergeOptions(
        base=base,
        loras=specs,
        output=output,
        dtype=dtype,
        device=device,
        rounding=rounding,
        allow_unmatched=allow_unmatched,
        gguf_requant=gguf_requant,
        quant=quant,
        dry_run=dry_run,
        force=force,
        saturate=saturate,
    )
    show_progress = not (quiet or as_json or dry_run) and sys.stderr.isatty()
    with progress.progress_bar(enabled=show_progress) as bar:
        result = ops.merge(opts, progress=bar.advance, on_plan=bar.start_for)
    with stdio.report():
        if as_json:
            click.echo(to_json(render.merge_json(result)))
        elif not quiet:
            render.print_merge(result)


# -- inspect -------------------------------------------------------------------------------
@cli.command(epilog=INSPECT_EXAMPLES + "\n" + EXIT_CODES_HELP)
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="One JSON document {\"files\": [...]}.")
@click.option("--hash", "with_hash", is_flag=True, help="Add SHA-256, AutoV2 and the data-section SHA-256.")
@click.option("--against", type=click.Path(), help="For LoRAs: show which modules fit this base checkpoint.")
@click.option("--keys", is_flag=True, help="With --against: each module's tensor, rows and the rule that sent it there.")
@click.option("--blocks", "with_blocks", is_flag=True,
              help="For LoRAs: the share of ‖ΔW‖² in each block (reads the factors), to choose @BLOCKS strengths.")
def inspect(files, as_json, with_hash, against, keys, with_blocks):
    """Say what each file is, from its header: checkpoint or LoRA, architecture, layout, modules."""
    from lorabake import inspection as inspecting
    from lorabake import render

    reports = [inspecting.inspect_file(path, with_hash=with_hash, against=against, keys=keys) for path in files]
    if with_blocks:
        from lorabake.block_energy import block_energy

        for rep in reports:
            if rep["kind"] == "lora":
                rep["block_energy"] = block_energy(rep["path"])
    with stdio.report():
        if as_json:
            click.echo(to_json({"files": reports}))
        else:
            render.print_inspect(reports)


# -- extract -------------------------------------------------------------------------------
@cli.command(epilog=EXTRACT_EXAMPLES + "\n" + EXIT_CODES_HELP)
@click.argument("base", type=click.Path())
@click.argument("tuned", type=click.Path())
@click.option("-o", "--output", type=click.Path(), required=True, help="Output LoRA .safetensors file.")
@click.option("--rank", type=int, default=32, show_default=True, help="Rank of linear/1x1 modules (cap for dynamic modes).")
@click.option("--conv-rank", type=int, help="Also extract 3x3 convs (LoCon) at this rank.")
@click.option("--rank-mode", type=click.Choice(["fixed", "energy", "ratio", "cumulative"]), default="fixed", show_default=True,
              help="energy: smallest rank keeping X of ‖ΔW‖²; ratio/cumulative: kohya resize_lora's sv_ratio/sv_cumulative.")
@click.option("--rank-param", type=float, help="X for the dynamic rank modes.")
@click.option("--alpha", type=float, help="Alpha written for every module (default: its rank, scale 1).")
@click.option("--clamp-quantile", type=float, help="Clamp factors at this quantile (kohya's 0.99); off by default.")
@click.option("--components", default="unet,te", show_default=True, help="Comma list of unet, dit, te, te1, te2, te3.")
@click.option("--all-modules", is_flag=True, help="Every weight, not only what trainers target; full deltas (diff, diff_b, diff_m) where a LoRA cannot carry one.")
@click.option("--min-diff", type=float, default=0.0, show_default=True, help="Skip modules whose max |ΔW| is at most this.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--quiet", is_flag=True, help="Print only errors.")
def extract(base, tuned, output, rank, conv_rank, rank_mode, rank_param, alpha, clamp_quantile, components,
            all_modules, min_diff, device, dtype, as_json, force, quiet):
    """Extract a LoRA from TUNED − BASE by (randomized) SVD, reporting its error."""
    from lorabake import extract as extracting
    from lorabake import progress, render
    _imports_done()

    opts = extracting.ExtractOptions(
        base=base,
        tuned=tuned,
        output=output,
        rank=rank,
        conv_rank=conv_rank,
        rank_mode=rank_mode,
        rank_param=rank_param,
        alpha=alpha,
        clamp_quantile=clamp_quantile,
        components=tuple(c.strip() for c in components.split(",") if c.strip()),
        all_modules=all_modules,
        min_diff=min_diff,
        device=device,
        dtype=dtype,
        force=force,
    )
    show_progress = not (quiet or as_json) and sys.stderr.isatty()
    with progress.progress_bar(enabled=show_progress, label="extracting") as bar:
        result = extracting.extract(opts, progress=bar.advance, on_start=bar.start_total)
    with stdio.report():
        if as_json:
            click.echo(to_json(extracting.extract_json(result)))
        elif not quiet:
            render.print_extract(extracting.extract_json(result))


# -- bake ----------------------------------------------------------------------------------
BAKE_EXAMPLES = """
\b
Examples:
  lorabake bake recipe.toml
  lorabake bake recipe.toml --dry-run
  lorabake bake recipe.toml --shard 0/3          # this process bakes shard 0 of 3
  lorabake bake recipe.toml --shard auto         # i/N from Slurm, a Kubernetes indexed Job or a CI matrix
"""


@cli.command(epilog=BAKE_EXAMPLES + "\n" + EXIT_CODES_HELP)
@click.argument("recipe", type=click.Path())
@click.option("--shard", metavar="i/N|auto", help="Bake only shard i (0-based) of N; auto reads the job engine's environment.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--fan-out", type=click.IntRange(min=1), default=8, show_default=True,
              help="Outputs baked side by side from one read of a base (memory grows with it).")
@click.option("--dry-run", is_flag=True, help="List every job with its plan, from headers only; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the batch report as one JSON document.")
@click.option("--force", is_flag=True, help="Overwrite outputs that exist and were not made by the same entry.")
@click.option("--quiet", is_flag=True, help="Print only errors.")
def bake(recipe, shard, device, fan_out, dry_run, as_json, force, quiet):
    """Bake every job of a TOML recipe; finished outputs are skipped on a rerun."""
    from lorabake import batch, batch_render, shards
    _imports_done()

    opts = batch.BatchOptions(recipe=recipe, shard=shards.parse_shard(shard) if shard else None, force=force,
                              dry_run=dry_run, device=device, fan_out=fan_out)
    quiet_run = quiet or as_json or dry_run
    events = batch_render.RichEvents() if not quiet_run and sys.stderr.isatty() else None
    events = events or (batch_render.PlainEvents() if not quiet_run else batch.BatchEvents())
    try:
        report = batch.run_batch(opts, events=events)
    except (KeyboardInterrupt, interrupts.Interrupted):
        interrupts.ignore()
        click.echo("Interrupted: finished outputs are whole, the one in progress was removed; "
                   "run the same command again to finish.", err=True)
        raise click.exceptions.Exit(130) from None
    finally:
        getattr(events, "stop", lambda: None)()
    with stdio.report():
        if as_json:
            click.echo(to_json(batch_render.batch_json(report)))
        elif not quiet:
            batch_render.print_batch(report)


cli.add_command(cli_loratools.combine)
cli.add_command(cli_loratools.resize)
cli.add_command(cli_loratools.convert)
