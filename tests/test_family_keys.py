"""The committed key lists of the 2025-2026 image families against diffusers' own single-file converters.

Full size: every name and shape of tests/data/arch/<family>.json.gz, run through diffusers' converter
native -> diffusers on the meta device, must give the state dict of the diffusers model built at the
published config. Tiny size: a model with random weights, written in native names, converts back bit for bit
(through the converter itself, except where the converter hard-codes full widths; see tests/famfix.py).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.famfix import FAMILIES, check_native, read_fixture

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_full_size_key_list_converts_to_the_diffusers_model(name):
    fam = FAMILIES[name]
    listed = read_fixture(name)["tensors"]
    native = {k: torch.empty(v["shape"], device="meta") for k, v in listed.items()}
    expected = fam.model(full=True).state_dict()
    check_native(fam, expected, native)
    assert all(v["dtype"] == "bfloat16" and v["component"] == "diffuser" for v in listed.values())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tiny_model_native_file_converts_back_bit_for_bit(name):
    fam = FAMILIES[name]
    sd = {k: v.detach().clone() for k, v in fam.model().state_dict().items()}
    native = check_native(fam, sd)
    assert set(native) != set(sd) or fam.converter in (None, "convert_hidream_transformer_to_diffusers")
