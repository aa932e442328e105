"""One job of a batch: one base, its LoRAs, one output; and its canonical recipe entry.

The canonical entry is what an output records in its metadata: a `[[bake]]` entry with every
option spelled out and the matrix already expanded, so baking it alone rebuilds the same bytes.
Its SHA-256 (the "recipe hash") covers that entry only, not the rest of the recipe file: adding
an unrelated entry to a recipe must neither change the bytes of other outputs nor force a rebuild.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from lorabake import block_spec
from lorabake.errors import UsageError

DTYPES = ("keep", "fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")
ROUNDINGS = ("nearest", "stochastic")
# Metadata keys a recipe output carries.
RECIPE_KEY = "lorabake.recipe"
RECIPE_HASH_KEY = "lorabake.recipe_sha256"
INPUTS_KEY = "lorabake.inputs"


@dataclass(frozen=True)
class Use:
    """An input file as the recipe wrote it (`text`), where it is (`resolved`), and its strengths."""

    text: str
    resolved: str
    strength: float = 1.0
    te_strength: float | None = None
    blocks: str | None = None  # per-block strengths (`@BLOCKS` of the LoRA's text)

    def scaled(self, factor: float) -> Use:
        """The matrix strength scales both strengths of a LoRA."""
        te = None if self.te_strength is None else self.te_strength * factor
        return dataclasses.replace(self, strength=self.strength * factor, te_strength=te)

    @property
    def lora_text(self) -> str:
        text = f"{self.text}:{format_number(self.strength)}"
        text = text if self.te_strength is None else f"{text}:{format_number(self.te_strength)}"
        return text if self.blocks is None else f"{text}@{self.blocks}"


LoraUse = Use


@dataclass(frozen=True)
class Pin:
    """A SHA-256 an input must have: of the whole file (`sha256`) or of its data section (`data_sha256`)."""

    text: str
    resolved: str
    kind: str  # "sha256" | "data_sha256"
    sha256: str


@dataclass(frozen=True)
class Job:
    index: int
    where: str  # the recipe entry it came from, for messages
    name: str | None
    base: Use
    loras: tuple[Use, ...]
    output: str  # as the recipe wrote it (template expanded), relative to the recipe's folder
    output_path: str
    dtype: str
    rounding: str
    allow_unmatched: bool
    pins: tuple[Pin, ...] = ()
    quant: str | None = None  # quantize on the way out (merge --quant)
    saturate: bool = False  # clamp beyond the output dtype's range (merge --saturate)

    @property
    def bakes_alone(self) -> bool:
        """Quantizing and saturating writers bake one output per read of the base (merge's own path)."""
        return bool(self.quant) or self.saturate

    @property
    def inputs(self) -> tuple[Use, ...]:
        return (self.base, *self.loras)

    def renumbered(self, index: int) -> Job:
        return dataclasses.replace(self, index=index)

    def entry(self) -> dict:
        """The canonical `[[bake]]` entry of this job (JSON-able, key order fixed)."""
        out: dict = {}
        if self.name:
            out["name"] = self.name
        out.update(
            base=self.base.text,
            loras=[u.lora_text for u in self.loras],
            output=self.output,
            dtype=self.dtype,
            **({"quant": self.quant} if self.quant else {}),  # absent when unset: older entries keep their hash
            rounding=self.rounding,
            allow_unmatched=self.allow_unmatched,
            **({"saturate": True} if self.saturate else {}),
        )
        if self.pins:
            out["pins"] = {p.text: {p.kind: p.sha256} for p in self.pins}
        return out

    @property
    def entry_sha256(self) -> str:
        return entry_sha256(self.entry())


def entry_json(entry: dict) -> str:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def entry_sha256(entry: dict) -> str:
    return hashlib.sha256(entry_json(entry).encode("utf-8")).hexdigest()


def format_number(x: float) -> str:
    """Shortest text that reads back as the same float (so a recorded entry rebuilds exactly)."""
    return repr(float(x))


def parse_lora_text(text: str, *, where: str, recipe: str) -> tuple[str, float, float | None, str | None]:
    """PATH[:STRENGTH[:TE_STRENGTH]][@BLOCKS], numbers taken from the right so paths may contain ':'."""
    text, blocks = block_spec.split(text)
    if blocks is not None:
        check_blocks(blocks, where=where, recipe=recipe)
    pieces = text.split(":")
    numbers: list[float] = []
    while len(pieces) > 1 and len(numbers) < 2:
        try:
            value = float(pieces[-1])
        except ValueError:
            break
        if value != value or value in (float("inf"), float("-inf")):
            raise UsageError(f"{where}: strength {pieces[-1]!r} in {text!r} is not a finite number", path=recipe)
        numbers.insert(0, value)
        pieces.pop()
    path = ":".join(pieces)
    if not path:
        raise UsageError(f"{where}: {text!r} has no path", path=recipe)
    return path, (numbers[0] if numbers else 1.0), (numbers[1] if len(numbers) > 1 else None), blocks


def check_blocks(blocks: str, *, where: str, recipe: str) -> None:
    """The grammar of a block spec, checked where it is written (the base checks the names later)."""
    try:
        block_spec.parse(blocks)
    except block_spec.BlockSpecError as exc:
        raise UsageError(f"{where}: {exc}", path=recipe) from None


def recipe_from_metadata(metadata: dict[str, str]) -> dict | None:
    """{"entry": ..., "sha256": ..., "inputs": [...], "matches": bool} from an output's metadata."""
    raw = metadata.get(RECIPE_KEY)
    if raw is None:
        return None
    try:
        entry = json.loads(raw)
        inputs = json.loads(metadata.get(INPUTS_KEY, "[]"))
    except (ValueError, RecursionError):  # metadata from a file: nested beyond the parser's cap too
        return {"entry": None, "sha256": metadata.get(RECIPE_HASH_KEY), "inputs": [], "matches": False}
    recorded = metadata.get(RECIPE_HASH_KEY)
    matches = isinstance(entry, dict) and recorded == entry_sha256(entry)
    return {"entry": entry, "sha256": recorded, "inputs": inputs, "matches": matches}


def entry_toml(entry: dict) -> str:
    """The entry as recipe text: paste it into a recipe in the same folder and bake it."""
    lines = ["[[bake]]"]
    for key, value in entry.items():
        if key != "pins":
            lines.append(f"{key} = {_toml_value(value)}")
    pins = entry.get("pins") or {}
    if pins:
        lines += ["", "[pins]"]
        for path, pin in pins.items():
            inner = ", ".join(f"{k} = {_toml_value(v)}" for k, v in pin.items())
            lines.append(f"{_toml_value(path)} = {{ {inner} }}")
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):  # a JSON string is a valid TOML basic string
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)
