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


# --- declared structures and LoRA-alone matching (lorabake.lora_base) -----------------------------------

STRUCTURES = [("flux2", 0, "flux2"), ("qwen-image", 0, "qwen-image"), ("qwen-image", 1, "qwen-image-2.1"),
              ("z-image", 0, "z-image"), ("lumina2", 0, "lumina2"), ("chroma", 0, "chroma"),
              ("hidream", 0, "hidream"), ("krea2", 0, "krea2")]


@pytest.mark.parametrize("family, variant, keylist", STRUCTURES)
def test_declared_structure_is_the_key_list(family, variant, keylist):
    from lorabake.arch import FAMILIES
    from lorabake.lora_base import structure_rows

    declared = dict(structure_rows(FAMILIES[family].structures[variant]))
    real = {k: tuple(v["shape"]) for k, v in arch_tensors(keylist).items() if not k.endswith("bias")}
    assert declared == real


def _lora_header(shapes: dict[str, tuple[int, int]], flavour: str, rank: int = 2) -> dict:
    from tests.famlora import FLAVOURS

    prefix, joined, down_sfx, up_sfx, with_alpha = FLAVOURS[flavour]
    out = {}
    for name, (rows, cols) in shapes.items():
        stem = prefix + (name.replace(".", "_") if joined else name)
        out[stem + down_sfx] = info(stem + down_sfx, (rank, cols), "BF16")
        out[stem + up_sfx] = info(stem + up_sfx, (rows, rank), "BF16")
        if with_alpha:
            out[stem + ".alpha"] = info(stem + ".alpha", (), "F32")
    return out


def _first_block(shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Modules of block 0 of every stack and the top-level ones: a LoRA of real shapes, kept small."""
    return {k: v for k, v in shapes.items() if not any(p.isdigit() and p != "0" for p in k.split("."))}


# (key list, flavour, naming) of full-size LoRAs; the family the LoRA alone must be matched to
LORA_ROWS = [(c.family, c.flavour, c.naming) for c in __import__("tests.famcases", fromlist=["CASES"]).CASES]


@pytest.mark.parametrize("keylist, flavour, naming", LORA_ROWS, ids=lambda v: str(v))
def test_full_size_lora_alone_is_matched_to_its_family(keylist, flavour, naming):
    pytest.importorskip("diffusers")
    from lorabake.lora_base import match_lora
    from lorabake.lora_format import parse_lora
    from tests.famfix import FAMILIES as KEYLISTS
    from tests.famlora import linear_shapes, weight_shapes
    from tests.test_family_merge import FAMILY_OF

    if naming == "diffusers":
        shapes = linear_shapes(KEYLISTS[keylist].model(full=True))
    else:
        shapes = weight_shapes({k: torch.empty(e["shape"], device="meta") for k, e in arch_tensors(keylist).items()})
    header = _lora_header(_first_block(shapes), flavour)
    lora = parse_lora(header, {}, path="lora.safetensors")
    got = match_lora(lora.modules, header, {})
    assert got.arch == FAMILY_OF[keylist], got


def test_lora_on_modules_flux1_and_chroma_share_is_ambiguous():
    """Chroma is FLUX.1's layout without modulation: a LoRA on shared modules only fits both."""
    from tests.lorafix import make_lora
    from tests.test_lora_format import parse

    f = parse(make_lora([("transformer.transformer_blocks.0.attn.to_q", 3072, 3072)], naming="peft", rank=2))
    assert f.arch == "unknown" and "chroma" in f.arch_note and "flux" in f.arch_note


# --- variants the keys tell apart, and those they do not -------------------------------------------------

# (key list, its keys removed, keys added with their shapes, the note `inspect` prints)
VARIANT_NOTES = [
    # the base model, 2512, Edit and Edit-2509 have one key set: said, not guessed
    ("qwen-image", (), {}, "Qwen-Image layout: base, 2512, Edit and Edit-2509 share it (not told apart by keys)"),
    # diffusers/ComfyUI read Edit-2511's default_ref_method from this flag tensor
    ("qwen-image", (), {"__index_timestep_zero__": [0]}, "Qwen-Image-Edit-2511 (its __index_timestep_zero__ flag, passed through)"),
    # Qwen-Image-Layered: use_additional_t_cond, nn.Embedding(2, 3072)
    ("qwen-image", (), {"time_text_embed.addition_t_embedding.weight": [2, 3072]},
     "Qwen-Image-Layered (time_text_embed.addition_t_embedding)"),
    # Chroma Radiance (ComfyUI comfy/ldm/chroma_radiance): a patch conv for img_in and a NeRF head
    ("chroma", ("img_in.weight", "img_in.bias"),
     {"img_in_patch.weight": [3072, 3, 16, 16], "img_in_patch.bias": [3072],
      "nerf_image_embedder.embedder.0.weight": [64, 67], "nerf_blocks.0.param_generator.weight": [49152, 3072],
      "nerf_blocks.0.norm.scale": [64], "nerf_final_layer_conv.conv.weight": [3, 64, 3, 3]},
     "Chroma Radiance (pixel space: img_in_patch and a nerf_* head)"),
]


@pytest.mark.parametrize("name, drop, add, note", VARIANT_NOTES, ids=[n[3].split(" (")[0] for n in VARIANT_NOTES])
def test_inspect_names_the_variants_the_keys_tell_apart(name, drop, add, note, tmp_path):
    keys = {k: e["shape"] for k, e in arch_tensors(name).items() if k not in drop}
    small = {k: torch.zeros([min(s, 2) for s in shape]) for k, shape in {**keys, **add}.items()}
    save_file(small, str(tmp_path / "base.safetensors"))
    code, out, err = run_main(["inspect", str(tmp_path / "base.safetensors")])
    assert code == 0, err
    assert note in out and f"architecture: {ROWS[name][0]}" in out
    others = [n for _, _, _, n in VARIANT_NOTES if n != note and not n.startswith("Qwen-Image layout")]
    assert not any(other in out for other in others)
