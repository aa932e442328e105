"""Every header rule, one malformed file each (built here, byte by byte)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from lorabake.errors import HeaderError
from lorabake.st_header import MAX_HEADER_BYTES, read_header


def raw_file(path, header: object, data: bytes = b"", *, header_bytes: bytes | None = None) -> str:
    hb = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return str(path)


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


GOOD = {"a": entry(offsets=(0, 8)), "b": entry("F16", (2, 2), (8, 16))}

# (case id, header, data, expected message fragment)
MALFORMED = [
    ("unknown dtype", {"a": entry("F12")}, b"\0" * 8, "unknown dtype"),
    ("shape x dtype != span", {"a": entry("F32", (3,), (0, 8))}, b"\0" * 8, "needs 12 bytes"),
    ("overlapping spans", {"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}, b"\0" * 12, "overlaps"),
    ("gap", {"a": entry(offsets=(0, 8)), "b": entry(offsets=(12, 20))}, b"\0" * 20, "gap of 4 bytes"),
    ("gap before first", {"a": entry(offsets=(4, 12))}, b"\0" * 12, "gap of 4 bytes"),
    ("span past end", {"a": entry(offsets=(0, 8))}, b"\0" * 4, "runs past the end"),
    ("trailing bytes", {"a": entry(offsets=(0, 8))}, b"\0" * 9, "1 trailing bytes"),
    ("metadata not strings", {"__metadata__": {"epoch": 3}, "a": entry()}, b"\0" * 8, "not a string"),
    ("metadata not object", {"__metadata__": ["x"], "a": entry()}, b"\0" * 8, "__metadata__ is not an object"),
    ("header is a list", [1, 2], b"", "not an object"),
    ("offsets reversed", {"a": entry(offsets=(8, 0))}, b"\0" * 8, "data_offsets"),
    ("negative shape", {"a": entry(shape=(-2,))}, b"\0" * 8, "shape"),
    ("entry not object", {"a": 5}, b"", "not an object"),
]


@pytest.mark.parametrize("case,header,data,fragment", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_header_is_named(tmp_path, case, header, data, fragment):
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(HeaderError) as err:
        read_header(path)
    assert fragment in str(err.value)
    assert path in str(err.value)


def test_empty_and_short_files(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(HeaderError, match="empty"):
        read_header(empty)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02\x03")
    with pytest.raises(HeaderError, match="shorter than the 8-byte"):
        read_header(short)


def test_header_length_beyond_file_and_cap(tmp_path):
    p = tmp_path / "long.safetensors"
    p.write_bytes(struct.pack("<Q", 500) + b"{}")
    with pytest.raises(HeaderError, match="runs past the end"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(HeaderError, match="cap"):
        read_header(p)


def test_invalid_utf8_and_json(tmp_path):
    with pytest.raises(HeaderError, match="UTF-8"):
        read_header(raw_file(tmp_path / "u.safetensors", None, header_bytes=b'{"\xff": 1}'))
    with pytest.raises(HeaderError, match="not valid JSON"):
        read_header(raw_file(tmp_path / "j.safetensors", None, header_bytes=b'{"a": '))


def test_duplicate_names(tmp_path):
    hb = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'
    path = raw_file(tmp_path / "dup.safetensors", None, b"\0" * 16, header_bytes=hb)
    with pytest.raises(HeaderError, match="twice") as err:
        read_header(path)
    assert "'a'" in str(err.value)


def test_good_file_parses_in_offset_order(tmp_path):
    path = raw_file(tmp_path / "ok.safetensors", {"b": GOOD["b"], "a": GOOD["a"], "__metadata__": {"k": "v"}}, b"\0" * 16)
    h = read_header(path)
    assert list(h.tensors) == ["a", "b"]
    assert h.metadata == {"k": "v"}
    assert h.tensors["b"].shape == (2, 2) and h.tensors["b"].dtype == "F16"


@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.float16, torch.float64, torch.int8, torch.bool, torch.uint8],
)
def test_every_safetensors_dtype_is_known(tmp_path, dtype):
    p = tmp_path / "d.safetensors"
    save_file({"t": torch.zeros(3, 5, dtype=dtype), "empty": torch.zeros(0, 4, dtype=dtype)}, str(p))
    h = read_header(p)
    assert h.tensors["t"].shape == (3, 5)
    assert h.tensors["empty"].nbytes == 0
