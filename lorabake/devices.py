"""Choosing the compute device from the `--device` option."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lorabake.errors import UsageError

_SPECS = "auto, cpu, cuda, cuda:N, mps"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(spec: str) -> torch.device:
    """`auto` (cuda, then mps, then cpu), `cpu`, `cuda`, `cuda:N` or `mps`; UsageError if unavailable."""
    s = spec.strip().lower()
    if s == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if s == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", s)
    if m:
        if not torch.cuda.is_available():
            raise UsageError(
                f"device {spec!r} was asked for but CUDA is not available",
                hint="this torch build or machine has no usable GPU; use --device cpu or auto",
            )
        if m.group(1) is not None:
            index = int(m.group(1))
            count = torch.cuda.device_count()
            if index >= count:
                raise UsageError(
                    f"device {spec!r} does not exist: {count} CUDA device(s) visible",
                    hint=f"use cuda:0 … cuda:{count - 1}" if count else "use --device cpu",
                )
            return torch.device("cuda", index)
        return torch.device("cuda")
    if s == "mps":
        if not _mps_available():
            raise UsageError(f"device {spec!r} was asked for but MPS is not available", hint="use --device cpu or auto")
        return torch.device("mps")
    raise UsageError(f"unknown device {spec!r}", hint=f"choose one of {_SPECS}")


@contextmanager
def one_thread() -> Iterator[None]:
    """torch single-threaded for the duration (elementwise ops and min/max give the same bits at any
    thread count). Between OpenMP regions the idle team threads spin: on a shared 2-core machine the
    preflight's per-tensor `aminmax` spent more CPU spinning than working (perf: 16 % of an SDXL x4
    merge's CPU samples in libgomp, nearly all in its first 40 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
