"""The diagonal curvature of the β-KL in the task's LoRA factors, for the ``"kl-precond"`` inner step.

Why: the KL acts on a task's mean like an L2 penalty of strength β/σ_p² per weight (1e6 at β = 1,
σ_p = 1e-3). Adam moves every factor by about the learning rate per step whatever the curvature, so
near the KL's minimum it oscillates with ΔW-sized steps ≫ σ_p and the KL after K steps sits on a
floor ≈ n·(step/σ_p)²/2 that depends on the learning rate, not on β (measured in docs/posterior.md).
Plain SGD is stable only for lr < 2σ_p²/β. Preconditioning by the KL's curvature H makes the step
p ← p − lr·g/(1 + lr·H) a damped Newton step on the KL (it resolves σ_p at any β) and SGD on the
likelihood where the KL is flat.

For module m with c = α/r, prior scale σ_p (from ``prior.task_distribution``; θ fixed) and the task's
factors, the Gauss–Newton diagonals (exact for the quadratic mean term) are, with W = β/σ_p² ``[out, in]``:

    mu_B     : 2c² · W @ (A_μ ⊙ A_μ)ᵀ                  ``[out, r]``
    mu_A     : 2c² · (B_μ ⊙ B_μ)ᵀ @ W                  ``[r, in]``
    sigma_B  : 2 · h @ (A_σ ⊙ A_σ)ᵀ,   sigma_A: 2 · (B_σ ⊙ B_σ)ᵀ @ h,
               h = β(1/σ_q² + 1/σ_p²)·(dσ_q/d raw)²    (∂²KL/∂σ_q², chained through the std map)

The factor 2 accounts for both factors of a pair stepping at once: each alone would remove the full
residual of the bilinear product B·A, together they would overshoot it twice.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor

from ..lora.adapter import BayesLoRA, full_precision
from ..models.priors import TaskPrior

__all__ = ["kl_curvature"]

Params = Mapping[str, Tensor]


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


def kl_curvature(adapter: BayesLoRA, prior: TaskPrior, theta: Params, kl_beta: float) -> Callable[[Params], dict[str, Tensor]]:
    """``params -> {key: H}`` for the factor keys present in ``params`` (float32 or float64, no grad)."""
    c = adapter.config.scaling
    weight = {}
    with torch.no_grad():
        for m, shape in adapter.shapes.items():
            mean, std = adapter.mean(theta, m), adapter.std(theta, m)
            p = prior.task_distribution(prior.global_values(mean, std), shape, mean[:0].sum())
            weight[m] = kl_beta / _prior_scale(p).pow(2)  # β/σ_p², [out, in]

    @torch.no_grad()
    def curvature(params: Params) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for m, W in weight.items():
            key = lambda kind: adapter.key(m, kind)  # noqa: E731
            if key("mu_A") in params and key("mu_B") in params:
                A, B = full_precision(params[key("mu_A")]), full_precision(params[key("mu_B")])
                out[key("mu_B")] = 2 * c * c * (W @ (A * A).T)
                out[key("mu_A")] = 2 * c * c * ((B * B).T @ W)
            if key("sigma_A") in params and key("sigma_B") in params:
                A, B = full_precision(params[key("sigma_A")]), full_precision(params[key("sigma_B")])
                sd_q, slope = _std_and_slope(adapter, B @ A)
                h = _sigma_weight(W, kl_beta, sd_q) * slope.pow(2)
                out[key("sigma_B")] = 2 * (h @ (A * A).T)
                out[key("sigma_A")] = 2 * ((B * B).T @ h)
        return out

    return curvature


def _sigma_weight(W: Tensor, kl_beta: float, sd_q: Tensor) -> Tensor:
    """∂²(β·KL)/∂σ_q² = β/σ_q² + β/σ_p² (W = β/σ_p²)."""
    return kl_beta / sd_q.pow(2) + W
