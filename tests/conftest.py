"""Session-wide settings of the test processes.

The suite runs in pytest-xdist workers, one per core (`-n auto` in pyproject.toml). Each worker runs
torch single-threaded: two workers with a team of OpenMP threads each would fight for the two cores of
a CI machine, and idle team threads spin between the tiny ops these tests do. The bake's own thread
pool (`pipeline.compute`: one thread per core) is untouched, so the merges still run multi-threaded.

`@pytest.mark.torch_threads` gives a test torch's default intra-op thread count back (at least 2):
the case where a multi-threaded GEMM sums in another order than the bake threads' single-threaded one
(7e92a59: the CPU pipeline ran at the process's thread count and its output differed by some bits).
"""

from __future__ import annotations

import os

import pytest
import torch

DEFAULT_THREADS = max(2, torch.get_num_threads())
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "torch_threads: run with torch's default intra-op thread count (at least 2), not the session's 1"
    )


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core this process may run on (xdist's default counts physical cores
    through psutil, and ignores the CPU affinity a container or `taskset` gives)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@pytest.fixture(autouse=True)
def _torch_threads(request):
    wanted = DEFAULT_THREADS if request.node.get_closest_marker("torch_threads") else 1
    torch.set_num_threads(wanted)
    yield
    torch.set_num_threads(1)
