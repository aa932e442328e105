"""Faults while writing: signals, SIGKILL, a full disk, too little free space; and determinism.

The promise: whatever happens, nothing appears at the output path but a complete file, and no
temporary file is left behind (SIGKILL cannot be caught: where the filesystem has no anonymous
files its leftover is recognisable by name, `.<output name>.lorabake-tmp-<pid>-<random>`). Signal
tests run a real subprocess (~2-3 s each for the torch import), the rest run in-process with
faults injected into `lorabake.outfile`.
"""

from __future__ import annotations

import collections
import datetime
import errno
import json
import os
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import types

import pytest

from lorabake import outfile, st_writer
from tests.cli_helpers import ROOT, run_cli, run_main
from tests.lorafix import make_lora, save_lora
from tests.test_errors import SD1_META, STEM, TE_STEM, make_inputs, one_error, untouched

TMP_NAME = re.compile(r"^\.(?P<target>.+)\.lorabake-tmp-(?P<pid>\d+)-[0-9a-f]{16}$")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def tuned(good):
    """base + 2·LoRA: a fine-tune to extract a LoRA from."""
    base, lora = good
    out = os.path.join(os.path.dirname(base), "tuned.safetensors")
    code, _, err = run_main(["merge", base, "--lora", f"{lora}:2", "-o", out, "--quiet"])
    assert code == 0, err
    return out


# -- signals (real subprocesses) -----------------------------------------------------------
# Runs `lorabake.cli.main(argv)` with the writer paused after the first tensor: it flushes the
# temp file, prints "ready <bytes in it>" and sleeps, so the test can signal it mid-write.
# LORABAKE_TEST_NAMED=1 makes the output file a named one, as on filesystems without O_TMPFILE.
PAUSED_MERGE = r"""
import os, signal, sys, time
# a job started in the background may inherit SIGINT ignored; a user's Ctrl-C is not
signal.signal(signal.SIGINT, signal.default_int_handler)
if os.environ.get("LORABAKE_TEST_BLOCKED"):  # as some job runners start their children
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
import lorabake.cli
from lorabake import outfile, st_writer

real_write = st_writer.SafetensorsWriter.write
real_copy = st_writer.SafetensorsWriter.copy_from  # unchanged tensors are copied, not written

def pause(self):
    if self._next == 1:
        self._file.flush()
        print("ready", os.fstat(self._file.fileno()).st_size, flush=True)
        time.sleep(120)

def paused_write(self, name, data):
    real_write(self, name, data)
    pause(self)

def paused_copy(self, name, fd, offset):
    real_copy(self, name, fd, offset)
    pause(self)

st_writer.SafetensorsWriter.write = paused_write
st_writer.SafetensorsWriter.copy_from = paused_copy
if os.environ.get("LORABAKE_TEST_NAMED"):
    outfile._anonymous = lambda folder: None
lorabake.cli.main(sys.argv[1:])
"""


def start_paused_merge(base: str, lora: str, out: str, *, named: bool = False,
                       blocked: bool = False) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("LORABAKE_TEST_NAMED", None)
    env.pop("LORABAKE_TEST_BLOCKED", None)
    if named:
        env["LORABAKE_TEST_NAMED"] = "1"
    if blocked:
        env["LORABAKE_TEST_BLOCKED"] = "1"
    argv = ["merge", base, "--lora", lora, "-o", out]
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_MERGE, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout=60):
        proc.kill()
        pytest.fail("the merge never reached its first tensor: " + proc.communicate()[1])
    line = proc.stdout.readline()
    if not line.startswith("ready "):
        proc.kill()
        pytest.fail(f"expected 'ready', got {line!r}: " + proc.communicate()[1])
    assert int(line.split()[1]) > 1024, "the temp file should hold the header and a tensor by now"
    return proc


@pytest.mark.parametrize("named", [False, True], ids=["anonymous", "named"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_mid_write_leaves_nothing(tmp_path, good, sig, named):
    base, lora = good
    out = str(tmp_path / "out.safetensors")
    with untouched(tmp_path, os.path.dirname(base)):
        proc = start_paused_merge(base, lora, out, named=named)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Interrupted: nothing was written." in stderr
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.strip()] == ["Interrupted: nothing was written."]
    assert stdout == ""
    assert os.listdir(tmp_path) == []


def test_interrupt_reaches_a_merge_whose_parent_blocked_signals(tmp_path, good):
    """A SIGTERM blocked by the parent's signal mask would stay pending forever: the bake ran on."""
    base, lora = good
    with untouched(tmp_path, os.path.dirname(base)):
        proc = start_paused_merge(base, lora, str(tmp_path / "out.safetensors"), blocked=True)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert os.listdir(tmp_path) == []


def test_sigkill_leaves_nothing_with_an_anonymous_temp_file(tmp_path, good):
    if outfile._anonymous(str(tmp_path)) is None:
        pytest.skip("this filesystem has no O_TMPFILE")
    base, lora = good
    with untouched(tmp_path, os.path.dirname(base)):
        proc = start_paused_merge(base, lora, str(tmp_path / "out.safetensors"))
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_leaves_only_a_recognisable_temp_file(tmp_path, good):
    base, lora = good
    out = tmp_path / "out.safetensors"
    with untouched(os.path.dirname(base)):
        proc = start_paused_merge(base, lora, str(out), named=True)
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = os.listdir(tmp_path)
    assert len(leftovers) == 1
    m = TMP_NAME.match(leftovers[0])
    assert m and m["target"] == "out.safetensors" and int(m["pid"]) == proc.pid, leftovers
    assert leftovers[0].startswith(f".out.safetensors{st_writer.TMP_MARKER}{proc.pid}-")
    # the leftover never blocks the next run, which writes a complete file beside it
    code, _, err = run_main(["merge", base, "--lora", lora, "-o", str(out), "--quiet"])
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == sorted([leftovers[0], "out.safetensors"])


def test_python_dash_m_smoke(tmp_path, good):
    """`python -m lorabake` wires main(): one Error line and exit 1 from a real process."""
    base, _ = good
    bad = tmp_path / "lora.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b'{"a": 1}  ')
    with untouched(tmp_path, os.path.dirname(base)):
        res = run_cli(["merge", base, "--lora", str(bad), "-o", str(tmp_path / "o.safetensors")], timeout=120)
    one_error((res.returncode, res.stdout, res.stderr), str(bad), "header entry is not an object", "tensor 'a'")


# -- in-process interruption (the same path, without a process) -----------------------------
@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit], ids=["KeyboardInterrupt", "SystemExit"])
def test_interrupt_after_first_tensor_in_process(tmp_path, good, monkeypatch, exc):
    def interrupting(real):  # whole tensors (`write`) and row windows (`write_part`) alike
        def write(self, name, data):
            real(self, name, data)
            if self._next == 2 and not self._part:
                raise exc()

        return write

    for method in ("write", "write_part"):
        monkeypatch.setattr(st_writer.SafetensorsWriter, method, interrupting(getattr(st_writer.SafetensorsWriter, method)))
    base, lora = good
    with untouched(tmp_path, os.path.dirname(base)):
        code, _, err = run_main(["merge", base, "--lora", lora, "-o", str(tmp_path / "o.safetensors")])
    if exc is KeyboardInterrupt:
        assert code == 130 and "Interrupted" in err


# -- disk full -----------------------------------------------------------------------------
class _FullDisk:
    """A file whose first tensor write fails with ENOSPC (the header went through), or whose
    flush at commit does (`at="flush"`: the data sat in a buffer until then)."""

    def __init__(self, fh, *, at: str = "write") -> None:
        self._fh, self._at, self.calls = fh, at, 0

    def write(self, chunk) -> int:
        self.calls += 1
        if self._at == "write" and self.calls > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._fh.write(chunk)

    def flush(self) -> None:
        if self._at == "flush":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._fh.flush()

    def __getattr__(self, name):
        return getattr(self._fh, name)


@pytest.mark.parametrize("named", [False, True], ids=["anonymous", "named"])
@pytest.mark.parametrize("at", ["write", "flush"])
def test_disk_full_while_writing(tmp_path, good, tuned, monkeypatch, at, named):
    opened = []

    def full_open(fd, mode="r", *args, **kwargs):
        opened.append(fd)
        return _FullDisk(open(fd, mode, *args, **kwargs), at=at)

    monkeypatch.setattr(outfile, "open", full_open, raising=False)
    if named:
        monkeypatch.setattr(outfile, "_anonymous", lambda folder: None)
    base, lora = good
    out = str(tmp_path / "o.safetensors")
    with untouched(tmp_path, os.path.dirname(base)):
        one_error(run_main(["merge", base, "--lora", lora, "-o", out]), out, "disk full")
        one_error(run_main(["extract", base, tuned, "-o", out, "--rank", "4"]), out, "disk full")
    assert len(opened) == 2 and all(isinstance(fd, int) for fd in opened)


@pytest.mark.parametrize("named", [False, True], ids=["anonymous", "named"])
def test_disk_full_when_creating_the_temp_file(tmp_path, good, monkeypatch, named):
    def no_inode(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outfile, "_anonymous", no_inode if not named else lambda folder: None)
    if named:
        monkeypatch.setattr(outfile, "open", no_inode, raising=False)
    base, lora = good
    out = str(tmp_path / "o.safetensors")
    with untouched(tmp_path, os.path.dirname(base)):
        one_error(run_main(["merge", base, "--lora", lora, "-o", out]), out, "disk full", "free some space")


def test_free_space_checked_before_writing(tmp_path, good, tuned, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 4096, 4096))
    opened = []
    real_create = outfile.OutputFile.create
    monkeypatch.setattr(outfile.OutputFile, "create", lambda self: opened.append(self) or real_create(self))
    base, lora = good
    out = str(tmp_path / "o.safetensors")
    with untouched(tmp_path, os.path.dirname(base)):
        line = one_error(run_main(["merge", base, "--lora", lora, "-o", out]), str(tmp_path), "not enough free space")
        assert re.search(r"needs \d{7} bytes, 4096 are free", line), line
        one_error(run_main(["extract", base, tuned, "-o", out, "--rank", "4"]), "not enough free space")
    assert opened == []  # refused before the temp file was created
    # a dry run writes nothing, so it does not ask for space
    assert run_main(["merge", base, "--lora", lora, "--dry-run"])[0] == 0


# -- determinism ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def second_lora(good):
    folder = os.path.dirname(good[0])
    return save_lora(os.path.join(folder, "lora_b.safetensors"),
                     make_lora([(STEM, 320, 320), (TE_STEM, 768, 768)], rank=8, seed=7), SD1_META)


def _twice(tmp_path, argv_for) -> tuple[bytes, bytes]:
    outs = []
    for run in ("first", "second"):
        (tmp_path / run).mkdir()
        out = str(tmp_path / run / "result.safetensors")
        code, _, err = run_main(argv_for(out))
        assert code == 0, err
        with open(out, "rb") as fh:
            outs.append(fh.read())
    return outs[0], outs[1]


@pytest.mark.parametrize(
    "loras,extra",
    [(1, []), (2, ["--rounding", "stochastic"]), (2, ["--rounding", "stochastic", "--dtype", "bf16"])],
    ids=["one-lora-nearest", "two-loras-stochastic", "two-loras-stochastic-bf16"],
)
def test_merge_twice_is_byte_identical(tmp_path, good, second_lora, loras, extra):
    base, lora = good
    specs = ["--lora", f"{lora}:0.7"] + (["--lora", f"{second_lora}:-0.3:0.2"] if loras == 2 else [])
    first, second = _twice(tmp_path, lambda out: ["merge", base, *specs, "-o", out, "--quiet", *extra])
    assert first == second
    assert len(first) > 1_000_000


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def test_extract_twice_is_identical_but_for_the_date(tmp_path, good, tuned):
    base, _ = good
    first, second = _twice(tmp_path, lambda out: ["extract", base, tuned, "-o", out, "--rank", "4", "--quiet"])
    (h1, d1), (h2, d2) = _split(first), _split(second)
    assert d1 == d2
    h1["__metadata__"].pop("modelspec.date", None)
    h2["__metadata__"].pop("modelspec.date", None)
    assert h1 == h2


class _MovingClock(datetime.datetime):
    """`now()` a day later on every call: two runs never share a second."""

    calls = 0

    @classmethod
    def now(cls, tz=None):
        cls.calls += 1
        return datetime.datetime(2024, 1, 1, tzinfo=tz) + datetime.timedelta(days=cls.calls)


def test_extract_twice_is_byte_identical(tmp_path, good, tuned, monkeypatch):
    from lorabake import extract

    clock = types.ModuleType("datetime")
    clock.__dict__.update(datetime.__dict__)
    clock.datetime = _MovingClock
    monkeypatch.setattr(extract, "datetime", clock, raising=False)
    base, _ = good
    first, second = _twice(tmp_path, lambda out: ["extract", base, tuned, "-o", out, "--rank", "4", "--quiet"])
    assert first == second
