"""Kandinsky 5.0 (Video Lite / Pro, Image Lite): one DiT whose module names are the same in Kandinsky-5's
own files and in diffusers (`visual_transformer_blocks.N.self_attention.to_query`), so LoRAs name it
bare, with `transformer.` (diffusers, ComfyUI's Kandinsky5 map) or with the generic trainer prefixes.
"""

from lorabake.arch.common import DIT_LORA_PREFIXES, BlockGroup, Family, Layout, Probe, Variant

_PROBES = (
    Probe("visual_transformer_blocks.0.cross_attention.to_query.weight"),
    Probe("out_layer.modulation.out_layer.weight"),
)

# musubi-tuner networks/lora_kandinsky5.py targets the attention and feed-forward linears of both block kinds.
_EXTRACT_TARGETS = tuple(
    f"{a}.{m}.weight" for a in ("self_attention", "cross_attention") for m in ("to_query", "to_key", "to_value", "out_layer")
) + ("feed_forward.in_layer.weight", "feed_forward.out_layer.weight")

# Every weight under the bare layout (scripts/family_structure.py on tests/data/arch/kandinsky5-lite-t2v.json).
_LITE = """\
out_layer.modulation.out_layer.weight 3584x512
out_layer.out_layer.weight 64x1792
pooled_text_embeddings.in_layer.weight 512x768
pooled_text_embeddings.norm.weight 512
text_embeddings.in_layer.weight 1792x3584
text_embeddings.norm.weight 1792
text_transformer_blocks.{0,1}.feed_forward.in_layer.weight 7168x1792
text_transformer_blocks.{0,1}.feed_forward.out_layer.weight 1792x7168
text_transformer_blocks.{0,1}.self_attention.key_norm.weight 64
text_transformer_blocks.{0,1}.self_attention.out_layer.weight 1792x1792
text_transformer_blocks.{0,1}.self_attention.query_norm.weight 64
text_transformer_blocks.{0,1}.self_attention.to_key.weight 1792x1792
text_transformer_blocks.{0,1}.self_attention.to_query.weight 1792x1792
text_transformer_blocks.{0,1}.self_attention.to_value.weight 1792x1792
text_transformer_blocks.{0,1}.text_modulation.out_layer.weight 10752x512
time_embeddings.in_layer.weight 512x1792
time_embeddings.out_layer.weight 512x512
visual_embeddings.in_layer.weight 1792x132
visual_transformer_blocks.{0-31}.cross_attention.key_norm.weight 64
visual_transformer_blocks.{0-31}.cross_attention.out_layer.weight 1792x1792
visual_transformer_blocks.{0-31}.cross_attention.query_norm.weight 64
visual_transformer_blocks.{0-31}.cross_attention.to_key.weight 1792x1792
visual_transformer_blocks.{0-31}.cross_attention.to_query.weight 1792x1792
visual_transformer_blocks.{0-31}.cross_attention.to_value.weight 1792x1792
visual_transformer_blocks.{0-31}.feed_forward.in_layer.weight 7168x1792
visual_transformer_blocks.{0-31}.feed_forward.out_layer.weight 1792x7168
visual_transformer_blocks.{0-31}.self_attention.key_norm.weight 64
visual_transformer_blocks.{0-31}.self_attention.out_layer.weight 1792x1792
visual_transformer_blocks.{0-31}.self_attention.query_norm.weight 64
visual_transformer_blocks.{0-31}.self_attention.to_key.weight 1792x1792
visual_transformer_blocks.{0-31}.self_attention.to_query.weight 1792x1792
visual_transformer_blocks.{0-31}.self_attention.to_value.weight 1792x1792
visual_transformer_blocks.{0-31}.visual_modulation.out_layer.weight 16128x512
"""

FAMILY = Family(
    arch="kandinsky5",
    title="Kandinsky 5",
    modelspec="kandinsky-5",
    kohya="kandinsky5",
    metadata_names=("kandinsky-5", "kandinsky5"),
    diffusion="dit",
    diffusion_kind="kandinsky5",
    layouts=(
        Layout("dit-only", "", "diffusers", _PROBES),  # kandinskylab single files
        Layout("comfyui", "model.diffusion_model.", "diffusers", _PROBES),
        Layout("diffusers", "transformer.", "diffusers", _PROBES),
    ),
    text_encoders=(),
    kohya_names={"dit": ("lora_unet_", "diffusers")},
    lora_prefixes=DIT_LORA_PREFIXES,
    extract_targets=_EXTRACT_TARGETS,
    variants=(
        Variant("visual_transformer_blocks.0.self_attention.to_query.weight", dim=0,
                sizes={1792: "Lite (2B, width 1792)", 4096: "Pro (19B, width 4096)"}),
    ),
    quant_keep=("^out_layer.",),
    block_groups=(BlockGroup("text{n}", "text_transformer_blocks.{n}."), BlockGroup("visual{n}", "visual_transformer_blocks.{n}.")),
    implementation="https://github.com/kandinskylab/kandinsky-5",
    resolution="768x512",
    structures=(_LITE,),
    # no gguf_arch: city96/ComfyUI-GGUF loader.py's IMG_ARCH_LIST has no Kandinsky name and refuses any name outside
    # it, so a Kandinsky 5 GGUF keeps the family id (readable by lorabake and gguf-py, not by ComfyUI-GGUF)
    order=230,
)
