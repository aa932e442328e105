"""Print a family's `structure` rows from a key list (tests/data/arch/*.json): its weights, compressed.

    python scripts/family_structure.py tests/data/arch/flux-flux.json --component diffuser \\
        --strip model.diffusion_model.

Each row is `<key template> <shape>`; a template's {a-b} / {a,b} stand for the numbers a key takes at
that place. Biases, integer buffers and the components in `--skip` (VAE, EMA copy, scheduler) are left
out: a LoRA never targets them. Paste the output into the family module as `STRUCTURE`.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from math import prod


def rows(keys: dict[str, tuple[int, ...]]) -> list[str]:
    """`<template> <shape>` rows whose expansion is exactly `keys`, in first-seen order."""
    groups: dict[tuple[tuple[str, ...], tuple[int, ...]], list[tuple[int, ...]]] = defaultdict(list)
    for key, shape in keys.items():
        tokens = key.split(".")
        pattern = tuple("#" if t.isdigit() else t for t in tokens)
        groups[(pattern, tuple(shape))].append(tuple(int(t) for t in tokens if t.isdigit()))
    out = []
    for (pattern, shape), numbers in groups.items():
        for cover in _products(sorted(set(numbers))):
            values = iter(cover)
            template = ".".join(_braces(next(values)) if t == "#" else t for t in pattern)
            out.append(f"{template} {'x'.join(map(str, shape)) or '-'}")
    return out


def _products(tuples: list[tuple[int, ...]]) -> list[tuple[list[int], ...]]:
    """Cartesian products (one value list per place) whose union is `tuples`."""
    width = len(tuples[0])
    if width == 0:
        return [()]
    places = [sorted({t[i] for t in tuples}) for i in range(width)]
    if len(tuples) == prod(len(p) for p in places):
        return [tuple(places)]
    heads_by_tail: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for t in tuples:
        heads_by_tail[t[1:]].append(t[0])
    tails_by_heads: dict[tuple[int, ...], list[tuple[int, ...]]] = defaultdict(list)
    for tail, heads in heads_by_tail.items():
        tails_by_heads[tuple(sorted(heads))].append(tail)
    return [(list(heads), *rest) for heads, tails in tails_by_heads.items() for rest in _products(sorted(tails))]


def _braces(values: list[int]) -> str:
    if len(values) == 1:
        return str(values[0])
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}-{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("keylist")
    parser.add_argument("--skip", default="vae,ema,scheduler", help="components left out (comma list)")
    parser.add_argument("--component", help="only this component of the key list (e.g. diffuser, clip_l)")
    parser.add_argument("--strip", default="", help="a prefix taken off every key (the component's root)")
    args = parser.parse_args()
    with open(args.keylist, encoding="utf-8") as fh:
        tensors = json.load(fh)["tensors"]
    skip = set(args.skip.split(","))
    keys = {
        k.removeprefix(args.strip): tuple(v["shape"])
        for k, v in tensors.items()
        if v.get("component") not in skip
        and (args.component is None or v.get("component") == args.component)
        and k.startswith(args.strip)
        and not k.endswith("bias")
        and "float" in v["dtype"]
    }
    print("\n".join(rows(keys)))


if __name__ == "__main__":
    main()
