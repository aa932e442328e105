"""HiDream-I1 (Full, Dev, Fast): a MoE DiT whose single files use diffusers' module names.

The original file carries `model.diffusion_model.` (diffusers loaders/single_file_utils.py
convert_hidream_transformer_to_diffusers only strips it); bare files are accepted too. The image
feed-forward is a mixture of experts: `ff_i.experts.M.w1/w2/w3`, `ff_i.shared_experts.*` and the router
`ff_i.gate` (kept in high precision by GGUF tools). LoRAs: diffusers/SimpleTuner `transformer.`,
ai-toolkit/ComfyUI `diffusion_model.`, SimpleTuner LyCORIS `lycoris_`, kohya `lora_unet_`.
"""

from lorabake.arch.common import DIT_LORA_PREFIXES, BlockGroup, Family, Layout, Probe, TextEncoder

_PROBES = (Probe("caption_projection.0.linear.weight"), Probe("double_stream_blocks.0.block.ff_i.gate.weight"))

_EXTRACT_TARGETS = (
    *(f"attn1.{p}.weight" for p in ("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t")),
    *(f"w{i}.weight" for i in (1, 2, 3)),  # experts, shared experts and ff_t
)

# HiDream-I1: 16 double, 32 single blocks, width 2560, 4 routed experts + shared (rows printed by scripts/family_structure.py from tests/data/arch/hidream.json.gz).
_STRUCTURE = """\
caption_projection.{0-48}.linear.weight 2560x4096
double_stream_blocks.{0-15}.block.adaLN_modulation.1.weight 30720x2560
double_stream_blocks.{0-15}.block.attn1.k_rms_norm.weight 2560
double_stream_blocks.{0-15}.block.attn1.k_rms_norm_t.weight 2560
double_stream_blocks.{0-15}.block.attn1.q_rms_norm.weight 2560
double_stream_blocks.{0-15}.block.attn1.q_rms_norm_t.weight 2560
double_stream_blocks.{0-15}.block.attn1.to_k.weight 2560x2560
double_stream_blocks.{0-15}.block.attn1.to_k_t.weight 2560x2560
double_stream_blocks.{0-15}.block.attn1.to_out.weight 2560x2560
double_stream_blocks.{0-15}.block.attn1.to_out_t.weight 2560x2560
double_stream_blocks.{0-15}.block.attn1.to_q.weight 2560x2560
double_stream_blocks.{0-15}.block.attn1.to_q_t.weight 2560x2560
double_stream_blocks.{0-15}.block.attn1.to_v.weight 2560x2560
double_stream_blocks.{0-15}.block.attn1.to_v_t.weight 2560x2560
double_stream_blocks.{0-15}.block.ff_i.experts.{0-3}.w1.weight 6912x2560
double_stream_blocks.{0-15}.block.ff_i.experts.{0-3}.w2.weight 2560x6912
double_stream_blocks.{0-15}.block.ff_i.experts.{0-3}.w3.weight 6912x2560
double_stream_blocks.{0-15}.block.ff_i.gate.weight 4x2560
double_stream_blocks.{0-15}.block.ff_i.shared_experts.w1.weight 3584x2560
double_stream_blocks.{0-15}.block.ff_i.shared_experts.w2.weight 2560x3584
double_stream_blocks.{0-15}.block.ff_i.shared_experts.w3.weight 3584x2560
double_stream_blocks.{0-15}.block.ff_t.w1.weight 6912x2560
double_stream_blocks.{0-15}.block.ff_t.w2.weight 2560x6912
double_stream_blocks.{0-15}.block.ff_t.w3.weight 6912x2560
final_layer.adaLN_modulation.1.weight 5120x2560
final_layer.linear.weight 64x2560
p_embedder.pooled_embedder.linear_1.weight 2560x2048
p_embedder.pooled_embedder.linear_2.weight 2560x2560
single_stream_blocks.{0-31}.block.adaLN_modulation.1.weight 15360x2560
single_stream_blocks.{0-31}.block.attn1.k_rms_norm.weight 2560
single_stream_blocks.{0-31}.block.attn1.q_rms_norm.weight 2560
single_stream_blocks.{0-31}.block.attn1.to_k.weight 2560x2560
single_stream_blocks.{0-31}.block.attn1.to_out.weight 2560x2560
single_stream_blocks.{0-31}.block.attn1.to_q.weight 2560x2560
single_stream_blocks.{0-31}.block.attn1.to_v.weight 2560x2560
single_stream_blocks.{0-31}.block.ff_i.experts.{0-3}.w1.weight 6912x2560
single_stream_blocks.{0-31}.block.ff_i.experts.{0-3}.w2.weight 2560x6912
single_stream_blocks.{0-31}.block.ff_i.experts.{0-3}.w3.weight 6912x2560
single_stream_blocks.{0-31}.block.ff_i.gate.weight 4x2560
single_stream_blocks.{0-31}.block.ff_i.shared_experts.w1.weight 3584x2560
single_stream_blocks.{0-31}.block.ff_i.shared_experts.w2.weight 2560x3584
single_stream_blocks.{0-31}.block.ff_i.shared_experts.w3.weight 3584x2560
t_embedder.timestep_embedder.linear_1.weight 2560x256
t_embedder.timestep_embedder.linear_2.weight 2560x2560
x_embedder.proj.weight 2560x64"""

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
    # CLIP-L, CLIP-G, T5-XXL and Llama 3.1 8B: ComfyUI's names (comfy/text_encoders/hidream.py clip_l, clip_g,
    # t5xxl, llama) and the diffusers pipeline's text_encoder … text_encoder_4
    text_encoders=(
        TextEncoder(
            "te1",
            (("text_encoders.clip_l.transformer.", "clip_l"), ("text_encoder.", "clip_l")),
            ("lora_te1_", "text_encoder.", "text_encoders.clip_l.transformer."),
            title="CLIP-L",
        ),
        TextEncoder(
            "te2",
            (("text_encoders.clip_g.transformer.", "clip_g"), ("text_encoder_2.", "clip_g")),
            ("lora_te2_", "text_encoder_2.", "text_encoders.clip_g.transformer."),
            title="CLIP-G",
        ),
        TextEncoder(
            "te3",
            (("text_encoders.t5xxl.transformer.", "t5xxl"), ("text_encoder_3.", "t5xxl")),
            ("lora_te3_", "text_encoder_3.", "text_encoders.t5xxl.transformer."),
            title="T5-XXL",
        ),
        TextEncoder(
            "te4",
            (("text_encoders.llama.transformer.", "llama"), ("text_encoder_4.", "llama")),
            ("text_encoder_4.", "text_encoders.llama.transformer."),
            title="Llama 3.1",
        ),
    ),
    kohya_names={"dit": ("lora_unet_", "diffusers")},
    lora_prefixes=DIT_LORA_PREFIXES,
    extract_targets=_EXTRACT_TARGETS,
    quant_keep=("final_layer.", "caption_projection."),
    block_groups=(
        BlockGroup("double{n}", "double_stream_blocks.{n}."),
        BlockGroup("single{n}", "single_stream_blocks.{n}."),
    ),
    implementation="https://github.com/HiDream-ai/HiDream-I1",
    order=63,
    structures=(_STRUCTURE,),
)
