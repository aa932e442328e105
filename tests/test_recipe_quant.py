"""Recipes quantize on the way out (`quant = "fp8"`, `"Q8_0"`, …): each such entry bakes what
`lorabake merge --quant` writes (same tensors), records `quant` in its entry, and bakes beside plain
entries of the same base (those still share one read)."""

from __future__ import annotations

import json

import gguf
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.cli_helpers import run_main
from tests.lorafix import save_lora
from tests.test_lowprecision import lora_for, merge
from tests.test_quant_out import STEMS, bf16_base  # noqa: F401 (fixture)


def test_recipe_quant_entries_equal_merge_quant(tmp_path, bf16_base):  # noqa: F811
    base_path, values = bf16_base
    lora = lora_for(STEMS, {k: tuple(values[k].shape) for k in STEMS.values()}, alpha=4.0)
    lora_path = save_lora(tmp_path / "l.safetensors", lora)
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[[matrix]]\nbases = ["{base_path}"]\nloras = [["{lora_path}"]]\nstrengths = [0.5]\n'
        'output = "out/{quant}_{strength}.safetensors"\nquant = "fp8"\n\n'
        f'[[bake]]\nbase = "{base_path}"\nloras = ["{lora_path}:0.5"]\noutput = "out/q8.gguf"\nquant = "Q8_0"\n\n'
        f'[[bake]]\nbase = "{base_path}"\nloras = ["{lora_path}:0.5"]\noutput = "out/plain.safetensors"\n'
    )
    code, stdout, err = run_main(["bake", str(recipe), "--json"])
    assert code == 0, err
    assert all(row["status"] == "baked" for row in json.loads(stdout)["jobs"]), stdout

    code, _, err, ref = merge(tmp_path / "ref", base_path, lora_path, "--quant", "fp8", strength=0.5)
    assert code == 0, err
    got, want = load_file(str(tmp_path / "out/fp8_0.5.safetensors")), load_file(str(ref))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with safe_open(str(tmp_path / "out/fp8_0.5.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["lorabake.recipe"])["quant"] == "fp8"

    code, _, err, ref = merge(tmp_path / "ref", base_path, lora_path, "--quant", "Q8_0", out="q8.gguf", strength=0.5)
    assert code == 0, err
    mine, theirs = gguf.GGUFReader(str(tmp_path / "out/q8.gguf")), gguf.GGUFReader(str(ref))
    a = {t.name: (t.tensor_type, np.array(t.data)) for t in mine.tensors}
    b = {t.name: (t.tensor_type, np.array(t.data)) for t in theirs.tensors}
    assert a.keys() == b.keys()
    assert all(a[k][0] == b[k][0] and np.array_equal(a[k][1], b[k][1]) for k in b)

    # the GGUF output carries its entry too: a second bake finds every output made by its entry
    code, stdout, err = run_main(["bake", str(recipe), "--json"])
    assert code == 0 and {row["status"] for row in json.loads(stdout)["jobs"]} == {"skipped"}, (err, stdout)

    code, _, err, ref = merge(tmp_path / "ref", base_path, lora_path, out="plain.safetensors", strength=0.5)
    got, want = load_file(str(tmp_path / "out/plain.safetensors")), load_file(str(ref))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_recipe_quant_must_name_a_format(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[bake]]\nbase = "a.safetensors"\nloras = ["b.safetensors"]\noutput = "o.safetensors"\nquant = 8\n')
    code, _, err = run_main(["bake", str(recipe)])
    assert code == 2 and "quant is a format name" in err, err
