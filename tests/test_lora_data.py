"""The preflight's NaN/Inf check on LoRA tensors (`lora_data._check_finite`), per stored dtype."""

from __future__ import annotations

import pytest
import torch

from lorabake import lora_data
from lorabake.errors import LoraFormatError
from lorabake.lora_data import _check_finite
from lorabake.lora_format import parse_lora
from lorabake.st_reader import SafetensorsReader
from tests.lorafix import make_lora, save_lora

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("value", "word"), [(float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf"), (None, None)])
def test_one_bad_value_anywhere_is_named(dtype, value, word):
    t = torch.full((300, 7), 0.5).to(dtype)
    t[0, 0] = float(torch.finfo(torch.float32 if dtype == torch.float64 else dtype).max)  # large but finite values pass
    if value is not None and dtype == torch.float8_e4m3fn:
        t.view(torch.uint8)[211, 5] = 0x7F  # e4m3fn has no Inf (torch saturates it to 448): its NaN
    elif value is not None:
        t[211, 5] = torch.tensor(value).to(dtype)
    if value is None:
        _check_finite(t, "l.safetensors", "m.lora_up.weight", "m")
        return
    with pytest.raises(LoraFormatError, match="NaN" if dtype == torch.float8_e4m3fn else word):
        _check_finite(t, "l.safetensors", "m.lora_up.weight", "m")


def test_fp64_beyond_fp32_is_inf_to_the_math():
    with pytest.raises(LoraFormatError, match="Inf"):
        _check_finite(torch.tensor([1.0, 1e300], dtype=torch.float64), "l.safetensors", "m.alpha", "m")


def test_preflight_runs_torch_single_threaded_and_restores_the_count(tmp_path, monkeypatch):
    """Idle OpenMP threads spin between the per-tensor checks (16 % of an SDXL x4 merge's CPU)."""
    path = save_lora(tmp_path / "l.safetensors", make_lora([("lora_unet_a_proj", 8, 8)], rank=2, dtype=torch.float16))
    seen = []
    monkeypatch.setattr(lora_data, "_check_finite", lambda *a: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with SafetensorsReader(path) as reader:
            sha = lora_data.LoraData(0).verify(reader, parse_lora(reader.tensors, reader.metadata))
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2 and len(sha) == 64
    finally:
        torch.set_num_threads(before)
