"""The family registry: families are found by module, declare what the rest of lorabake reads, and every
rule-table entry says which family row sent it where."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import lorabake.arch as arch
from lorabake.arch import FAMILIES, TEXT_ENCODER_KINDS
from lorabake.arch.common import Family
from lorabake.detect import detect_checkpoint
from lorabake.lora_base import structure_rows, virtual_checkpoint
from tests.archfix import arch_tensors
from tests.test_keymap import U, keymap


def test_every_family_module_is_registered_once():
    modules = [m.name for m in pkgutil.iter_modules(arch.__path__) if not m.name.startswith("_") and m.name != "common"]
    declared = {importlib.import_module(f"lorabake.arch.{m}").FAMILY.arch for m in modules}
    assert declared == set(FAMILIES)
    assert len(modules) == len(FAMILIES)


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))
def test_family_declares_what_the_rest_reads(family: Family):
    assert family.layouts and all(lay.probes for lay in family.layouts)
    assert family.metadata_names and family.title and family.modelspec and family.kohya
    assert family.lora_prefixes and family.extract_targets and family.block_groups
    assert family.diffusion in family.kohya_names
    for te in family.text_encoders:
        assert te.lora_prefixes
        assert all(kind in TEXT_ENCODER_KINDS for _, kind in te.roots), te
    namings = {lay.naming for lay in family.layouts}
    for table in family.renames:
        # a table reads the naming of some layout, or the names an earlier table made
        assert table.source in namings | {t.target for t in family.renames}, table.note
        assert table.modules or table.blocks or table.tails


def test_registry_rejects_a_module_without_family(tmp_path, monkeypatch):
    pkg = tmp_path / "fakearch"
    pkg.mkdir()
    (pkg / "broken.py").write_text("X = 1\n")
    monkeypatch.setattr(arch, "__path__", [str(pkg)])
    monkeypatch.setattr(arch, "__name__", "fakearch")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="defines no FAMILY"):
        arch._discover()


# (base, stem, family, table, row fragment): which rule sent the stem to its target
RULE_ROWS = [
    # kohya SD1: diffusers block names, through the SD UNet block table written out for sd1
    ("sd1", "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k", "sd1", "ldm -> diffusers names",
     "output_blocks.5.1 -> up_blocks.1.attentions.2 (output block 5 = 3·level 1 + layer 2)"),
    ("sd1", "lora_unet_down_blocks_1_resnets_0_conv1", "sd1", "ldm -> diffusers names", "input_blocks.4.0"),
    # ComfyUI-style LDM name: the checkpoint's own name
    ("sd1", "diffusion_model.input_blocks.4.1.proj_in", "sd1", "own name", ""),
    # old diffusers attention processors: a table reading the diffusers names the block table made
    ("sd1", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q", "sd1",
     "diffusers -> attnproc names", "*.to_q -> *.processor.to_q"),
    # diffusers Flux: q band of the fused qkv
    ("flux", "transformer.transformer_blocks.3.attn.to_k", "flux", "bfl -> diffusers names",
     "double_blocks.{n}.img_attn.qkv -> transformer_blocks.{n}.attn.to_k [k]"),
    # SD2 OpenCLIP: HF names of the fused in_proj
    ("sd2", "lora_te_text_model_encoder_layers_3_self_attn_v_proj", "sd2", "openclip -> hf names",
     "transformer.resblocks.{n}.attn -> text_model.encoder.layers.{n}.self_attn.v_proj [v]"),
]


@pytest.mark.parametrize("base, stem, family, table, row", RULE_ROWS, ids=[r[1] for r in RULE_ROWS])
def test_every_stem_says_which_rule_sent_it(base, stem, family, table, row):
    km = keymap(base)
    rule = km.rules[stem]
    assert (rule.family, rule.table) == (family, table)
    assert row in rule.row
    assert stem.startswith(rule.prefix)


def test_every_target_has_a_rule():
    for base in ("sd1", "sdxl", "flux", "sd3"):
        km = keymap(base)
        assert km.rules.keys() == km.targets.keys()
    assert keymap("sdxl").rules["lora_unet_input_blocks_4_1_proj_in"].row == ""  # kohya SDXL: own SGM name
    assert keymap("sdxl").targets["lora_unet_input_blocks_4_1_proj_in"].key == U + "input_blocks.4.1.proj_in.weight"


# --- declared structures: the virtual checkpoints a LoRA alone is matched against ------------------------

ROOT = "model.diffusion_model."


def _real(arch_id: str, component: str, root: str) -> dict[str, tuple[int, ...]]:
    return {
        k[len(root) :]: tuple(v["shape"])
        for k, v in arch_tensors(arch_id).items()
        if v["component"] == component and k.startswith(root) and not k.endswith("bias") and "float" in v["dtype"]
    }


@pytest.mark.parametrize("family, variant, keylist", [("sd1", 0, "sd1"), ("sdxl", 0, "sdxl"), ("sd3", 0, "sd3"),
                                                       ("flux", 0, "flux")])
def test_declared_structure_is_the_real_key_list(family, variant, keylist):
    declared = dict(structure_rows(FAMILIES[family].structures[variant]))
    assert declared == _real(keylist, "diffuser", ROOT)


@pytest.mark.parametrize("kind, keylist, component, root", [
    ("clip_l", "sd1", "clip_l", "cond_stage_model.transformer."),
    ("openclip_g", "sdxl", "clip_g", "conditioner.embedders.1.model."),
    ("clip_g", "sd3", "clip_g", "text_encoders.clip_g.transformer."),
    ("t5xxl", "sd3", "t5xxl", "text_encoders.t5xxl.transformer."),
])
def test_text_encoder_structure_is_the_real_key_list(kind, keylist, component, root):
    declared = dict(structure_rows(TEXT_ENCODER_KINDS[kind].structure))
    real = _real(keylist, component, root)
    real.pop("logit_scale", None)  # OpenCLIP's scalar: no module
    assert declared == real


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))
def test_virtual_checkpoint_is_detected_as_its_family(family: Family):
    assert family.structures
    for variant in range(len(family.structures)):
        header = virtual_checkpoint(family, variant)
        got = detect_checkpoint(header)
        assert (got.arch, got.layout) == (family.arch, family.layouts[0].layout)
        assert {te.component for te in family.text_encoders} <= set(got.components)
