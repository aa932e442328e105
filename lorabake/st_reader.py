"""Read safetensors one tensor at a time, with positional reads into fresh buffers.

No mmap: pages of an mmap stay in the process's resident set, so reading a 23 GB checkpoint
through one would grow RSS to the file size. `pread` into a new buffer per tensor keeps peak
memory at the largest tensor (plus the read-ahead budget), or at a window of it when the caller
reads a tensor in pieces (`read_into` with an offset, `readahead.read_ahead`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from lorabake import dtypes, readahead
from lorabake.errors import HeaderError, InputError
from lorabake.st_header import Header, Identity, TensorInfo, open_regular, parse_json, read_header_fd

if TYPE_CHECKING:  # torch is imported where a tensor is made, so header-only commands run without it
    import torch

# Pickle-based formats: refused, never unpickled.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def check_input_path(path: str) -> None:
    """Refuse paths we must not or cannot read, with a hint for each case."""
    if not os.path.exists(path):
        raise InputError("no such file or directory", path=path)
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise InputError(
            "pickle checkpoints are refused: loading one can run arbitrary code",
            path=path,
            hint="convert it to .safetensors first with a tool you trust",
        )
    if os.path.isdir(path):
        raise InputError(
            "is a directory without a *.safetensors.index.json or diffusers model_index.json", path=path
        )
    if not os.path.isfile(path):  # a FIFO would block, a device never end; refused before opening
        raise InputError("is not a regular file (a FIFO, device or socket); only regular files are read", path=path)


class SafetensorsReader:
    """One logical safetensors model: a single file, a sharded index, or a diffusers folder.

    `tensors` maps every logical name to its `TensorInfo` in read order (shard by shard, file
    order within a shard). Tensors come back as CPU tensors owning a fresh buffer.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._fds: dict[str, int] = {}
        self.headers: list[Header] = []
        self.tensors: dict[str, TensorInfo] = {}
        # Which shard holds each logical name; None when one file holds them all under their own
        # names (then `tensors` is that header's dict: no per-tensor object for 10^6 tensors).
        self._shard_of: dict[str, Header] | None = None
        self.layout = "file"
        try:
            self._open_shards()
        except BaseException:
            self.close()
            raise
        if os.path.isdir(self.path):
            self.layout = "diffusers" if _diffusers_components(self.path) else "sharded"
        elif self.path.endswith(".index.json") or len(self.headers) > 1:
            self.layout = "sharded"
        self.metadata: dict[str, str] = dict(self.headers[0].metadata) if len(self.headers) == 1 else {}
        if len(self.headers) > 1:
            for h in self.headers:
                self.metadata.update(h.metadata)

    def _open_shards(self) -> None:
        """Open every shard once (regular files only) and keep it open: data is read through the
        descriptor whose header was read, and `verify_unchanged` compares it with what it was."""
        shards = _shards_of(self.path)
        for prefix, shard in shards:
            if shard in self._fds:
                raise HeaderError("the same shard is listed twice", path=shard)
            self._fds[shard] = open_regular(shard)
            header = read_header_fd(self._fds[shard], shard)
            self.headers.append(header)
            if len(shards) == 1 and not prefix:
                self.tensors = header.tensors
                return
            if self._shard_of is None:
                self._shard_of = {}
            for name, info in header.tensors.items():
                logical = prefix + name
                if logical in self.tensors:
                    raise HeaderError(
                        "tensor appears in two shards", path=shard, tensor=logical
                    )
                self.tensors[logical] = info
                self._shard_of[logical] = header

    def shard_of(self, name: str) -> Header:
        """The header of the file that holds logical tensor `name`."""
        if self._shard_of is not None:
            return self._shard_of[name]
        if name not in self.tensors:
            raise KeyError(name)
        return self.headers[0]

    # -- sizes ---------------------------------------------------------------------------
    @property
    def file_size(self) -> int:
        return sum(h.file_size for h in self.headers)

    @property
    def data_size(self) -> int:
        return sum(h.data_size for h in self.headers)

    def files(self) -> list[str]:
        return [h.path for h in self.headers]

    # -- reading -------------------------------------------------------------------------
    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            raise InputError("read after the reader was closed", path=path)
        return fd

    def verify_unchanged(self) -> None:
        """Every shard is still the file whose header was read: same device, inode, size and
        modification time, through the open descriptor and at its path. Call it after the last
        read, before an output is committed: a file rewritten meanwhile gave a mix of bytes."""
        for header in self.headers:
            now = [Identity.of(os.fstat(self._fd(header.path)))]
            try:
                now.append(Identity.of(os.stat(header.path)))
            except OSError:
                now.append(None)
            if any(n != header.identity for n in now):
                raise InputError(
                    "changed while it was being read (size, inode or modification time differ); nothing was written",
                    path=header.path,
                    hint="do not modify or replace inputs while lorabake reads them",
                )

    def read_bytes(self, name: str) -> bytearray:
        """The raw bytes of tensor `name`, in a buffer of its own."""
        buf = bytearray(self.tensors[name].nbytes)
        self.read_into(name, memoryview(buf))
        return buf

    def read_view(self, name: str) -> memoryview:
        """Like `read_bytes`, as a memoryview of a fresh uninitialised buffer (no zero-fill pass).

        Supports what the streaming paths need: len, slicing, hashing, `to_tensor`, writing.
        """
        view = _empty_buffer(self.tensors[name].nbytes)
        self.read_into(name, view)
        return view

    def read_into(self, name: str, view: memoryview, offset: int = 0) -> None:
        """Fill `view` with tensor `name`'s bytes from byte `offset` of it on."""
        header, info = self.shard_of(name), self.tensors[name]
        if offset < 0 or offset + len(view) > info.nbytes:
            raise ValueError(f"bytes [{offset}, {offset + len(view)}) are outside {name!r} ({info.nbytes} bytes)")
        buf = view
        fd = self._fd(header.path)
        pos = header.data_offset + info.start + offset
        done = 0
        while done < len(buf):
            got = os.preadv(fd, [view[done:]], pos + done)
            if got == 0:
                raise HeaderError(
                    "file ended while reading this tensor (was it truncated after opening?)",
                    path=header.path,
                    tensor=name,
                )
            done += got

    def source_of(self, name: str) -> tuple[int, int, int]:
        """(open fd, byte offset, byte count) of tensor `name`'s bytes, for a kernel-side copy.

        The fd stays valid until `close`.
        """
        header, info = self.shard_of(name), self.tensors[name]
        return self._fd(header.path), header.data_offset + info.start, info.nbytes

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` as a CPU torch tensor (its own memory, no mmap)."""
        return to_tensor(self.read_view(name), self.tensors[name])

    def iter_bytes(
        self, names: Iterable[str], *, readahead_bytes: int = 0
    ) -> Iterator[tuple[str, memoryview]]:
        """Yield (name, raw bytes as a `read_view` memoryview) in the given order; read ahead on a
        thread within a byte budget.

        With `readahead_bytes=0` reads happen on the caller's thread. Otherwise a reader thread
        stays ahead while the tensors it has read but not yet handed over fit in the budget (one
        tensor larger than the budget is still read, alone).
        """
        names = list(names)
        if readahead_bytes <= 0:
            for name in names:
                yield name, self.read_view(name)
            return
        pieces = [(name, 0, self.tensors[name].nbytes) for name in names]
        for name, _start, view in readahead.read_ahead(self, pieces, readahead_bytes, _empty_buffer):
            yield name, view

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _empty_buffer(nbytes: int) -> memoryview:
    """A writable byte buffer that is not zero-filled (bytearray(n) memsets every byte first)."""
    if nbytes == 0:
        return memoryview(bytearray(0))
    import numpy

    return memoryview(numpy.empty(nbytes, dtype=numpy.uint8))


def to_tensor(buf: bytearray | memoryview, info: TensorInfo) -> torch.Tensor:
    import torch

    dt = dtypes.BY_TAG[info.dtype].torch
    if dt is None:
        raise HeaderError(f"torch cannot represent dtype {info.dtype}", tensor=info.name)
    if info.numel == 0:
        return torch.empty(info.shape, dtype=dt)
    return torch.frombuffer(buf, dtype=dt).reshape(info.shape)


# -- sharded and folder layouts ------------------------------------------------------------
_DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model", "model")
MAX_INDEX_BYTES = 100_000_000  # the header cap: an index lists no more than a header would


def _diffusers_components(folder: str) -> list[str]:
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        return []
    comps = []
    for entry in sorted(os.listdir(folder)):
        sub = os.path.join(folder, entry)
        if os.path.isdir(sub) and _weights_in(sub):
            comps.append(entry)
    return comps


def _weights_in(folder: str) -> str | None:
    for stem in _DIFFUSERS_WEIGHT_FILES:
        for suffix in (".safetensors.index.json", ".safetensors"):
            candidate = os.path.join(folder, stem + suffix)
            if os.path.isfile(candidate):
                return candidate
    return None


def _index_shards(index_path: str) -> list[str]:
    fd = open_regular(index_path)
    try:
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(MAX_INDEX_BYTES + 1)
    except OSError as exc:
        raise HeaderError(f"not a valid safetensors index ({exc.strerror})", path=index_path) from None
    if len(raw) > MAX_INDEX_BYTES:
        raise HeaderError(f"index is over {MAX_INDEX_BYTES} bytes", path=index_path)
    doc = parse_json(raw, what="index", path=index_path)
    try:
        weight_map = doc["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    except (KeyError, TypeError, AttributeError) as exc:
        raise HeaderError(f"not a valid safetensors index ({exc})", path=index_path) from None
    folder = os.path.dirname(index_path)
    shards = []
    for name in files:
        if not isinstance(name, str) or os.path.basename(name) != name:
            raise HeaderError(f"index names a shard outside its folder: {name!r}", path=index_path)
        shards.append(os.path.join(folder, name))
    for shard in shards:
        if not os.path.isfile(shard):
            raise InputError("shard named by the index is missing", path=shard)
    return shards


def model_files(path: str) -> list[str]:
    """Every file the model at `path` is made of: shards, their index files, a diffusers
    `model_index.json`; all of them are inputs an output may not replace."""
    files = [f for _, f in _shards_of(path)]
    if path.endswith(".index.json"):
        files.append(path)
    elif os.path.isdir(path):
        comps = _diffusers_components(path)
        if comps:
            files.append(os.path.join(path, "model_index.json"))
            files += [w for w in (_weights_in(os.path.join(path, c)) for c in comps) if w and w.endswith(".index.json")]
        else:
            files += [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors.index.json")]
    return files


def _shards_of(path: str) -> list[tuple[str, str]]:
    """(name prefix, file) pairs that make up the logical model at `path`."""
    if os.path.isdir(path):
        comps = _diffusers_components(path)
        if comps:
            out = []
            for comp in comps:
                weights = _weights_in(os.path.join(path, comp))
                files = _index_shards(weights) if weights.endswith(".index.json") else [weights]
                out += [(comp + ".", f) for f in files]
            return out
        indexes = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors.index.json")]
        if len(indexes) == 1:
            return [("", f) for f in _index_shards(os.path.join(path, indexes[0]))]
        sets = {_SHARD.sub("", f) for f in os.listdir(path) if _SHARD.search(f)}
        if not indexes and len(sets) == 1:  # shards without their index: the set by its numbering
            first = next(f for f in sorted(os.listdir(path)) if _SHARD.search(f))
            return [("", f) for f in _numbered_shards(os.path.join(path, first))]
        raise InputError(
            "is a directory without a *.safetensors.index.json or diffusers model_index.json", path=path
        )
    if path.endswith(".index.json"):
        return [("", f) for f in _index_shards(path)]
    check_input_path(path)
    if _SHARD.search(os.path.basename(path)):
        return [("", f) for f in _numbered_shards(path)]
    return [("", path)]


# `<name>-00001-of-00006.safetensors`, as transformers/diffusers number the shards of one model.
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.safetensors$")


def _numbered_shards(path: str) -> list[str]:
    """Every shard of the set `path` belongs to, by its numbering: one shard names the whole model."""
    match = _SHARD.search(path)
    count = int(match.group(2))
    head = path[: match.start()]
    shards = [f"{head}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    for shard in shards:
        if not os.path.isfile(shard):
            raise InputError(f"shard {os.path.basename(shard)} of this {count}-shard model is missing", path=shard)
    return shards
