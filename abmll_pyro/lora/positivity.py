"""Maps from the low-rank product ``B @ A`` to an elementwise standard deviation σ > 0.

The paper writes σ = B·A + cI with c = e^-20, which is not positive off the diagonal and undefined for
non-square W (PAPER.md §2). We make the map a swappable strategy:

* :class:`SoftplusStd` (default): σ = c + softplus(B·A + ρ), ρ chosen so that σ = ``init_std``
  when B = 0. Positive everywhere, floored at c, smooth.
* :class:`AbsStd` (the paper read elementwise): σ = |B·A| + c. With B = 0 it would start at the
  floor c where |·| has zero gradient (σ never moves, and the KL against σ ≈ 2e-9 pins every task
  mean to θ), so its B factor starts non-zero instead (:meth:`StdMap.init_B`): mean σ = ``init_std``.

How they differ (PAPER.md §2 decision): the softplus map starts every element at exactly init_std and
moves σ multiplicatively (dσ/d raw = sigmoid(raw + ρ) ≈ σ for small σ, so d log σ ≈ d raw); the
abs map starts each element at its own |B·A|_ij + c — spread around init_std (half-normal-like, some
elements near c) — and moves σ additively (dσ/d raw = ±1, whatever σ is), so small elements can
cross to the floor and bounce off it (|·| kinks at 0). The paper's rank-r raw matrix is shared by both.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["StdMap", "SoftplusStd", "AbsStd", "PAPER_FLOOR"]

PAPER_FLOOR = math.exp(-20.0)


class StdMap:
    """Strategy interface: ``__call__(raw) -> σ``, elementwise, with σ >= ``floor``; and
    ``init_B(A, out_features, generator)``, the scale pair's starting B (default zeros: σ = map(0)).
    ``of_factors(B, A)`` is ``self(B @ A)``; a map may fuse it (fewer dense passes), same values."""

    floor: float

    def __call__(self, raw: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def of_factors(self, B: Tensor, A: Tensor) -> Tensor:
        """σ = map(B @ A), ``[out, in]`` from ``B: [out, r]``, ``A: [r, in]``."""
        return self(B @ A)

    def init_B(self, A: Tensor, out_features: int, generator: torch.Generator | None = None) -> Tensor:
        """``[out, r]`` float32: B_σ at initialisation, given A_σ ``[r, in]``."""
        return torch.zeros(out_features, A.shape[0], dtype=A.dtype, device=A.device)


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

    def of_factors(self, B: Tensor, A: Tensor) -> Tensor:
        # ρ + B A in the matmul (addmm); the floor added in place (softplus saves its input, not its output)
        shifted = torch.addmm(B.new_tensor(self.offset), B, A)
        return torch.nn.functional.softplus(shifted).add_(self.floor)

    def __repr__(self) -> str:
        return f"SoftplusStd(init_std={self.init_std:g}, floor={self.floor:g})"


class AbsStd(StdMap):
    """σ = |raw| + floor (the paper's ``B·A + cI`` read elementwise).

    ``init_std``: B starts as B ~ N(0, 1) rescaled so that mean_ij |B·A|_ij = init_std − floor, i.e.
    the mean σ is init_std and every element has a non-zero gradient sign(B·A)_ij. ``init_std=None``
    keeps B = 0 (σ = floor, zero gradient: the literal reading, which never trains).
    """

    def __init__(self, floor: float = PAPER_FLOOR, init_std: float | None = None):
        if not floor > 0:
            raise ValueError(f"the std floor must be > 0, got {floor}")
        if init_std is not None and not init_std > floor:
            raise ValueError(f"init_std must exceed the floor {floor}, got {init_std}")
        self.floor = float(floor)
        self.init_std = None if init_std is None else float(init_std)

    def __call__(self, raw: Tensor) -> Tensor:
        return raw.abs() + self.floor

    def of_factors(self, B: Tensor, A: Tensor) -> Tensor:
        return (B @ A).abs().add_(self.floor)  # in place: abs saves its input, not its output

    def init_B(self, A: Tensor, out_features: int, generator: torch.Generator | None = None) -> Tensor:
        if self.init_std is None:
            return super().init_B(A, out_features, generator)
        B = torch.randn(out_features, A.shape[0], generator=generator, dtype=A.dtype, device=A.device)
        return B * ((self.init_std - self.floor) / (B @ A).abs().mean())

    def __repr__(self) -> str:
        return f"AbsStd(floor={self.floor:g}, init_std={self.init_std})"
