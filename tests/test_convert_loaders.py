"""Converted files in the loaders that are not ours: diffusers' `load_lora_weights` + `fuse_lora`, and PEFT.

Each case makes a LoRA the way a trainer writes it (kohya names, one file-wide alpha as kohya writes it,
ranks varying per module), converts it with `lorabake convert --like BASE` (BASE: a tiny model of the
family's real block structure, written as the single-file checkpoint users have, see test_crosscheck),
loads the converted file into the model with the independent loader, fuses it at strength 0.7, and
compares every weight with `lorabake merge` of the *original* file at 0.7 into the checkpoint. So names,
alpha (in `lora_adapter_metadata` or folded) and the fused-qkv split are judged by diffusers and PEFT.
Only the diffusion model is loaded: diffusers loads text-encoder LoRAs into the installed transformers'
CLIPTextModel, whose module names lack `text_model.` from transformers 5 on (see test_crosscheck).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorabake import convert
from tests.test_crosscheck import (
    SDXL_CONFIG,
    UNET,
    _need_reference_libraries,
    assert_same_weights,
    bfl_layout,
    clone,
    kohya_pair,
    ldm_unet_names,
    lora_modules,
    merge,
    peft_merged_state_dict,
    tiny_flux,
    tiny_sdxl_unet,
    to_bfl,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _convert(src, flavour: str, out, like) -> convert.ConvertResult:
    return convert.run(convert.ConvertOptions(lora=str(src), output=str(out), to=flavour, like=str(like), force=True))


# --- SDXL: kohya SGM names -> diffusers (diffusers' loader) and PEFT (peft's set_peft_model_state_dict) -----


@pytest.fixture(scope="module")
def sdxl_case(tmp_path_factory):
    _need_reference_libraries()
    folder = tmp_path_factory.mktemp("convert-sdxl-loaders")
    unet = tiny_sdxl_unet()
    base = clone(unet.state_dict())
    to_sgm = ldm_unet_names("sdxl", SDXL_CONFIG)
    save_file({to_sgm[k]: v for k, v in base.items()}, str(folder / "base.safetensors"))
    gen = torch.Generator().manual_seed(4)
    lora = {}
    modules = lora_modules(unet)
    for i, (name, weight) in enumerate(modules):  # kohya sdxl_train_network.py: the SGM names, LoCon 3x3 too
        stem = "lora_unet_" + to_sgm[name + ".weight"][len(UNET) : -len(".weight")].replace(".", "_")
        lora[stem + ".lora_down.weight"], lora[stem + ".lora_up.weight"] = kohya_pair(weight, (2, 4, 8)[i % 3], gen)
        lora[stem + ".alpha"] = torch.tensor(3.0)
    save_file(lora, str(folder / "kohya.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    merge(folder / "base.safetensors", f"{folder / 'kohya.safetensors'}:0.7", folder / "ours.safetensors")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ours = convert_ldm_unet_checkpoint(load_file(str(folder / "ours.safetensors")), SDXL_CONFIG)
    return folder, base, ours, len(modules)


def test_sdxl_diffusers_file_loads_in_diffusers(sdxl_case):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    folder, base, ours, n = sdxl_case
    res = _convert(folder / "kohya.safetensors", "diffusers", folder / "diffusers.safetensors", folder / "base.safetensors")
    assert res.counts == {"renamed": n}
    with safe_open(str(folder / "diffusers.safetensors"), "pt") as f:
        assert all(k.startswith("unet.") and ".lora_" in k for k in f.keys())
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == 3
    unet = tiny_sdxl_unet()
    pipe = StableDiffusionXLPipeline(
        vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=DDIMScheduler(), force_zeros_for_empty_prompt=True,
    )
    pipe.load_lora_weights(str(folder / "diffusers.safetensors"))
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()
    assert len(assert_same_weights(ours, clone(unet.state_dict()), base)) == n


def test_sdxl_peft_file_loads_in_peft(sdxl_case):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    folder, base, ours, n = sdxl_case
    _convert(folder / "kohya.safetensors", "peft", folder / "peft.safetensors", folder / "base.safetensors")
    with safe_open(str(folder / "peft.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert config["rank_pattern"]  # ranks 2, 4, 8: the commonest in `r`, the others by pattern
    model = get_peft_model(tiny_sdxl_unet(), LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}))
    loaded = set_peft_model_state_dict(model, load_file(str(folder / "peft.safetensors")))
    assert not loaded.unexpected_keys
    assert not [k for k in loaded.missing_keys if "lora_" in k]
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.scale_layer(0.7)
    reference = {k.removeprefix("base_model.model."): v for k, v in peft_merged_state_dict(model).items()}
    assert len(assert_same_weights(ours, reference, base)) == n


def test_sdxl_lokr_file_loads_in_peft_and_diffusers_as_lokr(sdxl_case, tmp_path):
    """A LyCORIS LoKr (kohya names; w2 factored, or whole on every fourth module) converted to PEFT names with a
    LoKrConfig: PEFT rebuilds the same factor shapes from that config (no unexpected or missing key) and its
    merge at 0.7 equals lorabake's merge of the original at 0.7; so does diffusers' `load_lora_adapter` +
    `fuse_lora` of the diffusers-names file. The Kronecker split lorabake assumes PEFT makes is checked against
    PEFT's own `factorization`."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from peft import LoKrConfig, get_peft_model, set_peft_model_state_dict
    from peft.tuners.lokr.layer import factorization
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lorabake.adapters import lokr
    from tests.lorafix import make_lora

    for dim in (*range(1, 130), 640, 2048, 3072, 5120):
        for factor in (-1, 4, 7, 16):
            assert lokr.factorization(dim, factor) == factorization(dim, factor), (dim, factor)
    folder, base, _, _ = sdxl_case
    to_sgm = ldm_unet_names("sdxl", SDXL_CONFIG)
    linear = [(n, w) for n, w in lora_modules(tiny_sdxl_unet()) if w.ndim == 2]
    tensors = {}
    for i, (name, weight) in enumerate(linear):
        stem = "lora_unet_" + to_sgm[name + ".weight"][len(UNET) : -len(".weight")].replace(".", "_")
        tensors.update(make_lora([(stem, *weight.shape)], algo="lokr", rank=2, alpha=3.0, seed=i,
                                 lokr_w2="full" if i % 4 == 0 else "factored"))
    src, converted = tmp_path / "lokr.safetensors", tmp_path / "peft.safetensors"
    save_file(tensors, str(src), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    merge(folder / "base.safetensors", f"{src}:0.7", tmp_path / "ours.safetensors")
    ours = convert_ldm_unet_checkpoint(load_file(str(tmp_path / "ours.safetensors")), SDXL_CONFIG)
    _convert(src, "peft", converted, folder / "base.safetensors")
    with safe_open(str(converted), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert config["peft_type"] == "LOKR" and config["rank_pattern"]  # w2 whole: a larger r, so PEFT keeps it whole
    model = get_peft_model(tiny_sdxl_unet(), LoKrConfig(**{k: v for k, v in config.items() if k != "peft_type"}))
    loaded = set_peft_model_state_dict(model, load_file(str(converted)))
    assert not loaded.unexpected_keys
    assert not [k for k in loaded.missing_keys if "lokr_" in k]
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.scale_layer(0.7)
    merged = peft_merged_state_dict(model)
    reference = {k.removeprefix("base_model.model."): v for k, v in merged.items() if "lokr_" not in k}
    assert len(assert_same_weights(ours, reference, base)) == len(linear)
    # diffusers names (`unet.`, the config per component) through diffusers' model loader, which reads LoKr
    _convert(src, "diffusers", tmp_path / "diffusers.safetensors", folder / "base.safetensors")
    unet = tiny_sdxl_unet()
    # use_safetensors: else diffusers reads no lora_adapter_metadata and infers a config with alpha = r
    unet.load_lora_adapter(str(tmp_path / "diffusers.safetensors"), prefix="unet", adapter_name="lokr", use_safetensors=True)
    unet.fuse_lora(lora_scale=0.7)
    fused = {k.replace(".base_layer", ""): v for k, v in clone(unet.state_dict()).items() if "lokr_" not in k}
    assert len(assert_same_weights(ours, fused, base)) == len(linear)


# --- FLUX.1: kohya BFL names (fused qkv, linear1) -> diffusers and ai-toolkit names in diffusers' loader ----


@pytest.mark.parametrize("flavour", ["diffusers", "aitoolkit"])
def test_flux_fused_kohya_lora_split_loads_in_diffusers(tmp_path, flavour):
    _need_reference_libraries()
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    model = tiny_flux()
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    layout = bfl_layout()
    base = to_bfl(clone(model.state_dict()), layout, hidden)
    save_file(base, str(tmp_path / "flux1-bfl.safetensors"))
    # kohya sd-scripts networks/lora_flux.py: every linear of the blocks, by BFL name; alpha/rank 4/8 = 0.5
    gen = torch.Generator().manual_seed(6)
    lora = {}
    targets = [k for k, v in base.items() if v.dim() == 2 and k.endswith(".weight") and "blocks." in k and "norm" not in k]
    targets.append("final_layer.adaLN_modulation.1.weight")  # shift ‖ scale: diffusers' norm_out.linear swaps them
    for key in targets:
        stem = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        lora[stem + ".lora_down.weight"], lora[stem + ".lora_up.weight"] = kohya_pair(base[key], 8, gen)
        lora[stem + ".alpha"] = torch.tensor(4.0)
    save_file(lora, str(tmp_path / "kohya.safetensors"), metadata={"ss_base_model_version": "flux1"})
    res = _convert(tmp_path / "kohya.safetensors", flavour, tmp_path / "out.safetensors", tmp_path / "flux1-bfl.safetensors")
    assert res.counts["split"] == 2 * 2 * 3 + 2 * 4  # img/txt qkv of 2 double blocks, linear1 of 2 single blocks
    assert bool(res.folded) == (flavour == "aitoolkit")

    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=model)
    pipe.load_lora_weights(str(tmp_path / "out.safetensors"))
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()
    reference = to_bfl(clone(model.state_dict()), layout, hidden)
    merge(tmp_path / "flux1-bfl.safetensors", f"{tmp_path / 'kohya.safetensors'}:0.7", tmp_path / "ours.safetensors")
    changed = assert_same_weights(load_file(str(tmp_path / "ours.safetensors")), reference, base)
    assert {"double_blocks.1.txt_attn.qkv.weight", "single_blocks.1.linear1.weight",
            "final_layer.adaLN_modulation.1.weight"} <= changed
    assert len(changed) == len(targets)


# --- Qwen-Image: a diffusers-trained LoRA (alpha in lora_adapter_metadata) to ComfyUI names ---------------


def test_qwen_image_diffusers_lora_to_comfyui_names_loads_in_diffusers(tmp_path):
    _need_reference_libraries()
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from tests.famfix import FAMILIES as KEYLISTS
    from tests.test_crosscheck import randomize_lora_b

    fam = KEYLISTS["qwen-image"]
    model = fam.model()
    base = clone(model.state_dict())
    save_file(base, str(tmp_path / "qwen-image.safetensors"))  # Qwen's own single file: diffusers names, no prefix
    # diffusers' train_dreambooth_lora_qwen_image.py: PEFT on the attention, MLP and modulation linears, alpha != r
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                        "to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                                        "txt_mlp.net.2", "img_mod.1", "txt_mod.1"])
    model.add_adapter(config)
    randomize_lora_b(model, seed=9)
    QwenImagePipeline.save_lora_weights(str(tmp_path / "peft"), transformer_lora_layers=get_peft_model_state_dict(model),
                                        transformer_lora_adapter_metadata=config.to_dict())
    original = tmp_path / "peft" / "pytorch_lora_weights.safetensors"

    comfy = tmp_path / "comfy.safetensors"
    res = _convert(original, "comfyui", comfy, tmp_path / "qwen-image.safetensors")
    assert res.architecture == "qwen-image" and res.counts == {"renamed": 2 * 14}
    names = list(load_file(str(comfy)))
    assert "diffusion_model.transformer_blocks.1.attn.add_k_proj.lora_down.weight" in names
    assert all(n.startswith("diffusion_model.transformer_blocks.") for n in names)
    assert float(load_file(str(comfy))["diffusion_model.transformer_blocks.0.attn.to_q.alpha"]) == 8.0

    fresh = fam.model()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                             transformer=fresh)
    pipe.load_lora_weights(str(comfy))  # diffusers' own reader of ComfyUI/kohya Qwen-Image names
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()
    merge(tmp_path / "qwen-image.safetensors", f"{original}:0.7", tmp_path / "ours.safetensors")
    changed = assert_same_weights(load_file(str(tmp_path / "ours.safetensors")), clone(fresh.state_dict()), base)
    assert len(changed) == 2 * 14


# --- Wan: a musubi-tuner LoRA (lora_unet_ + Wan-AI names, alpha) to diffusers names ------------------------


def test_musubi_wan_lora_to_diffusers_names_loads_in_diffusers(tmp_path):
    _need_reference_libraries()
    from diffusers.loaders import WanLoraLoaderMixin

    from tests.test_family_wan import _bake, _base, _wan_lora
    from tests.videofam import build_model, to_native
    from tests.videolora import assert_close, write

    variant, native, base_path = _base(tmp_path, "wan21-i2v-14b", "")
    lora = _wan_lora(native, alpha=8.0)  # rank 4, alpha 8 in the blocks; none outside them
    musubi = write("musubi", lora)
    assert "lora_unet_blocks_0_cross_attn_k_img.alpha" in musubi
    ours = _bake(tmp_path, base_path, musubi, "", name="musubi")  # also saves musubi.safetensors
    res = _convert(tmp_path / "musubi.safetensors", "diffusers", tmp_path / "diffusers.safetensors", base_path)
    assert res.architecture == "wan" and res.counts == {"renamed": len(lora)}
    names = load_file(str(tmp_path / "diffusers.safetensors"))
    assert "transformer.blocks.0.attn2.add_k_proj.lora_A.weight" in names  # Wan-AI cross_attn.k_img

    state, metadata = WanLoraLoaderMixin.lora_state_dict(str(tmp_path / "diffusers.safetensors"), return_lora_metadata=True)
    assert metadata["transformer.lora_alpha"] == 8 and metadata["transformer.alpha_pattern"]  # no alpha outside blocks
    model = build_model(variant, tiny=True)
    model.load_lora_adapter(state, prefix="transformer", metadata=metadata, adapter_name="converted")
    model.fuse_lora(lora_scale=0.7)
    model.unload_lora()
    reference = to_native(variant, {k: v.detach() for k, v in model.state_dict().items()})
    assert assert_close(ours, reference, native) == {m + ".weight" for m in lora}
