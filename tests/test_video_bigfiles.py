"""Big video checkpoints: sharded bases with or without their index, tensors past 2 and 4 GiB.

Wan-AI and Tongyi ship DiTs as `diffusion_pytorch_model-0000x-of-0000N.safetensors` (+ an index). A bake
reads the set as one model, named by the index, the folder, or any one shard, and writes one file that
equals the bake of the unsharded model. Offsets past 2 GiB (a 5120x13824 fp32 Wan FFN is 270 MiB; an LTX-2
fp32 embedding table or a fused Wan 2.2 expert tensor passes 2 GiB) are checked on a sparse file: the
header says the big tensor is there, the disk holds only the small one after it; safetensors' own reader
is the reference.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorabake import st_reader
from lorabake.st_reader import SafetensorsReader
from lorabake.st_writer import SafetensorsWriter
from tests.cli_helpers import run_main
from tests.videofam import VARIANTS, build_model, to_native
from tests.videolora import linear_modules, random_lora, write

pytest.importorskip("diffusers")


def _wan(tmp_path):
    variant = VARIANTS["wan21-t2v-14b"]
    native = to_native(variant, build_model(variant, tiny=True).state_dict())
    single = tmp_path / "single.safetensors"
    save_file(native, str(single))
    lora = tmp_path / "lora.safetensors"
    save_file(write("comfy", random_lora(native, linear_modules(native), alpha=4.0)), str(lora))
    return native, single, lora


def _shard(folder, native: dict, n: int, *, index: bool) -> list[str]:
    folder.mkdir()
    names = sorted(native)
    files, weight_map = [], {}
    for i in range(n):
        part = names[i::n]
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: native[k] for k in part}, str(folder / fname))
        files.append(str(folder / fname))
        weight_map.update(dict.fromkeys(part, fname))
    if index:
        doc = {"metadata": {}, "weight_map": weight_map}
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(doc))
    return files


def _merge(base, lora, out) -> tuple[int, str]:
    code, _, err = run_main(["merge", str(base), "--lora", f"{lora}:0.8", "-o", str(out)])
    return code, err


@pytest.mark.parametrize("how", ["index", "folder", "first-shard", "last-shard-no-index", "folder-no-index"])
def test_sharded_wan_bakes_like_the_single_file(tmp_path, how):
    native, single, lora = _wan(tmp_path)
    assert _merge(single, lora, tmp_path / "want.safetensors")[0] == 0
    want = load_file(str(tmp_path / "want.safetensors"))
    folder = tmp_path / "shards"
    files = _shard(folder, native, 3, index="no-index" not in how)
    base = {
        "index": folder / "diffusion_pytorch_model.safetensors.index.json",
        "folder": folder,
        "first-shard": files[0],
        "last-shard-no-index": files[-1],
        "folder-no-index": folder,
    }[how]
    code, err = _merge(base, lora, tmp_path / "out.safetensors")
    assert code == 0, err
    got = load_file(str(tmp_path / "out.safetensors"))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(got[k], native[k]) for k in native)


def test_a_missing_shard_is_named(tmp_path):
    native, _, lora = _wan(tmp_path)
    files = _shard(tmp_path / "shards", native, 3, index=False)
    os.remove(files[1])
    code, err = _merge(files[0], lora, tmp_path / "out.safetensors")
    assert code == 1
    assert "Error:" in err and "00002-of-00003" in err and "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists()


def _sparse_file(path, big: int, small: torch.Tensor) -> int:
    """A safetensors file whose header declares `big` bytes of U8 and then `small`; only `small` is on disk.

    The header comes from our writer's encoder; returns the file offset of `small`'s bytes.
    """
    entries = [("big", "U8", (big,)), ("small", "F32", tuple(small.shape))]
    writer = SafetensorsWriter(str(path) + ".unused", entries, check_space=False)
    start, end = writer.spans[1]
    assert (start, end) == (big, big + small.numel() * 4)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(writer.header_bytes)) + writer.header_bytes)
        data = fh.tell()
        fh.truncate(data + end)  # sparse: no disk blocks for `big`
        fh.seek(data + start)
        fh.write(small.numpy().tobytes())
    return data + start


@pytest.mark.parametrize("big", [2**31 + 8, 2**32 + 64], ids=["past-2GiB", "past-4GiB"])
def test_offsets_past_2_and_4_gib_read_like_safetensors(tmp_path, big):
    small = torch.arange(6, dtype=torch.float32)
    path = tmp_path / "sparse.safetensors"
    _sparse_file(path, big, small)
    with safe_open(str(path), framework="pt") as fh:  # the reference reader
        assert torch.equal(fh.get_tensor("small"), small)
    with SafetensorsReader(str(path)) as reader:
        assert reader.tensors["big"].nbytes == big
        assert reader.tensors["small"].start == big
        assert torch.equal(reader.read("small"), small)


def test_short_reads_are_resumed(tmp_path, monkeypatch):
    """Linux returns at most 0x7ffff000 bytes per read: a tensor past that comes in several reads."""
    small = torch.randn(1000)
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(7), "t": small}, str(path))
    real = os.preadv
    calls = []

    def capped(fd, buffers, offset):
        (view,) = buffers
        calls.append(len(view))
        return real(fd, [view[:333]], offset)

    monkeypatch.setattr(st_reader.os, "preadv", capped)
    with SafetensorsReader(str(path)) as reader:
        assert torch.equal(reader.read("t"), small)
    assert len(calls) >= 4000 // 333
