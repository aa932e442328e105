"""No non-finite or silently clamped value reaches an output (issue 17, item 2).

A merge whose result overflows its dtype, a `--dtype fp16` cast of an fp32 tensor holding 1e6,
NaN from the math, strengths and alphas beyond fp32, `extract --alpha 1e10`: each is one `Error:`
line naming the tensor, the LoRA and the largest value, nothing written; `--saturate` clamps and
lists instead; `--json` stays strict JSON. The range limits are checked against torch's own casts.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorabake import finite
from tests.cli_helpers import run_main
from tests.lorafix import make_lora, save_lora
from tests.test_errors import SD1_META, STEM, make_inputs, one_error, untouched

TARGET = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


def _lora_with_alpha(folder, alpha: float, *, dtype=torch.float32, name="big.safetensors") -> str:
    lora = make_lora([(STEM, 320, 320)], rank=4)
    lora[STEM + ".alpha"] = torch.tensor(alpha, dtype=dtype)
    return save_lora(os.path.join(folder, name), lora, SD1_META)


@pytest.mark.parametrize("tag", ["F16", "BF16", "F8_E5M2", "F8_E4M3"])
def test_limits_match_torch_rounding(tag):
    """Just below the overflow point a nearest cast is finite; from it on, torch gives Inf
    (e4m3fn has no Inf: `cast_to` would clamp there, which is what the limit refuses)."""
    from lorabake import dtypes

    dt = dtypes.torch_dtype(tag)
    big, overflow = finite.limits(tag)
    assert big == float(torch.finfo(dt).max)
    at = torch.tensor([overflow], dtype=torch.float32)
    assert float(at) == overflow  # the limit is an fp32 number
    below = torch.nextafter(at, torch.zeros(1))
    assert float(below.to(dt).float()) == big
    if tag != "F8_E4M3":
        assert torch.isinf(at.to(dt).float()).all()


def test_guard_passes_the_common_case_and_names_the_fault():
    x = torch.randn(64, 64)
    finite.guard(x, "F16", tensor="t", sources=["l.safetensors"])
    x[3, 4] = 70000.0
    with pytest.raises(finite.RangeError, match=r"l\.safetensors: tensor 't': baked values reach 7e\+04.*F16's range"):
        finite.guard(x, "F16", tensor="t", sources=["l.safetensors"])
    finite.guard(x, "BF16", tensor="t", sources=["l.safetensors"])
    x[0, 0] = float("nan")
    with pytest.raises(finite.RangeError, match="NaN"):
        finite.guard(x, "F32", tensor="t", sources=["l.safetensors"], saturated={})
    base = torch.zeros(3)
    base[1] = float("inf")
    finite.guard(base.clone(), "F16", tensor="t", sources=["b"], base32=base)  # the input's own Inf


def test_overflow_into_fp16_is_an_error_naming_tensor_lora_and_value(tmp_path, good):
    base, _ = good
    lora = _lora_with_alpha(tmp_path, 1e30)
    out = tmp_path / "o.safetensors"
    with untouched(tmp_path, os.path.dirname(base)):
        line = one_error(run_main(["merge", base, "--lora", lora, "-o", str(out)]),
                         lora, f"tensor '{TARGET}'", "baked values reach", "beyond F16's range (±65504)", "--saturate")
    assert "e+2" in line  # the largest value, ~1e28


def test_saturate_clamps_and_reports(tmp_path, good):
    base, _ = good
    lora = _lora_with_alpha(tmp_path, 1e30)
    out = tmp_path / "o.safetensors"
    code, stdout, err = run_main(["merge", base, "--lora", lora, "-o", str(out), "--saturate", "--json"])
    assert code == 0, err
    doc = json.loads(stdout)
    assert list(doc["saturated"]) == [TARGET] and doc["saturated"][TARGET] > 1e20
    merged = load_file(str(out))
    assert torch.isfinite(merged[TARGET].float()).all()
    assert float(merged[TARGET].float().abs().max()) == 65504.0
    code, stdout, err = run_main(["merge", base, "--lora", lora, "-o", str(tmp_path / "p.safetensors"), "--saturate"])
    assert code == 0 and "clamped to the output dtype's range" in stdout and TARGET in stdout


def test_cast_of_a_large_fp32_value_to_fp16_is_an_error(tmp_path, good):
    _, lora = good
    base = tmp_path / "base32.safetensors"
    tensors = {k: v.float() for k, v in load_file(good[0]).items()}
    name = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.bias"
    assert name in tensors
    tensors[name][7] = 1e6
    save_file(tensors, str(base))
    with untouched(tmp_path):
        one_error(run_main(["merge", str(base), "--lora", lora, "-o", str(tmp_path / "o.safetensors"), "--dtype", "fp16"]),
                  str(base), f"tensor '{name}'", "1e+06", "F16's range")
    code, _, err = run_main(["merge", str(base), "--lora", lora, "-o", str(tmp_path / "o.safetensors"), "--dtype", "bf16"])
    assert code == 0, err


def test_inf_from_fp32_overflow_is_an_error(tmp_path, good):
    base, _ = good
    lora = make_lora([(STEM, 320, 320)], rank=4)
    lora[STEM + ".lora_up.weight"] = torch.full((320, 4), 10.0)
    lora[STEM + ".lora_down.weight"] = torch.full((4, 320), 10.0)
    lora[STEM + ".alpha"] = torch.tensor(3e38)  # scale 7.5e37, ΔW 3e40: beyond fp32 itself
    path = save_lora(str(tmp_path / "inf.safetensors"), lora, SD1_META)
    with untouched(tmp_path, os.path.dirname(base)):
        one_error(run_main(["merge", base, "--lora", path, "-o", str(tmp_path / "o.safetensors"), "--json", "--dtype", "fp32"]),
                  path, f"tensor '{TARGET}'", "baked values would be Inf")


def test_strength_times_scale_beyond_fp32_is_an_error_before_writing(tmp_path, good):
    base, _ = good
    lora = _lora_with_alpha(tmp_path, 3e38)  # each number fits fp32, strength · alpha/rank does not
    with untouched(tmp_path, os.path.dirname(base)):
        one_error(run_main(["merge", base, "--lora", f"{lora}:1e5", "-o", str(tmp_path / "o.safetensors")]),
                  lora, "strength 100000 × scale 7.5e+37", "beyond fp32")


@pytest.mark.parametrize("strength", ["1e39", "-1e39", "1e-50"])
def test_strength_outside_fp32_is_a_usage_error(tmp_path, good, strength):
    base, lora = good
    with untouched(tmp_path, os.path.dirname(base)):
        one_error(run_main(["merge", base, "--lora", f"{lora}:{strength}", "-o", str(tmp_path / "o.safetensors")]),
                  strength, "outside what fp32 holds", code=2)


def test_alpha_1e300_in_a_file_is_one_error_naming_it(tmp_path, good):
    base, _ = good
    f64 = _lora_with_alpha(tmp_path, 1e300, dtype=torch.float64, name="f64.safetensors")
    peft = make_lora([("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 320, 320)], naming="peft", rank=4)
    peft_path = save_lora(str(tmp_path / "peft.safetensors"), peft, {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 1e300})})
    with untouched(tmp_path, os.path.dirname(base)):
        one_error(run_main(["merge", base, "--lora", f64, "-o", str(tmp_path / "o.safetensors")]), f64)
        one_error(run_main(["merge", base, "--lora", peft_path, "-o", str(tmp_path / "o.safetensors")]),
                  peft_path, "alpha 1e+300 is outside what fp32 holds")
        one_error(run_main(["inspect", peft_path]), peft_path, "outside what fp32 holds")


def test_json_reports_are_strict(tmp_path, good):
    """No NaN/Infinity tokens even when a value is not finite; DEL and non-ASCII escaped."""
    from lorabake.text import to_json

    text = to_json({"a": float("inf"), "b": [float("nan"), 1.5], "c": "x\x7f\u2028"})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}")) == {"a": None, "b": [None, 1.5], "c": "x\x7f\u2028"}
    assert "\x7f" not in text and "\u2028" not in text


@pytest.mark.parametrize("alpha,dtype", [("1e10", "fp16"), ("1e39", "fp32"), ("1e-10", "fp16")])
def test_extract_alpha_the_output_cannot_hold_is_a_usage_error(tmp_path, good, alpha, dtype):
    base, _ = good
    with untouched(tmp_path, os.path.dirname(base)):
        one_error(run_main(["extract", base, base, "-o", str(tmp_path / "o.safetensors"), "--alpha", alpha, "--dtype", dtype]),
                  "--alpha", code=2)


def test_recipe_saturate_is_merge_saturate(tmp_path, good):
    """`saturate = true` in a recipe entry bakes what `merge --saturate` writes; without it the
    entry fails as merge does, and nothing is written."""
    base, _ = good
    lora = _lora_with_alpha(tmp_path, 1e30)
    recipe = tmp_path / "r.toml"
    entry = f'[[bake]]\nbase = "{base}"\nloras = ["{lora}"]\noutput = "{{name}}.safetensors"\n'
    recipe.write_text(entry.replace("[[bake]]\n", '[[bake]]\nname = "plain"\n'))
    code, _, err = run_main(["bake", str(recipe)])
    assert code == 1 and "beyond F16's range" in err and not (tmp_path / "plain.safetensors").exists()
    recipe.write_text(entry.replace("[[bake]]\n", '[[bake]]\nname = "sat"\nsaturate = true\n'))
    code, _, err = run_main(["bake", str(recipe), "--quiet"])
    assert code == 0, err
    code, _, err = run_main(["merge", base, "--lora", lora, "-o", str(tmp_path / "ref.safetensors"), "--saturate", "--quiet"])
    assert code == 0, err
    got, want = load_file(str(tmp_path / "sat.safetensors")), load_file(str(tmp_path / "ref.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
