"""Reader and writer: golden bytes against safetensors, atomicity, ordering, read-ahead, shards."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from lorabake.errors import OutputError, WriterProtocolError
from lorabake.st_reader import SafetensorsReader
from lorabake.st_writer import TMP_MARKER, SafetensorsWriter
from tests.archfix import arch_tensors, build_checkpoint, select


def mixed_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.randn(320, 320, 1, 1, generator=g).half(),
        "model.diffusion_model.time_embed.0.weight": torch.randn(1280, 320, generator=g),
        "first_stage_model.decoder.conv_in.bias": torch.randn(512, generator=g).to(torch.bfloat16),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77).reshape(1, 77),
        "double_blocks.0.img_attn.qkv.weight": torch.randn(24, 8, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
    }


def test_golden_bytes_equal_safetensors_save(tmp_path):
    tensors = mixed_tensors()
    ref = save(tensors, metadata={"format": "pt"})
    ref_path = tmp_path / "ref.safetensors"
    ref_path.write_bytes(ref)
    with SafetensorsReader(ref_path) as r:  # safetensors' canonical order, read back from its own file
        order = [(n, i.dtype, i.shape) for n, i in r.tensors.items()]
    out = tmp_path / "ours.safetensors"
    with SafetensorsWriter(out, order, {"format": "pt"}) as w:
        for name, _, _ in order:
            w.write(name, tensors[name])
    data = out.read_bytes()
    assert data == ref
    assert w.sha256 == hashlib.sha256(data).hexdigest()
    with SafetensorsReader(out) as r:
        start = r.headers[0].data_offset
    assert w.data_sha256 == hashlib.sha256(data[start:]).hexdigest()


def test_round_trip_through_safe_open(tmp_path):
    tensors = mixed_tensors(1)
    entries = [(n, _tag(t), tuple(t.shape)) for n, t in tensors.items()]  # our own (non-canonical) order
    out = tmp_path / "rt.safetensors"
    with SafetensorsWriter(out, entries, {"a": "b"}) as w:
        for n, t in tensors.items():
            w.write(n, t)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"a": "b"}
        for n, t in tensors.items():
            assert torch.equal(f.get_tensor(n).reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), n
    with SafetensorsReader(out) as r:
        for n, t in tensors.items():
            assert torch.equal(r.read(n).reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def _tag(t):
    from lorabake.dtypes import tag_of

    return tag_of(t.dtype)


@pytest.mark.parametrize(
    "bad",
    [
        ("b", torch.zeros(2)),  # out of order
        ("a", torch.zeros(3)),  # wrong shape
        ("a", torch.zeros(2, dtype=torch.float16)),  # wrong dtype
        ("a", b"\0" * 4),  # wrong byte size
    ],
)
def test_writer_rejects_undeclared_steps_and_leaves_nothing(tmp_path, bad):
    out = tmp_path / "o.safetensors"
    with pytest.raises(WriterProtocolError):
        with SafetensorsWriter(out, [("a", "F32", (2,)), ("b", "F32", (2,))]) as w:
            w.write(*bad)
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_incomplete_write_and_interrupt_leave_nothing(tmp_path):
    out = tmp_path / "o.safetensors"
    with pytest.raises(WriterProtocolError, match="closed after 1 of 2"):
        with SafetensorsWriter(out, [("a", "F32", (2,)), ("b", "F32", (2,))]) as w:
            w.write("a", torch.zeros(2))
    with pytest.raises(KeyboardInterrupt):
        with SafetensorsWriter(out, [("a", "F32", (2,))]) as w:
            raise KeyboardInterrupt
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if TMP_MARKER in p] == []


def test_refuses_existing_output_and_inputs(tmp_path):
    src = tmp_path / "in.safetensors"
    save_file({"a": torch.zeros(2)}, str(src))
    with pytest.raises(OutputError, match="one of the inputs"):
        SafetensorsWriter(src, [("a", "F32", (2,))], inputs=[str(src)], force=True)
    with pytest.raises(OutputError, match="exists"):
        SafetensorsWriter(src, [("a", "F32", (2,))])
    before = src.read_bytes()
    with SafetensorsWriter(src, [("a", "F32", (2,))], force=True) as w:
        w.write("a", torch.ones(2))
    assert src.read_bytes() != before
    with pytest.raises(OutputError, match="does not exist"):
        SafetensorsWriter(tmp_path / "nope" / "o.safetensors", [("a", "F32", (2,))])


def test_read_ahead_gives_same_bytes_in_order(tmp_path):
    path = tmp_path / "sd1.safetensors"
    names = select("sd1", [r"input_blocks\.1\.1\.", r"middle_block\.1\.proj"])
    tensors = build_checkpoint(str(path), "sd1", names)
    with SafetensorsReader(path) as r:
        order = list(r.tensors)
        for budget in (0, 1, 4 << 20):
            got = list(r.iter_bytes(order, readahead_bytes=budget))
            assert [n for n, _ in got] == order
            for n, buf in got:
                assert bytes(buf) == tensors[n].view(torch.uint8).numpy().tobytes()


def test_sharded_index_reads_as_one_file(tmp_path):
    spec = arch_tensors("flux")
    names = [k for k in spec if ".double_blocks.0." in k or ".single_blocks.0." in k]
    half = len(names) // 2
    strip = lambda n: n.removeprefix("model.diffusion_model.")  # noqa: E731
    # real names, shapes capped at 64: the index and the shards' layout are tested here, not the shapes
    shard = dict(rename=strip, float_dtype=torch.bfloat16, max_dim=64)
    a = build_checkpoint(str(tmp_path / "m-00001-of-00002.safetensors"), "flux", names[:half], **shard)
    b = build_checkpoint(str(tmp_path / "m-00002-of-00002.safetensors"), "flux", names[half:], seed=1, **shard)
    weight_map = {n: "m-00001-of-00002.safetensors" for n in a} | {n: "m-00002-of-00002.safetensors" for n in b}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for target in (tmp_path / "m.safetensors.index.json", tmp_path):
        with SafetensorsReader(target) as r:
            assert r.layout == "sharded"
            assert set(r.tensors) == set(a) | set(b)
            n = strip(names[-1])
            assert torch.equal(r.read(n), b[n])
