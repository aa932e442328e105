"""K-quant encoders (Q2_K … Q6_K): fp32 super-blocks of 256 values → GGML block bytes.

The `gguf` package decodes these types but has no encoder. Byte layouts follow its decoders
(gguf-py `gguf/quants.py`, `Q2_K` … `Q6_K` `dequantize_blocks`); the scales follow the published
k-quant scheme (llama.cpp `ggml-quants.c`): sub-block scales (and minimums, for the affine types)
are chosen from each sub-block's range, then quantized against one fp16 super-block scale (and
one fp16 super-block minimum). This is the plain min/max choice, without llama.cpp's iterative
search, so the error is a little larger than llama.cpp's but every value stays within half a
step of its sub-block grid. `noise` (uniform [0, 1), one per value) makes the value rounding
stochastic; the scales are always rounded to nearest.
"""

from __future__ import annotations

import numpy as np

QK = 256
F16 = np.float16


def _round(v: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
    return np.floor(v + noise) if noise is not None else np.rint(v)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1), 0.0)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(F16).reshape(-1, 1).view(np.uint8)


def _affine(x: np.ndarray, sub: int, qmax: int, smax: int, noise: np.ndarray | None):
    """Sub-block scale and minimum (value = d·sc·q − dmin·m), sc/m in [0, smax], q in [0, qmax]."""
    nb = x.shape[0]
    xs = x.reshape(nb, QK // sub, sub)
    lo = np.minimum(xs.min(axis=-1), 0.0)
    hi = xs.max(axis=-1)
    scale, minimum = (hi - lo) / qmax, -lo
    d = (scale.max(axis=-1) / smax).astype(F16)
    dmin = (minimum.max(axis=-1) / smax).astype(F16)
    sc = np.clip(np.rint(_safe_div(scale, d.astype(np.float32)[:, None])), 0, smax)
    m = np.clip(np.rint(_safe_div(minimum, dmin.astype(np.float32)[:, None])), 0, smax)
    step = (d.astype(np.float32)[:, None] * sc)[..., None]
    offset = (dmin.astype(np.float32)[:, None] * m)[..., None]
    nz = None if noise is None else noise.reshape(xs.shape)
    q = np.clip(_round(_safe_div(xs + offset, step), nz), 0, qmax).astype(np.uint8)
    return d, dmin, sc.astype(np.uint8), m.astype(np.uint8), q.reshape(nb, QK)


def _symmetric(x: np.ndarray, sub: int, qlow: int, smax: int, noise: np.ndarray | None):
    """Signed sub-block scales (value = d·sc·q) with the sub-block's extreme value at q = qlow < 0."""
    nb = x.shape[0]
    xs = x.reshape(nb, QK // sub, sub)
    at = np.abs(xs).argmax(axis=-1)
    extreme = np.take_along_axis(xs, at[..., None], axis=-1)[..., 0]
    scale = extreme / qlow
    big = np.abs(scale).max(axis=-1)
    d = (big / smax).astype(F16)
    sc = np.clip(np.rint(_safe_div(scale, d.astype(np.float32)[:, None])), -smax, smax)
    step = (d.astype(np.float32)[:, None] * sc)[..., None]
    nz = None if noise is None else noise.reshape(xs.shape)
    q = np.clip(_round(_safe_div(xs, step), nz), qlow, -qlow - 1)
    return d, sc.astype(np.int16), q.reshape(nb, QK).astype(np.int16)


def _pack_2bit_halves(q: np.ndarray) -> np.ndarray:
    """Values h·128 + s·32 + i (2 bits each) → byte h·32 + i, at bit 2s (Q2_K/Q3_K `qs`, Q6_K `qh`)."""
    nb = q.shape[0]
    parts = q.reshape(nb, 2, 4, 32).astype(np.uint8) & 3
    return (parts << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)).sum(axis=2, dtype=np.uint8).reshape(nb, 64)


def _pack_bits(bits: np.ndarray) -> np.ndarray:
    """Bit of value b·32 + i → bit b of byte i (32 bytes for 256 values)."""
    nb = bits.shape[0]
    parts = bits.reshape(nb, 8, 32).astype(np.uint8) & 1
    return (parts << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)).sum(axis=1, dtype=np.uint8)


def _pack_nibble_pairs(q: np.ndarray, run: int) -> np.ndarray:
    """Values c·2run + i and c·2run + run + i → low and high nibble of byte c·run + i."""
    nb = q.shape[0]
    parts = q.reshape(nb, -1, 2, run).astype(np.uint8) & 0xF
    return (parts[:, :, 0] | (parts[:, :, 1] << 4)).reshape(nb, -1)


def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and minimums → the 12 bytes of Q4_K/Q5_K."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return out


def q2_k(x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
    d, dmin, sc, m, q = _affine(x, 16, 3, 15, noise)
    return np.hstack([sc | (m << 4), _pack_2bit_halves(q), _f16_bytes(d), _f16_bytes(dmin)])


def q3_k(x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
    d, sc, q = _symmetric(x, 16, -4, 31, noise)
    stored = (q + 4).astype(np.uint8)  # 0..7: low two bits in qs, bit 2 in hmask
    s6 = (sc + 32).astype(np.uint8)
    scales = np.empty((x.shape[0], 12), dtype=np.uint8)
    scales[:, :8] = (s6[:, :8] & 0xF) | ((s6[:, 8:] & 0xF) << 4)
    high = (s6 >> 4).reshape(-1, 4, 4)  # scale j = 4s + i → byte 8 + i, bits 2s
    scales[:, 8:] = (high << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)).sum(axis=1, dtype=np.uint8)
    return np.hstack([_pack_bits(stored >> 2), _pack_2bit_halves(stored & 3), scales, _f16_bytes(d)])


def q4_k(x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
    d, dmin, sc, m, q = _affine(x, 32, 15, 63, noise)
    return np.hstack([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, m), _pack_nibble_pairs(q, 32)])


def q5_k(x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
    d, dmin, sc, m, q = _affine(x, 32, 31, 63, noise)
    return np.hstack([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, m), _pack_bits(q >> 4), _pack_nibble_pairs(q, 32)])


def q6_k(x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
    d, sc, q = _symmetric(x, 16, -32, 127, noise)
    stored = (q + 32).astype(np.uint8)  # 0..63: low nibble in ql, top two bits in qh
    ql = _pack_nibble_pairs(stored, 64)
    qh = _pack_2bit_halves(stored >> 4)
    return np.hstack([ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)])


ENCODERS = {"Q2_K": q2_k, "Q3_K": q3_k, "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}
