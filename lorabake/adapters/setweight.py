"""ComfyUI `set_weight`: the new value of a tensor, not a difference; and `reshape_weight`, refused.

`set_weight` replaces the weight (the bake kernel copies it in at any non-zero strength).
`reshape_weight` (BFL control LoRAs after ComfyUI's conversion) widens the base tensor; lorabake
never changes a tensor's shape, so a module carrying it is reported, not baked.
"""

from __future__ import annotations

from collections.abc import Collection

from lorabake.adapters.base import Adapter, Shape, Shapes, Suffix, need, prod

NAME = "set"

SUFFIXES = (
    Suffix(".set_weight", "set_weight"),
    Suffix(".reshape_weight", "reshape_weight"),
)

# Parts lorabake refuses (the module is reported unmatched, never skipped in silence), and why.
REFUSED = {
    "reshape_weight": "BFL control LoRAs widen the base tensor; changing a tensor's shape is not supported",
}


def complete(parts: Collection[str]) -> bool:
    return True


def natural(shapes: Shapes) -> Shape:
    return need(NAME, shapes, "set_weight")[0]


def fit(shapes: Shapes, target: Shape) -> str | None:
    """The new value is taken element for element, as ComfyUI copies it."""
    n = prod(natural(shapes))
    return None if n == prod(target) else f"set_weight has {n} values; the target {list(target)} has {prod(target)}"


ADAPTER = Adapter(
    name=NAME,
    parts=("set_weight",),
    suffixes=SUFFIXES,
    complete=complete,
    natural=natural,
    fit=fit,
)
