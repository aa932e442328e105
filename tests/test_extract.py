"""lorabake.extract on real SDXL names and shapes (small subsets): round trip, naming, skips, hash."""

from __future__ import annotations

import hashlib
import json
import math
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from lorabake import delta, extract
from lorabake.detect import detect_checkpoint
from lorabake.errors import MatchError
from lorabake.keymap import build_keymap
from lorabake.st_reader import SafetensorsReader
from tests.archfix import arch_tensors, build_checkpoint

UNET = "model.diffusion_model."
BLOCK = UNET + "input_blocks.4.1."  # SDXL level 1: width 640, cross-attention K/V from 2048
TE1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.0."
TE2 = "conditioner.embedders.1.model.transformer.resblocks.0."

SDXL_SUBSET = [
    BLOCK + "proj_in.weight",
    BLOCK + "transformer_blocks.0.attn1.to_q.weight",
    BLOCK + "transformer_blocks.0.attn1.to_out.0.weight",
    BLOCK + "transformer_blocks.0.attn2.to_k.weight",  # detection probe
    BLOCK + "transformer_blocks.0.attn2.to_v.weight",
    BLOCK + "transformer_blocks.0.ff.net.0.proj.weight",  # [5120, 640]: the randomized path
    BLOCK + "transformer_blocks.0.norm1.weight",
    UNET + "input_blocks.4.0.in_layers.2.weight",  # 3x3 conv [640, 320, 3, 3]
    UNET + "time_embed.0.weight",  # not a trainer target
    TE1 + "self_attn.q_proj.weight",
    TE1 + "mlp.fc1.weight",
    TE2 + "attn.in_proj_weight",  # fused q ‖ k ‖ v [3840, 1280]
    TE2 + "mlp.c_fc.weight",
]


def bake(base: dict[str, torch.Tensor], modules: dict[str, tuple[int, float]], *, rows=None, seed=1):
    """tuned = base + up@down·alpha/r per key (fp32, computed here independently of lorabake)."""
    g = torch.Generator().manual_seed(seed)
    tuned = dict(base)
    deltas = {}
    for key, (r, alpha) in modules.items():
        w = base[key]
        out = w.shape[0] if rows is None or key not in rows else rows[key][1] - rows[key][0]
        flat_in = w[0].numel()
        up = torch.randn(out, r, generator=g) * 0.05
        down = torch.randn(r, flat_in, generator=g) * 0.05
        dw = up @ down * (alpha / r)
        new = w.clone().reshape(w.shape[0], -1)
        lo = 0 if rows is None or key not in rows else rows[key][0]
        new[lo : lo + out] += dw
        tuned[key] = new.reshape(w.shape)
        deltas[key] = (
            tuned[key].reshape(w.shape[0], -1)[lo : lo + out] - w.reshape(w.shape[0], -1)[lo : lo + out]
        ).double()
    return tuned, deltas


@pytest.fixture(scope="module")
def sdxl_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    base_path = str(folder / "base.safetensors")
    base = build_checkpoint(base_path, "sdxl", SDXL_SUBSET, float_dtype=torch.float32)
    baked = {
        BLOCK + "proj_in.weight": (4, 4.0),
        BLOCK + "transformer_blocks.0.attn1.to_q.weight": (4, 2.0),
        BLOCK + "transformer_blocks.0.attn2.to_k.weight": (8, 8.0),
        BLOCK + "transformer_blocks.0.ff.net.0.proj.weight": (8, 8.0),
        UNET + "input_blocks.4.0.in_layers.2.weight": (4, 4.0),
        TE1 + "self_attn.q_proj.weight": (4, 4.0),
        TE2 + "attn.in_proj_weight": (4, 4.0),  # only the k rows change
    }
    tuned, deltas = bake(base, baked, rows={TE2 + "attn.in_proj_weight": (1280, 2560)})
    tuned_path = str(folder / "tuned.safetensors")
    save_file(tuned, tuned_path)
    return folder, base_path, tuned_path, base, tuned, deltas


@pytest.fixture(scope="module")
def shared(sdxl_pair):
    """One extraction (rank 8, conv rank 8, alpha 4) that several tests read."""
    folder, base_path, tuned_path, *_ = sdxl_pair
    return run(folder, base_path, tuned_path, "shared.safetensors", rank=8, conv_rank=8, alpha=4.0)


def run(folder, base_path, tuned_path, name, **kw):
    opts = extract.ExtractOptions(
        base=base_path, tuned=tuned_path, output=str(folder / name), device="cpu", **kw
    )
    return extract.extract(opts)


def test_round_trip_recovers_the_baked_delta(sdxl_pair, shared):
    deltas = sdxl_pair[-1]
    res = shared
    lora = load_file(res.output)
    stems = {m.key + (f"@{m.rows[0]}" if m.rows else ""): m for m in res.modules}
    for key, dw in deltas.items():
        m = stems[key + ("@1280" if "in_proj" in key else "")]
        up = lora[m.stem + ".lora_up.weight"].double().reshape(dw.shape[0], -1)
        down = lora[m.stem + ".lora_down.weight"].double().reshape(m.rank, -1)
        alpha = float(lora[m.stem + ".alpha"])
        approx = up @ down * (alpha / m.rank)
        rel = float(torch.linalg.norm(dw - approx) / torch.linalg.norm(dw))
        assert rel < 2e-3, (key, rel)  # fp16 rounding of the factors only
        # the reported error is the same number computed independently (numpy, fp64)
        expected = np.linalg.norm(dw.numpy() - approx.numpy()) / np.linalg.norm(dw.numpy())
        assert m.error == pytest.approx(expected, rel=1e-3, abs=1e-6)
    num = sum(m.err_sq for m in res.modules)
    den = sum(m.norm**2 for m in res.modules)
    assert res.overall_error == pytest.approx(math.sqrt(num / den))
    assert "randomized" in {m.method for m in res.modules}


def test_output_loads_back_through_the_keymap_and_rebuilds_tuned(sdxl_pair, shared):
    _, base_path, _, base, tuned, _ = sdxl_pair
    res = shared
    with SafetensorsReader(base_path) as reader:
        info = detect_checkpoint(reader.tensors, reader.metadata)
        keymap = build_keymap(reader.tensors, info)
    lora = load_file(res.output)
    rebuilt = {k: v.clone() for k, v in base.items()}
    for m in res.modules:
        target = keymap.targets[m.stem]
        assert target.key == m.key
        assert (
            None if target.slice is None else (target.slice.start, target.slice.start + target.slice.length)
        ) == m.rows
        parts = {
            p: lora[f"{m.stem}.{s}"].float()
            for p, s in (("up", "lora_up.weight"), ("down", "lora_down.weight"), ("alpha", "alpha"))
        }
        w = rebuilt[m.key]
        rows = w if target.slice is None else w.narrow(0, target.slice.start, target.slice.length)
        rows += delta.delta("lora", parts, out_shape=rows.shape)
    for key in base:
        torch.testing.assert_close(rebuilt[key], tuned[key], atol=2e-4, rtol=0)


def test_output_bakes_back_with_lorabake_merge(sdxl_pair, shared, tmp_path):
    from lorabake import ops
    from lorabake.plan import LoraSpec

    _, base_path, _, _, tuned, _ = sdxl_pair
    out = str(tmp_path / "merged.safetensors")
    opts = ops.MergeOptions(base=base_path, loras=(LoraSpec(shared.output),), output=out, device="cpu")
    merged = ops.merge(opts)
    assert not merged.plan.unmatched and merged.tensors_changed == len({m.key for m in shared.modules})
    baked = load_file(out)
    for key in tuned:
        torch.testing.assert_close(baked[key], tuned[key], atol=2e-4, rtol=0)


def test_te2_in_proj_becomes_kohya_q_k_v_and_unchanged_slices_are_skipped(sdxl_pair):
    folder, base_path, tuned_path, *_ = sdxl_pair
    res = run(folder, base_path, tuned_path, "te2.safetensors", rank=4, components=("te2", "unet"))
    te2 = "lora_te2_text_model_encoder_layers_0_self_attn_"
    written = {m.stem: m for m in res.modules}
    assert written[te2 + "k_proj"].rows == (1280, 2560)
    skipped = {s.stem: s.reason for s in res.skipped}
    assert skipped[te2 + "q_proj"] == "unchanged" and skipped[te2 + "v_proj"] == "unchanged"
    assert skipped["lora_te2_text_model_encoder_layers_0_mlp_fc1"] == "unchanged"
    assert skipped["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0"] == "unchanged"
    # defaults: no resnet conv without --conv-rank, no time embedding, no norm
    assert not any("in_layers" in m.stem or "time_embed" in m.stem for m in res.modules)
    with safe_open(res.output, "pt") as f:
        assert f.get_slice(te2 + "k_proj.lora_up.weight").get_shape() == [1280, 4]
        assert f.get_slice(te2 + "k_proj.lora_down.weight").get_shape() == [4, 1280]


def test_conv_rank_writes_locon_shapes_and_all_modules_adds_the_rest(sdxl_pair, shared):
    folder, base_path, tuned_path, *_ = sdxl_pair
    stem = "lora_unet_input_blocks_4_0_in_layers_2"
    with safe_open(shared.output, "pt") as f:
        assert f.get_slice(stem + ".lora_up.weight").get_shape() == [640, 8, 1, 1]
        assert f.get_slice(stem + ".lora_down.weight").get_shape() == [8, 320, 3, 3]
        meta = f.metadata()
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "4"}
    res_all = run(
        folder, base_path, tuned_path, "all.safetensors", rank=4, all_modules=True, components=("unet",)
    )
    skipped = {s.stem for s in res_all.skipped}
    assert "lora_unet_time_embed_0" in skipped  # considered (unchanged), not ignored
    assert "lora_unet_input_blocks_4_0_in_layers_2" in {m.stem for m in res_all.modules}


def test_metadata_and_hash_match_the_written_file(shared):
    res = shared
    raw = open(res.output, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8 : 8 + n])["__metadata__"]
    data_sha = hashlib.sha256(raw[8 + n :]).hexdigest()
    assert meta["sshs_model_hash"] == data_sha == res.data_sha256
    assert meta["modelspec.hash_sha256"] == "0x" + data_sha
    # same bytes as safetensors' own canonical serialization (what kohya/A1111 hash)
    blob = save(load_file(res.output))
    (m,) = struct.unpack("<Q", blob[:8])
    assert hashlib.sha256(blob[8 + m :]).hexdigest() == data_sha
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["modelspec.title"] == "shared"
    info = json.loads(meta["lorabake.extract"])
    assert info["rank_mode"] == "fixed" and info["error"] == pytest.approx(res.overall_error, abs=1e-6)
    lora = load_file(res.output)
    assert all(float(lora[m.stem + ".alpha"]) == 4.0 for m in res.modules)
    doc = extract.extract_json(res)
    assert doc["modules"] == len(res.modules) and doc["data_sha256"] == data_sha


def test_dynamic_rank_energy(sdxl_pair):
    folder, base_path, tuned_path, *_ = sdxl_pair
    res = run(
        folder,
        base_path,
        tuned_path,
        "dyn.safetensors",
        rank=16,
        rank_mode="energy",
        rank_param=0.999999,
        components=("unet",),
    )
    ranks = {m.key: m.rank for m in res.modules if m.rows is None}
    assert (
        ranks[BLOCK + "proj_in.weight"] == 4 and ranks[BLOCK + "transformer_blocks.0.attn2.to_k.weight"] == 8
    )
    meta = load_meta(res.output)
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    lora = load_file(res.output)
    assert float(lora["lora_unet_input_blocks_4_1_proj_in.alpha"]) == 4.0


def test_min_diff_skips_small_changes(sdxl_pair, shared):
    folder, base_path, tuned_path, *_ = sdxl_pair
    sizes = sorted(m.max_abs for m in shared.modules)
    cut = (sizes[0] + sizes[-1]) / 2
    res = run(folder, base_path, tuned_path, "md.safetensors", rank=4, min_diff=cut)
    assert res.modules and all(m.max_abs > cut for m in res.modules)
    below = {s.stem for s in res.skipped if s.reason == "below min-diff"}
    assert below == {m.stem for m in shared.modules if m.max_abs <= cut}


def load_meta(path):
    with safe_open(path, "pt") as f:
        return f.metadata()


def test_mismatched_architecture_is_refused(tmp_path, sdxl_pair):
    _, base_path, *_ = sdxl_pair
    sd1 = str(tmp_path / "sd1.safetensors")
    build_checkpoint(sd1, "sd1", [UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"])
    with pytest.raises(MatchError, match="sd1") as exc:
        run(tmp_path, base_path, sd1, "x.safetensors")
    assert exc.value.path == sd1


def test_mismatched_shape_is_refused(tmp_path, sdxl_pair):
    _, base_path, _, base, tuned, _ = sdxl_pair
    bad = dict(tuned)
    key = TE1 + "mlp.fc1.weight"
    bad[key] = torch.zeros(3072, 700)
    bad_path = str(tmp_path / "bad.safetensors")
    save_file(bad, bad_path)
    with pytest.raises(MatchError) as exc:
        run(tmp_path, base_path, bad_path, "x.safetensors")
    assert exc.value.tensor == key and exc.value.path == bad_path
    assert not (tmp_path / "x.safetensors").exists()


def test_identical_checkpoints_give_a_clear_error(tmp_path, sdxl_pair):
    _, base_path, *_ = sdxl_pair
    copy = str(tmp_path / "copy.safetensors")
    save_file(load_file(base_path), copy)
    with pytest.raises(MatchError, match="do not differ"):
        run(tmp_path, base_path, copy, "x.safetensors")


def test_flux_fused_qkv_keeps_a_whole_matrix_name(tmp_path):
    names = [
        k for k in arch_tensors("flux") if k.startswith("model.diffusion_model.double_blocks.0.img_attn.")
    ]
    base = build_checkpoint(str(tmp_path / "b.safetensors"), "flux", names, float_dtype=torch.bfloat16)
    key = "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
    tuned, _ = bake({key: base[key].float()}, {key: (2, 2.0)})
    save_file({**base, key: tuned[key].to(torch.bfloat16)}, str(tmp_path / "t.safetensors"))
    res = run(
        tmp_path, str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "f.safetensors", rank=4
    )
    assert [m.stem for m in res.modules] == ["lora_unet_double_blocks_0_img_attn_qkv"]
    assert res.modules[0].shape == (9216, 3072)
    meta = load_meta(res.output)
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_base_model_version"] == "flux1"


def test_cli_extract_json_and_merge_back(sdxl_pair, tmp_path):
    import json

    from tests.cli_helpers import run_main

    _, base_path, tuned_path, _, tuned, _ = sdxl_pair
    out = tmp_path / "cli_lora.safetensors"
    code, stdout, err = run_main(["extract", base_path, tuned_path, "-o", str(out), "--rank", "8", "--conv-rank", "8", "--json", "--device", "cpu"])
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["modules"] == len(doc["per_module"]) > 0 and doc["error"] < 2e-3
    merged = tmp_path / "merged.safetensors"
    code, _, err = run_main(["merge", base_path, "--lora", str(out), "-o", str(merged)])
    assert code == 0, err
    baked = load_file(str(merged))
    for key in tuned:
        torch.testing.assert_close(baked[key], tuned[key], atol=2e-4, rtol=0)
    code, _, err = run_main(["extract", base_path, tuned_path, "-o", str(out)])
    assert code == 1 and "exists" in err
