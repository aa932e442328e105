"""sd-webui-lora-block-weight's vectors and presets for the SD UNets, as block names.

A vector's first value ("BASE") is for the text encoders; the others follow its block ids. SD1/SD2
(12 input blocks) take 17 values (the blocks with attention) or 26 (every block, for LoCon/LyCORIS);
SDXL (9 input blocks) takes 12 or 20. The SD presets are the extension's own; the extension ships
17-value presets only, so the SDXL ones below say the same thing (shallow/deep input, middle, deep/
shallow output) on SDXL's blocks, as ComfyUI-Inspire-Pack's SDXL-INALL/MIDALL/OUTALL do.
"""

_IN = tuple(f"IN{n:02d}" for n in range(12))
_OUT = tuple(f"OUT{n:02d}" for n in range(12))

SD_VECTORS = {
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *_OUT[3:]),
    26: ("BASE", *_IN, "M00", *_OUT),
}
SDXL_VECTORS = {
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *_OUT[:6]),
    20: ("BASE", *_IN[:9], "M00", *_OUT[:9]),
}

SD_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}
SDXL_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,1,1,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "MIDALL": "1,0,0,0,0,1,0,0,0,0,0,0",
    "MIDD": "1,0,0,1,1,1,1,1,1,0,0,0",
    "OUTD": "1,0,0,0,0,0,1,1,1,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,1,1,1",
    "OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}
