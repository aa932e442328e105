"""Errors are part of the interface: each carries the file, the tensor and what is wrong.

The CLI turns a `LorabakeError` into one `Error:` line and exit code 1; `UsageError` exits 2.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

EXIT_CODES_HELP = "Exit codes: 0 success, 1 failure on data or files, 2 usage error, 130 interrupted."


@dataclass
class LorabakeError(Exception):
    """A failure on data or files: the message names what is wrong, `hint` says what to do."""

    message: str
    path: str | None = None
    tensor: str | None = None
    hint: str | None = None
    exit_code = 1

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        where = []
        if self.path:
            where.append(str(self.path))
        if self.tensor:
            where.append(f"tensor {self.tensor!r}")
        head = ": ".join(where)
        text = f"{head}: {self.message}" if head else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class HeaderError(LorabakeError):
    """The safetensors header or layout is malformed."""


class InputError(LorabakeError):
    """An input path is missing, not a file, or of a refused kind (pickle)."""


class LoraFormatError(LorabakeError):
    """A LoRA module is inconsistent (ranks disagree, bad alpha, NaN, unknown algorithm)."""


class MatchError(LorabakeError):
    """LoRA modules do not fit the base checkpoint (architecture, names or shapes)."""


class OutputError(LorabakeError):
    """The output cannot be written (exists, is an input, directory missing, disk full)."""


class WriterProtocolError(LorabakeError):
    """A tensor was handed to the writer out of the declared order, shape, dtype or size."""


class UsageError(LorabakeError):
    """The command line itself is wrong (unparseable strength, bad option value)."""

    exit_code = 2


def from_os_error(exc: OSError) -> LorabakeError:
    """An `OSError` that got past the up-front checks (a race, a full disk at open, EACCES, EIO)
    as a `LorabakeError` naming the file and the problem in words."""
    if exc.errno == errno.ENOSPC:
        return OutputError("disk full", path=exc.filename, hint="free some space or write elsewhere with -o")
    if exc.errno == errno.EDQUOT:
        return OutputError("disk quota exceeded", path=exc.filename, hint="free some space or write elsewhere with -o")
    return LorabakeError(exc.strerror or str(exc), path=exc.filename)
