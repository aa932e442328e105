"""Bad input through the CLI: one `Error:` line naming the file and the problem, the documented
exit code, no traceback (unless --debug), nothing written, every input byte-identical afterwards.

The parser-level rules are in test_st_header.py; here every malformed file goes through
`inspect`, `merge` (as base and as LoRA) and `extract`, the way a user meets it. Faults
(signals, disk full) and determinism are in test_faults.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import struct

import pytest
import torch
from click.testing import CliRunner

from lorabake.cli import cli
from lorabake.st_header import MAX_HEADER_BYTES
from tests.archfix import build_checkpoint, select
from tests.cli_helpers import run_main
from tests.lorafix import make_lora, save_lora

# A small SD1 base (3.4 MB: one attention block and one text-encoder projection) and a LoRA for it.
SD1_SMALL = [
    r"model\.diffusion_model\.input_blocks\.1\.1\.transformer_blocks\.0\.attn[12]\.",
    r"cond_stage_model\.transformer\.text_model\.encoder\.layers\.0\.self_attn\.q_proj",
]
STEM = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TE_STEM = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
SD1_META = {"ss_base_model_version": "sd_v1"}


# -- helpers shared with test_faults.py -----------------------------------------------------
def make_inputs(folder, *, seed: int = 0) -> tuple[str, str]:
    """(base path, LoRA path) of a real-shaped SD1 base and a two-module kohya LoRA for it."""
    os.makedirs(folder, exist_ok=True)
    base = os.path.join(folder, "base.safetensors")
    build_checkpoint(base, "sd1", select("sd1", SD1_SMALL), seed=seed)
    lora = save_lora(
        os.path.join(folder, "lora.safetensors"),
        make_lora([(STEM, 320, 320), (TE_STEM, 768, 768)], rank=4, seed=seed),
        SD1_META,
    )
    return base, lora


def tree(*folders) -> dict[str, str]:
    """{path: SHA-256} of every file under `folders` (hidden temp files included)."""
    out = {}
    for folder in folders:
        for root, _dirs, files in os.walk(folder):
            for name in files:
                path = os.path.join(root, name)
                if os.path.isfile(path):
                    with open(path, "rb") as fh:
                        out[path] = hashlib.sha256(fh.read()).hexdigest()
    return out


@contextlib.contextmanager
def untouched(*folders):
    """Inputs never change, and a failed run leaves nothing behind: no output, no temp file.

    Records the SHA-256 of every file under `folders` before, and asserts the same files with the
    same hashes after (a new file, e.g. an output or `.x.lorabake-tmp-<pid>`, fails it too).
    """
    before = tree(*folders)
    yield
    after = tree(*folders)
    assert sorted(after) == sorted(before), f"files appeared or vanished: {set(after) ^ set(before)}"
    changed = [p for p in before if before[p] != after[p]]
    assert not changed, f"inputs changed: {changed}"


def one_error(result: tuple[int, str, str], *fragments: str, code: int = 1) -> str:
    """Assert exit `code`, nothing on stdout, exactly one `Error:` line on stderr holding each
    fragment and no traceback; return that line."""
    got, out, err = result
    assert got == code, (got, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("Error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert out == "", out
    return line


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A base and LoRA shared by the tests of this module (read-only: `untouched` checks it)."""
    folder = tmp_path_factory.mktemp("good")
    return make_inputs(folder)


# -- 1. malformed safetensors through the CLI ----------------------------------------------
def st_bytes(header: object = None, data: bytes = b"", *, header_bytes: bytes | None = None) -> bytes:
    hb = header_bytes if header_bytes is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


W = "lora_unet_x.lora_up.weight"  # the tensor named in per-tensor errors
DUP = (
    b'{"%s":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"%s":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'
    % (W.encode(), W.encode())
)

# (case, file bytes, what the error line says, tensor it names or None)
MALFORMED = [
    ("empty file", b"", "file is empty", None),
    ("shorter than 8 bytes", b"\x01\x02\x03", "shorter than the 8-byte", None),
    ("header length beyond the file", struct.pack("<Q", 500) + b"{}", "runs past the end", None),
    ("header over the size cap", struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "cap", None),
    ("invalid UTF-8", st_bytes(header_bytes=b'{"\xff": 1}'), "not valid UTF-8", None),
    ("invalid JSON", st_bytes(header_bytes=b'{"a": '), "not valid JSON", None),
    ("header not an object", st_bytes([1, 2]), "not an object", None),
    ("unknown dtype", st_bytes({W: entry("F12")}, b"\0" * 8), "unknown dtype 'F12'", W),
    ("shape x dtype != span", st_bytes({W: entry("F32", (3,), (0, 8))}, b"\0" * 8), "needs 12 bytes", W),
    ("overlapping spans", st_bytes({"a": entry(offsets=(0, 8)), W: entry(offsets=(4, 12))}, b"\0" * 12), "overlaps", W),
    ("gap", st_bytes({"a": entry(offsets=(0, 8)), W: entry(offsets=(12, 20))}, b"\0" * 20), "gap of 4 bytes", W),
    ("span past the end", st_bytes({W: entry(offsets=(0, 8))}, b"\0" * 4), "runs past the end", W),
    ("trailing bytes", st_bytes({W: entry(offsets=(0, 8))}, b"\0" * 9), "1 trailing bytes", None),
    ("non-string metadata", st_bytes({"__metadata__": {"epoch": 3}, W: entry()}, b"\0" * 8), "'epoch' is a int, not a string", None),
    ("duplicate names", st_bytes(header_bytes=DUP, data=b"\0" * 16), "names this tensor twice", W),
]

COMMANDS = {
    "inspect BAD": lambda bad, base, lora, out: ["inspect", bad],
    "merge BAD --lora ok": lambda bad, base, lora, out: ["merge", bad, "--lora", lora, "-o", out],
    "merge ok --lora BAD": lambda bad, base, lora, out: ["merge", base, "--lora", f"{bad}:0.5", "-o", out],
    "extract ok BAD": lambda bad, base, lora, out: ["extract", base, bad, "-o", out],
}


@pytest.mark.parametrize("command", COMMANDS, ids=list(COMMANDS))
@pytest.mark.parametrize("case,data,fragment,tensor", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_is_one_error_line(tmp_path, good, command, case, data, fragment, tensor):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data)
    base, lora = good
    argv = COMMANDS[command](str(bad), base, lora, str(tmp_path / "out.safetensors"))
    with untouched(tmp_path, os.path.dirname(base)):
        line = one_error(run_main(argv), str(bad), fragment)
    if tensor:
        assert f"tensor {tensor!r}" in line


def test_debug_shows_the_traceback(tmp_path, good):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(MALFORMED[7][1])
    code, _, err = run_main(["--debug", "merge", good[0], "--lora", str(bad), "-o", str(tmp_path / "o.safetensors")])
    assert code == 1
    assert "Traceback (most recent call last)" in err and "HeaderError" in err
    assert err.splitlines()[-1].startswith("Error: ") and "unknown dtype" in err.splitlines()[-1]
    assert not (tmp_path / "o.safetensors").exists()


# -- 2. wrong inputs -----------------------------------------------------------------------
class _Payload:
    """Unpickling this creates `marker` (open(marker, "w")): proof of whether a pickle was loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_pickle(path, marker) -> str:
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {"w": _Payload(str(marker))}}, fh, protocol=4)
    return str(path)


def test_the_pickle_payload_is_live(tmp_path):
    """Control for the refusal tests: loading such a file really does create the marker."""
    marker = tmp_path / "proof"
    with open(evil_pickle(tmp_path / "x.ckpt", marker), "rb") as fh:
        pickle.load(fh).get("state_dict")["w"].close()
    assert marker.exists()


@pytest.mark.parametrize(
    "name,role",
    [("model.ckpt", "base"), ("lora.pt", "lora"), ("pytorch_model.bin", "inspect"), ("model.pth", "extract"),
     ("renamed.safetensors", "base"), ("renamed.safetensors", "lora"), ("renamed.safetensors", "inspect")],
)
def test_pickle_is_refused_never_unpickled(tmp_path, good, name, role):
    marker = tmp_path / "UNPICKLED"
    folder = tmp_path / "in"
    folder.mkdir()
    bad = evil_pickle(folder / name, marker)
    base, lora = good
    out = str(tmp_path / "out.safetensors")
    argv = {
        "base": ["merge", bad, "--lora", lora, "-o", out],
        "lora": ["merge", base, "--lora", bad, "-o", out],
        "inspect": ["inspect", bad],
        "extract": ["extract", base, bad, "-o", out],
    }[role]
    with untouched(tmp_path, os.path.dirname(base)):
        line = one_error(run_main(argv), bad, "convert it to .safetensors")
    assert "pickle" in line
    assert not marker.exists()


def test_directory_and_missing_path(tmp_path, good):
    base, lora = good
    plain = tmp_path / "just_a_folder"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a model")
    missing = str(tmp_path / "nope.safetensors")
    out = str(tmp_path / "out.safetensors")
    with untouched(tmp_path, os.path.dirname(base)):
        for argv in (["inspect", str(plain)], ["merge", str(plain), "--lora", lora, "-o", out],
                     ["merge", base, "--lora", str(plain), "-o", out], ["extract", str(plain), base, "-o", out]):
            one_error(run_main(argv), str(plain), "is a directory without")
        for argv in (["inspect", missing], ["merge", missing, "--lora", lora, "-o", out],
                     ["merge", base, "--lora", f"{missing}:0.7", "-o", out], ["extract", base, missing, "-o", out]):
            one_error(run_main(argv), missing, "no such file or directory")


def _broken_lora(folder, fix) -> str:
    tensors = make_lora([(STEM, 320, 320), (TE_STEM, 768, 768)], rank=4)
    fix(tensors)
    return save_lora(os.path.join(folder, "broken.safetensors"), tensors, SD1_META)


def _nan(t):
    t[STEM + ".lora_down.weight"][1, 2] = float("nan")


def _inf(t):
    t[TE_STEM + ".lora_up.weight"][5, 0] = float("-inf")


# (case, change to a good LoRA, fragments of the error, commands that must refuse it)
BROKEN_LORAS = [
    ("ranks disagree", lambda t: t.__setitem__(STEM + ".lora_up.weight", torch.randn(320, 3)),
     ["ranks disagree", f"tensor '{STEM}.lora_up.weight'", "re-export"], ("merge", "dry-run", "inspect")),
    ("alpha of the wrong shape", lambda t: t.__setitem__(STEM + ".alpha", torch.ones(3)),
     ["alpha has shape [3]", f"tensor '{STEM}.alpha'"], ("merge", "dry-run", "inspect")),
    ("NaN", _nan, [f"NaN in module '{STEM}'", f"tensor '{STEM}.lora_down.weight'"], ("merge",)),
    ("Inf", _inf, [f"Inf in module '{TE_STEM}'", f"tensor '{TE_STEM}.lora_up.weight'"], ("merge",)),
]


@pytest.mark.parametrize("case,fix,fragments,commands", BROKEN_LORAS, ids=[b[0] for b in BROKEN_LORAS])
def test_broken_lora_names_the_module(tmp_path, good, case, fix, fragments, commands):
    bad = _broken_lora(tmp_path, fix)
    base, _ = good
    with untouched(tmp_path, os.path.dirname(base)):
        if "merge" in commands:
            one_error(run_main(["merge", base, "--lora", bad, "-o", str(tmp_path / "o.safetensors")]), bad, *fragments)
        if "dry-run" in commands:  # found from the header alone, before any tensor is read
            one_error(run_main(["merge", base, "--lora", bad, "--dry-run"]), bad, *fragments)
        if "inspect" in commands:
            one_error(run_main(["inspect", bad]), bad, *fragments)


def test_sdxl_lora_on_sd1_base(tmp_path, good):
    base, _ = good
    lora = save_lora(
        tmp_path / "sdxl_style.safetensors",
        make_lora([("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048)], rank=4),
        {"ss_base_model_version": "sdxl_base_v1-0"},
    )
    with untouched(tmp_path, os.path.dirname(base)):
        one_error(run_main(["merge", base, "--lora", lora, "-o", str(tmp_path / "o.safetensors")]),
                  lora, "LoRA is for sdxl", f"base checkpoint {base} is sd1", "use a LoRA trained for this base")


@pytest.mark.parametrize(
    "suffix,fragment",
    [(":strong", "is not a number"), (":0.5:te", "is not a number"), (":nan", "not a finite number"),
     (":inf", "not a finite number"), (":1:2:3", "more than two strengths")],
)
def test_strength_that_does_not_parse_exits_2(tmp_path, good, suffix, fragment):
    base, lora = good
    with untouched(tmp_path, os.path.dirname(base)):
        one_error(run_main(["merge", base, "--lora", lora + suffix, "-o", str(tmp_path / "o.safetensors")]),
                  fragment, code=2)


def test_output_equal_to_an_input(tmp_path, good):
    base, lora = good
    link = tmp_path / "alias.safetensors"
    link.symlink_to(base)
    with untouched(tmp_path, os.path.dirname(base)):
        for out in (base, lora, str(link)):
            for force in ([], ["--force"]):
                one_error(run_main(["merge", base, "--lora", lora, "-o", out, *force]), "output path is one of the inputs")
        one_error(run_main(["extract", base, lora, "-o", lora, "--force"]), "output path is one of the inputs")


def test_existing_output_needs_force(tmp_path, good):
    base, lora = good
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    with untouched(tmp_path, os.path.dirname(base)):
        one_error(run_main(["merge", base, "--lora", lora, "-o", str(out)]), str(out), "output file exists", "--force")
        one_error(run_main(["extract", base, base, "-o", str(out)]), str(out), "output file exists", "--force")
    code, _, err = run_main(["merge", base, "--lora", lora, "-o", str(out), "--force", "--quiet"])
    assert code == 0, err
    assert out.read_bytes()[8:9] == b"{"


def test_output_directory_missing_or_a_file(tmp_path, good):
    base, lora = good
    with untouched(tmp_path, os.path.dirname(base)):
        missing = tmp_path / "no" / "such" / "dir"
        one_error(run_main(["merge", base, "--lora", lora, "-o", str(missing / "o.safetensors")]),
                  str(missing), "output directory does not exist")
        # the kernel's own refusal: the output's parent is a regular file (ENOTDIR)
        one_error(run_main(["merge", base, "--lora", lora, "-o", os.path.join(lora, "o.safetensors")]),
                  lora, "output directory does not exist")


def test_output_directory_read_only(tmp_path, good, monkeypatch):
    """Tests run as root, and root writes through mode bits, so chmod 555 proves nothing. We fake
    the answer of `os.access` for one folder instead: that is exactly what the check asks."""
    base, lora = good
    ro = tmp_path / "readonly"
    ro.mkdir()
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if os.path.abspath(path) == str(ro) and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    with untouched(tmp_path, os.path.dirname(base)):
        one_error(run_main(["merge", base, "--lora", lora, "-o", str(ro / "o.safetensors")]),
                  str(ro), "output directory is not writable")
        one_error(run_main(["extract", base, base, "-o", str(ro / "o.safetensors")]),
                  str(ro), "output directory is not writable")


def test_refusal_after_the_checks_is_still_one_line(tmp_path, good, monkeypatch):
    """EACCES when the temp file is created (a permission change after the up-front check, or an
    ACL that `access` does not see): an OSError, still one line and nothing left behind."""
    from lorabake import outfile

    def refuse(folder, *args, **kwargs):
        raise PermissionError(13, "Permission denied", folder)

    monkeypatch.setattr(outfile, "_anonymous", refuse)
    base, lora = good
    out = str(tmp_path / "o.safetensors")
    with untouched(tmp_path, os.path.dirname(base)):
        one_error(run_main(["merge", base, "--lora", lora, "-o", out]), out, "cannot create the output: Permission denied")


def test_unexpected_exception_is_one_line_and_debug_shows_it(tmp_path, good, monkeypatch):
    from lorabake import ops

    def boom(*args, **kwargs):
        raise ValueError("something nobody planned for")

    monkeypatch.setattr(ops, "merge", boom)
    base, lora = good
    argv = ["merge", base, "--lora", lora, "-o", str(tmp_path / "o.safetensors")]
    one_error(run_main(argv), "internal error: ValueError: something nobody planned for", "--debug")
    code, _, err = run_main(["--debug", *argv])
    assert code == 1 and "Traceback" in err and err.splitlines()[-1].startswith("Error: internal error")


# -- 6. security: control sequences and long values ----------------------------------------
EVIL = "\x1b[2J\x1b]0;pwned\x07\rfake\u202e"


def _evil_lora(folder) -> str:
    tensors = make_lora([(STEM, 320, 320), (STEM + "_v" + EVIL, 320, 320)], rank=4)
    tensors["weird" + EVIL + "\nkey"] = torch.zeros(2)  # an unknown key, listed by inspect
    meta = {**SD1_META, "ss_sd_model_name": "model" + EVIL, "evil" + EVIL: "value" + EVIL + "\nline two",
            "long_note": "x" * 5000}
    return save_lora(os.path.join(folder, "evil.safetensors"), tensors, meta)


def _assert_no_controls(text: str) -> None:
    raw = [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0 or c == "\u202e"]
    assert not raw, f"raw control characters {raw!r} in {text!r}"


def test_inspect_escapes_control_sequences_and_cuts_long_values(tmp_path, good):
    base, _ = good
    lora = _evil_lora(tmp_path)
    code, out, err = run_main(["inspect", lora, "--against", base])
    assert code == 0, err
    _assert_no_controls(out)
    assert "\\x1b[2J\\x1b]0;pwned\\x07\\x0dfake\\u202e" in out
    assert "meta evil\\x1b[2J" in out and "\\nline two" in out  # a newline in a value does not start a line
    assert not any(line.startswith("line two") for line in out.splitlines())
    assert "unknown keys" in out and "weird\\x1b[2J" in out
    assert "more characters)" in out and "x" * 5000 not in out
    assert f"{STEM}_v\\x1b[2J" in out  # the unmatched module, in the --against details

    code, out, err = run_main(["inspect", lora, "--json"])
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out  # JSON escapes them
    meta = json.loads(out)["files"][0]["metadata"]
    assert meta["long_note"] == "x" * 5000  # whole in --json
    assert meta["evil" + EVIL] == "value" + EVIL + "\nline two"


def test_inspect_on_a_terminal_escapes_too(tmp_path, monkeypatch):
    from lorabake import render

    monkeypatch.setattr(render, "_tty", lambda: True)
    lora = _evil_lora(tmp_path)
    code, out, err = run_main(["inspect", lora])
    assert code == 0, err
    assert "\x07" not in out and "\x1b[2J" not in out and "\r" not in out and "\u202e" not in out
    assert "more characters)" in out and "x" * 5000 not in out


def test_error_messages_escape_control_sequences(tmp_path, good):
    base, _ = good
    lora = _evil_lora(tmp_path)
    line = one_error(run_main(["merge", base, "--lora", lora, "-o", str(tmp_path / "o.safetensors")]),
                     "match nothing", "--allow-unmatched")
    _assert_no_controls(line)
    assert "\\x1b[2J" in line
    # a file name and a tensor name with control characters and a newline, in header errors
    bad = tmp_path / ("bad\x1b[2J\nname.safetensors")
    bad.write_bytes(st_bytes({"t" + EVIL + "\n": entry("F12")}, b"\0" * 8))
    line = one_error(run_main(["inspect", str(bad)]), "unknown dtype", "bad\\x1b[2J\\nname.safetensors")
    _assert_no_controls(line)
    line = one_error(run_main(["inspect", str(tmp_path / "gone\r\x07.safetensors")]), "no such file")
    _assert_no_controls(line)


# -- 7. exit codes -------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["merge"], ["inspect"], ["extract"]])
def test_help_documents_every_exit_code(command):
    res = CliRunner().invoke(cli, [*command, "--help"])
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert "Exit codes: 0 success, 1 failure on data or files, 2 usage error, 130 interrupted." in text


def test_exit_codes_0_1_2_130(tmp_path, good, monkeypatch):
    base, lora = good
    assert run_main(["inspect", base])[0] == 0
    assert run_main(["merge", base, "--lora", lora, "--dry-run"])[0] == 0
    one_error(run_main(["inspect", str(tmp_path / "missing.safetensors")]), "no such file", code=1)
    assert run_main(["merge", base])[0] == 2  # click usage error: missing --lora
    assert run_main(["merge", base, "--lora", lora, "--dtype", "fp7", "-o", "x"])[0] == 2
    assert run_main(["merge", base, "--lora", lora, "--rounding", "sometimes", "-o", "x"])[0] == 2
    assert run_main(["bake", base])[0] == 2  # unknown command
    one_error(run_main(["merge", base, "--lora", lora]), "missing -o/--output", code=2)

    from lorabake import ops

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ops, "merge", interrupted)
    code, out, err = run_main(["merge", base, "--lora", lora, "-o", str(tmp_path / "o.safetensors")])
    assert code == 130 and "Interrupted" in err and "Traceback" not in err


def test_every_error_line_fits_the_pattern():
    """The `Error:` line is `path: [tensor 'name': ]problem[ (fix)]` (see errors.LorabakeError)."""
    from lorabake.errors import HeaderError, OutputError, from_os_error

    assert str(HeaderError("bad", path="f", tensor="t", hint="do x")) == "f: tensor 't': bad (do x)"
    full = from_os_error(OSError(28, "No space left on device", "/d/o"))
    assert isinstance(full, OutputError) and re.match(r"/d/o: disk full \(free some space", str(full))
    assert str(from_os_error(PermissionError(13, "Permission denied", "/x"))) == "/x: Permission denied"
