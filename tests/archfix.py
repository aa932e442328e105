"""Fixtures with real names and real shapes from tests/data/arch, random values.

`arch_tensors("sd1")` gives every (name -> (shape, dtype)) of a real SD1.x checkpoint;
`build_checkpoint` writes a chosen subset to a .safetensors file.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable, Iterable
from functools import cache

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH_DIR = os.path.join(ROOT, "tests", "data", "arch")

ARCH_FILES = {
    "sd1": "sd1-ldm.json",
    "sdxl": "sdxl-sgm.json",
    "sd3": "sd3-comfyui.json",
    "flux": "flux-flux.json",
}

_TORCH = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}


@cache
def arch_doc(arch: str) -> dict:
    """The key list of `arch`: a file of ARCH_FILES, else tests/data/arch/<arch>.json.gz."""
    if arch in ARCH_FILES:
        with open(os.path.join(ARCH_DIR, ARCH_FILES[arch]), encoding="utf-8") as fh:
            return json.load(fh)
    with gzip.open(os.path.join(ARCH_DIR, f"{arch}.json.gz"), "rt", encoding="utf-8") as fh:
        return json.load(fh)


def arch_tensors(arch: str, *, include_optional: bool = True) -> dict[str, dict]:
    """name -> {"shape", "dtype", "component", ...} for the whole real checkpoint."""
    tensors = arch_doc(arch)["tensors"]
    return {k: v for k, v in tensors.items() if include_optional or not v.get("optional")}


def select(arch: str, patterns: Iterable[str]) -> list[str]:
    """Real tensor names of `arch` matching any regex in `patterns` (search, not full match)."""
    regs = [re.compile(p) for p in patterns]
    return [k for k in arch_tensors(arch) if any(r.search(k) for r in regs)]


def random_tensor(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype in (torch.int64, torch.int32):
        return torch.randint(0, 77, tuple(shape), generator=gen, dtype=dtype)
    return (torch.randn(tuple(shape), generator=gen) * 0.02).to(dtype)


def build_checkpoint(
    path: str,
    arch: str,
    names: Iterable[str] | None = None,
    *,
    float_dtype: torch.dtype | None = torch.float16,
    seed: int = 0,
    rename: Callable[[str], str] | None = None,
    metadata: dict[str, str] | None = None,
    max_dim: int | None = None,
) -> dict[str, torch.Tensor]:
    """Write a checkpoint with the real names/shapes of `names` (default: all) and random values.

    Float tensors are cast to `float_dtype` (None keeps the arch file's dtype). `rename` maps a
    real name to the name written (e.g. strip `model.diffusion_model.` for a DiT-only file).
    `max_dim` caps every dimension (real names, tiny shapes: for tests of layout, not of shapes).
    Returns the tensors written, by written name.
    """
    spec = arch_tensors(arch)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name in names if names is not None else spec:
        entry = spec[name]
        dtype = _TORCH[entry["dtype"]]
        if float_dtype is not None and dtype.is_floating_point:
            dtype = float_dtype
        shape = [min(d, max_dim) for d in entry["shape"]] if max_dim else entry["shape"]
        out[rename(name) if rename else name] = random_tensor(shape, dtype, gen)
    save_file(out, path, metadata=metadata)
    return out
