"""Text that came out of a file is shown as text: escaped, never interpreted.

A name or metadata value may hold terminal control sequences (ESC, CR, BEL), line and paragraph
separators that start a fake line, or bidirectional overrides that make text display in another
order than it reads. `sanitize` shows each of them as an escape, in every output mode; `to_json`
writes strict JSON (no NaN/Infinity, every non-ASCII character and DEL as a \\u escape).
Rich markup (`[sd1]`) and emoji codes (`:skull:`) are a terminal matter: `render` prints file text
as `rich.text.Text` with emoji off, so neither is interpreted.
"""

from __future__ import annotations

import json
import math

# C0/C1 controls and DEL; U+2028/2029 (line/paragraph separators); the bidirectional marks,
# embeddings, overrides and isolates; the byte-order mark, which some viewers render as nothing.
_BIDI = [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C]
_SEPARATORS = [0x2028, 0x2029, 0xFEFF]
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if c != 0x0A}
_CONTROL.update({c: f"\\u{c:04x}" for c in [*_BIDI, *_SEPARATORS]})
_ONE_LINE = {**_CONTROL, 0x0A: "\\n"}


def sanitize(text: object, limit: int | None = None, *, one_line: bool = False) -> str:
    """Escape control, separator and bidi characters from file-supplied text; cut very long values.

    Newlines are kept (multi-line metadata stays readable) unless `one_line`, which escapes them
    too: an error message must stay on its one `Error:` line. Lone surrogates (a header may hold
    `\\udc80`) are shown as escapes too, so the text can always be encoded for output.
    """
    out = str(text).translate(_ONE_LINE if one_line else _CONTROL)
    if any(0xD800 <= ord(c) < 0xE000 for c in out):
        out = "".join(f"\\u{ord(c):04x}" if 0xD800 <= ord(c) < 0xE000 else c for c in out)
    if limit is not None and len(out) > limit:
        out = out[:limit] + f"… ({len(out) - limit} more characters)"
    return out


def _finite(value: object) -> object:
    """`value` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def to_json(doc: object) -> str:
    """Strict JSON: NaN/Infinity become null, non-ASCII and DEL are \\u escapes."""
    return json.dumps(_finite(doc), indent=2, allow_nan=False, ensure_ascii=True).replace("\x7f", "\\u007f")
