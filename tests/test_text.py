"""Text from files is text (issue 17, item 7): on a terminal no rich markup or emoji code is
interpreted, and control, separator and bidi characters are shown escaped in every output mode."""

from __future__ import annotations

import json
import os

import pytest

from lorabake.text import sanitize
from tests.cli_helpers import run_main
from tests.lorafix import make_lora, save_lora
from tests.test_errors import SD1_META, STEM, one_error

SEPARATORS = "a\u2028b\u2029c\x85d\u202ee\u2066f\ufeffg"


@pytest.fixture
def marked(tmp_path):
    meta = {**SD1_META, "modelspec.title": "[sd1] [bold red]loud[/] :skull: " + SEPARATORS,
            "ss_output_name": ":thumbs_up: [link=http://x]y[/link]"}
    return save_lora(os.path.join(tmp_path, "[sd1] :skull:.safetensors"), make_lora([(STEM, 320, 320)], rank=4), meta)


def _no_raw_separators(text: str) -> None:
    raw = [c for c in text if c in "\u2028\u2029\x85\u202e\u2066\ufeff"]
    assert not raw, f"raw separators {raw!r}"


@pytest.mark.parametrize("tty", [True, False], ids=["terminal", "plain"])
def test_markup_emoji_and_separators_are_shown_as_written(marked, monkeypatch, tty):
    from lorabake import render

    monkeypatch.setattr(render, "_tty", lambda: tty)
    code, out, err = run_main(["inspect", marked])
    assert code == 0, err
    assert "[sd1] [bold red]loud[/] :skull:" in out
    assert ":thumbs_up: [link=http://x]y[/link]" in out
    assert "[sd1] :skull:.safetensors" in out  # the file name, in the title or first line
    assert "💀" not in out and "👍" not in out
    assert "a\\u2028b\\u2029c\\x85d\\u202ee\\u2066f\\ufeffg" in out
    _no_raw_separators(out)


def test_json_escapes_separators(marked):
    code, out, err = run_main(["inspect", marked, "--json"])
    assert code == 0, err
    _no_raw_separators(out)
    assert "\\u2028" in out
    assert json.loads(out)["files"][0]["metadata"]["modelspec.title"].endswith(SEPARATORS)


def test_error_lines_escape_separators(tmp_path):
    line = one_error(run_main(["inspect", str(tmp_path / "x\u2028y\u202e.safetensors")]), "no such file")
    _no_raw_separators(line)
    assert "x\\u2028y\\u202e" in line


def test_sanitize_escapes_lone_surrogates():
    assert sanitize("a\udc80b") == "a\\udc80b"
    assert sanitize("ok\nline", one_line=True) == "ok\\nline"
