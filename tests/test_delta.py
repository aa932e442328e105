"""lorabake.delta on literals small enough to check by hand, plus the folding rules."""

from __future__ import annotations

import pytest
import torch

from lorabake.adapters import delta_shape, fits, rank_of
from lorabake.delta import Patch, apply_patches, bias_delta, delta, scale_of
from lorabake.errors import LoraFormatError
from lorabake.types import RowSlice

T = torch.tensor


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Literal ΔW.


def test_lora_2x2_by_hand():
    # up [2,1] @ down [1,2] = [[1·3, 1·4], [2·3, 2·4]]; alpha 0.5, rank 1 → scale 0.5
    parts = {"up": T([[1.0], [2.0]]), "down": T([[3.0, 4.0]]), "alpha": T(0.5)}
    assert torch.equal(delta("lora", parts, out_shape=(2, 2)), T([[1.5, 2.0], [3.0, 4.0]]))


def test_lora_without_alpha_has_scale_1_and_alpha_override_wins():
    parts = {"up": T([[1.0], [2.0]]), "down": T([[3.0, 4.0]])}
    assert torch.equal(delta("lora", parts, out_shape=(2, 2)), T([[3.0, 4.0], [6.0, 8.0]]))
    with_alpha = {**parts, "alpha": T([8.0])}
    assert torch.equal(delta("lora", with_alpha, out_shape=(2, 2), alpha_override=2.0), T([[6.0, 8.0], [12.0, 16.0]]))


def test_alpha_zero_scales_to_zero_like_comfyui():
    parts = {"up": T([[1.0], [2.0]]), "down": T([[3.0, 4.0]]), "alpha": T(0.0)}
    assert torch.equal(delta("lora", parts, out_shape=(2, 2)), torch.zeros(2, 2))


def test_bf16_alpha_shape_1_and_a1111_scale_part():
    parts = {"up": T([[1.0], [2.0]]), "down": T([[3.0, 4.0]]), "alpha": T([2.0], dtype=torch.bfloat16)}
    assert scale_of("lora", parts) == 2.0
    assert scale_of("lora", {**parts, "scale": T(0.25)}) == 0.25  # A1111 `scale` overrides alpha/rank


def test_loha_2x2_by_hand():
    parts = {
        "hada_w1_a": T([[1.0], [2.0]]),
        "hada_w1_b": T([[1.0, 1.0]]),
        "hada_w2_a": T([[1.0], [1.0]]),
        "hada_w2_b": T([[3.0, 4.0]]),
        "alpha": T(2.0),  # rank 1 → scale 2
    }
    # (w1a@w1b) ⊙ (w2a@w2b) = [[1,1],[2,2]] ⊙ [[3,4],[3,4]] = [[3,4],[6,8]]
    assert torch.equal(delta("loha", parts, out_shape=(2, 2)), T([[6.0, 8.0], [12.0, 16.0]]))


def test_lokr_kron_by_hand_and_full_factors_ignore_alpha():
    parts = {"lokr_w1": T([[1.0, 2.0]]), "lokr_w2": T([[1.0], [10.0]]), "alpha": T(99.0)}
    # kron([1,2], [[1],[10]]) = [[1,2],[10,20]]; both full → alpha ignored
    assert rank_of("lokr", {k: tuple(v.shape) for k, v in parts.items()}) is None
    assert torch.equal(delta("lokr", parts, out_shape=(2, 2)), T([[1.0, 2.0], [10.0, 20.0]]))


def test_lokr_rank_from_the_factored_side():
    parts = {"lokr_w1": T([[1.0]]), "lokr_w2_a": T([[1.0], [2.0]]), "lokr_w2_b": T([[3.0, 4.0]]), "alpha": T(0.5)}
    assert delta("lokr", parts, out_shape=(2, 2)).tolist() == [[1.5, 2.0], [3.0, 4.0]]


def test_full_and_norm_ignore_alpha():
    assert torch.equal(delta("full", {"diff": T([[1.0, 2.0]]), "alpha": T(4.0)}, out_shape=(1, 2)), T([[1.0, 2.0]]))
    assert torch.equal(delta("norm", {"w_norm": T([1.0, 2.0])}, out_shape=(2,)), T([1.0, 2.0]))


def test_tucker_lora_equals_explicit_einsum():
    up, mid, down = _rand(6, 3, 1, 1, seed=1), _rand(3, 2, 3, 3, seed=2), _rand(2, 5, 1, 1, seed=3)
    want = torch.einsum("om,mnhw,ni->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0]) * (4.0 / 2)
    got = delta("lora", {"up": up, "mid": mid, "down": down, "alpha": T(4.0)}, out_shape=(6, 5, 3, 3))
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Shapes, reshaping and errors.


def test_conv1x1_and_linear_loras_are_interchangeable():
    up, down = _rand(4, 2, seed=1), _rand(2, 3, seed=2)
    lin = delta("lora", {"up": up, "down": down}, out_shape=(4, 3))
    conv = delta("lora", {"up": up.reshape(4, 2, 1, 1), "down": down.reshape(2, 3, 1, 1)}, out_shape=(4, 3))
    assert torch.equal(lin, conv)
    w = _rand(4, 3, 1, 1, seed=3)
    baked = apply_patches(w, [Patch("lora", {"up": up, "down": down}, 1.0)])
    # the bake fuses the add into the matmul (addmm_), so equal up to that one rounding
    torch.testing.assert_close(baked, w + lin.reshape(4, 3, 1, 1), rtol=1e-6, atol=1e-7)


def test_delta_shape_reports_natural_shapes():
    assert delta_shape("lora", {"up": (320, 8, 1, 1), "down": (8, 320, 3, 3)}) == (320, 320, 3, 3)
    assert delta_shape("lora", {"up": (640, 4, 1, 1), "mid": (4, 4, 3, 3), "down": (4, 320, 1, 1)}) == (640, 320, 3, 3)
    assert delta_shape("loha", {"hada_w1_a": (8, 2), "hada_w1_b": (2, 36), "hada_w2_a": (8, 2), "hada_w2_b": (2, 36)}) == (8, 36)
    assert delta_shape("lokr", {"lokr_w1": (4, 4), "lokr_w2_a": (80, 8), "lokr_w2_b": (8, 80)}) == (320, 320)
    assert delta_shape("lokr", {"lokr_w1": (4, 4), "lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (2, 80), "lokr_w2_b": (2, 80)}) == (320, 320, 3, 3)
    assert delta_shape("oft", {"oft_blocks": (20, 16, 16)}) is None
    assert delta_shape("full", {"diff_b": (7,)}, param="bias") == (7,)
    assert rank_of("lora", {"up": (320, 8), "down": (8, 320)}) == 8


def test_fits_for_weight_dependent_algorithms():
    assert fits("oft", {"oft_blocks": (20, 16, 16)}, (320, 768))
    assert not fits("oft", {"oft_blocks": (20, 16, 16)}, (640, 768))
    assert fits("ia3", {"ia3_weight": (768,)}, (320, 768))
    assert fits("lora", {"up": (4, 2), "down": (2, 3)}, (4, 3, 1, 1))
    assert not fits("lora", {"up": (4, 2), "down": (2, 3)}, (4, 4))


def test_numel_mismatch_is_a_format_error():
    with pytest.raises(LoraFormatError, match="values"):
        delta("lora", {"up": _rand(4, 2), "down": _rand(2, 3)}, out_shape=(4, 4))
    with pytest.raises(LoraFormatError, match="do not fit"):
        apply_patches(_rand(4, 4), [Patch("lora", {"up": _rand(4, 2), "down": _rand(2, 3)}, 1.0)])


@pytest.mark.parametrize(
    ("algo", "shapes"),
    [
        ("lora", {"up": (4, 2), "down": (3, 5)}),
        ("lora", {"up": (4, 2, 1, 1), "mid": (3, 2, 3, 3), "down": (2, 5, 1, 1)}),
        ("loha", {"hada_w1_a": (4, 2), "hada_w1_b": (3, 5), "hada_w2_a": (4, 2), "hada_w2_b": (2, 5)}),
        ("loha", {"hada_w1_a": (4, 2), "hada_w1_b": (2, 5), "hada_w2_a": (4, 2), "hada_w2_b": (2, 6)}),
        ("lokr", {"lokr_w1_a": (2, 3), "lokr_w1_b": (4, 2), "lokr_w2": (4, 4)}),
        ("lokr", {"lokr_w1": (2, 2), "lokr_w2_a": (4, 3), "lokr_w2_b": (2, 4)}),
        ("glora", {"glora_a1": (5, 2), "glora_a2": (3, 5), "glora_b1": (4, 2), "glora_b2": (2, 5)}),
        ("oft", {"oft_blocks": (4, 3, 2)}),
        ("lora", {"up": (4, 2)}),  # missing down
        ("lora", {"up": (4, 2), "down": (2, 3), "dora_scale": (5, 1)}),
    ],
)
def test_inconsistent_parts_are_format_errors(algo, shapes):
    with pytest.raises(LoraFormatError):
        delta_shape(algo, shapes)


def test_unknown_algorithm_is_refused_not_skipped():
    with pytest.raises(LoraFormatError, match="not supported"):
        delta_shape("dylora", {})
    with pytest.raises(LoraFormatError, match="not supported"):
        apply_patches(_rand(2, 2), [Patch("dylora", {}, 1.0)])


def test_non_finite_alpha_or_factors_are_errors():
    with pytest.raises(LoraFormatError, match="alpha"):
        delta("lora", {"up": _rand(2, 1), "down": _rand(1, 2), "alpha": T(float("nan"))}, out_shape=(2, 2))
    with pytest.raises(LoraFormatError, match="NaN"):
        delta("lora", {"up": T([[float("inf")], [1.0]]), "down": _rand(1, 2)}, out_shape=(2, 2))


# ----------------------------------------------------------------------------------------------
# Folding.


def _lora(out, inp, rank=2, seed=0, alpha=None):
    parts = {"up": _rand(out, rank, seed=seed), "down": _rand(rank, inp, seed=seed + 100)}
    if alpha is not None:
        parts["alpha"] = T(float(alpha))
    return parts


def test_strength_zero_leaves_weight_bit_identical():
    w = _rand(6, 4, dtype=torch.float32)
    dora = {**_lora(6, 4), "dora_scale": _rand(6, 1).abs()}
    patches = [
        Patch("lora", _lora(6, 4), 0.0),
        Patch("lora", dora, 0.0, dora=True),
        Patch("ia3", {"ia3_weight": _rand(6)}, 0.0),
        Patch("oft", {"oft_blocks": _rand(3, 2, 2)}, 0.0),
        Patch("set", {"set_weight": _rand(6, 4)}, 0.0),
    ]
    assert torch.equal(apply_patches(w, patches), w)


def test_plus_one_then_minus_one_returns_w():
    w = _rand(6, 4)
    parts = _lora(6, 4, alpha=1)
    out = apply_patches(w, [Patch("lora", parts, 1.0), Patch("lora", parts, -1.0)])
    assert torch.allclose(out, w, rtol=0, atol=1e-14)


def test_several_patches_sum_and_input_is_not_modified():
    w = _rand(6, 4)
    keep = w.clone()
    a, b = _lora(6, 4, seed=1, alpha=1), _lora(6, 4, seed=2)
    out = apply_patches(w, [Patch("lora", a, 0.5), Patch("lora", b, 2.0)])
    want = w + 0.5 * delta("lora", a, out_shape=(6, 4)) + 2.0 * delta("lora", b, out_shape=(6, 4))
    assert torch.allclose(out, want, rtol=0, atol=1e-13)
    assert torch.equal(w, keep)


def test_slice_touches_only_its_rows():
    w = _rand(9, 4)  # fused qkv: rows 3..5 are k
    parts = _lora(3, 4)
    out = apply_patches(w, [Patch("lora", parts, 1.0, slice=RowSlice(start=3, length=3))])
    assert torch.equal(out[:3], w[:3]) and torch.equal(out[6:], w[6:])
    assert torch.allclose(out[3:6], w[3:6] + delta("lora", parts, out_shape=(3, 4)), rtol=0, atol=1e-14)


def test_slice_along_dim_1():
    w = _rand(4, 6)
    parts = _lora(4, 2)
    out = apply_patches(w, [Patch("lora", parts, 1.0, slice=RowSlice(start=4, length=2, dim=1))])
    assert torch.equal(out[:, :4], w[:, :4])
    assert torch.allclose(out[:, 4:], w[:, 4:] + delta("lora", parts, out_shape=(4, 2)), rtol=0, atol=1e-14)


def test_bad_slice_is_an_error():
    with pytest.raises(LoraFormatError, match="slice"):
        apply_patches(_rand(4, 4), [Patch("lora", _lora(2, 4), 1.0, slice=RowSlice(start=3, length=2))])


def test_swap_halves_and_transpose_transform_delta():
    w = _rand(4, 3)
    parts = _lora(4, 3)
    dw = delta("lora", parts, out_shape=(4, 3))
    swapped = apply_patches(w, [Patch("lora", parts, 1.0, transform="swap_halves")])
    assert torch.allclose(swapped, w + torch.cat([dw[2:], dw[:2]]), rtol=0, atol=1e-14)
    wt = _rand(3, 4)
    transposed = apply_patches(wt, [Patch("lora", parts, 1.0, transform="transpose")])
    assert torch.allclose(transposed, wt + dw.t(), rtol=0, atol=1e-14)


def test_transform_maps_weight_dependent_adapters_to_module_space():
    # IA³ on output rows of the diffusers view: with swap_halves, row i of the module is row
    # (i + n/2) mod n of the checkpoint, so the per-row factors must move with it.
    w = _rand(4, 3)
    vec = T([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    out = apply_patches(w, [Patch("ia3", {"ia3_weight": vec}, 1.0, transform="swap_halves")])
    factors = 1 + T([3.0, 4.0, 1.0, 2.0], dtype=torch.float64)
    assert torch.allclose(out, w * factors[:, None], rtol=0, atol=1e-14)


def test_bias_patches():
    b = _rand(4)
    parts = {**_lora(4, 3), "up_bias": T([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), "alpha": T(1.0)}
    out = apply_patches(b, [Patch("lora", parts, 0.5, param="bias")])  # scale alpha/rank = 1/2
    assert torch.allclose(out, b + 0.25 * parts["up_bias"], rtol=0, atol=1e-15)
    assert torch.equal(bias_delta("full", {"diff_b": T([1.0, 2.0])}, out_shape=(2,)), T([1.0, 2.0]))
    out = apply_patches(b, [Patch("norm", {"w_norm": _rand(4), "b_norm": T([1.0, 0.0, 0.0, 0.0])}, 2.0, param="bias")])
    assert torch.equal(out, b + T([2.0, 0.0, 0.0, 0.0]))
    with pytest.raises(LoraFormatError, match="no bias delta"):
        apply_patches(b, [Patch("loha", {}, 1.0, param="bias")])


def test_dora_output_axis_by_hand_and_strength_interpolates():
    w = T([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    parts = {"up": T([[1.0], [0.0]]), "down": T([[0.0, 4.0]]), "dora_scale": T([[10.0], [2.0]])}
    # W + ΔW = [[3,4],[0,1]]; row norms 5, 1; W_dora = [[6,8],[0,2]]
    full = apply_patches(w, [Patch("lora", parts, 1.0, dora=True)])
    assert torch.allclose(full, T([[6.0, 8.0], [0.0, 2.0]], dtype=torch.float64), rtol=1e-12)
    half = apply_patches(w, [Patch("lora", parts, 0.5, dora=True)])
    assert torch.allclose(half, w + 0.5 * (full - w), rtol=1e-12)
    # ComfyUI mode normalises the output axis by ‖W‖ (3 and 1): [[10,40/3],[0,2]]
    comfy = apply_patches(w, [Patch("lora", parts, 1.0, dora=True)], dora_mode="comfy")
    assert torch.allclose(comfy, T([[10.0, 40.0 / 3], [0.0, 2.0]], dtype=torch.float64), rtol=1e-12)


def test_dora_input_axis_and_peft_magnitude():
    w = _rand(4, 3)
    parts = _lora(4, 3, alpha=1)
    merged = w + delta("lora", parts, out_shape=(4, 3))
    m_in = _rand(1, 3).abs()
    got = apply_patches(w, [Patch("lora", {**parts, "dora_scale": m_in}, 1.0, dora=True)])
    want = merged * m_in / (merged.norm(dim=0, keepdim=True) + torch.finfo(torch.float64).eps)
    assert torch.allclose(got, want, rtol=1e-12)
    m_out = _rand(4).abs()
    got = apply_patches(w, [Patch("lora", {**parts, "magnitude": m_out}, 1.0, dora=True)])
    want = merged * m_out[:, None] / (merged.norm(dim=1, keepdim=True) + torch.finfo(torch.float64).eps)
    assert torch.allclose(got, want, rtol=1e-12)


def test_dora_flag_must_match_parts():
    with pytest.raises(LoraFormatError, match="dora"):
        apply_patches(_rand(4, 3), [Patch("lora", {**_lora(4, 3), "dora_scale": _rand(4, 1)}, 1.0)])
    with pytest.raises(LoraFormatError, match="dora"):
        apply_patches(_rand(4, 3), [Patch("lora", _lora(4, 3), 1.0, dora=True)])
    oft = {"oft_blocks": _rand(2, 2, 2), "dora_scale": _rand(4, 1)}
    with pytest.raises(LoraFormatError, match="DoRA"):
        apply_patches(_rand(4, 3), [Patch("oft", oft, 1.0, dora=True)])


def test_dora_on_a_slice_uses_the_slice_rows():
    w = _rand(6, 3)
    parts = {**_lora(3, 3), "dora_scale": _rand(3, 1).abs()}
    whole = apply_patches(w, [Patch("lora", parts, 1.0, slice=RowSlice(3, 3), dora=True)])
    alone = apply_patches(w[3:].clone(), [Patch("lora", parts, 1.0, dora=True)])
    assert torch.equal(whole[:3], w[:3]) and torch.equal(whole[3:], alone)


def test_oft_identity_and_old_oft_diag():
    w = _rand(4, 3)
    zero = {"oft_blocks": torch.zeros(2, 2, 2, dtype=torch.float64)}  # Q = 0 → R = I
    assert torch.allclose(apply_patches(w, [Patch("oft", zero, 1.0)]), w, rtol=0, atol=0)
    swap = T([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    r = {"oft_diag": torch.stack([swap, torch.eye(2, dtype=torch.float64)])}  # R given directly
    out = apply_patches(w, [Patch("oft", r, 1.0)])
    assert torch.equal(out, w[[1, 0, 2, 3]])


def test_glora_and_set_and_ia3_by_hand():
    w = T([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    parts = {"glora_a1": eye, "glora_a2": eye, "glora_b1": eye, "glora_b2": torch.zeros(2, 2, dtype=torch.float64)}
    # ΔW = W·I·I + 0 = W → W' = W + 0.5·W
    assert torch.equal(apply_patches(w, [Patch("glora", parts, 0.5)]), 1.5 * w)
    assert torch.equal(apply_patches(w, [Patch("set", {"set_weight": torch.ones(4)}, 0.3)]), torch.ones(2, 2, dtype=torch.float64))
    on_in = {"ia3_weight": T([1.0, -1.0]), "on_input": T(1)}
    assert torch.equal(apply_patches(w, [Patch("ia3", on_in, 1.0)]), T([[2.0, 0.0], [6.0, 0.0]], dtype=torch.float64))


def test_weight_dependent_patches_fold_in_order():
    w = _rand(4, 3)
    ia3 = Patch("ia3", {"ia3_weight": T([1.0, 2.0, 3.0, 4.0])}, 1.0)
    lora = Patch("lora", _lora(4, 3), 1.0)
    a = apply_patches(w, [ia3, lora])
    b = apply_patches(w, [lora, ia3])
    assert not torch.allclose(a, b)
    assert torch.allclose(b, apply_patches(apply_patches(w, [lora]), [ia3]), rtol=0, atol=1e-14)


def test_delta_for_weight_dependent_needs_weight():
    w = _rand(4, 3)
    parts = {"ia3_weight": T([1.0, 2.0, 3.0, 4.0])}
    with pytest.raises(LoraFormatError, match="weight"):
        delta("ia3", parts, out_shape=(4, 3))
    dw = delta("ia3", parts, out_shape=(4, 3), weight=w)
    assert torch.allclose(dw, w * T([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)[:, None], rtol=0, atol=1e-15)


def test_fp32_parts_on_an_fp32_weight_stay_fp32():
    w = _rand(4, 3, dtype=torch.float32)
    parts = {k: v.to(torch.bfloat16) for k, v in _lora(4, 3).items()}
    assert apply_patches(w, [Patch("lora", parts, 1.0)]).dtype == torch.float32
    with pytest.raises(ValueError):
        apply_patches(w.half(), [])
