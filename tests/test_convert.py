"""`lorabake convert`: every pair of flavours round-trips to a LoRA that bakes like the original (every pair
on FLUX.1; on SD1 and SDXL, whose conversions are renames only, each flavour there and back and to the next).

The bakes are `lorabake merge` into real-shaped bases (real names and shapes from tests/data/arch, random
values): SD1 and SDXL UNet blocks, and FLUX.1's fused qkv / linear1 / final-layer modulation, whose
diffusers names are row bands (split on the way to diffusers, fused on the way back). A bake is
compared tensor by tensor with the bake of the original file. Pure renames keep the factors' bytes, so
their bakes are bit-equal; a split or a fusion changes the GEMM's shape (same products, zeros added), so
those are compared within fp32 rounding of the sums (rtol 1e-6).
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorabake import convert, ops
from lorabake.arch import FAMILIES
from lorabake.errors import LoraFormatError
from lorabake.plan import LoraSpec
from tests.archfix import build_checkpoint
from tests.cli_helpers import run_main
from tests.lorafix import make_lora

FLAVOURS = ("kohya", "comfyui", "diffusers", "peft", "aitoolkit")
U = "model.diffusion_model."


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (family, base tensors, original LoRA modules (stem, out, in[, kernel], rank, alpha), metadata)
# Ranks and alphas vary per module (PEFT then needs rank_pattern/alpha_pattern); every alpha/rank is a
# power of two, so folding it into up (ai-toolkit) is exact too.
SD1_BLOCK = U + "input_blocks.1.1."
CASES = {
    # kohya sd-scripts SD1: UNet modules by their diffusers path
    "sd1": (
        [SD1_BLOCK + "proj_in.weight", SD1_BLOCK + "transformer_blocks.0.attn1.to_q.weight",
         SD1_BLOCK + "transformer_blocks.0.attn2.to_k.weight", SD1_BLOCK + "transformer_blocks.0.ff.net.0.proj.weight",
         U + "input_blocks.1.0.in_layers.2.weight"],
        [("lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320, 1, 4, 2.0),
         ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320, 320, None, 8, 16.0),
         ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768, None, 4, 4.0),
         ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj", 2560, 320, None, 4, 2.0),
         ("lora_unet_down_blocks_0_resnets_0_conv1", 320, 320, 3, 2, 1.0)],
        {"ss_base_model_version": "sd_v1"},
    ),
    # kohya sdxl_train_network.py: the SGM UNet's own names
    "sdxl": (
        [U + "input_blocks.4.1.proj_in.weight", U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
         U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", U + "input_blocks.4.0.in_layers.2.weight"],
        [("lora_unet_input_blocks_4_1_proj_in", 640, 640, None, 4, 2.0),
         ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 640, 640, None, 8, 4.0),
         ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048, None, 4, 8.0),
         ("lora_unet_input_blocks_4_0_in_layers_2", 640, 320, 3, 4, 4.0)],
        {"ss_base_model_version": "sdxl_base_v1-0"},
    ),
    # kohya sd-scripts networks/lora_flux.py: BFL names, fused qkv and linear1, the final layer's
    # shift ‖ scale (diffusers' norm_out.linear is scale ‖ shift)
    "flux": (
        # (single_blocks.N.linear1, q ‖ k ‖ v ‖ mlp, is 132 MB in fp16: its four bands are checked without a
        # bake in test_fused_linear1_splits_in_its_four_bands_and_back, and baked on a tiny FLUX.1 below)
        [U + "double_blocks.0.img_attn.qkv.weight", U + "final_layer.adaLN_modulation.1.weight", U + "img_in.weight"],
        [("lora_unet_double_blocks_0_img_attn_qkv", 9216, 3072, None, 4, 2.0),
         ("lora_unet_final_layer_adaLN_modulation_1", 6144, 3072, None, 4, 4.0),
         ("lora_unet_img_in", 3072, 64, None, 8, 8.0)],
        {"ss_base_model_version": "flux1"},
    ),
}


def _lora(modules, seed: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, (stem, n_out, n_in, kernel, rank, alpha) in enumerate(modules):
        spec = (stem, n_out, n_in) + ((kernel,) if kernel else ())
        out.update(make_lora([spec], rank=rank, alpha=alpha, conv3x3=True, seed=seed + i, dtype=torch.float16))
    return out


@pytest.fixture(scope="module")
def family_files(tmp_path_factory):
    """family -> (folder, base path, original LoRA path, cache of bakes by LoRA content and of the base's tensors)."""
    made = {}
    for arch, (keys, modules, meta) in CASES.items():
        folder = tmp_path_factory.mktemp(f"convert-{arch}")
        base = str(folder / "base.safetensors")
        build_checkpoint(base, arch, keys, float_dtype=torch.float16 if arch == "flux" else torch.float32)
        lora = str(folder / "original.safetensors")
        save_file(_lora(modules, seed=7), lora, metadata=meta)
        made[arch] = (folder, base, lora, {})
    return made


def _content(path: str) -> str:
    """What decides a bake: tensor names and bytes, and the PEFT config."""
    sha = hashlib.sha256()
    with safe_open(path, "pt") as f:
        for key in sorted(f.keys()):
            sha.update(key.encode() + f.get_tensor(key).numpy().tobytes())
        sha.update((f.metadata() or {}).get("lora_adapter_metadata", "").encode())
    return sha.hexdigest()


def bake(files, lora: str) -> dict[str, torch.Tensor]:
    folder, base, _, cache = files
    key = _content(lora)
    if key not in cache:
        out = str(folder / f"baked-{key[:12]}.safetensors")
        ops.merge(ops.MergeOptions(base=base, loras=(LoraSpec(lora),), output=out, device="cpu", force=True))
        cache[key] = load_file(out)
        os.unlink(out)
    return cache[key]


def to(src: str, flavour: str, out: str, **kw) -> convert.ConvertResult:
    return convert.run(convert.ConvertOptions(lora=src, output=out, to=flavour, force=True, **kw))


def assert_bakes_alike(got: dict, want: dict, *, exact: bool) -> None:
    assert got.keys() == want.keys()
    for key in want:
        if exact:
            assert torch.equal(got[key], want[key]), key
        else:  # rtol 1e-6, atol 0: equal values pass, so only the others are compared (NaN among them)
            off = got[key] != want[key]
            torch.testing.assert_close(got[key][off].float(), want[key][off].float(), rtol=1e-6, atol=0, msg=key)


def seconds(arch: str, first: str) -> tuple[str, ...]:
    """The flavours the first conversion's output is converted to. FLUX.1 (fused qkv, linear1 and final
    layer: renames, splits and fusions) takes every pair; SD1 and SDXL (renames only) take the way back
    to kohya and the next flavour in FLAVOURS, so each flavour is still read and written on every family."""
    if arch == "flux":
        return FLAVOURS
    return tuple(dict.fromkeys(("kohya", FLAVOURS[(FLAVOURS.index(first) + 1) % len(FLAVOURS)])))


@pytest.mark.parametrize("arch", list(CASES))
@pytest.mark.parametrize("first", FLAVOURS)
def test_round_trip_bakes_like_the_original(family_files, arch, first):
    files = family_files[arch]
    folder, base, original, cache = files
    reference = bake(files, original)
    if "base" not in cache:
        cache["base"] = load_file(base)
    assert any(not torch.equal(reference[k], v) for k, v in cache["base"].items())  # the LoRA changes the base
    mid = str(folder / f"{first}.safetensors")
    res = to(original, first, mid)
    split = "split" in res.counts
    assert_bakes_alike(bake(files, mid), reference, exact=not split)
    for second in seconds(arch, first):
        last = str(folder / f"{first}-{second}.safetensors")
        back = to(mid, second, last)
        assert back.architecture == arch
        assert_bakes_alike(bake(files, last), reference, exact=not (split or "split" in back.counts))


# --- fused <-> split, byte for byte -------------------------------------------------------------------

FLUX_LINEAR1 = [("lora_unet_single_blocks_3_linear1", 21504, 3072, None, 8, 4.0)]
# FLUX.1's linear1 rows: q, k, v (3072 each), then the MLP input (12288): not equal quarters
BANDS = {"attn.to_q": (0, 3072), "attn.to_k": (3072, 6144), "attn.to_v": (6144, 9216), "proj_mlp": (9216, 21504)}


def test_fused_linear1_splits_in_its_four_bands_and_back(tmp_path):
    original = _lora(FLUX_LINEAR1, seed=3)
    src = str(tmp_path / "kohya.safetensors")
    save_file(original, src, metadata={"ss_base_model_version": "flux1"})
    up, down = original["lora_unet_single_blocks_3_linear1.lora_up.weight"], original["lora_unet_single_blocks_3_linear1.lora_down.weight"]

    res = to(src, "diffusers", str(tmp_path / "d.safetensors"))
    split = load_file(str(tmp_path / "d.safetensors"))
    assert res.counts == {"split": 4}
    for name, (start, stop) in BANDS.items():
        stem = f"transformer.single_transformer_blocks.3.{name}"
        assert torch.equal(split[stem + ".lora_A.weight"], down)  # the same down: rank 8 intact
        assert torch.equal(split[stem + ".lora_B.weight"], up[start:stop])
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (config["transformer.r"], config["transformer.lora_alpha"]) == (8, 4)

    # and fused back: downs stacked, ups block-diagonal (rank 4 x 8), alpha/rank kept
    res = to(str(tmp_path / "d.safetensors"), "kohya", str(tmp_path / "k.safetensors"))
    fused = load_file(str(tmp_path / "k.safetensors"))
    assert res.counts == {"fused": 1}
    stem = "lora_unet_single_blocks_3_linear1"
    f_up, f_down, f_alpha = fused[stem + ".lora_up.weight"], fused[stem + ".lora_down.weight"], fused[stem + ".alpha"]
    assert f_up.shape == (21504, 32) and f_down.shape == (32, 3072) and float(f_alpha) / 32 == 4.0 / 8
    order = sorted(BANDS, key=lambda n: f"transformer.single_transformer_blocks.3.{n}")  # input order: by name
    expected_up = torch.zeros(21504, 32, dtype=up.dtype)
    for i, name in enumerate(order):
        start, stop = BANDS[name]
        expected_up[start:stop, 8 * i : 8 * i + 8] = up[start:stop]
        assert torch.equal(f_down[8 * i : 8 * i + 8], down)
    assert torch.equal(f_up, expected_up)


# --- LyCORIS kept where the flavour carries it, refused by name where it cannot ---------------------------

SDXL_MODULES = [("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 640, 640),
                ("lora_unet_input_blocks_4_1_proj_in", 640, 640),
                ("lora_unet_input_blocks_4_0_in_layers_2", 640, 320, 3)]


@pytest.mark.parametrize("algo", ["loha", "lokr", "full", "dora"])
def test_lycoris_modules_keep_their_tensors_through_kohya_and_comfyui(family_files, algo):
    files = family_files["sdxl"]
    folder = files[0]
    extra = {"dora": True} if algo == "dora" else {}
    tensors = make_lora(SDXL_MODULES, algo="lora" if algo == "dora" else algo, rank=4, conv3x3=True, seed=11,
                        bias=False, **extra)
    src = str(folder / f"{algo}.safetensors")
    save_file(tensors, src, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    comfy, back = str(folder / f"{algo}-comfy.safetensors"), str(folder / f"{algo}-back.safetensors")
    to(src, "comfyui", comfy)
    to(comfy, "kohya", back)
    assert load_file(back).keys() == tensors.keys()
    for key, value in load_file(back).items():
        assert torch.equal(value, tensors[key]), key  # the same bytes under the same names
    assert any(k.startswith("diffusion_model.input_blocks.4.1.") for k in load_file(comfy))
    assert_bakes_alike(bake(files, comfy), bake(files, src), exact=True)


def test_a_strength_goes_into_the_part_each_lycoris_change_is_linear_in(tmp_path):
    """`convert LORA:0.5`: LoHa, LoKr and full-diff modules (with their bias deltas) change by exactly half their
    textbook ΔW; a DoRA module's rescale is not linear in its factors, so a strength other than 1 or 0 is refused."""
    from tests.test_loratools import raw_delta

    meta = {"ss_base_model_version": "sdxl_base_v1-0"}
    algos = dict(zip((stem for stem, *_ in SDXL_MODULES), ("loha", "lokr", "full")))  # one file, a type per module
    tensors = {}
    for module in SDXL_MODULES:
        tensors.update(make_lora([module], algo=algos[module[0]], rank=4, conv3x3=True, seed=11))
    src, out = str(tmp_path / "lyco.safetensors"), str(tmp_path / "lyco-half.safetensors")
    save_file(tensors, src, metadata=meta)
    res = to(src, "kohya", out, strength=0.5)
    got = load_file(out)
    assert got.keys() == tensors.keys() and len(res.weighted) == len(SDXL_MODULES)
    assert any(k.endswith(".diff_b") for k in tensors)
    for stem, algo in algos.items():
        torch.testing.assert_close(raw_delta(got, stem, algo), 0.5 * raw_delta(tensors, stem, algo), rtol=1e-6, atol=0)
        if stem + ".diff_b" in tensors:
            assert torch.equal(got[stem + ".diff_b"], tensors[stem + ".diff_b"] * 0.5)
    src = str(tmp_path / "dora.safetensors")
    save_file(make_lora(SDXL_MODULES[:1], rank=4, dora=True, seed=3), src, metadata=meta)
    with pytest.raises(LoraFormatError, match="is DoRA: its change is not linear in its factors"):
        to(src, "kohya", str(tmp_path / "d.safetensors"), strength=0.5)
    assert not (tmp_path / "d.safetensors").exists()


def test_dora_goes_to_peft_names_and_back(family_files):
    files = family_files["sdxl"]
    folder = files[0]
    tensors = make_lora(SDXL_MODULES[:2], rank=4, alpha=2.0, dora=True, seed=12)
    src = str(folder / "dora-kohya.safetensors")
    save_file(tensors, src, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    peft_file, back = str(folder / "dora-peft.safetensors"), str(folder / "dora-back.safetensors")
    to(src, "peft", peft_file)
    with safe_open(peft_file, "pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["use_dora"] is True
        assert f.get_tensor("base_model.model.down_blocks.1.attentions.0.proj_in.lora_magnitude_vector").shape == (640,)
    to(peft_file, "kohya", back)
    assert_bakes_alike(bake(files, peft_file), bake(files, src), exact=True)
    assert_bakes_alike(bake(files, back), bake(files, src), exact=True)


@pytest.mark.parametrize("algo, flavour", [("loha", "peft"), ("loha", "diffusers"), ("lokr", "aitoolkit"),
                                           ("full", "diffusers")])
def test_what_a_flavour_cannot_carry_is_refused_by_name(tmp_path, algo, flavour):
    src = str(tmp_path / "lyco.safetensors")
    save_file(make_lora(SDXL_MODULES[:2], algo=algo, rank=4, seed=1), src, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    out = tmp_path / "out.safetensors"
    code, _, err = run_main(["convert", src, "--to", flavour, "-o", str(out)])
    assert code == 1 and not out.exists() and not list(tmp_path.glob(".*lorabake-tmp*"))
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and src in lines[0], err
    assert "module 'lora_unet_input_blocks_4_1_proj_in'" in lines[0]  # the first module in the file
    assert f"which {flavour} files cannot carry" in lines[0]


def test_lokr_that_peft_cannot_rebuild_is_refused_by_name(tmp_path):
    """LoKr goes to PEFT names only as PEFT's LoKrConfig rebuilds it (tests/test_convert_loaders.py): not on a conv
    weight, not with factors PEFT lays out otherwise, not next to LoRA modules (one config type per model)."""
    meta = {"ss_base_model_version": "sdxl_base_v1-0"}
    conv, linear = SDXL_MODULES[2], SDXL_MODULES[0]
    cases = [
        (make_lora([conv], algo="lokr", rank=4, conv3x3=True, seed=1), "is LoKr on a conv weight"),
        # w2 factored at a rank PEFT would store whole (r ≥ max(b, d)/2: 640 = 20·32, so r ≥ 16)
        (make_lora([linear], algo="lokr", rank=16, seed=1), "factors PEFT's LoKrConfig cannot rebuild"),
        ({**make_lora([linear], algo="lokr", rank=4, seed=1), **make_lora([SDXL_MODULES[1]], rank=4, seed=2)},
         "has LoRA and LoKr modules"),
    ]
    for i, (tensors, message) in enumerate(cases):
        src = str(tmp_path / f"lokr{i}.safetensors")
        save_file(tensors, src, metadata=meta)
        with pytest.raises(LoraFormatError, match=message):
            to(src, "peft", str(tmp_path / "p.safetensors"))
        assert not (tmp_path / "p.safetensors").exists()


def test_loha_on_a_band_of_a_fused_weight_cannot_be_fused_and_says_so(tmp_path):
    # LyCORIS LoHa trained on diffusers' FLUX.1 (separate to_q/to_k/to_v): kohya names the fused qkv only
    src = str(tmp_path / "loha-flux.safetensors")
    mods = [(f"transformer.transformer_blocks.0.attn.to_{p}", 3072, 3072) for p in "qkv"]
    save_file(make_lora(mods, algo="loha", rank=4, seed=1), src, metadata={"ss_base_model_version": "flux1"})
    with pytest.raises(LoraFormatError, match="is LoHa; in kohya names it would have to be fused with other modules"):
        to(src, "kohya", str(tmp_path / "k.safetensors"))
    assert not (tmp_path / "k.safetensors").exists()


def test_text_encoder_modules_have_no_peft_home(tmp_path):
    src = str(tmp_path / "te.safetensors")
    mods = [("lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320, 1),
            ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)]
    save_file(make_lora(mods, rank=4, seed=2), src, metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(LoraFormatError, match="te1 component, which peft files do not hold"):
        to(src, "peft", str(tmp_path / "p.safetensors"))
    res = to(src, "diffusers", str(tmp_path / "d.safetensors"))  # diffusers files hold it: text_encoder.
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in load_file(str(tmp_path / "d.safetensors"))
    assert res.counts == {"renamed": 2}
    res = to(str(tmp_path / "d.safetensors"), "comfyui", str(tmp_path / "c.safetensors"))
    assert "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight" in load_file(str(tmp_path / "c.safetensors"))


# --- metadata, the command line, the output's safety ------------------------------------------------------


def test_output_metadata_names_input_hash_and_flavour(family_files, tmp_path):
    from lorabake.provenance import file_sha256

    _, _, original, _ = family_files["sdxl"]
    out = str(tmp_path / "d.safetensors")
    code, stdout, err = run_main(["convert", original, "--to", "diffusers", "-o", out, "--json"])
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["counts"] == {"renamed": 4} and doc["architecture"] == "sdxl"
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    prov = json.loads(meta["lorabake.convert"])
    assert prov["input"] == {"file": "original.safetensors", "data_sha256": file_sha256(original, data_only=True),
                             "strength": 1.0}
    assert prov["dtype"] == "keep" and prov["removed"] == prov["weighted"] == 0
    assert prov["to"] == "diffusers" and prov["alpha"] == "lora_adapter_metadata"
    assert meta["sshs_model_hash"] == file_sha256(out, data_only=True) == doc["data_sha256"]
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"  # the input's, kept
    assert meta["modelspec.architecture"].endswith("/lora")


def test_existing_output_needs_force_and_stays_untouched(family_files, tmp_path):
    _, _, original, _ = family_files["sd1"]
    out = tmp_path / "taken.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = run_main(["convert", original, "--to", "comfyui", "-o", str(out)])
    assert code == 1 and out.read_bytes() == b"keep me" and err.startswith("Error: ")
    code, stdout, err = run_main(["convert", original, "--to", "comfyui", "-o", str(out), "--force"])
    assert code == 0 and "5 renamed" in stdout
    assert all(k.startswith("diffusion_model.input_blocks.1.") for k in load_file(str(out)))


def test_like_base_of_another_family_is_refused_by_module(family_files, tmp_path):
    _, sd1_base, _, _ = family_files["sd1"]
    _, _, sdxl_lora, _ = family_files["sdxl"]
    code, _, err = run_main(["convert", sdxl_lora, "--to", "kohya", "--like", sd1_base, "-o", str(tmp_path / "x.safetensors")])
    assert code == 1 and "matches no module of the base" in err and "(sd1)" in err
    assert not (tmp_path / "x.safetensors").exists()


# --- every family of the registry: to each flavour and back, ΔW unchanged -----------------------------------


def _family_lora(family, count: int = 10) -> tuple[dict[str, torch.Tensor], dict]:
    """Rank-2 kohya-named modules on `count` weights of the family's diffusion model, spread over its
    blocks (the names its trainers write, from the family's rule table), real shapes."""
    from lorabake.detect import detect_checkpoint
    from lorabake.keymap import build_keymap
    from lorabake.lora_base import virtual_checkpoint

    header = virtual_checkpoint(family)
    keymap = build_keymap(header, detect_checkpoint(header))
    keys = [k for k, stems in keymap.kohya_names.items()
            if len(header[k].shape) == 2 and keymap.targets[stems[0]].component == family.diffusion]
    gen = torch.Generator().manual_seed(len(keys))
    tensors: dict[str, torch.Tensor] = {}
    for key in keys[:: max(1, len(keys) // count)][:count]:
        for stem in keymap.kohya_names[key]:
            target = keymap.targets[stem]
            rows = target.slice.length if target.slice else header[key].shape[0]
            tensors[stem + ".lora_down.weight"] = torch.randn(2, header[key].shape[1], generator=gen)
            tensors[stem + ".lora_up.weight"] = torch.randn(rows, 2, generator=gen)
            tensors[stem + ".alpha"] = torch.tensor(1.0)
    return tensors, {"ss_base_model_version": family.kohya, "modelspec.architecture": family.modelspec + "/lora"}


def _products(tensors: dict[str, torch.Tensor], probe: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """stem -> scale·ΔW·P for a random probe P (ΔW·P equal for every P ⇔ ΔW equal), without forming ΔW."""
    out = {}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            stem = key[: -len(".lora_down.weight")]
            up, alpha = tensors[stem + ".lora_up.weight"], tensors.get(stem + ".alpha")
            scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
            out[stem] = scale * (up.double() @ (down.double() @ probe[down.shape[1]]))
    return out


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_every_family_converts_to_each_flavour_and_back(tmp_path, arch):
    family = FAMILIES[arch]
    if not family.structures:
        pytest.skip("no declared structure to take names from")
    tensors, meta = _family_lora(family)
    src = str(tmp_path / "original.safetensors")
    save_file(tensors, src, metadata=meta)
    probe = {n: torch.randn(n, 3, dtype=torch.float64) for n in {t.shape[1] for k, t in tensors.items() if k.endswith(".lora_down.weight")}}
    want = _products(tensors, probe)
    for flavour in FLAVOURS:
        there, back = str(tmp_path / f"{flavour}.safetensors"), str(tmp_path / f"{flavour}-back.safetensors")
        to(src, flavour, there)
        to(there, "kohya", back)
        got = _products(load_file(back), probe)
        assert got.keys() == want.keys(), flavour
        for stem in want:
            torch.testing.assert_close(got[stem], want[stem], rtol=1e-9, atol=1e-12, msg=f"{flavour}: {stem}")


def test_gqa_fused_qkv_splits_by_the_weights_rows_not_thirds(tmp_path):
    # SimpleTuner/LyCORIS train Krea 2's attention as one `attn.to_qkv` (ComfyUI comfy/lora_convert.py splits
    # it); the checkpoint stores wq [6144, 6144], wk and wv [1536, 6144] (grouped-query attention)
    src = str(tmp_path / "qkv.safetensors")
    stem = "transformer.transformer_blocks.0.attn.to_qkv"
    original = make_lora([(stem, 6144 + 2 * 1536, 6144)], naming="peft", rank=4, alpha=2.0, seed=5)
    save_file(original, src, metadata={"modelspec.architecture": FAMILIES["krea2"].modelspec + "/lora"})
    res = to(src, "kohya", str(tmp_path / "k.safetensors"))
    assert res.architecture == "krea2" and res.counts == {"split": 3}
    split = load_file(str(tmp_path / "k.safetensors"))
    up, down = original[stem + ".lora_B.weight"], original[stem + ".lora_A.weight"]
    for name, (start, stop) in {"wq": (0, 6144), "wk": (6144, 7680), "wv": (7680, 9216)}.items():
        assert torch.equal(split[f"lora_unet_blocks_0_attn_{name}.lora_up.weight"], up[start:stop])
        assert torch.equal(split[f"lora_unet_blocks_0_attn_{name}.lora_down.weight"], down)
        assert float(split[f"lora_unet_blocks_0_attn_{name}.alpha"]) == 2.0
