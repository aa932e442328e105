"""HiDream-I1 (Full, Dev, Fast): a MoE DiT whose single files use diffusers' module names.

The original file carries `model.diffusion_model.` (diffusers loaders/single_file_utils.py
convert_hidream_transformer_to_diffusers only strips it); bare files are accepted too. The image
feed-forward is a mixture of experts: `ff_i.experts.M.w1/w2/w3`, `ff_i.shared_experts.*` and the router
`ff_i.gate` (kept in high precision by GGUF tools). LoRAs: diffusers/SimpleTuner `transformer.`,
ai-toolkit/ComfyUI `diffusion_model.`, SimpleTuner LyCORIS `lycoris_`, kohya `lora_unet_`.
"""

from lorabake.arch.common import DIT_LORA_PREFIXES, BlockGroup, Family, Layout, Probe

_PROBES = (Probe("caption_projection.0.linear.weight"), Probe("double_stream_blocks.0.block.ff_i.gate.weight"))

_EXTRACT_TARGETS = (
    *(f"attn1.{p}.weight" for p in ("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t")),
    *(f"w{i}.weight" for i in (1, 2, 3)),  # experts, shared experts and ff_t
)

FAMILY = Family(
    arch="hidream",
    title="HiDream-I1",
    modelspec="hidream-i1",
    kohya="hidream",
    metadata_names=("hidream",),
    diffusion="dit",
    diffusion_kind="hidream",
    layouts=(
        Layout("comfyui", "model.diffusion_model.", "diffusers", _PROBES),
        Layout("diffusers", "transformer.", "diffusers", _PROBES),
        Layout("native", "", "diffusers", _PROBES),
    ),
    text_encoders=(),
    kohya_names={"dit": ("lora_unet_", "diffusers")},
    lora_prefixes=DIT_LORA_PREFIXES,
    extract_targets=_EXTRACT_TARGETS,
    block_groups=(
        BlockGroup("double{n}", "double_stream_blocks.{n}."),
        BlockGroup("single{n}", "single_stream_blocks.{n}."),
    ),
    implementation="https://github.com/HiDream-ai/HiDream-I1",
    order=63,
)
