"""The text of a per-block strength (`FILE:0.8@OUTD`), split off and parsed before any family is known.

Three forms, as people write them:
- a preset name (`OUTD`, `ALL0.5`): the family module says what it stands for;
- a list of numbers (`1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0`): sd-webui-lora-block-weight's vectors,
  the family module says which lengths it takes and which block each value is for;
- `NAME=VALUE` items (`double:0-7=0,single:*=1`, `blocks:20-39=0.5`, `IN04=0,te=0.5`): a block
  (`IN04`, `double3`), a stream with an index range (`double:0-7`, `single:*`), `te`/`te1`…,
  `other` (modules in no block) or `*` (every block). Later items win over earlier ones.
Which names exist is the base's business (`lorabake.blocks`); here only the grammar is checked.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lorabake.limits import fits_fp32

# what follows the last "@" of a --lora argument is a block spec unless it looks like part of a path
_NOT_A_SPEC = re.compile(r"[\\/]|\.(safetensors|gguf|ckpt|pt|pth|bin|sft)$", re.IGNORECASE)
_PRESET = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*")
_KEY = re.compile(r"(?P<name>[A-Za-z_*][A-Za-z0-9_]*?|\*)(?::(?P<range>\*|\d+(?:-\d+)?))?")


@dataclass(frozen=True)
class Item:
    """One `NAME[:RANGE]=VALUE`: `first`/`last` bound a stream's indices (None: all of them)."""

    name: str
    value: float
    ranged: bool = False  # NAME:RANGE (a stream) rather than a block, `te…`, `other` or `*`
    first: int | None = None
    last: int | None = None


@dataclass(frozen=True)
class BlockSpec:
    text: str
    preset: str | None = None
    vector: tuple[float, ...] | None = None
    items: tuple[Item, ...] = ()


class BlockSpecError(ValueError):
    """The block spec text is malformed (the message says where)."""


def split(text: str) -> tuple[str, str | None]:
    """`PATH[:S[:TE]]@BLOCKS` -> (`PATH[:S[:TE]]`, `BLOCKS`); no `@`, or one inside a path, gives None."""
    head, at, tail = text.rpartition("@")
    if not at or not head or _NOT_A_SPEC.search(tail):
        return text, None
    return head, tail


def parse(text: str) -> BlockSpec:
    """The grammar of one block spec; values must be finite numbers fp32 can hold."""
    stripped = text.strip()
    if not stripped:
        raise BlockSpecError("the block spec after '@' is empty")
    fields = [f.strip() for f in stripped.split(",")]
    if all(_is_number(f) for f in fields):
        return BlockSpec(text, vector=tuple(_value(f, text) for f in fields))
    if len(fields) == 1 and "=" not in stripped and _PRESET.fullmatch(stripped):
        return BlockSpec(text, preset=stripped)
    return BlockSpec(text, items=tuple(_item(f, text) for f in fields))


def _item(field: str, text: str) -> Item:
    key, eq, value = field.partition("=")
    m = _KEY.fullmatch(key.strip())
    if not eq or m is None:
        raise BlockSpecError(
            f"{field!r} in block spec {text!r} is not NAME=VALUE (e.g. IN04=0, double:0-7=0.5, te=0) "
            "and the spec is neither a preset name nor a list of numbers"
        )
    rng = m["range"]
    first = last = None
    if rng and rng != "*":
        a, _, b = rng.partition("-")
        first, last = int(a), int(b or a)
        if last < first:
            raise BlockSpecError(f"range {rng!r} in block spec {text!r} runs backwards")
    return Item(m["name"], _value(value.strip(), text), ranged=rng is not None, first=first, last=last)


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def _value(field: str, text: str) -> float:
    try:
        value = float(field)
    except ValueError:
        raise BlockSpecError(f"value {field!r} in block spec {text!r} is not a number") from None
    if not math.isfinite(value) or not fits_fp32(value):
        raise BlockSpecError(f"value {field!r} in block spec {text!r} is not a finite fp32 number")
    return value
