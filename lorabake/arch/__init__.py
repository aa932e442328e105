"""Per-family name tables, one module per family. Adding a family touches only this package."""

from __future__ import annotations

from lorabake.arch import flux, sd1, sd2, sd3, sdxl
from lorabake.arch.common import Family

# In detection order; the order does not decide anything (every family is tried), it only orders reports.
FAMILIES: dict[str, Family] = {
    f.arch: f for f in (sd1.FAMILY, sd2.FAMILY, sdxl.FAMILY, sd3.FAMILY, flux.FAMILY)
}

# arch -> names other tools use for it: modelspec.architecture and kohya's ss_base_model_version.
ARCH_NAMES: dict[str, dict[str, str]] = {
    f.arch: {"title": f.title, "modelspec": f.modelspec, "kohya": f.kohya} for f in FAMILIES.values()
}

__all__ = ["ARCH_NAMES", "FAMILIES", "Family"]
