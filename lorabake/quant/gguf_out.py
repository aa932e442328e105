"""Write a GGUF file tensor by tensor: declare every tensor first, then stream their bytes.

The file is written under a temporary name and renamed into place when complete, so a failure
leaves no output behind.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import gguf
import numpy as np

from lorabake.errors import OutputError, WriterProtocolError
from lorabake.outfile import TMP_MARKER
from lorabake.quant.ggml import GGMLType
from lorabake.quant.gguf_file import ORIG_SHAPE, Field


@dataclass(frozen=True)
class OutTensor:
    name: str
    kind: GGMLType
    stored_shape: tuple[int, ...]
    shape: tuple[int, ...]  # real shape; recorded in comfy.gguf.orig_shape when it differs

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return (*self.stored_shape[:-1], self.kind.row_bytes(self.stored_shape[-1]))


class GGUFOut:
    def __init__(self, target: str, arch: str | None, fields: list[Field], tensors: list[OutTensor]) -> None:
        self.target = target
        folder, name = os.path.split(os.path.abspath(target))
        self.tmp = os.path.join(folder, f".{name}{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")
        self.order = [t.name for t in tensors]
        self.decl = {t.name: t for t in tensors}
        self._next = 0
        self.writer = gguf.GGUFWriter(path=None, arch=arch or "")
        if arch is None:  # GGUFWriter always writes the key; a file without one keeps none
            self.writer.kv_data[0].pop("general.architecture", None)
        for f in fields:
            if not f.name.startswith(ORIG_SHAPE):
                self.writer.add_key_value(f.name, f.value, f.vtype, f.sub_type)
        for t in tensors:
            if t.shape != t.stored_shape:
                self.writer.add_array(ORIG_SHAPE + t.name, list(t.shape))
            nbytes = int(np.prod(t.byte_shape))
            self.writer.add_tensor_info(t.name, t.byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=t.kind.qtype)

    def __enter__(self) -> GGUFOut:
        try:
            self.writer.write_header_to_file(path=self.tmp)
            self.writer.write_kv_data_to_file()
            self.writer.write_ti_data_to_file()
        except OSError as exc:
            self._abort()
            raise OutputError(exc.strerror or str(exc), path=self.target) from None
        return self

    def write(self, name: str, raw: np.ndarray) -> None:
        want = self.order[self._next] if self._next < len(self.order) else None
        if name != want:
            raise WriterProtocolError(f"out of order: expected {want!r} next", path=self.target, tensor=name)
        decl = self.decl[name]
        raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(decl.byte_shape)
        self.writer.write_tensor_data(raw)
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._next != len(self.order):
            self._abort()
            if exc_type is None:
                raise WriterProtocolError(f"closed after {self._next} of {len(self.order)} tensors", path=self.target)
            return
        self.writer.close()
        os.replace(self.tmp, self.target)

    def _abort(self) -> None:
        try:
            self.writer.close()
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
