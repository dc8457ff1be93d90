"""The curvature of the β-KL in the task's factors, for the preconditioned inner steps
(``"kl-precond"``, ``"adam-precond"``).

Why: the KL acts on a task's mean like an L2 penalty of strength β/σ_p² per weight (1e6 at β = 1,
σ_p = 1e-3). Adam moves every factor by about the learning rate per step whatever the curvature, so
near the KL's minimum it oscillates with ΔW-sized steps ≫ σ_p and the KL after K steps sits on a
floor ≈ n·(step/σ_p)²/2 that depends on the learning rate, not on β (measured in docs/posterior.md).
Plain SGD is stable only for lr < 2σ_p²/β. Preconditioning by the KL's curvature H makes the step
p ← p − (I + D·H)⁻¹·D·d (D the optimizer's per-element step size, d its direction) a damped Newton
step on the KL where D·H ≫ 1 and the plain optimizer where the KL is flat.

For module m with c = α/r, prior scale σ_p (from ``prior.task_distribution``; θ fixed) and the task's
factors, with W = β/σ_p² ``[out, in]``, the curvature is Gauss–Newton, **block-diagonal over the rank**
(:class:`RankBlocks`): the KL's mean term is Σ_jk W_jk (c·(BA)_jk − μ_p,jk)²/2, quadratic in each
factor, and its exact Hessian in row j of B couples the r components of that row,

    mu_B, row j     : 2c² · Σ_k W_jk A_·k A_·kᵀ             ``[out, r, r]``
    mu_A, column k  : 2c² · Σ_j W_jk B_j·ᵀ B_j·             ``[in, r, r]``
    sigma_B/sigma_A : the same with W replaced by h = β(1/σ_q² + 1/σ_p²)·(dσ_q/d raw)²
                      (∂²KL/∂σ_q², chained through the std map)

The factor 2 accounts for both factors of a pair stepping at once: each alone would remove the full
residual of the bilinear product B·A in its span, together they would overshoot it twice; with the
factor, the KL-only residual halves per step at any rank. (The diagonal of these blocks, which the
step used before, ignores the coupling across rank components: at rank 16 five steps left 17–46% of
the KL.) For the free log-scales (:class:`~abmll_pyro.lora.positivity.LogStd`), u = log-scale:

    sigma_log              : h_u = β(1/σ_q² + 1/σ_p²)·(dσ_q/du)²   (one parameter per element)
    sigma_log0 / row / col : 3·Σ h_u over the module / the row / the column
                             (three additive terms move each element: the 3 keeps them from overshooting)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

from ..lora.adapter import BayesLoRA, full_precision
from ..models.priors import TaskPrior

__all__ = ["kl_curvature", "RankBlocks", "precondition"]

Params = Mapping[str, Tensor]


@dataclass(frozen=True)
class RankBlocks:
    """Curvature coupling the r components of each row (``dim=0``: a B factor ``[out, r]``) or each
    column (``dim=1``: an A factor ``[r, in]``) of a factor: ``blocks`` ``[n, r, r]``, symmetric ≥ 0."""

    blocks: Tensor
    dim: int

    def step(self, direction: Tensor, size: Tensor) -> Tensor:
        """(I + D·H)⁻¹·(D ⊙ direction) per row (column), D = diag(``size``) (broadcast to the factor)."""
        d = direction if self.dim == 0 else direction.transpose(0, 1)  # [n, r]
        D = torch.broadcast_to(size, direction.shape)
        D = D if self.dim == 0 else D.transpose(0, 1)
        eye = torch.eye(d.shape[1], dtype=d.dtype, device=d.device)
        H = self.blocks.to(d.dtype)
        out = torch.linalg.solve(eye + D.unsqueeze(-1) * H, (D * d).unsqueeze(-1)).squeeze(-1)
        return out if self.dim == 0 else out.transpose(0, 1)


Curvature = Tensor | RankBlocks


def precondition(direction: Tensor, size: Tensor | float, curvature: Curvature | None) -> Tensor:
    """The preconditioned step (I + D·H)⁻¹·D·d; ``size·direction`` without a curvature."""
    if curvature is None:
        return size * direction
    if isinstance(curvature, RankBlocks):
        return curvature.step(direction, torch.as_tensor(size, dtype=direction.dtype, device=direction.device))
    h = curvature.to(direction.dtype)
    return size * direction / (1.0 + size * h)


def _prior_scale(p) -> Tensor:
    """The elementwise scale of p(ΔW | θ): ``scale`` of its base distribution, else √variance."""
    base = getattr(p, "base_dist", p)
    scale = getattr(base, "scale", None)
    return scale if scale is not None else base.variance.sqrt()


def _std_and_slope(adapter: BayesLoRA, raw: Tensor) -> tuple[Tensor, Tensor]:
    """σ = std_map(raw) and dσ/d raw, elementwise (the maps are elementwise: one backward pass)."""
    with torch.enable_grad():
        r = raw.detach().requires_grad_(True)
        sd = adapter.std_map(r)
        (slope,) = torch.autograd.grad(sd.sum(), r)
    return sd.detach(), slope


def _pair_blocks(W: Tensor, B: Tensor, A: Tensor, scale: float) -> tuple[RankBlocks, RankBlocks]:
    """2·scale·(Σ_k W_jk A_·k A_·kᵀ per row j of B, Σ_j W_jk B_j·ᵀ B_j· per column k of A)."""
    rows = torch.einsum("jk,ik,lk->jil", W, A, A)  # [out, r, r]
    cols = torch.einsum("jk,ji,jl->kil", W, B, B)  # [in, r, r]
    return RankBlocks(2 * scale * rows, 0), RankBlocks(2 * scale * cols, 1)


def kl_curvature(adapter: BayesLoRA, prior: TaskPrior, theta: Params, kl_beta: float,
                 guide=None) -> Callable[[Params], dict[str, Curvature]]:
    """``params -> {key: H}`` for the factor keys present in ``params`` (float32 or float64, no grad):
    a :class:`RankBlocks` for the factors of a pair, a tensor of the factor's shape (diagonal) for the
    log-scales. ``kl_beta = 0``: no curvature (the preconditioned steps are the plain optimizers)."""
    c = adapter.config.scaling
    weight = {}
    with torch.no_grad():
        for m, shape in adapter.shapes.items():
            mean, std = adapter.mean(theta, m), adapter.std(theta, m)
            p = prior.task_distribution(prior.global_values(mean, std), shape, mean[:0].sum())
            weight[m] = kl_beta / _prior_scale(p).pow(2)  # β/σ_p², [out, in]

    @torch.no_grad()
    def curvature(params: Params) -> dict[str, Curvature]:
        out: dict[str, Curvature] = {}
        if not kl_beta:
            return out
        for m, W in weight.items():
            key = lambda kind: adapter.key(m, kind)  # noqa: E731
            if key("mu_A") in params and key("mu_B") in params:
                A, B = full_precision(params[key("mu_A")]), full_precision(params[key("mu_B")])
                out[key("mu_B")], out[key("mu_A")] = _pair_blocks(W, B, A, c * c)
            if key("res_B") in params and key("res_A") in params:  # a guide's mean offset c·B_Δ A_Δ (same KL curvature;
                Bd, Ad = full_precision(params[key("res_B")]), full_precision(params[key("res_A")])  # × σ² when whitened)
                whitened = bool(getattr(guide, "whiten", False))
                Wr = W * adapter.std(params, m).pow(2) if whitened else W
                out[key("res_B")], out[key("res_A")] = _pair_blocks(Wr, Bd, Ad, c * c)
            kinds = adapter.std_map.kinds
            if not all(key(k) in params for k in kinds):
                continue
            factors = {k: full_precision(params[key(k)]) for k in kinds}
            sd_q, slope = _std_and_slope(adapter, adapter.std_map.raw_of(factors))
            h = _sigma_weight(W, kl_beta, sd_q) * slope.pow(2)
            if "sigma_B" in factors:
                out[key("sigma_B")], out[key("sigma_A")] = _pair_blocks(h, factors["sigma_B"], factors["sigma_A"], 1.0)
            elif "sigma_log" in factors:
                out[key("sigma_log")] = h
            else:
                out[key("sigma_log0")] = 3 * h.sum().reshape(1, 1)
                out[key("sigma_row")] = 3 * h.sum(1, keepdim=True)
                out[key("sigma_col")] = 3 * h.sum(0, keepdim=True)
        return out

    return curvature


def _sigma_weight(W: Tensor, kl_beta: float, sd_q: Tensor) -> Tensor:
    """∂²(β·KL)/∂σ_q² = β/σ_q² + β/σ_p² (W = β/σ_p²)."""
    return kl_beta / sd_q.pow(2) + W
