"""Fan-out: K outputs from one read of a base are byte-identical to K separate `ops.merge` runs."""

from __future__ import annotations

import os

import pytest

from lorabake import fanout, ops, st_reader
from lorabake.errors import LoraFormatError
from lorabake.plan import LoraSpec
from tests.batchfix import make_world


def test_one_read_feeds_k_outputs_equal_to_k_merges(tmp_path, monkeypatch):
    make_world(tmp_path)
    base = str(tmp_path / "bases" / "a.safetensors")
    style, detail = (str(tmp_path / "loras" / f"{n}.safetensors") for n in ("style", "detail"))
    # pass-through, cast-only and patched tensors side by side; a dtype change in one output only
    cases = [
        ("detail", (LoraSpec(detail, 0.5, 0.25),), "keep"),
        ("style_bf16", (LoraSpec(style, 1.0),), "bf16"),
        ("both", (LoraSpec(style, -0.75), LoraSpec(detail, 1.25)), "keep"),
        ("style_fp32", (LoraSpec(style, 0.5),), "fp32"),
    ]
    specs = [ops.MergeOptions(base=base, loras=loras, output=str(tmp_path / f"fan_{name}.safetensors"), dtype=dtype,
                              device="cpu") for name, loras, dtype in cases]
    reads: dict[str, int] = {}
    original = st_reader.SafetensorsReader.read_into

    def counting(self, name, view, offset=0):
        path = self.shard_of(name).path
        reads[path] = reads.get(path, 0) + len(view)
        return original(self, name, view, offset)

    monkeypatch.setattr(st_reader.SafetensorsReader, "read_into", counting)
    results = fanout.merge_many(specs)
    data_size = st_reader.SafetensorsReader(base).data_size
    assert reads[base] == data_size  # the base was read once, whole
    monkeypatch.setattr(st_reader.SafetensorsReader, "read_into", original)
    for (name, _loras, _dtype), spec, result in zip(cases, specs, results):
        ref = str(tmp_path / "ref" / f"fan_{name}.safetensors")
        os.makedirs(os.path.dirname(ref), exist_ok=True)
        single = ops.merge(ops.MergeOptions(base=base, loras=spec.loras, output=ref, dtype=spec.dtype, device="cpu"))
        assert open(spec.output, "rb").read() == open(ref, "rb").read(), name
        assert (result.sha256, result.tensors_changed, result.bytes_written) == (
            single.sha256, single.tensors_changed, single.bytes_written)
        assert result.lora_data_sha256 == single.lora_data_sha256
    assert sorted(os.listdir(tmp_path)) == sorted(["bases", "loras", "recipe.toml", "ref"] +
                                                  [f"fan_{n}.safetensors" for n, _, _ in cases])


def test_an_error_in_one_output_leaves_no_output_of_the_read(tmp_path):
    from tests.lorafix import make_lora, save_lora

    make_world(tmp_path)
    base = str(tmp_path / "bases" / "a.safetensors")
    bad = str(tmp_path / "loras" / "nan.safetensors")
    tensors = make_lora([("lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320, 1)], rank=4)
    next(t for k, t in tensors.items() if k.endswith("lora_up.weight"))[0, 0] = float("nan")
    save_lora(bad, tensors, {"ss_base_model_version": "sd_v1"})
    good = ops.MergeOptions(base=base, loras=(LoraSpec(str(tmp_path / "loras" / "style.safetensors")),),
                            output=str(tmp_path / "good.safetensors"), device="cpu")
    broken = ops.MergeOptions(base=base, loras=(LoraSpec(bad),), output=str(tmp_path / "bad.safetensors"), device="cpu")
    with pytest.raises(LoraFormatError, match=r"nan\.safetensors.*NaN"):
        fanout.merge_many([good, broken])
    assert sorted(os.listdir(tmp_path)) == ["bases", "loras", "recipe.toml"]
