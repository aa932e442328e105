"""PEFT `alpha_pattern` / `rank_pattern` lookups with bounded work.

PEFT (peft `utils/other.py` `get_pattern_key`) takes the first key P, in dict order, with
`re.match(rf"(.*\\.)?({P})$", module_name)`. The keys come from the LoRA file, so a crafted one
could backtrack for hours; here a key without regex syntax is compared as text (the same
answer), and any other key is matched by the `regex` engine under a time limit, after a length
cap. A key over the limits is an error naming the file and the key, never a hang.
"""

from __future__ import annotations

import functools
import re
import time

from lorabake.errors import LoraFormatError

MAX_PATTERNS = 10_000
MAX_PATTERN_CHARS = 1_000
# Wall-clock budget per pattern over every module name it is tried on (real configs: microseconds).
PATTERN_SECONDS = 1.0
_META = frozenset(".^$*+?{}[]\\|()")
_KEY = "lora_adapter_metadata"


class _Pattern:
    def __init__(self, key: str, path: str) -> None:
        self.key = key
        self.literal = not (_META & set(key))
        self.spent = 0.0
        self.compiled = None
        if not self.literal:
            try:
                re.compile(key)  # PEFT's engine decides what is valid
            except re.error as exc:
                raise LoraFormatError(f"{_KEY} pattern {key!r} is not a valid regex ({exc})", path=path) from None
            import regex  # noqa: PLC0415 - only files with regex patterns need it

            self.compiled = regex.compile(rf"(.*\.)?({key})$", flags=regex.VERSION0)

    def matches(self, name: str, path: str) -> bool:
        if self.literal:
            return name == self.key or name.endswith("." + self.key)
        left = PATTERN_SECONDS - self.spent
        started = time.perf_counter()
        try:
            hit = self.compiled.match(name, timeout=max(left, 1e-3)) is not None
        except TimeoutError:
            hit = None
        self.spent += time.perf_counter() - started
        if hit is None or self.spent > PATTERN_SECONDS:
            raise LoraFormatError(
                f"{_KEY} pattern {_short(self.key)!r} takes over {PATTERN_SECONDS:g} s to match the module names "
                "(catastrophic backtracking?)",
                path=path,
                hint="simplify the pattern or list the module names",
            )
        return hit


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:80] + "…"


@functools.lru_cache(maxsize=32)
def _table(keys: tuple[str, ...], path: str) -> tuple[_Pattern, ...]:
    if len(keys) > MAX_PATTERNS:
        raise LoraFormatError(f"{_KEY} has {len(keys)} patterns, over the {MAX_PATTERNS} accepted", path=path)
    for key in keys:
        if len(key) > MAX_PATTERN_CHARS:
            raise LoraFormatError(
                f"{_KEY} pattern {_short(key)!r} is {len(key)} characters long, over the {MAX_PATTERN_CHARS} accepted",
                path=path,
            )
    return tuple(_Pattern(k, path) for k in keys)


def pattern_value(patterns: object, name: str, *, path: str) -> object | None:
    """The value of the first pattern that matches module `name` as PEFT matches it, else None."""
    if not isinstance(patterns, dict) or not patterns:
        return None
    keys = tuple(patterns)
    if not all(isinstance(k, str) for k in keys):
        return None
    for pattern in _table(keys, path):
        if pattern.matches(name, path):
            return patterns[pattern.key]
    return None
