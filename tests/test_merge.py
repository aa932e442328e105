"""`lorabake merge` end to end on real names and real shapes, against an independent computation.

Each case writes a small base (a few real blocks from tests/data/arch), a LoRA whose stems are
spelled literally in the table (as the trainer named in the comment writes them), runs the CLI,
and compares every tensor with W + s·(alpha/r)·up@down computed here in fp64 on the slice the
row names. Untouched tensors must be byte-identical.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.archfix import build_checkpoint, select
from tests.cli_helpers import run_main
from tests.lorafix import make_lora, save_lora

SD1_NAMES = [
    r"model\.diffusion_model\.input_blocks\.1\.",
    r"model\.diffusion_model\.output_blocks\.3\.1\.",
    r"model\.diffusion_model\.middle_block\.0\.in_layers\.2",
    r"cond_stage_model\.transformer\.text_model\.encoder\.layers\.0\.",
    r"first_stage_model\.decoder\.conv_in",
    r"cond_stage_model\.transformer\.text_model\.embeddings\.position_ids",
]

# (case, arch, base name patterns, base dtype, LoRA naming, [(stem, target key, row slice or None)], metadata)
CASES = [
    (
        "sd1-kohya",  # kohya sd-scripts train_network.py on SD1.5: diffusers module names, `_`-joined
        "sd1",
        SD1_NAMES,
        torch.float16,
        "kohya",
        [
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
             "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", None),
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
             "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", None),
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
             "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight", None),
            ("lora_unet_down_blocks_0_attentions_0_proj_in",  # conv 1x1 in SD1
             "model.diffusion_model.input_blocks.1.1.proj_in.weight", None),
            ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
             "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.ff.net.0.proj.weight", None),
            ("lora_unet_mid_block_resnets_0_conv1",  # LoCon 3x3
             "model.diffusion_model.middle_block.0.in_layers.2.weight", None),
            ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
             "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", None),
            ("lora_te_text_model_encoder_layers_0_mlp_fc1",
             "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", None),
        ],
        {"ss_base_model_version": "sd_v1"},
    ),
    (
        "sd1-diffusers-peft",  # diffusers train_text_to_image_lora.py (PEFT names, `unet.` prefix)
        "sd1",
        SD1_NAMES,
        torch.float16,
        "peft",
        [
            ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v",
             "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_v.weight", None),
            ("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
             "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_out.0.weight", None),
            ("text_encoder.text_model.encoder.layers.0.self_attn.k_proj",
             "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight", None),
        ],
        {},
    ),
    (
        "sd1-diffusers-attnproc",  # diffusers < 0.21 attention-processor LoRA (`to_q_lora.up`)
        "sd1",
        SD1_NAMES,
        torch.float16,
        "diffusers_old",
        [
            ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q",
             "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", None),
            ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out",
             "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight", None),
        ],
        {},
    ),
    (
        "sdxl-kohya-te2-slices",  # kohya sdxl_train_network.py: SGM UNet names, te1 CLIP-L, te2 OpenCLIP-G
        "sdxl",
        [
            r"model\.diffusion_model\.input_blocks\.4\.1\.transformer_blocks\.0\.",
            r"conditioner\.embedders\.0\.transformer\.text_model\.encoder\.layers\.0\.",
            r"conditioner\.embedders\.1\.model\.transformer\.resblocks\.0\.",
        ],
        torch.float16,
        "kohya",
        [
            ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
             "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", None),
            ("lora_te1_text_model_encoder_layers_0_self_attn_v_proj",
             "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.v_proj.weight", None),
            ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
             "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", (0, 1280)),
            ("lora_te2_text_model_encoder_layers_0_self_attn_v_proj",
             "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", (2560, 1280)),
            ("lora_te2_text_model_encoder_layers_0_mlp_fc1",
             "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight", None),
        ],
        {"ss_base_model_version": "sdxl_base_v1-0"},
    ),
    (
        "flux-aitoolkit-slices",  # ai-toolkit / diffusers Flux LoRA: separate q/k/v into fused qkv and linear1
        "flux",
        [r"double_blocks\.0\.img_attn\.qkv", r"double_blocks\.0\.txt_attn\.qkv", r"single_blocks\.0\.linear1", r"single_blocks\.0\.norm"],
        torch.bfloat16,
        "peft",
        [
            ("transformer.transformer_blocks.0.attn.to_k",
             "model.diffusion_model.double_blocks.0.img_attn.qkv.weight", (3072, 3072)),
            ("transformer.transformer_blocks.0.attn.add_v_proj",
             "model.diffusion_model.double_blocks.0.txt_attn.qkv.weight", (6144, 3072)),
            ("transformer.single_transformer_blocks.0.attn.to_q",
             "model.diffusion_model.single_blocks.0.linear1.weight", (0, 3072)),
            ("transformer.single_transformer_blocks.0.proj_mlp",
             "model.diffusion_model.single_blocks.0.linear1.weight", (9216, 12288)),
        ],
        {},
    ),
    (
        "flux-kohya-fused",  # kohya flux_train_network.py: whole fused qkv
        "flux",
        [r"double_blocks\.0\.img_attn\.qkv", r"single_blocks\.0\.linear2", r"single_blocks\.0\.norm"],
        torch.bfloat16,
        "kohya",
        [
            ("lora_unet_double_blocks_0_img_attn_qkv", "model.diffusion_model.double_blocks.0.img_attn.qkv.weight", None),
            ("lora_unet_single_blocks_0_linear2", "model.diffusion_model.single_blocks.0.linear2.weight", None),
        ],
        {"ss_base_model_version": "flux1"},
    ),
    (
        "sd3-diffusers-slices",  # diffusers train_dreambooth_lora_sd3.py
        "sd3",
        [r"joint_blocks\.0\.x_block\.attn\.qkv", r"joint_blocks\.0\.context_block\.attn\.", r"joint_blocks\.0\.x_block\.mlp\.fc1"],
        torch.float16,
        "peft",
        [
            ("transformer.transformer_blocks.0.attn.to_v",
             "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", (3072, 1536)),
            ("transformer.transformer_blocks.0.attn.add_q_proj",
             "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight", (0, 1536)),
            ("transformer.transformer_blocks.0.attn.to_add_out",
             "model.diffusion_model.joint_blocks.0.context_block.attn.proj.weight", None),
            ("transformer.transformer_blocks.0.ff.net.0.proj",
             "model.diffusion_model.joint_blocks.0.x_block.mlp.fc1.weight", None),
        ],
        {},
    ),
]


def _shape_of(base: dict[str, torch.Tensor], key: str, sl) -> tuple[int, ...]:
    shape = tuple(base[key].shape)
    return (sl[1], *shape[1:]) if sl else shape


def build_case(tmp_path, arch, patterns, dtype, naming, rows, metadata, *, rank=4, seed=0, base=None):
    """Writes base.safetensors (unless `base`, the tensors of one already written, is given) and lora{seed}."""
    if base is None:
        base = build_checkpoint(str(tmp_path / "base.safetensors"), arch, select(arch, patterns), float_dtype=dtype, metadata={"base": "yes"})
    modules = []
    for stem, key, sl in rows:
        shape = _shape_of(base, key, sl)
        modules.append((stem, shape[0], shape[1], *(shape[2:3] if len(shape) == 4 else ())))
    lora = make_lora(modules, rank=rank, naming=naming, conv3x3=True, seed=seed, alpha=rank / 2 if naming == "kohya" else None)
    lora_path = save_lora(str(tmp_path / f"lora{seed}.safetensors"), lora, metadata)
    return base, lora, lora_path


def _span(base, key, sl) -> tuple[int, int]:
    """The rows [start, stop) a row of a case targets."""
    return (sl[0], sl[0] + sl[1]) if sl else (0, base[key].shape[0])


def expected_after(base, loras_with_strength, rows, naming):
    """Independent fp64 recomputation: W + Σ s·(alpha/r)·up@down on each row's slice.

    Returns {key: {(start, stop): fp64 rows}} for the targeted row spans only (the other rows must
    equal the base), and under "__magnitude__" the same for Σ|terms|, for fp32 error bounds."""
    up_sfx, down_sfx = {
        "kohya": (".lora_up.weight", ".lora_down.weight"),
        "peft": (".lora_B.weight", ".lora_A.weight"),
        "diffusers_old": ("_lora.up.weight", "_lora.down.weight"),
    }[naming]
    out: dict = {}
    magnitude: dict = {}
    for _, key, sl in rows:
        span = _span(base, key, sl)
        if span not in out.setdefault(key, {}):
            assert all(b <= span[0] or span[1] <= a for a, b in out[key]), f"{key}: overlapping spans"
            out[key][span] = base[key][slice(*span)].double()
            magnitude.setdefault(key, {})[span] = out[key][span].abs()
    for lora, s in loras_with_strength:
        for stem, key, sl in rows:
            up, down = lora[stem + up_sfx].double(), lora[stem + down_sfx].double()
            alpha = lora.get(stem + ".alpha")
            scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
            span = _span(base, key, sl)
            want = out[key][span]
            want += (up.flatten(1) @ down.flatten(1)).mul_(scale * s).reshape(want.shape)
            magnitude[key][span] += (up.flatten(1).abs() @ down.flatten(1).abs()).mul_(abs(scale * s)).reshape(want.shape)
    out["__magnitude__"] = magnitude
    return out


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` values around each |x| (subnormal spacing floors it)."""
    mantissa_bits = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[dtype]
    _, exp = torch.frexp(x.double().abs())
    spacing = torch.ldexp(torch.ones_like(x, dtype=torch.float64), exp - 1 - mantissa_bits)
    return spacing.clamp_min(torch.finfo(dtype).tiny * torch.finfo(dtype).eps)


def assert_close_in_dtype(got: torch.Tensor, want64: torch.Tensor, key: str, magnitude: torch.Tensor):
    """Equal to the fp64 result rounded to the output dtype, up to one unit in the last place
    (our fp32 intermediate may round the other way at a tie), plus the fp32 rounding of the
    terms (`magnitude` = Σ|terms|) where they cancel.

    The bound is positive everywhere, so only the values that differ need it: it is computed there
    (under 1% of a real-shape tensor when the check passes)."""
    want = want64.to(got.dtype)
    off = got != want  # NaN is off too, and then fails the bound below
    got, want, magnitude = got[off], want[off], magnitude[off]
    diff = (got.double() - want.double()).abs()
    allowed = torch.maximum(ulp(got, got.dtype), ulp(want, got.dtype)) + 16 * 2.0**-24 * magnitude
    assert bool((diff <= allowed).all()), f"{key}: max diff {diff.max().item()} exceeds 1 ulp"
    assert off.float().mean().item() < 0.01, f"{key}: more than 1% of values off by an ulp"


def check_targeted(merged, base, want, rows):
    """Each targeted row span within an ulp of the fp64 result; rows outside every span unchanged."""
    for key, key_spans in want.items():
        if key == "__magnitude__":
            continue
        touched = torch.zeros(base[key].shape[0], dtype=torch.bool)
        for span, want64 in key_spans.items():
            rows_ = slice(*span)
            touched[rows_] = True
            assert_close_in_dtype(merged[key][rows_], want64, key, want["__magnitude__"][key][span])
            assert not torch.equal(merged[key][rows_], base[key][rows_])
        assert torch.equal(merged[key][~touched], base[key][~touched]), key


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """dtype -> (folder, base tensors, LoRA tensors, LoRA path) of CASES[0], built once per dtype for the
    tests below that only read them (each writes its outputs to its own tmp_path)."""
    made = {}

    def get(dtype: torch.dtype):
        if dtype not in made:
            folder = tmp_path_factory.mktemp("sd1")
            _, arch, patterns, _, naming, rows, metadata = CASES[0]
            made[dtype] = (folder, *build_case(folder, arch, patterns, dtype, naming, rows, metadata))
        return made[dtype]

    return get


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_merge_matches_independent_math(tmp_path, case):
    _, arch, patterns, dtype, naming, rows, metadata = case
    base, lora, lora_path = build_case(tmp_path, arch, patterns, dtype, naming, rows, metadata)
    out = tmp_path / "out.safetensors"
    code, stdout, err = run_main(["merge", str(tmp_path / "base.safetensors"), "--lora", f"{lora_path}:0.75", "-o", str(out), "--json"])
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["loras"][0]["unmatched"] == {}
    assert sum(summary["loras"][0]["applied"].values()) == len(rows)
    merged = load_file(str(out))
    want = expected_after(base, [(lora, 0.75)], rows, naming)
    targeted = {key for _, key, _ in rows}
    with safe_open(str(tmp_path / "base.safetensors"), "pt") as f:  # the names load_file gives, without the data
        assert list(merged) == list(f.keys())
    check_targeted(merged, base, want, rows)
    for key, tensor in merged.items():
        assert tensor.dtype == base[key].dtype and tensor.shape == base[key].shape
        if key not in targeted:
            assert torch.equal(tensor.reshape(-1).view(torch.uint8), base[key].reshape(-1).view(torch.uint8)), key
    assert summary["tensors_changed"] == len(targeted)


def test_output_keeps_base_order_metadata_and_provenance(tmp_path, sd1):
    folder, _, _, lora_path = sd1(CASES[0][3])
    out = tmp_path / "merged.safetensors"
    code, stdout, err = run_main(["merge", str(folder / "base.safetensors"), "--lora", f"{lora_path}:0.5:0.25", "-o", str(out), "--json"])
    assert code == 0, err
    from lorabake.st_reader import SafetensorsReader

    with SafetensorsReader(folder / "base.safetensors") as b, SafetensorsReader(out) as o:
        assert list(b.tensors) == list(o.tensors)
        meta = o.metadata
    assert meta["base"] == "yes"
    loras = json.loads(meta["lorabake.loras"])
    assert loras[0]["file"] == "lora0.safetensors" and loras[0]["strength"] == 0.5 and loras[0]["te_strength"] == 0.25
    import hashlib

    with SafetensorsReader(lora_path) as lr:
        data = open(lora_path, "rb").read()[lr.headers[0].data_offset:]
    assert loras[0]["data_sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["modelspec.title"] == "merged"
    assert meta["modelspec.merged_from"] == "base, lora0"
    summary = json.loads(stdout)
    assert summary["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert summary["autov2"] == summary["sha256"][:10]


def test_te_strength_applies_to_text_encoder_only(tmp_path, sd1):
    rows = CASES[0][5]
    folder, base, lora, lora_path = sd1(torch.float32)
    out = tmp_path / "o.safetensors"
    code, _, err = run_main(["merge", str(folder / "base.safetensors"), "--lora", f"{lora_path}:1.0:0", "-o", str(out)])
    assert code == 0, err
    merged = load_file(str(out))
    for stem, key, _ in rows:
        if stem.startswith("lora_te"):
            assert torch.equal(merged[key], base[key])
        else:
            assert not torch.equal(merged[key], base[key])


def test_two_loras_add_up_and_unbake_returns_w(tmp_path, sd1):
    _, arch, patterns, _, naming, rows, metadata = CASES[0]
    folder, base, lora_a, path_a = sd1(torch.float32)
    _, lora_b, path_b = build_case(tmp_path, arch, patterns, torch.float32, naming, rows, metadata, seed=1, base=base)
    both = tmp_path / "both.safetensors"
    code, _, err = run_main(["merge", str(folder / "base.safetensors"), "--lora", f"{path_a}:0.5", "--lora", f"{path_b}:-1.25", "-o", str(both)])
    assert code == 0, err
    merged = load_file(str(both))
    want = expected_after(base, [(lora_a, 0.5), (lora_b, -1.25)], rows, naming)
    for _, key, _ in rows:
        torch.testing.assert_close(merged[key].double(), want[key][_span(base, key, None)], rtol=0, atol=1e-6)
    undone = tmp_path / "undone.safetensors"
    code, _, err = run_main(["merge", str(both), "--lora", f"{path_a}:-0.5", "--lora", f"{path_b}:1.25", "-o", str(undone)])
    assert code == 0, err
    back = load_file(str(undone))
    for _, key, _ in rows:
        torch.testing.assert_close(back[key], base[key], rtol=0, atol=1e-6)


def test_unmatched_module_fails_before_writing(tmp_path):
    _, arch, patterns, dtype, naming, rows, metadata = CASES[0]
    names = select(arch, patterns)
    build_checkpoint(str(tmp_path / "base.safetensors"), arch, names)
    rows_plus = [(r[0], 320, 320) for r in rows[:1]] + [("lora_unet_down_blocks_9_attentions_0_proj_in", 320, 320)]
    lora_path = save_lora(str(tmp_path / "l.safetensors"), make_lora(rows_plus, rank=4), metadata)
    out = tmp_path / "o.safetensors"
    code, _, err = run_main(["merge", str(tmp_path / "base.safetensors"), "--lora", lora_path, "-o", str(out)])
    assert code == 1
    assert "down_blocks_9" in err and "--allow-unmatched" in err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["base.safetensors", "l.safetensors"]
    code, stdout, err = run_main(["merge", str(tmp_path / "base.safetensors"), "--lora", lora_path, "-o", str(out), "--allow-unmatched", "--json"])
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["loras"][0]["applied"] and summary["loras"][0]["unmatched"]
    assert out.exists()


def test_dry_run_writes_nothing_and_shows_the_plan(tmp_path, sd1):
    folder, _, _, lora_path = sd1(CASES[0][3])
    before = sorted(os.listdir(folder))
    code, stdout, err = run_main(["merge", str(folder / "base.safetensors"), "--lora", lora_path, "--dry-run"])
    assert code == 0, err
    assert "applied" in stdout and "nothing written" in stdout
    assert sorted(os.listdir(folder)) == before


def test_arch_mismatch_names_both(tmp_path):
    names = select("sd1", SD1_NAMES)
    build_checkpoint(str(tmp_path / "base.safetensors"), "sd1", names)
    lora = make_lora([("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048)], rank=4)
    lora_path = save_lora(str(tmp_path / "sdxl_lora.safetensors"), lora, {"ss_base_model_version": "sdxl_base_v1-0"})
    code, _, err = run_main(["merge", str(tmp_path / "base.safetensors"), "--lora", lora_path, "-o", str(tmp_path / "o.safetensors")])
    assert code == 1
    assert "sdxl" in err and "sd1" in err and "sdxl_lora.safetensors" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_text_encoder_modules_skipped_on_unet_only_base(tmp_path):
    names = [n for n in select("sd1", SD1_NAMES) if n.startswith("model.diffusion_model.")]
    strip = lambda n: n.removeprefix("model.diffusion_model.")  # noqa: E731
    build_checkpoint(str(tmp_path / "unet.safetensors"), "sd1", names, rename=strip)
    _, _, _, _, naming, rows, metadata = CASES[0]
    modules = [(rows[0][0], 320, 320), ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)]
    lora_path = save_lora(str(tmp_path / "l.safetensors"), make_lora(modules, rank=4), metadata)
    code, stdout, err = run_main(["merge", str(tmp_path / "unet.safetensors"), "--lora", lora_path, "-o", str(tmp_path / "o.safetensors"), "--json"])
    assert code == 0, err
    summary = json.loads(stdout)["loras"][0]
    assert sum(summary["applied"].values()) == 1
    assert summary["skipped"] == {"te1": 1}
    assert "base has no te1" in summary["not_applied"][0]["reason"]


def test_output_dtype_conversion(tmp_path, sd1):
    folder, base, _, lora_path = sd1(torch.float32)
    out = tmp_path / "o.safetensors"
    code, _, err = run_main(["merge", str(folder / "base.safetensors"), "--lora", lora_path, "-o", str(out), "--dtype", "bf16"])
    assert code == 0, err
    with safe_open(str(out), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if base[key].is_floating_point():
                assert t.dtype == torch.bfloat16
            else:
                assert torch.equal(t, base[key])  # int position_ids untouched


def _has(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_available()
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        return bool(mps and mps.is_available())
    return True


@pytest.mark.parametrize("device", ["auto", "cuda", "mps"])
def test_device_paths_agree_with_cpu(tmp_path, sd1, device):
    if not _has(device):
        pytest.skip(f"no {device} device here")
    naming, rows = CASES[0][4], CASES[0][5]
    folder, base, lora, lora_path = sd1(CASES[0][3])
    outs = {}
    for dev in dict.fromkeys(("cpu", device)):
        out = tmp_path / f"o-{dev}.safetensors"
        code, _, err = run_main(["merge", str(folder / "base.safetensors"), "--lora", lora_path, "-o", str(out), "--device", dev])
        assert code == 0, err
        outs[dev] = load_file(str(out))
    check_targeted(outs[device], base, expected_after(base, [(lora, 1.0)], rows, naming), rows)


def test_unavailable_device_is_a_usage_error(tmp_path, sd1):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    folder, _, _, lora_path = sd1(CASES[0][3])
    code, _, err = run_main(["merge", str(folder / "base.safetensors"), "--lora", lora_path, "-o", str(tmp_path / "o.safetensors"), "--device", "cuda:3"])
    assert code == 2 and "CUDA is not available" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_diffusers_folder_base(tmp_path):
    """A diffusers folder (model_index.json + unet/ + text_encoder/) reads as one logical model."""
    from safetensors.torch import save_file

    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "text_encoder").mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    g = torch.Generator().manual_seed(0)
    unet = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.randn(320, 768, generator=g),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": torch.randn(320, 320, generator=g),
    }
    te = {"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(768, 768, generator=g)}
    save_file(unet, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    save_file(te, str(folder / "text_encoder" / "model.safetensors"))
    rows = [("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", None),
            ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight", None)]
    lora = make_lora([("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 320, 768),
                      ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 768, 768)], naming="peft", rank=4)
    lora_path = save_lora(str(tmp_path / "l.safetensors"), lora, {})
    out = tmp_path / "o.safetensors"
    code, stdout, err = run_main(["merge", str(folder), "--lora", lora_path, "-o", str(out), "--json"])
    assert code == 0, err
    merged = load_file(str(out))
    base = {"unet." + k: v for k, v in unet.items()} | {"text_encoder." + k: v for k, v in te.items()}
    assert set(merged) == set(base)
    want = expected_after(base, [(lora, 1.0)], rows, "peft")
    for _, key, _ in rows:
        torch.testing.assert_close(merged[key].double(), want[key][_span(base, key, None)], rtol=0, atol=1e-5)


def test_reshape_weight_is_refused_not_skipped(tmp_path):
    """BFL control LoRAs carry `reshape_weight` (widening img_in): refused by name, never half-applied."""
    names = select("flux", [r"model\.diffusion_model\.img_in\.", r"double_blocks\.0\.img_attn\.qkv"])
    build_checkpoint(str(tmp_path / "base.safetensors"), "flux", names, float_dtype=torch.bfloat16)
    lora = make_lora([("diffusion_model.img_in", 3072, 64)], naming="peft", rank=4)
    lora["diffusion_model.img_in.reshape_weight"] = torch.tensor([3072, 128])
    lora_path = save_lora(str(tmp_path / "control.safetensors"), lora, {})
    code, _, err = run_main(["merge", str(tmp_path / "base.safetensors"), "--lora", lora_path, "-o", str(tmp_path / "o.safetensors")])
    assert code == 1 and "reshape_weight" in err
    assert not (tmp_path / "o.safetensors").exists()
