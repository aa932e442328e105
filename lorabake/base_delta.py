"""`combine`/`resize --base`: the exact ΔW of a module whose change depends on the base weight.

DoRA rescales the merged weight by its own norm; OFT/BOFT rotate it; (IA)³ scales it; GLoRA
multiplies it: none is a ΔW a LoRA file can hold until the base weight is known. With the base,
the change is what `merge` makes of it: `delta.apply_patches` (the bake's own adapter math, checked
against PEFT's merge and LyCORIS's forward in tests/test_lycoris_parity.py) run on the module's view
of the base weight (its rows of a fused weight, in its own row order), in fp64. Every input's term
on that module is folded in command-line order, as `merge` folds them, so ΔW = W' − W is the whole
module's change; `lowrank.factor_dense` then gives exact factors (an fp64 SVD cut at the numerical
rank), which `combine` stacks and reduces like any others.

The base is read one tensor at a time, only for the modules that need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorabake import delta, lowrank
from lorabake.detect import detect_checkpoint
from lorabake.errors import LoraFormatError, MatchError
from lorabake.keymap import build_keymap
from lorabake.lora_format import LoraFile
from lorabake.st_reader import SafetensorsReader

Tensor = torch.Tensor


@dataclass
class Pending:
    """One input's term on a module that needs the base: a linear one as factors (ΔW = coef·up@down), or
    a weight-dependent one as the patch `merge` would fold (its strength is the input's × block's)."""

    coef: float = 1.0
    up: Tensor | None = None
    down: Tensor | None = None
    patch: delta.Patch | None = None


class BaseWeights:
    """A base checkpoint's rule table, and each module's view of its weight (read when asked)."""

    def __init__(self, reader: SafetensorsReader) -> None:
        self.reader = reader
        self.info = detect_checkpoint(reader.tensors, reader.metadata)
        self.keymap = build_keymap(reader.tensors, self.info)

    @property
    def arch(self) -> str:
        return self.info.arch

    def check(self, lora: LoraFile, stem: str, first_tensor: str) -> None:
        """The module lands on one weight of this base (refusals before any tensor is read)."""
        if stem in self.keymap.spread:
            raise LoraFormatError(
                f"module {stem!r} depends on the base weight and spans several weights of the base "
                f"{self.reader.path}: its change cannot be computed as one weight's",
                path=lora.path, tensor=first_tensor, hint="bake it with `lorabake merge`")
        if stem not in self.keymap.targets:
            raise MatchError(f"module {stem!r} matches no weight of the base {self.reader.path}",
                             path=lora.path, tensor=first_tensor, hint="give --base the checkpoint it was trained for")

    def view(self, stem: str) -> Tensor:
        """The module's view of its base weight, fp64: its rows of a fused weight, transformed as it sees them."""
        target = self.keymap.targets[stem]
        return delta.lora_view(self.reader.read(target.key).double(), target.slice, target.transform)

    def delta(self, stem: str, terms: Sequence[Pending], *, path: str, tensor: str) -> tuple[Tensor, Tensor, tuple[int, ...]]:
        """(up, down, view shape): exact factors of the module's whole change W' − W, every term folded in order."""
        w = self.view(stem)
        current = w.clone()
        for term in terms:
            if term.patch is not None:
                try:
                    current = delta.apply_patches(current, [term.patch])
                except LoraFormatError as exc:
                    raise LoraFormatError(f"module {stem!r}: {exc.message}", path=path, tensor=tensor, hint=exc.hint) from None
            else:
                current += term.coef * (term.up.double() @ term.down.double()).reshape(w.shape)
        up, down = lowrank.factor_dense((current - w).reshape(w.shape[0], -1))
        return up.float(), down.float(), tuple(w.shape)
