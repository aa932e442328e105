"""The adapter registry: one module per adapter type, found here by name or by part.

Parsing (`lora_format`), planning (`plan`) and the math (`delta`) all ask this registry; nothing
else knows an adapter type's parts, shapes, rank or ΔW. Header-only: torch is imported only by the
adapters' math functions.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from lorabake.adapters import dora, full, glora, ia3, loha, lokr, lora, norm, oft, scale, setweight
from lorabake.adapters.base import (
    Adapter,
    PartError,
    Shape,
    Shapes,
    Suffix,
    Tensor,
    fault,
    layout_fault,
    prod,
)
from lorabake.errors import LoraFormatError

# Types that own parts, in the order errors list them; BOFT shares OFT's keys.
_OWNERS: tuple[Adapter, ...] = (
    lora.ADAPTER, loha.ADAPTER, lokr.ADAPTER, full.ADAPTER, norm.ADAPTER,
    ia3.ADAPTER, oft.OFT, glora.ADAPTER, setweight.ADAPTER,
)  # fmt: skip
ADAPTERS: dict[str, Adapter] = {a.name: a for a in (*_OWNERS, oft.BOFT)}
ALGORITHMS = tuple(ADAPTERS)
LINEAR_ALGOS = tuple(a.name for a in ADAPTERS.values() if not a.weight_dependent)
WEIGHT_DEPENDENT_ALGOS = tuple(a.name for a in ADAPTERS.values() if a.weight_dependent)

# The whole key grammar: every adapter's rows, then the modifiers that ride along with any type.
SUFFIXES: tuple[Suffix, ...] = (
    *(row for a in _OWNERS for row in a.suffixes),
    *scale.SUFFIXES,
    *dora.SUFFIXES,
)
PART_NAMES = tuple(dict.fromkeys(("ia3_weight", *(row.part for row in SUFFIXES))))
# part -> the type it makes. Parts not here (alpha, scale, DoRA magnitudes, reshape_weight,
# diff_b) are modifiers; a lone diff_b makes a `full` module.
PART_ALGO: dict[str, str] = {p: a.name for a in _OWNERS for p in a.parts}
BIAS_PARTS = tuple(a.bias_part for a in _OWNERS if a.bias_part)
SCALAR_PARTS = scale.PARTS
DORA_PARTS = dora.PARTS
REFUSED_PARTS = setweight.REFUSED
# Parts that are numbers or flags, not factors: they may be integer (or bool for IA3's flag).
_NON_FACTORS = (*SCALAR_PARTS, "on_input")
FACTOR_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
SCALAR_DTYPES = (*FACTOR_DTYPES, "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64")


def get(algo: str) -> Adapter:
    adapter = ADAPTERS.get(algo)
    if adapter is None:
        raise LoraFormatError(f"algorithm {algo} is not supported", hint=f"supported: {', '.join(ALGORITHMS)}")
    return adapter


def algo_of(parts: Collection[str]) -> str | None:
    """The type these parts make, None when only modifiers are present. Raises on a mix."""
    owners = {PART_ALGO[p] for p in parts if p in PART_ALGO}
    if not owners and "diff_b" in parts:
        return full.NAME
    if len(owners) > 1:
        listed = ", ".join(f"{p} ({PART_ALGO[p]})" for p in parts if p in PART_ALGO)
        first = next(p for p in parts if p in PART_ALGO)
        raise PartError(
            f"module mixes adapter types that do not combine: {listed}",
            hint="a stem holds one adapter (plus alpha/dora/bias diff); the file mixes two trainers' outputs",
            part=first,
        )
    return owners.pop() if owners else None


def weight_shapes(shapes: Shapes) -> dict[str, Shape]:
    """The parts that act on the weight (bias deltas left out)."""
    return {p: s for p, s in shapes.items() if p not in BIAS_PARTS}


def has_weight_change(shapes: Shapes) -> bool:
    """False for a module that only carries bias parts (a lone diff_b or b_norm) and scalars."""
    return any(p not in SCALAR_PARTS for p in weight_shapes(shapes))


def check_dtypes(algo: str, dtypes: Mapping[str, str]) -> None:
    """Factors must be floating point; alphas and scales numbers; IA3's flag may be bool."""
    for part, tag in dtypes.items():
        if part == "on_input":
            allowed = (*SCALAR_DTYPES, "BOOL")
        elif part in _NON_FACTORS:
            allowed = SCALAR_DTYPES
        else:
            allowed = FACTOR_DTYPES
        if tag not in allowed:
            kind = "a number" if part in _NON_FACTORS else "floating point (F64/F32/F16/BF16/F8)"
            raise fault(algo, f"{part} has dtype {tag}; it must be {kind}", part)


def resolve(algo: str, shapes: Shapes) -> tuple[str, Shape | None, int | None]:
    """Check a module's parts against each other: (type or its variant, natural ΔW shape, rank).

    Raises `PartError` naming the faulty part. Scalars must be scalars; ranks must agree and be ≥ 1.
    """
    for part in SCALAR_PARTS:
        if part in shapes and tuple(shapes[part]) not in scale.SCALAR_SHAPES:
            raise fault(algo, f"{part} has shape {list(shapes[part])}, expected a scalar ([] or [1])", part)
    adapter = get(algo)
    if adapter.variant is not None:
        adapter = get(adapter.variant(shapes))
    for part, shape in shapes.items():
        if part not in _NON_FACTORS and 0 in tuple(shape):
            raise fault(adapter.name, f"{part} has shape {list(shape)}: an empty dimension (rank 0?)", part)
    natural = adapter.natural(shapes) if has_weight_change(shapes) else None
    if any(p in shapes for p in DORA_PARTS):
        dora.check(adapter.name, shapes, natural)
    return adapter.name, natural, adapter.rank(shapes)


def delta_shape(algo: str, shapes: Shapes, *, param: str = "weight") -> Shape | None:
    """The natural shape of ΔW (or of the bias delta) from part shapes alone.

    Raises LoraFormatError on a missing part or inconsistent ranks/shapes. Returns None when the
    shape depends on the base weight (oft, boft, ia3: use `fits`). A natural shape may be
    flattened (LoHa/LoKr conv factors give [out, in·k…]).
    """
    adapter = get(algo)
    if param == "bias":
        return bias_shape(algo, shapes)
    if param != "weight":
        raise ValueError(f"param must be 'weight' or 'bias', not {param!r}")
    natural = adapter.natural(shapes)
    dora.check(algo, shapes, natural)
    return natural


def bias_shape(algo: str, shapes: Shapes) -> Shape:
    """Shape of the bias delta: the sum of the module's bias parts, which must agree."""
    present = [p for p in BIAS_PARTS if p in shapes]
    if not present:
        raise fault(algo, "has no bias delta (only full diff_b, norm b_norm and lora up_bias do)")
    n = prod(shapes[present[0]])
    for p in present[1:]:
        if prod(shapes[p]) != n:
            raise fault(algo, f"bias parts disagree: {present[0]} has {n} values, {p} {prod(shapes[p])}", p)
    if "up_bias" in present:
        if algo != lora.NAME:
            raise fault(algo, "lora_B.bias only goes with a LoRA", "up_bias")
        if "up" in shapes and n != shapes["up"][0]:
            raise fault(algo, f"up_bias has {n} values, up has {shapes['up'][0]} rows", "up_bias")
    return tuple(shapes[present[0]])


def target_fault(algo: str, shapes: Shapes, target: Shape) -> str | None:
    """None when the module can patch a weight of shape `target`, else why not (in words).

    Beyond element counts: a factor's number of dimensions must fit the target (a linear layer,
    a 1x1 or k×k conv, a 3-D or 5-D conv); a linear and a 1x1 conv take the same ΔW.
    """
    adapter = get(algo)
    if adapter.variant is not None:
        adapter = get(adapter.variant(shapes))
    target = tuple(int(d) for d in target)
    if adapter.fit is not None:
        return adapter.fit(shapes, target)
    return layout_fault(adapter.natural(shapes), target, flattened=adapter.flattened)


def fits(algo: str, shapes: Shapes, target: Shape) -> bool:
    """Whether a module with these part shapes can patch a weight of shape `target`."""
    delta_shape(algo, shapes)
    return target_fault(algo, shapes, target) is None


def exact_factors(algo: str, parts: Mapping[str, Tensor]) -> tuple[Tensor, Tensor] | None:
    """(up, down) with up @ down = the unscaled ΔW flattened to [out, in·k…], from the adapter's
    own structure; None when it has none for these parts (a full diff, a Tucker core)."""
    adapter = get(algo)
    return adapter.factors(parts) if adapter.factors else None


def strength_parts(algo: str, parts: Collection[str]) -> tuple[str, ...] | None:
    """The parts to multiply by c so that the module's weight and bias changes are both c times
    theirs (a strength folded into the file); None when no such parts exist: DoRA's rescale and
    the weight-dependent types are not linear in their factors."""
    adapter = get(algo)
    if adapter.weight_dependent or any(p in parts for p in DORA_PARTS):
        return None
    linear = tuple(p for p in adapter.linear_in if p in parts)[:1]
    acts_on_weight = any(p not in SCALAR_PARTS and p not in BIAS_PARTS for p in parts)
    if acts_on_weight and not linear:
        return None
    return linear + tuple(p for p in BIAS_PARTS if p in parts)


def rank_of(algo: str, shapes: Shapes) -> int | None:
    """The rank alpha is divided by, or None when alpha does not scale this type."""
    return get(algo).rank(shapes)


__all__ = [
    "ADAPTERS", "ALGORITHMS", "BIAS_PARTS", "DORA_PARTS", "PART_ALGO", "PART_NAMES", "REFUSED_PARTS",
    "SUFFIXES", "Adapter", "PartError", "algo_of", "bias_shape", "check_dtypes", "delta_shape", "exact_factors", "fits",
    "get", "has_weight_change", "rank_of", "resolve", "strength_parts", "target_fault",
]  # fmt: skip
