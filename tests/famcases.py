"""The family × LoRA-flavour cases of the oracle, each built once per test session.

A case: a tiny diffusers model of the family (seeded), its native layout, a LoRA on every linear module in
the naming the flavour's trainers use (diffusers names, or native names with fused q|k|v), the file in that
flavour, its per-projection PEFT equivalent, and the reference: diffusers' loader + `fuse_lora` of the PEFT
equivalent. Cases diffusers cannot read itself say why in `why`.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from functools import cache

import torch

from tests.famfix import FAMILIES, Fam, Tensors, row_sources
from tests.famlora import (
    Lora,
    diffusers_fused,
    linear_shapes,
    make_lora,
    to_diffusers_lora,
    weight_shapes,
    write_lora,
)


@dataclass(frozen=True)
class Case:
    family: str
    flavour: str
    naming: str  # "diffusers" | "native": which module names the LoRA uses
    diffusers_reads: bool = True  # diffusers' own loader reads this file (checked); else why not:
    why: str = ""
    strength: float = 0.7
    keep: str = ""  # regex: only modules it matches get a LoRA (what a reader limits itself to)
    # regex of diffusers keys diffusers' own reader of this flavour gets wrong (left out of that check only)
    diffusers_wrong: str = ""

    @property
    def id(self) -> str:
        return f"{self.family}-{self.flavour}-{self.naming}"


_NO_KOHYA_WIDTHS = "diffusers' kohya Flux converter splits at the hard-coded FLUX.1 widths (3072, 12288)"
_LUMINA_WIDTHS = "diffusers' Lumina 2 LoRA converter splits qkv at the hard-coded (2304, 768, 768)"

CASES: tuple[Case, ...] = (
    Case("qwen-image", "peft", "diffusers"),
    Case("qwen-image", "aitk", "diffusers"),
    Case("qwen-image", "kohya", "diffusers"),
    Case("qwen-image", "diffsynth", "diffusers"),
    Case("qwen-image", "diffsynth0", "diffusers", False, "diffusers strips only `default.` (DiffSynth-Studio #886)"),
    Case("qwen-image", "lycoris", "diffusers", False, "diffusers has no `lycoris_` reader for Qwen-Image"),
    Case("qwen-image-2.1", "peft", "diffusers"),
    Case("qwen-image-2.1", "aitk", "diffusers"),
    Case("flux2", "peft", "diffusers"),
    # diffusers rewrites base_model.model. to diffusion_model. and then reads only the block modules
    Case("flux2", "peft_base", "diffusers", keep=r"^(single_)?transformer_blocks\."),
    # diffusers' Flux.2 LoRA converters map final_layer.adaLN_modulation.1 without swapping its shift/scale
    # halves (its single-file converter swaps them); the kohya one drops (with a warning) guidance_in, the
    # shared modulations and the final adaLN
    Case("flux2", "aitk", "native", diffusers_wrong=r"^norm_out\.linear\."),
    Case("flux2", "kohya", "native", diffusers_wrong=r"^(norm_out\.linear|time_guidance_embed\.guidance_embedder|\w+_modulation\w*\.linear)\."),
    Case("flux2", "lycoris", "native", False, "diffusers has no `lycoris_` reader for FLUX.2"),
    Case("z-image", "peft", "diffusers"),
    Case("z-image", "aitk", "diffusers"),
    Case("z-image", "kohya", "diffusers"),
    Case("z-image", "aitk", "native", False, "diffusers' Z-Image converter expects diffusers module names"),
    Case("lumina2", "peft", "diffusers"),
    Case("lumina2", "aitk", "native", False, _LUMINA_WIDTHS),
    Case("lumina2", "kohya", "native", False, "diffusers has no `lora_unet_` reader for Lumina 2"),
    Case("chroma", "peft", "diffusers"),
    Case("chroma", "kohya", "native", False, _NO_KOHYA_WIDTHS),
    Case("chroma", "aitk", "native", False, "diffusers reads no `diffusion_model.` BFL-named Chroma LoRA"),
    Case("hidream", "peft", "diffusers"),
    Case("hidream", "aitk", "diffusers"),
    Case("hidream", "lycoris", "diffusers", False, "diffusers has no `lycoris_` reader for HiDream"),
    Case("hidream", "kohya", "diffusers", False, "diffusers has no `lora_unet_` reader for HiDream"),
    Case("krea2", "peft", "diffusers"),
    Case("krea2", "aitk", "native"),
    Case("krea2", "peft_base", "native"),  # ai-toolkit's Krea 2 files: base_model.model. + original names
)

_ALPHA_FLAVOURS = {"kohya", "lycoris"}


@dataclass(frozen=True)
class Built:
    case: Case
    fam: Fam
    sd: Tensors  # the tiny model's state dict (fp32, rounded through bf16 so a bf16 file holds it exactly)
    native: Tensors  # the same in native names
    lora: Lora  # as written (in the case's naming)
    peft_lora: Lora  # per-projection, diffusers names
    lora_path: str
    peft_path: str
    reference: Tensors  # diffusers' fused state dict (diffusers names)

    @property
    def native_reference(self) -> Tensors:
        return self.fam.to_native(self.reference)


_DIR = tempfile.mkdtemp(prefix="lorabake-famcases-")
atexit.register(shutil.rmtree, _DIR, True)


@cache
def tiny_state(family: str) -> Tensors:
    """The tiny model's weights, rounded to bf16 values (kept in fp32)."""
    fam = FAMILIES[family]
    return {k: v.detach().to(torch.bfloat16).float() for k, v in fam.model().state_dict().items()}


def _targets(fam: Fam, sd: Tensors, case: Case) -> dict[str, tuple[int, int]]:
    keep = re.compile(case.keep).search if case.keep else (lambda name: True)
    if case.naming == "diffusers":
        return linear_shapes(fam.model(), keep)
    return weight_shapes(fam.to_native(sd), keep)


@cache
def _build(case: Case) -> Built:
    fam = FAMILIES[case.family]
    sd = tiny_state(case.family)
    native = fam.to_native(sd)
    alpha = 2.0 if case.flavour in _ALPHA_FLAVOURS else None
    lora = make_lora(_targets(fam, sd, case), rank=4, alpha=alpha, seed=zlib.crc32(case.id.encode()))
    peft_lora = lora if case.naming == "diffusers" else to_diffusers_lora(lora, row_sources(fam, sd))
    lora_path = os.path.join(_DIR, f"{case.id}.safetensors")
    peft_path = os.path.join(_DIR, f"{case.id}.peft.safetensors")
    write_lora(lora_path, lora, case.flavour)
    write_lora(peft_path, peft_lora, "peft")
    reference = diffusers_fused(fam, sd, peft_path, case.strength)
    return Built(case, fam, sd, native, lora, peft_lora, lora_path, peft_path, reference)


def build_case(case: Case, tmp_path=None) -> Built:
    return _build(case)
