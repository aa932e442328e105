"""Detection, inspect and refusal for the 2025-2026 image families, from the full-size key lists.

Each family module in lorabake/arch adds rows here: its key list (tests/data/arch/<list>.json.gz) must be
detected as the family in every layout users meet (bare native file, ComfyUI `model.diffusion_model.`,
diffusers `transformer.` where the names are diffusers'), no other key list may be taken for it, `inspect`
names it, and a LoRA of another family is refused with both families named.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lorabake.detect import detect_checkpoint
from tests.archfix import arch_tensors
from tests.cli_helpers import run_main
from tests.test_detect import TAG, info

# key list -> (family id, the layouts it must be detected in: (prefix, layout name), notes expected)
ROWS: dict[str, tuple[str, tuple[tuple[str, str], ...], tuple[str, ...]]] = {
    "qwen-image": ("qwen-image", (("", "native"), ("model.diffusion_model.", "comfyui"), ("transformer.", "diffusers")), ()),
    "qwen-image-2.1": ("qwen-image", (("", "native"), ("model.diffusion_model.", "comfyui")), ("Qwen-Image 2.1",)),
    "z-image": ("z-image", (("", "native"), ("model.diffusion_model.", "comfyui")), ()),
    "lumina2": ("lumina2", (("", "native"), ("model.diffusion_model.", "comfyui")), ()),
    "chroma": ("chroma", (("", "bfl"), ("model.diffusion_model.", "comfyui")), ()),
    "hidream": ("hidream", (("", "native"), ("model.diffusion_model.", "comfyui"), ("transformer.", "diffusers")), ()),
    "krea2": ("krea2", (("", "native"), ("model.diffusion_model.", "comfyui")), ()),
    "flux2": ("flux2", (("", "bfl"), ("model.diffusion_model.", "comfyui")), ("guidance embedder present (dev-like)",)),
}
LISTS = ("flux2", "qwen-image", "qwen-image-2.1", "z-image", "lumina2", "chroma", "hidream", "krea2")


def headers(name: str, prefix: str = "") -> dict:
    return {prefix + k: info(prefix + k, e["shape"], TAG[e["dtype"]]) for k, e in arch_tensors(name).items()}


@pytest.mark.parametrize("name", list(ROWS))
def test_key_list_detected_as_its_family_in_every_layout(name):
    family, layouts, notes = ROWS[name]
    for prefix, layout in layouts:
        got = detect_checkpoint(headers(name, prefix), {})
        assert (got.arch, got.layout, got.prefix) == (family, layout, prefix)
        assert got.components["dit"].tensors == len(arch_tensors(name))
        for note in notes:
            assert note in got.notes


@pytest.mark.parametrize("name", [n for n in LISTS if n not in ROWS])
def test_other_key_lists_are_not_taken_for_a_new_family(name):
    got = detect_checkpoint(headers(name), {})
    assert got.arch not in {family for family, _, _ in ROWS.values()}


def test_flux1_is_not_taken_for_a_new_family():
    got = detect_checkpoint(headers("flux"), {})
    assert got.arch == "flux"


@pytest.mark.parametrize("name", list(ROWS))
def test_inspect_names_the_family(name, tmp_path):
    family = ROWS[name][0]
    small = {k: torch.zeros([min(s, 2) for s in e["shape"]] or [], dtype=torch.bfloat16)
             for k, e in arch_tensors(name).items()}
    # the shapes detection reads are kept real
    small.update({k: torch.zeros(e["shape"], dtype=torch.bfloat16) for k, e in arch_tensors(name).items()
                  if len(e["shape"]) < 2})
    save_file(small, str(tmp_path / "base.safetensors"))
    code, out, err = run_main(["inspect", str(tmp_path / "base.safetensors")])
    assert code == 0, err
    assert f"architecture: {family}" in out
