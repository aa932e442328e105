"""The safetensors header: parse and validate it completely before any tensor byte is read.

Layout: u64 little-endian header length N, N bytes of UTF-8 JSON, then the data section.
Every rule the format implies is checked here, so the reader and writer can trust a `Header`.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import io
import json
import os
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from lorabake import dtypes
from lorabake.errors import HeaderError, InputError
from lorabake.st_entry import MAX_UINT, Duplicate, TensorInfo, parse_json, reject_duplicates
from lorabake.st_scan import scan

__all__ = ["MAX_UINT", "TensorInfo", "parse_json"]  # defined in st_entry, imported from here too

# Same cap as the safetensors library: a larger header is refused before it is read.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class Identity:
    """What says a file is still the one whose header we read: checked again after the last read."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class Header:
    path: str
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]  # in data-offset (file) order
    data_offset: int  # absolute file offset of the data section
    file_size: int
    # SHA-256 of the 8-byte length and the header bytes: what provenance records of an input
    # (kept instead of the bytes, which are 88 MB for 10^6 tensors)
    header_sha256: str = field(repr=False, default="")
    identity: Identity | None = None

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_offset


def open_regular(path: str) -> int:
    """A read-only descriptor of `path`, refused unless it is a regular file: a FIFO or device
    would block or never end (O_NONBLOCK: opening a FIFO does not wait for a writer)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise InputError(f"is {kind}; only regular files are read", path=path)
        if flags & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_header(path: str | os.PathLike) -> Header:
    """Open `path`, read and validate its header. Raises `HeaderError` naming the problem."""
    path = os.fspath(path)
    fd = open_regular(path)
    try:
        return read_header_fd(fd, path)
    finally:
        os.close(fd)


def read_header_fd(fd: int, path: str) -> Header:
    """The header of the open regular file `fd` (named `path` in errors), with its `Identity`."""
    with os.fdopen(fd, "rb", closefd=False) as fh:
        st = os.fstat(fd)
        file_size = st.st_size
        if file_size == 0:
            raise HeaderError("file is empty, not a safetensors file", path=path)
        if file_size < 8:
            raise HeaderError(f"file is {file_size} bytes, shorter than the 8-byte header length", path=path)
        fh.seek(0)
        head = fh.read(8)
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
            foreign = _foreign_format(head)
            if foreign:
                raise HeaderError(
                    f"{foreign}, not a safetensors file",
                    path=path,
                    hint="convert it to .safetensors first with a tool you trust; never load pickles you did not make",
                )
        if header_len > MAX_HEADER_BYTES:
            raise HeaderError(
                f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte cap", path=path
            )
        if 8 + header_len > file_size:
            raise HeaderError(
                f"header length {header_len} runs past the end of the {file_size}-byte file", path=path
            )
        fh.seek(8)
        # no name for the bytes here: `parse_header` drops them once decoded
        header = parse_header(_read_exactly(fh, header_len, path), path=path, file_size=file_size)
    return dataclasses.replace(header, identity=Identity.of(st))


def _read_exactly(fh: io.BufferedReader, n: int, path: str) -> bytes:
    raw = fh.read(n)
    if len(raw) != n:
        raise HeaderError("file ended while reading the header (was it truncated after opening?)", path=path)
    return raw


# Magic numbers of formats people rename to .safetensors by mistake. Only consulted once the
# first 8 bytes have already failed as a header length, so a real header is never misread.
_FOREIGN_MAGIC = (
    (b"PK\x03\x04", "is a zip archive (PyTorch's torch.save format: a pickle inside)"),
    (b"\x80\x02", "looks like a Python pickle (.ckpt/.pt/.bin)"),
    (b"\x80\x03", "looks like a Python pickle (.ckpt/.pt/.bin)"),
    (b"\x80\x04", "looks like a Python pickle (.ckpt/.pt/.bin)"),
    (b"\x80\x05", "looks like a Python pickle (.ckpt/.pt/.bin)"),
    (b"GGUF", "is a GGUF file"),
)


def _foreign_format(head: bytes) -> str | None:
    for magic, what in _FOREIGN_MAGIC:
        if head.startswith(magic):
            return what
    return None


def parse_header(raw: bytes, *, path: str, file_size: int) -> Header:
    """Validate header bytes `raw` of a file of `file_size` bytes.

    `st_scan.scan` reads it in one pass (10^6 tensors in seconds, without the ~600 MB of dicts
    `json.loads` would build). Faults are reported in this order: the JSON as a whole (syntax,
    depth, digits, duplicate keys), that it is an object, its metadata, lone surrogates in names,
    each entry in document order, then the spans.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"header is not valid UTF-8 (byte {exc.start})", path=path) from None
    digest = hashlib.sha256(len(raw).to_bytes(8, "little"))
    digest.update(raw)
    data_offset = 8 + len(raw)
    del raw  # the caller keeps no reference (`read_header_fd`): 88 MB for 10^6 tensors
    with _gc_paused():
        scanned = scan(text, path)
        if scanned is None:  # the JSON itself is at fault: `json` says where
            _check_json(text, path)
            raise HeaderError("header is not valid JSON", path=path)  # not reached: the check raises
        metadata, tensors, tiled_to = scanned.metadata, scanned.tensors, scanned.contiguous_to
        _check_metadata(metadata, path)
        if "\\ud" in text or "\\uD" in text:  # escapes of lone surrogates may be there
            _check_surrogates([*tensors, *metadata, *metadata.values()], path)
        if scanned.fault is not None:
            raise scanned.fault
        del text, scanned
        data_size = file_size - data_offset
        if tiled_to != data_size:  # else the spans, in document order, tile the data section already
            infos = sorted(tensors.values(), key=_span)
            tensors = None  # 10^6 entries: one dict at a time
            _check_spans(infos, data_size, path)
            tensors = {t.name: t for t in infos}
    return Header(
        path=path,
        metadata=dict(metadata),
        tensors=tensors,
        data_offset=data_offset,
        file_size=file_size,
        header_sha256=digest.hexdigest(),
    )


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a header's objects are made: 10^6 of them would set it
    off ~1500 times, each pass longer than the last (over a third of the parse time); they hold no
    cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_OBJECT = object()


def _check_json(text: str, path: str) -> None:
    """The header as JSON: valid, no key given twice in any object (the first such object to close
    is named), an object at the top. Each object is dropped once checked: no parsed document of
    10^6 entries (~600 MB) is ever held."""
    try:
        doc = parse_json(text, what="header", path=path, object_pairs_hook=_checked_and_dropped)
    except Duplicate as dup:
        raise HeaderError("header names this tensor twice", path=path, tensor=dup.key) from None
    if doc is not _OBJECT:
        raise HeaderError(f"header is a JSON {type(doc).__name__}, not an object", path=path)


def _checked_and_dropped(pairs: list[tuple[str, object]]) -> object:
    if len(dict(pairs)) != len(pairs):
        reject_duplicates(pairs)  # raises `Duplicate` naming the key
    return _OBJECT


def _check_metadata(metadata: object, path: str) -> None:
    if not isinstance(metadata, dict):
        raise HeaderError("__metadata__ is not an object of strings", path=path)
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise HeaderError(
                f"__metadata__ value for {key!r} is a {type(value).__name__}, not a string", path=path
            )


def _check_surrogates(texts: list[str], path: str) -> None:
    """\\uD800-\\uDFFF escapes give lone surrogates, which UTF-8 cannot hold."""
    for name in texts:
        if any("\ud800" <= c <= "\udfff" for c in name):
            raise HeaderError(
                f"header holds a lone surrogate in \"{name.encode('utf-8', 'backslashreplace').decode()}\", "
                "which is not valid Unicode",
                path=path,
            )


def _span(info: TensorInfo) -> tuple[int, int]:
    return info.start, info.end


def _check_spans(infos: list[TensorInfo], data_size: int, path: str) -> None:
    """`infos`, sorted by span, tile the data section: no overlap, no gap, nothing past its end."""
    cursor = 0
    for info in infos:
        if info.start < cursor:
            raise HeaderError(
                f"data span [{info.start}, {info.end}) overlaps the previous tensor (ends at {cursor})",
                path=path,
                tensor=info.name,
            )
        if info.start > cursor:
            raise HeaderError(
                f"gap of {info.start - cursor} bytes before this tensor's data at {info.start}",
                path=path,
                tensor=info.name,
            )
        if info.end > data_size:
            raise HeaderError(
                f"data span [{info.start}, {info.end}) runs past the end of the data section "
                f"({data_size} bytes)",
                path=path,
                tensor=info.name,
            )
        cursor = info.end
    if cursor != data_size:
        raise HeaderError(
            f"{data_size - cursor} trailing bytes after the last tensor's data", path=path
        )


def encode_header(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None
) -> tuple[bytes, list[tuple[int, int]]]:
    """JSON header bytes (padded with spaces to a multiple of 8) and the data spans, offsets from 0.

    Same spelling as the safetensors library: compact JSON, `__metadata__` first, then the
    tensors in the given order with contiguous offsets.
    """
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    spans = []
    cursor = 0
    for name, tag, shape in entries:
        size = dtypes.nbytes(tag, shape)
        spans.append((cursor, cursor + size))
        doc[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [cursor, cursor + size]}
        cursor += size
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    pad = (-(8 + len(raw))) % 8
    return raw + b" " * pad, spans
