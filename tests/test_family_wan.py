"""Wan 2.1/2.2: detection from the full-size key lists, and every LoRA flavour baked against diffusers' fuse_lora.

The bases are tiny Wan models (diffusers configs with the real block structure) written in native names by
tests/videofam.py, bare (Wan-AI / Comfy-Org repackaged) and with `model.diffusion_model.` (ComfyUI).
The reference for each LoRA file is what diffusers makes of it (`WanLoraLoaderMixin.lora_state_dict`,
then `load_lora_adapter` + `fuse_lora` on the same tiny model). Stand-ins where diffusers cannot read a
flavour, named in each test: Wan-Fun's `lora_unet__` and musubi files for modules outside the blocks are
read as the same tensors in ComfyUI names (ComfyUI comfy/lora_convert.py only fixes the prefix);
DiffSynth's `.default` as the same tensors without it; full deltas (`diff` on norms, `diff_m`), which
diffusers drops, as W + strength * diff.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorabake.detect import detect_checkpoint
from lorabake.st_header import TensorInfo
from tests.cli_helpers import run_main
from tests.videofam import ARCH_DIR, VARIANTS, build_model, to_native
from tests.videolora import (
    Module,
    assert_close,
    fused_reference,
    linear_modules,
    random_lora,
    to_diffusers_lora,
    write,
)

pytest.importorskip("diffusers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

STRENGTH = 0.7
COMFY = "model.diffusion_model."


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _header(name: str, prefix: str = "") -> dict[str, TensorInfo]:
    with open(os.path.join(ARCH_DIR, f"{name}.json"), encoding="utf-8") as fh:
        tensors = json.load(fh)["tensors"]
    return {prefix + k: TensorInfo(prefix + k, "BF16", tuple(v["shape"]), 0, 0) for k, v in tensors.items()}


# --- detection and inspect: the full-size key lists ------------------------------------------------------

DETECT_ROWS = [
    # (key list, prefix, words the notes must contain)
    ("wan21-t2v-14b", "", ("T2V", "14B")),
    ("wan21-t2v-14b", COMFY, ("T2V", "14B")),
    ("wan21-i2v-14b", "", ("I2V", "14B", "k_img")),
    ("wan22-ti2v-5b", "", ("TI2V", "Wan 2.2", "5B")),
    ("wan21-vace-14b", "", ("VACE", "14B")),
    ("wan22-animate-14b", COMFY, ("Animate", "14B")),
]


@pytest.mark.parametrize(("name", "prefix", "words"), DETECT_ROWS)
def test_full_size_wan_is_detected_with_its_variant(name, prefix, words):
    info = detect_checkpoint(_header(name, prefix))
    assert (info.arch, info.prefix, info.naming) == ("wan", prefix, "wan")
    notes = " ".join(info.notes)
    for word in words:
        assert word in notes, (word, info.notes)


# --- bake against diffusers ---------------------------------------------------------------------------


def _base(tmp_path, variant_name: str, prefix: str):
    variant = VARIANTS[variant_name]
    native = to_native(variant, build_model(variant, tiny=True).state_dict())
    path = tmp_path / f"base{'-comfy' if prefix else ''}.safetensors"
    save_file({prefix + k: v for k, v in native.items()}, str(path))
    return variant, native, path


def _bake(tmp_path, base_path, lora: dict[str, torch.Tensor], prefix: str, *, name: str = "lora") -> dict:
    lora_path = tmp_path / f"{name}.safetensors"
    save_file(lora, str(lora_path))
    out = tmp_path / f"out-{name}{'-comfy' if prefix else ''}.safetensors"
    code, stdout, err = run_main(["merge", str(base_path), "--lora", f"{lora_path}:{STRENGTH}", "-o", str(out), "--json"])
    assert code == 0, err
    summary = json.loads(stdout)["loras"][0]
    assert summary["unmatched"] == {} and summary["not_applied"] == []
    return {k.removeprefix(prefix): v for k, v in load_file(str(out)).items()}


def _wan_lora(native, *, alpha: float | None) -> dict[str, Module]:
    """Every linear diffusers' Wan reader takes: block attention (with image k/v), FFN, embedders, head.

    Modules outside the blocks carry no alpha: diffusers' reader takes alpha only inside blocks.
    """
    mods = linear_modules(native, exclude=r"patch_embedding|img_emb\.proj\.[04]")
    lora = random_lora(native, [m for m in mods if m.startswith("blocks.")], alpha=alpha, seed=1)
    lora.update(random_lora(native, [m for m in mods if not m.startswith("blocks.")], alpha=None, seed=2))
    return lora


def _diffusers_reads(tmp_path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders import WanLoraLoaderMixin

    path = tmp_path / "as-diffusers-reads.safetensors"
    save_file(tensors, str(path))
    return WanLoraLoaderMixin.lora_state_dict(str(path))


# flavour -> (file flavour, alpha, the flavour diffusers reads the same tensors in: stand-in or itself)
FLAVOURS = {
    "comfy": ("comfy", 8.0, "comfy"),  # ComfyUI / diffusion-pipe, lora_down/up + alpha
    "comfy_ab": ("comfy_ab", None, "comfy_ab"),  # diffusion-pipe / ai-toolkit lora_A/B, no alpha
    "musubi": ("musubi", 8.0, "comfy"),  # diffusers reads musubi files only inside blocks: same tensors, comfy names
    "wanfun": ("wanfun", 8.0, "comfy"),  # lora_unet__: diffusers does not read it
    "diffsynth": ("diffsynth", None, "comfy_ab"),  # .default: diffusers does not read it for Wan
}


@pytest.mark.parametrize("prefix", ["", COMFY], ids=["native", "comfyui"])
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_wan_i2v_lora_flavours_match_diffusers_fuse_lora(tmp_path, flavour, prefix):
    variant, native, base_path = _base(tmp_path, "wan21-i2v-14b", prefix)
    file_flavour, alpha, read_as = FLAVOURS[flavour]
    lora = _wan_lora(native, alpha=alpha)
    ours = _bake(tmp_path, base_path, write(file_flavour, lora), prefix)
    reference = fused_reference(variant, _diffusers_reads(tmp_path, write(read_as, lora)), STRENGTH)
    changed = assert_close(ours, reference, native)
    assert changed == {m + ".weight" for m in lora}
    assert len(changed) == 2 * 12 + 8  # 2 blocks x (4 self + 6 cross + 2 ffn) + 8 outside the blocks


def test_musubi_block_lora_reads_the_same_in_diffusers(tmp_path):
    """diffusers' own musubi reader (blocks only) gives the LoRA the ComfyUI-named stand-in gives."""
    _, native, _ = _base(tmp_path, "wan21-i2v-14b", "")
    lora = {k: v for k, v in _wan_lora(native, alpha=8.0).items() if k.startswith("blocks.")}
    musubi = _diffusers_reads(tmp_path, write("musubi", lora))
    comfy = _diffusers_reads(tmp_path, write("comfy", lora))
    assert sorted(musubi) == sorted(comfy)
    for key in musubi:
        assert torch.equal(musubi[key], comfy[key]), key


@pytest.mark.parametrize("prefix", ["", COMFY], ids=["native", "comfyui"])
def test_diffusers_named_wan_lora_on_native_and_comfyui_files(tmp_path, prefix):
    """`transformer.blocks.0.attn1.to_q` (diffusers, PEFT) onto Wan-AI names, patch_embedding LoCon included."""
    variant, native, base_path = _base(tmp_path, "wan21-i2v-14b", prefix)
    lora = _wan_lora(native, alpha=None)
    lora.update(random_lora(native, ["patch_embedding"], alpha=None, seed=3))  # 5-D Conv3d
    state = build_model(variant, tiny=True).state_dict()
    diffusers_lora = to_diffusers_lora(variant, lora, state)
    ours = _bake(tmp_path, base_path, diffusers_lora, prefix)
    reference = fused_reference(variant, diffusers_lora, STRENGTH)
    changed = assert_close(ours, reference, native)
    assert "patch_embedding.weight" in changed and len(changed) == len(lora)


@pytest.mark.parametrize("prefix", ["", COMFY], ids=["native", "comfyui"])
def test_conv3d_patch_embedding_locon_matches_peft_conv3d(tmp_path, prefix):
    """A LoCon on the 5-D patch embedding reshapes like a 3x3 LoCon, one dimension more (PEFT's Conv3d)."""
    variant, native, base_path = _base(tmp_path, "wan21-t2v-14b", prefix)
    lora = random_lora(native, ["patch_embedding"], alpha=2.0, seed=4)
    assert lora["patch_embedding"].down.ndim == 5
    ours = _bake(tmp_path, base_path, write("comfy", lora), prefix)
    state = build_model(variant, tiny=True).state_dict()
    reference = fused_reference(variant, to_diffusers_lora(variant, lora, state), STRENGTH)
    assert assert_close(ours, reference, native) == {"patch_embedding.weight"}


def _lightx2v(native, lora, *, diff_b: bool) -> tuple[dict, dict]:
    """A lightx2v distill file: the LoRA (ComfyUI names, alpha), `diff_b` bias deltas on its block linears,
    `diff` on the block norms and `diff_m` on the blocks' and the head's modulation parameters."""
    tensors = write("comfy", lora)
    gen = torch.Generator().manual_seed(7)
    full: dict[str, torch.Tensor] = {}
    if diff_b:
        for m in lora:
            if m.startswith("blocks."):
                tensors[f"diffusion_model.{m}.diff_b"] = torch.randn(native[m + ".bias"].shape, generator=gen) * 0.1
    for n in range(2):
        full[f"blocks.{n}.modulation"] = torch.randn(native[f"blocks.{n}.modulation"].shape, generator=gen) * 0.1
        tensors[f"diffusion_model.blocks.{n}.diff_m"] = full[f"blocks.{n}.modulation"]
        full[f"blocks.{n}.norm3.weight"] = torch.randn(native[f"blocks.{n}.norm3.weight"].shape, generator=gen) * 0.1
        tensors[f"diffusion_model.blocks.{n}.norm3.diff"] = full[f"blocks.{n}.norm3.weight"]
    full["head.modulation"] = torch.randn(native["head.modulation"].shape, generator=gen) * 0.1
    tensors["diffusion_model.head.diff_m"] = full["head.modulation"]
    return tensors, full


def _lightx2v_case(tmp_path, prefix: str, *, diff_b: bool) -> None:
    variant, native, base_path = _base(tmp_path, "wan21-i2v-14b", prefix)
    lora = _wan_lora(native, alpha=8.0)
    tensors, full = _lightx2v(native, lora, diff_b=diff_b)
    ours = _bake(tmp_path, base_path, tensors, prefix)
    reference = fused_reference(variant, _diffusers_reads(tmp_path, tensors), STRENGTH)
    for key, diff in full.items():  # what diffusers drops
        assert torch.equal(reference[key], native[key])
        reference[key] = native[key] + STRENGTH * diff
    changed = assert_close(ours, reference, native)
    biases = {m + ".bias" for m in lora if m.startswith("blocks.")} if diff_b else set()
    assert changed == {m + ".weight" for m in lora} | biases | set(full)


@pytest.mark.parametrize("prefix", ["", COMFY], ids=["native", "comfyui"])
def test_lightx2v_diff_m_and_norm_diffs(tmp_path, prefix):
    """`diff` on norms and `diff_m` on modulation parameters, which diffusers drops: W + strength * diff."""
    _lightx2v_case(tmp_path, prefix, diff_b=False)


@pytest.mark.parametrize("prefix", ["", COMFY], ids=["native", "comfyui"])
def test_lightx2v_diff_b_beside_the_lora(tmp_path, prefix):
    """`diff_b` next to lora_down/up on one module: diffusers reads it as PEFT's lora_B.bias."""
    _lightx2v_case(tmp_path, prefix, diff_b=True)


def test_diffsynth_vace_lora_lands_on_vace_blocks(tmp_path):
    """DiffSynth `.default` keys (DiffSynth-Studio #958: Wan VACE) on the VACE blocks and the main blocks."""
    variant, native, base_path = _base(tmp_path, "wan21-vace-14b", "")
    mods = linear_modules(native, include=r"^(vace_)?blocks\.", exclude=r"patch_embedding")
    assert any(m.startswith("vace_blocks.0.before_proj") for m in mods)
    lora = random_lora(native, mods, alpha=None, seed=5)
    state = build_model(variant, tiny=True).state_dict()
    ours = _bake(tmp_path, base_path, write("diffsynth", lora), "")
    reference = fused_reference(variant, to_diffusers_lora(variant, lora, state), STRENGTH)
    assert assert_close(ours, reference, native) == {m + ".weight" for m in lora}


def test_i2v_lora_on_t2v_base_is_refused_naming_the_module(tmp_path):
    _, native_i2v, _ = _base(tmp_path / "i2v", "wan21-i2v-14b", "") if (tmp_path / "i2v").mkdir() is None else None
    _, native, base_path = _base(tmp_path, "wan21-t2v-14b", "")
    lora = random_lora(native_i2v, ["blocks.0.cross_attn.k_img", "blocks.0.self_attn.q"], alpha=None, seed=6)
    lora_path = tmp_path / "i2v-lora.safetensors"
    save_file(write("comfy", lora), str(lora_path))
    out = tmp_path / "out.safetensors"
    code, _, err = run_main(["merge", str(base_path), "--lora", str(lora_path), "-o", str(out)])
    assert code == 1
    assert "Error:" in err and "k_img" in err
    assert not out.exists()


def test_skyreels_v2_shares_the_wan_layout(tmp_path):
    """SkyReels V2 (diffusers loads its single files with the Wan converter): detected as Wan, LoRAs bake."""
    from dataclasses import replace

    import diffusers

    from tests.videofam import converter

    torch.manual_seed(0)
    model = diffusers.SkyReelsV2Transformer3DModel(**{**VARIANTS["wan21-t2v-14b"].tiny, "inject_sample_info": True})
    state = {k: v.detach() for k, v in model.state_dict().items()}
    variant = replace(VARIANTS["wan21-t2v-14b"], model="SkyReelsV2Transformer3DModel")
    native = to_native(variant, state)
    assert any(k.startswith("fps_") for k in native)  # SkyReels' own modules keep their names
    back = converter(variant)(dict(native))
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)
    base = tmp_path / "skyreels.safetensors"
    save_file(native, str(base))
    info = detect_checkpoint({k: TensorInfo(k, "F32", tuple(v.shape), 0, 0) for k, v in native.items()})
    assert info.arch == "wan"
    lora = random_lora(native, linear_modules(native, include=r"^blocks\."), alpha=4.0, seed=8)
    ours = _bake(tmp_path, base, write("musubi", lora), "")
    changed = {k for k in native if not torch.equal(ours[k], native[k])}
    assert changed == {m + ".weight" for m in lora}
    for m, module in lora.items():
        torch.testing.assert_close(ours[m + ".weight"], native[m + ".weight"] + STRENGTH * module.delta())


@pytest.mark.parametrize("flavour", ["musubi", "diffusers"])
def test_wan_animate_face_adapter_loras(tmp_path, flavour):
    """Wan 2.2 Animate: LoRAs on the face adapter (k|v fused as `linear1_kv`, diffusers' to_k/to_v halves), the face
    encoder's out_proj and the blocks, in musubi names and in diffusers' split names, as diffusers' fuse_lora."""
    variant, native, path = _base(tmp_path, "wan22-animate-14b", "")
    mods = linear_modules(native, include=r"^face_adapter\.|^face_encoder\.out_proj|^blocks\.0\.self_attn")
    assert "face_adapter.fuser_blocks.0.linear1_kv" in mods
    lora = random_lora(native, mods, alpha=4.0 if flavour == "musubi" else None, seed=9)
    diffusers_lora = to_diffusers_lora(variant, lora, build_model(variant, tiny=True).state_dict())
    ours = _bake(tmp_path, path, diffusers_lora if flavour == "diffusers" else write("musubi", lora), "", name=flavour)
    reference = fused_reference(variant, diffusers_lora, STRENGTH)
    assert assert_close(ours, reference, native) == {m + ".weight" for m in lora}
