"""The oracle of the 2025-2026 image families: LoRA files of every flavour, checked against diffusers.

For each family and flavour the LoRA is written (diffusers module names or native ones, fused where the
native file fuses), its per-projection PEFT equivalent is written too, and

  - diffusers' loader + `fuse_lora` on the PEFT equivalent must equal our own fp64 arithmetic
    (W + strength · scale · up @ down on every module): the reference is right;
  - where diffusers reads the flavour itself (its converters), its fused weights must equal that reference:
    the file is what that trainer writes, as diffusers understands it.

`tests/test_family_merge.py` compares `lorabake merge` on the native file with the same reference.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from tests.famcases import CASES, build_case

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_lora_flavour_loads_in_diffusers_as_the_reference(case, tmp_path):
    from tests.famlora import diffusers_fused, expected_fused

    built = build_case(case, tmp_path)
    ours = expected_fused(built.sd, built.peft_lora, case.strength)
    for key, want in ours.items():
        torch.testing.assert_close(built.reference[key], want, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    changed = {k for k in built.sd if not torch.equal(built.reference[k], built.sd[k])}
    assert changed == {m + ".weight" for m in built.peft_lora}
    if case.diffusers_reads:
        theirs = diffusers_fused(built.fam, built.sd, built.lora_path, case.strength)
        wrong = re.compile(case.diffusers_wrong).search if case.diffusers_wrong else (lambda key: False)
        assert not case.diffusers_wrong or any(wrong(k) and not torch.equal(theirs[k], want) for k, want in built.reference.items())
        for key, want in built.reference.items():
            if wrong(key):
                continue
            torch.testing.assert_close(theirs[key], want, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
