"""Inputs are stable while read (issue 17, item 4): a base or LoRA rewritten in place, or replaced
by another file, between the header read and the commit is an error, and nothing is written.

Size, inode and modification time are taken when a file is opened and compared after the last
read, through the open descriptor and at the path.
"""

from __future__ import annotations

import os
import shutil

import pytest

from lorabake import st_writer
from lorabake.errors import InputError
from lorabake.st_reader import SafetensorsReader
from tests.cli_helpers import run_main
from tests.test_errors import make_inputs, one_error


@pytest.fixture
def inputs(tmp_path):
    return make_inputs(tmp_path / "in")


def _rewrite_in_place(path: str) -> None:
    """Same inode, other bytes (a copy that overwrites the file, as `cp new old` does), new mtime."""
    with open(path, "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x01\x02\x03\x04")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _replace(path: str) -> None:
    """Another file renamed over the path (what a download or `mv` does)."""
    shutil.copyfile(path, path + ".new")
    os.replace(path + ".new", path)


CHANGES = {"rewritten": _rewrite_in_place, "replaced": _replace}


@pytest.mark.parametrize("which", ["base", "lora"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_input_changed_during_merge_writes_nothing(tmp_path, inputs, monkeypatch, which, change):
    base, lora = inputs
    victim = base if which == "base" else lora
    real_write, real_copy = st_writer.SafetensorsWriter.write, st_writer.SafetensorsWriter.copy_from

    def change_once(self):
        if self._next == 1:
            CHANGES[change](victim)

    def write(self, name, data):
        real_write(self, name, data)
        change_once(self)

    def copy_from(self, name, fd, offset):  # unchanged tensors are copied from the base, not written
        real_copy(self, name, fd, offset)
        change_once(self)

    monkeypatch.setattr(st_writer.SafetensorsWriter, "write", write)
    monkeypatch.setattr(st_writer.SafetensorsWriter, "copy_from", copy_from)
    out = tmp_path / "o.safetensors"
    one_error(run_main(["merge", base, "--lora", lora, "-o", str(out)]), victim, "changed while it was being read")
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_input_changed_during_extract_writes_nothing(tmp_path, inputs, monkeypatch):
    from lorabake import extract

    base, lora = inputs
    tuned = str(tmp_path / "in" / "tuned.safetensors")
    assert run_main(["merge", base, "--lora", f"{lora}:2", "-o", tuned, "--quiet"])[0] == 0
    real = extract._factorize_all

    def factorize_then_touch(*args, **kwargs):
        real(*args, **kwargs)
        _rewrite_in_place(tuned)

    monkeypatch.setattr(extract, "_factorize_all", factorize_then_touch)
    one_error(run_main(["extract", base, tuned, "-o", str(tmp_path / "o.safetensors"), "--rank", "4"]),
              tuned, "changed while it was being read")
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_reader_reads_through_the_descriptor_it_checked(inputs):
    base, _ = inputs
    with SafetensorsReader(base) as r:
        r.verify_unchanged()
        name = next(iter(r.tensors))
        before = bytes(r.read_bytes(name))
        _replace(base)
        assert bytes(r.read_bytes(name)) == before  # still the file whose header was read
        with pytest.raises(InputError, match="changed while it was being read"):
            r.verify_unchanged()
