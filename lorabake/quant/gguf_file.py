"""GGUF files as lorabake reads and writes them: the header through the `gguf` package, tensor
bytes by positional reads (no mmap: one tensor in memory at a time).

The diffusion-model layout of city96/ComfyUI-GGUF (`loader.py`, `tools/convert.py`): the
`general.architecture` key names the family, tensors keep their original (safetensors) names, and
a tensor stored reshaped to rows of 256 records its real shape in `comfy.gguf.orig_shape.<name>`
(an INT32 array). GGUF lists dimensions fastest-first; shapes here are in torch order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from lorabake.errors import HeaderError, InputError
from lorabake.quant.ggml import GGMLType, decode, ggml_type
from lorabake.st_header import TensorInfo

ORIG_SHAPE = "comfy.gguf.orig_shape."
ARCH_KEY = "general.architecture"
_HEADER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", ARCH_KEY)


OWN_KEYS = ("lorabake.", "modelspec.")


def is_gguf(path: str) -> bool:
    return str(path).lower().endswith(".gguf")


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    kind: GGMLType
    stored_shape: tuple[int, ...]  # as written (torch order), maybe reshaped to rows of 256
    shape: tuple[int, ...]  # the tensor's real shape
    offset: int  # absolute file offset of its bytes
    nbytes: int


@dataclass(frozen=True)
class Field:
    """One key/value of the GGUF header, kept to be written back unchanged."""

    name: str
    value: object
    vtype: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None


class GGUFBase:
    """A GGUF model read like a safetensors base: `tensors` (for planning), `read`, `read_bytes`."""

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except (ValueError, OSError, KeyError, IndexError) as exc:
            raise HeaderError(f"not a readable GGUF file ({exc})", path=self.path) from None
        self.arch = _string(reader, ARCH_KEY)
        self.fields = [_field(f) for f in reader.fields.values() if f.name not in _HEADER_FIELDS and f.types]
        self.entries: dict[str, GGUFTensor] = {}
        for t in reader.tensors:
            stored = tuple(int(d) for d in reversed(t.shape.tolist()))
            orig = reader.get_field(ORIG_SHAPE + t.name)
            shape = tuple(int(v) for v in orig.contents()) if orig is not None else stored
            try:
                kind = ggml_type(t.tensor_type.name)
            except KeyError:
                raise HeaderError(f"unknown GGML type {t.tensor_type}", path=self.path, tensor=t.name) from None
            if np.prod(shape) != np.prod(stored):
                raise HeaderError(f"{ORIG_SHAPE}{t.name} {list(shape)} does not hold {list(stored)}", path=self.path)
            self.entries[t.name] = GGUFTensor(t.name, kind, stored, shape, int(t.data_offset), int(t.n_bytes))
        del reader  # drops the memmap
        # the string keys lorabake and modelspec write (provenance, recipe entries), as safetensors metadata
        self.metadata: dict[str, str] = {
            f.name: f.value for f in self.fields
            if f.vtype == gguf.GGUFValueType.STRING and f.name.startswith(OWN_KEYS) and isinstance(f.value, str)
        }
        self.tensors = {
            n: TensorInfo(n, _planning_tag(e.kind), e.shape, e.offset, e.offset + e.nbytes) for n, e in self.entries.items()
        }
        self._fd = os.open(self.path, os.O_RDONLY)

    layout = "gguf"

    @property
    def file_size(self) -> int:
        return os.path.getsize(self.path)

    @property
    def data_size(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def read_bytes(self, name: str) -> np.ndarray:
        e = self.entries[name]
        buf = np.empty(e.nbytes, dtype=np.uint8)
        view, done = memoryview(buf), 0
        while done < e.nbytes:
            got = os.preadv(self._fd, [view[done:]], e.offset + done)
            if got == 0:
                raise HeaderError("file ended while reading this tensor", path=self.path, tensor=name)
            done += got
        return buf

    def read(self, name: str) -> torch.Tensor:
        """fp32 values of tensor `name`, in its real shape."""
        e = self.entries[name]
        return decode(self.read_bytes(name), e.kind, e.stored_shape).reshape(e.shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> GGUFBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _planning_tag(kind: GGMLType) -> str:
    return kind.name if kind.name in ("F32", "F16", "BF16") else "F32"


def _string(reader: gguf.GGUFReader, key: str) -> str | None:
    f = reader.get_field(key)
    return None if f is None else str(f.contents())


def _field(f) -> Field:
    sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
    return Field(f.name, f.contents(), f.types[0], sub)


def open_gguf(path: str) -> GGUFBase:
    if not os.path.isfile(path):
        raise InputError("no such file", path=path)
    return GGUFBase(path)
