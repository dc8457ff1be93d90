"""Maps from the low-rank product ``B @ A`` to an elementwise standard deviation σ > 0.

The paper writes σ = B·A + cI with c = e^-20, which is not positive off the diagonal and undefined for
non-square W (PAPER.md §2). We make the map a swappable strategy:

* :class:`SoftplusStd` (default): σ = c + softplus(B·A + ρ), ρ chosen so that σ = ``init_std``
  when B = 0. Positive everywhere, floored at c, smooth.
* :class:`AbsStd` (the paper read literally, elementwise): σ = |B·A| + c. With B = 0 it starts at the
  floor c, i.e. (almost) a point mass.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["StdMap", "SoftplusStd", "AbsStd", "PAPER_FLOOR"]

PAPER_FLOOR = math.exp(-20.0)


class StdMap:
    """Strategy interface: ``__call__(raw) -> σ``, elementwise, with σ >= ``floor``."""

    floor: float

    def __call__(self, raw: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class SoftplusStd(StdMap):
    """σ = floor + softplus(raw + ρ) with softplus(ρ) = init_std − floor."""

    def __init__(self, init_std: float = 1e-3, floor: float = PAPER_FLOOR):
        if not floor > 0:
            raise ValueError(f"the std floor must be > 0, got {floor}")
        if not init_std > floor:
            raise ValueError(f"init_std must exceed the floor {floor}, got {init_std}")
        self.init_std, self.floor = float(init_std), float(floor)
        gap = self.init_std - self.floor
        # inverse softplus, stable for small gaps: log(expm1(gap))
        self.offset = math.log(math.expm1(gap)) if gap < 20 else gap

    def __call__(self, raw: Tensor) -> Tensor:
        return self.floor + torch.nn.functional.softplus(raw + self.offset)

    def __repr__(self) -> str:
        return f"SoftplusStd(init_std={self.init_std:g}, floor={self.floor:g})"


class AbsStd(StdMap):
    """σ = |raw| + floor (the paper's ``B·A + cI`` read elementwise)."""

    def __init__(self, floor: float = PAPER_FLOOR):
        if not floor > 0:
            raise ValueError(f"the std floor must be > 0, got {floor}")
        self.floor = float(floor)

    def __call__(self, raw: Tensor) -> Tensor:
        return raw.abs() + self.floor

    def __repr__(self) -> str:
        return f"AbsStd(floor={self.floor:g})"
