"""One safetensors header entry: `TensorInfo` and the rules an entry must pass.

Shared by the two header parsers in `st_header` (the reference one and the one-pass scan), so
both accept exactly the same entries and reject the rest with the same words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lorabake import dtypes
from lorabake.errors import HeaderError, LorabakeError

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


class Duplicate(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """`object_pairs_hook` that refuses a key given twice in one JSON object."""
    seen = dict(pairs)  # C speed: a header of 10^6 tensors calls this 10^6 times
    if len(seen) != len(pairs):
        names = [k for k, _ in pairs]
        raise Duplicate(next(k for k in names if names.count(k) > 1))
    return seen


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


_FIELDS = {"dtype": None, "shape": None, "data_offsets": None}.keys()


def entry_info(name: str, entry: object, path: str) -> TensorInfo:
    """The `TensorInfo` of header entry `name` (a parsed JSON value), or the `HeaderError` saying
    what is wrong with it."""
    # The common case first, in few steps; any doubt goes to `_entry_fault`, which says exactly
    # what is wrong.
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
