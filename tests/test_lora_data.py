"""The preflight's NaN/Inf check on LoRA tensors (`lora_data._check_finite`), per stored dtype."""

from __future__ import annotations

import pytest
import torch

from lorabake.errors import LoraFormatError
from lorabake.lora_data import _check_finite

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
