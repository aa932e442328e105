"""HunyuanVideo 1.0 and 1.5: Tencent and ComfyUI spellings as bases, LoRAs in either, against diffusers' fuse_lora.

Bases are tiny diffusers models written in Tencent names by tests/videofam.py, and renamed the way ComfyUI
renames them on load (comfy/supported_models.py). The reference is PEFT through diffusers'
`load_lora_adapter` + `fuse_lora` on the same tiny model, fed the LoRA in diffusers names: a LoRA on a
fused Tencent tensor (`img_attn_qkv`, `linear1`, the refiner's `self_attn_qkv`) is the same LoRA on the
diffusers q/k/v(/mlp) modules with A shared and B cut at the bands. Stand-in: diffusers' own reader of
Tencent-named LoRAs cuts `linear1` at a hard-coded 3072 rows (and cuts the refiner's lora_A in three), so
the test cuts B itself and checks diffusers' reader agrees where it does not hard-code (double blocks).
HunyuanVideo 1.5 has no reader or converter in diffusers 0.42.1: only the PEFT fuse is the reference.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorabake.detect import detect_checkpoint
from lorabake.lora_base import identify
from lorabake.lora_format import parse_lora
from lorabake.st_header import TensorInfo
from tests.archfix import arch_tensors
from tests.cli_helpers import run_main
from tests.lorafix import fake_header
from tests.videofam import ARCH_DIR, VARIANTS, build_model, comfy_hunyuan_name, to_native
from tests.videolora import (
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


def _header(name: str, *, prefix: str = "", comfy: bool = False) -> dict[str, TensorInfo]:
    with open(os.path.join(ARCH_DIR, f"{name}.json"), encoding="utf-8") as fh:
        tensors = json.load(fh)["tensors"]
    out = {}
    for key, spec in tensors.items():
        key = prefix + (comfy_hunyuan_name(key) if comfy else key)
        out[key] = TensorInfo(key, "BF16", tuple(spec["shape"]), 0, 0)
    return out


@pytest.mark.parametrize(
    ("name", "prefix", "comfy", "naming", "words"),
    [
        ("hunyuanvideo-t2v", "", False, "tencent", ("1.0", "T2V")),
        ("hunyuanvideo-t2v", COMFY, False, "tencent", ("1.0", "T2V")),
        ("hunyuanvideo-t2v", "", True, "comfy", ("1.0", "T2V")),  # Comfy-Org repackaged
        ("hunyuanvideo-t2v", COMFY, True, "comfy", ("1.0", "T2V")),
        ("hunyuanvideo15-i2v", "", False, "tencent", ("1.5",)),
        ("hunyuanimage21", "", False, "tencent", ("HunyuanImage 2.1",)),
        ("hunyuanimage21", COMFY, True, "comfy", ("HunyuanImage 2.1",)),
    ],
)
def test_full_size_hunyuanvideo_is_detected_with_its_version(name, prefix, comfy, naming, words):
    info = detect_checkpoint(_header(name, prefix=prefix, comfy=comfy))
    assert (info.arch, info.prefix, info.naming) == ("hunyuanvideo", prefix, naming), info.notes
    for word in words:
        assert word in " ".join(info.notes), (word, info.notes)


def _lora_alone(weights: dict[str, tuple[int, ...]], spelling: str) -> dict[str, TensorInfo]:
    """Header of a rank-4 LoRA on every 2-D weight of `weights` (full-size names and shapes), no base."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key, (rows, cols) in weights.items():
        module = key.removesuffix(".weight")
        if spelling == "musubi":  # lora_unet_double_blocks_0_img_attn_qkv, with alpha
            stem = "lora_unet_" + module.replace(".", "_")
            shapes |= {f"{stem}.lora_down.weight": (4, cols), f"{stem}.lora_up.weight": (rows, 4), f"{stem}.alpha": ()}
        else:  # ComfyUI / diffusion-pipe: diffusion_model. + ComfyUI's names, lora_A/B
            stem = "diffusion_model." + comfy_hunyuan_name(key).removesuffix(".weight")
            shapes |= {f"{stem}.lora_A.weight": (4, cols), f"{stem}.lora_B.weight": (rows, 4)}
    return fake_header(shapes)


def _weights(name: str, keep=lambda key: True) -> dict[str, tuple[int, ...]]:
    with open(os.path.join(ARCH_DIR, f"{name}.json"), encoding="utf-8") as fh:
        tensors = json.load(fh)["tensors"]
    return {k: tuple(v["shape"]) for k, v in tensors.items() if k.endswith(".weight") and len(v["shape"]) == 2 and keep(k)}


def _flux_blocks(key: str) -> bool:
    """A module Flux dev has too, same name and shape: its 19 double and 38 single blocks."""
    parts = key.split(".")
    return (parts[0], int(parts[1]) if parts[1].isdigit() else -1) in (
        {("double_blocks", i) for i in range(19)} | {("single_blocks", i) for i in range(38)})


@pytest.mark.parametrize(
    ("name", "keep", "spelling", "metadata", "arch"),
    [
        ("hunyuanvideo-t2v", None, "musubi", {}, "hunyuanvideo"),
        ("hunyuanvideo-t2v", None, "comfy", {}, "hunyuanvideo"),  # 312 of its 343 modules fit Flux too
        ("hunyuanvideo-t2v", "blocks", "comfy", {}, "hunyuanvideo"),  # blocks only: 20 double, 40 single
        ("hunyuanvideo15-i2v", None, "comfy", {}, "hunyuanvideo"),
        ("hunyuanimage21", None, "musubi", {}, "hunyuanvideo"),  # width 3584: no Flux module fits
        # only what Flux has, name for name and shape for shape: Flux, unless metadata says otherwise
        ("hunyuanvideo-t2v", "flux", "comfy", {}, "flux"),
        ("hunyuanvideo-t2v", "flux", "musubi", {"ss_base_model_version": "hunyuan_video"}, "hunyuanvideo"),
    ],
)
def test_a_hunyuanvideo_lora_alone_is_named_when_it_wins_outright(name, keep, spelling, metadata, arch):
    rule = {None: lambda k: True, "blocks": lambda k: k.startswith(("double_blocks.", "single_blocks.")),
            "flux": _flux_blocks}[keep]
    header = _lora_alone(_weights(name, rule), spelling)
    lora, match = identify(parse_lora(header, metadata), header)
    assert (lora.arch, lora.arch_source, match.ambiguous) == (arch, "rule tables", False), match


def test_a_flux_lora_alone_stays_flux():
    """Every module of a full Flux dev LoRA fits HunyuanVideo's rule table as well: HunyuanVideo steps aside."""
    weights = {k.removeprefix("model.diffusion_model."): tuple(v["shape"]) for k, v in arch_tensors("flux").items()
               if k.startswith("model.diffusion_model.") and k.endswith(".weight") and len(v["shape"]) == 2}
    shapes = {}
    for key, (rows, cols) in weights.items():
        stem = "diffusion_model." + key.removesuffix(".weight")
        shapes |= {f"{stem}.lora_A.weight": (4, cols), f"{stem}.lora_B.weight": (rows, 4)}
    header = fake_header(shapes)
    lora, match = identify(parse_lora(header, {}), header)
    assert (lora.arch, match.ambiguous) == ("flux", False), match
    assert "hunyuanvideo" not in {c.arch for c in match.candidates}


def _base(tmp_path, name: str, *, prefix: str = "", comfy: bool = False):
    variant = VARIANTS[name]
    native = to_native(variant, build_model(variant, tiny=True).state_dict())
    written = {prefix + (comfy_hunyuan_name(k) if comfy else k): v for k, v in native.items()}
    path = tmp_path / f"base-{prefix or 'bare'}-{comfy}.safetensors"
    save_file(written, str(path))
    back = {prefix + (comfy_hunyuan_name(k) if comfy else k): k for k in native}
    return variant, native, path, back


def _bake(tmp_path, base_path, lora: dict, back: dict, name: str) -> dict:
    lora_path = tmp_path / f"{name}.safetensors"
    save_file(lora, str(lora_path))
    out = tmp_path / f"out-{name}.safetensors"
    code, stdout, err = run_main(["merge", str(base_path), "--lora", f"{lora_path}:{STRENGTH}", "-o", str(out), "--json"])
    assert code == 0, err
    summary = json.loads(stdout)["loras"][0]
    assert summary["unmatched"] == {} and summary["not_applied"] == []
    return {back[k]: v for k, v in load_file(str(out)).items()}


def _comfy_lora(lora: dict) -> dict:
    """The same modules under ComfyUI's names."""
    return {comfy_hunyuan_name(m + ".weight").removesuffix(".weight").removesuffix(".scale"): v for m, v in lora.items()}


# (LoRA flavour, alpha, spelled the ComfyUI way)
FLAVOURS = {
    "dpipe": ("dpipe", None, False),  # diffusion-pipe: transformer. + Tencent names, lora_A/B
    "comfy-tencent": ("comfy_ab", None, False),  # diffusion_model. + Tencent names (old ComfyUI LoRAs)
    "comfy-comfy": ("comfy", 4.0, True),  # diffusion_model. + ComfyUI names, with alpha
    "musubi": ("musubi", 4.0, False),  # lora_unet_double_blocks_0_img_attn_qkv
    "hyi2v": ("hyi2v", 4.0, False),  # Hunyuan_video_I2V_lora_double_blocks_0_...
}
BASES = {"tencent": ("", False), "tencent-comfyui": (COMFY, False), "comfy": ("", True), "comfy-comfyui": (COMFY, True)}


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_hunyuanvideo_lora_in_either_spelling_on_either_base(tmp_path, flavour, base):
    prefix, comfy = BASES[base]
    variant, native, path, back = _base(tmp_path, "hunyuanvideo-t2v", prefix=prefix, comfy=comfy)
    file_flavour, alpha, comfy_names = FLAVOURS[flavour]
    lora = random_lora(native, linear_modules(native), alpha=alpha, seed=1)  # every linear, img_in's Conv3d too
    tensors = write(file_flavour, _comfy_lora(lora) if comfy_names else lora)
    ours = _bake(tmp_path, path, tensors, back, flavour)
    state = build_model(variant, tiny=True).state_dict()
    reference = fused_reference(variant, to_diffusers_lora(variant, lora, state), STRENGTH)
    changed = assert_close(ours, reference, native)
    assert changed == {m + ".weight" for m in lora}
    assert {"double_blocks.0.img_attn_qkv.weight", "single_blocks.0.linear1.weight", "img_in.proj.weight",
            "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight",
            "final_layer.adaLN_modulation.1.weight"} <= changed


def test_diffusers_reads_fused_double_block_loras_as_we_cut_them(tmp_path):
    """Where diffusers' HunyuanVideo LoRA reader does not hard-code a width (double blocks), it gives the
    LoRA the stand-in gives (A shared, B cut in three)."""
    from diffusers.loaders import HunyuanVideoLoraLoaderMixin

    variant, native, _, _ = _base(tmp_path, "hunyuanvideo-t2v")
    lora = random_lora(native, linear_modules(native, include=r"^double_blocks\."), alpha=None, seed=2)
    path = tmp_path / "double.safetensors"
    save_file(write("comfy_ab", lora), str(path))
    theirs = HunyuanVideoLoraLoaderMixin.lora_state_dict(str(path))
    ours = to_diffusers_lora(variant, lora, build_model(variant, tiny=True).state_dict())
    assert sorted(theirs) == sorted(ours)
    for key in ours:
        assert torch.equal(theirs[key], ours[key]), key


@pytest.mark.parametrize("flavour", ["diffusers", "musubi", "comfy_ab"])
def test_hunyuanvideo15_split_qkv(tmp_path, flavour):
    variant, native, path, back = _base(tmp_path, "hunyuanvideo15-i2v")
    # 1.5's patch embedding is a 1x1x1 Conv3d, which PEFT's Conv3d merge cannot fuse: left out of the LoRA,
    mods = linear_modules(native, exclude=r"^img_in\.|^cond_type_embedding")  # and an nn.Embedding
    lora = random_lora(native, mods, alpha=4.0 if flavour == "musubi" else None, seed=3)
    state = build_model(variant, tiny=True).state_dict()
    diffusers_lora = to_diffusers_lora(variant, lora, state)
    tensors = diffusers_lora if flavour == "diffusers" else write(flavour, lora)
    ours = _bake(tmp_path, path, tensors, back, flavour)
    reference = fused_reference(variant, diffusers_lora, STRENGTH)
    changed = assert_close(ours, reference, native)
    assert changed == {m + ".weight" for m in lora}
    assert "double_blocks.0.img_attn_q.weight" in changed


@pytest.mark.parametrize("base", ["tencent", "comfy"])
def test_diffusers_split_qkv_lora_onto_fused_hunyuanvideo(tmp_path, base):
    """diffusers/PEFT LoRAs name to_q/to_k/to_v (and proj_mlp): each lands on its band of the fused tensor."""
    prefix, comfy = BASES[base]
    variant, native, path, back = _base(tmp_path, "hunyuanvideo-t2v", prefix=prefix, comfy=comfy)
    lora = random_lora(native, linear_modules(native), alpha=None, seed=4)
    diffusers_lora = to_diffusers_lora(variant, lora, build_model(variant, tiny=True).state_dict())
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight" in diffusers_lora
    ours = _bake(tmp_path, path, diffusers_lora, back, "diffusers")
    reference = fused_reference(variant, diffusers_lora, STRENGTH)
    assert assert_close(ours, reference, native) == {m + ".weight" for m in lora}


@pytest.mark.parametrize("flavour", ["musubi", "comfy-comfy"])
def test_a_diffusers_folder_is_hunyuanvideo_and_takes_fused_loras(tmp_path, flavour):
    """A diffusers HunyuanVideo folder has Flux's diffusers names (`transformer_blocks.N.attn.to_q`,
    `single_transformer_blocks`) plus the token refiner: it is HunyuanVideo, not Flux. A LoRA on Tencent's fused
    tensors (`img_attn_qkv`, `linear1` = q|k|v|mlp, the refiner's `self_attn_qkv`), in Tencent's or ComfyUI's
    names, is spread over the split q/k/v(/mlp) as diffusers' fuse_lora applies the same ΔW."""
    variant = VARIANTS["hunyuanvideo-t2v"]
    state = build_model(variant, tiny=True).state_dict()
    native = to_native(variant, state)
    folder = tmp_path / "base"
    (folder / "transformer").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideoPipeline"}))
    code, stdout, err = run_main(["inspect", str(folder)])
    assert code == 0 and "architecture: hunyuanvideo" in stdout and "HunyuanVideo 1.0" in stdout, (stdout, err)

    file_flavour, alpha, comfy_names = FLAVOURS[flavour]
    lora = random_lora(native, linear_modules(native), alpha=alpha, seed=5)  # every linear and img_in's Conv3d
    lora_path = tmp_path / "lora.safetensors"
    save_file(write(file_flavour, _comfy_lora(lora) if comfy_names else lora), str(lora_path))
    out = tmp_path / "out.safetensors"
    code, stdout, err = run_main(["merge", str(folder), "--lora", f"{lora_path}:{STRENGTH}", "-o", str(out), "--json"])
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["base_architecture"] == "hunyuanvideo"
    assert summary["loras"][0]["unmatched"] == {} and summary["loras"][0]["not_applied"] == []
    ours = to_native(variant, {k.removeprefix("transformer."): v for k, v in load_file(str(out)).items()})
    reference = fused_reference(variant, to_diffusers_lora(variant, lora, state), STRENGTH)
    changed = assert_close(ours, reference, native)
    assert changed == {m + ".weight" for m in lora}
    assert {"single_blocks.0.linear1.weight", "double_blocks.0.img_attn_qkv.weight",
            "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight"} <= changed


def test_hunyuanimage21_takes_hunyuanvideo_loras(tmp_path):
    """HunyuanImage 2.1 is HunyuanVideo 1.0's Tencent layout with 2-D patches (a Conv2d img_in) and byt5_in: a musubi
    LoRA on every linear (fused img_attn_qkv, linear1, byt5_in) bakes as diffusers' fuse_lora on
    HunyuanImageTransformer2DModel."""
    variant, native, path, back = _base(tmp_path, "hunyuanimage21")
    assert native["img_in.proj.weight"].dim() == 4
    lora = random_lora(native, linear_modules(native), alpha=4.0, seed=6)  # img_in's Conv2d too
    ours = _bake(tmp_path, path, write("musubi", lora), back, "musubi")
    state = build_model(variant, tiny=True).state_dict()
    reference = fused_reference(variant, to_diffusers_lora(variant, lora, state), STRENGTH)
    changed = assert_close(ours, reference, native)
    assert changed == {m + ".weight" for m in lora}
    assert {"single_blocks.0.linear1.weight", "byt5_in.fc1.weight", "img_in.proj.weight"} <= changed
