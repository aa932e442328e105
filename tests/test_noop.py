"""Never a silent no-op: a LoRA that changes no tensor of the base fails (exit 1, nothing written), whatever
the options; one that matches bakes, whatever its metadata says. Real names and shapes (tests/data/arch)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.archfix import build_checkpoint, select
from tests.cli_helpers import run_main
from tests.lorafix import make_lora, save_lora

U = "model.diffusion_model."
# A few SD1 blocks: an input attention (level 0) and an output attention (level 1), plus CLIP-L layer 0.
SD1_NAMES = [
    r"model\.diffusion_model\.input_blocks\.1\.1\.",
    r"model\.diffusion_model\.output_blocks\.4\.1\.",
    r"cond_stage_model\.transformer\.text_model\.encoder\.layers\.0\.",
]


@pytest.fixture(scope="module")
def sd1_base(tmp_path_factory):
    """Built once for the module, in its own folder (tests check that nothing appears next to their LoRA)."""
    path = str(tmp_path_factory.mktemp("base") / "sd1.safetensors")
    tensors = build_checkpoint(path, "sd1", select("sd1", SD1_NAMES), float_dtype=torch.float32)
    return path, tensors


def _ldm_kohya(tensors: dict[str, torch.Tensor]) -> list[tuple]:
    """kohya-style stems named after the LDM checkpoint (`lora_unet_output_blocks_4_1_…`), real shapes."""
    out = []
    for key, t in tensors.items():
        if key.startswith(U) and key.endswith(("to_q.weight", "to_k.weight", "proj_out.weight")):
            stem = "lora_unet_" + key[len(U) : -len(".weight")].replace(".", "_")
            out.append((stem, t.shape[0], t.shape[1], *t.shape[2:3]))
    return out


def test_ldm_named_sd1_kohya_lora_without_metadata_bakes(tmp_path, sd1_base):
    base, tensors = sd1_base
    modules = _ldm_kohya(tensors)
    assert any(m[0].startswith("lora_unet_output_blocks_4_1_") for m in modules)
    lora_tensors = make_lora(modules, rank=4, alpha=2.0, dtype=torch.float32)
    lora = save_lora(str(tmp_path / "ldm_kohya.safetensors"), lora_tensors, {})
    out = str(tmp_path / "out.safetensors")
    code, _, err = run_main(["merge", base, "--lora", lora, "-o", out, "--dtype", "fp32"])
    assert code == 0, err
    merged = load_file(out)
    for stem, *_ in modules:  # W' = W + (alpha/r)·up@down on the module the LDM name says
        key = _real_key(tensors, stem)
        up, down = lora_tensors[stem + ".lora_up.weight"].double(), lora_tensors[stem + ".lora_down.weight"].double()
        delta = (up.flatten(1) @ down.flatten(1)).reshape(tensors[key].shape) * 0.5
        torch.testing.assert_close(merged[key].double(), tensors[key].double() + delta, rtol=0, atol=1e-6)


def _real_key(tensors: dict[str, torch.Tensor], stem: str) -> str:
    flat = stem[len("lora_unet_") :]
    (key,) = [k for k in tensors if k.startswith(U) and k[len(U) : -len(".weight")].replace(".", "_") == flat]
    return key


# (case, LoRA modules, metadata, extra options, fragments of the one error line)
NOOPS = [
    # an SDXL module on SD1: the name exists, the width (2048 vs 768) does not fit
    ("wrong family", [("lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k", 320, 2048)],
     {"ss_base_model_version": "sdxl_base_v1-0"}, ["--allow-unmatched"], ["changes no tensor", "(sd1)", "sdxl", "unmatched"]),
    # names of no family at all
    ("no names match", [("lora_unet_some_block_proj", 8, 8)], {}, ["--allow-unmatched"], ["changes no tensor", "unmatched"]),
    # a second text encoder the SD1 base does not have: skipped, so nothing changes
    ("only a missing component", [("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280)], {}, [],
     ["changes no tensor", "skipped", "base has no te2"]),
]


@pytest.mark.parametrize("case, modules, metadata, options, fragments", NOOPS, ids=[n[0] for n in NOOPS])
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_lora_that_changes_nothing_fails(tmp_path, sd1_base, case, modules, metadata, options, fragments, dry_run):
    base, _ = sd1_base
    lora = save_lora(str(tmp_path / "noop.safetensors"), make_lora(modules, rank=2), metadata)
    out = str(tmp_path / "out.safetensors")
    argv = ["merge", base, "--lora", lora, *options, *(["--dry-run"] if dry_run else ["-o", out])]
    before = sorted(os.listdir(tmp_path))
    code, stdout, err = run_main(argv)
    assert code == 1, (stdout, err)
    (line,) = err.splitlines()
    assert line.startswith("Error: ") and lora in line and base in line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_strength_zero_changes_nothing(tmp_path, sd1_base):
    base, tensors = sd1_base
    lora = save_lora(str(tmp_path / "l.safetensors"), make_lora(_ldm_kohya(tensors), rank=2), {})
    code, _, err = run_main(["merge", base, "--lora", lora + ":0", "-o", str(tmp_path / "o.safetensors")])
    assert code == 1 and "strength 0" in err and not (tmp_path / "o.safetensors").exists()


def test_one_noop_lora_among_several_fails_naming_it(tmp_path, sd1_base):
    base, tensors = sd1_base
    good = save_lora(str(tmp_path / "good.safetensors"), make_lora(_ldm_kohya(tensors), rank=2), {})
    bad = save_lora(str(tmp_path / "bad.safetensors"), make_lora([("lora_unet_nothing_here", 8, 8)], rank=2), {})
    code, _, err = run_main(["merge", base, "--lora", good, "--lora", bad, "--allow-unmatched",
                             "-o", str(tmp_path / "o.safetensors")])
    assert code == 1 and "bad.safetensors" in err and "good.safetensors" not in err


def test_inspect_against_reports_a_noop_instead_of_failing(tmp_path, sd1_base):
    base, _ = sd1_base
    lora = save_lora(str(tmp_path / "l.safetensors"), make_lora([("lora_unet_nothing_here", 8, 8)], rank=2), {})
    code, stdout, err = run_main(["inspect", lora, "--against", base, "--json"])
    assert code == 0, err
    assert '"unmatched"' in stdout


def test_inspect_keys_says_where_every_module_goes(tmp_path, sd1_base):
    base, tensors = sd1_base
    modules = _ldm_kohya(tensors)[:2] + [("lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_kk", 320, 768)]
    lora = save_lora(str(tmp_path / "l.safetensors"), make_lora(modules, rank=4, alpha=2.0), {})
    code, stdout, err = run_main(["inspect", lora, "--against", base, "--keys", "--json"])
    assert code == 0, err
    rows = {r["module"]: r for r in json.loads(stdout)["files"][0]["coverage"]["keys"]}
    assert set(rows) == {m[0] for m in modules}
    for stem, *_ in modules[:2]:
        row = rows[stem]
        assert (row["status"], row["tensor"], row["family"], row["table"]) == ("applied", _real_key(tensors, stem), "sd1", "own name")
        assert (row["algorithm"], row["rank"], row["alpha"], row["scale"]) == ("lora", 4, 2.0, 0.5)
    miss = rows["lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_kk"]
    assert miss["status"] == "unmatched" and miss["tensor"] is None
    assert miss["nearest"][0]["tensor"] == U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    # the plain view carries the same facts, one line per module
    code, stdout, err = run_main(["inspect", lora, "--against", base, "--keys"])
    assert code == 0, err
    assert f"-> {U}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in stdout or "nearest" in stdout


def test_against_a_base_of_unknown_family_nothing_is_skipped(tmp_path):
    # a DiT no family module describes (Lumina-like names under model.diffusion_model.): its own names apply,
    # a text encoder module is unmatched (the base is not known to lack one), never skipped
    base = str(tmp_path / "dit.safetensors")
    from safetensors.torch import save_file
    save_file({U + "layers.0.attention.qkv.weight": torch.zeros(96, 32)}, base)
    modules = [("lora_unet_layers_0_attention_qkv", 96, 32), ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)]
    lora = save_lora(str(tmp_path / "l.safetensors"), make_lora(modules, rank=2), {})
    code, stdout, err = run_main(["inspect", lora, "--against", base, "--json"])
    assert code == 0, err
    cov = json.loads(stdout)["files"][0]["coverage"]
    assert (cov["base_architecture"], cov["applied"], cov["skipped"]) == ("unknown", {"dit": 1}, {})
    assert cov["unmatched"] == {"te1": 1}
