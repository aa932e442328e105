"""Which tensors a quantized output keeps in high precision, and which type the rest get, as data.

The generic rows below follow what the converters people use do (city96/ComfyUI-GGUF
`tools/convert.py`: 1-D and tiny tensors and the input/output embedders stay F32; ComfyUI's
fp8/nvfp4 repackages quantize only the 2-D linear weights of the transformer blocks). A model
family can carry its own extra rows (`extra_keep` of `keep_high`); this table is the default.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from lorabake.arch import FAMILIES

# Name fragments of tensors that stay in high precision in every family: norms, biases, embedders,
# modulation, router gates, positional tables and the final projection. A family adds its own
# (its input and output layers by their names) as `Family.quant_keep`.
KEEP_HIGH = (
    "norm", ".bias", "embed", "emb.", "proj_out.", "modulation", "adaLN", "adaln", "_mod.", "router", ".gate.",
    "scale_shift_table", "pos_embed", "patch_embed", "time_proj", "timestep",
)
MIN_PARAMS = 1024  # tensors this small stay in high precision (city96 QUANTIZATION_THRESHOLD)

# ComfyUI per-layer formats lorabake writes: --quant value → comfy_quant format.
COMFY = {"fp8": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2", "nvfp4": "nvfp4", "mxfp8": "mxfp8", "int8": "int8_tensorwise"}
# Weight columns (and rows) a format needs to divide: block sizes and the stored padding.
COMFY_MULTIPLE = {"nvfp4": 16, "mxfp8": 32}

# GGUF: --quant value → (default type, [(name fragment, type)] for tensors kept one step higher),
# the "_M" mixes in the spirit of llama.cpp's: the attention output and the second MLP matrix
# (most sensitive to quantization) one K-type up.
_SENSITIVE = (".attn.to_out.", "attn.proj.", ".o.", "_attn.proj.", "mlp.2.", "ffn.net.2.", "ff.net.2.", "linear2.", ".ffn.2.")
GGUF = {
    **{t: (t, ()) for t in ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")},
    "Q5_K_M": ("Q5_K", tuple((f, "Q6_K") for f in _SENSITIVE)),
    "Q5_K_S": ("Q5_K", ()),
    "Q4_K_M": ("Q4_K", tuple((f, "Q6_K") for f in _SENSITIVE)),
    "Q4_K_S": ("Q4_K", ()),
    "Q3_K_M": ("Q3_K", tuple((f, "Q4_K") for f in _SENSITIVE)),
    "Q3_K_S": ("Q3_K", ()),
    "Q2_K": ("Q2_K", tuple((f, "Q3_K") for f in _SENSITIVE)),
}
GGUF_FALLBACK = "F32"  # BF16 → F32 is lossless, F16 is not
REARRANGE_MIN = 512  # city96: tensors at least this large whose rows are not whole blocks of 256 …
ROW = 256  # … are stored as rows of 256 with the real shape in comfy.gguf.orig_shape


def keep_high(name: str, shape: tuple[int, ...], *, extra_keep: Iterable[str] = ()) -> bool:
    """A fragment matches anywhere in the name; one written `^top.` only as a whole first path part
    under any root (`out.2.weight`, `model.diffusion_model.out.2.weight`, never `attn.to_out.0`)."""
    if not name.endswith(".weight") or len(shape) < 2 or math.prod(shape) <= MIN_PARAMS:
        return True
    for f in (*KEEP_HIGH, *extra_keep):
        if f.startswith("^"):
            if name.startswith(f[1:]) or "." + f[1:] in name:
                return True
        elif f in name:
            return True
    return False


def family_keep(arch: str) -> tuple[str, ...]:
    """The family's own high-precision rows (none for a family lorabake does not know)."""
    family = FAMILIES.get(arch)
    return family.quant_keep if family else ()


def comfy_format(quant: str, name: str, shape: tuple[int, ...], *, extra_keep: Iterable[str] = ()) -> str | None:
    """The comfy_quant format `name` is written in, or None to keep it as it is."""
    if keep_high(name, shape, extra_keep=extra_keep) or len(shape) != 2:
        return None
    m = COMFY_MULTIPLE.get(COMFY[quant], 1)
    return COMFY[quant] if shape[0] % m == 0 and shape[1] % m == 0 else None


def gguf_type(quant: str, name: str, shape: tuple[int, ...], source: str, *, extra_keep: Iterable[str] = ()) -> str:
    """The GGML type `name` is written in (`source`: its float type when kept)."""
    if keep_high(name, shape, extra_keep=extra_keep):
        return GGUF_FALLBACK if source in ("BF16", "F32") else source
    default, rows = GGUF[quant]
    return next((t for f, t in rows if f in name), default)


def stored_shape(shape: tuple[int, ...], block: int) -> tuple[int, ...] | None:
    """The shape a tensor is written in for a type with `block` values per block (None: cannot)."""
    n = math.prod(shape)
    if shape[-1] % block == 0:
        return shape
    if n >= REARRANGE_MIN and n % ROW == 0 and ROW % block == 0:
        return (n // ROW, ROW)
    return None
