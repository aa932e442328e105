"""Quantize on the way out: a bf16 Flux-shaped base plus a LoRA becomes, in one `lorabake merge`,
a ComfyUI fp8/nvfp4 file (per-layer `comfy_quant` layout) or a GGUF (Q8_0, Q4_K_M), with the
usual layers (embedders, final layer, norms, biases, 1-D and small tensors) kept in high
precision; the output dequantizes to the fp64 bake within the format's own error and is itself a
base lorabake (and ComfyUI's layout rules) accept.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lorabake.quant import fp8
from lorabake.quant.comfy import find_layers
from lorabake.st_reader import SafetensorsReader
from tests.cli_helpers import run_main
from tests.lorafix import save_lora
from tests.test_lowprecision import PROJ, TARGETS, delta64, flux_values, lora_for, merge, write_ordered

STEMS = {**TARGETS, PROJ[0]: PROJ[1]}
KEPT = set(TARGETS.values())  # img_in, time_in, final_layer: kept high by the default table


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory):
    values = {k: v.to(torch.bfloat16) for k, v in flux_values().items()}
    path = tmp_path_factory.mktemp("base") / "flux-bf16.safetensors"
    write_ordered(path, values)
    return path, values


def want_of(values, lora, name, strength):
    stem = next(s for s, k in STEMS.items() if k == name)
    return values[name].double() + delta64(lora, stem, strength)


# nvfp4/mxfp8/int8 outputs share this path (policy + codec table); their codecs are checked in
# test_quant_codecs and their re-bake in test_quant_comfy
@pytest.mark.parametrize(("quant", "codec", "rel"), [("fp8", fp8, 0.04)])
def test_bf16_base_to_comfy_quantized_file(tmp_path, bf16_base, quant, codec, rel):
    base_path, values = bf16_base
    lora = lora_for(STEMS, {k: tuple(values[k].shape) for k in STEMS.values()}, alpha=4.0)
    lora_path = save_lora(tmp_path / "l.safetensors", lora)
    code, doc, err, out = merge(tmp_path, base_path, lora_path, "--quant", quant, strength=0.5)
    assert code == 0, err
    with SafetensorsReader(out) as r:
        layers = find_layers(r.tensors, r.metadata, r.read_bytes, path=str(out))
        assert "_quantization_metadata" in r.metadata
    assert set(layers) == {PROJ[1], "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"}
    assert all(layer.refused is None for layer in layers.values())
    got = load_file(str(out))
    for name in KEPT:  # kept in high precision: bf16, patched in place
        assert got[name].dtype == torch.bfloat16
        assert float((got[name].double() - want_of(values, lora, name, 0.5)).abs().max()) < 0.01
    module = PROJ[1][: -len(".weight")]
    stored = {role: got[f"{module}.{role}"] for role in ("weight", *codec.ROLES)}
    real = codec.decode(stored).double()
    want = want_of(values, lora, PROJ[1], 0.5)
    assert float((real - want).norm() / want.norm()) < rel
    assert doc["quantization_error"][PROJ[1]] < rel
    # the output is a base lorabake bakes into again, in the same format
    code, _, err, again = merge(tmp_path, out, lora_path, out="again.safetensors", strength=0.1)
    assert code == 0, err
    code, stdout, err = run_main(["inspect", "--json", str(out)])
    q = json.loads(stdout)["files"][0]["quantization"]
    assert q["formats"]["float8_e4m3fn"] == 2 and 8 < q["bits_per_weight"] < 16
    assert "model.diffusion_model.img_in.weight" in q["high_precision"]
    assert q["groups"]["model.diffusion_model.double_blocks.{n}.img_attn.proj.weight"] == {"float8_e4m3fn": 1}


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_bf16_base_to_gguf(tmp_path, bf16_base, quant):
    base_path, values = bf16_base
    lora = lora_for(STEMS, {k: tuple(values[k].shape) for k in STEMS.values()}, alpha=4.0)
    lora_path = save_lora(tmp_path / "l.safetensors", lora)
    code, doc, err, out = merge(tmp_path, base_path, lora_path, "--quant", quant, out="out.gguf", strength=0.5)
    assert code == 0, err
    reader = gguf.GGUFReader(str(out))
    assert reader.get_field("general.architecture").contents() == "flux"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    qkv = "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
    assert types[qkv] == {"Q8_0": "Q8_0", "Q4_K_M": "Q4_K"}[quant]
    assert types[PROJ[1]] == {"Q8_0": "Q8_0", "Q4_K_M": "Q6_K"}[quant]  # attention output: one type up in _M
    assert all(types[k] == "F32" for k in KEPT) and all(types[k] == "F32" for k in values if values[k].dim() == 1)
    t = next(t for t in reader.tensors if t.name == PROJ[1])
    real = gguf.quants.dequantize(np.array(t.data), t.tensor_type).astype(np.float64).reshape(3072, 3072)
    want = want_of(values, lora, PROJ[1], 0.5).numpy()
    assert np.linalg.norm(real - want) / np.linalg.norm(want) < {"Q8_0": 0.01, "Q4_K_M": 0.03}[quant]
    code, _, err, _ = merge(tmp_path, out, lora_path, out="again.gguf", strength=0.1)
    assert code == 0, err
    code, stdout, err = run_main(["inspect", "--json", str(out)])
    rep = json.loads(stdout)["files"][0]
    assert rep["architecture"] == "flux" and rep["quantization"]["formats"][types[qkv]] >= 1
    bits = rep["quantization"]["bits_per_weight"]
    assert {"Q8_0": 8.5 < bits < 12, "Q4_K_M": 4.5 < bits < 12}[quant], bits
    code, stdout, err = run_main(["inspect", str(out)])
    assert code == 0 and "bits per weight" in stdout


def test_quant_usage_errors(tmp_path, bf16_base):
    base_path, values = bf16_base
    lora_path = save_lora(tmp_path / "l.safetensors", lora_for({PROJ[0]: PROJ[1]}, {PROJ[1]: (3072, 3072)}))
    for args, out in ((["--quant", "Q8_0"], "o.safetensors"), (["--quant", "nvfp4"], "o.gguf"), ([], "o.gguf"), (["--quant", "Q9_9"], "o.gguf")):
        code, _, err, path = merge(tmp_path, base_path, lora_path, *args, out=out)
        assert code == 2 and err.startswith("Error:") and not path.exists(), (args, err)
