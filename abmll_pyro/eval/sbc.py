"""Simulation-based calibration (Talts et al. 2018, "Validating Bayesian inference algorithms with
simulation-based calibration"): if φ_i ~ p(φ | θ*) and D_i ~ p(D | φ_i), and q(φ | D_i) is the exact
posterior, the rank of any scalar f(φ_i) among S draws f(φ^(1..S)) ~ q is uniform on {0, …, S}.

* :func:`posterior_draws` — S draws of every task site ΔW from the Pyro guide (traced sample sites);
* :func:`projections` — P fixed scalar projections f_p(ΔW) = Σ_m ⟨v_p,m, ΔW_m⟩;
* :func:`sbc_ranks` — the rank of the truth among the draws (ties broken at random);
* :func:`rank_uniformity` — the rank histogram over ``bins`` equal groups of ranks and Pearson's χ²
  test of uniformity (p-value from the regularized upper incomplete gamma function, χ² with
  bins − 1 degrees of freedom).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import pyro.poutine as poutine
import torch
from torch import Tensor

from .. import sites
from ..infer.meta import MetaSVI
from ..models.likelihoods import TaskData

__all__ = ["posterior_draws", "projections", "sbc_ranks", "rank_uniformity", "RankTest"]


@torch.no_grad()
def posterior_draws(svi: MetaSVI, task_params: Mapping[str, Tensor], support: TaskData, num_samples: int) -> dict[str, Tensor]:
    """``{module: [S, out, in]}`` draws of ΔW from q(φ | task_params): S traces of the guide's task sites."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    args = (svi.theta(), [task_params], [support])
    out: dict[str, list[Tensor]] = {m: [] for m in svi.adapter.shapes}
    for _ in range(num_samples):
        trace = poutine.trace(svi.guide).get_trace(*args)
        for m in out:
            out[m].append(trace.nodes[sites.phi(0, m)]["value"].detach())
    return {m: torch.stack(v) for m, v in out.items()}


def projections(deltas: Mapping[str, Tensor], directions: Mapping[str, Tensor]) -> Tensor:
    """``[..., P]`` float64: Σ_m ⟨directions[m][p], deltas[m]⟩ for ``deltas[m]`` ``[..., out, in]`` and
    ``directions[m]`` ``[P, out, in]``."""
    total = None
    for m, v in directions.items():
        part = torch.einsum("...jk,pjk->...p", deltas[m].double(), v.double())
        total = part if total is None else total + part
    return total


def sbc_ranks(truth: Tensor, draws: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``[P]`` long in 0..S: #{s : draws[s] < truth} plus a uniform share of the ties, for
    ``truth`` ``[P]`` and ``draws`` ``[S, P]``."""
    below = (draws < truth).sum(0)
    ties = (draws == truth).sum(0)
    extra = torch.floor(torch.rand(ties.shape, generator=generator, dtype=torch.float64) * (ties + 1)).long()
    return below + extra


@dataclass(frozen=True)
class RankTest:
    """``histogram`` (counts per bin), Pearson's ``chi2`` and its ``p_value`` under uniformity."""

    histogram: list[int]
    chi2: float
    p_value: float


def rank_uniformity(ranks: Tensor, num_samples: int, bins: int) -> RankTest:
    """χ² test that ``ranks`` (values 0..S, S = ``num_samples``) are uniform; ``bins`` must divide S + 1
    (equal numbers of rank values per bin, so each bin's expected count is n/bins)."""
    if bins < 2 or (num_samples + 1) % bins:
        raise ValueError(f"bins must be >= 2 and divide num_samples + 1 = {num_samples + 1}, got {bins}")
    ranks = ranks.flatten().long()
    if ranks.numel() == 0 or int(ranks.min()) < 0 or int(ranks.max()) > num_samples:
        raise ValueError(f"ranks must be non-empty and in 0..{num_samples}")
    counts = torch.bincount(ranks // ((num_samples + 1) // bins), minlength=bins).double()
    expected = ranks.numel() / bins
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = torch.tensor((bins - 1) / 2.0, dtype=torch.float64)
    p_value = float(torch.special.gammaincc(dof, torch.tensor(chi2 / 2.0, dtype=torch.float64)))
    return RankTest([int(c) for c in counts], chi2, p_value)
