"""Norm (LyCORIS `norm`): the change of a normalisation layer's weight and bias, stored whole."""

from __future__ import annotations

from collections.abc import Collection

from lorabake.adapters.base import Adapter, Shape, Shapes, Suffix, need

NAME = "norm"

SUFFIXES = (
    Suffix(".w_norm", "w_norm"),
    Suffix(".b_norm", "b_norm"),
)


def complete(parts: Collection[str]) -> bool:
    return True  # either part alone is a module


def natural(shapes: Shapes) -> Shape:
    return need(NAME, shapes, "w_norm")[0]


ADAPTER = Adapter(
    name=NAME,
    parts=("w_norm", "b_norm"),
    suffixes=SUFFIXES,
    complete=complete,
    natural=natural,
    raw=lambda p: p["w_norm"],
    bias_part="b_norm",
    linear_in=("w_norm",),
)
