"""Cosmos Predict2 (NVIDIA) and Anima, which builds on it: the MiniTrainDIT, stored under `net.` in NVIDIA's files.

Anima's DiT file carries the same blocks (plus its LLM adapter, taken by its own names); its Qwen3 text
encoder is a separate file, so `lora_te_` modules of an Anima LoRA have no target in a DiT base.
"""

from lorabake.arch.common import DIT_LORA_PREFIXES, Alias, BlockGroup, Family, Layout, Probe, Renames

_T = "transformer_blocks.{n}."

# NVIDIA module -> diffusers CosmosTransformer3DModel module, as diffusers loaders/single_file_utils.py
# convert_cosmos_transformer_checkpoint_to_diffusers renames them (its Cosmos 2.0 table).
_BLOCK = {
    "self_attn.q_proj": "attn1.to_q",
    "self_attn.k_proj": "attn1.to_k",
    "self_attn.v_proj": "attn1.to_v",
    "self_attn.output_proj": "attn1.to_out.0",
    "self_attn.q_norm": "attn1.norm_q",
    "self_attn.k_norm": "attn1.norm_k",
    "cross_attn.q_proj": "attn2.to_q",
    "cross_attn.k_proj": "attn2.to_k",
    "cross_attn.v_proj": "attn2.to_v",
    "cross_attn.output_proj": "attn2.to_out.0",
    "cross_attn.q_norm": "attn2.norm_q",
    "cross_attn.k_norm": "attn2.norm_k",
    "mlp.layer1": "ff.net.0.proj",
    "mlp.layer2": "ff.net.2",
    "adaln_modulation_self_attn.1": "norm1.linear_1",
    "adaln_modulation_self_attn.2": "norm1.linear_2",
    "adaln_modulation_cross_attn.1": "norm2.linear_1",
    "adaln_modulation_cross_attn.2": "norm2.linear_2",
    "adaln_modulation_mlp.1": "norm3.linear_1",
    "adaln_modulation_mlp.2": "norm3.linear_2",
}
COSMOS_TO_DIFFUSERS: dict[str, tuple[Alias, ...]] = {
    **{f"blocks.{{n}}.{k}": (Alias(_T + v),) for k, v in _BLOCK.items()},
    "x_embedder.proj.1": (Alias("patch_embed.proj"),),
    "t_embedder.1.linear_1": (Alias("time_embed.t_embedder.linear_1"),),
    "t_embedder.1.linear_2": (Alias("time_embed.t_embedder.linear_2"),),
    "t_embedding_norm": (Alias("time_embed.norm"),),
    "final_layer.adaln_modulation.1": (Alias("norm_out.linear_1"),),
    "final_layer.adaln_modulation.2": (Alias("norm_out.linear_2"),),
    "final_layer.linear": (Alias("proj_out"),),
}

# ComfyUI's sentinel for Predict2 (comfy/model_detection.py) and the patch embedding.
_PROBES = (Probe("blocks.0.mlp.layer1.weight"), Probe("x_embedder.proj.1.weight"))
_DIFFUSERS = (Probe("transformer_blocks.0.ff.net.0.proj.weight"), Probe("patch_embed.proj.weight"))

# kohya sd-scripts networks/lora_anima.py / musubi: the blocks' attention and MLP linears.
_EXTRACT_TARGETS = tuple(
    f"{a}.{m}.weight" for a in ("self_attn", "cross_attn") for m in ("q_proj", "k_proj", "v_proj", "output_proj")
) + ("mlp.layer1.weight", "mlp.layer2.weight")

# Every weight under the bare layout (scripts/family_structure.py on tests/data/arch/cosmos-predict2-2b-t2i.json).
_PREDICT2_2B = """\
blocks.{0-27}.adaln_modulation_cross_attn.1.weight 256x2048
blocks.{0-27}.adaln_modulation_cross_attn.2.weight 6144x256
blocks.{0-27}.adaln_modulation_mlp.1.weight 256x2048
blocks.{0-27}.adaln_modulation_mlp.2.weight 6144x256
blocks.{0-27}.adaln_modulation_self_attn.1.weight 256x2048
blocks.{0-27}.adaln_modulation_self_attn.2.weight 6144x256
blocks.{0-27}.cross_attn.k_norm.weight 128
blocks.{0-27}.cross_attn.k_proj.weight 2048x1024
blocks.{0-27}.cross_attn.output_proj.weight 2048x2048
blocks.{0-27}.cross_attn.q_norm.weight 128
blocks.{0-27}.cross_attn.q_proj.weight 2048x2048
blocks.{0-27}.cross_attn.v_proj.weight 2048x1024
blocks.{0-27}.mlp.layer1.weight 8192x2048
blocks.{0-27}.mlp.layer2.weight 2048x8192
blocks.{0-27}.self_attn.k_norm.weight 128
blocks.{0-27}.self_attn.k_proj.weight 2048x2048
blocks.{0-27}.self_attn.output_proj.weight 2048x2048
blocks.{0-27}.self_attn.q_norm.weight 128
blocks.{0-27}.self_attn.q_proj.weight 2048x2048
blocks.{0-27}.self_attn.v_proj.weight 2048x2048
final_layer.adaln_modulation.1.weight 256x2048
final_layer.adaln_modulation.2.weight 4096x256
final_layer.linear.weight 64x2048
t_embedder.1.linear_1.weight 2048x2048
t_embedder.1.linear_2.weight 6144x2048
t_embedding_norm.weight 2048
x_embedder.proj.1.weight 2048x68
"""

FAMILY = Family(
    arch="cosmos",
    title="Cosmos Predict2 / Anima",
    modelspec="cosmos-predict2",
    kohya="cosmos",
    metadata_names=("cosmos", "anima"),
    diffusion="dit",
    diffusion_kind="cosmos",
    layouts=(
        Layout("dit-only", "", "cosmos", _PROBES),
        Layout("nvidia", "net.", "cosmos", _PROBES),  # NVIDIA's files
        Layout("comfyui", "model.diffusion_model.", "cosmos", _PROBES),
        Layout("diffusers", "transformer.", "diffusers", _DIFFUSERS),
        Layout("diffusers", "", "diffusers", _DIFFUSERS),
    ),
    text_encoders=(),
    kohya_names={"dit": ("lora_unet_", "cosmos")},
    renames=(Renames("cosmos", "diffusers", modules=COSMOS_TO_DIFFUSERS, note="NVIDIA checkpoint -> diffusers"),),
    lora_prefixes=DIT_LORA_PREFIXES,
    extract_targets=_EXTRACT_TARGETS,
    quant_keep=("final_layer.",),
    block_groups=(BlockGroup("block{n}", "blocks.{n}."),),
    implementation="https://github.com/nvidia-cosmos/cosmos-predict2",
    structures=(_PREDICT2_2B,),
    order=240,
)
