"""SIGINT and SIGTERM as one exception, raised once, never inside a commit.

The CLI installs the handler on the first line of `main`. The first signal raises `Interrupted`
in the main thread and turns every later signal into a no-op, so the clean-up that runs while
the exception unwinds (removing a temporary file, joining threads) is not itself interrupted.
Inside `deferred()` (the few calls that make an output appear) a signal is only noted and raised
when the block ends, so an output is either not there or there and reported as written.
Signal handling is process-wide by nature, hence the module-level state.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """Raised in the main thread by the first SIGINT or SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _State:
    depth = 0  # nesting of deferred() blocks
    pending: int | None = None  # a signal that arrived inside one
    raised = False  # the first signal has been raised; later ones are ignored
    written: list[str] = []  # outputs committed by this run


def _handler(signum: int, frame: object) -> None:  # noqa: ARG001
    if _State.raised:
        return
    if _State.depth:
        _State.pending = _State.pending or signum
        return
    _State.raised = True
    _ignore_at_os_level()
    raise Interrupted(signum)


def _ignore_at_os_level() -> None:
    """Later signals ignored by the OS too: Python puts the default action back for handlers that
    are Python functions while the interpreter shuts down, and a late SIGINT would then kill the
    process (exit -2 instead of 130)."""
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def _quiet_race(unraisable) -> None:
    """A signal that arrived while its handler was being set to SIG_IGN above is reported by Python
    as "Signal N ignored due to race condition" (printed, not raised). Ignoring it is what we asked
    for, so that report is dropped; anything else goes to the hook that was there before."""
    exc = unraisable.exc_value
    if _State.raised and isinstance(exc, OSError) and "ignored due to race condition" in str(exc):
        return
    _previous_hook(unraisable)


_previous_hook = sys.unraisablehook


def install() -> None:
    """Route SIGINT and SIGTERM to `Interrupted`; forget what an earlier run in this process saw."""
    _State.depth, _State.pending, _State.raised = 0, None, False
    _State.written = []
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (main() called from a worker thread)
    for signum in SIGNALS:
        signal.signal(signum, _handler)
    sys.unraisablehook = _quiet_race
    # A parent that blocked them (some job runners and CI supervisors do) would otherwise leave a
    # SIGTERM pending forever: the bake runs on and the temporary file is never cleaned up.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold a signal until the block is done, then raise it (outside any enclosing deferred block)."""
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1
        if not _State.depth and _State.pending is not None and not _State.raised:
            signum, _State.pending = _State.pending, None
            _State.raised = True
            _ignore_at_os_level()
            raise Interrupted(signum)


def ignore() -> None:
    """From now on signals are ignored: the process is already on its way out with its own message."""
    _State.raised = True
    _ignore_at_os_level()


def note_written(path: str) -> None:
    """Record a committed output, so an interruption after it can say it was written."""
    _State.written.append(path)


def written() -> list[str]:
    return list(_State.written)
