"""Signals at any moment and a lost stdout (issue 17, item 6).

From the first line of `main`, SIGINT/SIGTERM give exit 130 and one line, no traceback and no
debris; two signals milliseconds apart change nothing; a signal after the output was committed
says it was written; a closed stdout, or one whose reader went away, is a note on stderr and
the finished bake still exits 0. Real subprocesses (a few seconds each, for the torch import).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from tests.cli_helpers import ROOT, run_main
from tests.test_errors import make_inputs, untouched
from tests.test_faults import start_paused_merge

INTERRUPTED = "Interrupted: nothing was written."


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


def _python(script: str, *argv: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", script, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kwargs)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# A signal delivered on the very first line of main: the handler is already there.
AT_START = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
import lorabake.cli
from lorabake import interrupts
real = interrupts.install
def install():
    real()
    os.kill(os.getpid(), int(sys.argv[1]))
interrupts.install = install
lorabake.cli.main(sys.argv[2:])
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_at_the_first_line_of_main(tmp_path, good, sig):
    base, lora = good
    with untouched(tmp_path, os.path.dirname(base)):
        proc = _python(AT_START, str(int(sig)), "merge", base, "--lora", lora, "-o", str(tmp_path / "o.safetensors"))
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert _lines(err) == [INTERRUPTED] and out == ""


def test_importing_the_cli_does_not_import_torch():
    """The window before `main` installs its handlers is the interpreter start and this import."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    code = "import sys, lorabake.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.parametrize("named", [False, True], ids=["anonymous", "named"])
def test_two_signals_milliseconds_apart_mid_write(tmp_path, good, named):
    base, lora = good
    with untouched(tmp_path, os.path.dirname(base)):
        proc = start_paused_merge(base, lora, str(tmp_path / "o.safetensors"), named=named)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.003)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.003)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert _lines(err) == [INTERRUPTED] and out == ""


# Pauses after the output was committed, while the report is being printed.
AFTER_COMMIT = r"""
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import lorabake.cli
from lorabake import render
def paused(result):
    print("ready", flush=True)
    time.sleep(120)
render.print_merge = paused
lorabake.cli.main(sys.argv[1:])
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_after_commit_says_the_output_was_written(tmp_path, good, sig):
    base, lora = good
    out = tmp_path / "o.safetensors"
    proc = _python(AFTER_COMMIT, "merge", base, "--lora", lora, "-o", str(out))
    assert proc.stdout.readline().strip() == "ready", proc.communicate()[1]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert _lines(err) == [f"Interrupted after the output was written: {out}"]
    assert len(load_file(str(out))) > 0 and os.listdir(tmp_path) == ["o.safetensors"]


@pytest.mark.parametrize("named", [False, True], ids=["anonymous", "named"])
def test_signal_during_commit_is_held_until_the_output_is_there(tmp_path, good, monkeypatch, named):
    """In-process: SIGINT arrives inside the commit's no-replace step; it is raised after it."""
    from lorabake import outfile

    if named:
        monkeypatch.setattr(outfile, "_anonymous", lambda folder: None)
    step = "_rename_noreplace" if named else "_name_fd"
    real = getattr(outfile, step)

    def signalled(*args):
        os.kill(os.getpid(), signal.SIGINT)
        real(*args)

    monkeypatch.setattr(outfile, step, signalled)
    base, lora = good
    out = tmp_path / "o.safetensors"
    code, stdout, err = run_main(["merge", base, "--lora", lora, "-o", str(out)])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    assert code == 130 and _lines(err) == [f"Interrupted after the output was written: {out}"]
    assert len(load_file(str(out))) > 0 and os.listdir(tmp_path) == ["o.safetensors"]


def test_closed_stdout_is_a_note_and_the_bake_succeeds(tmp_path, good):
    base, lora = good
    out = tmp_path / "o.safetensors"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "lorabake", "merge", base, "--lora", lora, "-o", str(out)],
                          stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, timeout=300,
                          preexec_fn=lambda: os.close(1))
    assert proc.returncode == 0, proc.stderr
    assert _lines(proc.stderr) == ["Note: the report was not printed: stdout: it was closed. The command itself succeeded."]
    assert len(load_file(str(out))) > 0


def test_stdout_reader_gone_is_a_note_and_the_bake_succeeds(tmp_path, good):
    base, lora = good
    out = tmp_path / "o.safetensors"
    env = dict(os.environ, PYTHONPATH=ROOT)
    read, write = os.pipe()
    os.close(read)  # `lorabake merge … | head -0`: nobody will read the report
    proc = subprocess.run([sys.executable, "-m", "lorabake", "merge", base, "--lora", lora, "-o", str(out), "--json"],
                          stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    os.close(write)
    assert proc.returncode == 0, proc.stderr
    assert _lines(proc.stderr) == ["Note: the report was not printed: stdout: Broken pipe. The command itself succeeded."]
    assert len(load_file(str(out))) > 0
