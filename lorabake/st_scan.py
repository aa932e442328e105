"""A safetensors header read in one pass: the fast path of `st_header.parse_header`.

`json.loads` of a header of 10^6 tensors builds 10^6 dicts and 2x10^6 lists (~600 MB) that are
thrown away once the `TensorInfo`s exist. Here one regular expression reads each entry as
written by safetensors and by lorabake (`"name":{"dtype":…,"shape":[…],"data_offsets":[…,…]}`,
any JSON whitespace) straight into a `TensorInfo`; any other entry (`__metadata__`, another key
order, an escape in a name) is parsed by `json`'s own scanner with the duplicate-refusing hook
and checked by `entry_info`, like the reference parser does.

The rules are `entry_info`'s and `st_header`'s, in the reference order: the JSON as a whole first
(syntax, depth, digits, a key given twice in any object), then the metadata, names, entries in
document order and spans. So `scan` returns None at the first fault of the JSON itself, and
`st_header` has `json` name it (the first object to close with a duplicate key, say); the first
entry `entry_info` refuses is only kept, as the JSON further on may still be at fault. Header or
error, the result equals the reference parser's (`tests/test_st_scan.py`).
"""

from __future__ import annotations

import dataclasses
import json
import json.decoder
import json.scanner
import re

from lorabake import dtypes
from lorabake.errors import HeaderError
from lorabake.st_entry import Duplicate, TensorInfo, entry_info, reject_duplicates

_WS = r"[ \t\n\r]*"  # JSON whitespace, exactly
_UINT = r"(?:0|[1-9][0-9]{0,18})"  # a JSON integer in [0, 10^19) (u64 values up to 2^64 go the other way)
_STR = r'[^"\\\x00-\x1f]*'  # the inside of a JSON string without escapes (control characters are invalid)


def _entry_pattern(ws: str) -> re.Pattern:
    """One entry and the comma after it, with `ws` where JSON allows whitespace (the last entry,
    without a comma, is read by `json`). Groups: the name, the dtype-and-shape text, the offsets."""
    dims = rf"{ws}(?:{_UINT}{ws}(?:,{ws}{_UINT}{ws})*)?"
    return re.compile(
        rf'{ws}"({_STR})"{ws}:{ws}\{{'
        rf'{ws}"dtype"{ws}:{ws}"({_STR}"{ws},{ws}"shape"{ws}:{ws}\[{dims})\]{ws},'
        rf'{ws}"data_offsets"{ws}:{ws}\[{ws}({_UINT}){ws},{ws}({_UINT}){ws}\]'
        rf"{ws}\}}{ws},"
    )


# Compact JSON (the safetensors library's) first: that pattern matches in 2/3 of the time.
_ENTRIES = (_entry_pattern(""), _entry_pattern(_WS))
_KIND = re.compile(rf'({_STR})"{_WS},{_WS}"shape"{_WS}:{_WS}\[(.*)', re.S)
_OPEN = re.compile(rf"{_WS}\{{")
_KEY = re.compile(rf'{_WS}"')
_COLON = re.compile(rf"{_WS}:{_WS}")
_SEP = re.compile(rf"{_WS}([,}}])")
_END = re.compile(_WS)
_ABSENT = object()


class Scanned:
    """A header `scan` read: metadata as parsed, tensors in document order, whether their spans
    already tile the data section from 0 in that order (then no sort or check is needed), and (for
    any) the first entry fault, with None in `tensors` for each faulty name."""

    __slots__ = ("metadata", "tensors", "contiguous_to", "fault")

    def __init__(self, metadata: object, tensors: dict, contiguous_to: int | None, fault: HeaderError | None) -> None:
        self.metadata = metadata
        self.tensors = tensors
        self.contiguous_to = contiguous_to  # end of the last span if spans follow each other from 0
        self.fault = fault


def scan(text: str, path: str) -> Scanned | None:
    """Read header JSON `text`: None when the JSON itself is at fault (see above); the first entry
    that `entry_info` refuses is kept in `Scanned.fault`, the scan goes on."""
    opened = _OPEN.match(text)
    if opened is None:
        return None
    pos = opened.end()
    inside = _END.match(text, pos).end()
    if text.startswith("}", inside):  # an empty object
        return Scanned({}, {}, 0, None) if _END.match(text, inside + 1).end() == len(text) else None
    value_at = json.scanner.make_scanner(json.JSONDecoder(object_pairs_hook=reject_duplicates))
    new, (set_name, set_dtype, set_shape, set_start, set_end) = object.__new__, _fillers()
    kinds: dict[str, tuple[str, tuple[int, ...], int]] = {}
    tensors: dict[str, TensorInfo | None] = {}
    metadata: object = _ABSENT
    fault = None
    count, cursor, cursor_text, contiguous = 0, 0, "0", True
    while True:
        # Entries as written by safetensors, as long as they come. This loop is the hot path of
        # a header of 10^6 tensors: each step in it costs ~0.1 s there.
        for pattern in _ENTRIES:
            m = other = None
            for m in iter(pattern.scanner(text, pos).match, None):
                name, kind_text, first, last = m.groups()
                kind = kinds.get(kind_text)
                if kind is None:
                    kind = _kind(kind_text)
                    if kind is not None:
                        kinds[kind_text] = kind
                if first == cursor_text:  # digits without leading zeros: equal text, equal number
                    start = cursor
                else:
                    start = int(first)
                    contiguous = False
                end = int(last)
                if kind is None or end - start != kind[2] or name == "__metadata__":
                    other = m.start()  # read again below by `json`, and judged by `entry_info`
                    break
                info = new(TensorInfo)
                set_name(info, name)
                set_dtype(info, kind[0])
                set_shape(info, kind[1])
                set_start(info, start)
                set_end(info, end)
                tensors[name] = info
                count += 1
                cursor, cursor_text = end, last
            if other is not None:
                pos = other
                break
            if m is not None:
                pos = m.end()
        # Anything else, one key and its value, through `json`'s own scanner.
        key = _KEY.match(text, pos)
        if key is None:
            return None
        try:
            name, pos = json.decoder.scanstring(text, key.end(), True)
            colon = _COLON.match(text, pos)
            if colon is None:
                return None
            value, pos = value_at(text, colon.end())
        except (ValueError, StopIteration, RecursionError, Duplicate):  # JSONDecodeError is a ValueError
            return None
        if name == "__metadata__":
            if metadata is not _ABSENT:
                return None
            metadata = value
        else:
            count += 1
            try:
                info = entry_info(name, value, path)
            except HeaderError as exc:
                fault = fault or exc
                tensors[name] = None
            else:
                tensors[name] = info
                if info.start != cursor:
                    contiguous = False
                cursor, cursor_text = info.end, str(info.end)
        after = _SEP.match(text, pos)
        if after is None:
            return None
        pos = after.end()
        if after.group(1) == "}":
            break
    if _END.match(text, pos).end() != len(text) or len(tensors) != count or "__metadata__" in tensors:
        return None  # text after the object, a name given twice
    return Scanned({} if metadata is _ABSENT else metadata, tensors, cursor if contiguous else None, fault)


def _fillers() -> tuple:
    """The slot setters of `TensorInfo`'s fields, in order: setting them on `object.__new__(TensorInfo)`
    is ~2.5x faster than `TensorInfo(...)`, whose frozen `__init__` goes through
    `object.__setattr__` per field. Only for values already checked."""
    return tuple(TensorInfo.__dict__[f.name].__set__ for f in dataclasses.fields(TensorInfo))


def _kind(text: str) -> tuple[str, tuple[int, ...], int] | None:
    """(the dtype table's own tag string, shape, byte span) from the dtype-and-shape text of an
    entry; None for a dtype that does not exist. One per distinct text, shared by its entries."""
    tag, dims = _KIND.fullmatch(text).groups()
    canonical = next((t for t in dtypes.BY_TAG if t == tag), None)
    if canonical is None:
        return None
    shape = tuple(int(d) for d in dims.split(",")) if dims.strip(" \t\n\r") else ()
    return canonical, shape, dtypes.nbytes(canonical, shape)
