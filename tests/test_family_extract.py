"""`lorabake extract` on the 2025-2026 image families: the attention and MLP linears of every block.

A tiny native file of each family (tests/famcases.py) gets a rank-4 change on every 2-D weight; the
extracted LoRA (rank 8, so exact up to rounding) must hold exactly the modules whose names end in the
family's extract targets, named as the family's kohya/musubi trainers name them, and baking it back into
the base must give the tuned weights on those modules.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorabake.arch import FAMILIES
from tests.cli_helpers import run_main
from tests.famcases import tiny_state
from tests.famfix import FAMILIES as KEYLISTS
from tests.test_family_merge import FAMILY_OF

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("keylist", sorted(FAMILY_OF))
def test_extract_targets_attention_and_mlp_linears(keylist, tmp_path):
    pytest.importorskip("diffusers")
    family = FAMILIES[FAMILY_OF[keylist]]
    base = KEYLISTS[keylist].to_native(tiny_state(keylist))
    gen = torch.Generator().manual_seed(7)
    tuned = {
        k: (v + 0.05 * torch.randn(v.shape[0], 4, generator=gen) @ torch.randn(4, v.shape[1], generator=gen))
        if v.dim() == 2 else v
        for k, v in base.items()
    }
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    code, out, err = run_main(["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                               "-o", str(tmp_path / "lora.safetensors"), "--rank", "8", "--components", "dit",
                               "--dtype", "fp32", "--json"])
    assert code == 0, err
    targeted = {k for k, v in base.items() if v.dim() == 2 and k.endswith(family.extract_targets)}
    assert any("attn" in k or "attention" in k for k in targeted)
    assert any(m in k for k in targeted for m in ("mlp", "ff", "feed_forward", "linear1"))
    lora = load_file(str(tmp_path / "lora.safetensors"))
    prefix = family.kohya_names["dit"][0]
    assert lora and all(k.startswith(prefix) for k in lora)
    assert len({k.split(".")[0] for k in lora}) >= len(targeted)
    code, _, err = run_main(["merge", str(tmp_path / "base.safetensors"), "--lora", str(tmp_path / "lora.safetensors"),
                             "-o", str(tmp_path / "back.safetensors"), "--json"])
    assert code == 0, err
    back = load_file(str(tmp_path / "back.safetensors"))
    for key in base:
        if key in targeted:
            torch.testing.assert_close(back[key], tuned[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
        else:
            assert torch.equal(back[key], base[key]), key
    assert json.loads(out)
