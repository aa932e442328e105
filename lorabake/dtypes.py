"""One table: safetensors dtype tag <-> torch dtype <-> item size (fp8 where torch has it).

torch is imported only when a torch dtype is asked for, so header-only commands run without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    tag: str  # safetensors header spelling, e.g. "BF16"
    itemsize: int
    torch_name: str | None  # attribute of `torch`, None when torch has no such dtype
    is_float: bool

    @property
    def torch(self) -> torch.dtype | None:
        if not self.torch_name:
            return None
        import torch

        return getattr(torch, self.torch_name, None)


# Every dtype the safetensors format defines (safetensors/src/tensor.rs `Dtype`).
_TABLE = [
    DType("BOOL", 1, "bool", False),
    DType("U8", 1, "uint8", False),
    DType("I8", 1, "int8", False),
    DType("F8_E5M2", 1, "float8_e5m2", True),
    DType("F8_E4M3", 1, "float8_e4m3fn", True),
    DType("F8_E8M0", 1, "float8_e8m0fnu", True),
    DType("I16", 2, "int16", False),
    DType("U16", 2, "uint16", False),
    DType("F16", 2, "float16", True),
    DType("BF16", 2, "bfloat16", True),
    DType("I32", 4, "int32", False),
    DType("U32", 4, "uint32", False),
    DType("F32", 4, "float32", True),
    DType("I64", 8, "int64", False),
    DType("U64", 8, "uint64", False),
    DType("F64", 8, "float64", True),
    DType("C64", 8, "complex64", False),
    DType("F4", 1, None, True),  # packed 4-bit floats: shape counts elements, 2 per byte
    DType("F6_E2M3", 1, None, True),
    DType("F6_E3M2", 1, None, True),
]

BY_TAG: dict[str, DType] = {d.tag: d for d in _TABLE}


@cache
def _by_torch() -> dict[torch.dtype, DType]:
    return {d.torch: d for d in _TABLE if d.torch is not None}

# Sub-byte formats: (bits per element). Span = ceil(numel * bits / 8).
_SUB_BYTE_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}

# Names users give on the command line for an output dtype.
CLI_NAMES: dict[str, str] = {
    "fp32": "F32",
    "fp16": "F16",
    "bf16": "BF16",
    "fp8_e4m3fn": "F8_E4M3",
    "fp8_e5m2": "F8_E5M2",
}


def nbytes(tag: str, shape: tuple[int, ...]) -> int:
    """Byte span a tensor of this dtype and shape occupies in a safetensors file."""
    numel = 1
    for dim in shape:
        numel *= dim
    bits = _SUB_BYTE_BITS.get(tag)
    if bits is not None:
        return (numel * bits + 7) // 8
    return numel * BY_TAG[tag].itemsize


def torch_dtype(tag: str) -> torch.dtype:
    dt = BY_TAG[tag].torch
    if dt is None:
        raise KeyError(f"torch has no dtype for safetensors {tag}")
    return dt


def tag_of(dtype: torch.dtype) -> str:
    return _by_torch()[dtype].tag


def is_float(tag: str) -> bool:
    return BY_TAG[tag].is_float
