"""The 2025-2026 image families for tests: diffusers models, their native (single-file) names, oracles.

For each family: the diffusers class, the config of the published model (full size) and a tiny config
with the same block structure, and `to_native`, which turns a diffusers state dict into the layout users
download (BFL names, fused q|k|v, flat modulation, ...). `to_native` is the inverse of diffusers' own
single-file converter (`diffusers/loaders/single_file_utils.py`): `check_native` runs that converter on
the result and demands the diffusers state dict back, names, shapes and (for real tensors) bits.

Two converters hard-code full-size widths: Chroma's splits `single_blocks.N.linear1` at
`inner_dim = 3072` and Lumina 2's splits `attention.qkv` at (2304, 768, 768). Their tiny models are checked
through the converter by names only at full size (on the meta device, `test_family_keys.py`); at tiny
size `to_native` cuts bands from the model's own shapes and the bit-for-bit check compares the bands.

`python -m tests.famfix` rewrites tests/data/arch/<family>.json.gz from the full-size configs.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH_DIR = os.path.join(ROOT, "tests", "data", "arch")

Tensors = dict[str, torch.Tensor]


# --- diffusers -> native, per family ----------------------------------------------------------------------


def _rename(sd: Tensors, rules: list[tuple[str, str]]) -> Tensors:
    """Apply the first matching (regex, replacement) to each key; keys no rule matches stay."""
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def _fuse(sd: Tensors, groups: list[tuple[str, tuple[str, ...], str]]) -> Tensors:
    """Concatenate along rows: (regex with a group for the block, part templates, fused template).

    `groups` entries: (pattern matching the first part with `(?P<p>...)`, the parts' names built from
    `p`, the fused name built from `p`). Parts are removed, the fused tensor is added in their place.
    """
    out = dict(sd)
    for pattern, parts, fused in groups:
        for key in list(out):
            m = re.fullmatch(pattern, key)
            if m is None:
                continue
            p = m.group("p")
            names = [t.format(p=p) for t in parts]
            out[fused.format(p=p)] = torch.cat([out.pop(n) for n in names], dim=0)
    return out


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def flux2_to_native(sd: Tensors) -> Tensors:
    sd = dict(sd)
    sd["final_layer.adaLN_modulation.1.weight"] = _swap_halves(sd.pop("norm_out.linear.weight"))
    sd = _fuse(
        sd,
        [
            (r"(?P<p>transformer_blocks\.\d+)\.attn\.to_q\.weight",
             ("{p}.attn.to_q.weight", "{p}.attn.to_k.weight", "{p}.attn.to_v.weight"), "{p}.img_qkv"),
            (r"(?P<p>transformer_blocks\.\d+)\.attn\.add_q_proj\.weight",
             ("{p}.attn.add_q_proj.weight", "{p}.attn.add_k_proj.weight", "{p}.attn.add_v_proj.weight"),
             "{p}.txt_qkv"),
        ],
    )
    return _rename(
        sd,
        [
            (r"^transformer_blocks\.(\d+)\.img_qkv$", r"double_blocks.\1.img_attn.qkv.weight"),
            (r"^transformer_blocks\.(\d+)\.txt_qkv$", r"double_blocks.\1.txt_attn.qkv.weight"),
            (r"^transformer_blocks\.(\d+)\.attn\.norm_q\.weight$", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
            (r"^transformer_blocks\.(\d+)\.attn\.norm_k\.weight$", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
            (r"^transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight$",
             r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
            (r"^transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight$",
             r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
            (r"^transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"double_blocks.\1.img_attn.proj."),
            (r"^transformer_blocks\.(\d+)\.attn\.to_add_out\.", r"double_blocks.\1.txt_attn.proj."),
            (r"^transformer_blocks\.(\d+)\.ff\.linear_in\.", r"double_blocks.\1.img_mlp.0."),
            (r"^transformer_blocks\.(\d+)\.ff\.linear_out\.", r"double_blocks.\1.img_mlp.2."),
            (r"^transformer_blocks\.(\d+)\.ff_context\.linear_in\.", r"double_blocks.\1.txt_mlp.0."),
            (r"^transformer_blocks\.(\d+)\.ff_context\.linear_out\.", r"double_blocks.\1.txt_mlp.2."),
            (r"^single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj\.", r"single_blocks.\1.linear1."),
            (r"^single_transformer_blocks\.(\d+)\.attn\.to_out\.", r"single_blocks.\1.linear2."),
            (r"^single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight$", r"single_blocks.\1.norm.query_norm.scale"),
            (r"^single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight$", r"single_blocks.\1.norm.key_norm.scale"),
            (r"^x_embedder\.", "img_in."),
            (r"^context_embedder\.", "txt_in."),
            (r"^time_guidance_embed\.timestep_embedder\.linear_1\.", "time_in.in_layer."),
            (r"^time_guidance_embed\.timestep_embedder\.linear_2\.", "time_in.out_layer."),
            (r"^time_guidance_embed\.guidance_embedder\.linear_1\.", "guidance_in.in_layer."),
            (r"^time_guidance_embed\.guidance_embedder\.linear_2\.", "guidance_in.out_layer."),
            (r"^(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear\.",
             r"\1.lin."),
            (r"^proj_out\.", "final_layer.linear."),
        ],
    )


def chroma_to_native(sd: Tensors) -> Tensors:
    sd = _fuse(
        sd,
        [
            (rf"(?P<p>transformer_blocks\.\d+)\.attn\.to_q\.{param}",
             tuple(f"{{p}}.attn.to_{x}.{param}" for x in "qkv"), f"{{p}}.img_qkv.{param}")
            for param in ("weight", "bias")
        ]
        + [
            (rf"(?P<p>transformer_blocks\.\d+)\.attn\.add_q_proj\.{param}",
             tuple(f"{{p}}.attn.add_{x}_proj.{param}" for x in "qkv"), f"{{p}}.txt_qkv.{param}")
            for param in ("weight", "bias")
        ]
        + [
            (rf"(?P<p>single_transformer_blocks\.\d+)\.attn\.to_q\.{param}",
             (*(f"{{p}}.attn.to_{x}.{param}" for x in "qkv"), f"{{p}}.proj_mlp.{param}"),
             f"{{p}}.linear1.{param}")
            for param in ("weight", "bias")
        ],
    )
    return _rename(
        sd,
        [
            (r"^transformer_blocks\.(\d+)\.img_qkv\.", r"double_blocks.\1.img_attn.qkv."),
            (r"^transformer_blocks\.(\d+)\.txt_qkv\.", r"double_blocks.\1.txt_attn.qkv."),
            (r"^transformer_blocks\.(\d+)\.attn\.norm_q\.weight$", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
            (r"^transformer_blocks\.(\d+)\.attn\.norm_k\.weight$", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
            (r"^transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight$",
             r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
            (r"^transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight$",
             r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
            (r"^transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"double_blocks.\1.img_attn.proj."),
            (r"^transformer_blocks\.(\d+)\.attn\.to_add_out\.", r"double_blocks.\1.txt_attn.proj."),
            (r"^transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"double_blocks.\1.img_mlp.0."),
            (r"^transformer_blocks\.(\d+)\.ff\.net\.2\.", r"double_blocks.\1.img_mlp.2."),
            (r"^transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.", r"double_blocks.\1.txt_mlp.0."),
            (r"^transformer_blocks\.(\d+)\.ff_context\.net\.2\.", r"double_blocks.\1.txt_mlp.2."),
            (r"^single_transformer_blocks\.(\d+)\.linear1\.", r"single_blocks.\1.linear1."),
            (r"^single_transformer_blocks\.(\d+)\.proj_out\.", r"single_blocks.\1.linear2."),
            (r"^single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight$", r"single_blocks.\1.norm.query_norm.scale"),
            (r"^single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight$", r"single_blocks.\1.norm.key_norm.scale"),
            (r"^distilled_guidance_layer\.layers\.(\d+)\.linear_1\.", r"distilled_guidance_layer.layers.\1.in_layer."),
            (r"^distilled_guidance_layer\.layers\.(\d+)\.linear_2\.", r"distilled_guidance_layer.layers.\1.out_layer."),
            (r"^distilled_guidance_layer\.norms\.(\d+)\.weight$", r"distilled_guidance_layer.norms.\1.scale"),
            (r"^x_embedder\.", "img_in."),
            (r"^context_embedder\.", "txt_in."),
            (r"^proj_out\.", "final_layer.linear."),
        ],
    )


def _refiner_qkv(sd: Tensors, attn: str) -> Tensors:
    return _fuse(
        sd,
        [(rf"(?P<p>(?:layers|noise_refiner|context_refiner)\.\d+)\.{attn}\.to_q\.weight",
          tuple(f"{{p}}.{attn}.to_{x}.weight" for x in "qkv"), "{p}.attention.qkv.weight")],
    )


def z_image_to_native(sd: Tensors) -> Tensors:
    sd = _refiner_qkv(sd, "attention")
    return _rename(
        sd,
        [
            (r"^all_final_layer\.2-1\.", "final_layer."),
            (r"^all_x_embedder\.2-1\.", "x_embedder."),
            (r"\.attention\.to_out\.0\.", ".attention.out."),
            (r"\.attention\.norm_q\.weight$", ".attention.q_norm.weight"),
            (r"\.attention\.norm_k\.weight$", ".attention.k_norm.weight"),
        ],
    )


def lumina2_to_native(sd: Tensors) -> Tensors:
    sd = _refiner_qkv(sd, "attn")
    return _rename(
        sd,
        [
            (r"^time_caption_embed\.caption_embedder\.", "cap_embedder."),
            (r"^time_caption_embed\.timestep_embedder\.linear_1\.", "t_embedder.mlp.0."),
            (r"^time_caption_embed\.timestep_embedder\.linear_2\.", "t_embedder.mlp.2."),
            (r"^norm_out\.linear_1\.", "final_layer.adaLN_modulation.1."),
            (r"^norm_out\.linear_2\.", "final_layer.linear."),
            (r"\.attn\.to_out\.0\.", ".attention.out."),
            (r"\.attn\.norm_q\.weight$", ".attention.q_norm.weight"),
            (r"\.attn\.norm_k\.weight$", ".attention.k_norm.weight"),
            (r"\.feed_forward\.linear_(\d)\.", r".feed_forward.w\1."),
            (r"\.norm1\.linear\.", ".adaLN_modulation.1."),
            (r"^((?:layers|noise_refiner)\.\d+)\.norm1\.norm\.", r"\1.attention_norm1."),
            (r"^(context_refiner\.\d+)\.norm1\.", r"\1.attention_norm1."),
            (r"\.norm2\.", ".attention_norm2."),
        ],
    )


def qwen_image21_to_native(sd: Tensors) -> Tensors:
    return _fuse(
        sd,
        [(r"(?P<p>transformer_blocks\.\d+\.img_mlp)\.gate_layer\.weight",
          ("{p}.gate_layer.weight", "{p}.proj.weight"), "{p}.gate_up.weight")],
    )


def krea2_to_native(sd: Tensors) -> Tensors:
    out = {}
    for key, value in sd.items():
        if key.startswith("transformer_blocks.") and key.endswith(".scale_shift_table"):
            value = value.reshape(-1)  # the original stores the six modulation vectors flat
        out[key] = value
    return _rename(
        out,
        [
            (r"^img_in\.", "first."),
            (r"^time_embed\.linear_1\.", "tmlp.0."),
            (r"^time_embed\.linear_2\.", "tmlp.2."),
            (r"^time_mod_proj\.", "tproj.1."),
            (r"^txt_in\.norm\.weight$", "txtmlp.0.scale"),
            (r"^txt_in\.linear_1\.", "txtmlp.1."),
            (r"^txt_in\.linear_2\.", "txtmlp.3."),
            (r"^final_layer\.linear\.", "last.linear."),
            (r"^final_layer\.norm\.weight$", "last.norm.scale"),
            (r"^final_layer\.scale_shift_table$", "last.modulation.lin"),
        ],
    )


def _krea2_blocks(sd: Tensors) -> Tensors:
    rules = [
        (r"\.attn\.to_q\.", ".attn.wq."),
        (r"\.attn\.to_k\.", ".attn.wk."),
        (r"\.attn\.to_v\.", ".attn.wv."),
        (r"\.attn\.to_out\.0\.", ".attn.wo."),
        (r"\.attn\.to_gate\.", ".attn.gate."),
        (r"\.attn\.norm_q\.weight$", ".attn.qknorm.qnorm.scale"),
        (r"\.attn\.norm_k\.weight$", ".attn.qknorm.knorm.scale"),
        (r"\.ff\.", ".mlp."),
        (r"\.norm1\.weight$", ".prenorm.scale"),
        (r"\.norm2\.weight$", ".postnorm.scale"),
        (r"\.scale_shift_table$", ".mod.lin"),
    ]
    out = {}
    for key, value in sd.items():
        if key.startswith(("transformer_blocks.", "text_fusion.")):
            for pattern, repl in rules:
                key = re.sub(pattern, repl, key)
            key = re.sub(r"^transformer_blocks\.", "blocks.", key)
            key = re.sub(r"^text_fusion\.", "txtfusion.", key)
        out[key] = value
    return out


def krea2_full_to_native(sd: Tensors) -> Tensors:
    return _krea2_blocks(krea2_to_native(sd))


def identity(sd: Tensors) -> Tensors:
    return dict(sd)


# --- the families -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fam:
    name: str  # fixture file stem: tests/data/arch/<name>.json.gz
    cls: str  # diffusers model class
    full: dict  # config of the published model
    tiny: dict  # same block structure, small widths
    converter: str | None  # diffusers.loaders.single_file_utils function; None = identity
    to_native: Callable[[Tensors], Tensors]
    source: str
    # converter constants that are full-size widths: the tiny round trip compares bands instead
    hard_coded_widths: str = ""
    variants: dict = field(default_factory=dict)

    def model(self, *, full: bool = False, seed: int = 0):
        import diffusers

        cls = getattr(diffusers, self.cls)
        if full:
            with torch.device("meta"):
                return cls(**self.full)
        torch.manual_seed(seed)
        return cls(**self.tiny)

    def convert(self, native: Tensors) -> Tensors:
        if self.converter is None:
            return dict(native)
        from diffusers.loaders import single_file_utils

        return getattr(single_file_utils, self.converter)(dict(native))


FAMILIES: dict[str, Fam] = {
    f.name: f
    for f in (
        Fam(
            "flux2",
            "Flux2Transformer2DModel",
            full={},  # diffusers' defaults are FLUX.2-dev's transformer config
            tiny=dict(in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                      joint_attention_dim=16, timestep_guidance_channels=8, axes_dims_rope=(2, 2, 2, 2)),
            converter="convert_flux2_transformer_checkpoint_to_diffusers",
            to_native=flux2_to_native,
            source="FLUX.2-dev transformer (diffusers 0.42.1 Flux2Transformer2DModel defaults), BFL names",
        ),
        Fam(
            "qwen-image",
            "QwenImageTransformer2DModel",
            full={},  # Qwen/Qwen-Image transformer config = diffusers' defaults
            tiny=dict(in_channels=8, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                      joint_attention_dim=16, axes_dims_rope=(2, 2, 4)),
            converter=None,  # diffusers' single-file mapping for Qwen-Image is the identity
            to_native=identity,
            source="Qwen-Image transformer (diffusers 0.42.1 QwenImageTransformer2DModel defaults); native = diffusers names",
        ),
        Fam(
            "qwen-image-2.1",
            "QwenImage21Transformer2DModel",
            full={},
            tiny=dict(in_channels=8, out_channels=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                      context_in_dim=16, axes_dims_rope=(2, 2, 4)),
            converter="convert_qwen_image21_transformer_checkpoint_to_diffusers",
            to_native=qwen_image21_to_native,
            source="Qwen-Image 2.1 transformer (diffusers 0.42.1 QwenImage21Transformer2DModel defaults); img_mlp.gate_up fused",
        ),
        Fam(
            "z-image",
            "ZImageTransformer2DModel",
            full={},  # Tongyi-MAI/Z-Image-Turbo transformer config = diffusers' defaults
            tiny=dict(in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                      axes_dims=[4, 6, 6], axes_lens=[16, 16, 16]),
            converter="convert_z_image_transformer_checkpoint_to_diffusers",
            to_native=z_image_to_native,
            source="Z-Image-Turbo transformer (diffusers 0.42.1 ZImageTransformer2DModel defaults), original names",
        ),
        Fam(
            "lumina2",
            "Lumina2Transformer2DModel",
            full=dict(cap_feat_dim=2304),  # Alpha-VLLM/Lumina-Image-2.0: Gemma-2-2B captions (2304 wide)
            tiny=dict(sample_size=8, in_channels=4, hidden_size=48, num_layers=2, num_refiner_layers=1,
                      num_attention_heads=6, num_kv_heads=2, multiple_of=16, cap_feat_dim=16,
                      axes_dim_rope=(2, 2, 4), axes_lens=(16, 16, 16)),
            converter="convert_lumina2_to_diffusers",
            to_native=lumina2_to_native,
            source="Lumina-Image-2.0 transformer (diffusers 0.42.1 Lumina2Transformer2DModel defaults, cap_feat_dim 2304), original names",
            hard_coded_widths="convert_lumina2_to_diffusers splits attention.qkv at (2304, 768, 768)",
        ),
        Fam(
            "chroma",
            "ChromaTransformer2DModel",
            full={},  # lodestones/Chroma1-HD transformer config = diffusers' defaults
            tiny=dict(in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                      joint_attention_dim=16, axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
                      approximator_hidden_dim=16, approximator_layers=2),
            converter="convert_chroma_transformer_checkpoint_to_diffusers",
            to_native=chroma_to_native,
            source="Chroma1-HD transformer (diffusers 0.42.1 ChromaTransformer2DModel defaults), BFL names",
            hard_coded_widths="convert_chroma_transformer_checkpoint_to_diffusers splits linear1 at inner_dim = 3072",
        ),
        Fam(
            "hidream",
            "HiDreamImageTransformer2DModel",
            # HiDream-ai/HiDream-I1 transformer config (diffusers' conversion script)
            full=dict(patch_size=2, in_channels=16, caption_channels=[4096, 4096], axes_dims_rope=(64, 32, 32),
                      llama_layers=list(range(48))),
            tiny=dict(patch_size=2, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                      num_attention_heads=2, caption_channels=[8, 8], text_emb_dim=8, num_routed_experts=2,
                      num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16),
                      llama_layers=[0, 1], force_inference_output=True),
            converter="convert_hidream_transformer_to_diffusers",
            to_native=identity,
            source="HiDream-I1 transformer (HiDream-ai/HiDream-I1 config); native = diffusers names",
        ),
        Fam(
            "krea2",
            "Krea2Transformer2DModel",
            full={},  # krea/Krea-2-Raw transformer config = diffusers' defaults
            tiny=dict(in_channels=8, num_layers=2, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3,
                      text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=24,
                      num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(2, 2, 4)),
            converter="convert_krea2_transformer_checkpoint_to_diffusers",
            to_native=krea2_full_to_native,
            source="Krea 2 transformer (diffusers 0.42.1 Krea2Transformer2DModel defaults), original names",
        ),
    )
}


# --- checks -----------------------------------------------------------------------------------------------


def check_native(fam: Fam, sd: Tensors, native: Tensors | None = None) -> Tensors:
    """Assert diffusers' converter turns the native layout back into `sd` (names, shapes, values).

    With full-width constants in the converter (Chroma, Lumina 2), only a full-size (meta) state dict goes
    through it; a tiny one is checked by cutting each fused tensor back by the model's own shapes.
    """
    native = fam.to_native(sd) if native is None else native
    meta = next(iter(sd.values())).is_meta
    if fam.hard_coded_widths and not meta:
        back = _unfuse_by_shapes(native, sd, fam)
    else:
        back = fam.convert(dict(native))
    assert set(back) == set(sd), (sorted(set(back) ^ set(sd)))[:8]
    for key, value in sd.items():
        assert back[key].shape == value.shape, key
        if not meta:
            assert torch.equal(back[key], value), key
    return native


def row_sources(fam: Fam, sd: Tensors) -> dict[str, list[tuple[str, int, int, int]]]:
    """native key -> [(diffusers key, first native row, rows, first diffusers row)], in row order.

    Learnt by tagging every row of every diffusers tensor with (owner, row) and running `to_native` on the
    tags; works for renames, row concatenation and row permutation (swapped halves).
    """
    keys = [k for k, v in sd.items() if v.dim()]
    tagged = {
        k: (torch.arange(sd[k].shape[0], dtype=torch.float64) + i * 1e6)
        .reshape(-1, *([1] * (sd[k].dim() - 1)))
        .expand(sd[k].shape)
        for i, k in enumerate(keys)
    }
    out: dict[str, list[tuple[str, int, int, int]]] = {}
    for nkey, tag in fam.to_native(tagged).items():
        column = tag.reshape(tag.shape[0], -1)[:, 0].tolist() if tag.shape[0] == sd_rows(tag) else None
        if column is None:  # reshaped (flattened) tensor: one piece, the whole tensor
            owner = int(tag.reshape(-1)[0].item() // 1e6)
            out[nkey] = [(keys[owner], 0, tag.shape[0], 0)]
            continue
        pieces, start = [], 0
        while start < len(column):
            owner, first = divmod(int(column[start]), 1_000_000)
            stop = start + 1
            while stop < len(column) and int(column[stop]) == int(column[start]) + (stop - start):
                stop += 1
            pieces.append((keys[owner], start, stop - start, first))
            start = stop
        out[nkey] = pieces
    return out


def sd_rows(tag: torch.Tensor) -> int:
    """Rows of a tagged native tensor whose rows are whole diffusers rows (not a flattened table)."""
    flat = tag.reshape(tag.shape[0], -1)
    return tag.shape[0] if bool((flat == flat[:, :1]).all()) else -1


def _unfuse_by_shapes(native: Tensors, sd: Tensors, fam: Fam) -> Tensors:
    """diffusers state dict from `native`, bands cut at the widths `sd` has (the converters' constants
    replaced by the tiny model's own widths; renames and bands learnt from `to_native` by `row_sources`)."""
    back: Tensors = {}
    for nkey, pieces in row_sources(fam, sd).items():
        for dkey, start, n, first in pieces:
            part = native[nkey][start : start + n]
            if dkey not in back:
                back[dkey] = torch.empty_like(sd[dkey])
            back[dkey][first : first + n] = part.reshape(n, *sd[dkey].shape[1:])
    return back


# --- fixture files ----------------------------------------------------------------------------------------


def fixture_path(name: str) -> str:
    return os.path.join(ARCH_DIR, f"{name}.json.gz")


def write_fixture(fam: Fam) -> dict:
    model = fam.model(full=True)
    sd = model.state_dict()
    native = check_native(fam, sd)
    doc = {
        "identifier": fam.name,
        "source": fam.source,
        "components": {"diffuser": len(native)},
        "tensors": {
            k: {"component": "diffuser", "shape": list(v.shape), "dtype": "bfloat16"} for k, v in sorted(native.items())
        },
    }
    head = json.dumps({k: v for k, v in doc.items() if k != "tensors"})[:-1]
    rows = ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in doc["tensors"].items())
    text = f'{head}, "tensors": {{\n{rows}\n}}}}\n'  # one tensor per line, as the other key lists
    with open(fixture_path(fam.name), "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
        fh.write(text.encode())  # mtime 0: the same bytes on every run
    return doc


def read_fixture(name: str) -> dict:
    with gzip.open(fixture_path(name), "rt", encoding="utf-8") as fh:
        return json.load(fh)


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:] or FAMILIES:
        doc = write_fixture(FAMILIES[name])
        print(name, len(doc["tensors"]), "tensors")
