"""`lorabake merge` against independent implementations: diffusers' LoRA loader + `fuse_lora`, and peft's merge.

Each test builds a tiny model from a config (no downloads: HF_HUB_OFFLINE=1, never `from_pretrained`) with
the block structure of a real family, writes it as the single-file checkpoint a user bakes into (LDM, SGM
or BFL names, derived by running diffusers' own single-file converter on the family's real key names from
tests/data/arch), makes a LoRA the way a trainer writes one, and then compares every tensor of

  - the model after diffusers/peft load and fuse that LoRA (the reference), with
  - `lorabake merge` of the single-file checkpoint, mapped back to diffusers names by diffusers' converter.

So the names (kohya diffusers-style SD1, kohya SGM SDXL, HF CLIP, PEFT/diffusers, BFL fused slices) and the
math (alpha/rank, strength, conv 1x1 and 3x3 LoCon, PEFT alpha in metadata, row slices, scale/shift swap)
are checked against code that is not ours. fp32 throughout: the two sides differ only by fp32 rounding
order, hence rtol 1e-5 / atol 1e-6 (largest difference seen: 6e-8, a few ulps; the SD1 PEFT case is bit-equal).
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.archfix import arch_tensors
from tests.cli_helpers import run_main

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing below downloads; make sure of it

UNET = "model.diffusion_model."
SD1_TE = "cond_stage_model.transformer."
RTOL, ATOL = 1e-5, 1e-6
SD1_CONFIG = {"layers_per_block": 2}
SDXL_CONFIG = {"layers_per_block": 2, "addition_embed_type": "text_time"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: with several threads the hand-off costs more than the math (on a busy 2-core box a
    [64, 8] @ [8, 768] matmul took 100x longer with 2 threads than with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _need_reference_libraries():
    for name in ("diffusers", "peft", "transformers"):
        pytest.importorskip(name)


# --- tiny models with real block structure ------------------------------------------------------------


def tiny_sd1():
    """SD1 UNet (4 levels, 2 layers, cross-attention on levels 0-2, conv proj_in) + CLIP text encoder.

    Cross-attention width 768 as in SD1 (the detector reads it); channels grow like SD1's 320/640/1280/1280
    so every resnet has the conv_shortcut it has in SD1. The text encoder is narrow: only its names matter.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    te = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )
    return unet, te


def tiny_sdxl_unet():
    """SDXL UNet: 3 levels, no attention on level 0, linear proj_in, two transformer blocks on level 2."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=2048,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
    )


def tiny_flux():
    """Flux DiT with 2 double and 2 single blocks; H = 32, MLP 4·H as in FLUX.1."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )


# --- single-file names, from diffusers' own converters ----------------------------------------------


def ldm_unet_names(arch: str, config: dict) -> dict[str, str]:
    """diffusers UNet key -> LDM/SGM key: diffusers' LDM->diffusers converter run on the real key names."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    real = [k for k in arch_tensors(arch) if k.startswith(UNET)]
    return convert_ldm_unet_checkpoint({k: k for k in real}, config)


def hf_te_path(name: str) -> str:
    """A CLIP module path as transformers 4 spells it (`text_model.…`): real checkpoints and kohya use it.

    transformers >= 5 CLIPTextModel has no `text_model` level, so its own names lack the prefix.
    """
    return name if name.startswith("text_model.") else "text_model." + name


def clone(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}


def write_sd1_checkpoint(path, unet_sd, te_sd) -> None:
    to_ldm = ldm_unet_names("sd1", SD1_CONFIG)
    assert set(unet_sd) == set(to_ldm)  # the tiny UNet has every tensor SD1's UNet has
    tensors = {to_ldm[k]: v for k, v in unet_sd.items()}
    tensors.update({SD1_TE + hf_te_path(k): v for k, v in te_sd.items()})
    save_file(tensors, str(path))


def sd1_back_to_diffusers(merged: dict[str, torch.Tensor], te_keys) -> tuple[dict, dict]:
    """Our LDM output under diffusers UNet names and the installed CLIPTextModel's names."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint

    unet = convert_ldm_unet_checkpoint(dict(merged), SD1_CONFIG)
    clip = convert_ldm_clip_checkpoint(dict(merged))  # strips cond_stage_model.transformer.
    te = {k: clip[hf_te_path(k)] for k in te_keys}
    return unet, te


# --- LoRA writers ------------------------------------------------------------------------------------


def lora_modules(model, *, only: str = "") -> list[tuple[str, torch.Tensor]]:
    """(module path, weight) of every Linear and Conv2d: what kohya's LoCon (conv_dim) and trainers target."""
    return [
        (name, m.weight)
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and only in name
    ]


def kohya_pair(weight: torch.Tensor, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_down, lora_up); conv 3x3 LoCon: down [r, in, 3, 3], up [out, r, 1, 1]."""
    kernel = tuple(weight.shape[2:])
    down = torch.randn(rank, weight.shape[1], *kernel, generator=gen) * 0.1
    up = torch.randn(weight.shape[0], rank, *((1, 1) if kernel else ()), generator=gen) * 0.1
    return down, up


def randomize_lora_b(model, seed: int) -> None:
    """PEFT initialises lora_B to zero (ΔW = 0); give it values, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def peft_merged_state_dict(model) -> dict[str, torch.Tensor]:
    """peft's own merge (`LoraLayer.merge`, what `merge_and_unload` runs), under the model's plain names."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
            merged += 1
    assert merged
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


# --- comparison --------------------------------------------------------------------------------------


def merge(base_path, lora_arg: str, out_path) -> dict:
    code, stdout, err = run_main(["merge", str(base_path), "--lora", lora_arg, "-o", str(out_path), "--json"])
    assert code == 0, err
    summary = json.loads(stdout)["loras"][0]
    assert summary["unmatched"] == {} and summary["not_applied"] == []
    return summary


def assert_same_weights(ours: dict, reference: dict, base: dict) -> set[str]:
    """Every reference tensor equals ours, and both changed exactly the same tensors. Returns those."""
    assert set(reference) <= set(ours)
    changed = {k for k in reference if not torch.equal(reference[k], base[k])}
    assert {k for k in reference if not torch.equal(ours[k], base[k])} == changed
    for key, want in reference.items():
        torch.testing.assert_close(ours[key], want, rtol=RTOL, atol=ATOL, msg=lambda m, key=key: f"{key}: {m}")
    return changed


# --- 1. SD1 kohya LoRA (UNet LoCon + TE) vs diffusers' kohya loader and fuse_lora ---------------------


def test_sd1_kohya_locon_matches_diffusers_fuse_lora(tmp_path):
    _need_reference_libraries()
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet, te = tiny_sd1()
    base_unet, base_te = clone(unet.state_dict()), clone(te.state_dict())
    write_sd1_checkpoint(tmp_path / "base.safetensors", base_unet, base_te)

    # kohya sd-scripts LoRA with --network_module=networks.lora and conv_dim (LoCon): UNet modules by their
    # diffusers path, TE by its transformers-4 path, `_`-joined. Ranks vary per module (resize_lora does
    # that); one network_alpha for the file, as kohya writes it.
    # diffusers quirk (0.42): its kohya converter renames attention projections to `processor.to_q_lora`
    # but keys their alphas by that old name, so peft ignores them ("alpha_pattern keys did not match") and
    # falls back to the file's most common alpha. With one alpha per file, as kohya writes, that is right;
    # per-module alphas on to_q/k/v/out and TE self_attn would be dropped by diffusers, not by us.
    gen = torch.Generator().manual_seed(1)
    ours, theirs = {}, {}
    modules = [("lora_unet_", n, w) for n, w in lora_modules(unet)]
    modules += [("lora_te_", n, w) for n, w in lora_modules(te, only="encoder.layers.")]
    for i, (prefix, name, weight) in enumerate(modules):
        down, up = kohya_pair(weight, rank=(2, 4, 8)[i % 3], gen=gen)
        path = hf_te_path(name) if prefix == "lora_te_" else name
        # diffusers loads into the installed CLIPTextModel, whose names lack `text_model.` on transformers 5
        # (given `lora_te_text_model_…` it drops the self_attn modules as UNEXPECTED there).
        for tensors, stem in ((ours, prefix + path.replace(".", "_")), (theirs, prefix + name.replace(".", "_"))):
            tensors[stem + ".lora_down.weight"] = down
            tensors[stem + ".lora_up.weight"] = up
            tensors[stem + ".alpha"] = torch.tensor(3.0)
    assert any(w.dim() == 4 and w.shape[-1] == 3 for _, _, w in modules)  # LoCon 3x3
    assert any(n.endswith("proj_in") and w.dim() == 4 for _, n, w in modules)  # SD1 conv 1x1 proj_in
    save_file(ours, str(tmp_path / "kohya.safetensors"), metadata={"ss_base_model_version": "sd_v1"})

    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=te, tokenizer=None, unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.load_lora_weights(theirs)
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    ref_unet, ref_te = clone(unet.state_dict()), clone(te.state_dict())

    summary = merge(tmp_path / "base.safetensors", f"{tmp_path / 'kohya.safetensors'}:0.7", tmp_path / "out.safetensors")
    n_te = sum(1 for p, _, _ in modules if p == "lora_te_")
    assert summary["applied"] == {"unet": len(modules) - n_te, "te1": n_te}
    got_unet, got_te = sd1_back_to_diffusers(load_file(str(tmp_path / "out.safetensors")), ref_te)
    changed = assert_same_weights(got_unet, ref_unet, base_unet) | assert_same_weights(got_te, ref_te, base_te)
    assert len(changed) == len(modules)


# --- 2. SDXL kohya LoRA with SGM names vs diffusers' SGM->diffusers remap + kohya converter -------------


def test_sdxl_kohya_sgm_names_match_diffusers_fuse_lora(tmp_path):
    _need_reference_libraries()
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = tiny_sdxl_unet()
    base = clone(unet.state_dict())
    to_sgm = ldm_unet_names("sdxl", SDXL_CONFIG)
    save_file({to_sgm[k]: v for k, v in base.items()}, str(tmp_path / "base.safetensors"))

    # kohya sdxl_train_network.py trains its own SGM UNet: `lora_unet_input_blocks_4_1_…`,
    # `…_0_in_layers_2`, `…_output_blocks_2_2_conv`, `lora_unet_label_emb_0_0`, ...
    gen = torch.Generator().manual_seed(2)
    lora = {}
    modules = lora_modules(unet)
    for i, (name, weight) in enumerate(modules):
        stem = "lora_unet_" + to_sgm[name + ".weight"][len(UNET) : -len(".weight")].replace(".", "_")
        lora[stem + ".lora_down.weight"], lora[stem + ".lora_up.weight"] = kohya_pair(weight, (2, 4, 8)[i % 3], gen)
        lora[stem + ".alpha"] = torch.tensor(3.0)
    for stem in ("lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_k", "lora_unet_output_blocks_2_2_conv",
                 "lora_unet_input_blocks_4_0_skip_connection", "lora_unet_label_emb_0_0"):
        assert stem + ".alpha" in lora
    save_file(lora, str(tmp_path / "kohya.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})

    # what StableDiffusionXLPipeline.load_lora_weights does for the UNet
    state_dict, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(dict(lora), unet_config=unet.config)
    StableDiffusionXLLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, unet)
    unet.fuse_lora(lora_scale=0.7)
    unet.unload_lora()
    reference = clone(unet.state_dict())

    summary = merge(tmp_path / "base.safetensors", f"{tmp_path / 'kohya.safetensors'}:0.7", tmp_path / "out.safetensors")
    assert summary["applied"] == {"unet": len(modules)}
    ours = convert_ldm_unet_checkpoint(load_file(str(tmp_path / "out.safetensors")), SDXL_CONFIG)
    assert len(assert_same_weights(ours, reference, base)) == len(modules)


# --- 3. diffusers-trained PEFT LoRA (alpha only in metadata) vs peft's merge -----------------------------


def test_sd1_peft_lora_alpha_from_metadata_matches_peft_merge(tmp_path):
    _need_reference_libraries()
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors import safe_open

    unet, te = tiny_sd1()
    base_unet, base_te = clone(unet.state_dict()), clone(te.state_dict())
    write_sd1_checkpoint(tmp_path / "base.safetensors", base_unet, base_te)

    # As diffusers' train_text_to_image_lora.py / train_dreambooth_lora.py: LoraConfig on the UNet (here
    # also conv 1x1 proj_in and 3x3 conv1, with rank/alpha patterns) and on the TE, alpha != r, saved through
    # convert_state_dict_to_diffusers + save_lora_weights. The file has no alpha tensors: lora_alpha lives
    # in the `lora_adapter_metadata` JSON; a baker that ignores it would use scale 1 instead of alpha/r.
    unet_config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="gaussian",
        target_modules=["to_k", "to_q", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.0.proj"],
        rank_pattern={"conv1": 2}, alpha_pattern={"proj_in": 1},
    )
    te_config = LoraConfig(r=8, lora_alpha=4, init_lora_weights="gaussian",
                           target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    unet.add_adapter(unet_config)
    inject_adapter_in_model(te_config, te)  # what transformers' add_adapter does
    randomize_lora_b(unet, seed=3)
    randomize_lora_b(te, seed=4)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "peft"),
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(te)),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
    )
    lora_path = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    with safe_open(str(lora_path), "pt") as f:
        assert not any(k.endswith("alpha") for k in f.keys())
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == 8
        # on transformers >= 5 these read `text_encoder.encoder.layers.…` (no `text_model.`)
        assert any(k.startswith("text_encoder.") and "self_attn.q_proj" in k for k in f.keys())

    # TE at half strength, as a te_strength of 0.5: peft scales the layer before merging
    for module in te.modules():
        if isinstance(module, BaseTunerLayer):
            module.scale_layer(0.5)
    ref_unet, ref_te = peft_merged_state_dict(unet), peft_merged_state_dict(te)

    summary = merge(tmp_path / "base.safetensors", f"{lora_path}:1.0:0.5", tmp_path / "out.safetensors")
    assert summary["applied"]["te1"] == 8 and summary["applied"]["unet"] > 100
    got_unet, got_te = sd1_back_to_diffusers(load_file(str(tmp_path / "out.safetensors")), ref_te)
    changed = assert_same_weights(got_unet, ref_unet, base_unet) | assert_same_weights(got_te, ref_te, base_te)
    assert len(changed) == sum(summary["applied"].values())


# --- 4. Flux: diffusers-named PEFT LoRA into BFL fused qkv / linear1 vs peft's merge, re-fused ----------

H_REAL = 3072  # FLUX.1 hidden size: the real names' row ranges are in these units


def bfl_layout() -> dict[str, list[tuple[int, int, bool, str]]]:
    """BFL key -> [(first row, rows, halves swapped, diffusers key)] in row order, for 2+2 blocks.

    Learnt by running diffusers' BFL->diffusers converter on the real names (real shapes), each row
    tagged with its key and index: the q/k/v/mlp slices and the final-layer scale/shift swap come out.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    real = {
        k[len(UNET) :]: v["shape"]
        for k, v in arch_tensors("flux").items()
        if k.startswith(UNET) and not re.match(r"(double|single)_blocks\.([2-9]|\d\d)\.", k[len(UNET) :])
    }
    names = list(real)
    tagged = {k: torch.arange(s[0], dtype=torch.float64) + i * 1e6 for i, (k, s) in enumerate(real.items())}
    layout: dict[str, list[tuple[int, int, bool, str]]] = {}
    for diffusers_key, value in convert_flux_transformer_checkpoint_to_diffusers(tagged).items():
        index = int(value[0].item() // 1e6)
        rows = (value - index * 1e6).long()
        first, n = int(rows[0]), len(rows)
        swapped = not torch.equal(rows, torch.arange(first, first + n))
        if swapped:
            assert torch.equal(rows, torch.cat([torch.arange(n // 2, n), torch.arange(n // 2)]))
            first = 0
        layout.setdefault(names[index], []).append((first, n, swapped, diffusers_key))
    for key, pieces in layout.items():
        pieces.sort()
        assert [p[0] for p in pieces] == [sum(q[1] for q in pieces[:i]) for i in range(len(pieces))], key
        assert sum(p[1] for p in pieces) == real[key][0], key
    return layout


def to_bfl(state_dict: dict[str, torch.Tensor], layout, hidden: int) -> dict[str, torch.Tensor]:
    """Fuse diffusers tensors into BFL ones (torch.cat in row order; un-swap scale/shift)."""
    out = {}
    for key, pieces in layout.items():
        parts = []
        for _first, n, swapped, diffusers_key in pieces:
            value = state_dict[diffusers_key]
            if len(pieces) > 1:  # a slice of a fused weight: same share of rows as in FLUX.1
                assert value.shape[0] * H_REAL == n * hidden, diffusers_key
            if swapped:
                scale, shift = value.chunk(2)
                value = torch.cat([shift, scale])
            parts.append(value)
        out[key] = torch.cat(parts).contiguous()
    return out


def test_flux_peft_lora_on_fused_slices_matches_peft_merge(tmp_path):
    _need_reference_libraries()
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    model = tiny_flux()
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    layout = bfl_layout()
    base = to_bfl(clone(model.state_dict()), layout, hidden)
    assert base["single_blocks.0.linear1.weight"].shape == (3 * hidden + 4 * hidden, hidden)
    save_file(base, str(tmp_path / "flux1-bfl.safetensors"))  # as BFL ships it: no prefix

    # diffusers train_dreambooth_lora_flux.py / ai-toolkit: separate q/k/v (fused in BFL), proj_mlp (rows
    # 3H.. of linear1), norm_out.linear (scale/shift swapped in BFL); alpha in metadata only.
    config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="gaussian",
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                        "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.2", "norm1.linear",
                        "norm_out.linear", "x_embedder"],
    )
    model.add_adapter(config)
    randomize_lora_b(model, seed=5)
    FluxPipeline.save_lora_weights(
        str(tmp_path / "peft"),
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    model.set_adapters("default", 0.7)  # the strength, as diffusers sets it: scales peft's layers
    reference = to_bfl(peft_merged_state_dict(model), layout, hidden)

    lora_path = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    summary = merge(tmp_path / "flux1-bfl.safetensors", f"{lora_path}:0.7", tmp_path / "out.safetensors")
    ours = load_file(str(tmp_path / "out.safetensors"))
    changed = assert_same_weights(ours, reference, base)
    assert summary["applied"] == {"dit": 37}  # 2 double blocks x 12 + 2 single blocks x 5 + 3 outside
    assert {"double_blocks.1.txt_attn.qkv.weight", "single_blocks.1.linear1.weight",
            "final_layer.adaLN_modulation.1.weight", "img_in.weight"} <= changed
