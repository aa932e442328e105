"""LTX-2 (audio + video) and LTX-Video 0.9: detection, all-in-one files kept whole, LoRAs against diffusers.

Bases are tiny diffusers models written in Lightricks' names (tests/videofam.py), with
`model.diffusion_model.` as Lightricks ships them or bare. The reference for a LoRA file is what diffusers
makes of it (`LTX2LoraLoaderMixin` / `LTXVideoLoraLoaderMixin.lora_state_dict`, which reads the LTX
trainers' `diffusion_model.` files), loaded with `load_lora_adapter` and fused on the same tiny model;
for LTX-Video 0.9, whose reader does not rename, the stand-in is named in the test.
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
ROOT = "model.diffusion_model."


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("name", "strip", "words"),
    [
        ("ltx2", False, ("LTX-2", "width 4096")),
        ("ltx2", True, ("LTX-2",)),
        ("ltxv-0.9", False, ("LTX-Video 0.9", "2B")),
    ],
)
def test_full_size_ltx_is_detected_with_its_version(name, strip, words):
    with open(os.path.join(ARCH_DIR, f"{name}.json"), encoding="utf-8") as fh:
        tensors = json.load(fh)["tensors"]
    header = {}
    for key, spec in tensors.items():
        key = key.removeprefix(ROOT) if strip else key
        header[key] = TensorInfo(key, "BF16", tuple(spec["shape"]), 0, 0)
    info = detect_checkpoint(header)
    assert (info.arch, info.prefix) == ("ltx", "" if strip else ROOT), info.notes
    for word in words:
        assert word in " ".join(info.notes), (word, info.notes)


def _base(tmp_path, name: str, *, bare: bool = False, extra: dict | None = None):
    variant = VARIANTS[name]
    native = to_native(variant, build_model(variant, tiny=True).state_dict())
    written = {k.removeprefix(ROOT) if bare else k: v for k, v in native.items()}
    path = tmp_path / f"base-{name}-{bare}.safetensors"
    save_file({**written, **(extra or {})}, str(path))
    return variant, native, path


def _bake(tmp_path, base_path, lora: dict, *, bare: bool, name: str) -> dict:
    lora_path = tmp_path / f"{name}.safetensors"
    save_file(lora, str(lora_path))
    out = tmp_path / f"out-{name}.safetensors"
    code, stdout, err = run_main(["merge", str(base_path), "--lora", f"{lora_path}:{STRENGTH}", "-o", str(out), "--json"])
    assert code == 0, err
    summary = json.loads(stdout)["loras"][0]
    assert summary["unmatched"] == {} and summary["not_applied"] == []
    return {(ROOT + k if bare and not k.startswith(("vae.", "text_")) else k): v for k, v in load_file(str(out)).items()}


def _diffusers_reads(tmp_path, name: str, tensors: dict) -> dict:
    from diffusers.loaders import LTX2LoraLoaderMixin, LTXVideoLoraLoaderMixin

    path = tmp_path / "as-diffusers-reads.safetensors"
    save_file(tensors, str(path))
    mixin = LTX2LoraLoaderMixin if name == "ltx2" else LTXVideoLoraLoaderMixin
    return mixin.lora_state_dict(str(path))


# the LTX trainers: `diffusion_model.` + Lightricks names, lora_A/B, no alpha; bare (ComfyUI's LTXV map)
@pytest.mark.parametrize("bare", [False, True], ids=["lightricks", "bare"])
@pytest.mark.parametrize("name", ["ltx2", "ltxv-0.9"])
def test_ltx_trainer_lora_matches_diffusers_fuse_lora(tmp_path, name, bare):
    variant, native, path = _base(tmp_path, name, bare=bare)
    lora = random_lora(native, linear_modules(native), alpha=None, seed=1)  # every linear, audio ones included
    ours = _bake(tmp_path, path, write("comfy_ab", lora, strip=ROOT), bare=bare, name=name)
    theirs = _diffusers_reads(tmp_path, name, write("comfy_ab", lora, strip=ROOT))
    if name == "ltxv-0.9":
        # Stand-in: diffusers' LTX-Video reader only strips `diffusion_model.`, so LoRAs on patchify_proj and
        # adaln_single reach no diffusers module; the reference takes the LoRA renamed as diffusers'
        # single-file converter renames the checkpoint, and agrees with diffusers' reader everywhere else.
        renamed = to_diffusers_lora(variant, lora, build_model(variant, tiny=True).state_dict())
        assert {k: v for k, v in theirs.items() if k in renamed}.keys() == {
            k for k in renamed if ".proj_in." not in k and ".time_embed." not in k}
        for key in theirs.keys() & renamed.keys():
            assert torch.equal(theirs[key], renamed[key]), key
        theirs = renamed
    reference = fused_reference(variant, theirs, STRENGTH)
    changed = assert_close(ours, reference, native)
    assert changed == {m + ".weight" for m in lora}
    if name == "ltx2":
        assert {ROOT + "transformer_blocks.0.audio_attn1.to_q.weight", ROOT + "patchify_proj.weight",
                ROOT + "av_ca_video_scale_shift_adaln_single.linear.weight",
                ROOT + "transformer_blocks.0.audio_ff.net.0.proj.weight"} <= changed


@pytest.mark.parametrize("name", ["ltx2", "ltxv-0.9"])
def test_diffusers_named_ltx_lora_through_the_renames(tmp_path, name):
    """`transformer.proj_in`, `transformer.time_embed.linear`, `...attn1.to_q` onto patchify_proj, adaln_single."""
    variant, native, path = _base(tmp_path, name)
    lora = random_lora(native, linear_modules(native), alpha=None, seed=2)
    diffusers_lora = to_diffusers_lora(variant, lora, build_model(variant, tiny=True).state_dict())
    assert "transformer.proj_in.lora_A.weight" in diffusers_lora
    ours = _bake(tmp_path, path, diffusers_lora, bare=False, name=name)
    reference = fused_reference(variant, diffusers_lora, STRENGTH)
    assert assert_close(ours, reference, native) == {m + ".weight" for m in lora}


def test_all_in_one_ltx2_file_stays_whole(tmp_path):
    """DiT + text projection + VAE in one file: every base tensor is in the output, the others unchanged."""
    extra = {
        "vae.decoder.conv_in.conv.weight": torch.randn(8, 4, 3, 3, 3),
        "audio_vae.decoder.conv_in.weight": torch.randn(8, 4, 3, 3),
        "text_embedding_projection.aggregate_embed.weight": torch.randn(16, 32),
    }
    variant, native, path = _base(tmp_path, "ltx2", extra=extra)
    lora = random_lora(native, linear_modules(native, include=r"attn1\."), alpha=None, seed=3)
    ours = _bake(tmp_path, path, write("comfy_ab", lora, strip=ROOT), bare=False, name="aio")
    assert set(ours) == set(native) | set(extra)
    for key, value in extra.items():
        assert torch.equal(ours[key], value), key
    changed = {k for k in native if not torch.equal(ours[k], native[k])}
    assert changed == {m + ".weight" for m in lora}


def test_scale_shift_table_full_diff(tmp_path):
    """`scale_shift_table*` are bare parameters: a full `diff` lands on them as it is."""
    variant, native, path = _base(tmp_path, "ltx2")
    keys = [ROOT + "scale_shift_table", ROOT + "transformer_blocks.0.scale_shift_table_a2v_ca_video"]
    gen = torch.Generator().manual_seed(4)
    diffs = {k: torch.randn(native[k].shape, generator=gen) for k in keys}
    lora = {"diffusion_model." + k.removeprefix(ROOT) + ".diff": d for k, d in diffs.items()}
    ours = _bake(tmp_path, path, lora, bare=False, name="sst")
    for key, diff in diffs.items():
        torch.testing.assert_close(ours[key], native[key] + STRENGTH * diff, rtol=1e-6, atol=1e-6)
    assert {k for k in native if not torch.equal(ours[k], native[k])} == set(keys)
