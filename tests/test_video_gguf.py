"""GGUF outputs of the video families (`merge --quant Q8_0 -o X.gguf`): the file names its family the way
ComfyUI-GGUF's loader accepts (city96/ComfyUI-GGUF loader.py IMG_ARCH_LIST: "wan", "hyvid", "ltxv", "cosmos"),
keeps every base tensor with its shape (the 5-D Conv3d patch embeddings too), and bakes again as a GGUF base
of the same family."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from tests.cli_helpers import run_main
from tests.videofam import VARIANTS, build_model, to_native
from tests.videolora import random_lora, write

gguf = pytest.importorskip("gguf")
pytest.importorskip("diffusers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# key list -> (family, general.architecture ComfyUI-GGUF's loader accepts)
ROWS = {
    "wan21-t2v-14b": ("wan", "wan"),
    "hunyuanvideo-t2v": ("hunyuanvideo", "hyvid"),
    "ltx2": ("ltx", "ltxv"),
    "cosmos-predict2-2b-t2i": ("cosmos", "cosmos"),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_video_gguf_names_its_family_as_comfyui_gguf_does(tmp_path, name):
    family, gguf_arch = ROWS[name]
    variant = VARIANTS[name]
    native = to_native(variant, build_model(variant, tiny=True).state_dict())
    base = tmp_path / "base.safetensors"
    save_file(native, str(base))
    modules = [k.removesuffix(".weight") for k, t in native.items() if k.endswith(".weight") and t.dim() == 2][:3]
    lora = tmp_path / "lora.safetensors"
    save_file(write("comfy", random_lora(native, modules, alpha=4.0, seed=1), strip=variant.prefix), str(lora))
    out = tmp_path / "out.gguf"
    code, _, err = run_main(["merge", str(base), "--lora", str(lora), "-o", str(out), "--quant", "Q8_0"])
    assert code == 0, err
    reader = gguf.GGUFReader(str(out))
    assert reader.get_field("general.architecture").contents() == gguf_arch
    shapes = {}
    for t in reader.tensors:
        orig = reader.get_field("comfy.gguf.orig_shape." + t.name)
        shapes[t.name] = tuple(int(d) for d in orig.contents()) if orig else tuple(int(d) for d in reversed(t.shape.tolist()))
    assert shapes == {k: tuple(v.shape) for k, v in native.items()}
    code, stdout, err = run_main(["inspect", str(out)])
    assert code == 0 and f"architecture: {family}" in stdout, (stdout, err)
    code, _, err = run_main(["merge", str(out), "--lora", str(lora), "-o", str(tmp_path / "again.gguf")])
    assert code == 0, err
    assert gguf.GGUFReader(str(tmp_path / "again.gguf")).get_field("general.architecture").contents() == gguf_arch
