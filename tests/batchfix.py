"""A small batch world: SD1-shaped bases (one real transformer block, two text-encoder
projections), kohya LoRAs (LoRA and 1x1 LoCon), and a 2 bases × 3 sets × 2 strengths recipe.

    world = make_world(tmp_path)            # bases/, loras/, recipe.toml (12 jobs)
The bases differ (seed); the LoRA sets are (style), (detail), (style + detail at 0.5/0.25).
"""

from __future__ import annotations

import os

import torch

from tests.archfix import build_checkpoint, select
from tests.lorafix import make_lora, save_lora

SD1_BLOCKS = [
    r"model\.diffusion_model\.input_blocks\.1\.1\.",
    r"cond_stage_model\.transformer\.text_model\.encoder\.layers\.0\.self_attn\.[qk]_proj",
    r"first_stage_model\.decoder\.conv_in",
    r"cond_stage_model\.transformer\.text_model\.embeddings\.position_ids",
]
STYLE = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320, 320),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
]
DETAIL = [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320, 1),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj", 2560, 320),
    ("lora_unet_down_blocks_0_attentions_0_proj_out", 320, 320, 1),
]

RECIPE = """
[[matrix]]
bases = { a = "bases/a.safetensors", b = "bases/b.safetensors" }
loras = { style = ["loras/style.safetensors"], detail = ["loras/detail.safetensors:1.0:0.5"], both = ["loras/style.safetensors:0.5:0.25", "loras/detail.safetensors"] }
strengths = [0.5, 1.0]
output = "out/{base}-{loras}-{strength}.safetensors"
"""


# What the tests bake (kept small: the suite runs on a shared 2-core machine): 2 × 3 × 1.
TEST_RECIPE = RECIPE.replace("strengths = [0.5, 1.0]", "strengths = [0.5]")


def make_world(root, *, blocks=SD1_BLOCKS, recipe: str = TEST_RECIPE) -> dict:
    root = str(root)
    os.makedirs(os.path.join(root, "bases"), exist_ok=True)
    os.makedirs(os.path.join(root, "loras"), exist_ok=True)
    names = select("sd1", blocks)
    for seed, base in enumerate(("a", "b")):
        build_checkpoint(os.path.join(root, "bases", f"{base}.safetensors"), "sd1", names, seed=seed,
                         float_dtype=torch.float16)
    save_lora(os.path.join(root, "loras", "style.safetensors"), make_lora(STYLE, rank=4, seed=1),
              {"ss_base_model_version": "sd_v1"})
    save_lora(os.path.join(root, "loras", "detail.safetensors"), make_lora(DETAIL, rank=8, seed=2),
              {"ss_base_model_version": "sd_v1"})
    path = os.path.join(root, "recipe.toml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(recipe)
    return {"root": root, "recipe": path}


def merge_args(job) -> list[str]:
    """The `lorabake merge` command line that a job replaces."""
    args = ["merge", job.base.resolved, "-o", job.output_path, "--dtype", job.dtype, "--rounding", job.rounding]
    for use in job.loras:
        args += ["--lora", f"{use.resolved}:{use.strength!r}" + (f":{use.te_strength!r}" if use.te_strength is not None else "")]
    return args


def files_under(root) -> list[str]:
    out = []
    for folder, _dirs, files in os.walk(root):
        out += [os.path.relpath(os.path.join(folder, f), root) for f in files]
    return sorted(out)
