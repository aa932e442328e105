"""The ComfyUI quantized formats, checked against blocks worked out by hand from the format
descriptions (comfy-kitchen `comfy_kitchen/tensor/{nvfp4,mxfp8,int8}.py`, the cuBLAS block-scale
tile layout) and against torch's own float8 types; then round trips and stochastic rounding.
"""

from __future__ import annotations

import pytest
import torch

from lorabake.quant import fp8, int8, mxfp8, nvfp4
from lorabake.quant.swizzle import padded_grid, swizzle, unswizzle


def flat_offset(r: int, c: int, cols: int) -> int:
    """Where grid entry (r, c) sits in the tiled layout, written out from the cuBLAS description."""
    tiles_per_row = padded_grid(1, cols)[1] // 4
    tile = (r // 128) * tiles_per_row + c // 4
    return tile * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4


def test_swizzle_places_every_scale_where_the_tile_layout_says():
    rows, cols = 130, 6
    grid = (torch.arange(rows * cols) % 251 + 1).to(torch.uint8).reshape(rows, cols)
    stored = swizzle(grid)
    assert tuple(stored.shape) == (256, 8)
    flat = stored.reshape(-1)
    for r in range(rows):
        for c in range(cols):
            assert flat[flat_offset(r, c, cols)] == grid[r, c]
    assert int((flat != 0).sum()) == rows * cols  # the padding is zeros
    assert torch.equal(unswizzle(stored, rows, cols), grid)


# --------------------------------------------------------------------------------------------
# nvfp4


def nvfp4_stored(rows: int, packed_rows: dict[int, list[int]], block_scales: dict[int, int], scale2: float):
    weight = torch.zeros(rows, 8, dtype=torch.uint8)
    for r, row in packed_rows.items():
        weight[r] = torch.tensor(row, dtype=torch.uint8)
    grid = torch.zeros(rows, 1, dtype=torch.uint8)
    for r, byte in block_scales.items():
        grid[r, 0] = byte
    return {
        "weight": weight,
        "weight_scale": swizzle(grid).view(torch.float8_e4m3fn),
        "weight_scale_2": torch.tensor(scale2, dtype=torch.float32),
    }


def test_nvfp4_decode_golden_block():
    # byte 0x1A: high nibble 1 → +0.5 (column 0), low nibble 0xA = sign + index 2 → −1.0 (column 1);
    # byte 0x7F: +6, −6. e4m3 block scale 0x40 = 2.0 (exponent 8 − bias 7, mantissa 0); row 32's
    # scale 0x38 = 1.0 sits at flat offset 4 of the tile (32 % 32·16 + 32 // 32·4), i.e. stored[1, 0].
    stored = nvfp4_stored(33, {0: [0x1A, 0x7F, 0, 0, 0, 0, 0, 0], 32: [0x30, 0, 0, 0, 0, 0, 0, 0]}, {0: 0x40, 32: 0x38}, 0.25)
    assert int(stored["weight_scale"].view(torch.uint8)[1, 0]) == 0x38
    w = nvfp4.decode(stored)
    assert w.shape == (33, 16)
    assert w[0, :4].tolist() == [0.25, -0.5, 3.0, -3.0]  # code · 2.0 · 0.25
    assert w[32, :2].tolist() == [0.375, 0.0]  # index 3 = 1.5 · 1.0 · 0.25
    assert int((w != 0).sum()) == 5


def test_nvfp4_encode_golden_block():
    # amax 6 → weight_scale_2 = 6 / (448·6) = 1/448; block scale = 6 / 6 / (1/448) = 448 = e4m3 0x7E
    # (exponent 15 − 7 = 8, mantissa 0b110: 1.75·256). Values / (448 · 1/448) = values: 6 → 7,
    # −3 → 8 | 5; 1.25 is halfway between 1 (index 2) and 1.5 (3): to the even index 2; 0.75
    # halfway between 0.5 (1) and 1 (2): to 2; 5.0 halfway between 4 (6) and 6 (7): to 6.
    w = torch.zeros(1, 16)
    w[0, :6] = torch.tensor([6.0, -3.0, 1.25, 0.75, 5.0, -0.2])
    like = {"weight_scale": torch.zeros(128, 4, dtype=torch.float8_e4m3fn), "weight_scale_2": torch.zeros((), dtype=torch.float32)}
    out = nvfp4.encode(w, like, mode="nearest", seed_key=None)
    assert out["weight"][0].tolist() == [0x7D, 0x22, 0x60, 0, 0, 0, 0, 0]  # −0.2 → index 0, sign dropped
    assert float(out["weight_scale_2"]) == pytest.approx(1 / 448, rel=1e-7)
    assert out["weight_scale"].dtype == torch.float8_e4m3fn and tuple(out["weight_scale"].shape) == (128, 4)
    assert int(out["weight_scale"].view(torch.uint8)[0, 0]) == 0x7E
    assert nvfp4.decode({**like, **out})[0, :6].tolist() == [6.0, -3.0, 1.0, 1.0, 4.0, 0.0]


def test_nvfp4_round_trip_error_is_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(160, 96, generator=gen) * 0.02
    like = {"weight_scale": torch.zeros(*padded_grid(160, 6), dtype=torch.float8_e4m3fn), "weight_scale_2": torch.zeros(())}
    out = nvfp4.encode(w, like, mode="nearest", seed_key=None)
    back = nvfp4.decode({**like, **out})
    grid = unswizzle(out["weight_scale"], 160, 6).float() * out["weight_scale_2"]
    step = grid.repeat_interleave(16, dim=1)  # the largest e2m1 gap (4 → 6) is 2 block units
    assert bool(((back - w).abs() <= step * 1.0 + 1e-9).all())
    rel = float((back - w).norm() / w.norm())
    assert 0.03 < rel < 0.15, rel


# --------------------------------------------------------------------------------------------
# mxfp8


def test_mxfp8_encode_golden_block():
    # amax 100: 100/448 = 0.223 → ceil(log2) = −2 → byte 125, scale 0.25; 100/0.25 = 400 lies
    # halfway between e4m3 384 (0x7C) and 416: to the even mantissa, 384 (decodes to 96).
    # 1 → 4.0 = 0x48, −0.5 → −2.0 = 0xC0. Block 2: amax 28 = 448·2^−4 exactly → byte 123, 448 = 0x7E.
    w = torch.zeros(1, 64)
    w[0, :3] = torch.tensor([100.0, 1.0, -0.5])
    w[0, 32] = 28.0
    like = {"weight": torch.zeros(1, 64, dtype=torch.float8_e4m3fn), "weight_scale": torch.zeros(128, 4, dtype=torch.float8_e8m0fnu)}
    out = mxfp8.encode(w, like, mode="nearest", seed_key=None)
    assert out["weight"][0, :3].view(torch.uint8).tolist() == [0x7C, 0x48, 0xC0]
    assert int(out["weight"][0, 32].view(torch.uint8)) == 0x7E
    scales = out["weight_scale"].view(torch.uint8)
    assert out["weight_scale"].dtype == torch.float8_e8m0fnu
    assert int(scales[0, 0]) == 125 and int(scales[0, 1]) == 123 and int(scales.sum()) == 248
    back = mxfp8.decode({**like, **out})
    assert back[0, :3].tolist() == [96.0, 1.0, -0.5] and float(back[0, 32]) == 28.0


def test_mxfp8_decode_matches_codes_times_power_of_two():
    gen = torch.Generator().manual_seed(1)
    codes = (torch.randn(128, 64, generator=gen) * 50).to(torch.float8_e4m3fn)
    grid = torch.randint(100, 140, (128, 2), generator=gen, dtype=torch.int32).to(torch.uint8)
    got = mxfp8.decode({"weight": codes, "weight_scale": swizzle(grid).view(torch.float8_e8m0fnu)})
    want = codes.double() * torch.pow(2.0, grid.double() - 127).repeat_interleave(32, dim=1)
    assert torch.equal(got.double(), want)


def test_mxfp8_round_trip_never_saturates():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=gen) * torch.logspace(-4, 2, 64).unsqueeze(1)
    like = {"weight": torch.zeros(64, 128, dtype=torch.float8_e4m3fn), "weight_scale": torch.zeros(128, 4, dtype=torch.uint8)}
    out = mxfp8.encode(w, like, mode="nearest", seed_key=None)
    assert out["weight_scale"].dtype == torch.uint8
    back = mxfp8.decode({**like, **out})
    assert bool(((back - w).abs() <= w.abs() * 2.0**-4 + 1e-30).all() | ((back - w).abs() < 1e-6).all())
    assert float((back - w).norm() / w.norm()) < 0.04


# --------------------------------------------------------------------------------------------
# int8_tensorwise and fp8 per-tensor


def test_int8_encode_golden():
    # amax 127 → scale 1; −50.5 and 2.5 are halfway: to even (−50, 2); 3.5 → 4.
    w = torch.tensor([[127.0, -50.5, 2.5, 3.5]])
    out = int8.encode(w, {"weight_scale": torch.zeros(())}, mode="nearest", seed_key=None)
    assert out["weight"].tolist() == [[127, -50, 2, 4]] and out["weight"].dtype == torch.int8
    assert float(out["weight_scale"]) == 1.0


def test_int8_per_row_scale_kept_per_row():
    w = torch.tensor([[1.27, -0.5], [-254.0, 2.0]])
    out = int8.encode(w, {"weight_scale": torch.zeros(2, 1, dtype=torch.float32)}, mode="nearest", seed_key=None)
    assert tuple(out["weight_scale"].shape) == (2, 1)
    assert out["weight_scale"][1, 0] == 2.0 and out["weight"][1].tolist() == [-127, 1]
    assert torch.allclose(int8.decode(out), w, atol=0.006)


@pytest.mark.parametrize("dt", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_codec_against_torch_float8(dt):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(32, 48, generator=gen) * 0.05
    like = {"weight": torch.zeros(32, 48, dtype=dt), "weight_scale": torch.zeros((), dtype=torch.float32)}
    out = fp8.encode(w, like, mode="nearest", seed_key=None)
    scale = w.abs().max() / torch.finfo(dt).max
    assert float(out["weight_scale"]) == pytest.approx(float(scale), rel=1e-7)
    assert torch.equal(out["weight"].view(torch.uint8), (w / out["weight_scale"]).to(dt).view(torch.uint8))
    assert torch.equal(fp8.decode(out), out["weight"].float() * out["weight_scale"])


# --------------------------------------------------------------------------------------------
# Stochastic rounding: deterministic per name, unbiased.


@pytest.mark.parametrize("codec", ["nvfp4", "mxfp8", "int8"])
def test_stochastic_keeps_a_sub_step_delta_on_average(codec):
    gen = torch.Generator().manual_seed(4)
    rows, cols = 256, 256
    base = torch.randn(rows, cols, generator=gen)
    impl, like = {
        "nvfp4": (nvfp4, {"weight_scale": torch.zeros(*padded_grid(rows, cols // 16), dtype=torch.float8_e4m3fn), "weight_scale_2": torch.zeros(())}),
        "mxfp8": (mxfp8, {"weight": torch.zeros(rows, cols, dtype=torch.float8_e4m3fn), "weight_scale": torch.zeros(*padded_grid(rows, cols // 32), dtype=torch.uint8)}),
        "int8": (int8, {"weight_scale": torch.zeros(())}),
    }[codec]
    w0 = impl.decode({**like, **impl.encode(base, like, mode="nearest", seed_key=None)})  # on the grid
    # well below half a grid step: e2m1 steps are ≥ 1/12 of a block's amax, e4m3 steps 1/8 of a
    # value, int8 steps amax/127 (amax ≈ 4.5 here)
    share = {"nvfp4": 0.02, "mxfp8": 0.005, "int8": 0.005}[codec]
    intended = torch.full_like(w0, share * float(w0.abs().mean()))
    near = impl.decode({**like, **impl.encode(w0 + intended, like, mode="nearest", seed_key=None)}) - w0
    a = impl.encode(w0 + intended, like, mode="stochastic", seed_key="blocks.0.w")
    b = impl.encode(w0 + intended, like, mode="stochastic", seed_key="blocks.0.w")
    assert all(torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a)
    sto = impl.decode({**like, **a}) - w0
    kept_near = float((near * intended).sum() / (intended * intended).sum())
    kept_sto = float((sto * intended).sum() / (intended * intended).sum())
    assert kept_near < 0.3 and abs(kept_sto - 1) < 0.2, (kept_near, kept_sto)
