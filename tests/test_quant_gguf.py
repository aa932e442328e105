"""GGUF: our encoders checked by the `gguf` package's dequantizer for every type we write, and
`lorabake merge` on a Flux-shaped GGUF in city96/ComfyUI-GGUF's layout (architecture key, original
tensor names, a tensor stored reshaped to rows of 256 with `comfy.gguf.orig_shape`): every tensor
keeps its type, name and shape; untouched bytes are identical; patched tensors dequantize to the
fp64 bake within the type's own quantization error. I-quants are refused by name, or written as
the nearest K-quant on request.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from lorabake.quant import ggml, kquants
from tests.lorafix import save_lora
from tests.test_lowprecision import PROJ, TARGETS, delta64, flux_values, lora_for, merge

QT = gguf.GGMLQuantizationType
ENCODABLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# Relative L2 error of N(0, 1) data: the scale of each type's own error, generous by ~1.5×.
TYPICAL = {"F32": 0, "F16": 1e-3, "BF16": 6e-3, "Q8_0": 0.01, "Q6_K": 0.03, "Q5_K": 0.06, "Q5_1": 0.06, "Q5_0": 0.07,
           "Q4_K": 0.12, "Q4_1": 0.12, "Q4_0": 0.13, "Q3_K": 0.25, "Q2_K": 0.5}
P = "model.diffusion_model."


def gguf_dequant(raw: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    kind = ggml.ggml_type(name)
    if name == "BF16":
        return gguf.quants.dequantize(raw.reshape(*shape[:-1], -1), QT.BF16).astype(np.float64)
    return gguf.quants.dequantize(raw.reshape(*shape[:-1], kind.row_bytes(shape[-1])), kind.qtype).astype(np.float64)


@pytest.mark.parametrize("name", ENCODABLE)
def test_encoders_against_gguf_dequantizer(name):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 512, generator=gen) * torch.logspace(-3, 1, 32).unsqueeze(1)
    raw = ggml.encode(x, ggml.ggml_type(name), mode="nearest", seed_key=None)
    back = gguf_dequant(raw, name, (32, 512))
    rel = np.linalg.norm(back - x.double().numpy(), axis=1) / np.linalg.norm(x.double().numpy(), axis=1)
    assert rel.max() <= TYPICAL[name] + 1e-12, (name, rel.max())
    if name not in kquants.ENCODERS:  # block scales set by the extreme values: the grid is a fixed point
        again = ggml.encode(torch.from_numpy(back).float(), ggml.ggml_type(name), mode="nearest", seed_key=None)
        assert np.abs(gguf_dequant(again, name, (32, 512)) - back).max() <= 1e-6 * np.abs(back).max(), "not on its own grid"
    if name in ggml.LEGACY:  # nearest rounding is gguf's own quantizer, byte for byte
        assert np.array_equal(raw.reshape(-1), gguf.quants.quantize(x.numpy(), QT[name]).reshape(-1))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_stochastic_rounding_keeps_a_sub_step_delta(name):
    gen = torch.Generator().manual_seed(1)
    kind = ggml.ggml_type(name)
    x = torch.randn(64, 512, generator=gen)
    on_grid = torch.from_numpy(gguf_dequant(ggml.encode(x, kind, mode="nearest", seed_key=None), name, (64, 512))).float()
    # far below half a step, with random signs, and zero at each 16-value group's min and max so
    # that no block's scale or minimum moves (the delta must survive through the rounding alone)
    intended = 0.01 * TYPICAL[name] * (torch.randint(0, 2, on_grid.shape, generator=gen) * 2 - 1).float()
    groups, mask = on_grid.reshape(-1, 16), intended.reshape(-1, 16)
    rows = torch.arange(groups.shape[0])
    mask[rows, groups.argmin(dim=1)] = 0
    mask[rows, groups.argmax(dim=1)] = 0
    outs = [gguf_dequant(ggml.encode(on_grid + intended, kind, mode=m, seed_key="w"), name, (64, 512)) for m in ("nearest", "stochastic", "stochastic")]
    assert np.array_equal(outs[1], outs[2])
    kept = [float(((o - on_grid.double().numpy()) * intended.numpy()).sum() / (intended.double() ** 2).sum()) for o in outs[:2]]
    assert kept[0] < 0.35 and abs(kept[1] - 1) < 0.35, kept


def test_k_quant_scales_are_packed_where_gguf_reads_them():
    # One Q4_K super-block, sub-block j = j + (0 … 1): all ≥ 0, so every minimum is 0 and sub-block
    # j's scale is (j + 1)/15; d = (8/15)/63 = 0.0084656 is stored as fp16 0.0084686, and the 6-bit
    # scales are round((j + 1)/15 / d): 7.99 → 8, 15.98 → 16, 23.96 → 24, 31.49 → 31, 39.36 → 39,
    # 47.23 → 47, 55.11 → 55, 62.98 → 63.
    x = (np.repeat(np.arange(8, dtype=np.float32), 32) + np.tile(np.linspace(0, 1, 32, dtype=np.float32), 8)).reshape(1, 256)
    block = kquants.q4_k(x)
    sc, m = gguf.quants.Q4_K.get_scale_min(block[:, 4:16])
    assert sc.tolist() == [[8, 16, 24, 31, 39, 47, 55, 63]] and m.tolist() == [[0] * 8]
    d = float(block[:, :2].view(np.float16)[0, 0])
    assert d == pytest.approx(8 / 15 / 63, rel=1e-3)
    err = np.abs(gguf.quants.dequantize(block, QT.Q4_K) - x).reshape(8, 32).max(axis=1)
    assert bool((err <= 0.5 * d * sc[0] + 1e-3).all())


# --------------------------------------------------------------------------------------------
# A city96-style Flux GGUF.

LAYOUT = {  # name → GGML type; the untouched qkv is the detection sentinel (all-zero Q8_0 bytes)
    P + "double_blocks.0.img_attn.qkv.weight": "Q8_0",
    PROJ[1]: "Q4_K",
    TARGETS["lora_unet_img_in"]: "Q5_0",  # [3072, 64]: stored as (768, 256) with orig_shape
    TARGETS["lora_unet_time_in_in_layer"]: "Q8_0",
    TARGETS["lora_unet_final_layer_linear"]: "Q6_K",
}


def write_city96(path, values: dict[str, torch.Tensor], types: dict[str, str]) -> dict[str, tuple]:
    """(name → (type, stored shape, raw bytes)) written with gguf's writer as ComfyUI-GGUF's convert does."""
    w = gguf.GGUFWriter(str(path), arch="flux")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    stored = {}
    for name, v in values.items():
        kind = types.get(name, "F32")
        shape = tuple(v.shape)
        data = v
        if len(shape) > 1 and shape[-1] % 256 and v.numel() % 256 == 0:
            data = v.reshape(-1, 256)
            w.add_array(f"comfy.gguf.orig_shape.{name}", list(shape))
        if name.endswith("qkv.weight") or not ggml.ggml_type(kind).encodable:  # all-zero blocks decode to zeros
            raw = np.zeros((data.shape[0], ggml.ggml_type(kind).row_bytes(data.shape[1])), dtype=np.uint8)
        else:
            raw = ggml.encode(data.float(), ggml.ggml_type(kind), mode="nearest", seed_key=None)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=QT[kind])
        stored[name] = (kind, tuple(data.shape), raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.fixture(scope="module")
def values():
    v = flux_values()
    v[P + "double_blocks.0.img_attn.qkv.weight"] = torch.zeros(9216, 3072)
    return v


def real(stored: tuple, shape: tuple[int, ...]) -> np.ndarray:
    kind, sshape, raw = stored
    return gguf_dequant(raw, kind, sshape).reshape(shape)


def test_gguf_base_takes_a_lora_and_keeps_every_type(tmp_path, values):
    base_path = tmp_path / "flux-Q4_K_M.gguf"
    stored = write_city96(base_path, values, LAYOUT)
    stems = {**TARGETS, PROJ[0]: PROJ[1]}
    lora = lora_for(stems, {k: tuple(values[k].shape) for k in stems.values()}, alpha=4.0)
    lora_path = save_lora(tmp_path / "l.safetensors", lora)
    code, doc, err, out = merge(tmp_path, base_path, lora_path, out="out.gguf", strength=0.7)
    assert code == 0, err
    a, b = gguf.GGUFReader(str(base_path)), gguf.GGUFReader(str(out))
    assert b.get_field("general.architecture").contents() == "flux"
    assert b.get_field("comfy.gguf.orig_shape." + TARGETS["lora_unet_img_in"]).contents() == [3072, 64]
    assert b.get_field("lorabake.loras") is not None
    assert [(t.name, t.tensor_type, t.shape.tolist()) for t in a.tensors] == [(t.name, t.tensor_type, t.shape.tolist()) for t in b.tensors]
    got = {t.name: np.array(t.data).reshape(-1).view(np.uint8) for t in b.tensors}
    for name, (kind, sshape, raw) in stored.items():
        if name not in stems.values():
            assert np.array_equal(got[name], raw.reshape(-1)), name
            continue
        shape = tuple(values[name].shape)
        stem = next(s for s, k in stems.items() if k == name)
        want = real(stored[name], shape) + delta64(lora, stem, 0.7).numpy()
        mine = real((kind, sshape, got[name]), shape)
        own = real((kind, sshape, ggml.encode(torch.from_numpy(want).float().reshape(sshape), ggml.ggml_type(kind), mode="nearest", seed_key=None)), shape)
        assert np.linalg.norm(mine - want) <= 1.01 * np.linalg.norm(own - want) + 1e-9, name
        assert np.linalg.norm(mine - want) <= TYPICAL[kind] * np.linalg.norm(want), name
        assert name in doc["quantization_error"]
    assert doc["retyped"] == {}


def test_i_quants_are_refused_by_name_or_written_as_the_nearest_k_quant(tmp_path, values):
    base_path = tmp_path / "iq.gguf"
    write_city96(base_path, values, {**LAYOUT, PROJ[1]: "IQ4_XS"})
    lora_path = save_lora(tmp_path / "l.safetensors", lora_for({PROJ[0]: PROJ[1]}, {PROJ[1]: (3072, 3072)}))
    code, _, err, out = merge(tmp_path, base_path, lora_path, out="out.gguf")
    assert code == 1 and "IQ4_XS" in err and PROJ[1] in err and "Traceback" not in err and not out.exists()
    code, doc, err, out = merge(tmp_path, base_path, lora_path, "--gguf-requant", "nearest", out="near.gguf")
    assert code == 0, err
    assert doc["retyped"] == {PROJ[1]: "IQ4_XS -> Q4_K"}
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types[PROJ[1]] == "Q4_K" and types[TARGETS["lora_unet_img_in"]] == "Q5_0"


def test_gguf_base_needs_a_gguf_output(tmp_path, values):
    base_path = tmp_path / "b.gguf"
    write_city96(base_path, {k: v for k, v in values.items() if "qkv" in k or k == PROJ[1]}, LAYOUT)
    lora_path = save_lora(tmp_path / "l.safetensors", lora_for({PROJ[0]: PROJ[1]}, {PROJ[1]: (3072, 3072)}))
    code, _, err, out = merge(tmp_path, base_path, lora_path, out="out.safetensors")
    assert code == 2 and ".gguf" in err and not out.exists()
