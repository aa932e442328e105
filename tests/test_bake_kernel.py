"""The bake kernel (row blocks, stacked LoRA factors) against the whole-tensor reference.

The reference is `delta.apply_patches` on the fp32 weight, then `rounding.cast_to` and
`rounding.lost_fraction` (the 0.1 path, itself cross-checked against diffusers, PEFT and LyCORIS).
Shapes are real ones (SDXL attention/FF, a 3x3 conv, OpenCLIP's text projection); FLUX's fused qkv
(three slices) and swapped-halves adaLN are taken at SDXL width 1280, with one real-shape FLUX qkv case
(`test_kernel_on_flux_qkv`). The block size is shrunk so every tensor spans many blocks; at width 1280
a block is 3 rows and a bit, so slice boundaries fall inside blocks (at 3072 a block is one whole row).
"""

from __future__ import annotations

import pytest
import torch

from lorabake import bake_kernel, delta, dtypes, fold, rounding
from lorabake.types import RowSlice

GEN = torch.Generator().manual_seed(7)


def rnd(*shape: int, scale: float = 0.02) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN) * scale


def lora(out: int, inner: tuple[int, ...], r: int, *, alpha: float | None = None, strength: float = 0.8, **kw) -> delta.Patch:
    parts = {"up": rnd(out, r, *([1, 1] if len(inner) == 3 else [])), "down": rnd(r, *inner)}
    if alpha is not None:
        parts["alpha"] = torch.tensor(alpha)
    return delta.Patch("lora", parts, strength, **kw)


def reference(stored: torch.Tensor, patches, out_dtype, mode="nearest", key="k"):
    w32 = stored.float()
    new32 = delta.apply_patches(w32, patches)
    out = rounding.cast_to(new32, dtypes.tag_of(out_dtype), mode=mode, seed_key=key)
    return out, rounding.lost_fraction(w32, new32, out)


def kernel(stored: torch.Tensor, patches, out_dtype, mode="nearest", key="k"):
    codec = bake_kernel.FloatRows(stored.clone(), out_dtype, rounding_mode=mode, seed_key=key)
    lost = bake_kernel.bake_tensor(codec, patches, device=torch.device("cpu"))
    return codec.result(), lost


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws the same values whichever tests ran before it in this process (a subset, another
    order): GEN restarts from its seed."""
    GEN.manual_seed(7)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(bake_kernel, "BLOCK_ELEMS", 3 * 1280 + 17)  # blocks of a few rows, never aligned
    monkeypatch.setattr(bake_kernel, "SAMPLE_EVERY", 1)  # the exact statistic (its sampling is tested below)


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal up to fp32 summation order: at most one step of the output grid apart, rarely."""
    a32, b32 = a.float(), b.float()
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = (a32 - b32).abs()
    if dtype == torch.float32:
        assert diff.max() <= 1e-5 * b32.abs().max()  # rank 336: sums of ~300 fp32 products
    else:
        ulp = torch.finfo(dtype).eps * b32.abs().clamp(min=torch.finfo(dtype).smallest_normal)
        # fp32 summation order moves a value by ~1e-7 of the largest term: one grid step where that
        # crosses a rounding tie, or a fraction of a step near 0 where the grid is finer than that
        assert bool((diff <= 2 * ulp + 1e-6 * b32.abs().max()).all())
        assert (diff > 0).float().mean() < 0.01  # a tie rounded the other way, not a different result


def fused_qkv(w: int) -> tuple[tuple[int, int], list[delta.Patch]]:
    """A fused qkv [3w, w] (FLUX.1: w = 3072): q, k, v slices from one LoRA, v again from a second one."""
    return (
        (3 * w, w),
        [lora(w, (w,), 16, slice=RowSlice(0, w)), lora(w, (w,), 16, slice=RowSlice(w, w)),
         lora(w, (w,), 16, slice=RowSlice(2 * w, w)), lora(w, (w,), 4, slice=RowSlice(2 * w, w), strength=2.0)],
    )


CASES = {
    # SDXL attention to_q [1280, 1280]: four LoRAs of ranks 16/64/128/128, kohya alpha and PEFT (none)
    "four_loras": lambda: ((1280, 1280), [lora(1280, (1280,), 16, alpha=8.0), lora(1280, (1280,), 64), lora(1280, (1280,), 128, alpha=64.0, strength=-0.5), lora(1280, (1280,), 128, strength=1.3)]),
    # SDXL resnet conv [640, 640, 3, 3] with LoCon factors
    "locon": lambda: ((640, 640, 3, 3), [lora(640, (640, 3, 3), 16, alpha=1.0), lora(640, (640, 3, 3), 8)]),
    # Flux fused qkv [3 * W, W] at W = 1280: q, k, v slices from one LoRA, v again from a second one
    "qkv_slices": lambda: fused_qkv(1280),
    # Flux final_layer.adaLN_modulation [2 * W, W] at W = 1280, seen as diffusers norm_out (halves swapped)
    "swap_halves": lambda: ((2 * 1280, 1280), [lora(2 * 1280, (1280,), 16, transform="swap_halves"), lora(2 * 1280, (1280,), 8)]),
    # OpenCLIP raw text_projection [1280, 1280], LoRA made on the transposed Linear
    "transpose": lambda: ((1280, 1024), [lora(1024, (1280,), 16, alpha=4.0, transform="transpose")]),
    # a LoRA, a LoHa, a LoKr and a full diff on one tensor: factors and materialised rows together
    "mixed_linear": lambda: (
        (640, 2048),
        [lora(640, (2048,), 32),
         delta.Patch("loha", {"hada_w1_a": rnd(640, 4), "hada_w1_b": rnd(4, 2048), "hada_w2_a": rnd(640, 4), "hada_w2_b": rnd(4, 2048), "alpha": torch.tensor(2.0)}, 0.6),
         delta.Patch("lokr", {"lokr_w1": rnd(8, 16, scale=1.0), "lokr_w2_a": rnd(80, 4), "lokr_w2_b": rnd(4, 128)}, 0.9),
         delta.Patch("full", {"diff": rnd(640, 2048, scale=0.001)}, 0.5)],
    ),
    # weight-dependent adapters between linear ones: whole-tensor path, order kept
    "dora_between": lambda: (
        (1280, 640),
        [lora(1280, (640,), 16),
         delta.Patch("lora", {"up": rnd(1280, 8), "down": rnd(8, 640), "dora_scale": rnd(1280, 1, scale=1.0).abs() + 0.5}, 0.7, dora=True),
         lora(1280, (640,), 4, alpha=2.0)],
    ),
    "strength_zero": lambda: ((1280, 1280), [lora(1280, (1280,), 16, strength=0.0)]),
    "nothing": lambda: ((1280, 1280), []),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(("stored_dtype", "out_dtype"), [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float16, torch.float32)])
def test_kernel_matches_whole_tensor_math(case, stored_dtype, out_dtype):
    shape, patches = CASES[case]()
    stored = rnd(*shape).to(stored_dtype)
    want, want_lost = reference(stored, patches, out_dtype)
    got, got_lost = kernel(stored, patches, out_dtype)
    close(got, want, out_dtype)
    assert got_lost == pytest.approx(want_lost, abs=2e-3)


def test_kernel_on_flux_qkv():
    """The real FLUX.1 fused qkv [9216, 3072], stored and written in bf16 as FLUX checkpoints are."""
    shape, patches = fused_qkv(3072)
    stored = rnd(*shape).to(torch.bfloat16)
    want, want_lost = reference(stored, patches, torch.bfloat16)
    got, got_lost = kernel(stored, patches, torch.bfloat16)
    close(got, want, torch.bfloat16)
    assert got_lost == pytest.approx(want_lost, abs=2e-3)


def test_untouched_rows_are_the_stored_bytes():
    stored = rnd(9216, 3072).to(torch.bfloat16)
    patches = [lora(3072, (3072,), 16, slice=RowSlice(3072, 3072))]
    got, _ = kernel(stored, patches, torch.bfloat16)
    assert torch.equal(got[:3072].view(torch.int16), stored[:3072].view(torch.int16))
    assert torch.equal(got[6144:].view(torch.int16), stored[6144:].view(torch.int16))
    assert not torch.equal(got[3072:6144], stored[3072:6144])


def test_one_product_for_all_loras():
    """Four LoRAs on a target: one segment whose stacked factors have rank Σr."""
    shape, patches = CASES["four_loras"]()
    (seg,) = fold.fold(shape, patches, device=torch.device("cpu"))
    assert seg.up.shape == (1280, 16 + 64 + 128 + 128) and seg.down.shape == (16 + 64 + 128 + 128, 1280)
    assert seg.dense == ()
    segs = fold.fold(*fused_qkv(3072), device=torch.device("cpu"))
    assert [(s.start, s.stop, s.up.shape[1]) for s in segs] == [(0, 3072, 16), (3072, 6144, 16), (6144, 9216, 20)]
    assert fold.fold(*CASES["dora_between"](), device=torch.device("cpu")) is None


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_stochastic_rounding_gives_cast_to_bits(out_dtype):
    """Block by block, the noise stream reproduces the whole-tensor stochastic cast bit for bit
    (a plain conversion, so both sides round the same fp32 values), across a noise-chunk edge."""
    stored = rnd(2100, 2100)  # 4.41 M values: more than one noise chunk
    assert stored.numel() > rounding._CHUNK
    want = rounding.cast_to(stored, dtypes.tag_of(out_dtype), mode="stochastic", seed_key="blocks.0.w")
    got, lost = kernel(stored, [], out_dtype, mode="stochastic", key="blocks.0.w")
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)) and lost == 0.0
    # with a patch the two differ only where fp32 summation order moved a value across a draw
    patches = [lora(2100, (2100,), 16)]
    want, want_lost = reference(stored, patches, out_dtype, mode="stochastic", key="blocks.0.w")
    got, got_lost = kernel(stored, patches, out_dtype, mode="stochastic", key="blocks.0.w")
    assert (got.view(torch.uint8) != want.view(torch.uint8)).float().mean() < 1e-3
    assert got_lost == pytest.approx(want_lost, abs=1e-2)


def test_fp8_output_saturates_like_cast_to():
    stored = (rnd(512, 512) * 2e4).to(torch.float32)
    patches = [lora(512, (512,), 8, strength=1e6)]
    want, want_lost = reference(stored, patches, torch.float8_e4m3fn)
    got, got_lost = kernel(stored, patches, torch.float8_e4m3fn)
    assert bool(torch.isfinite(got.float()).all())
    assert (got.float() != want.float()).float().mean() < 0.01
    assert got_lost == pytest.approx(want_lost, abs=1e-3)


def test_bad_factor_is_reported_by_the_exact_path():
    p = lora(1280, (1280,), 16)
    p.parts["up"][3, 2] = float("nan")
    stored = rnd(1280, 1280).to(torch.float16)
    with pytest.raises(Exception, match="NaN or Inf"):
        kernel(stored, [p], torch.float16)


def windowed(stored: torch.Tensor, patches, out_dtype, window_rows: int, mode="nearest", key="k"):
    """The tensor baked as `bake_windows` does: rows [a, b) at a time, each in a codec of its own."""
    segments = fold.fold(stored.shape, patches, device=torch.device("cpu"))
    rows, cols = fold.rows_cols(stored.shape)
    noise = rounding.NoiseStream(rounding.seed_of(key), rows * cols, out_dtype) if mode == "stochastic" else None
    outs, parts = [], []
    for a in range(0, rows, window_rows):
        b = min(a + window_rows, rows)
        codec = bake_kernel.FloatRows(stored[a:b].clone(), out_dtype, rounding_mode=mode, seed_key=key, first_row=a, noise=noise)
        parts.append(bake_kernel.bake_rows(codec, segments, a, b, device=torch.device("cpu")))
        outs.append(codec.result())
    return torch.cat(outs), rounding.LostDelta.combine(parts).fraction


WINDOW_CASES = {
    **CASES,
    # a fused qkv of a 640-wide model: q, k, v slices from one LoRA, k again from a second one
    "qkv_small": lambda: (
        (1920, 640),
        [lora(640, (640,), 8, slice=RowSlice(0, 640)), lora(640, (640,), 8, slice=RowSlice(640, 640)),
         lora(640, (640,), 8, slice=RowSlice(1280, 640)), lora(640, (640,), 4, slice=RowSlice(640, 640), strength=2.0)],
    ),
}


@pytest.mark.parametrize(("case", "mode"), [("qkv_small", "nearest"), ("mixed_linear", "nearest"), ("locon", "nearest"),
                                            ("four_loras", "stochastic")])
def test_row_windows_give_the_whole_tensor_bytes(case, mode):
    """Windows on the kernel's row grid (here a window of 7 grid steps, so window edges, slice edges and
    block edges all differ): the bytes equal one whole-tensor bake, and so does the statistic."""
    shape, patches = WINDOW_CASES[case]()
    stored = rnd(*shape).to(torch.bfloat16)
    want, want_lost = kernel(stored, patches, torch.bfloat16, mode=mode)
    step = bake_kernel._step(fold.rows_cols(shape)[1])
    rows = bake_kernel.window_rows(fold.rows_cols(shape)[1], 2, 7 * step * fold.rows_cols(shape)[1] * 2)
    assert rows == 7 * step and shape[0] > 2 * rows
    got, got_lost = windowed(stored, patches, torch.bfloat16, rows, mode=mode)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert got_lost == pytest.approx(want_lost, rel=1e-9, abs=1e-12)


def test_grid_blocks_follow_the_grid_not_the_segment():
    segs = [fold.Segment(0, 100), fold.Segment(100, 250)]
    blocks = [(s.start, a, b) for s, a, b in bake_kernel.grid_blocks(segs, 30, 230, 64)]
    assert blocks == [(0, 30, 64), (0, 64, 100), (100, 100, 128), (100, 128, 192), (100, 192, 230)]


@pytest.mark.parametrize("case", ["four_loras", "qkv_slices", "mixed_linear", "locon"])
def test_sampled_statistic_estimates_the_exact_one(case, monkeypatch):
    """One grid cell in 4 feeds the lost-delta statistic: the bytes are the same, the share lost is
    within 2 % of the exact one, or 1e-3 of the delta where next to nothing is lost (fp8 output, where
    most of a small delta is lost, and bf16, where ~1e-4 is: there the sample's noise is ~20 % of it)."""
    shape, patches = CASES[case]()
    stored = rnd(*shape).to(torch.bfloat16)
    for out_dtype in (torch.float8_e4m3fn, torch.bfloat16):
        exact, exact_lost = kernel(stored, patches, out_dtype)
        monkeypatch.setattr(bake_kernel, "SAMPLE_EVERY", 4)
        got, got_lost = kernel(stored, patches, out_dtype)
        monkeypatch.setattr(bake_kernel, "SAMPLE_EVERY", 1)
        assert torch.equal(got.view(torch.uint8), exact.view(torch.uint8))
        assert got_lost != exact_lost and got_lost == pytest.approx(exact_lost, rel=0.02, abs=1e-3)


def test_sampled_cells_are_one_in_four_on_the_grid(monkeypatch):
    monkeypatch.setattr(bake_kernel, "SAMPLE_EVERY", 4)
    assert [a for a in range(0, 400, 10) if bake_kernel.sampled(a, 25)] == [0, 10, 20, 100, 110, 120, 200, 210, 220, 300, 310, 320]


def test_stochastic_cast_of_a_partly_patched_fused_tensor_reads_its_noise_in_row_order():
    """fp32 → bf16 with stochastic rounding, a LoRA on the middle band only: the untouched bands are
    re-encoded too, and every row takes the noise `cast_to` gives it (this raised out-of-order before)."""
    stored = rnd(1920, 640)
    patches = [lora(640, (640,), 8, slice=RowSlice(640, 640))]
    got, _ = kernel(stored, patches, torch.bfloat16, mode="stochastic", key="qkv")
    want = rounding.cast_to(stored, "BF16", mode="stochastic", seed_key="qkv")
    for band in (slice(0, 640), slice(1280, 1920)):  # not patched: exactly the plain stochastic cast
        assert torch.equal(got[band].view(torch.int16), want[band].view(torch.int16))
    assert not torch.equal(got[640:1280], want[640:1280])
