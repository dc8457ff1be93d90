"""Scale parameterizations: maps from a module's scale parameters to an elementwise σ > 0.

The paper writes σ = B·A + cI with c = e^-20, which is not positive off the diagonal and undefined for
non-square W (docs/method.md). We make the map a swappable strategy:

* :class:`SoftplusStd` (default): σ = c + softplus(B·A + ρ), ρ chosen so that σ = ``init_std``
  when B = 0. Positive everywhere, floored at c, smooth.
* :class:`AbsStd` (the paper read elementwise): σ = |B·A| + c. With B = 0 it would start at the
  floor c where |·| has zero gradient (σ never moves, and the KL against σ ≈ 2e-9 pins every task
  mean to θ), so its B factor starts non-zero instead (:meth:`StdMap.init_B`): mean σ = ``init_std``.

How they differ (docs/method.md): the softplus map starts every element at exactly init_std and
moves σ multiplicatively (dσ/d raw = sigmoid(raw + ρ) ≈ σ for small σ, so d log σ ≈ d raw); the
abs map starts each element at its own |B·A|_ij + c — spread around init_std (half-normal-like, some
elements near c) — and moves σ additively (dσ/d raw = ±1, whatever σ is), so small elements can
cross to the floor and bounce off it (|·| kinks at 0). The paper's rank-r raw matrix is shared by both.

Both are slow to move σ by a factor: with B_σ = 0 at the start a step of size lr on the factors moves
log σ by about lr·|A| per element, and the factor pair couples every element's scale to every other's.
:class:`LogStd` drops the low-rank pair for **free log-scales** (``std_map: "log-rowcol"`` or
``"log-full"``):

    log-rowcol:  σ_jk = floor + (init_std − floor) · exp(s_0 + r_j + c_k)     s_0 [1, 1], r [out, 1], c [1, in]
    log-full:    σ_jk = floor + (init_std − floor) · exp(u_jk)                u [out, in]

started at 0 (σ = init_std everywhere), so one step of size lr on s_0 moves every σ of the module by
the factor e^lr, whatever the other parameters are: σ_θ can move by the factor the data ask for within
a training budget of lr·steps in log space. The mean keeps its low-rank pair.

Interface (:class:`StdMap`): ``kinds`` (the factor kinds a module's scale has), ``init_factors``
(their starting values), ``std_of`` (σ ``[out, in]`` from them), and ``__call__(raw) -> σ``, the
elementwise map from the pre-activation (B·A for the low-rank maps, the log-scale for :class:`LogStd`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["StdMap", "SoftplusStd", "AbsStd", "LogStd", "PAPER_FLOOR", "LOW_RANK_KINDS"]

LOW_RANK_KINDS = ("sigma_A", "sigma_B")

PAPER_FLOOR = math.exp(-20.0)


class StdMap:
    """Strategy interface: ``__call__(raw) -> σ``, elementwise, with σ >= ``floor``; and
    ``init_B(A, out_features, generator)``, the scale pair's starting B (default zeros: σ = map(0)).
    ``of_factors(B, A)`` is ``self(B @ A)``; a map may fuse it (fewer dense passes), same values.

    The low-rank maps' scale factors are the pair ``kinds = ("sigma_A", "sigma_B")`` (raw = B_σ A_σ)."""

    floor: float
    kinds: tuple[str, ...] = LOW_RANK_KINDS
    #: the kinds indexed by the module's output row (their first dimension is ``out``): σ's rows
    #: ``r0:r1`` are ``std_of`` of these sliced and the others whole
    row_kinds: tuple[str, ...] = ("sigma_B",)

    def init_factors(self, out_features: int, in_features: int, rank: int,
                     generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """float32 starting values of the scale factors: A_σ ~ U(±1/√in) (LoRA's), B_σ = ``init_B``."""
        bound = 1.0 / math.sqrt(in_features)
        A = torch.empty(rank, in_features, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        return {"sigma_A": A, "sigma_B": self.init_B(A, out_features, generator)}

    def raw_of(self, factors: dict[str, Tensor]) -> Tensor:
        """The pre-activation ``[out, in]`` whose elementwise image is σ."""
        return factors["sigma_B"] @ factors["sigma_A"]

    def std_of(self, factors: dict[str, Tensor]) -> Tensor:
        """σ ``[out, in]`` from the scale factors (keyed by kind)."""
        return self.of_factors(factors["sigma_B"], factors["sigma_A"])

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


class LogStd(StdMap):
    """Free log-scales (module docstring): σ = floor + (init_std − floor)·exp(u), with
    u = s_0 + r_j + c_k (``structure="rowcol"``: per module, row and column) or u free per element
    (``structure="full"``). Every factor starts at 0: σ = init_std."""

    STRUCTURES = {"rowcol": ("sigma_log0", "sigma_row", "sigma_col"), "full": ("sigma_log",)}

    def __init__(self, init_std: float = 1e-3, floor: float = PAPER_FLOOR, structure: str = "rowcol"):
        if structure not in self.STRUCTURES:
            raise ValueError(f"structure must be one of {sorted(self.STRUCTURES)}, got {structure!r}")
        if not floor > 0:
            raise ValueError(f"the std floor must be > 0, got {floor}")
        if not init_std > floor:
            raise ValueError(f"init_std must exceed the floor {floor}, got {init_std}")
        self.init_std, self.floor, self.structure = float(init_std), float(floor), structure
        self.kinds = self.STRUCTURES[structure]
        self.row_kinds = ("sigma_log",) if structure == "full" else ("sigma_row",)
        self.log_gap = math.log(self.init_std - self.floor)

    def __call__(self, raw: Tensor) -> Tensor:
        return torch.exp(raw + self.log_gap) + self.floor

    def init_factors(self, out_features: int, in_features: int, rank: int,
                     generator: torch.Generator | None = None) -> dict[str, Tensor]:
        if self.structure == "full":
            return {"sigma_log": torch.zeros(out_features, in_features)}
        return {"sigma_log0": torch.zeros(1, 1), "sigma_row": torch.zeros(out_features, 1),
                "sigma_col": torch.zeros(1, in_features)}

    def raw_of(self, factors: dict[str, Tensor]) -> Tensor:
        if self.structure == "full":
            return factors["sigma_log"]
        return (factors["sigma_log0"] + factors["sigma_row"]) + factors["sigma_col"]  # [out, 1] + [1, in]

    def std_of(self, factors: dict[str, Tensor]) -> Tensor:
        return self(self.raw_of(factors))

    def of_factors(self, B: Tensor, A: Tensor) -> Tensor:
        raise TypeError("LogStd has no low-rank scale pair; use std_of(factors)")

    def __repr__(self) -> str:
        return f"LogStd(init_std={self.init_std:g}, floor={self.floor:g}, structure={self.structure!r})"
