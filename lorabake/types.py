"""Small value types shared by the planner, the rule table, the LoRA parser and the math."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RowSlice:
    """Rows [start, start + length) along `dim` of a fused target (q of qkv, ...)."""

    start: int
    length: int
    dim: int = 0


@dataclass(frozen=True)
class Target:
    """Where one LoRA module lands in the checkpoint.

    `key` is the weight tensor's name in the base; `bias_key` its bias (None when the base has
    none). `slice` narrows a fused weight; `transform` is applied to ΔW before adding
    ("swap_halves" for diffusers' AdaLayerNormContinuous, "transpose" for OpenCLIP's raw
    text_projection). `component` is one of COMPONENTS.
    """

    key: str
    component: str
    bias_key: str | None = None
    slice: RowSlice | None = None
    transform: str | None = None
    # for a fused adapter spread over several base tensors (a `to_qkv` LoRA onto separate q, k, v
    # weights): the rows of the adapter's whole ΔW that land on this tensor
    delta_rows: RowSlice | None = None


# Components a checkpoint or LoRA module can belong to.
COMPONENTS = ("unet", "dit", "te1", "te2", "te3", "te4", "vae")
TEXT_ENCODERS = ("te1", "te2", "te3", "te4")


@dataclass
class LoraModule:
    """One adapter module of a LoRA file: a stem plus its parts.

    `parts` maps a canonical part name (see adapters.PART_NAMES) to the tensor's key in the
    file. `algo` is one of adapters.ALGORITHMS. `rank` comes from the factor shapes. `alpha` and
    `scale` (the adapter's own multiplier, see adapters.scale) are set once the file's scalars are
    read; `scale` stays None until then.
    """

    stem: str
    algo: str
    parts: dict[str, str] = field(default_factory=dict)
    rank: int | None = None
    dora: bool = False
    alpha: float | None = None
    scale: float | None = None
