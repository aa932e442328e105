"""Full / diff (LyCORIS `full`, ComfyUI `diff`, `diff_b`): ΔW is stored whole.

`diff` has the target's shape; `diff_b` is a bias delta and may ride along with any other adapter
of the same module (alone it makes a `full` module). Neither has a rank, so alpha never scales them.
"""

from __future__ import annotations

from collections.abc import Collection

from lorabake.adapters.base import Adapter, Shape, Shapes, Suffix, need

NAME = "full"

SUFFIXES = (
    Suffix(".diff", "diff"),
    Suffix(".diff_b", "diff_b"),
    # lightx2v distill LoRAs: the full delta of a block's `modulation` parameter, keyed by the block's name
    # (the family module gives the parameter that alias)
    Suffix(".diff_m", "diff"),
)

# The naming (a family's rename-table target) in which a modulation parameter goes by its block's name, as
# lightx2v's `blocks.0.diff_m` names `blocks.0.modulation`: extract writes such deltas `<block>.diff_m`.
MODULATION_NAMING = "lightx2v"


def complete(parts: Collection[str]) -> bool:
    return True  # `diff` or a lone `diff_b` is a module


def natural(shapes: Shapes) -> Shape:
    return need(NAME, shapes, "diff")[0]


ADAPTER = Adapter(
    name=NAME,
    parts=("diff",),
    suffixes=SUFFIXES,
    complete=complete,
    natural=natural,
    raw=lambda p: p["diff"],
    bias_part="diff_b",
    linear_in=("diff",),
)
