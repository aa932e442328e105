"""Command-line parsing: strengths from the right, usage errors exit 2, --help shows examples."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lorabake.cli import cli, parse_lora_arg
from lorabake.errors import UsageError

# (argument, existing files, expected (path, strength, te_strength))
LORA_ARGS = [
    ("a.safetensors", [], ("a.safetensors", 1.0, None)),
    ("a.safetensors:0.5", [], ("a.safetensors", 0.5, None)),
    ("a.safetensors:-1", [], ("a.safetensors", -1.0, None)),
    ("a.safetensors:1.5:0.25", [], ("a.safetensors", 1.5, 0.25)),
    ("a.safetensors:1e-1", [], ("a.safetensors", 0.1, None)),
    # Windows drive letters and other colons stay in the path
    ("C:/loras/a.safetensors:0.5", [], ("C:/loras/a.safetensors", 0.5, None)),
    ("dir:with:colons/a.safetensors", [], ("dir:with:colons/a.safetensors", 1.0, None)),
    ("dir:2/a.safetensors:0.3", [], ("dir:2/a.safetensors", 0.3, None)),
]


@pytest.mark.parametrize("arg,files,expected", LORA_ARGS)
def test_parse_lora_arg(tmp_path, monkeypatch, arg, files, expected):
    monkeypatch.chdir(tmp_path)
    spec = parse_lora_arg(arg)
    assert (spec.path, spec.strength, spec.te_strength) == expected


def test_strength_that_is_not_a_number(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match="not a number"):
        parse_lora_arg("a.safetensors:strong")
    with pytest.raises(UsageError, match="finite"):
        parse_lora_arg("a.safetensors:nan")
    with pytest.raises(UsageError, match="more than two"):
        parse_lora_arg("a.safetensors:1:2:3")


@pytest.mark.parametrize("command", ["merge", "inspect", "extract"])
def test_help_shows_examples_and_exit_codes(command):
    res = CliRunner().invoke(cli, [command, "--help"])
    assert res.exit_code == 0
    assert "Examples:" in res.output
    assert f"lorabake {command}" in res.output
    assert "Exit codes: 0 success, 1 failure on data or files, 2 usage error" in res.output


def test_usage_errors_exit_2(tmp_path):
    from tests.cli_helpers import run_main

    code, _, err = run_main(["merge", str(tmp_path / "base.safetensors")])
    assert code == 2
    assert "--lora" in err
    code, _, err = run_main(["merge", "x.safetensors", "--lora", "y.safetensors", "--dtype", "fp7", "-o", "o.safetensors"])
    assert code == 2
