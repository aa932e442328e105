"""LoRA files for the video families as each trainer writes them, and diffusers' `fuse_lora` as the reference.

A LoRA is made once in native names (`random_lora`), then written in each flavour (`write`). The reference
for a flavour is what diffusers makes of that very file (its `lora_state_dict`, which converts the flavours
it knows), loaded into the tiny diffusers model and fused at the strength; the fused state dict is mapped to
native names by the rows of tests/videofam.py. Where diffusers cannot read a flavour the test says which
file stands in (the same tensors in a flavour it reads), and full deltas (`diff`, `diff_m`), which
diffusers drops, are checked as W + strength * diff.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from tests.videofam import Variant, build_model, to_native


@dataclass(frozen=True)
class Module:
    """One LoRA module in native names: down (r, in, *k), up (out, r, *1), alpha (None: not written)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]

    def delta(self) -> torch.Tensor:
        out, rank = self.up.shape[:2]
        return self.scale * (self.up.reshape(out, rank) @ self.down.reshape(rank, -1)).reshape(
            out, *self.down.shape[1:]
        )


@dataclass(frozen=True)
class Flavour:
    """How one trainer spells a LoRA module: prefix, separator of the module path, factor names, alpha."""

    prefix: str
    sep: str
    down: str
    up: str
    alpha: bool
    note: str


FLAVOURS: dict[str, Flavour] = {
    # ComfyUI / diffusion-pipe kohya-style factors with alpha
    "comfy": Flavour("diffusion_model.", ".", "lora_down.weight", "lora_up.weight", True, "ComfyUI, lora_down/up + alpha"),
    # diffusion-pipe / ai-toolkit PEFT factors, alpha dropped (scale 1)
    "comfy_ab": Flavour("diffusion_model.", ".", "lora_A.weight", "lora_B.weight", False, "diffusion-pipe lora_A/B"),
    "musubi": Flavour("lora_unet_", "_", "lora_down.weight", "lora_up.weight", True, "musubi-tuner / kohya"),
    # Wan-Fun's trainer writes a double underscore (ComfyUI comfy/lora_convert.py convert_lora_wan_fun)
    "wanfun": Flavour("lora_unet__", "_", "lora_down.weight", "lora_up.weight", True, "VideoX-Fun"),
    # DiffSynth-Studio: bare native path, PEFT adapter name `default` left in the key
    "diffsynth": Flavour("", ".", "lora_A.default.weight", "lora_B.default.weight", False, "DiffSynth-Studio"),
    # diffusion-pipe's HunyuanVideo LoRAs: `transformer.` + Tencent names
    "dpipe": Flavour("transformer.", ".", "lora_A.weight", "lora_B.weight", False, "diffusion-pipe"),
    # the official HunyuanVideo-I2V LoRA prefix (Tencent-Hunyuan/HunyuanVideo-I2V)
    "hyi2v": Flavour("Hunyuan_video_I2V_lora_", "_", "lora_down.weight", "lora_up.weight", True, "HunyuanVideo-I2V"),
}


def linear_modules(native: dict[str, torch.Tensor], *, include: str = r".*", exclude: str = r"^$") -> list[str]:
    """Native module names of every 2-D (and conv) weight matching `include` and not `exclude`."""
    inc, exc = re.compile(include), re.compile(exclude)
    return sorted(
        k[: -len(".weight")]
        for k, v in native.items()
        if k.endswith(".weight") and v.ndim >= 2 and inc.search(k) and not exc.search(k)
    )


def random_lora(
    native: dict[str, torch.Tensor], modules: Iterable[str], *, rank: int = 4, alpha: float | None, seed: int = 0
) -> dict[str, Module]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in modules:
        w = native[name + ".weight"]
        ones = (1,) * (w.ndim - 2)
        down = torch.randn((rank, *w.shape[1:]), generator=gen) / math.sqrt(math.prod(w.shape[1:]))
        up = torch.randn((w.shape[0], rank, *ones), generator=gen) * 0.1
        out[name] = Module(down, up, alpha)
    return out


def write(flavour: str, lora: dict[str, Module], *, strip: str = "") -> dict[str, torch.Tensor]:
    """The tensors of `lora` as `flavour` names them (`strip`: the base's prefix, not part of a LoRA name)."""
    f = FLAVOURS[flavour]
    out = {}
    for name, m in lora.items():
        path = name.removeprefix(strip)
        stem = f.prefix + (path.replace(".", "_") if f.sep == "_" else path)
        out[f"{stem}.{f.down}"] = m.down.contiguous()
        out[f"{stem}.{f.up}"] = m.up.contiguous()
        if f.alpha and m.alpha is not None:
            out[f"{stem}.alpha"] = torch.tensor(float(m.alpha))
    return out


def to_diffusers_lora(variant: Variant, lora: dict[str, Module], state: dict[str, torch.Tensor]) -> dict:
    """The same ΔW in diffusers names (PEFT `transformer.<module>.lora_A/B.weight`, scale folded into A).

    A fused native module becomes one diffusers module per band: A shared, B cut at the bands' row counts
    (read from the diffusers model's shapes); a swapped row swaps B's halves. Used where diffusers cannot
    read a flavour at a tiny width, and for the diffusers flavour itself.
    """
    bands: dict[str, list[tuple[int, str, int, bool]]] = {}
    for key, tensor in state.items():
        if not key.endswith(".weight"):
            continue
        for row in variant.rows:
            m = re.match(row.pattern, key)
            if m:
                native = (m.expand(row.native) + key[m.end():]).removesuffix(".weight")
                bands.setdefault(variant.prefix + native, []).append(
                    (row.band or 0, key.removesuffix(".weight"), tensor.shape[0], row.swap)
                )
                break
    out = {}
    for name, module in lora.items():
        start = 0
        for _, diffusers, rows, swap in sorted(bands[name]):
            up = module.up[start : start + rows]
            if swap:
                up = torch.cat(up.chunk(2)[::-1])
            start += rows
            out[f"transformer.{diffusers}.lora_A.weight"] = (module.down * module.scale).contiguous()
            out[f"transformer.{diffusers}.lora_B.weight"] = up.contiguous()
    return out


def fused_reference(variant: Variant, diffusers_lora: dict[str, torch.Tensor], strength: float) -> dict:
    """The tiny model (seed 0, as the base) after diffusers loads `diffusers_lora` and fuses it; native names."""
    model = build_model(variant, tiny=True)
    model.load_lora_adapter(dict(diffusers_lora), prefix="transformer", adapter_name="ref")
    model.fuse_lora(lora_scale=strength)
    model.unload_lora()
    return to_native(variant, {k: v.detach() for k, v in model.state_dict().items()})


def assert_close(ours: dict, reference: dict, base: dict, *, rtol: float = 1e-3) -> set[str]:
    """Every tensor of `reference` within rtol of ours, relative to the largest change; returns the keys changed."""
    assert sorted(ours) == sorted(reference), sorted(set(ours) ^ set(reference))[:10]
    changed = set()
    for key, want in reference.items():
        got = ours[key].float()
        want = want.float()
        delta = (want - base[key].float()).abs().max().item()
        err = (got - want).abs().max().item()
        assert err <= rtol * max(delta, want.abs().max().item() * 1e-3), (key, err, delta)
        if delta > 0:
            changed.add(key)
    return changed
