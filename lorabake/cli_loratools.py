"""The LoRA-to-LoRA commands (combine, resize): options and output, the work is in loratools."""

from __future__ import annotations

import click

from lorabake import stdio
from lorabake.errors import EXIT_CODES_HELP
from lorabake.lora_args import parse_lora_arg
from lorabake.text import sanitize, to_json

# -- combine / resize ----------------------------------------------------------------------
LORATOOL_EXAMPLES = """
\b
Examples:
  lorabake combine style.safetensors:0.6 detail.safetensors:1.0 -o style_detail.safetensors
  lorabake combine a.safetensors b.safetensors:-0.5 -o ab_r32.safetensors --rank 32
  lorabake resize big_r128.safetensors -o small.safetensors --rank 16
  lorabake resize big.safetensors -o dyn.safetensors --rank 64 --rank-mode energy --rank-param 0.95
  lorabake combine dora.safetensors style.safetensors -o both.safetensors --base sdxl_base.safetensors --rank 64
"""


def _run_loratool(command, specs, output, rank, rank_mode, rank_param, dtype, base, as_json, force, quiet):
    from lorabake import loratools

    opts = loratools.ToolOptions(inputs=tuple(specs), output=output, rank=rank, rank_mode=rank_mode,
                                 rank_param=rank_param, dtype=dtype, force=force, command=command, base=base)
    result = loratools.run(opts)
    with stdio.report():
        if as_json:
            click.echo(to_json(loratools.result_json(result)))
        elif not quiet:
            for line in loratools.summary_lines(result):
                click.echo(sanitize(line))


def _loratool_options(fn):
    for decorator in reversed((
        click.option("-o", "--output", type=click.Path(), required=True, help="Output LoRA .safetensors file."),
        click.option("--rank-mode", type=click.Choice(["fixed", "energy", "ratio", "cumulative"]), default="fixed",
                     show_default=True, help="As in extract: how the rank of each module is chosen."),
        click.option("--rank-param", type=float, help="X for the dynamic rank modes."),
        click.option("--dtype", type=click.Choice(["keep", "fp16", "bf16", "fp32"]), default="keep", show_default=True,
                     help="Dtype of the written factors (keep: each module's input dtype)."),
        click.option("--base", type=click.Path(), help="The checkpoint DoRA and weight-dependent (OFT, BOFT, IA3, "
                     "GLoRA) modules were trained for: their exact change is computed from it and factored."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document."),
        click.option("--force", is_flag=True, help="Overwrite an existing output file."),
        click.option("--quiet", is_flag=True, help="Print only errors."),
    )):
        fn = decorator(fn)
    return fn


@click.command(epilog=LORATOOL_EXAMPLES + "\n" + EXIT_CODES_HELP)
@click.argument("loras", nargs=-1, required=True, metavar="PATH[:STRENGTH[:TE_STRENGTH]]...")
@click.option("--rank", type=int, help="Reduce every module to this rank (optimal); default: exact stacking.")
@_loratool_options
def combine(loras, output, rank, rank_mode, rank_param, dtype, base, as_json, force, quiet):
    """One LoRA whose effect equals baking all the given LoRAs at their strengths."""
    specs = [parse_lora_arg(text) for text in loras]
    _run_loratool("combine", specs, output, rank, rank_mode, rank_param, dtype, base, as_json, force, quiet)


@click.command(epilog=LORATOOL_EXAMPLES + "\n" + EXIT_CODES_HELP)
@click.argument("lora", type=click.Path())
@click.option("--rank", type=int, required=True, help="The new rank (the cap for a dynamic --rank-mode).")
@_loratool_options
def resize(lora, output, rank, rank_mode, rank_param, dtype, base, as_json, force, quiet):
    """Shrink a LoRA's rank optimally (truncated SVD of each module's exact product), reporting the error."""
    from lorabake.plan import LoraSpec

    _run_loratool("resize", [LoraSpec(lora)], output, rank, rank_mode, rank_param, dtype, base, as_json, force, quiet)


# -- convert -----------------------------------------------------------------------------------
CONVERT_EXAMPLES = """
\b
Examples:
  lorabake convert kohya_flux.safetensors --to diffusers -o flux_diffusers.safetensors
  lorabake convert diffusers_lora.safetensors --to comfyui -o comfy.safetensors
  lorabake convert lora.safetensors --to comfyui --like my_checkpoint.safetensors -o comfy.safetensors
  lorabake convert sdxl_lora.safetensors:0.8@OUTD --to kohya -o sdxl_outd.safetensors
  lorabake convert flux_lora.safetensors@double:0-7=0,single:*=0.5 --to comfyui -o flux_late.safetensors --dtype bf16
"""


@click.command(epilog=CONVERT_EXAMPLES + "\n" + EXIT_CODES_HELP)
@click.argument("lora", metavar="PATH[:STRENGTH[:TE_STRENGTH]][@BLOCKS]")
@click.option("--to", "to", type=click.Choice(["kohya", "comfyui", "diffusers", "peft", "aitoolkit"]), required=True,
              help="The flavour of names (and alpha) to write.")
@click.option("--like", type=click.Path(), help="A checkpoint whose own module names the output uses (header read only).")
@click.option("-o", "--output", type=click.Path(), required=True, help="Output LoRA .safetensors file.")
@click.option("--dtype", type=click.Choice(["keep", "fp16", "bf16", "fp32"]), default="keep", show_default=True,
              help="Dtype of the written factors (keep: the input's; alpha tensors keep theirs).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--quiet", is_flag=True, help="Print only errors.")
def convert(lora, to, like, output, dtype, as_json, force, quiet):
    """The same LoRA under another trainer's names: renamed, split or fused exactly, alpha carried or folded.

    A strength or a per-block spec (as in merge's --lora) is folded into the factors; blocks at 0 are left out."""
    from lorabake import convert as conv

    spec = parse_lora_arg(lora)
    result = conv.run(conv.ConvertOptions(lora=spec.path, output=output, to=to, like=like, force=force,
                                          strength=spec.strength, te_strength=spec.te_strength, blocks=spec.blocks,
                                          dtype=dtype))
    with stdio.report():
        if as_json:
            click.echo(to_json(conv.result_json(result)))
        elif not quiet:
            for line in conv.summary_lines(result):
                click.echo(sanitize(line))
