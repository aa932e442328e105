"""`lorabake inspect`: whole real checkpoints (as sparse files: real header, zero data) and LoRAs
of each flavour, as plain text, as a rich table, and as JSON."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from lorabake.st_header import encode_header
from tests.archfix import arch_tensors
from tests.cli_helpers import run_main
from tests.lorafix import make_lora, save_lora

TAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32"}


def sparse_checkpoint(path, arch: str, *, float_tag: str | None = "F16", keep=lambda name: True, rename=lambda n: n,
                      metadata=None) -> str:
    """A full-size checkpoint with the real header and a sparse (all-zero) data section: instant to write."""
    entries = []
    for name, e in arch_tensors(arch, include_optional=False).items():
        if not keep(name):
            continue
        tag = TAGS[e["dtype"]]
        if float_tag and tag in ("F32", "F16", "BF16"):
            tag = float_tag
        entries.append((rename(name), tag, tuple(e["shape"])))
    header, spans = encode_header(entries, metadata)
    data = spans[-1][1] if spans else 0
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.truncate(8 + len(header) + data)
    return str(path)


def inspect_json(*paths, extra=()):
    code, out, err = run_main(["inspect", *map(str, paths), "--json", *extra])
    assert code == 0, err
    return json.loads(out)["files"]


# (arch file, written as, expected architecture, layout, components present)
CHECKPOINTS = [
    ("sd1", {}, "sd1", "ldm", {"unet", "te1", "vae"}),
    ("sdxl", {}, "sdxl", "sgm", {"unet", "te1", "te2", "vae"}),
    ("sd3", {}, "sd3", "comfyui", {"dit", "te1", "te2", "te3", "vae"}),
    ("flux", {"float_tag": "BF16"}, "flux", "comfyui", {"dit", "te1", "te3", "vae"}),
    # BFL ships the Flux DiT alone, without the model.diffusion_model. prefix
    ("flux", {"float_tag": "BF16", "keep": lambda n: n.startswith("model.diffusion_model."),
              "rename": lambda n: n.removeprefix("model.diffusion_model.")}, "flux", "bfl", {"dit"}),
    # an SDXL UNet-only file (e.g. exported by a trainer)
    ("sdxl", {"keep": lambda n: n.startswith("model.diffusion_model."),
              "rename": lambda n: n.removeprefix("model.diffusion_model.")}, "sdxl", "unet-only", {"unet"}),
]


@pytest.mark.parametrize("arch,kw,want_arch,want_layout,want_components", CHECKPOINTS,
                         ids=[f"{c[0]}-{c[3]}" for c in CHECKPOINTS])
def test_checkpoints_are_identified(tmp_path, arch, kw, want_arch, want_layout, want_components):
    path = sparse_checkpoint(tmp_path / f"{arch}.safetensors", arch, **kw)
    (rep,) = inspect_json(path)
    assert rep["kind"] == "checkpoint"
    assert rep["architecture"] == want_arch
    assert rep["layout"] == want_layout
    assert set(rep["components"]) == want_components
    assert rep["size"] == os.path.getsize(path)
    diffusion = rep["components"].get("unet") or rep["components"].get("dit")
    assert diffusion["params"] > 8e8  # SD1 UNet ~860M, SDXL 2.6B, SD3 2B, Flux 12B
    assert sum(c["tensors"] for c in rep["components"].values()) <= rep["tensors"]


def test_unknown_file_is_said_plainly(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "mystery.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(4, 4), "decoder.bias": torch.zeros(4)}, str(p))
    (rep,) = inspect_json(p)
    assert rep["kind"] == "checkpoint" and rep["architecture"] == "unknown"
    code, out, _ = run_main(["inspect", str(p)])
    assert code == 0 and "architecture: unknown" in out


SD1_UNET = [("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320, 320),
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768)]
SD1_TE = [("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)]

# (flavour written, tensors, metadata, expected flavour, expected arch, expected algorithms)
LORAS = [
    ("kohya", lambda: make_lora(SD1_UNET + SD1_TE, rank=8, alpha=4.0), {"ss_base_model_version": "sd_v1"},
     "kohya", "sd1", {"lora": 3}),
    ("lycoris-loha", lambda: make_lora(SD1_UNET, algo="loha", rank=4), {}, "lycoris", "sd1", {"loha": 2}),
    ("lycoris-lokr", lambda: make_lora(SD1_UNET, algo="lokr", rank=4, lokr_w2="factored"), {}, "lycoris", "sd1", {"lokr": 2}),
    ("peft", lambda: make_lora([("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 320, 768)],
                               naming="peft", rank=4), {}, "peft", "sd1", {"lora": 1}),
    # norm1.linear (per-block modulation) is FLUX.1's own; without it the file would fit Chroma as well
    ("ai-toolkit flux", lambda: make_lora([("transformer.transformer_blocks.0.attn.to_q", 3072, 3072),
                                           ("transformer.single_transformer_blocks.0.proj_mlp", 12288, 3072),
                                           ("transformer.transformer_blocks.0.norm1.linear", 18432, 3072)],
                                          naming="peft", rank=4), {}, None, "flux", {"lora": 3}),
    ("kohya flux", lambda: make_lora([("lora_unet_double_blocks_0_img_attn_qkv", 9216, 3072)], rank=4),
     {"modelspec.architecture": "flux-1-dev/lora"}, "kohya", "flux", {"lora": 1}),
    ("dora", lambda: make_lora(SD1_UNET, rank=4, dora=True), {}, None, "sd1", {"lora": 2}),
]


@pytest.mark.parametrize("name,build,meta,flavour,arch,algos", LORAS, ids=[r[0] for r in LORAS])
def test_loras_are_described(tmp_path, name, build, meta, flavour, arch, algos):
    tensors = build()
    path = save_lora(str(tmp_path / "l.safetensors"), tensors, meta)
    (rep,) = inspect_json(path)
    assert rep["kind"] == "lora"
    assert rep["architecture"] == arch
    if flavour:
        assert rep["flavour"] == flavour
    assert rep["algorithms"] == algos
    assert rep["modules"] == sum(algos.values())
    assert rep["unknown_keys"] == []
    if name == "dora":
        assert rep["dora_modules"] == 2


def test_kohya_lora_ranks_alphas_scales_and_training_metadata(tmp_path):
    tensors = make_lora(SD1_UNET + SD1_TE, rank=8, alpha=4.0)
    tensors["lora_unet_stray.weird_suffix"] = torch.zeros(2)
    tags = json.dumps({"10_dataset": {"cat": 12, "dog": 3, " cat": 1}, "5_reg": {"dog": 4}})
    meta = {"ss_base_model_version": "sd_v1", "ss_network_dim": "8", "ss_network_alpha": "4", "ss_tag_frequency": tags,
            "ss_learning_rate": "0.0001"}
    path = save_lora(str(tmp_path / "l.safetensors"), tensors, meta)
    (rep,) = inspect_json(path)
    assert rep["ranks"] == {"8": 3}
    assert rep["alphas"] == {"4": 3}
    assert rep["scales"] == {"0.5": 3}
    assert rep["components"] == {"unet": 2, "te1": 1}
    assert rep["unknown_keys"] == ["lora_unet_stray.weird_suffix"]
    assert rep["training"]["ss_learning_rate"] == "0.0001"
    assert rep["top_tags"][:2] == [["cat", 13], ["dog", 7]]


def test_against_shows_coverage(tmp_path):
    base = sparse_checkpoint(tmp_path / "sd1.safetensors", "sd1")
    tensors = make_lora(SD1_UNET + SD1_TE + [("lora_unet_down_blocks_9_attentions_0_proj_in", 320, 320)], rank=4)
    lora = save_lora(str(tmp_path / "l.safetensors"), tensors, {})
    (rep,) = inspect_json(lora, extra=["--against", base])
    cov = rep["coverage"]
    assert cov["base_architecture"] == "sd1"
    assert cov["applied"] == {"unet": 2, "te1": 1}
    assert sum(cov["unmatched"].values()) == 1
    assert cov["details"][0]["module"] == "lora_unet_down_blocks_9_attentions_0_proj_in"
    code, out, _ = run_main(["inspect", lora, "--against", base])
    assert code == 0 and "unmatched" in out and "down_blocks_9" in out


def test_hash_reports_sha256_autov2_and_sshs(tmp_path):
    import hashlib

    tensors = make_lora(SD1_UNET, rank=4)
    path = save_lora(str(tmp_path / "l.safetensors"), tensors, {})
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    data_sha = hashlib.sha256(raw[8 + n:]).hexdigest()
    (rep,) = inspect_json(path, extra=["--hash"])
    assert rep["sha256"] == hashlib.sha256(raw).hexdigest()
    assert rep["autov2"] == rep["sha256"][:10]
    assert rep["data_sha256"] == data_sha
    assert rep["sshs_model_hash_matches"] is None
    good = save_lora(str(tmp_path / "g.safetensors"), tensors, {"sshs_model_hash": data_sha})
    bad = save_lora(str(tmp_path / "b.safetensors"), tensors, {"sshs_model_hash": "0" * 64})
    g, b = inspect_json(good, bad, extra=["--hash"])
    assert g["sshs_model_hash_matches"] is True and b["sshs_model_hash_matches"] is False


def test_rich_table_on_a_terminal(tmp_path, monkeypatch, capsys):
    from lorabake import render
    from lorabake.inspection import inspect_file

    base = sparse_checkpoint(tmp_path / "sdxl.safetensors", "sdxl", metadata={"note": "\x1b[31mred\x1b[0m"})
    monkeypatch.setattr(render, "_tty", lambda: True)
    render.print_inspect([inspect_file(base)])
    out = capsys.readouterr().out
    assert "sdxl" in out and "components" in out and "te2" in out
    assert "\x1b[31m" not in out and "\\x1b[31mred" in out
