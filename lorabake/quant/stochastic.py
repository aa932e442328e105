"""Uniform noise for stochastic rounding onto a codec's grid (e2m1, integers).

Stochastic rounding picks the lower or upper grid neighbour with probability proportional to
proximity, so a delta below half a grid step survives in expectation. The uniform numbers come
from a CPU generator seeded by the tensor's name (`rounding.seed_of`), so the output is the same
on every run and device.
"""

from __future__ import annotations

import torch

from lorabake import rounding

Tensor = torch.Tensor


def uniform(shape: tuple[int, ...], seed_key: str | None, device: torch.device) -> Tensor:
    if seed_key is None:
        raise ValueError("stochastic rounding needs a seed_key (the tensor name)")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(rounding.seed_of(seed_key))
    return torch.rand(shape, generator=gen, dtype=torch.float32).to(device)
