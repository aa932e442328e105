"""Per-block strengths (`--lora FILE:S@BLOCKS`): each weight gets the multiplier of the block it sits in.

The expected block of a weight is worked out here from its LDM/BFL key with sd-webui-lora-block-weight's
own rule (the `input_blocks_N_` / `middle_block_` / `output_blocks_N_` substrings of the kohya name;
`double_blocks`/`single_blocks`, `_in`, `final_layer` for FLUX), and its vectors (BLOCKID17/26, the
presets) are copied from that extension's source as data. lorabake's answer comes from the family
tables through every naming; the two must agree, and the baked tensors must equal W + m·s·ΔW.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorabake import block_spec
from tests.archfix import build_checkpoint, select
from tests.cli_helpers import run_main
from tests.lorafix import make_lora, save_lora

U = "model.diffusion_model."
# sd-webui-lora-block-weight: BLOCKID17 / BLOCKID26 and two of its presets
BLOCKID26 = ["BASE", *(f"IN{n:02d}" for n in range(12)), "M00", *(f"OUT{n:02d}" for n in range(12))]
BLOCKID17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
             "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]
OUTD = [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0]
INALL = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]

SD1_PARTS = [  # blocks with attention, one resnet-only block, the mid block, and a module in no block
    r"model\.diffusion_model\.input_blocks\.1\.1\.proj_in\.",
    r"model\.diffusion_model\.input_blocks\.1\.1\.transformer_blocks\.0\.attn2\.to_k\.",  # tells SD1
    r"model\.diffusion_model\.input_blocks\.4\.1\.proj_out\.",
    r"model\.diffusion_model\.input_blocks\.3\.0\.op\.",
    r"model\.diffusion_model\.middle_block\.1\.proj_in\.",
    r"model\.diffusion_model\.output_blocks\.3\.1\.proj_out\.",
    r"model\.diffusion_model\.output_blocks\.6\.1\.proj_in\.",
    r"model\.diffusion_model\.output_blocks\.11\.1\.proj_out\.",
    r"model\.diffusion_model\.time_embed\.0\.",
    r"cond_stage_model\.transformer\.text_model\.encoder\.layers\.0\.self_attn\.q_proj\.",
]
# diffusers' names for a few of them (what kohya's own SD1 LoRAs use)
DIFFUSERS_NAMES = {
    "input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in",
    "input_blocks.4.1.proj_out": "down_blocks.1.attentions.0.proj_out",
    "middle_block.1.proj_in": "mid_block.attentions.0.proj_in",
    "output_blocks.3.1.proj_out": "up_blocks.1.attentions.0.proj_out",
    "output_blocks.11.1.proj_out": "up_blocks.3.attentions.2.proj_out",
}


def lbw_block(key: str) -> str | None:
    """The extension's rule on the LDM key: the block whose name is a substring; None: not picked."""
    flat = key.replace(".", "_")
    if "encoder" in flat and not flat.startswith("model_diffusion_model"):
        return "BASE"
    for name, pattern in (("IN", r"diffusion_model_input_blocks_(\d+)_"), ("OUT", r"diffusion_model_output_blocks_(\d+)_")):
        m = re.search(pattern, flat)
        if m:
            return f"{name}{int(m[1]):02d}"
    return "M00" if "diffusion_model_middle_block_" in flat else None


def vector_factor(ids: list[str], values: list[float], block: str | None) -> float:
    if block is None:
        return 1.0  # not picked: the extension leaves the module at its strength
    return values[ids.index(block)] if block in ids else 0.0  # to26(): blocks the vector lacks get 0


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    base = str(folder / "sd1.safetensors")
    tensors = build_checkpoint(base, "sd1", select("sd1", SD1_PARTS), float_dtype=torch.float32)
    modules, stems = [], {}
    for key, t in tensors.items():
        if not key.endswith(".weight") or t.ndim < 2:
            continue
        module = key[: -len(".weight")]
        if module.startswith(U):
            rel = module[len(U):]
            stem = "lora_unet_" + DIFFUSERS_NAMES.get(rel, rel).replace(".", "_")
        else:
            stem = "lora_te_" + module[len("cond_stage_model.transformer."):].replace(".", "_")
        stems[stem] = key
        modules.append((stem, *t.shape))
    lora_tensors = make_lora(modules, rank=4, alpha=2.0, conv3x3=True)
    lora = save_lora(str(folder / "lora.safetensors"), lora_tensors, {})
    return base, tensors, lora, lora_tensors, stems


def delta_of(lora_tensors, stem, shape) -> torch.Tensor:
    up = lora_tensors[stem + ".lora_up.weight"].double()
    down = lora_tensors[stem + ".lora_down.weight"].double()
    rank = down.shape[0]
    return ((up.flatten(1) @ down.flatten(1)).reshape(shape) * (2.0 / rank))


def check_bake(out, tensors, lora_tensors, stems, strength, factor_of):
    merged = load_file(out)
    for stem, key in stems.items():
        expected = tensors[key].double() + strength * factor_of(key) * delta_of(lora_tensors, stem, tensors[key].shape)
        torch.testing.assert_close(merged[key].double(), expected, rtol=0, atol=2e-6, msg=key)
    touched = set(stems.values())
    for key, t in tensors.items():
        if key not in touched:
            assert torch.equal(merged[key], t), key


@pytest.mark.parametrize("blocks, ids, values", [
    ("OUTD", BLOCKID17, OUTD),
    ("INALL", BLOCKID17, INALL),
    (",".join(str(v) for v in INALL), BLOCKID17, INALL),
    (",".join(f"{i / 10:g}" for i in range(26)), BLOCKID26, [i / 10 for i in range(26)]),
], ids=["OUTD", "INALL", "17-values", "26-values"])
def test_sd1_vectors_follow_the_block_weight_extension(tmp_path, sd1, blocks, ids, values):
    base, tensors, lora, lora_tensors, stems = sd1
    assert {lbw_block(k) for k in stems.values()} >= {"BASE", "IN01", "IN03", "IN04", "M00", "OUT03", "OUT06", "OUT11", None}
    out = str(tmp_path / "out.safetensors")
    code, stdout, err = run_main(["merge", base, "--lora", f"{lora}:0.8@{blocks}", "-o", out, "--dtype", "fp32"])
    assert code == 0, err
    assert f"blocks {blocks}:" in stdout
    check_bake(out, tensors, lora_tensors, stems, 0.8, lambda key: vector_factor(ids, values, lbw_block(key)))
    with safe_open(out, "pt") as f:
        recorded = json.loads(f.metadata()["lorabake.loras"])
    assert recorded[0]["blocks"] == blocks


def test_sd1_named_items_and_streams(tmp_path, sd1):
    base, tensors, lora, lora_tensors, stems = sd1
    spec = "IN:1-3=0.25,IN04=3,OUT:*=-1,te=0.5,other=0"
    out = str(tmp_path / "out.safetensors")
    code, _, err = run_main(["merge", base, "--lora", f"{lora}@{spec}", "-o", out, "--dtype", "fp32", "--json"])
    assert code == 0, err

    def factor(key):
        block = lbw_block(key)
        if block == "BASE":
            return 0.5
        if block is None:
            return 0.0
        if block == "IN04":
            return 3.0
        if block.startswith("IN") and int(block[2:]) <= 3:
            return 0.25
        return -1.0 if block.startswith("OUT") else 1.0

    check_bake(out, tensors, lora_tensors, stems, 1.0, factor)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """FLUX.1 in BFL layout; a PEFT LoRA in diffusers names (fused qkv band, modulation, embedder, final layer)."""
    folder = tmp_path_factory.mktemp("flux")
    base = str(folder / "flux.safetensors")
    keys = [U + k for k in (
        "double_blocks.0.img_attn.qkv.weight", "double_blocks.8.img_attn.proj.weight",
        "single_blocks.0.modulation.lin.weight", "single_blocks.37.modulation.lin.weight",
        "img_in.weight", "final_layer.linear.weight",
    )]
    tensors = build_checkpoint(base, "flux", keys, float_dtype=torch.bfloat16)
    names = {  # diffusers module -> (BFL key, row band)
        "transformer_blocks.0.attn.to_q": (keys[0], slice(0, 3072)),
        "transformer_blocks.0.attn.to_v": (keys[0], slice(6144, 9216)),
        "transformer_blocks.8.attn.to_out.0": (keys[1], None),
        "single_transformer_blocks.0.norm.linear": (keys[2], None),
        "single_transformer_blocks.37.norm.linear": (keys[3], None),
        "x_embedder": (keys[4], None),
        "proj_out": (keys[5], None),
    }
    modules = []
    for name, (key, rows) in names.items():
        out_dim = 3072 if rows is not None else tensors[key].shape[0]
        modules.append(("transformer." + name, out_dim, tensors[key].shape[1]))
    lora_tensors = make_lora(modules, rank=4, naming="peft", alpha=None)
    lora = save_lora(str(folder / "flux_lora.safetensors"), lora_tensors, {})
    return base, tensors, lora, lora_tensors, names


def bfl_block(key: str) -> str:
    """The extension's get_flux_blocks() on a BFL key."""
    m = re.search(r"(double|single)_blocks\.(\d+)\.", key)
    if m:
        return f"{m[1]}{m[2]}"
    return "OUT" if "final_layer" in key else "IN"


def test_flux_streams_by_index(tmp_path, flux):
    base, tensors, lora, lora_tensors, names = flux
    out = str(tmp_path / "out.safetensors")
    spec = "double:0-7=0,single:*=0.5,OUT=2"
    code, _, err = run_main(["merge", base, "--lora", f"{lora}:1.5@{spec}", "-o", out, "--dtype", "fp32"])
    assert code == 0, err
    factors = {"double0": 0.0, "double8": 1.0, "single0": 0.5, "single37": 0.5, "IN": 1.0, "OUT": 2.0}
    merged = load_file(out)
    expected = {key: tensors[key].double() for key, _ in names.values()}
    for name, (key, rows) in names.items():
        up = lora_tensors[f"transformer.{name}.lora_B.weight"].double()
        down = lora_tensors[f"transformer.{name}.lora_A.weight"].double()
        dw = 1.5 * factors[bfl_block(key)] * (up @ down)
        if rows is None:
            expected[key] += dw
        else:
            expected[key][rows] += dw
    for key, want in expected.items():  # assert_close(rtol=0, atol=3e-6) without its copies (94 M values here)
        got = merged[key].double()
        assert got.shape == want.shape, key
        diff = got.sub_(want).abs_()
        assert bool((diff <= 3e-6).all()), f"{key}: max |diff| {diff.max().item()}"  # NaN fails too


def test_every_block_at_zero_is_a_noop_error(tmp_path, flux):
    base, _, lora, _, _ = flux
    out = tmp_path / "out.safetensors"
    code, _, err = run_main(["merge", base, "--lora", f"{lora}@*=0,other=0", "-o", str(out)])
    assert code == 1, err
    assert "changes no tensor" in err and "*=0,other=0" in err
    assert not out.exists()


@pytest.mark.parametrize("blocks, fragment", [
    ("NOPE", "no preset 'NOPE'"),
    ("1,0,1", "3 values"),
    ("double:0-40=0", "double has blocks 0-8, not 0-40"),
    ("triple:*=1", "no stream 'triple'"),
    ("IN04=1", "no block 'IN04'"),
    ("te2=0", "no te2"),
    ("double:5-2=1", "runs backwards"),
    ("double:0-1=x", "value 'x' in block spec 'double:0-1=x' is not a number"),
    ("double=1", "no block 'double'"),
])
def test_bad_block_specs_are_one_usage_line(tmp_path, flux, blocks, fragment):
    base, _, lora, _, _ = flux
    out = tmp_path / "out.safetensors"
    code, _, err = run_main(["merge", base, "--lora", f"{lora}@{blocks}", "-o", str(out)])
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], err
    assert not out.exists()


def test_split_keeps_at_signs_that_belong_to_paths():
    assert block_spec.split("a.safetensors:0.8@OUTD") == ("a.safetensors:0.8", "OUTD")
    assert block_spec.split("a.safetensors@double:0-7=0,single:*=1") == ("a.safetensors", "double:0-7=0,single:*=1")
    assert block_spec.split("me@host/a.safetensors") == ("me@host/a.safetensors", None)
    assert block_spec.split("v@2.safetensors") == ("v@2.safetensors", None)
    assert block_spec.split("@OUTD") == ("@OUTD", None)


def test_recipe_entries_carry_blocks(tmp_path, sd1):
    base, tensors, lora, lora_tensors, stems = sd1
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[[bake]]\nbase = "{base}"\nloras = ["{lora}:0.8@OUTD"]\noutput = "a.safetensors"\ndtype = "fp32"\n\n'
        f'[[bake]]\nbase = "{base}"\nloras = [{{ path = "{lora}", strength = 0.8, blocks = "OUTD" }}]\n'
        'output = "b.safetensors"\ndtype = "fp32"\n'
    )
    code, _, err = run_main(["bake", str(recipe), "--quiet"])
    assert code == 0, err
    for name in ("a.safetensors", "b.safetensors"):
        check_bake(str(tmp_path / name), tensors, lora_tensors, stems, 0.8,
                   lambda key: vector_factor(BLOCKID17, OUTD, lbw_block(key)))
        with safe_open(str(tmp_path / name), "pt") as f:
            entry = json.loads(f.metadata()["lorabake.recipe"])
        assert entry["loras"] == [f"{lora}:0.8@OUTD"]


def test_combine_with_blocks_bakes_like_merge_with_blocks(tmp_path, sd1):
    """One LoRA made with @OUTD bakes to what baking the original @OUTD gives; removed blocks are left out."""
    base, tensors, lora, lora_tensors, stems = sd1
    combined = str(tmp_path / "outd.safetensors")
    code, _, err = run_main(["combine", f"{lora}:0.8@OUTD", "-o", combined, "--dtype", "fp32"])
    assert code == 0, err
    kept = {k.split(".")[0] for k in load_file(combined)}
    expected_kept = {stem for stem, key in stems.items() if vector_factor(BLOCKID17, OUTD, lbw_block(key)) != 0}
    assert kept == expected_kept
    out = str(tmp_path / "out.safetensors")
    code, _, err = run_main(["merge", base, "--lora", combined, "-o", out, "--dtype", "fp32"])
    assert code == 0, err
    check_bake(out, tensors, lora_tensors, stems, 0.8, lambda key: vector_factor(BLOCKID17, OUTD, lbw_block(key)))


def test_inspect_blocks_gives_each_blocks_share_of_the_change(sd1):
    _, tensors, lora, lora_tensors, stems = sd1
    code, out, err = run_main(["inspect", lora, "--blocks", "--json"])
    assert code == 0, err
    doc = json.loads(out)["files"][0]["block_energy"]
    assert doc["architecture"] == "sd1" and doc["unmeasured"] == []
    want: dict[str, float] = {}
    for stem, key in stems.items():
        block = lbw_block(key)
        name = "te1" if block == "BASE" else (block or "(no block)")
        want[name] = want.get(name, 0.0) + float(delta_of(lora_tensors, stem, tensors[key].shape).pow(2).sum())
    total = sum(want.values())
    got = {row["block"]: row["share"] for row in doc["blocks"]}
    assert got.keys() == want.keys()
    for name, energy in want.items():
        assert got[name] == pytest.approx(energy / total, rel=1e-9), name
    code, text, err = run_main(["inspect", lora, "--blocks"])
    assert code == 0 and "energy per block (sd1" in text and "OUT11" in text, err


def test_stream_names_singular_or_plural(flux):
    from lorabake import blocks

    present = {"double0", "double1", "single0"}
    a = blocks.resolve("doubles:1-1=0", "flux", present, set(), lora="x")
    b = blocks.resolve("double:1-1=0", "flux", present, set(), lora="x")
    assert a.by_block == b.by_block == {"double1": 0.0}


# sd-webui-lora-block-weight: BLOCKID12 (SDXL, attention blocks) and BLOCKID20 (every block)
BLOCKID12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
BLOCKID20 = ["BASE", *(f"IN{n:02d}" for n in range(9)), "M00", *(f"OUT{n:02d}" for n in range(9))]
SDXL_PARTS = [  # every attention block's proj_in, one resnet at each end, the detection probe
    r"model\.diffusion_model\.(input_blocks\.[4578]|middle_block|output_blocks\.[0-5])\.1\.proj_in\.weight",
    r"model\.diffusion_model\.input_blocks\.4\.1\.transformer_blocks\.0\.attn2\.to_k\.weight",
    r"model\.diffusion_model\.(input_blocks\.1|output_blocks\.8)\.0\.in_layers\.2\.weight",
]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    base = str(folder / "sdxl.safetensors")
    tensors = build_checkpoint(base, "sdxl", select("sdxl", SDXL_PARTS), float_dtype=torch.float32)
    stems = {"lora_unet_" + k[len(U):-len(".weight")].replace(".", "_"): k for k in tensors}
    lora_tensors = make_lora([(s, *tensors[k].shape) for s, k in stems.items()], rank=4, alpha=2.0, conv3x3=True)
    lora = save_lora(str(folder / "lora.safetensors"), lora_tensors, {})
    return base, tensors, lora, lora_tensors, stems


@pytest.mark.parametrize("blocks, ids, values", [
    ("OUTD", BLOCKID12, [1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0]),  # lorabake's SDXL OUTD: OUT00-OUT02
    ("0.5,1,2,3,4,5,6,7,8,9,10,11", BLOCKID12, [0.5, *range(1, 12)]),
    (",".join(str(i) for i in range(20)), BLOCKID20, list(range(20))),
], ids=["OUTD", "12-values", "20-values"])
def test_sdxl_vectors_bake_exactly_the_blocks_asked(tmp_path, sdxl, blocks, ids, values):
    base, tensors, lora, lora_tensors, stems = sdxl
    out = str(tmp_path / "out.safetensors")
    code, _, err = run_main(["merge", base, "--lora", f"{lora}:0.8@{blocks}", "-o", out, "--dtype", "fp32"])
    assert code == 0, err
    check_bake(out, tensors, lora_tensors, stems, 0.8, lambda key: vector_factor(ids, values, lbw_block(key)))


def test_convert_with_blocks_bakes_like_merge_with_blocks(tmp_path, sdxl):
    """`convert LORA:0.8@OUTD` to diffusers names bakes to W + s·m·ΔW, the tensors `merge --lora LORA:0.8@OUTD`
    gives (test_sdxl_vectors_bake_exactly_the_blocks_asked[OUTD]: same fixture, same check); removed blocks are not
    written; `--dtype fp16` rounds the same factors once."""
    base, tensors, lora, lora_tensors, stems = sdxl
    ids, values = BLOCKID12, [1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    factor = lambda key: vector_factor(ids, values, lbw_block(key))  # noqa: E731
    converted = str(tmp_path / "outd.safetensors")
    code, stdout, err = run_main(["convert", f"{lora}:0.8@OUTD", "--to", "diffusers", "-o", converted, "--json"])
    assert code == 0, err
    doc = json.loads(stdout)
    kept = {stem for stem, key in stems.items() if factor(key) != 0}
    assert set(doc["removed"]) == set(stems) - kept and set(doc["weighted"]) == kept
    assert len(load_file(converted)) == 2 * len(kept)  # lora_A and lora_B of each kept module, nothing else
    with safe_open(converted, "pt") as f:
        prov = json.loads(f.metadata()["lorabake.convert"])
    assert prov["input"]["blocks"] == "OUTD" and prov["input"]["strength"] == 0.8
    baked = str(tmp_path / "baked.safetensors")
    assert run_main(["merge", base, "--lora", converted, "-o", baked, "--dtype", "fp32"])[0] == 0
    check_bake(baked, tensors, lora_tensors, stems, 0.8, factor)
    half = str(tmp_path / "half.safetensors")
    code, _, err = run_main(["convert", f"{lora}:0.8@OUTD", "--to", "diffusers", "-o", half, "--dtype", "fp16"])
    assert code == 0, err
    full, small = load_file(converted), load_file(half)
    assert small.keys() == full.keys()
    for key, t in small.items():
        assert t.dtype == torch.float16 and torch.equal(t, full[key].to(torch.float16)), key


def test_convert_with_a_flux_block_list_folds_into_fused_bands(tmp_path, flux):
    """diffusers to_q/to_v of double0 are fused into kohya's qkv with their block's 0.5 in their bands; single0 at 0
    is left out. Each kohya module's ΔW (alpha/rank · up@down, on the BFL weight it names) is s·m·ΔW of the
    original, block by block: what merge with the same list adds (test_flux_streams_by_index), without a
    FLUX-size bake."""
    _, tensors, lora, lora_tensors, names = flux
    spec = "double:0-7=0.5,single:0-10=0,OUT=2"
    factors = {"double0": 0.5, "double8": 1.0, "single0": 0.0, "single37": 1.0, "IN": 1.0, "OUT": 2.0}
    converted = str(tmp_path / "k.safetensors")
    code, _, err = run_main(["convert", f"{lora}:1.5@{spec}", "--to", "kohya", "-o", converted])
    assert code == 0, err
    got = load_file(converted)
    g = torch.Generator().manual_seed(0)
    probe = {n: torch.randn(n, 8, generator=g, dtype=torch.float64) for n in (64, 3072)}  # ΔW·X identifies ΔW
    expected: dict[str, torch.Tensor] = {}
    for name, (key, rows) in names.items():
        if factors[bfl_block(key)] == 0:
            continue
        up = lora_tensors[f"transformer.{name}.lora_B.weight"].double()
        down = lora_tensors[f"transformer.{name}.lora_A.weight"].double()
        dwx = expected.setdefault(key, torch.zeros(tensors[key].shape[0], 8, dtype=torch.float64))
        dwx[rows if rows is not None else slice(None)] += 1.5 * factors[bfl_block(key)] * (up @ (down @ probe[down.shape[1]]))
    stems = {"lora_unet_" + key[len(U):-len(".weight")].replace(".", "_"): key for key in expected}
    assert {k.split(".")[0] for k in got} == set(stems)
    for stem, key in stems.items():
        up, down = got[stem + ".lora_up.weight"].double(), got[stem + ".lora_down.weight"].double()
        scale = float(got[stem + ".alpha"]) / down.shape[0] if stem + ".alpha" in got else 1.0
        want = expected[key]  # the folded 1.5·m is rounded once to the factors' fp32: compare at fp32's precision
        torch.testing.assert_close(scale * up @ (down @ probe[down.shape[1]]), want, rtol=0,
                                   atol=1e-6 * float(want.abs().max()), msg=key)
