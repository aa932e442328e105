"""The adapter registry: one module per type; every factor checked against its target before a
byte is written; scalars decoded without torch; header-only commands never import torch."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from lorabake import adapters
from lorabake.adapters import grammar
from lorabake.adapters.scale import decode_scalar, scale_of
from lorabake.errors import LoraFormatError
from lorabake.lora_format import parse_lora
from tests.archfix import build_checkpoint, select
from tests.cli_helpers import ROOT, run_main
from tests.lorafix import fake_header, make_lora, save_lora
from tests.test_errors import SD1_META, SD1_SMALL, STEM, TE_STEM, make_inputs, one_error, untouched

# -- 1. the registry ------------------------------------------------------------------------


def test_every_type_has_its_module_and_every_part_one_owner():
    modules = {a.name: a for a in adapters.ADAPTERS.values()}
    assert set(modules) == {"lora", "loha", "lokr", "full", "norm", "ia3", "oft", "boft", "glora", "set"}
    texts = [row.text for row in adapters.SUFFIXES]
    assert len(texts) == len(set(texts)), "a suffix is declared twice"
    for part in adapters.PART_NAMES:  # every part is owned by one type or is a known modifier
        modifiers = (*adapters.SCALAR_PARTS, *adapters.DORA_PARTS, *adapters.REFUSED_PARTS, "diff_b")
        assert (part in adapters.PART_ALGO) != (part in modifiers), part
    # parsing, planning and the math ask the same registry
    from lorabake import delta, lora_format, plan

    assert lora_format.SUFFIXES is adapters.SUFFIXES
    assert plan.BIAS_PARTS is adapters.BIAS_PARTS and delta.ALGORITHMS is adapters.ALGORITHMS


def test_grammar_rows_come_from_the_adapter_modules():
    assert grammar.split_key("lora_unet_x.hada_w1_a") == ("lora_unet_x", "hada_w1_a")
    assert grammar.split_key("m.lora_A.default_0.weight") == ("m", "down")
    assert grammar.split_key("m.weight", {"m.weight": 0, "m.on_input": 0}) == ("m", "ia3_weight")


def test_scale_is_one_rule():
    assert scale_of(rank=4, alpha=2.0) == 0.5
    assert scale_of(rank=4, alpha=2.0, scale_part=0.25) == 0.25  # A1111 `scale` wins
    assert scale_of(rank=None, alpha=2.0) == 1.0  # no rank (full, both-full LoKr): alpha never scales
    assert scale_of(rank=4, alpha=None, peft=3.0) == 3.0  # PEFT's own scale, not a stand-in alpha
    assert scale_of(rank=4, alpha=0.0) == 0.0
    assert scale_of(rank=4, alpha=None) == 1.0


# -- 2. scalars decoded from bytes without torch, checked against torch's own decoding -------

FP8 = [("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)]


@pytest.mark.parametrize(("tag", "dtype"), FP8)
def test_every_fp8_byte_decodes_as_torch_does(tag, dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    want = codes.view(dtype).to(torch.float64).tolist()
    for code, expected in zip(range(256), want):
        got = decode_scalar(bytes([code]), tag)
        assert (math.isnan(got) and math.isnan(expected)) or got == expected, (code, got, expected)


@pytest.mark.parametrize(
    ("dtype", "tag"),
    [(torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float32, "F32"), (torch.float64, "F64"),
     (torch.int64, "I64"), (torch.uint8, "U8")],
)
def test_scalars_of_every_width_decode_as_torch_does(dtype, tag):
    values = torch.tensor([0.0, 1.0, -2.5, 8.0, 0.1, 3e4, 7], dtype=torch.float64)
    for v in values.to(dtype):
        raw = v.reshape(1).view(torch.uint8).numpy().tobytes()
        assert decode_scalar(raw, tag) == float(v.to(torch.float64))


def test_e8m0_and_refused_dtypes():
    assert decode_scalar(bytes([127]), "F8_E8M0") == 1.0
    assert decode_scalar(bytes([130]), "F8_E8M0") == 8.0
    with pytest.raises(ValueError, match="C64"):
        decode_scalar(b"\0" * 8, "C64")


def test_bf16_alpha_gives_the_module_its_scale(tmp_path):
    t = make_lora([(STEM, 320, 320)], rank=4, alpha=None)
    t[STEM + ".alpha"] = torch.tensor(2.0, dtype=torch.bfloat16)
    t[STEM + ".lora_up.weight"] = t[STEM + ".lora_up.weight"].to(torch.bfloat16)
    path = save_lora(tmp_path / "bf16.safetensors", t)
    from lorabake.st_reader import SafetensorsReader

    with SafetensorsReader(path) as reader:
        f = parse_lora(reader.tensors, reader.metadata, path=path, read=reader.read_bytes)
    module = f.modules[STEM]
    assert (module.alpha, module.scale) == (2.0, 0.5)


# -- 3. factors checked against their target ------------------------------------------------

# (algo, part shapes, target, fits?) — real layer shapes of SD1/SDXL/video models.
TARGET_ROWS = [
    ("lora", {"up": (320, 4), "down": (4, 320)}, (320, 320), True),  # linear
    ("lora", {"up": (320, 4, 1, 1), "down": (4, 320, 1, 1)}, (320, 320), True),  # 1x1 conv LoRA on a linear
    ("lora", {"up": (320, 4), "down": (4, 320)}, (320, 320, 1, 1), True),  # linear LoRA on a 1x1 conv
    ("lora", {"up": (320, 4, 1, 1), "down": (4, 320, 3, 3)}, (320, 320, 3, 3), True),  # LoCon 3x3
    ("lora", {"up": (320, 4, 1, 1), "mid": (4, 4, 3, 3), "down": (4, 320, 1, 1)}, (320, 320, 3, 3), True),  # Tucker
    ("lora", {"up": (16, 4, 1, 1, 1), "down": (4, 16, 1, 3, 3)}, (16, 16, 1, 3, 3), True),  # 5-D video conv
    ("lora", {"up": (64, 4, 1), "down": (4, 32, 3)}, (64, 32, 3), True),  # 3-D conv (audio/1-D)
    ("lora", {"up": (320, 4), "down": (4, 32, 10)}, (320, 320), False),  # 3-D down on a linear
    ("lora", {"up": (320, 4), "down": (4, 2880)}, (320, 320, 3, 3), False),  # flat down on a 3x3 conv
    ("lora", {"up": (320, 4, 1, 1), "down": (4, 320, 3, 3)}, (320, 2880), False),  # LoCon on a linear
    ("lora", {"up": (320, 4, 1, 1), "down": (4, 320, 3, 3)}, (320, 320, 1, 3, 3), False),  # 2-D conv on 3-D conv
    ("loha", {"hada_w1_a": (320, 4), "hada_w1_b": (4, 2880), "hada_w2_a": (320, 4), "hada_w2_b": (4, 2880)},
     (320, 320, 3, 3), True),  # LyCORIS stores LoHa conv kernels flattened
    ("loha", {"hada_w1_a": (320, 4), "hada_w1_b": (4, 2880), "hada_w2_a": (320, 4), "hada_w2_b": (4, 2880)},
     (320, 2880), True),
    ("lokr", {"lokr_w1": (4, 4), "lokr_w2_a": (80, 2), "lokr_w2_b": (2, 80, 3, 3)}, (320, 320, 3, 3), True),
    ("lokr", {"lokr_w1": (4, 4), "lokr_w2_a": (80, 2), "lokr_w2_b": (2, 80, 3, 3)}, (320, 2880), False),
    ("full", {"diff": (320, 320)}, (320, 320), True),
    ("full", {"diff": (320, 320)}, (320, 320, 1, 1), True),
    ("full", {"diff": (320, 32, 10)}, (320, 320), False),
    ("oft", {"oft_blocks": (20, 16, 16)}, (320, 768), True),
    ("ia3", {"ia3_weight": (768,), "on_input": ()}, (320, 768), True),
]


@pytest.mark.parametrize(("algo", "shapes", "target", "ok"), TARGET_ROWS)
def test_factor_dimensions_fit_the_target(algo, shapes, target, ok):
    fault = adapters.target_fault(algo, shapes, target)
    assert (fault is None) == ok, fault


def _base_and(tmp_path, tensors):
    base, _ = make_inputs(tmp_path / "in")
    return base, save_lora(tmp_path / "bad.safetensors", tensors, SD1_META)


def test_3d_down_on_a_linear_is_refused_before_writing(tmp_path):
    # the [4, 32, 10] lora_down has the element count of [4, 320] but not its layout
    t = make_lora([(STEM, 320, 320)], rank=4)
    t[STEM + ".lora_down.weight"] = t[STEM + ".lora_down.weight"].reshape(4, 32, 10)
    base, bad = _base_and(tmp_path, t)
    out = str(tmp_path / "o.safetensors")
    with untouched(tmp_path):
        for argv in (["merge", base, "--lora", bad, "-o", out], ["merge", base, "--lora", bad, "--dry-run"],
                     ["merge", base, "--lora", bad, "-o", out, "--allow-unmatched"]):
            one_error(run_main(argv), bad, f"tensor '{STEM}.lora_down.weight'", "down has shape [4, 32, 10]",
                      "is a linear layer")


def _retype(dtype):
    def fix(t):
        t[STEM + ".lora_down.weight"] = t[STEM + ".lora_down.weight"].to(dtype)
    return fix


BAD_FACTORS = [
    ("complex64", _retype(torch.complex64), "down has dtype C64", STEM + ".lora_down.weight"),
    ("bool", _retype(torch.bool), "down has dtype BOOL", STEM + ".lora_down.weight"),
    ("int8", _retype(torch.int8), "down has dtype I8", STEM + ".lora_down.weight"),
    ("int64", _retype(torch.int64), "down has dtype I64", STEM + ".lora_down.weight"),
    ("rank 0", lambda t: t.update({STEM + ".lora_up.weight": torch.zeros(320, 0),
                                   STEM + ".lora_down.weight": torch.zeros(0, 320)}),
     "empty dimension", None),
    ("complex alpha", lambda t: t.__setitem__(STEM + ".alpha", torch.tensor(4.0, dtype=torch.complex64)),
     "alpha has dtype C64", STEM + ".alpha"),
    # the plan reads headers only; merge refuses a bad alpha when it reads the LoRA, before writing
    ("NaN alpha", lambda t: t.__setitem__(STEM + ".alpha", torch.tensor(float("nan"))),
     {"merge": "NaN in module", "inspect": "alpha is nan"}, STEM + ".alpha"),
    ("alpha 1e300", lambda t: t.__setitem__(STEM + ".alpha", torch.tensor(1e300, dtype=torch.float64)),
     {"merge": "Inf in module", "inspect": "outside what fp32 represents"}, STEM + ".alpha"),
    ("ranks disagree", lambda t: t.__setitem__(STEM + ".lora_up.weight", torch.randn(320, 3)),
     "ranks disagree", STEM + ".lora_up.weight"),
]


@pytest.mark.parametrize(("case", "fix", "fragment", "tensor"), BAD_FACTORS, ids=[b[0] for b in BAD_FACTORS])
def test_bad_factor_is_one_error_line_naming_file_and_tensor(tmp_path, case, fix, fragment, tensor):
    t = make_lora([(STEM, 320, 320), (TE_STEM, 768, 768)], rank=4)
    fix(t)
    base, bad = _base_and(tmp_path, t)
    named = [f"tensor '{tensor}'"] if tensor else [f"tensor '{STEM}."]
    said = fragment if isinstance(fragment, dict) else {"merge": fragment, "inspect": fragment}
    with untouched(tmp_path):
        one_error(run_main(["merge", base, "--lora", bad, "-o", str(tmp_path / "o.safetensors")]), bad, said["merge"], *named)
        one_error(run_main(["inspect", bad]), bad, said["inspect"], *named)


def test_header_check_names_the_part():
    hdr = fake_header({"m.lora_up.weight": (320, 4), "m.lora_down.weight": (4, 320)}, tag="C64")
    with pytest.raises(LoraFormatError) as info:
        parse_lora(hdr, {}, path="c.safetensors")
    assert info.value.tensor == "m.lora_up.weight" and "C64" in info.value.message


# -- 4. header-only commands do not import torch --------------------------------------------

_PROBE = """
import sys
from lorabake.cli import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("TORCH" if "torch" in sys.modules else "NO-TORCH", code)
"""


def test_help_and_inspect_do_not_import_torch(tmp_path):
    ckpt = str(tmp_path / "sd1.safetensors")
    build_checkpoint(ckpt, "sd1", select("sd1", SD1_SMALL), seed=0)
    t = make_lora([(STEM, 320, 320), (TE_STEM, 768, 768)], rank=4, alpha=None)
    t[STEM + ".alpha"] = torch.tensor(2.0, dtype=torch.bfloat16)  # decoded from its bits
    t[TE_STEM + ".alpha"] = torch.tensor(8.0, dtype=torch.float8_e4m3fn)
    lora = save_lora(tmp_path / "lora.safetensors", t, SD1_META)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for argv in (["--help"], ["inspect", "--help"], ["inspect", ckpt, lora], ["inspect", "--json", lora]):
        run = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env=env)
        assert run.stdout.rstrip().endswith("NO-TORCH 0"), (argv, run.stdout[-300:], run.stderr)
    assert '"0.5": 1' in run.stdout and '"2": 1' in run.stdout  # bf16 alpha 2 / rank 4; fp8 alpha 8 / rank 4
