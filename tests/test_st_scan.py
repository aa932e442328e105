"""`parse_header` agrees with the reference parser on every header.

`parse_header` reads a header with the one-pass `st_scan.scan`; when the JSON itself is at fault,
`json` names the fault. The reference below is the parser it replaced, as plainly as possible:
`json.loads` with duplicate keys refused, then each rule in order. For any header bytes, the result
must be the same `Header` or the same error, word for word. Checked on a table of tricky headers
(one row each, saying why it is there) and on 3000 random one-character edits of real-looking ones.
"""

from __future__ import annotations

import json
import random

import pytest

from lorabake import st_header, st_scan
from lorabake.errors import HeaderError
from lorabake.st_entry import Duplicate, entry_info, parse_json, reject_duplicates

E = '"dtype":"F32","shape":[1],"data_offsets":[{},{}]'


def entries(n: int, fmt: str = '"t{i}":{{' + E + "}}") -> str:
    return ",".join(fmt.format(4 * i, 4 * i + 4, i=i) for i in range(n))


# (case, header text, data section size)
CASES = [
    ("compact, the safetensors spelling", "{" + entries(3) + "}", 12),
    ("json.dumps spelling, spaces after , and :", json.dumps({f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(3)}), 12),
    ("newlines and tabs, indent=1", json.dumps({"a": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]}}, indent=1), 12),
    ("padding spaces after the object", "{" + entries(2) + "}" + " " * 7, 8),
    ("whitespace before the object", " \n{" + entries(2) + "}", 8),
    ("metadata first", '{"__metadata__":{"k":"v"},' + entries(2) + "}", 8),
    ("metadata in the middle", '{"t0":{' + E.format(0, 4) + '},"__metadata__":{"k":"v"},"t1":{' + E.format(4, 8) + "}}", 8),
    ("metadata last", "{" + entries(2) + ',"__metadata__":{"k":"v"}}', 8),
    ("metadata given twice", '{"__metadata__":{},' + entries(1) + ',"__metadata__":{}}', 4),
    ("metadata null", '{"__metadata__":null,' + entries(1) + "}", 4),
    ("metadata shaped like an entry", '{"__metadata__":{' + E.format(0, 4) + "}," + entries(1) + "}", 4),
    ("metadata with a number", '{"__metadata__":{"epoch":3},' + entries(1) + "}", 4),
    ("metadata emoji as a surrogate pair (json.dumps ensure_ascii)", '{"__metadata__":{"k":"\\ud83d\\ude00"},' + entries(1) + "}", 4),
    ("lone surrogate in metadata", '{"__metadata__":{"k":"\\udfff"},' + entries(1) + "}", 4),
    ("lone surrogate in a name", '{"t\\udc80":{' + E.format(0, 4) + "}}", 4),
    ("escape in a name", '{"t\\u0041":{' + E.format(0, 4) + '},"b":{' + E.format(4, 8) + "}}", 8),
    ("non-ASCII name", '{"блок.ö":{' + E.format(0, 4) + "}}", 4),
    ("control character in a name", '{"t\x01":{' + E.format(0, 4) + "}}", 4),
    ("keys in another order", '{"a":{"shape":[1],"data_offsets":[0,4],"dtype":"F32"},' + '"b":{' + E.format(4, 8) + "}}", 8),
    ("duplicate name, both compact", "{" + entries(2) + "," + entries(1) + "}", 8),
    ("duplicate name, the last one", '{"t0":{' + E.format(0, 4) + '},"t0":{' + E.format(4, 8) + "}}", 8),
    ("duplicate key inside an entry", '{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]},' + entries(1) + "}", 8),
    ("duplicate inside an entry and later bad JSON", '{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":', 4),
    ("duplicate name and later bad JSON", "{" + entries(2) + "," + entries(1) + ',"x":[}', 8),
    ("entry fault and later bad JSON", '{"a":{"dtype":"F99","shape":[1],"data_offsets":[0,4]},' + entries(1) + ",}", 4),
    ("extra field", '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}', 4),
    ("missing field", '{"a":{"dtype":"F32","shape":[1]}}', 4),
    ("unknown dtype", '{"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}', 4),
    ("dtype in lower case", '{"a":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}', 4),
    ("span too short for the shape", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', 4),
    ("leading zero", '{"a":{"dtype":"F32","shape":[01],"data_offsets":[0,4]}}', 4),
    ("leading zero in an offset", '{"a":{"dtype":"F32","shape":[1],"data_offsets":[00,4]}}', 4),
    ("float dimension", '{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', 4),
    ("exponent offset", '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4e0]}}', 4),
    ("negative dimension", '{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', 4),
    ("true as a dimension", '{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', 4),
    ("NaN offset", '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,NaN]}}', 4),
    ("u64 max dimension, zero elements", '{"a":{"dtype":"F32","shape":[0,18446744073709551615],"data_offsets":[0,0]}}', 0),
    ("dimension of 2^64", '{"a":{"dtype":"F32","shape":[0,18446744073709551616],"data_offsets":[0,0]}}', 0),
    ("scalar, empty shape", '{"a":{"dtype":"F64","shape":[],"data_offsets":[0,8]}}', 8),
    ("empty shape with a space", '{"a":{"dtype":"F64","shape":[ ],"data_offsets":[0,8]}}', 8),
    ("zero-size tensors at one offset", '{"z":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},' + entries(1) + ',"y":{"dtype":"F16","shape":[0,3],"data_offsets":[4,4]}}', 4),
    ("sub-byte dtype", '{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', 2),
    ("entries in reverse order", '{"b":{' + E.format(4, 8) + '},"a":{' + E.format(0, 4) + "}}", 8),
    ("gap", '{"a":{' + E.format(0, 4) + '},"b":{' + E.format(8, 12) + "}}", 12),
    ("overlap", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{' + E.format(4, 8) + "}}", 8),
    ("trailing data bytes", "{" + entries(2) + "}", 9),
    ("span past the data section", "{" + entries(2) + "}", 6),
    ("trailing comma", "{" + entries(2) + ",}", 8),
    ("no closing brace", "{" + entries(2) + ",", 8),
    ("text after the object", "{" + entries(2) + "}x", 8),
    ("empty object", "{}", 0),
    ("a list", "[1,2]", 0),
    ("byte order mark", "\ufeff{" + entries(1) + "}", 4),
    ("entry not an object", '{"a":5}', 0),
    ("deep nesting", '{"x":' + "[" * 5000 + "]" * 5000 + "," + entries(1) + "}", 4),
    ("5000-digit integer", '{"a":{"dtype":"F32","shape":[' + "9" * 5000 + '],"data_offsets":[0,4]}}', 4),
]


def reference(raw: bytes, *, path: str, file_size: int) -> tuple[dict, dict, int]:
    """(metadata, tensors in offset order, data offset): the parser before the scan, as it was."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"header is not valid UTF-8 (byte {exc.start})", path=path) from None
    try:
        doc = parse_json(text, what="header", path=path, object_pairs_hook=reject_duplicates)
    except Duplicate as dup:
        raise HeaderError("header names this tensor twice", path=path, tensor=dup.key) from None
    if not isinstance(doc, dict):
        raise HeaderError(f"header is a JSON {type(doc).__name__}, not an object", path=path)
    metadata = doc.pop("__metadata__", {})
    st_header._check_metadata(metadata, path)  # the two checks moved as they were
    if "\\ud" in text or "\\uD" in text:
        st_header._check_surrogates([*doc, *metadata, *metadata.values()], path)
    data_offset = 8 + len(raw)
    infos = sorted((entry_info(name, entry, path) for name, entry in doc.items()), key=lambda t: (t.start, t.end))
    st_header._check_spans(infos, file_size - data_offset, path)
    return dict(metadata), {t.name: t for t in infos}, data_offset


def outcome(parse, raw: bytes, data_size: int) -> object:
    try:
        got = parse(raw, path="h.safetensors", file_size=8 + len(raw) + data_size)
    except HeaderError as exc:
        return ("error", type(exc).__name__, str(exc), exc.tensor, exc.hint)
    if isinstance(got, st_header.Header):
        got = (got.metadata, got.tensors, got.data_offset)
    metadata, tensors, data_offset = got
    return ("ok", metadata, list(tensors.items()), data_offset)


def agree(raw: bytes, data_size: int) -> None:
    assert outcome(st_header.parse_header, raw, data_size) == outcome(reference, raw, data_size)


@pytest.mark.parametrize("case,text,data_size", CASES, ids=[c[0] for c in CASES])
def test_parser_agrees_with_the_reference(case, text, data_size):
    agree(text.encode("utf-8", "surrogatepass"), data_size)


def test_valid_headers_take_the_fast_path():
    for case in ("compact, the safetensors spelling", "json.dumps spelling, spaces after , and :", "metadata first"):
        text = next(t for c, t, _ in CASES if c == case)
        assert st_scan.scan(text, "h") is not None, case


def test_random_edits_agree_with_the_reference():
    """Each header of a few spellings, edited at one random place (a character dropped,
    doubled or replaced by one of JSON's own), parsed both ways."""
    rng = random.Random(17)
    bases = [
        ('{"__metadata__":{"k":"v"},' + entries(4) + "}", 16),
        (json.dumps({f"n.{i}": {"dtype": "F16", "shape": [2, 1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(4)}), 16),
        ('{"a":{"dtype":"BF16","shape":[],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[0],"data_offsets":[2,2]},' + entries(1).replace("[0,4]", "[2,6]") + "}", 6),
    ]
    alphabet = '{}[],:" 0129\\-.eatu'
    for _ in range(3000):
        text, data_size = rng.choice(bases)
        i = rng.randrange(len(text))
        edit = rng.randrange(3)
        if edit == 0:
            text = text[:i] + text[i + 1 :]
        elif edit == 1:
            text = text[:i] + text[i] + text[i:]
        else:
            text = text[:i] + rng.choice(alphabet) + text[i + 1 :]
        agree(text.encode(), data_size + rng.choice((0, 0, 2, -2)))
