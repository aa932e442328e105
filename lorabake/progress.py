"""The progress bar of a bake or extraction: on stderr, gone when done, off for --quiet/--json."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class _Bar:
    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled = enabled
        self.label = label
        self._progress: Progress | None = None
        self._task = None

    def start_for(self, plan) -> None:
        """Start once the merge plan is known: the total is the base's data size."""
        self.start_total(plan.base.data_size)

    def start_total(self, total: int) -> None:
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn(self.label),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.label, total=total)

    def advance(self, nbytes: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, nbytes)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()


@contextlib.contextmanager
def progress_bar(*, enabled: bool, label: str = "baking") -> Iterator[_Bar]:
    bar = _Bar(enabled, label)
    try:
        yield bar
    finally:
        bar.stop()
