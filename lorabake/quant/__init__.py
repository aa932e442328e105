"""Quantized checkpoints: decode stored tensors to fp32, encode fp32 back with recomputed scales.

`codecs` holds one codec per storage format (fp8 with a per-tensor scale, nvfp4, mxfp8,
int8_tensorwise); `comfy` finds ComfyUI's per-layer quantized layers in a checkpoint's header;
`bake` decodes a layer, lets the caller patch it in fp32 and encodes it in the same format.
"""
