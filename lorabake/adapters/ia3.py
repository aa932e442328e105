"""(IA)³ (LyCORIS): W' = W · (1 + s·w), w scaling each output row, or each input column when
`on_input` is true. Keys: `<stem>.weight` (only next to a `<stem>.on_input`) and `<stem>.on_input`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from lorabake.adapters.base import Adapter, Shape, Shapes, Suffix, Tensor, fault, need, prod

NAME = "ia3"

# `<stem>.weight` is IA3's only next to `<stem>.on_input`: lora_format's splitter handles that row.
SUFFIXES = (Suffix(".on_input", "on_input"),)


def complete(parts: Collection[str]) -> bool:
    return "ia3_weight" in parts and "on_input" in parts


def natural(shapes: Shapes) -> None:
    need(NAME, shapes, "ia3_weight")
    return None  # the weight decides


def fit(shapes: Shapes, target: Shape) -> str | None:
    n = prod(shapes["ia3_weight"])
    if len(target) >= 2 and n in (target[0], target[1]):
        return None
    return f"ia3_weight has {n} values; the target {list(target)} has {target[0]} rows"


def apply(w: Tensor, p: Mapping[str, Tensor], s: float, scale: float) -> Tensor:
    vec = p["ia3_weight"].reshape(-1)
    on_input = bool(p["on_input"].reshape(-1)[0].item()) if "on_input" in p else False
    axis = 1 if on_input else 0
    if w.dim() < 2 or vec.numel() != w.shape[axis]:
        side = "input" if on_input else "output"
        raise fault(NAME, f"ia3_weight has {vec.numel()} values, the weight has {list(w.shape)} ({side} axis)", "ia3_weight")
    shape = [1] * w.dim()
    shape[axis] = vec.numel()
    return w * (1 + s * vec.reshape(shape))


ADAPTER = Adapter(
    name=NAME,
    parts=("ia3_weight", "on_input"),
    suffixes=SUFFIXES,
    complete=complete,
    natural=natural,
    fit=fit,
    apply=apply,
)
