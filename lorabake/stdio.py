"""Standard streams that may be closed: a bake that finished stays a success.

`ensure_open` runs first in `main`: a closed descriptor 0, 1 or 2 is reopened on /dev/null, so
no file lorabake opens can take its number (torch's C++ warnings go to descriptor 2 by number:
they would land in the output). `report` wraps the printing of a finished command's report: a
stdout that is closed or whose reader went away (`| head`) is noted on stderr, not an error.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

_NAMES = {0: "stdin", 1: "stdout", 2: "stderr"}


class _Closed:
    stdout = False  # descriptor 1 was closed when lorabake started


def ensure_open() -> None:
    _Closed.stdout = False
    for fd, name in _NAMES.items():
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:  # the lowest free number is taken: a lower one was closed too and got it first
            os.dup2(null, fd)
            os.close(null)
        if fd == 1:
            _Closed.stdout = True
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "w" if fd else "r", closefd=False))  # noqa: SIM115 - lives as long as the process


@contextlib.contextmanager
def report() -> Iterator[None]:
    """Print a finished command's report; a lost stdout is one note on stderr, and exit stays 0."""
    try:
        yield
        sys.stdout.flush()
    except OSError as exc:  # only stdout is written in here
        _lost(exc.strerror or str(exc))
        return
    if _Closed.stdout:
        _lost("it was closed")


def _lost(why: str) -> None:
    try:  # later flushes (at exit) must not fail again
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError):
        pass
    try:
        print(f"Note: the report was not printed: stdout: {why}. The command itself succeeded.", file=sys.stderr)
    except (OSError, ValueError):
        pass
