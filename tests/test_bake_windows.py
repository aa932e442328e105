"""Targeted tensors read and baked in row windows (`bake_windows`), into reused buffers (`bufpool`).

A merge with windows a few rows tall must write the very bytes of one with every tensor baked whole,
read each changed tensor once in pieces, and reuse its buffers; `write_part` keeps the writer's protocol.
"""

from __future__ import annotations

import gc
import types

import pytest
import torch
from safetensors.torch import load_file

from lorabake import bake_kernel, bake_windows, bufpool, fold, ops, st_reader
from lorabake.errors import WriterProtocolError
from lorabake.plan import LoraSpec
from lorabake.st_writer import SafetensorsWriter
from tests.archfix import build_checkpoint, select
from tests.lorafix import make_lora, save_lora

FF = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2.weight"  # [320, 1280]
STEMS = {  # diffusers-named kohya stem: (out, in) of real SD1.5 modules
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2": (320, 1280),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("windows")
    base = str(root / "base.safetensors")
    build_checkpoint(base, "sd1", select("sd1", [r"model\.diffusion_model\.input_blocks\.1\.", r"first_stage_model\.decoder\.conv_in"]), seed=3)
    mods = [(stem, o, i) for stem, (o, i) in STEMS.items()]
    loras = [save_lora(root / f"l{k}.safetensors", make_lora(mods, rank=8 * (k + 1), seed=k), {"ss_base_model_version": "sd_v1"})
             for k in range(2)]
    return base, loras


def _merge(base, loras, out, **kw):
    return ops.merge(ops.MergeOptions(base=base, loras=tuple(LoraSpec(p, s) for p, s in zip(loras, (0.7, -1.2))),
                                      output=str(out), device="cpu", **kw))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_windows_write_the_bytes_of_whole_tensors(inputs, tmp_path, monkeypatch, rounding):
    base, loras = inputs
    monkeypatch.setattr(bake_kernel, "BLOCK_ELEMS", 3 * 1280 + 17)  # grid steps of 3 rows: windows of 24
    whole = tmp_path / "whole" / "out.safetensors"
    whole.parent.mkdir()
    with monkeypatch.context() as m:
        m.setattr(bake_windows, "windows_of", lambda baker, name: None)
        _merge(base, loras, whole, rounding=rounding)
    pieces: list[tuple[str, int, int]] = []
    real = st_reader.SafetensorsReader.read_into

    def counting(self, name, view, offset=0):
        if self.path == base:
            pieces.append((name, offset, len(view)))
        return real(self, name, view, offset)

    monkeypatch.setattr(st_reader.SafetensorsReader, "read_into", counting)
    monkeypatch.setattr(bake_windows, "WINDOW_BYTES", 64 << 10)  # FF [320, 1280] fp16 (800 KiB) in windows
    got = tmp_path / "out.safetensors"
    result = _merge(base, loras, got, rounding=rounding)
    assert got.read_bytes() == whole.read_bytes()
    assert result.tensors_changed == 3
    ff = [(o, n) for name, o, n in pieces if name == FF]
    assert len(ff) > 4 and [o for o, _ in ff] == sorted(o for o, _ in ff)  # in order, in pieces, once
    assert sum(n for _, n in ff) == 320 * 1280 * 2 and ff[0][0] == 0
    before, after = load_file(base), load_file(str(got))
    assert not torch.equal(before[FF], after[FF])


def test_a_tensor_that_does_not_fold_is_gathered_and_baked_whole(inputs, tmp_path, monkeypatch):
    """Windows are planned from headers; if the fold refuses the tensor at bake time (here forced), the
    windows already read are put together and the whole-tensor path runs: same bytes."""
    base, loras = inputs
    ref = tmp_path / "ref" / "out.safetensors"
    ref.parent.mkdir()
    _merge(base, loras, ref)
    monkeypatch.setattr(bake_windows, "WINDOW_BYTES", 64 << 10)
    refused = types.SimpleNamespace(fold=lambda shape, patches, device: None, rows_cols=fold.rows_cols)
    monkeypatch.setattr(bake_windows, "fold", refused)  # the kernel's own fold is untouched
    gathered = []
    real_gather = bake_windows._gather
    monkeypatch.setattr(bake_windows, "_gather", lambda *a: gathered.append(a[0]) or real_gather(*a))
    got = tmp_path / "out.safetensors"
    _merge(base, loras, got)
    assert 320 * 1280 * 2 in gathered
    assert got.read_bytes() == ref.read_bytes()


def test_pool_reuses_a_buffer_once_its_last_view_is_gone():
    pool = bufpool.BufferPool(keep=8 << 20)
    first = pool.take(3 << 20)
    address = first.obj.__array_interface__["data"][0]
    tensor = torch.frombuffer(first, dtype=torch.uint8)  # the bake's view keeps it alive
    del first
    gc.collect()
    assert pool.idle_bytes == 0
    del tensor
    gc.collect()
    assert pool.idle_bytes == 4 << 20  # its power-of-two size class
    again = pool.take(2 << 20 | 1)  # a smaller request fits the idle 4 MiB buffer (within 4x)
    assert again.obj.__array_interface__["data"][0] == address and len(again) == 2 << 20 | 1
    assert pool.idle_bytes == 0
    small = pool.take(1000)  # below SMALLEST: the heap's
    assert len(small) == 1000


def test_pool_keeps_at_most_keep_bytes_idle():
    pool = bufpool.BufferPool(keep=4 << 20)
    views = [pool.take(4 << 20) for _ in range(3)]
    del views
    gc.collect()
    assert pool.idle_bytes == 4 << 20


def test_write_part_keeps_the_declared_layout(tmp_path):
    entries = [("a", "F16", (4, 3)), ("b", "F16", (2,))]
    rows = torch.arange(12, dtype=torch.float16).reshape(4, 3)
    out = tmp_path / "o.safetensors"
    with SafetensorsWriter(str(out), entries) as w:
        w.write_part("a", rows[:1])
        with pytest.raises(WriterProtocolError, match="not complete"):
            w.write("a", rows)
        with pytest.raises(WriterProtocolError, match="expected 'a'"):
            w.write_part("b", torch.zeros(2, dtype=torch.float16))
        with pytest.raises(WriterProtocolError, match="dtype F32 differs from the declared F16"):
            w.write_part("a", rows[1:].float())
        with pytest.raises(WriterProtocolError, match="26 bytes given, 24 declared"):
            w.write_part("a", torch.zeros(10, dtype=torch.float16))
        w.write_part("a", rows[1:])
        w.write("b", torch.ones(2, dtype=torch.float16))
    got = load_file(str(out))
    assert torch.equal(got["a"], rows) and torch.equal(got["b"], torch.ones(2, dtype=torch.float16))


def test_a_part_written_tensor_left_incomplete_writes_nothing(tmp_path):
    out = tmp_path / "o.safetensors"
    with pytest.raises(WriterProtocolError, match="closed after 0 of 1"):
        with SafetensorsWriter(str(out), [("a", "F16", (4, 3))]) as w:
            w.write_part("a", torch.zeros(6, dtype=torch.float16))
    assert not out.exists()
