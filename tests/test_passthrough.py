"""Unchanged bytes go file to file; LoRA tensors are read from disk once.

* `SafetensorsWriter.copy_from` gives the same file and the same SHA-256 values as `write` of the
  same bytes, with the kernel copy and with each fallback (sendfile, read/write).
* A merge reads from the base only the tensors it changes; the others are copied, byte-identical.
* The LoRA bytes the preflight read are the ones the bake uses (no second read within the budget).
"""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
import torch
from safetensors.torch import load_file

from lorabake import file_copy, ops
from lorabake.plan import LoraSpec
from lorabake.st_reader import SafetensorsReader
from lorabake.st_writer import SafetensorsWriter
from tests.archfix import build_checkpoint, select
from tests.lorafix import make_lora, save_lora

SD1 = [r"model\.diffusion_model\.input_blocks\.1\.", r"first_stage_model\.decoder\.conv_in"]
Q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
STEMS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768),
}


def _source(tmp_path) -> str:
    path = str(tmp_path / "src.safetensors")
    build_checkpoint(path, "sd1", select("sd1", SD1), seed=3)
    return path


def _copy_all(src: str, out: str, *, background: int) -> SafetensorsWriter:
    with SafetensorsReader(src) as r:
        entries = [(n, i.dtype, i.shape) for n, i in r.tensors.items()]
        with SafetensorsWriter(out, entries, {"k": "v"}, background_bytes=background) as w:
            for i, name in enumerate(r.tensors):
                if i % 2:  # alternate: copies and writes interleave in one file
                    fd, offset, _ = r.source_of(name)
                    w.copy_from(name, fd, offset)
                else:
                    w.write(name, r.read_bytes(name))
    return w


def _written(src: str, out: str) -> SafetensorsWriter:
    with SafetensorsReader(src) as r:
        entries = [(n, i.dtype, i.shape) for n, i in r.tensors.items()]
        with SafetensorsWriter(out, entries, {"k": "v"}) as w:
            for name in r.tensors:
                w.write(name, r.read_bytes(name))
    return w


def _sha(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


@pytest.mark.parametrize("broken", [(), ("copy_file_range",), ("copy_file_range", "sendfile")], ids=["kernel", "sendfile", "readwrite"])
@pytest.mark.parametrize("background", [0, 1 << 20])
def test_copy_from_equals_write(tmp_path, monkeypatch, broken, background):
    src = _source(tmp_path)
    want = _written(src, str(tmp_path / "want.safetensors"))
    calls = []
    for name in ("copy_file_range", "sendfile"):
        real = getattr(os, name)

        def fake(*args, _name=name, _real=real):
            calls.append(_name)
            if _name in broken:
                raise OSError(errno.EXDEV if _name == "copy_file_range" else errno.EINVAL, "not here")
            return _real(*args)

        monkeypatch.setattr(os, name, fake)
    out = str(tmp_path / "out.safetensors")
    got = _copy_all(src, out, background=background)
    with open(out, "rb") as a, open(tmp_path / "want.safetensors", "rb") as b:
        assert a.read() == b.read()
    assert got.sha256 == want.sha256 == _sha(out)
    assert got.data_sha256 == want.data_sha256
    assert ("copy_file_range" in calls) and (("sendfile" in calls) == bool(broken))


def test_copy_of_a_truncated_source_is_an_error(tmp_path):
    src = tmp_path / "short.bin"
    src.write_bytes(b"x" * 100)
    out = tmp_path / "dst.bin"
    fd = os.open(src, os.O_RDONLY)
    try:
        with open(out, "wb") as fh, pytest.raises(OSError, match="ended"):
            file_copy.copy_span(file_copy.Span(fd, 50, 100), fh.fileno())
    finally:
        os.close(fd)


def _base_and_lora(tmp_path) -> tuple[str, str]:
    base = str(tmp_path / "base.safetensors")
    build_checkpoint(base, "sd1", select("sd1", SD1), seed=1)
    mods = [(stem, o, i) for stem, (o, i) in STEMS.items()]
    lora = save_lora(tmp_path / "lora.safetensors", make_lora(mods, rank=8), {"ss_base_model_version": "sd_v1"})
    return base, lora


@pytest.mark.parametrize("budget", [ops.DEFAULT_LORA_CACHE, 0], ids=["kept", "no-budget"])
def test_merge_reads_only_what_it_changes_and_loras_once(tmp_path, monkeypatch, budget):
    base, lora = _base_and_lora(tmp_path)
    reads: list[tuple[str, str]] = []
    base_bytes: dict[str, int] = {}
    real = SafetensorsReader.read_into

    def counting(self, name, view, offset=0):  # every read of tensor bytes, whole or a window of one
        reads.append((os.path.basename(self.path), name))
        if self.path == base:
            base_bytes[name] = base_bytes.get(name, 0) + len(view)
        return real(self, name, view, offset)

    monkeypatch.setattr(SafetensorsReader, "read_into", counting)
    out = str(tmp_path / "out.safetensors")
    opts = ops.MergeOptions(base=base, loras=(LoraSpec(lora, 0.8),), output=out, lora_cache_bytes=budget)
    result = ops.merge(opts)
    assert result.tensors_changed == 2
    with SafetensorsReader(base) as r:  # the changed tensors, each read once, and nothing else
        assert base_bytes == {n: r.tensors[n].nbytes for n in (Q, K)}
    lora_reads = [n for f, n in reads if f == "lora.safetensors"]
    with SafetensorsReader(lora) as r:
        lora_names = set(r.tensors)
    if budget:
        # the preflight's read, nothing more (the strength·scale check peeks at the kept alphas)
        assert sorted(lora_reads) == sorted(lora_names)
    else:
        assert set(lora_reads) == lora_names and len(lora_reads) > len(lora_names)
    before, after = load_file(base), load_file(out)
    for name, t in before.items():
        if name not in (Q, K):
            assert torch.equal(after[name].view(torch.uint8), t.view(torch.uint8)), name
    assert not torch.equal(after[Q], before[Q])
    assert result.sha256 == _sha(out)


def test_span_hasher_keeps_one_buffer_and_grows_it(tmp_path, monkeypatch):
    data = os.urandom(3000)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    monkeypatch.setattr(file_copy, "HASH_CHUNK", 1024)  # spans of several chunks
    fd = os.open(src, os.O_RDONLY)
    try:
        sha = hashlib.sha256()
        hasher = file_copy.SpanHasher(sha.update)
        spans = [(0, 100), (100, 50), (150, 2500), (2650, 350)]  # small, smaller, several chunks, one chunk
        buffers = []
        for offset, size in spans:
            hasher(file_copy.Span(fd, offset, size))
            buffers.append(hasher._buf)
        hasher(memoryview(b"tail"))
    finally:
        os.close(fd)
    assert sha.hexdigest() == hashlib.sha256(data + b"tail").hexdigest()
    assert buffers[0] is buffers[1] and buffers[2] is buffers[3] and len(buffers[2]) == 1024


def test_writeback_hands_the_output_to_the_disk_behind_the_writer(tmp_path, monkeypatch):
    """Every WRITEBACK_BYTES of output, `sync_file_range(WRITE)` over the bytes written since the last
    call, in order and without gaps; the merge's output is unchanged by it (a hint to the kernel)."""
    base, lora = _base_and_lora(tmp_path)
    calls: list[tuple[int, int, int, int]] = []
    real = file_copy.Writeback._call if file_copy.Writeback._call else file_copy._libc_sync_file_range()
    monkeypatch.setattr(file_copy, "WRITEBACK_BYTES", 1 << 16)
    monkeypatch.setattr(file_copy.Writeback, "_call", lambda *a: calls.append(a) or (real(*a) if real else 0))
    out = str(tmp_path / "out.safetensors")
    ops.merge(ops.MergeOptions(base=base, loras=(LoraSpec(lora, 0.8),), output=out))
    size = os.path.getsize(out)
    assert len(calls) >= 3 and calls[-1][1] + calls[-1][2] > size // 2  # most of it before the fsync
    assert calls[0][1] == 0 and all(a[1] == b[1] + b[2] for a, b in zip(calls[1:], calls))  # contiguous
    assert all(c[2] >= 1 << 16 and c[3] == 2 for c in calls) and calls[-1][1] + calls[-1][2] <= size
    with SafetensorsReader(out) as r:
        assert set(r.tensors) == set(load_file(base))
