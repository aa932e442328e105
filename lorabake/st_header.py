"""The safetensors header: parse and validate it completely before any tensor byte is read.

Layout: u64 little-endian header length N, N bytes of UTF-8 JSON, then the data section.
Every rule the format implies is checked here, so the reader and writer can trust a `Header`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import struct
from dataclasses import dataclass, field

from lorabake import dtypes
from lorabake.errors import HeaderError, InputError, LorabakeError

# Same cap as the safetensors library: a larger header is refused before it is read.
MAX_HEADER_BYTES = 100_000_000
# safetensors stores shapes and offsets as u64 (usize): anything larger is no real file.
MAX_UINT = 2**64 - 1


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor's header entry. `start`/`end` are offsets into the data section."""

    name: str
    dtype: str  # safetensors tag, e.g. "F16"
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


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
    header_bytes: bytes = field(repr=False, default=b"")
    identity: Identity | None = None

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_offset


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen = dict(pairs)  # C speed: a header of 10^6 tensors calls this 10^6 times
    if len(seen) != len(pairs):
        names = [k for k, _ in pairs]
        raise _Duplicate(next(k for k in names if names.count(k) > 1))
    return seen


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


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
        raw = fh.read(header_len)
    if len(raw) != header_len:
        raise HeaderError("file ended while reading the header (was it truncated after opening?)", path=path)
    header = parse_header(raw, path=path, file_size=file_size)
    return dataclasses.replace(header, identity=Identity.of(st))


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


def parse_json(text: str | bytes, *, what: str, path: str, error: type[LorabakeError] = HeaderError, **kwargs) -> object:
    """`json.loads` for text from a file: every way it can fail is one `error` naming the file.

    Nesting deeper than the interpreter's recursion limit (~1000 levels; real headers nest 3)
    is refused as such; an integer of over 4300 digits is refused by Python's own cap."""
    try:
        return json.loads(text, **kwargs)
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON ({exc.msg} at char {exc.pos})", path=path) from None
    except RecursionError:
        raise error(f"{what} is JSON nested too deeply (over the parser's depth cap)", path=path) from None
    except ValueError as exc:  # int() over sys.get_int_max_str_digits() digits
        detail = "an integer with too many digits" if "digits" in str(exc) else str(exc)
        raise error(f"{what} is not valid JSON ({detail})", path=path) from None


def _surrogate(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


def parse_header(raw: bytes, *, path: str, file_size: int) -> Header:
    """Validate header bytes `raw` of a file of `file_size` bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"header is not valid UTF-8 (byte {exc.start})", path=path) from None
    try:
        doc = parse_json(text, what="header", path=path, object_pairs_hook=_reject_duplicates)
    except _Duplicate as dup:
        raise HeaderError("header names this tensor twice", path=path, tensor=dup.key) from None
    if not isinstance(doc, dict):
        raise HeaderError(f"header is a JSON {type(doc).__name__}, not an object", path=path)

    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise HeaderError("__metadata__ is not an object of strings", path=path)
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise HeaderError(
                f"__metadata__ value for {key!r} is a {type(value).__name__}, not a string", path=path
            )

    if "\\ud" in text or "\\uD" in text:  # \uD800-\uDFFF escapes: UTF-8 cannot hold them
        for name in [*doc, *metadata, *metadata.values()]:
            if _surrogate(name):
                raise HeaderError(
                    f"header holds a lone surrogate in \"{name.encode('utf-8', 'backslashreplace').decode()}\", "
                    "which is not valid Unicode",
                    path=path,
                )
    data_offset = 8 + len(raw)
    data_size = file_size - data_offset
    infos = [_entry(name, entry, path) for name, entry in doc.items()]
    del doc  # 10^6 parsed entries are ~1 GB of dicts: gone before the rest is built
    infos.sort(key=lambda t: (t.start, t.end))
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
    return Header(
        path=path,
        metadata=dict(metadata),
        tensors={t.name: t for t in infos},
        data_offset=data_offset,
        file_size=file_size,
        header_bytes=bytes(raw),
    )


_FIELDS = {"dtype": None, "shape": None, "data_offsets": None}.keys()


def _entry(name: str, entry: object, path: str) -> TensorInfo:
    # The common case first, in few steps (10^6 entries must parse in seconds); any doubt goes
    # to `_entry_fault`, which says exactly what is wrong.
    if type(entry) is dict and entry.keys() == _FIELDS:
        tag, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if (
            type(tag) is str
            and tag in dtypes.BY_TAG
            and type(shape) is list
            and all(type(d) is int and 0 <= d <= MAX_UINT for d in shape)
            and type(offsets) is list
            and len(offsets) == 2
            and type(offsets[0]) is int
            and type(offsets[1]) is int
            and 0 <= offsets[0] <= offsets[1] <= MAX_UINT
            and dtypes.nbytes(tag, shape) == offsets[1] - offsets[0]
        ):
            return TensorInfo(name, tag, tuple(shape), offsets[0], offsets[1])
    raise _entry_fault(name, entry, path)


def _entry_fault(name: str, entry: object, path: str) -> HeaderError:
    if not isinstance(entry, dict):
        return HeaderError("header entry is not an object", path=path, tensor=name)
    tag = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(tag, str) or tag not in dtypes.BY_TAG:
        return HeaderError(f"unknown dtype {_short(tag)}", path=path, tensor=name)
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        return HeaderError(f"shape {_short(shape)} is not a list of integers in [0, 2^64)", path=path, tensor=name)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_uint(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        return HeaderError(f"data_offsets {_short(offsets)} is not [begin, end] with begin <= end", path=path, tensor=name)
    extra = set(entry) - {"dtype", "shape", "data_offsets"}
    if extra:
        return HeaderError(f"unexpected header fields {_short(sorted(extra))}", path=path, tensor=name)
    expected = dtypes.nbytes(tag, tuple(shape))
    return HeaderError(
        f"shape {_short(shape)} of {tag} needs {_short(expected)} bytes but its span holds {offsets[1] - offsets[0]}",
        path=path,
        tensor=name,
    )


def _short(value: object, limit: int = 80) -> str:
    """repr of a header value, cut: a hostile one may be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_UINT


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
