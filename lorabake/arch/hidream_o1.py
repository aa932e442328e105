"""HiDream-O1-Image: a pixel-space DiT that is a Qwen3-VL-8B decoder with patch embed/unembed shims.

The released file keeps the Qwen3-VL names under `model.`: `model.language_model.layers.N.self_attn.q_proj`,
`model.language_model.layers.N.mlp.gate_proj`, `model.visual.*` (the vision tower, for reference images),
and the shims `model.x_embedder.proj1/proj2` (32x32 RGB patch -> 1024 -> 4096), `model.t_embedder1.mlp.0/2`,
`model.final_layer2.linear` (4096 -> 3072 pixels); `lm_head.weight` sits outside (ComfyUI
comfy/ldm/hidream_o1/model.py builds `language_model`, `visual`, `t_embedder1`, `x_embedder`, `final_layer2`).
LoRAs name the same modules with the file's own `model.` prefix (the trainers' HiDream-O1 LoRA layers
target the decoder's attention and MLP linears and the shims), or under the usual DiT prefixes.
"""

from lorabake.arch.common import DIT_LORA_PREFIXES, BlockGroup, Family, Layout, Probe

# the decoder, the timestep embedder of the `<|tms|>` token and the pixel output: none of them in HiDream-I1
# or in a plain Qwen3-VL
_PROBES = (
    Probe("language_model.layers.0.self_attn.q_proj.weight"),
    Probe("t_embedder1.mlp.0.weight"),
    Probe("final_layer2.linear.weight"),
)

_EXTRACT_TARGETS = (
    *(f"self_attn.{p}_proj.weight" for p in "qkvo"),
    *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    "x_embedder.proj1.weight",
    "x_embedder.proj2.weight",
    "final_layer2.linear.weight",
)

# HiDream-O1-Image: Qwen3-VL-8B decoder (36 layers, width 4096, 32 heads / 8 kv heads of 128, MLP 12288) and
# the shims, sizes from ComfyUI's HiDreamO1TextConfig and the shims' constructors. The vision tower
# (`visual.*`) is left out: no trainer targets it.
_STRUCTURE = """\
language_model.embed_tokens.weight 151936x4096
language_model.layers.{0-35}.self_attn.q_proj.weight 4096x4096
language_model.layers.{0-35}.self_attn.k_proj.weight 1024x4096
language_model.layers.{0-35}.self_attn.v_proj.weight 1024x4096
language_model.layers.{0-35}.self_attn.o_proj.weight 4096x4096
language_model.layers.{0-35}.self_attn.q_norm.weight 128
language_model.layers.{0-35}.self_attn.k_norm.weight 128
language_model.layers.{0-35}.mlp.gate_proj.weight 12288x4096
language_model.layers.{0-35}.mlp.up_proj.weight 12288x4096
language_model.layers.{0-35}.mlp.down_proj.weight 4096x12288
language_model.layers.{0-35}.input_layernorm.weight 4096
language_model.layers.{0-35}.post_attention_layernorm.weight 4096
language_model.norm.weight 4096
x_embedder.proj1.weight 1024x3072
x_embedder.proj2.weight 4096x1024
t_embedder1.mlp.0.weight 4096x256
t_embedder1.mlp.2.weight 4096x4096
final_layer2.linear.weight 3072x4096"""

FAMILY = Family(
    arch="hidream-o1",
    title="HiDream-O1-Image",
    modelspec="hidream-o1-image",
    kohya="hidream_o1",
    metadata_names=("hidream-o1", "hidream_o1"),
    diffusion="dit",
    diffusion_kind="hidream-o1",
    layouts=(
        Layout("comfyui", "model.diffusion_model.", "native", _PROBES),
        Layout("native", "model.", "native", _PROBES),  # as released
        Layout("native", "", "native", _PROBES),
    ),
    text_encoders=(),  # the Qwen3-VL decoder is the diffusion model itself; ComfyUI's text encoder only tokenizes
    kohya_names={"dit": ("lora_unet_", "native")},
    lora_prefixes=(*DIT_LORA_PREFIXES, "model."),
    extract_targets=_EXTRACT_TARGETS,
    quant_keep=("x_embedder.", "t_embedder1.", "final_layer2."),
    block_groups=(BlockGroup("layer{n}", "language_model.layers.{n}."),),
    implementation="https://github.com/HiDream-ai",
    order=65,
    structures=(_STRUCTURE,),
)
