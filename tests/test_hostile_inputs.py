"""Hostile headers and inputs end in one `Error:` line naming the file, quickly (issue 17, items 4-5).

Deeply nested JSON (header, metadata, index), integers of thousands of digits, lone surrogates,
a FIFO as input, PEFT `alpha_pattern`s built for catastrophic backtracking, rank-0 factors, and a
header of many tiny tensors. PEFT patterns are cross-checked against peft's own `get_pattern_key`.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from lorabake import peft_patterns
from lorabake.errors import LoraFormatError
from tests.cli_helpers import run_cli, run_main
from tests.lorafix import make_lora, save_lora
from tests.test_errors import SD1_META, STEM, make_inputs, one_error, untouched

PEFT_STEM = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


def raw_file(path, header: str, data: bytes = b"") -> str:
    hb = header.encode("utf-8")
    hb += b" " * ((-(8 + len(hb))) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)) + hb + data)
    return str(path)


ONE = '"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
HEADERS = [
    ("deep-header", '{"x":' + DEEP + "," + ONE + "}", "header is JSON nested too deeply"),
    ("deep-metadata", '{"__metadata__":{"a":' + DEEP + "}," + ONE + "}", "header is JSON nested too deeply"),
    ("5000-digit-int", '{"t":{"dtype":"F32","shape":[' + "9" * 5000 + '],"data_offsets":[0,4]}}', "an integer with too many digits"),
    ("300-digit-dim", '{"t":{"dtype":"F32","shape":[' + "9" * 300 + '],"data_offsets":[0,4]}}', "not a list of integers in [0, 2^64)"),
    ("lone-surrogate-name", '{"t\\udc80":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', "lone surrogate"),
    ("lone-surrogate-meta", '{"__metadata__":{"k":"v\\uDFFF"},' + ONE + "}", "lone surrogate"),
]


@pytest.mark.parametrize("case,header,fragment", HEADERS, ids=[h[0] for h in HEADERS])
def test_hostile_header_is_one_error_line(tmp_path, good, case, header, fragment):
    base, lora = good
    bad = raw_file(tmp_path / f"{case}.safetensors", header, b"\0" * 4)
    out = str(tmp_path / "o.safetensors")
    with untouched(tmp_path, os.path.dirname(base)):
        one_error(run_main(["inspect", bad]), bad, fragment)
        one_error(run_main(["inspect", bad, "--json"]), bad, fragment)
        one_error(run_main(["merge", base, "--lora", bad, "-o", out]), bad, fragment)
        one_error(run_main(["merge", bad, "--lora", lora, "-o", out]), bad, fragment)


def test_deep_index_is_one_error_line(tmp_path):
    index = tmp_path / "m.safetensors.index.json"
    index.write_text('{"weight_map": ' + DEEP + "}")
    one_error(run_main(["inspect", str(index)]), str(index), "index is JSON nested too deeply")
    one_error(run_main(["inspect", str(tmp_path)]), str(index), "nested too deeply")


def test_deep_or_hostile_metadata_json(tmp_path, good):
    base, _ = good
    peft = make_lora([(PEFT_STEM, 320, 320)], naming="peft", rank=4)
    deep = save_lora(str(tmp_path / "deep.safetensors"), peft, {"lora_adapter_metadata": '{"r": 4, "x": ' + DEEP + "}"})
    one_error(run_main(["inspect", deep]), deep, "'lora_adapter_metadata' is JSON nested too deeply")
    one_error(run_main(["merge", base, "--lora", deep, "--dry-run"]), deep, "nested too deeply")
    # kohya tag counts are a display nicety: unreadable or absurd ones are left out, not fatal
    tags = {"ss_tag_frequency": '{"d": {"a": 1e999, "b": 3, "c": NaN}}'}
    lora = save_lora(str(tmp_path / "tags.safetensors"), make_lora([(STEM, 320, 320)], rank=4), SD1_META | tags)
    code, out, err = run_main(["inspect", lora, "--json"])
    assert code == 0, err
    assert json.loads(out)["files"][0]["top_tags"] == [["b", 3]]
    tags = {"ss_tag_frequency": '{"d": ' + DEEP + "}"}
    lora = save_lora(str(tmp_path / "tags2.safetensors"), make_lora([(STEM, 320, 320)], rank=4), SD1_META | tags)
    assert run_main(["inspect", lora])[0] == 0
    recipe = {"lorabake.recipe": '{"a": ' + DEEP + "}", "lorabake.recipe_sha256": "0" * 64, "lorabake.inputs": DEEP}
    made = save_lora(str(tmp_path / "made.safetensors"), make_lora([(STEM, 320, 320)], rank=4), SD1_META | recipe)
    code, out, err = run_main(["inspect", made])
    assert code == 0 and "Error" not in err, err


def test_fifo_input_is_refused_before_reading(tmp_path, good):
    """A FIFO with no writer would block `open` and `read` forever; it is refused at once."""
    base, lora = good
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    res = run_cli(["inspect", str(fifo)], timeout=120)  # a hang fails here, as a timeout
    one_error((res.returncode, res.stdout, res.stderr), str(fifo), "not a regular file")
    one_error(run_main(["merge", base, "--lora", str(fifo), "-o", str(tmp_path / "o.safetensors")]), str(fifo), "not a regular file")
    one_error(run_main(["merge", str(fifo), "--lora", lora, "-o", str(tmp_path / "o.safetensors")]), str(fifo), "not a regular file")


def test_fifo_swapped_in_after_the_path_check_is_refused_at_open(tmp_path):
    from lorabake.errors import InputError
    from lorabake.st_header import read_header

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="is a FIFO; only regular files are read"):
        read_header(str(fifo))


# -- PEFT patterns ---------------------------------------------------------------------------
PATTERN_ROWS = [
    # (patterns in order, module name): the real shapes of keys people write
    ({"to_q": 8}, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ({"attn1.to_q": 8, "to_q": 2}, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ({"to_q": 2, "attn1.to_q": 8}, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ({"down_blocks.0.*to_q": 8}, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ({"attn[12].to_[qk]": 8}, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
    ({"q": 8}, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),  # not a whole segment
    ({"o_q": 8}, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ({"to_q$": 8, "x": 1}, "x"),
    ({"transformer_blocks.0.attn1.to_q": 8}, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
]


@pytest.mark.parametrize("patterns,name", PATTERN_ROWS)
def test_pattern_lookup_agrees_with_peft(patterns, name):
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), name)
    want = patterns.get(key) if key in patterns else None
    assert peft_patterns.pattern_value(patterns, name, path="l.safetensors") == want


def test_backtracking_pattern_is_an_error_within_seconds(tmp_path, good):
    base, _ = good
    peft = make_lora([(PEFT_STEM, 320, 320), ("unet." + "a" * 40, 320, 320)], naming="peft", rank=4)
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 4, "alpha_pattern": {"(a|aa)+b": 8}})}
    path = save_lora(str(tmp_path / "redos.safetensors"), peft, meta)
    one_error(run_main(["inspect", path]), path, "pattern '(a|aa)+b' takes over", "backtracking")
    one_error(run_main(["merge", base, "--lora", path, "--dry-run"]), path, "takes over")


def test_pattern_length_and_count_are_capped():
    with pytest.raises(LoraFormatError, match="characters long"):
        peft_patterns.pattern_value({"a" * (peft_patterns.MAX_PATTERN_CHARS + 1): 1}, "x", path="l")
    with pytest.raises(LoraFormatError, match="not a valid regex"):
        peft_patterns.pattern_value({"(": 1}, "x", path="l")


# -- many tiny tensors ---------------------------------------------------------------
def test_a_header_of_many_tiny_tensors_reads(tmp_path):
    """10⁴ one-element tensors (the 10⁶ case is timed in scripts/bench_header.py)."""
    from lorabake.st_reader import SafetensorsReader

    n = 10_000
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}' for i in range(n))
    path = raw_file(tmp_path / "many.safetensors", "{" + entries + "}", struct.pack(f"<{n}f", *range(n)))
    with SafetensorsReader(path) as r:
        assert len(r.tensors) == n
        assert float(r.read("t9999")) == 9999.0
    code, out, err = run_main(["inspect", path, "--json"])
    assert code == 0, err and json.loads(out)["files"][0]["tensors"] == n
def test_rank_zero_factors_are_one_error_line(tmp_path, good):
    base, _ = good
    lora = {STEM + ".lora_down.weight": torch.zeros(0, 320), STEM + ".lora_up.weight": torch.zeros(320, 0),
            STEM + ".alpha": torch.tensor(4.0)}
    path = save_lora(str(tmp_path / "rank0.safetensors"), lora, SD1_META)
    with untouched(tmp_path, os.path.dirname(base)):
        one_error(run_main(["merge", base, "--lora", path, "-o", str(tmp_path / "o.safetensors")]), path)


