"""The SD UNet rows shared by the SD 1.x, 2.x and XL families (not a family itself: no FAMILY).

A UNet checkpoint names its blocks LDM-style (`input_blocks.4.1`), diffusers and kohya's SD1/SD2
LoRAs name them diffusers-style (`down_blocks.1.attentions.0`). The block table between the two is
written out once per family from its declared structure (`UnetBlocks`) by `block_table`; each row
carries the rule it came from, so `inspect --keys` can say why a name landed where it did.
"""

from __future__ import annotations

from typing import NamedTuple

from lorabake.arch.common import Block, BlockGroup, Renames, Variant


class UnetBlocks(NamedTuple):
    """A UNet's block structure: levels, input blocks per level (layers + 1), which levels have attention."""

    levels: int
    per: int
    down_attn: tuple[bool, ...]
    up_attn: tuple[bool, ...]


class UnetShape(NamedTuple):
    """The sizes of an SD UNet, as its diffusers config gives them: enough to list every weight."""

    channels: tuple[int, ...]  # block_out_channels, one per level
    depth: tuple[int, ...]  # transformer layers per attention block, per level (middle: the last level's)
    context: int  # cross_attention_dim (the text encoder's width)
    linear_proj: bool  # proj_in/proj_out as Linear (SD2, SDXL) rather than 1x1 conv (SD1)
    label_in: int | None = None  # SDXL's size/crop conditioning input width (label_emb)
    in_channels: int = 4


# LDM ResBlock sub-module -> diffusers ResnetBlock2D sub-module.
RESNET_RENAMES: dict[str, str] = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_BACK = {d: ldm for ldm, d in RESNET_RENAMES.items()}

# Single modules outside the block grid.
UNET_LEAVES: dict[str, str] = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "label_emb.0.0": "add_embedding.linear_1",  # SDXL's size/crop conditioning
    "label_emb.0.2": "add_embedding.linear_2",
}

# Old diffusers attention-processor LoRAs (`…attn1.processor.to_q_lora.up.weight`): last module parts.
ATTN_PROCESSOR: dict[str, str] = {
    "to_q": "processor.to_q",
    "to_k": "processor.to_k",
    "to_v": "processor.to_v",
    "to_out.0": "processor.to_out",
}


def block_table(blocks: UnetBlocks) -> dict[str, Block]:
    """LDM block prefix -> diffusers Block, every row spelled out with the rule that made it.

    Input block n = 1 + per·level + layer holds resnet `layer` (sub-module .0) and, at levels with
    attention, transformer `layer` (.1); the last input block of each level but the last is the
    downsampler. Output blocks run per·level + layer with one more layer, the upsampler after the
    attention (or the resnet) of the level's last block.
    """
    levels, per, down_attn, up_attn = blocks
    layers = per - 1
    table = {ldm: Block(d, rule="single module") for ldm, d in UNET_LEAVES.items()}
    for i in range(levels):
        for j in range(layers):
            n = 1 + per * i + j
            rule = f"input block {n} = 1 + {per}·level {i} + layer {j}"
            table[f"input_blocks.{n}.0"] = Block(f"down_blocks.{i}.resnets.{j}", RESNET_RENAMES, rule)
            if down_attn[i]:
                table[f"input_blocks.{n}.1"] = Block(f"down_blocks.{i}.attentions.{j}", rule=rule)
        if i < levels - 1:
            n = per * (i + 1)
            table[f"input_blocks.{n}.0.op"] = Block(
                f"down_blocks.{i}.downsamplers.0.conv", rule=f"input block {n}: downsampler of level {i}"
            )
    table["middle_block.0"] = Block("mid_block.resnets.0", RESNET_RENAMES, "middle block: resnet 0")
    table["middle_block.1"] = Block("mid_block.attentions.0", rule="middle block: attention")
    table["middle_block.2"] = Block("mid_block.resnets.1", RESNET_RENAMES, "middle block: resnet 1")
    for i in range(levels):
        for j in range(per):
            n = per * i + j
            rule = f"output block {n} = {per}·level {i} + layer {j}"
            table[f"output_blocks.{n}.0"] = Block(f"up_blocks.{i}.resnets.{j}", RESNET_RENAMES, rule)
            if up_attn[i]:
                table[f"output_blocks.{n}.1"] = Block(f"up_blocks.{i}.attentions.{j}", rule=rule)
        if i < levels - 1:
            n, sub = per * i + layers, 2 if up_attn[i] else 1
            table[f"output_blocks.{n}.{sub}.conv"] = Block(
                f"up_blocks.{i}.upsamplers.0.conv", rule=f"output block {n}.{sub}: upsampler of level {i}"
            )
    return table


def unet_renames(blocks: UnetBlocks) -> tuple[Renames, ...]:
    """The rename tables of an SD UNet: LDM <-> diffusers by block, then the old attn-processor spelling."""
    table = block_table(blocks)
    back = {b.name: Block(ldm, _RESNET_BACK if b.inner else None, b.rule) for ldm, b in table.items()}
    return (
        Renames(
            "ldm",
            "diffusers",
            blocks=table,
            note="LDM/SGM checkpoint blocks -> diffusers UNet2DConditionModel",
        ),
        Renames(
            "diffusers",
            "ldm",
            blocks=back,
            note="diffusers UNet2DConditionModel -> LDM/SGM checkpoint blocks",
        ),
        Renames(
            "diffusers", "attnproc", tails=ATTN_PROCESSOR, note="old diffusers attention-processor LoRAs"
        ),
    )


def structure(blocks: UnetBlocks, shape: UnetShape) -> str:
    """Every weight of the UNet under LDM names, one `<key> <shape>` row each (a family's `structure`).

    The skip widths follow the LDM UNet: each output resnet reads its level's channels plus the
    channels of the input block it mirrors (popped from the end of the input stack).
    """
    c0, emb = shape.channels[0], 4 * shape.channels[0]
    rows = [f"time_embed.0.weight {emb}x{c0}", f"time_embed.2.weight {emb}x{emb}"]
    if shape.label_in:
        rows += [f"label_emb.0.0.weight {emb}x{shape.label_in}", f"label_emb.0.2.weight {emb}x{emb}"]
    rows.append(f"input_blocks.0.0.weight {c0}x{shape.in_channels}x3x3")
    stack, ch = [c0], c0
    for i, out in enumerate(shape.channels):
        for j in range(blocks.per - 1):
            n = 1 + blocks.per * i + j
            rows += _resnet(f"input_blocks.{n}.0", ch, out, emb)
            ch = out
            if blocks.down_attn[i]:
                rows += _attention(f"input_blocks.{n}.1", ch, shape.depth[i], shape)
            stack.append(ch)
        if i < blocks.levels - 1:
            rows.append(f"input_blocks.{blocks.per * (i + 1)}.0.op.weight {ch}x{ch}x3x3")
            stack.append(ch)
    rows += _resnet("middle_block.0", ch, ch, emb)
    rows += _attention("middle_block.1", ch, shape.depth[-1], shape)
    rows += _resnet("middle_block.2", ch, ch, emb)
    for i, out in enumerate(reversed(shape.channels)):
        level = blocks.levels - 1 - i
        for j in range(blocks.per):
            n = blocks.per * i + j
            rows += _resnet(f"output_blocks.{n}.0", ch + stack.pop(), out, emb)
            ch = out
            if blocks.up_attn[i]:
                rows += _attention(f"output_blocks.{n}.1", ch, shape.depth[level], shape)
        if i < blocks.levels - 1:
            n = blocks.per * i + blocks.per - 1
            rows.append(f"output_blocks.{n}.{2 if blocks.up_attn[i] else 1}.conv.weight {ch}x{ch}x3x3")
    rows += [f"out.0.weight {c0}", f"out.2.weight {shape.in_channels}x{c0}x3x3"]
    return "\n".join(rows)


def _resnet(at: str, ch_in: int, ch: int, emb: int) -> list[str]:
    rows = [
        f"{at}.in_layers.0.weight {ch_in}",
        f"{at}.in_layers.2.weight {ch}x{ch_in}x3x3",
        f"{at}.emb_layers.1.weight {ch}x{emb}",
        f"{at}.out_layers.0.weight {ch}",
        f"{at}.out_layers.3.weight {ch}x{ch}x3x3",
    ]
    return rows + ([f"{at}.skip_connection.weight {ch}x{ch_in}x1x1"] if ch_in != ch else [])


def _attention(at: str, ch: int, depth: int, shape: UnetShape) -> list[str]:
    proj = f"{ch}x{ch}" if shape.linear_proj else f"{ch}x{ch}x1x1"
    rows = [f"{at}.norm.weight {ch}", f"{at}.proj_in.weight {proj}", f"{at}.proj_out.weight {proj}"]
    for d in range(depth):
        t = f"{at}.transformer_blocks.{d}"
        for attn, kv in (("attn1", ch), ("attn2", shape.context)):
            rows += [f"{t}.{attn}.to_q.weight {ch}x{ch}", f"{t}.{attn}.to_k.weight {ch}x{kv}"]
            rows += [f"{t}.{attn}.to_v.weight {ch}x{kv}", f"{t}.{attn}.to_out.0.weight {ch}x{ch}"]
        rows += [f"{t}.ff.net.0.proj.weight {8 * ch}x{ch}", f"{t}.ff.net.2.weight {ch}x{4 * ch}"]
        rows += [f"{t}.norm{k}.weight {ch}" for k in (1, 2, 3)]
    return rows


def unet_block_groups(blocks: UnetBlocks) -> tuple[BlockGroup, ...]:
    """IN00…, M00, OUT00… as per-block weight tools number an SD UNet's LDM blocks."""
    count = 1 + blocks.per * (blocks.levels - 1) + blocks.per - 1
    return (
        *(BlockGroup(f"IN{n:02d}", f"input_blocks.{n}.") for n in range(count)),
        BlockGroup("M00", "middle_block."),
        *(BlockGroup(f"OUT{n:02d}", f"output_blocks.{n}.") for n in range(blocks.per * blocks.levels)),
    )


# kohya LoRANetwork targets Transformer2DModel linears and 1x1 convs; with conv_dim also the ResnetBlock2D,
# Downsample2D and Upsample2D children (LDM and diffusers spellings; `conv.weight` = the samplers' conv).
_ATTN = tuple(f"{a}.{p}.weight" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0"))
EXTRACT_TARGETS = _ATTN + ("ff.net.0.proj.weight", "ff.net.2.weight", "proj_in.weight", "proj_out.weight")
EXTRACT_CONV_TARGETS = (
    "in_layers.2.weight",
    "out_layers.3.weight",
    "emb_layers.1.weight",
    "skip_connection.weight",
    "op.weight",
    "conv.weight",
    "conv1.weight",
    "conv2.weight",
    "time_emb_proj.weight",
    "conv_shortcut.weight",
)

# Notes detection adds for any SD UNet.
VARIANTS = (
    Variant(
        "input_blocks.0.0.weight",
        present="UNet takes {size} input channels (inpainting/instruct model?)",
        naming="ldm",
        dim=1,
        size=4,
    ),
    Variant(
        "conv_in.weight",
        present="UNet takes {size} input channels (inpainting/instruct model?)",
        naming="diffusers",
        dim=1,
        size=4,
    ),
)
