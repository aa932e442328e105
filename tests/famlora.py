"""LoRA files for the 2025-2026 image families, in each trainer's flavour, and diffusers' fused oracle.

A LoRA here is {module: (down [r, in], up [out, r], alpha or None)} on named modules of either naming:
diffusers module paths (`transformer_blocks.0.attn.to_q`) or native ones (`double_blocks.0.img_attn.qkv`,
a fused module). `write_lora` spells it as a flavour writes it:

  peft        transformer.<m>.lora_A/B.weight                (diffusers/PEFT; no alpha)
  peft_base   base_model.model.<m>.lora_A/B.weight           (PEFT get_peft_model_state_dict; no alpha)
  aitk        diffusion_model.<m>.lora_A/B.weight            (ai-toolkit, ComfyUI; no alpha)
  kohya       lora_unet_<m with _>.lora_down/up.weight+alpha (kohya sd-scripts, musubi-tuner)
  lycoris     lycoris_<m with _>.lora_down/up.weight+alpha   (SimpleTuner LyCORIS)
  diffsynth   <m>.lora_A.default.weight                      (DiffSynth-Studio)
  diffsynth0  <m>.lora_A.default_0.default.weight            (DiffSynth-Studio, DiffSynth-Studio #886)

`diffusers_fused` is the oracle: the family's diffusers LoRA loader mixin reads the file
(`lora_state_dict`, with its own converters), PEFT injects it into the tiny model
(`load_lora_into_transformer`) and `fuse_lora` bakes it.
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from tests.famfix import Fam, Tensors

MIXINS = {
    "flux2": "Flux2LoraLoaderMixin",
    "qwen-image": "QwenImageLoraLoaderMixin",
    "qwen-image-2.1": "QwenImageLoraLoaderMixin",
    "z-image": "ZImageLoraLoaderMixin",
    "lumina2": "Lumina2LoraLoaderMixin",
    "chroma": "FluxLoraLoaderMixin",  # ChromaPipeline's loader
    "hidream": "HiDreamImageLoraLoaderMixin",
    "krea2": "Krea2LoraLoaderMixin",
}

# flavour -> (key prefix, joins module path with "_", down suffix, up suffix, writes alpha)
FLAVOURS: dict[str, tuple[str, bool, str, str, bool]] = {
    "peft": ("transformer.", False, ".lora_A.weight", ".lora_B.weight", False),
    "peft_base": ("base_model.model.", False, ".lora_A.weight", ".lora_B.weight", False),
    "aitk": ("diffusion_model.", False, ".lora_A.weight", ".lora_B.weight", False),
    "kohya": ("lora_unet_", True, ".lora_down.weight", ".lora_up.weight", True),
    "lycoris": ("lycoris_", True, ".lora_down.weight", ".lora_up.weight", True),
    "diffsynth": ("", False, ".lora_A.default.weight", ".lora_B.default.weight", False),
    "diffsynth0": ("", False, ".lora_A.default_0.default.weight", ".lora_B.default_0.default.weight", False),
}

Lora = dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]


def linear_shapes(model, keep=lambda name: True) -> dict[str, tuple[int, int]]:
    """diffusers module path -> (out, in) of every nn.Linear `keep` accepts."""
    return {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and keep(name)
    }


def weight_shapes(native: Tensors, keep=lambda name: True) -> dict[str, tuple[int, int]]:
    """native module path -> (out, in) of every 2-D `.weight` tensor `keep` accepts."""
    return {
        k[: -len(".weight")]: tuple(v.shape)
        for k, v in native.items()
        if k.endswith(".weight") and v.dim() == 2 and keep(k[: -len(".weight")])
    }


def make_lora(shapes: dict[str, tuple[int, int]], *, rank: int = 4, alpha: float | None = None, seed: int = 0) -> Lora:
    gen = torch.Generator().manual_seed(seed)
    out: Lora = {}
    for name, (rows, cols) in shapes.items():
        down = torch.randn(rank, cols, generator=gen) * 0.1
        up = torch.randn(rows, rank, generator=gen) * 0.1
        out[name] = (down, up, alpha)
    return out


def delta(down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> torch.Tensor:
    scale = 1.0 if alpha is None else alpha / down.shape[0]
    return (up.double() @ down.double() * scale).float()


def lora_tensors(lora: Lora, flavour: str) -> Tensors:
    """The adapter tensors of `lora` as `flavour` names them. A flavour without alpha gets the scale
    folded into `up`, so every flavour of one LoRA means the same ΔW."""
    prefix, joined, down_sfx, up_sfx, with_alpha = FLAVOURS[flavour]
    out: Tensors = {}
    for name, (down, up, alpha) in lora.items():
        stem = prefix + (name.replace(".", "_") if joined else name)
        if alpha is not None and not with_alpha:
            up = up * (alpha / down.shape[0])
        out[stem + down_sfx] = down.clone()  # a fused LoRA's pieces share one down: own storage each
        out[stem + up_sfx] = up.clone()
        if with_alpha:
            out[stem + ".alpha"] = torch.tensor(float(down.shape[0] if alpha is None else alpha))
    return out


def write_lora(path, lora: Lora, flavour: str, metadata: dict[str, str] | None = None) -> Tensors:
    tensors = lora_tensors(lora, flavour)
    save_file(tensors, str(path), metadata=metadata)
    return tensors


def diffusers_fused(fam: Fam, sd: Tensors, lora_path, strength: float) -> Tensors:
    """The tiny model with `sd`, after diffusers loads `lora_path` through its own converters and fuses it."""
    from diffusers.loaders import lora_pipeline

    mixin = getattr(lora_pipeline, MIXINS[fam.name])
    model = fam.model()
    model.load_state_dict(sd)
    state = mixin.lora_state_dict(str(lora_path))
    if fam.name == "chroma":  # Flux's loader takes the network alphas (None: folded in by its converters)
        state, alphas = state if isinstance(state, tuple) else (state, None)
        mixin.load_lora_into_transformer(state, network_alphas=alphas, transformer=model)
    else:
        mixin.load_lora_into_transformer(state, transformer=model)
    injected = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    model.fuse_lora(lora_scale=strength)
    model.unload_lora()
    fused = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert injected, f"diffusers injected no LoRA layer from {lora_path}"
    return fused


def expected_fused(sd: Tensors, lora: Lora, strength: float) -> Tensors:
    """`sd` with ΔW of every module of a diffusers-named `lora` added (our own arithmetic, fp64)."""
    out = dict(sd)
    for name, (down, up, alpha) in lora.items():
        key = name + ".weight"
        out[key] = (sd[key].double() + strength * delta(down, up, alpha).double()).to(sd[key].dtype)
    return out


def to_diffusers_lora(lora: Lora, sources: dict[str, list[tuple[str, int, int, int]]]) -> Lora:
    """A native-named LoRA as per-projection diffusers LoRAs with the same ΔW: each diffusers module a
    native module feeds gets the same down and its band of up rows (exact; `sources` from
    `famfix.row_sources`). Alpha is kept."""
    out: Lora = {}
    for name, (down, up, alpha) in lora.items():
        for dkey, start, n, first in sources[name + ".weight"]:
            dname = dkey[: -len(".weight")]
            if dname not in out:
                rows = sum(p[2] for p in sources[name + ".weight"] if p[0] == dkey)
                out[dname] = (down, torch.zeros(rows, up.shape[1]), alpha)
            out[dname][1][first : first + n] = up[start : start + n]
    return out
