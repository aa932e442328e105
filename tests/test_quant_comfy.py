"""`lorabake merge` into ComfyUI per-layer quantized Flux bases (float8 with a per-tensor scale,
nvfp4, mxfp8, int8_tensorwise): the output keeps every name, dtype and shape, rewrites the patched
layers' codes and scales, keeps `input_scale` and the `comfy_quant` marker, leaves untouched
layers byte-identical, and dequantizes to the fp64 bake within the format's own rounding error.
Formats that cannot be re-quantised are refused before anything is written.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorabake.quant import fp8, int8, mxfp8, nvfp4
from lorabake.quant.swizzle import padded_grid, unswizzle
from tests.cli_helpers import run_main
from tests.lorafix import save_lora
from tests.test_lowprecision import TARGETS as FLUX_TARGETS
from tests.test_lowprecision import delta64, flux_values, lora_for, merge, same_bytes, write_ordered

CODEC = {"float8_e4m3fn": fp8, "nvfp4": nvfp4, "mxfp8": mxfp8, "int8_tensorwise": int8}
UNTOUCHED = FLUX_TARGETS["lora_unet_time_in_in_layer"]  # quantized too; its bytes must survive
TARGETS = {s: k for s, k in FLUX_TARGETS.items() if k != UNTOUCHED}
QUANTIZED = [*TARGETS.values(), UNTOUCHED]


def marker(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def like_for(fmt: str, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    rows, cols = shape
    return {
        "float8_e4m3fn": {"weight": torch.zeros(0, dtype=torch.float8_e4m3fn), "weight_scale": torch.zeros(())},
        "nvfp4": {"weight_scale": torch.zeros(*padded_grid(rows, cols // 16), dtype=torch.float8_e4m3fn), "weight_scale_2": torch.zeros(())},
        "mxfp8": {"weight_scale": torch.zeros(*padded_grid(rows, cols // 32), dtype=torch.float8_e8m0fnu)},
        "int8_tensorwise": {"weight_scale": torch.zeros(())},
    }[fmt]


def comfy_base(path, fmt: str, values: dict[str, torch.Tensor], *, pre_quant: bool = False) -> dict[str, torch.Tensor]:
    base: dict[str, torch.Tensor] = {}
    for k, v in values.items():
        if k not in QUANTIZED:
            base[k] = v.to(torch.bfloat16)
            continue
        module = k[: -len(".weight")]
        if pre_quant:
            s = torch.linspace(0.5, 2.0, v.shape[1])
            base[module + ".pre_quant_scale"] = s.to(torch.bfloat16)
            v = v / s.to(torch.bfloat16).float()
        for role, t in CODEC[fmt].encode(v.float(), like_for(fmt, tuple(v.shape)), mode="nearest", seed_key=None).items():
            base[f"{module}.{role}"] = t
        base[module + ".input_scale"] = torch.tensor(0.5, dtype=torch.float32)
        base[module + ".comfy_quant"] = marker(fmt)
    layers = {k[: -len(".weight")]: {"format": fmt} for k in QUANTIZED}
    write_ordered(path, base, {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})})
    return base


def real(tensors: dict[str, torch.Tensor], fmt: str, module: str) -> torch.Tensor:
    roles = ("weight", *CODEC[fmt].ROLES)
    w = CODEC[fmt].decode({r: tensors[f"{module}.{r}"] for r in roles}).double()
    pre = tensors.get(module + ".pre_quant_scale")
    return w if pre is None else w * pre.double()


def step_bound(out: dict[str, torch.Tensor], fmt: str, module: str, want: torch.Tensor) -> torch.Tensor:
    """Largest rounding error the stored scales allow at each element, from the format alone."""
    w = out[module + ".weight"]
    if fmt == "nvfp4":
        rows, cols = w.shape[0], w.shape[1] * 2
        grid = unswizzle(out[module + ".weight_scale"], rows, cols // 16).double() * out[module + ".weight_scale_2"].double()
        return grid.repeat_interleave(16, dim=1) * 1.0  # half of the widest e2m1 gap (4 → 6)
    if fmt == "mxfp8":
        rows, cols = w.shape
        e = unswizzle(out[module + ".weight_scale"].view(torch.uint8), rows, cols // 32).double()
        return torch.maximum(want.abs() * 2.0**-4, torch.pow(2.0, e - 127 - 9).repeat_interleave(32, dim=1))
    scale = out[module + ".weight_scale"].double()
    if fmt == "int8_tensorwise":
        return scale * 0.5 + 0 * want
    return torch.maximum(want.abs() * 2.0**-4, scale * 2.0**-10)  # e4m3: 3 mantissa bits, subnormal step 2^-9


@pytest.fixture(scope="module")
def values():
    return flux_values()


@pytest.mark.parametrize("fmt", list(CODEC))
def test_comfy_quantized_base_takes_a_lora(tmp_path, values, fmt):
    base_path = tmp_path / "base.safetensors"
    base = comfy_base(base_path, fmt, values)
    shapes = {k: tuple(values[k].shape) for k in TARGETS.values()}
    lora = lora_for(TARGETS, shapes, alpha=4.0)
    lora_path = save_lora(tmp_path / "l.safetensors", lora)
    code, doc, err, out_path = merge(tmp_path, base_path, lora_path, strength=0.8)
    assert code == 0, err
    out = load_file(str(out_path))
    assert list(out) == list(base)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in out.items()} == {k: (v.dtype, tuple(v.shape)) for k, v in base.items()}
    for stem, key in TARGETS.items():
        module = key[: -len(".weight")]
        want = real(base, fmt, module) + delta64(lora, stem, 0.8)
        got = real(out, fmt, module)
        assert bool(((got - want).abs() <= step_bound(out, fmt, module, want) * 1.0001 + 1e-12).all()), key
        own = CODEC[fmt].decode({**like_for(fmt, want.shape), **CODEC[fmt].encode(want.float(), like_for(fmt, want.shape), mode="nearest", seed_key=None)}).double()
        assert float((got - want).norm()) <= 1.01 * float((own - want).norm()) + 1e-12, key  # the format's own error
        assert not same_bytes(out[module + ".weight_scale"], base[module + ".weight_scale"]), f"{key}: scale not recomputed"
        for kept in (".input_scale", ".comfy_quant"):
            assert same_bytes(out[module + kept], base[module + kept])
        assert doc["lost_to_rounding"]["per_tensor"][key] < 0.25
    for key in base:
        if not any(key.startswith(k[: -len("weight")]) for k in TARGETS.values()):
            assert same_bytes(out[key], base[key]), key


def test_nvfp4_pre_quant_scale_is_part_of_the_real_weight(tmp_path, values):
    base_path = tmp_path / "base.safetensors"
    base = comfy_base(base_path, "nvfp4", values, pre_quant=True)
    stem, key = next(iter(TARGETS.items()))
    module = key[: -len(".weight")]
    lora = lora_for({stem: key}, {key: tuple(values[key].shape)}, alpha=4.0)
    code, _, err, out_path = merge(tmp_path, base_path, save_lora(tmp_path / "l.safetensors", lora))
    assert code == 0, err
    out = load_file(str(out_path))
    want = real(base, "nvfp4", module) + delta64(lora, stem, 1.0)
    rel = float((real(out, "nvfp4", module) - want).norm() / want.norm())
    assert rel < 0.15 and same_bytes(out[module + ".pre_quant_scale"], base[module + ".pre_quant_scale"])


@pytest.mark.parametrize("fmt", ["awq_w4a16", "asym_w4a8_int8", "some_future_format"])
def test_formats_we_cannot_requantise_are_refused_before_writing(tmp_path, values, fmt):
    base_path = tmp_path / "base.safetensors"
    base = comfy_base(tmp_path / "int8.safetensors", "int8_tensorwise", values)
    key = TARGETS["lora_unet_img_in"]
    module = key[: -len(".weight")]
    base[module + ".comfy_quant"] = marker(fmt)
    write_ordered(base_path, base)
    lora_path = save_lora(tmp_path / "l.safetensors", lora_for(TARGETS, {k: tuple(values[k].shape) for k in TARGETS.values()}))
    code, _, err, out_path = merge(tmp_path, base_path, lora_path)
    assert code == 1 and "Traceback" not in err
    assert module in err and fmt in err and err.startswith("Error:") and err.count("\n") == 1
    assert not out_path.exists()


def test_unpatched_layer_of_a_refused_format_is_copied(tmp_path, values):
    base_path = tmp_path / "base.safetensors"
    base = comfy_base(tmp_path / "int8.safetensors", "int8_tensorwise", values)
    base[UNTOUCHED[: -len("weight")] + "comfy_quant"] = marker("awq_w4a16")
    write_ordered(base_path, base)
    lora_path = save_lora(tmp_path / "l.safetensors", lora_for(TARGETS, {k: tuple(values[k].shape) for k in TARGETS.values()}))
    code, _, err, out_path = merge(tmp_path, base_path, lora_path)
    assert code == 0, err
    out = load_file(str(out_path))
    assert same_bytes(out[UNTOUCHED], base[UNTOUCHED])


def test_a_lora_that_vanishes_in_rounding_is_warned_about(tmp_path, values):
    base_path = tmp_path / "base.safetensors"
    comfy_base(base_path, "int8_tensorwise", values)
    lora = lora_for(TARGETS, {k: tuple(values[k].shape) for k in TARGETS.values()})
    lora_path = save_lora(tmp_path / "l.safetensors", lora)
    code, doc, err, _ = merge(tmp_path, base_path, lora_path, strength=1e-5)  # far below an int8 step
    assert code == 0, err
    assert [row["path"] for row in doc["vanished"]] == [str(lora_path)] and doc["vanished"][0]["mean_lost"] > 0.9
    assert set(doc["quantization_error"]) == set(TARGETS.values())
    assert all(0 < e < 0.02 for e in doc["quantization_error"].values())
    code, stdout, err = run_main(["merge", str(base_path), "--lora", f"{lora_path}:1e-5", "-o", str(tmp_path / "t.safetensors")])
    assert code == 0 and "mostly vanished" in stdout
    code, doc, err, _ = merge(tmp_path, base_path, lora_path, "--rounding", "stochastic", strength=1e-5, out="s.safetensors")
    assert code == 0 and doc["vanished"] == []
