"""Detection from header data only: real key lists of tests/data/arch, one row per layout seen in the wild.

The fixture builders at the top (real names as TensorInfo dicts, SD2 made from SD1 + OpenCLIP-G, diffusers
folders made by diffusers' own single-file converters) are shared with test_keymap.py.
"""

from __future__ import annotations

import re
from functools import cache

import pytest
import torch

from lorabake.detect import ARCH_NAMES, CheckpointInfo, arch_from_metadata, detect_checkpoint
from lorabake.st_header import TensorInfo
from tests.archfix import arch_doc, arch_tensors

TAG = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32"}
UNET_ROOT = "model.diffusion_model."

# --- fixtures: {name: TensorInfo} without writing files -------------------------------------------------


def info(name: str, shape, tag: str = "F16") -> TensorInfo:
    return TensorInfo(name, tag, tuple(shape), 0, 0)


def infos(arch: str, *, components=None, rename=None) -> dict[str, TensorInfo]:
    """Real names/shapes of `arch` (only the given json components), optionally renamed (None drops)."""
    out = {}
    for key, entry in arch_tensors(arch).items():
        if components is not None and entry["component"] not in components:
            continue
        name = rename(key) if rename else key
        if name is not None:
            out[name] = info(name, entry["shape"], TAG[entry["dtype"]])
    return out


def strip(prefix: str):
    return lambda key: key[len(prefix) :] if key.startswith(prefix) else None


@cache
def sd2_tensors() -> dict[str, TensorInfo]:
    """SD2.x made from real names: SD1's UNet with linear proj_in/out and 1024-wide cross-attention K/V,
    plus OpenCLIP-H made from SDXL's OpenCLIP-G (1280 -> 1024 wide, 32 -> 24 layers), SD1's VAE."""
    out = {}
    for key, entry in arch_tensors("sd1").items():
        shape = list(entry["shape"])
        if entry["component"] == "diffuser":
            if re.search(r"attn2\.to_[kv]\.weight$", key):
                shape[1] = 1024
            if re.search(r"proj_(in|out)\.weight$", key):
                shape = shape[:2]
        elif entry["component"] != "vae":
            continue
        out[key] = info(key, shape, TAG[entry["dtype"]])
    for key, entry in arch_tensors("sdxl").items():
        if entry["component"] != "clip_g":
            continue
        layer = re.search(r"resblocks\.(\d+)\.", key)
        if layer and int(layer.group(1)) >= 24:
            continue
        name = key.replace("conditioner.embedders.1.model.", "cond_stage_model.model.")
        shape = [d * 1024 // 1280 if d % 1280 == 0 else d for d in entry["shape"]]
        out[name] = info(name, shape, TAG[entry["dtype"]])
    return out


def _meta(entries: dict[str, TensorInfo]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v.shape, device="meta") for k, v in entries.items()}


def _from_meta(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, TensorInfo]:
    return {prefix + k: info(prefix + k, tuple(v.shape)) for k, v in tensors.items() if v is not None}


@cache
def diffusers_folder(arch: str) -> dict[str, TensorInfo]:
    """A diffusers folder as the reader gives it (subfolder-prefixed names), converted by diffusers itself."""
    from diffusers.loaders import single_file_utils as sfu

    out: dict[str, TensorInfo] = {}
    if arch in ("sd1", "sdxl"):
        unet = _meta(infos(arch, components={"diffuser"}, rename=strip(UNET_ROOT)))
        unet = {"model.diffusion_model." + k: v for k, v in unet.items()}
        config = {"layers_per_block": 2}
        if arch == "sdxl":
            config["addition_embed_type"] = "text_time"
        out |= _from_meta(sfu.convert_ldm_unet_checkpoint(unet, config), "unet.")
        te_root = "cond_stage_model.transformer." if arch == "sd1" else "conditioner.embedders.0.transformer."
        te = {k[len(te_root) :]: v for k, v in _meta(infos(arch, components={"clip_l"})).items()}
        out |= _from_meta(te, "text_encoder.")
        if arch == "sdxl":
            g = _meta(infos("sdxl", components={"clip_g"}))
            hf = sfu.convert_open_clip_checkpoint(None, g, prefix="conditioner.embedders.1.model.")
            out |= _from_meta(hf, "text_encoder_2.")
    elif arch in ("sd3", "flux"):
        convert = {
            "sd3": sfu.convert_sd3_transformer_checkpoint_to_diffusers,
            "flux": sfu.convert_flux_transformer_checkpoint_to_diffusers,
        }[arch]
        dit = _meta(infos(arch, components={"diffuser"}, rename=strip(UNET_ROOT)))
        dit.pop("model.model_sampling.sigmas", None)
        out |= _from_meta(convert(dit), "transformer.")
        out |= _from_meta(
            _meta(infos(arch, components={"clip_l"}, rename=strip("text_encoders.clip_l.transformer."))),
            "text_encoder.",
        )
    vae_root = "vae." if arch == "flux" else "first_stage_model."
    out |= _from_meta(_meta(infos(arch, components={"vae"}, rename=strip(vae_root))), "vae.")
    return out


# --- detection of each family and layout ----------------------------------------------------------------

SD1_OLD_CLIP = {k: v["aliases"][0] for k, v in arch_tensors("sd1").items() if v["component"] == "clip_l"}

DETECT_ROWS = [
    # (id, tensors, arch, layout, prefix, {component: (root, kind)})
    (
        "sd1 ldm full file (with EMA)",
        lambda: infos("sd1"),
        "sd1",
        "ldm",
        UNET_ROOT,
        {"unet": (UNET_ROOT, "unet"), "te1": ("cond_stage_model.transformer.", "clip_l"), "vae": ("first_stage_model.", "vae")},
    ),
    (
        "sd1 old CLIP layout without text_model (early 1.x files)",
        lambda: infos("sd1", rename=lambda k: SD1_OLD_CLIP.get(k, k)),
        "sd1",
        "ldm",
        UNET_ROOT,
        {"unet": (UNET_ROOT, "unet"), "te1": ("cond_stage_model.transformer.", "clip_l"), "vae": ("first_stage_model.", "vae")},
    ),
    (
        "sd1 unet-only (no prefix, no TE)",
        lambda: infos("sd1", components={"diffuser"}, rename=strip(UNET_ROOT)),
        "sd1",
        "unet-only",
        "",
        {"unet": ("", "unet")},
    ),
    (
        "sd2 synthetic ldm (OpenCLIP-H fused in_proj)",
        sd2_tensors,
        "sd2",
        "ldm",
        UNET_ROOT,
        {"unet": (UNET_ROOT, "unet"), "te1": ("cond_stage_model.model.", "openclip_h"), "vae": ("first_stage_model.", "vae")},
    ),
    (
        "sdxl sgm full file",
        lambda: infos("sdxl"),
        "sdxl",
        "sgm",
        UNET_ROOT,
        {
            "unet": (UNET_ROOT, "unet"),
            "te1": ("conditioner.embedders.0.transformer.", "clip_l"),
            "te2": ("conditioner.embedders.1.model.", "openclip_g"),
            "vae": ("first_stage_model.", "vae"),
        },
    ),
    (
        "sdxl unet-only",
        lambda: infos("sdxl", components={"diffuser"}, rename=strip(UNET_ROOT)),
        "sdxl",
        "unet-only",
        "",
        {"unet": ("", "unet")},
    ),
    (
        "sd3 comfyui single file with three text encoders",
        lambda: infos("sd3"),
        "sd3",
        "comfyui",
        UNET_ROOT,
        {
            "dit": (UNET_ROOT, "mmdit"),
            "te1": ("text_encoders.clip_l.transformer.", "clip_l"),
            "te2": ("text_encoders.clip_g.transformer.", "clip_g"),
            "te3": ("text_encoders.t5xxl.transformer.", "t5xxl"),
            "vae": ("first_stage_model.", "vae"),
        },
    ),
    (
        "sd3 dit-only",
        lambda: infos("sd3", components={"diffuser"}, rename=strip(UNET_ROOT)),
        "sd3",
        "dit-only",
        "",
        {"dit": ("", "mmdit")},
    ),
    (
        "flux comfyui checkpoint",
        lambda: infos("flux"),
        "flux",
        "comfyui",
        UNET_ROOT,
        {
            "dit": (UNET_ROOT, "flux"),
            "te1": ("text_encoders.clip_l.transformer.", "clip_l"),
            "te3": ("text_encoders.t5xxl.transformer.", "t5xxl"),
            "vae": ("vae.", "vae"),
        },
    ),
    (
        "flux as BFL ships it (bare double_blocks.*)",
        lambda: infos("flux", components={"diffuser"}, rename=strip(UNET_ROOT)),
        "flux",
        "bfl",
        "",
        {"dit": ("", "flux")},
    ),
    (
        "sd1 diffusers folder",
        lambda: diffusers_folder("sd1"),
        "sd1",
        "diffusers",
        "unet.",
        {"unet": ("unet.", "unet"), "te1": ("text_encoder.", "clip_l"), "vae": ("vae.", "vae")},
    ),
    (
        "sdxl diffusers folder",
        lambda: diffusers_folder("sdxl"),
        "sdxl",
        "diffusers",
        "unet.",
        {
            "unet": ("unet.", "unet"),
            "te1": ("text_encoder.", "clip_l"),
            "te2": ("text_encoder_2.", "clip_g"),
            "vae": ("vae.", "vae"),
        },
    ),
    (
        "sd3 diffusers folder",
        lambda: diffusers_folder("sd3"),
        "sd3",
        "diffusers",
        "transformer.",
        {"dit": ("transformer.", "mmdit"), "te1": ("text_encoder.", "clip_l"), "vae": ("vae.", "vae")},
    ),
    (
        "flux diffusers folder",
        lambda: diffusers_folder("flux"),
        "flux",
        "diffusers",
        "transformer.",
        {"dit": ("transformer.", "flux"), "te1": ("text_encoder.", "clip_l"), "vae": ("vae.", "vae")},
    ),
    (
        "flux diffusers transformer file alone (diffusion_pytorch_model.safetensors)",
        lambda: {k[len("transformer.") :]: v for k, v in diffusers_folder("flux").items() if k.startswith("transformer.")},
        "flux",
        "diffusers",
        "",
        {"dit": ("", "flux")},
    ),
]


@pytest.mark.parametrize(
    "tensors, arch, layout, prefix, components", [r[1:] for r in DETECT_ROWS], ids=[r[0] for r in DETECT_ROWS]
)
def test_detects_family_and_layout(tensors, arch, layout, prefix, components):
    got = detect_checkpoint(tensors(), {})
    assert (got.arch, got.layout, got.prefix) == (arch, layout, prefix)
    assert {n: (c.root, c.kind) for n, c in got.components.items()} == components
    assert got.candidates == ()


def test_component_statistics_count_every_tensor_once():
    tensors = infos("sdxl")
    got = detect_checkpoint(tensors, {})
    unet = got.components["unet"]
    expected = [t for k, t in tensors.items() if k.startswith(UNET_ROOT)]
    assert unet.tensors == len(expected)
    assert unet.params == sum(t.numel for t in expected)
    assert unet.dtypes == {"F32": len(expected)}
    te1 = got.components["te1"]
    assert te1.dtypes["I64"] == 1  # position_ids: counted, but not in params
    assert te1.params == sum(
        t.numel for k, t in tensors.items() if k.startswith(te1.root) and t.dtype != "I64"
    )


def test_notes_say_what_was_seen():
    assert any("EMA" in n for n in detect_checkpoint(infos("sd1"), {}).notes)
    assert any("FLUX.1-dev" in n for n in detect_checkpoint(infos("flux"), {}).notes)
    schnell = {k: v for k, v in infos("flux").items() if ".guidance_in." not in k}
    assert any("schnell" in n for n in detect_checkpoint(schnell, {}).notes)


# --- unknown, said plainly ------------------------------------------------------------------------------


def test_unknown_tensors_say_so_plainly():
    got = detect_checkpoint({"encoder.layers.0.weight": info("encoder.layers.0.weight", (4, 4))}, {})
    assert (got.arch, got.layout, got.candidates) == ("unknown", "unknown", ())
    assert "no known diffusion model" in got.notes[0]


def test_sdxl_refiner_like_unet_is_unknown_with_sdxl_candidate():
    # refiner/SSD-1B-like: SGM names but cross-attention K is 1280 wide, not 2048
    tensors = infos("sdxl", components={"diffuser"})
    key = UNET_ROOT + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    tensors[key] = info(key, (640, 1280))
    got = detect_checkpoint(tensors, {})
    assert got.arch == "unknown"
    assert got.candidates == ("sdxl",)
    assert any("1280" in n and "2048" in n for n in got.notes)


def test_two_families_in_one_file_is_ambiguous():
    tensors = infos("sd3", components={"diffuser"}) | infos("flux", components={"diffuser"})
    got = detect_checkpoint(tensors, {})
    assert got.arch == "unknown"
    assert got.candidates == ("sd3", "flux")
    assert "several families" in got.notes[0]


def test_text_encoder_only_file_lists_the_families_that_use_it():
    got = detect_checkpoint(infos("flux", components={"clip_l"}), {})
    assert got.arch == "unknown"
    assert got.candidates == ("sd3", "flux", "hidream")  # HiDream-I1's first encoder is CLIP-L too
    assert "te1" in got.components


def test_unknown_dit_under_model_diffusion_model_is_still_a_component():
    # a family without a table (Lumina-like names): the keymap's generic fallback needs its root
    tensors = {
        UNET_ROOT + "layers.0.attention.qkv.weight": info(UNET_ROOT + "layers.0.attention.qkv.weight", (6912, 2304)),
        UNET_ROOT + "layers.0.attention.out.weight": info(UNET_ROOT + "layers.0.attention.out.weight", (2304, 2304)),
    }
    got = detect_checkpoint(tensors, {})
    assert (got.arch, got.prefix) == ("unknown", UNET_ROOT)
    assert got.components["dit"].root == UNET_ROOT


# --- metadata -------------------------------------------------------------------------------------------

METADATA_ROWS = [
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base"}, "sdxl"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
    ({"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd1"),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, "sd2"),
    ({"modelspec.architecture": "stable-diffusion-v3-medium"}, "sd3"),  # ComfyUI's spelling
    ({"modelspec.architecture": "flux-1-dev/lora"}, "flux"),
    ({"ss_base_model_version": "sd_v1"}, "sd1"),
    ({"ss_base_model_version": "sd_v2_768_v"}, "sd2"),
    ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
    ({"ss_base_model_version": "flux1"}, "flux"),
    ({"ss_base_model_version": "sd3"}, "sd3"),
    ({"ss_base_model_version": "something_else"}, None),
    ({}, None),
]


@pytest.mark.parametrize("metadata, arch", METADATA_ROWS)
def test_arch_from_metadata(metadata, arch):
    assert arch_from_metadata(metadata) == arch


def test_metadata_adds_a_candidate_when_tensors_are_unknown():
    got = detect_checkpoint({"x.weight": info("x.weight", (2, 2))}, {"modelspec.architecture": "flux-1-dev"})
    assert got.candidates == ("flux",)


def test_metadata_disagreeing_with_tensors_is_noted_not_obeyed():
    got = detect_checkpoint(infos("sd1", components={"diffuser"}), {"ss_base_model_version": "sdxl_base_v1-0"})
    assert got.arch == "sd1"
    assert any("metadata names sdxl" in n for n in got.notes)


def test_arch_names_table():
    assert {a: (n["modelspec"], n["kohya"]) for a, n in ARCH_NAMES.items() if a in ("sd1", "sd2", "sdxl", "sd3", "flux", "wan", "hunyuanvideo", "ltx", "kandinsky5", "cosmos")} == {
        "sd1": ("stable-diffusion-v1", "sd_v1"),
        "sd2": ("stable-diffusion-v2-512", "sd_v2"),
        "sdxl": ("stable-diffusion-xl-v1-base", "sdxl_base_v1-0"),
        "sd3": ("stable-diffusion-3-medium", "sd3"),
        "flux": ("flux-1-dev", "flux1"),
        "wan": ("wan", "wan"),
        "hunyuanvideo": ("hunyuan-video", "hunyuan_video"),
        "ltx": ("ltx-video", "ltx"),
        "kandinsky5": ("kandinsky-5", "kandinsky5"),
        "cosmos": ("cosmos-predict2", "cosmos"),
    }


def test_checkpoint_info_is_frozen():
    got = detect_checkpoint(infos("sd1", components={"diffuser"}), {})
    assert isinstance(got, CheckpointInfo)
    with pytest.raises(AttributeError):
        got.arch = "sdxl"  # type: ignore[misc]


def test_arch_json_files_are_the_real_ones():
    # guard: the fixtures above rely on these counts (README of tests/data/arch)
    assert {a: len(arch_doc(a)["tensors"]) for a in ("sd1", "sdxl", "sd3", "flux")} == {
        "sd1": 1831,
        "sdxl": 2531,
        "sd3": 1672,
        "flux": 1439,
    }
