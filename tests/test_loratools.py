"""combine and resize: stacking is exact, reduction is the Eckart–Young optimum, and the files bake right.

The optimum is checked against torch's SVD of the *dense* ΔW (never through `lowrank`'s factored
path), and the end-to-end cases bake the combined file and the pair of inputs into the same
real-shaped SDXL base with `lorabake merge`, tensor by tensor.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorabake import loratools, lowrank, ops
from lorabake.errors import LoraFormatError, UsageError
from lorabake.plan import LoraSpec
from tests.archfix import build_checkpoint
from tests.cli_helpers import run_main
from tests.lorafix import make_lora

UNET = "model.diffusion_model."
BLOCK = UNET + "input_blocks.4.1."  # SDXL level 1: width 640, cross-attention K/V from 2048
SUBSET = [
    BLOCK + "proj_in.weight",
    BLOCK + "transformer_blocks.0.attn1.to_q.weight",
    BLOCK + "transformer_blocks.0.attn2.to_k.weight",  # detection probe
    BLOCK + "transformer_blocks.0.ff.net.0.proj.weight",  # [5120, 640]
    UNET + "input_blocks.4.0.in_layers.2.weight",  # 3x3 conv [640, 320, 3, 3]
]
# kohya sdxl_train_network.py names the SGM UNet modules as the checkpoint does
K = "lora_unet_input_blocks_4_1_"
MODULES_A = [
    (K + "proj_in", 640, 640, 1),
    (K + "transformer_blocks_0_attn1_to_q", 640, 640),
    (K + "transformer_blocks_0_ff_net_0_proj", 5120, 640),
    ("lora_unet_input_blocks_4_0_in_layers_2", 640, 320, 3),
]
MODULES_B = [
    (K + "transformer_blocks_0_attn1_to_q", 640, 640),
    (K + "transformer_blocks_0_attn2_to_k", 640, 2048),
    (K + "transformer_blocks_0_ff_net_0_proj", 5120, 640),
]
SDXL_META = {"ss_base_model_version": "sdxl_base_v1-0"}


def dense(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return up.double() @ down.double()


def test_stack_is_the_exact_weighted_sum():
    g = torch.Generator().manual_seed(0)
    terms = [(c, torch.randn(30, r, generator=g, dtype=torch.float64), torch.randn(r, 20, generator=g, dtype=torch.float64))
             for c, r in ((0.6, 4), (-1.5, 8), (2.0, 1))]
    up, down = lowrank.stack(terms)
    assert up.shape == (30, 13) and down.shape == (13, 20)
    expected = sum(c * u @ d for c, u, d in terms)
    torch.testing.assert_close(up @ down, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_reduce_error_is_the_optimal_truncation_of_the_dense_product(rank):
    g = torch.Generator().manual_seed(rank)
    up = torch.randn(200, 24, generator=g, dtype=torch.float64)
    down = torch.randn(24, 90, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 90, dtype=torch.float64)
    dw = dense(up, down)
    s = torch.linalg.svdvals(dw)  # the dense SVD: independent of the factored route
    optimal_sq = float((s[rank:] ** 2).sum())
    red = lowrank.reduce(up, down, max_rank=rank)
    assert red.rank == rank and red.up.shape == (200, rank) and red.down.shape == (rank, 90)
    assert red.error_sq == pytest.approx(optimal_sq, rel=1e-6)
    achieved_sq = float(((dw - dense(red.up, red.down)) ** 2).sum())
    assert achieved_sq == pytest.approx(optimal_sq, rel=1e-6)
    assert red.total_sq == pytest.approx(float((dw**2).sum()), rel=1e-9)


def test_reduce_energy_mode_keeps_the_asked_share():
    g = torch.Generator().manual_seed(3)
    up = torch.randn(64, 16, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 16, dtype=torch.float64)
    down = torch.linalg.qr(torch.randn(48, 16, generator=g, dtype=torch.float64))[0].T
    red = lowrank.reduce(up, down, max_rank=16, mode="energy", param=0.9)
    assert red.kept_energy >= 0.9 - 1e-12
    smaller = lowrank.reduce(up, down, max_rank=red.rank - 1)
    assert smaller.kept_energy < 0.9


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loratools")
    base = str(folder / "base.safetensors")
    build_checkpoint(base, "sdxl", SUBSET, float_dtype=torch.float32)
    a = make_lora(MODULES_A, rank=8, alpha=4.0, conv3x3=True, seed=1)
    b = make_lora(MODULES_B, rank=4, alpha=8.0, seed=2)
    paths = {}
    for name, tensors in (("a", a), ("b", b)):
        paths[name] = str(folder / f"{name}.safetensors")
        save_file({k: v.to(torch.float16) for k, v in tensors.items()}, paths[name], metadata=SDXL_META)
    return folder, base, paths


def bake(folder, base, specs, name):
    out = str(folder / name)
    ops.merge(ops.MergeOptions(base=base, loras=tuple(specs), output=out, device="cpu", force=True))
    return load_file(out)


def test_combined_file_bakes_like_the_pair(sdxl):
    folder, base, paths = sdxl
    out = str(folder / "ab.safetensors")
    res = loratools.run(loratools.ToolOptions(
        inputs=(LoraSpec(paths["a"], 0.6), LoraSpec(paths["b"], -1.0)), output=out, force=True))
    assert {m.action for m in res.modules} == {"stacked"} and res.overall_error == 0.0
    shared = [m for m in res.modules if m.stem.endswith("attn1_to_q")]
    assert shared[0].rank_in == 12 and shared[0].rank_out == 12
    pair = bake(folder, base, [LoraSpec(paths["a"], 0.6), LoraSpec(paths["b"], -1.0)], "pair.safetensors")
    one = bake(folder, base, [LoraSpec(out)], "one.safetensors")
    original = load_file(base)
    changed = [k for k in original if not torch.equal(original[k], pair[k])]
    assert len(changed) == len(SUBSET)
    for key in original:
        delta_pair = (pair[key] - original[key]).double()
        delta_one = (one[key] - original[key]).double()
        # the combined factors are stored in fp16, as the inputs were: their rounding is the only loss
        scale = float(delta_pair.abs().max())
        assert float((delta_pair - delta_one).abs().max()) <= 2e-3 * scale, key
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    prov = json.loads(meta["lorabake.combine"])
    assert [i["strength"] for i in prov["inputs"]] == [0.6, -1.0] and len(prov["inputs"][0]["data_sha256"]) == 64
    assert meta["sshs_model_hash"] == res.data_sha256


def test_resize_reports_the_optimal_error_and_bakes_to_it(sdxl):
    folder, base, paths = sdxl
    out = str(folder / "a_r3.safetensors")
    res = loratools.run(loratools.ToolOptions(inputs=(LoraSpec(paths["a"]),), output=out, rank=3,
                                              command="resize", dtype="fp32", force=True))
    src = load_file(paths["a"])
    got = load_file(out)
    for m in res.modules:
        up = src[m.stem + ".lora_up.weight"].double().reshape(m.shape[0], -1)
        down = src[m.stem + ".lora_down.weight"].double().reshape(up.shape[1], -1)
        dw = float(src[m.stem + ".alpha"]) / up.shape[1] * up @ down
        s = torch.linalg.svdvals(dw)
        optimal = float(torch.sqrt((s[3:] ** 2).sum() / (s**2).sum()))
        assert m.rank_out == 3 and m.error == pytest.approx(optimal, rel=1e-5)
        new_up = got[m.stem + ".lora_up.weight"].double().reshape(m.shape[0], -1)
        new_down = got[m.stem + ".lora_down.weight"].double().reshape(3, -1)
        scale = float(got[m.stem + ".alpha"]) / 3
        achieved = float(torch.linalg.norm(dw - scale * new_up @ new_down) / torch.linalg.norm(dw))
        assert achieved == pytest.approx(optimal, rel=1e-4)
    conv = next(m for m in res.modules if m.stem.endswith("in_layers_2"))
    assert tuple(got[conv.stem + ".lora_down.weight"].shape) == (3, 320, 3, 3)
    assert tuple(got[conv.stem + ".lora_up.weight"].shape) == (640, 3, 1, 1)
    with safe_open(out, "pt") as f:
        assert f.metadata()["ss_network_dim"] == "3"


def test_resize_at_or_above_the_rank_keeps_the_bytes(sdxl):
    folder, _, paths = sdxl
    out = str(folder / "same.safetensors")
    res = loratools.run(loratools.ToolOptions(inputs=(LoraSpec(paths["b"]),), output=out, rank=16,
                                              command="resize", force=True))
    assert {m.action for m in res.modules} == {"kept"}
    src, got = load_file(paths["b"]), load_file(out)
    assert src.keys() == got.keys() and all(torch.equal(src[k], got[k]) for k in src)


def test_peft_metadata_alpha_is_folded_into_the_factors(tmp_path):
    stem = "transformer.blocks.0.attn.to_q"
    t = make_lora([(stem, 32, 16)], rank=4, naming="peft", alpha=None, seed=5)
    path = str(tmp_path / "peft.safetensors")
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8})}
    save_file(t, path, metadata=meta)
    out = str(tmp_path / "folded.safetensors")
    loratools.run(loratools.ToolOptions(inputs=(LoraSpec(path, 0.5),), output=out))
    got = load_file(out)
    assert set(got) == {stem + ".lora_A.weight", stem + ".lora_B.weight"}
    with safe_open(out, "pt") as f:
        assert "lora_adapter_metadata" not in f.metadata()
    expected = 0.5 * (8 / 4) * t[stem + ".lora_B.weight"].double() @ t[stem + ".lora_A.weight"].double()
    torch.testing.assert_close(dense(got[stem + ".lora_B.weight"], got[stem + ".lora_A.weight"]), expected,
                               rtol=1e-6, atol=1e-7)


def test_unsupported_adapters_and_mixed_families_are_refused(tmp_path, sdxl):
    _, _, paths = sdxl
    for algo, options in (("oft", {}), ("lora", {"dora": True})):
        path = str(tmp_path / f"{algo}.safetensors")
        save_file(make_lora(MODULES_B[:1], algo=algo, rank=2, **options), path)
        with pytest.raises(LoraFormatError, match="depends on the base weight") as err:
            loratools.run(loratools.ToolOptions(inputs=(LoraSpec(path),), output=str(tmp_path / "x.safetensors")))
        assert ("DoRA" if options else algo) in str(err.value) and path in str(err.value)
        assert "pass --base BASE" in str(err.value)
    sd1 = str(tmp_path / "sd1.safetensors")
    save_file(make_lora([("lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320)], rank=2), sd1,
              metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(UsageError, match="different model families"):
        loratools.run(loratools.ToolOptions(inputs=(LoraSpec(sd1), LoraSpec(paths["a"])),
                                            output=str(tmp_path / "y.safetensors")))
    assert not list(tmp_path.glob("[xy].safetensors"))


def test_cli_combine_json_and_resize_usage(sdxl, tmp_path):
    _, _, paths = sdxl
    out = str(tmp_path / "c.safetensors")
    code, stdout, _ = run_main(["combine", f"{paths['a']}:0.5", paths["b"], "-o", out, "--rank", "4", "--json"])
    assert code == 0
    doc = json.loads(stdout)
    assert doc["rank_max"] == 4 and 0 < doc["error"] < 1 and doc["modules"] == 5
    code, _, err = run_main(["resize", paths["a"], "-o", str(tmp_path / "r.safetensors")])
    assert code == 2 and "--rank" in err


def raw_delta(t: dict[str, torch.Tensor], stem: str, algo: str) -> torch.Tensor:
    """ΔW at strength 1 by each type's textbook formula (fp64, flattened to [out, in·k])."""
    g = {k[len(stem) + 1:]: v.double() for k, v in t.items() if k.startswith(stem + ".")}
    flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
    if algo == "loha":
        dw = (flat(g["hada_w1_a"]) @ flat(g["hada_w1_b"])) * (flat(g["hada_w2_a"]) @ flat(g["hada_w2_b"]))
        return dw * float(g["alpha"]) / g["hada_w1_b"].shape[0]
    if algo == "lokr":
        w1 = g["lokr_w1"] if "lokr_w1" in g else g["lokr_w1_a"] @ g["lokr_w1_b"]
        w2 = flat(g["lokr_w2"]) if "lokr_w2" in g else flat(g["lokr_w2_a"]) @ flat(g["lokr_w2_b"])
        # LyCORIS: alpha / the factored side's rank (w2's first); both sides full: no scale
        factored = g.get("lokr_w2_b", g.get("lokr_w1_b"))
        scale = float(g["alpha"]) / factored.shape[0] if factored is not None else 1.0
        return torch.kron(w1, w2) * scale
    if algo == "full":
        return flat(g["diff"])
    up, down = flat(g["lora_up.weight"]), g["lora_down.weight"]
    if "lora_mid.weight" in g:
        mid = g["lora_mid.weight"]
        dw = torch.einsum("oa,abhw,bi->oihw", up, mid, flat(down))
        return flat(dw) * float(g["alpha"]) / up.shape[1]
    return up @ flat(down) * float(g["alpha"]) / up.shape[1]


@pytest.mark.parametrize("algo, options", [
    ("loha", {}), ("lokr", {}), ("lokr", {"lokr_w1": "factored", "lokr_w2": "full"}), ("full", {}),
    ("lora", {"tucker": True}),
], ids=["loha", "lokr", "lokr-full-w2", "full", "tucker-locon"])
def test_lycoris_types_combine_exactly_and_resize_optimally(tmp_path, sdxl, algo, options):
    """Each type is turned into exact low-rank factors: combined with a plain LoRA, the result's ΔW is
    the weighted sum of the textbook ΔWs; resized, its error is the Eckart–Young optimum of that sum."""
    _, _, paths = sdxl
    modules = MODULES_A[1:3] + [MODULES_A[3]]  # attention, feed-forward (5120×640), 3x3 conv
    lyco = make_lora(modules, algo=algo, rank=4, alpha=2.0, conv3x3=True, seed=7, bias=False, **options)
    lyco_path = str(tmp_path / "lyco.safetensors")
    save_file(lyco, lyco_path, metadata=SDXL_META)
    plain = {k: v.double() for k, v in load_file(paths["a"]).items()}
    out = str(tmp_path / "c.safetensors")
    res = loratools.run(loratools.ToolOptions(inputs=(LoraSpec(lyco_path, 0.7), LoraSpec(paths["a"], -0.5)),
                                              output=out, dtype="fp32"))
    combined = {k: v.double() for k, v in load_file(out).items()}
    assert {m.action for m in res.modules} <= {"stacked", f"stacked from {algo}"}
    for stem, *_ in modules:
        want = 0.7 * raw_delta(lyco, stem, algo) - 0.5 * raw_delta(plain, stem, "lora")
        got = raw_delta(combined, stem, "lora")
        assert float((got - want).norm() / want.norm()) < 1e-6, stem
    # resize the LyCORIS file alone: the reported error is the best any rank-3 LoRA can do
    small = str(tmp_path / "r.safetensors")
    res = loratools.run(loratools.ToolOptions(inputs=(LoraSpec(lyco_path),), output=small, rank=3, command="resize", dtype="fp32"))
    resized = {k: v.double() for k, v in load_file(small).items()}
    for report in res.modules:
        want = raw_delta(lyco, report.stem, algo)
        s = torch.linalg.svdvals(want)
        optimal = float(torch.sqrt((s[3:] ** 2).sum()) / want.norm())
        assert report.error == pytest.approx(optimal, rel=1e-6, abs=1e-9), report.stem
        got = raw_delta(resized, report.stem, "lora")
        assert float((got - want).norm() / want.norm()) == pytest.approx(optimal, rel=1e-5, abs=1e-7)


def test_dora_and_oft_combine_against_the_base_into_what_merge_bakes(tmp_path, sdxl):
    """With --base, a DoRA module (to_q) and an OFT module (attn2 to_k) become exact factors of merge's own
    W' − W (merge's DoRA is checked against PEFT's merge in tests/test_lycoris_parity.py::test_peft_merge); with
    a plain LoRA on the same to_q after it, the file bakes to what merging both originals in that order bakes.
    Reduced to rank 16, each module's reported error is the relative distance to the exact change."""
    folder, base, paths = sdxl
    mixed = {**make_lora(MODULES_B[:1], rank=4, alpha=2.0, dora=True, seed=5),
             **make_lora(MODULES_B[1:2], algo="oft", rank=4, seed=6)}
    src = str(tmp_path / "mixed.safetensors")
    save_file(mixed, src, metadata=SDXL_META)
    specs = (LoraSpec(src, 0.7), LoraSpec(paths["a"], 0.5))
    out, small = str(tmp_path / "c.safetensors"), str(tmp_path / "c16.safetensors")
    res = loratools.run(loratools.ToolOptions(inputs=specs, output=out, base=base, dtype="fp32"))
    actions = {m.stem: m.action for m in res.modules}
    assert actions[K + "transformer_blocks_0_attn1_to_q"] == "stacked from the base (dora)"
    assert actions[K + "transformer_blocks_0_attn2_to_k"] == "stacked from the base (oft)"
    assert json.loads(res.metadata["lorabake.combine"])["base"] == "base.safetensors"
    pair = bake(tmp_path, base, list(specs), "pair.safetensors")
    one = bake(tmp_path, base, [LoraSpec(out)], "one.safetensors")
    original = load_file(base)
    for key in original:
        delta_pair, delta_one = (pair[key] - original[key]).double(), (one[key] - original[key]).double()
        assert float((delta_pair - delta_one).abs().max()) <= 1e-5 * float(delta_pair.abs().max()) + 1e-12, key
    code, stdout, err = run_main(["combine", f"{src}:0.7", f"{paths['a']}:0.5", "-o", small, "--base", base,
                                  "--rank", "16", "--dtype", "fp32", "--json"])
    assert code == 0, err
    per_module = json.loads(stdout)["per_module"]
    exact, reduced = load_file(out), load_file(small)
    for m in per_module:
        want = raw_delta(exact, m["stem"], "lora")
        got = raw_delta(reduced, m["stem"], "lora")
        assert float((got - want).norm() / want.norm()) == pytest.approx(m["error"], rel=1e-4, abs=2e-6), m["stem"]
    assert {m["action"] for m in per_module} >= {"reduced from the base (dora)", "reduced from the base (oft)"}
    assert max(m["error"] for m in per_module) > 0.1  # DoRA's and OFT's changes are far from rank 16
